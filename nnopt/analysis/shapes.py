"""ONNX shape inference in one place: the flavours the cost model, the passes and verification need."""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np
import onnx

from nnopt.analysis.body_values import SHAPE_DATA_LIMIT, hide_outer_constants, refine_bodies, show_outer_constants
from nnopt.errors import first_line
from nnopt.ir.graphview import graph_protos, stable_topological_order, subgraph_reads

#: What ``infer_shapes`` did, over the process: ``calls`` (helper calls) and ``infer`` (runs of ONNX shape
#: inference, a retry without data propagation included). Tests read it to pin how often inference runs;
#: pass ``counter=`` to count one caller's work alone.
COUNTERS: Counter[str] = Counter()

#: What to keep of the model's own shape annotations (value_info and graph-output shapes) before inference:
#:
#: * ``keep``: everything, as written;
#: * ``static``: in every graph, only concrete dims (symbolic ones would be kept over inferred values);
#: * ``typed``: in every graph, element types but no shapes (stale dims would win over new input dims);
#: * ``drop``: in every graph, no value_info at all and no output shapes (they may be stale, and passes
#:   prove rewrites correct from what inference finds).
Declared = Literal["keep", "static", "typed", "drop"]

#: Attribute types that hold subgraphs.
GRAPH_ATTRS = frozenset({onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS})


# ---------------------------------------------------------------------------------------------- types
@dataclass(frozen=True)
class TensorType:
    """What shape inference knows about one value.

    Attributes:
        elem_type: the onnx ``TensorProto`` data type, 0 when unknown.
        shape: dims (int, a symbolic name, or None when unknown); None when even the rank is unknown.
        is_tensor: False for sequences, optionals and maps.
    """

    elem_type: int
    shape: tuple[int | str | None, ...] | None
    is_tensor: bool = True

    @property
    def static_shape(self) -> tuple[int, ...] | None:
        """The shape if every dim is a known int, else None."""
        if self.shape is None or not all(isinstance(d, int) for d in self.shape):
            return None
        return self.shape  # type: ignore[return-value]

    @property
    def nbytes(self) -> int | None:
        """Bytes of the tensor if its shape and element size are known."""
        shape = self.static_shape
        size = element_size(self.elem_type)
        if not self.is_tensor or shape is None or size is None:
            return None
        return math.prod(shape) * size


def element_size(elem_type: int) -> int | None:
    """Bytes per element of an onnx data type; None for strings, sub-byte and unknown types."""
    if elem_type in (0, onnx.TensorProto.STRING):
        return None
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
    except (KeyError, ValueError, TypeError):
        return None
    # NOTE: onnx maps 4-bit types to 1-byte numpy types; their packed size is smaller, never larger.
    return int(np.dtype(dtype).itemsize)


_NOT_A_TENSOR = TensorType(0, None, is_tensor=False)


def value_type(value_info: onnx.ValueInfoProto) -> TensorType:
    """The :class:`TensorType` a ValueInfoProto declares (negative dims, written by some exporters for a
    dynamic dim, are unknown)."""
    if value_info.type.WhichOneof("value") != "tensor_type":
        return _NOT_A_TENSOR
    tensor_type = value_info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return TensorType(tensor_type.elem_type, None)
    dims = tensor_type.shape.dim
    values = tuple(d.dim_value for d in dims)
    # Fast path: a positive dim_value is a set dim_value (dim_value and dim_param are a oneof).
    if all(v > 0 for v in values):
        return TensorType(tensor_type.elem_type, values)
    shape: list[int | str | None] = []
    for d in dims:
        if d.HasField("dim_value") and d.dim_value >= 0:
            shape.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            shape.append(d.dim_param)
        else:
            shape.append(None)
    return TensorType(tensor_type.elem_type, tuple(shape))


