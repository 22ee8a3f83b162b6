"""Indexed lookups for onnxruntime's QDQ quantizer and MinMax calibrator: its results, without a scan per tensor."""

from __future__ import annotations

import types
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import cache
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from nnopt.ir.graphview import graph_protos

# NOTE: why this module exists. onnxruntime's quantization tools find things by scanning: ``find_by_name``
# walks the initializer list, ``ONNXModel.replace_input_of_all_nodes`` / ``input_name_to_nodes`` /
# ``get_initializer`` walk the graph, ``initializer_extend`` re-checks every initializer, and the MinMax
# calibrator's ``augment_graph`` rebuilds a value_info dict and scans the nodes for every calibrated tensor.
# Each runs once or more per quantized tensor, so placing QDQ on a net of n nodes cost ~n² (41 s at 2k
# nodes). The adapters below answer the same questions from dicts built once and kept up to date by the
# methods that change the graph; onnxruntime's own code does everything else (its calibrators, its QDQ
# placement rules, its scale and zero-point maths). They are instance-level: onnxruntime's classes and
# modules are never modified. They are used only with the onnxruntime versions they were checked against
# (``SUPPORTED``, results byte-identical to the plain classes); any other version takes the plain path.

#: onnxruntime major.minor versions whose quantizer code these adapters were read against.
SUPPORTED = frozenset({"1.32"})

#: Work counters (tests pin them): indexes built (one when a quantizer starts, one after its final
#: clean-up) and rebuilt because a list changed behind the index's back (onnxruntime code the adapters
#: do not know writing the proto: correct, but back to a scan per change).
COUNTERS: dict[str, int] = {"index_builds": 0, "index_rebuilds": 0}


def supported() -> bool:
    """True when the installed onnxruntime is one the adapters were checked against."""
    import onnxruntime

    return ".".join(onnxruntime.__version__.split(".")[:2]) in SUPPORTED


# ---------------------------------------------------------------------------------------------- model
class _InitializerList:
    """``graph.initializer`` as the quantizer sees it: the same sequence, plus a name lookup for ``find_by_name``."""

    def __init__(self, owner: Any) -> None:
        self._owner = owner

    def find(self, name: str) -> onnx.TensorProto | None:
        return self._owner.get_initializer(name)

    def _items(self) -> Any:
        self._owner._flush_removals()
        return self._owner.model.graph.initializer

    def __iter__(self) -> Iterator[onnx.TensorProto]:
        return iter(self._items())

    def __len__(self) -> int:
        return len(self._items())

    def __getitem__(self, index: Any) -> Any:
        return self._items()[index]

    def __contains__(self, item: object) -> bool:
        return item in self._items()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._items(), name)


class _NamesToNodes(Mapping):
    """A read-only view of an index (tensor name → nodes), lists in graph order, as onnxruntime's dicts hold them."""

    def __init__(self, owner: Any, index: dict[str, list[Any]], last_only: bool) -> None:
        self._owner, self._index, self._last_only = owner, index, last_only

    def __getitem__(self, name: str) -> Any:
        nodes = self._index.get(name)
        if not nodes:
            raise KeyError(name)
        ordered = self._owner._in_graph_order(nodes)
        return ordered[-1] if self._last_only else ordered

    def __iter__(self) -> Iterator[str]:
        return (name for name, nodes in self._index.items() if nodes)

    def __len__(self) -> int:
        return sum(1 for nodes in self._index.values() if nodes)