# ---------------------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class ShapeOptions:
    """How to run inference. Hashable, so a cache can key results on (model version, options).

    Attributes:
        input_dims: Concrete dims set on graph inputs first, as ``((name, dims), ...)`` (see
            :meth:`with_inputs`); an input whose declared rank differs keeps its declared dims.
        declared: What to keep of the model's own shape annotations (see :data:`Declared`).
        data_prop: Whether ONNX propagates constant shape values (Shape → Gather → Reshape chains).
        retry_without_data_prop: Run again without data propagation when the first run fails (some real
            models fail only with it).
        strict: Strict mode: an op whose inference fails is an error, not an unknown shape.
        strip_data_above: When set, inference runs on a copy whose main-graph initializers and Constant
            values above this many elements (and all external-data ones) keep only name, type and dims:
            much cheaper for large models; data propagation only needs small shape vectors.

    Inference needs producers before readers, and nodes are taken in the model's order: callers with
    unsorted graphs sort them first (see :func:`topological_order`).
    """

    input_dims: tuple[tuple[str, tuple[int, ...]], ...] = ()
    declared: Declared = "keep"
    data_prop: bool = True
    retry_without_data_prop: bool = False
    strict: bool = False
    strip_data_above: int | None = None

    def with_inputs(self, dims: Mapping[str, Sequence[int]] | None) -> ShapeOptions:
        """These options with ``dims`` as the concrete input dims."""
        pairs = tuple((name, tuple(int(d) for d in shape)) for name, shape in (dims or {}).items())
        return ShapeOptions(pairs, self.declared, self.data_prop, self.retry_without_data_prop, self.strict,
                            self.strip_data_above)  # fmt: skip


#: Fresh inference for passes that prove rewrites from shapes: stale annotations dropped, symbolic dims kept.
FRESH = ShapeOptions(declared="drop", retry_without_data_prop=True)
#: The validity check after a pass: strict, no data propagation, the model as written.
STRICT = ShapeOptions(data_prop=False, strict=True)
#: What the cost model runs (with its concrete input dims): static annotations kept, weights stripped.
CONCRETE = ShapeOptions(declared="static", strip_data_above=4096)


# ---------------------------------------------------------------------------------------------- result
@dataclass(frozen=True)
class GraphShapes:
    """The types of one graph scope after inference, by where ONNX keeps them.

    Attributes:
        inputs, value_info, outputs: ``(name, type)`` in the graph's order.
        initializers: ``(name, type)`` from each initializer's data type and dims.
    """

    inputs: tuple[tuple[str, TensorType], ...]
    value_info: tuple[tuple[str, TensorType], ...]
    outputs: tuple[tuple[str, TensorType], ...]
    initializers: tuple[tuple[str, TensorType], ...]


@dataclass(frozen=True, eq=False)
class ShapeResult:
    """What one inference found. Treat as immutable: a cache hands the same object to several readers.

    Attributes:
        error: Why inference failed (the last attempt's first line), or None. After a failure the types
            are the model's declared ones (after ``input_dims`` and ``declared`` were applied).
        options: The options it ran with.
    """

    error: str | None
    options: ShapeOptions
    _inferred: onnx.ModelProto = field(repr=False)

    @property
    def inferred(self) -> onnx.ModelProto:
        """The model inference returned, weights dropped (for readers of the raw ValueInfoProtos; do not
        modify it: the result may be shared)."""
        return self._inferred

    @cached_property
    def graphs(self) -> tuple[GraphShapes, ...]:
        """Per graph scope, the main graph first, then subgraph bodies depth-first in node order."""
        return tuple(_graph_shapes(g) for g in graph_protos(self._inferred.graph))

    @cached_property
    def types(self) -> Mapping[str, TensorType]:
        """Every value's type across all scopes (ONNX names are unique across scopes): per graph its
        initializers, then inputs, value_info and outputs, later entries winning."""
        types: dict[str, TensorType] = {}
        for g in self.graphs:
            for name, t in (*g.initializers, *g.inputs, *g.value_info, *g.outputs):
                if name:
                    types[name] = t
        return types

    def dims(self) -> dict[str, list[int | None]]:
        """Main-graph tensor name → dims (None where unknown or symbolic), for tensors of known rank;
        initializers' dims win."""
        main = self.graphs[0]
        out: dict[str, list[int | None]] = {}
        for name, t in (*main.value_info, *main.inputs, *main.outputs):
            if t.shape is not None:
                out[name] = [d if isinstance(d, int) else None for d in t.shape]
        for name, t in main.initializers:
            out[name] = list(t.static_shape or ())
        return out