def _indexed_model_class() -> type:
    from onnxruntime.quantization.onnx_model import ONNXModel

    class IndexedONNXModel(ONNXModel):
        """onnxruntime's ``ONNXModel`` whose lookups use dicts kept up to date by its own mutators.

        Indexed: initializers by name, nodes by the tensors they read and write. Initializers removed by
        ``remove_initializer`` leave the proto list in one batch, before the list is next read (one removal
        from a protobuf list compares every element). If the node or initializer list changes length
        behind its back (onnxruntime code writing the proto directly), the index is rebuilt before use.
        """

        def __init__(self, model: onnx.ModelProto) -> None:
            super().__init__(model)
            self._build()

        # -- index upkeep ------------------------------------------------------------------------
        def _build(self) -> None:
            COUNTERS["index_builds"] += 1
            if getattr(self, "_pending", None):
                self._flush_removals()
            graph = self.model.graph
            self._inits: dict[str, list[onnx.TensorProto]] = {}
            for tensor in graph.initializer:
                self._inits.setdefault(tensor.name, []).append(tensor)
            self._pending: list[onnx.TensorProto] = []
            self._readers: dict[str, list[onnx.NodeProto]] = {}
            self._writers: dict[str, list[onnx.NodeProto]] = {}
            self._seq: dict[int, int] = {}
            # The node objects are held so that protobuf hands out the same ones again (ids stay valid).
            self._alive: list[onnx.NodeProto] = []
            for node in graph.node:
                self._index_node(node)
            self._lengths = (len(graph.node), len(graph.initializer))

        def _sync(self) -> None:
            graph = self.model.graph
            if (len(graph.node), len(graph.initializer)) != self._lengths:
                COUNTERS["index_rebuilds"] += 1
                self._flush_removals()
                self._build()

        def _index_node(self, node: onnx.NodeProto) -> None:
            self._seq[id(node)] = len(self._alive)
            self._alive.append(node)
            for name in node.input:
                if name:
                    self._readers.setdefault(name, []).append(node)
            for name in node.output:
                if name:
                    self._writers.setdefault(name, []).append(node)

        def _in_graph_order(self, nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
            return sorted(nodes, key=lambda n: self._seq[id(n)])

        def _reindex(self, index: dict[str, list[onnx.NodeProto]], node: onnx.NodeProto, names: Iterable[str],
                     field: Any) -> None:
            """Re-list ``node`` under each of ``names`` once per occurrence in ``field`` (its inputs or outputs)."""
            for name in set(names):
                if not name:
                    continue
                kept = [n for n in index.get(name, ()) if n is not node]
                kept += [node] * sum(1 for x in field if x == name)
                index[name] = self._in_graph_order(kept)

        def _flush_removals(self) -> None:
            if not self._pending:
                return
            doomed = {id(t) for t in self._pending}
            container = self.model.graph.initializer
            positions = [i for i, t in enumerate(container) if id(t) in doomed]
            for i in reversed(positions):
                del container[i]
            self._pending = []
            self._lengths = (len(self.model.graph.node), len(container))

        # -- initializers ------------------------------------------------------------------------
        def initializer(self) -> Any:
            return _InitializerList(self)

        def get_initializer(self, name: str) -> onnx.TensorProto | None:
            self._sync()
            found = self._inits.get(name)
            return found[0] if found else None

        def _append_initializer(self, tensor: onnx.TensorProto) -> None:
            container = self.model.graph.initializer
            container.append(tensor)
            self._inits.setdefault(tensor.name, []).append(container[-1])
            self._lengths = (self._lengths[0], self._lengths[1] + 1)

        def add_initializer(self, tensor: onnx.TensorProto) -> None:
            if self.get_initializer(tensor.name) is None:
                self._check_init(tensor)
                self._append_initializer(tensor)

        def initializer_extend(self, inits: list[onnx.TensorProto]) -> None:
            if len(inits) == 0:
                raise ValueError("Can add an empty list.")
            self._sync()
            # onnxruntime re-checks every initializer on each call; the check depends on the tensor only,
            # so each is checked once: those of the input model at the first call, the others when added.
            if not getattr(self, "_inputs_checked", False):
                for init in self.model.graph.initializer:
                    self._check_init(init, "gain")
                self._inputs_checked = True
            for init in inits:
                self._check_init(init)
                self._append_initializer(init)

        def remove_initializer(self, tensor: onnx.TensorProto) -> None:
            self._sync()
            same_name = self._inits.get(tensor.name, [])
            match = next((t for t in same_name if t is tensor), None)
            if match is None:  # an equal copy: the list's first equal element goes, as with ``list.remove``
                match = next((t for t in same_name if t == tensor), None)
            if match is None:
                return
            same_name.remove(match)
            self._pending.append(match)
            for graph_input in self.model.graph.input:
                if graph_input.name == tensor.name:
                    self.model.graph.input.remove(graph_input)
                    break

        def get_initializer_name_set(self) -> set[str]:
            self._sync()
            return {name for name, tensors in self._inits.items() if tensors}

        # -- nodes -------------------------------------------------------------------------------
        def add_node(self, node: onnx.NodeProto) -> None:
            self._sync()
            container = self.model.graph.node
            container.extend([self._check_node(node)])
            self._index_node(container[-1])
            self._lengths = (self._lengths[0] + 1, self._lengths[1])

        def add_nodes(self, nodes_to_add: list[onnx.NodeProto]) -> None:
            for node in nodes_to_add:
                self.add_node(node)

        def remove_node(self, node: onnx.NodeProto) -> None:
            self.remove_nodes([node])

        def remove_nodes(self, nodes_to_remove: list[onnx.NodeProto]) -> None:
            self._sync()
            container = self.model.graph.node
            doomed = {id(n) for n in nodes_to_remove}
            positions = [i for i, n in enumerate(container) if id(n) in doomed]
            removed = [container[i] for i in positions]
            found = {id(n) for n in removed}
            for i in reversed(positions):
                del container[i]
            for node in removed:
                self._reindex(self._readers, node, node.input, ())
                self._reindex(self._writers, node, node.output, ())
            self._lengths = (len(container), self._lengths[1])
            # A node that is not one of the graph's own objects (a copy) is found by equality, as before.
            strangers = [n for n in nodes_to_remove if id(n) not in found]
            for node in strangers:
                if node in container:
                    container.remove(node)
            if strangers:
                self._build()

        def input_name_to_nodes(self) -> Mapping[str, list[onnx.NodeProto]]:
            self._sync()
            return _NamesToNodes(self, self._readers, last_only=False)

        def output_name_to_node(self) -> Mapping[str, onnx.NodeProto]:
            self._sync()
            return _NamesToNodes(self, self._writers, last_only=True)

        def _replace(self, index: dict[str, list[onnx.NodeProto]], old: str, new: str,
                     names: set[str] | None, outputs: bool) -> None:
            self._sync()
            nodes = self._in_graph_order(list({id(n): n for n in index.get(old, ())}.values()))
            replace = ONNXModel.replace_node_output if outputs else ONNXModel.replace_node_input
            for node in nodes:
                if names is None or node.name in names:
                    replace(node, old, new)
                    self._reindex(index, node, (old, new), node.output if outputs else node.input)

        def replace_input_of_all_nodes(self, old_input_name: str, new_input_name: str) -> None:
            if not old_input_name:  # empty names (omitted optional inputs) are not indexed
                super().replace_input_of_all_nodes(old_input_name, new_input_name)
                return self._build()
            self._replace(self._readers, old_input_name, new_input_name, None, outputs=False)
            return None

        def replace_input_of_nodes(self, old_input_name: str, new_input_name: str, node_names_set: set[str]) -> None:
            if not old_input_name:
                super().replace_input_of_nodes(old_input_name, new_input_name, node_names_set)
                return self._build()
            self._replace(self._readers, old_input_name, new_input_name, set(node_names_set), outputs=False)
            return None

        def replace_output_of_all_nodes(self, old_output_name: str, new_output_name: str) -> None:
            if not old_output_name:
                super().replace_output_of_all_nodes(old_output_name, new_output_name)
                return self._build()
            self._replace(self._writers, old_output_name, new_output_name, None, outputs=True)
            return None

        def replace_output_of_nodes(self, old_output_name: str, new_output_name: str,
                                    node_names_set: set[str]) -> None:
            if not old_output_name:
                super().replace_output_of_nodes(old_output_name, new_output_name, node_names_set)
                return self._build()
            self._replace(self._writers, old_output_name, new_output_name, set(node_names_set), outputs=True)
            return None

        def replace_node_input(self, node: onnx.NodeProto, old_input_name: str,
                               new_input_name: str) -> None:
            # onnxruntime's is a staticmethod; called on the model it must also move the node in the index.
            ONNXModel.replace_node_input(node, old_input_name, new_input_name)
            if id(node) in self._seq:
                self._reindex(self._readers, node, (old_input_name, new_input_name), node.input)

        # -- whole-list rewrites: onnxruntime's own, then a fresh index --------------------------
        def topological_sort(self) -> None:
            self._flush_removals()
            super().topological_sort()
            self._build()

        def clean_initializers(self) -> Any:
            self._flush_removals()
            self._unread_initializers_first()
            result = super().clean_initializers()
            self._build()
            return result

        def _unread_initializers_first(self) -> None:
            """Move the initializers that no node of any graph reads, and no graph output names, to the front.

            onnxruntime's ``clean_initializers`` removes the unused ones one by one with ``list.remove``,
            which compares every element before the one removed: with them at the front, each is found
            first. They are all removed, so the initializers kept stay in their order, as before.
            """
            graph = self.model.graph
            read = {o.name for o in graph.output} | _names_read(graph)
            items = list(graph.initializer)
            front = [t for t in items if t.name not in read]
            if not front or len(front) == len(items):
                return
            rest = [t for t in items if t.name in read]
            del graph.initializer[:]
            graph.initializer.extend(front + rest)

        def remove_unused_constant(self) -> None:
            self._flush_removals()
            super().remove_unused_constant()
            self._build()

        def save_model_to_file(self, output_path: str, use_external_data_format: bool = False) -> None:
            self._flush_removals()
            super().save_model_to_file(output_path, use_external_data_format)

    return IndexedONNXModel


def _names_read(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name a node of ``graph`` or of any graph nested in it reads (scopes not told apart)."""
    return {name for g in graph_protos(graph) for node in g.node for name in node.input}


# ---------------------------------------------------------------------------------------------- quantizer
def _find_by_name(item_name: str, item_list: Any) -> Any:
    """``quant_utils.find_by_name``, answered from the index when ``item_list`` is an indexed model's initializers."""
    from onnxruntime.quantization.quant_utils import find_by_name

    if isinstance(item_list, _InitializerList):
        return item_list.find(item_name)
    return find_by_name(item_name, item_list)


def _names(code: types.CodeType) -> set[str]:
    """Global names a function's code (and the comprehensions and lambdas inside it) refers to."""
    found = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            found |= _names(const)
    return found


def _with_globals(func: types.FunctionType, overrides: dict[str, Any]) -> types.FunctionType:
    """The same code object as ``func`` resolving the names in ``overrides`` to other objects."""
    rebound = types.FunctionType(func.__code__, {**func.__globals__, **overrides}, func.__name__,
                                 func.__defaults__, func.__closure__)
    rebound.__kwdefaults__ = func.__kwdefaults__
    rebound.__qualname__ = func.__qualname__
    rebound.__doc__ = func.__doc__
    return rebound


@cache
def indexed_qdq_quantizer_class() -> type | None:
    """A subclass of onnxruntime's ``QDQQuantizer`` working on an indexed model; None if not applicable.

    Its methods are onnxruntime's own code; the ones that call the module function ``find_by_name``
    resolve it to ``_find_by_name`` (a dict lookup for the model's initializers, the plain scan for any
    other list). ``self.model``, set by onnxruntime's ``__init__`` to an ``ONNXModel``, is wrapped into
    the indexed model on assignment, before ``__init__`` first uses it.
    """
    if not supported():
        return None
    from onnxruntime.quantization import quant_utils
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

    if not callable(getattr(quant_utils, "find_by_name", None)):
        return None
    indexed_model = _indexed_model_class()
    namespace: dict[str, Any] = {}
    seen: set[str] = set()
    for klass in QDQQuantizer.__mro__[:-1]:  # onnxruntime's classes, most derived first; not ``object``
        for name, attr in vars(klass).items():
            if name in seen:  # overridden in a more derived class: that definition is the one used
                continue
            seen.add(name)
            if isinstance(attr, types.FunctionType) and "find_by_name" in _names(attr.__code__):
                namespace[name] = _with_globals(attr, {"find_by_name": _find_by_name})
    if not namespace:
        return None

    def get_model(self: Any) -> Any:
        return self.__dict__["_indexed_model"]

    def set_model(self: Any, value: Any) -> None:
        inner = getattr(value, "model", None)
        wrap = type(value) is not indexed_model and isinstance(inner, onnx.ModelProto)
        self.__dict__["_indexed_model"] = indexed_model(inner) if wrap else value

    namespace["model"] = property(get_model, set_model)
    namespace["__doc__"] = "onnxruntime's QDQQuantizer on an indexed model (see nnopt.passes._ort_quant)."
    return type("IndexedQDQQuantizer", (QDQQuantizer,), namespace)


def qdq_quantizer(*args: Any, **kwargs: Any) -> Any:
    """onnxruntime's ``QDQQuantizer(*args, **kwargs)``: the indexed subclass when supported, else the plain class."""
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

    return (indexed_qdq_quantizer_class() or QDQQuantizer)(*args, **kwargs)


# ---------------------------------------------------------------------------------------------- calibrator
def _augment_minmax(calibrator: Any) -> None:
    """What ``MinMaxCalibrater.augment_graph`` does (per-tensor ReduceMin/ReduceMax → Reshape → graph output,
    the same nodes, names and order), with one value_info map and one reader scan instead of one per tensor.

    The per-channel variant (axes per tensor) is left to onnxruntime's own method.
    """
    model = calibrator.model
    graph = model.graph
    tensors, _ = calibrator.select_tensors_to_calibrate(model)
    reshape_shape_name = str(uuid.uuid4())
    graph.initializer.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), reshape_shape_name))
    # The map onnxruntime rebuilds per tensor: value_info, then graph outputs, then graph inputs on top.
    # Between two tensors only graph outputs are added, so each is entered unless an input has its name.
    input_names = {i.name for i in graph.input}
    value_infos = {vi.name: vi for vi in graph.value_info}
    value_infos.update({o.name: o for o in graph.output})
    value_infos.update({i.name: i for i in graph.input})
    nodes = list(graph.node)
    first_reader: dict[str, int] = {}
    for position, node in enumerate(nodes):
        for name in node.input:
            first_reader.setdefault(name, position)
    # onnxruntime inserts each tensor's two pairs right before the first node reading it (after pairs
    # inserted there earlier), or at the end when nothing reads it: grouped per original node here.
    before: dict[int, list[onnx.NodeProto]] = {}
    for tensor_name in tensors:
        for reduce_op_name in ("ReduceMin", "ReduceMax"):
            reduce_output = tensor_name + "_" + reduce_op_name
            intermediate_output = reduce_output + "_Reshape"
            reduce_node = helper.make_node(reduce_op_name, [tensor_name], [intermediate_output], keepdims=1,
                                           name=reduce_output)
            reshape_node = helper.make_node("Reshape", inputs=[intermediate_output, reshape_shape_name],
                                            outputs=[reduce_output], name=intermediate_output)
            if tensor_name not in value_infos:
                raise ValueError(f"Unable to guess tensor type for tensor {tensor_name!r}, "
                                 "running shape inference before quantization may resolve this issue.")
            onnx_type = value_infos[tensor_name].type.tensor_type.elem_type
            before.setdefault(first_reader.get(tensor_name, len(nodes)), []).extend([reduce_node, reshape_node])
            output = helper.make_tensor_value_info(reduce_output, onnx_type, [None])
            graph.output.append(output)
            if reduce_output not in input_names:
                value_infos[reduce_output] = graph.output[-1]
    ordered: list[onnx.NodeProto] = []
    for position, node in enumerate(nodes):
        ordered.extend(before.get(position, ()))
        ordered.append(node)
    ordered.extend(before.get(len(nodes), ()))
    del graph.node[:]
    graph.node.extend(ordered)
    onnx.save(model, calibrator.augmented_model_path, save_as_external_data=calibrator.use_external_data_format)


def create_calibrator(model_path: Any, op_types: list[str], augmented_model_path: str, method: Any) -> Any:
    """onnxruntime's ``create_calibrator(model_path, op_types, augmented_model_path, calibrate_method=method)``.

    For MinMax (with onnxruntime's defaults, as ``create_calibrator`` sets them) on a supported version,
    the calibrator's graph augmentation is ``_augment_minmax``; everything else is onnxruntime's.
    """
    from onnxruntime.quantization import calibrate

    if method != calibrate.CalibrationMethod.MinMax or not supported():
        return calibrate.create_calibrator(model_path, op_types, augmented_model_path=augmented_model_path,
                                           calibrate_method=method)
    calibrator = calibrate.MinMaxCalibrater(model_path, op_types, augmented_model_path,
                                            use_external_data_format=False, symmetric=False,
                                            moving_average=False, averaging_constant=0.01,
                                            max_intermediate_outputs=None, per_channel=False)
    augment: Callable[[], None] = (lambda: _augment_minmax(calibrator)) if not calibrator.per_channel \
        else calibrator.augment_graph
    augment()
    calibrator.create_inference_session()
    return calibrator