def _graph_shapes(graph: onnx.GraphProto) -> GraphShapes:
    def read(values: Sequence[onnx.ValueInfoProto]) -> tuple[tuple[str, TensorType], ...]:
        return tuple((vi.name, value_type(vi)) for vi in values)

    inits = tuple((t.name, TensorType(t.data_type, tuple(int(d) for d in t.dims))) for t in graph.initializer)
    return GraphShapes(read(graph.input), read(graph.value_info), read(graph.output), inits)


# ---------------------------------------------------------------------------------------------- inference
@contextlib.contextmanager
def negative_dims_unknown(proto: onnx.ModelProto) -> Iterator[None]:
    """Declared dims of -1 (PaddlePaddle's "unknown") read as unknown while onnx or onnxruntime reads the model.

    Both take a graph input's -1 as dynamic, but a -1 elsewhere (the length of a Shape output in
    value_info) makes onnx's shape inference abort the whole process on a failed C++ assertion. The
    proto, possibly shared, is changed in place and restored: copying it would copy the weights.
    """
    cleared = [
        (dim, dim.dim_value)
        for graph in graph_protos(proto.graph)
        for value in (*graph.input, *graph.output, *graph.value_info)
        if value.type.HasField("tensor_type")
        for dim in value.type.tensor_type.shape.dim
        if dim.dim_value < 0
    ]
    for dim, _ in cleared:
        dim.ClearField("dim_value")
    try:
        yield
    finally:
        for dim, value in cleared:
            dim.dim_value = value



def infer_shapes(
    model: onnx.ModelProto | str | os.PathLike[str],
    options: ShapeOptions = FRESH,
    *,
    counter: Counter[str] | None = None,
    consume: bool = False,
) -> ShapeResult:
    """Run ONNX shape inference once (twice with ``retry_without_data_prop`` after a failure).

    A pure function of ``(model, options)``: ``model`` is never modified (inference runs on a copy when
    the options change anything) and nothing is kept between calls except the counts in :data:`COUNTERS`
    (and ``counter``, when given).

    Args:
        model: The model, or the path of a model file (for models too large to serialise: inference then
            runs on the file, and ``input_dims``, ``declared`` and ``strip_data_above`` must be unset).
        options: The flavour (see :class:`ShapeOptions`, :data:`FRESH`, :data:`STRICT`, :data:`CONCRETE`).
        counter: Also count this call's work here.
        consume: The caller hands ``model`` over (a fresh export nobody else reads): it may be modified
            instead of copied, which saves a copy of the whole model.
    """
    _count(counter, "calls")
    if isinstance(model, (str, os.PathLike)):
        return _infer_path(Path(model), options, counter)
    prepared, copied = _prepare(model, options, consume)
    error = None
    for data_prop in (options.data_prop, False) if options.retry_without_data_prop else (options.data_prop,):
        _count(counter, "infer")
        try:
            with negative_dims_unknown(prepared):
                inferred = onnx.shape_inference.infer_shapes(
                    prepared, check_type=False, strict_mode=options.strict, data_prop=data_prop
                )
        except Exception as exc:  # noqa: BLE001 - boundary: onnx raises several types
            error = first_line(exc)
            continue
        if copied is not None and data_prop:
            inferred = _second_look(prepared, inferred, options, counter)
        hide_outer_constants(inferred, copied)
        hide_outer_constants(prepared, copied)
        _drop_tensor_data(inferred)
        return ShapeResult(None, options, inferred)
    hide_outer_constants(prepared, copied)
    return ShapeResult(error, options, prepared if prepared is not model or consume else _without_data(model))


def _second_look(
    prepared: onnx.ModelProto, inferred: onnx.ModelProto, options: ShapeOptions, counter: Counter[str] | None
) -> onnx.ModelProto:
    """Inference again while what it found settles more of the subgraph bodies (see ``refine_bodies``;
    an If inlined may hold the next one, as Silero VAD's decoder does), at most ``_SECOND_LOOKS`` times; the
    last result that ran."""
    limit = options.strip_data_above or SHAPE_DATA_LIMIT
    for _ in range(_SECOND_LOOKS):
        types = ShapeResult(None, options, inferred).types
        if not refine_bodies(prepared.graph, types, limit, list(prepared.opset_import)):
            break
        _count(counter, "infer")
        try:
            with negative_dims_unknown(prepared):
                inferred = onnx.shape_inference.infer_shapes(prepared, check_type=False, strict_mode=options.strict,
                                                             data_prop=True)  # fmt: skip
        except Exception:  # noqa: BLE001 - boundary: onnx raises several types; the last result stands
            break
    return inferred


#: Rounds of :func:`_second_look`: Silero VAD needs two (its decoder's Ifs nest).
_SECOND_LOOKS = 3


def _infer_path(path: Path, options: ShapeOptions, counter: Counter[str] | None) -> ShapeResult:
    if options.input_dims or options.declared != "keep" or options.strip_data_above is not None:
        raise ValueError("inference on a file takes the model as written: no input_dims, declared or stripping")
    error = None
    with tempfile.TemporaryDirectory(prefix="nnopt-shapes-") as tmp:
        out = os.path.join(tmp, "inferred.onnx")
        for data_prop in (options.data_prop, False) if options.retry_without_data_prop else (options.data_prop,):
            _count(counter, "infer")
            try:
                onnx.shape_inference.infer_shapes_path(
                    str(path), out, check_type=False, strict_mode=options.strict, data_prop=data_prop
                )
            except Exception as exc:  # noqa: BLE001 - boundary: onnx raises several types
                error = first_line(exc)
                continue
            return ShapeResult(None, options, onnx.load(out, load_external_data=False))
        return ShapeResult(error, options, onnx.load(str(path), load_external_data=False))


def _prepare(
    model: onnx.ModelProto, options: ShapeOptions, consume: bool
) -> tuple[onnx.ModelProto, set[str] | None]:
    """What inference runs on: ``model`` itself when the options change nothing (or it is handed over; its
    subgraph bodies may then be rewritten as ``show_outer_constants`` does), else a copy; and, with data
    propagation, the names of the outer-scope constants copied into bodies (see
    ``nnopt.analysis.body_values``)."""
    if options.strip_data_above is not None:
        prepared = _stripped_copy(model, options.strip_data_above)
    elif consume:
        prepared = model
    elif options.input_dims or options.declared != "keep":
        prepared = onnx.ModelProto()
        prepared.CopyFrom(model)
    elif options.data_prop and any(has_subgraph(n) for n in model.graph.node):
        prepared = onnx.ModelProto()  # outer-scope constants are about to be copied into the bodies
        prepared.CopyFrom(model)
    else:
        return model, None
    dims = dict(options.input_dims)
    for vi in prepared.graph.input:
        if vi.name in dims:
            set_dims(vi, dims[vi.name])
    for graph in graph_protos(prepared.graph):
        _DECLARED[options.declared](graph)
    if not options.data_prop:
        return prepared, None
    limit = options.strip_data_above or SHAPE_DATA_LIMIT
    return prepared, show_outer_constants(prepared.graph, limit, list(prepared.opset_import))


def _stripped_copy(model: onnx.ModelProto, limit: int) -> onnx.ModelProto:
    """A copy of ``model`` whose large main-graph tensors keep only name, type and dims."""
    light = onnx.ModelProto()
    # One C++ copy, then edits in place: several times faster than assembling the copy field by field.
    light.CopyFrom(model)
    g = light.graph
    for t in g.initializer:
        _strip(t, limit)
    for node in g.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value" and attr.HasField("t"):
                    _strip(attr.t, limit)
    return light


def _strip(tensor: onnx.TensorProto, limit: int) -> None:
    """Keep only name, type and dims of ``tensor`` when it holds more than ``limit`` elements or its data
    is external."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL and math.prod(tensor.dims) <= limit:
        return
    name, data_type, dims = tensor.name, tensor.data_type, list(tensor.dims)
    tensor.Clear()
    tensor.name, tensor.data_type = name, data_type
    tensor.dims.extend(dims)


def topological_order(nodes: Sequence[onnx.NodeProto]) -> tuple[list[int] | None, bool]:
    """Node indices in a stable topological order (None when ``nodes`` already are in one), and whether
    that failed (a cycle: then None too and the file order stands).

    Subgraph bodies' reads of outer-scope tensors count as reads of the node that owns the body.
    """
    return order_of([read_names(n) for n in nodes], [tuple(n.output) for n in nodes])


def order_of(reads: Sequence[Sequence[str]], writes: Sequence[Sequence[str]]) -> tuple[list[int] | None, bool]:
    """:func:`topological_order` of nodes given as the names each reads and writes."""
    if _in_order(reads, writes):
        return None, False
    producer: dict[str, int] = {}
    for i, outputs in enumerate(writes):
        for out in outputs:
            if out:
                producer[out] = i
    deps: list[set[int]] = []
    in_order = True
    for i, names in enumerate(reads):
        d = {producer[n] for n in names if n in producer and producer[n] != i}
        in_order = in_order and all(j < i for j in d)
        deps.append(d)
    if in_order:
        return None, False
    order = stable_topological_order(deps)
    return order, order is None


def _in_order(reads: Sequence[Sequence[str]], writes: Sequence[Sequence[str]]) -> bool:
    """Whether every tensor is produced before it is read: the common case, checked without building the
    dependency lists. False also when unsure (a name produced twice, a node reading its own output)."""
    outputs = [out for names in writes for out in names if out]
    produced = set(outputs)
    if len(produced) != len(outputs):
        return False
    defined: set[str] = set()
    for names, outs in zip(reads, writes):
        if not defined.issuperset(n for n in names if n in produced):
            return False
        defined.update(outs)
    return True


#: Default-domain ops with graph attributes; other default-domain ops need no look at their attributes.
GRAPH_OPS = frozenset({"If", "Loop", "Scan", "SequenceMap"})


def has_subgraph(node: onnx.NodeProto) -> bool:
    """Whether ``node`` has a graph-valued attribute (an If/Loop/Scan body, or a custom op's)."""
    if node.domain in ("", "ai.onnx") and node.op_type not in GRAPH_OPS:
        return False
    return any(a.type in GRAPH_ATTRS for a in node.attribute)


def read_names(node: onnx.NodeProto) -> tuple[str, ...]:
    """Tensor names ``node`` reads, including those its subgraph bodies read from the outer scope."""
    return (*node.input, *sorted(subgraph_reads(node))) if has_subgraph(node) else tuple(node.input)


def set_dims(vi: onnx.ValueInfoProto, dims: Sequence[int]) -> None:
    """Give a tensor value_info the concrete ``dims``, unless it declares a different rank."""
    if not vi.type.HasField("tensor_type"):
        return  # NOTE: touching tensor_type on a sequence/map input would switch its type oneof.
    shape = vi.type.tensor_type.shape
    if vi.type.tensor_type.HasField("shape") and len(shape.dim) != len(dims):
        return
    del shape.dim[:]
    for d in dims:
        shape.dim.add().dim_value = d


def _keep_declared(graph: onnx.GraphProto) -> None:
    pass


def _keep_static(graph: onnx.GraphProto) -> None:
    for vi in [*graph.value_info, *graph.output]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            for d in vi.type.tensor_type.shape.dim:
                if not d.HasField("dim_value"):
                    d.Clear()


def _keep_types(graph: onnx.GraphProto) -> None:
    for vi in [*graph.value_info, *graph.output]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            vi.type.tensor_type.ClearField("shape")


def _drop_declared(graph: onnx.GraphProto) -> None:
    del graph.value_info[:]
    for out in graph.output:
        if out.type.HasField("tensor_type"):
            out.type.tensor_type.ClearField("shape")


_DECLARED = {"keep": _keep_declared, "static": _keep_static, "typed": _keep_types, "drop": _drop_declared}


def _drop_tensor_data(model: onnx.ModelProto) -> None:
    """Free the weights of an inferred copy: a result keeps only types, and may be cached."""
    for g in graph_protos(model.graph):
        for t in g.initializer:
            if t.HasField("raw_data"):
                t.ClearField("raw_data")


def _without_data(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` for a failed result, so the result never aliases the caller's proto."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    _drop_tensor_data(copy)
    return copy



def _count(counter: Counter[str] | None, key: str) -> None:
    COUNTERS[key] += 1
    if counter is not None:
        counter[key] += 1
