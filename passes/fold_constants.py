"""fold-constants: evaluate nodes whose inputs are all constant, without letting the model grow."""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.logger import G_LOGGER

from nnopt.analysis.shapes import TensorType
from nnopt.ir.constants import NONDETERMINISTIC_OPS, constant_node_payload, detached_values, lower_model_constants
from nnopt.ir.graphview import subgraphs_of, topological_nodes
from nnopt.ir.model import Model
from nnopt.ir.walk import is_onnx_op, remove_dead_nodes
from nnopt.pipeline.base import LayerDecision, Pass, PassContext, PassResult

#: A folded node may add this many bytes beyond the constant inputs it frees: about what removing the node
#: saves in the protobuf, so shape arithmetic and scalars fold while e.g. a ConstantOfShape that makes a
#: [64] bias from its 8-byte shape stays (a larger allowance, such as 1 KiB per node, grows models whose
#: weights are all built that way).
SLACK_BYTES = 64

# ---------------------------------------------------------------------------------------------- shape ops
def _shape_value(node: gs.Node, shape: tuple[int, ...]) -> np.ndarray:
    return np.array(_shape_value_dims(node, shape), dtype=np.int64)


def _size_value(node: gs.Node, shape: tuple[int, ...]) -> np.ndarray:
    return np.array(math.prod(shape), dtype=np.int64)


#: Ops whose output depends only on their input's shape: op type → value given the static shape.
_SHAPE_OPS: dict[str, Callable[[gs.Node, tuple[int, ...]], np.ndarray]] = {
    "Shape": _shape_value,
    "Size": _size_value,
}


def fold_shape_ops(graph: gs.Graph, types: dict[str, TensorType], pinned: set[str]) -> int:
    """Replace the outputs of Shape/Size nodes whose input has a static inferred shape by constants, and
    of Gather/Slice nodes that pick only static dims out of a partly dynamic Shape.

    The shapes come from fresh inference (``nnopt.analysis.shapes.FRESH``), never from the model's own value_info.
    Outputs in ``pinned`` (graph outputs) stay. Returns the number of nodes folded.
    """
    folded = 0
    for node in list(graph.nodes):
        fold = _SHAPE_OPS.get(node.op)
        if fold is None or not is_onnx_op(node) or len(node.outputs) != 1 or not node.inputs:
            continue
        source, out = node.inputs[0], node.outputs[0]
        known = types.get(source.name)
        if isinstance(source, gs.Constant) or out.name in pinned or known is None or not known.is_tensor:
            continue
        shape = known.static_shape
        if shape is not None:
            out.to_constant(fold(node, shape))
            out.inputs.clear()
            folded += 1
        elif node.op == "Shape" and known.shape is not None:
            # NOTE: a dynamic batch or length dim is common, and exporters guard on the static ones
            # (``Shape(x)[1] == 64``); silero_vad's If branches are full of such checks.
            dims = _shape_value_dims(node, known.shape)
            for reader in list(out.outputs):
                value = _static_pick(reader, out, dims)
                picked = reader.outputs[0] if value is not None else None
                if picked is None or picked.name in pinned:
                    continue
                picked.to_constant(value)
                picked.inputs.clear()
                folded += 1
    return folded


def _shape_value_dims(node: gs.Node, shape: tuple[int | str | None, ...]) -> list[int | str | None]:
    """The dims a Shape node outputs: since opset 15 it takes optional start/end attributes, clamped like
    Python slicing."""
    start = int(node.attrs.get("start", 0))
    end = node.attrs.get("end")
    return list(shape[start : (None if end is None else int(end))])


def _constant_ints(tensor: gs.Tensor) -> list[int] | None:
    # Initializers only: Constant nodes are lowered before shape folding, and those left (graph outputs)
    # must not be read through ``.values`` by ``_static_pick``.
    values = tensor.values if isinstance(tensor, gs.Constant) else None
    return None if values is None else [int(v) for v in np.asarray(values).reshape(-1)]


def _static_pick(reader: gs.Node, shape_out: gs.Tensor, dims: list[int | str | None]) -> np.ndarray | None:
    """The value of a Gather or Slice (opset >= 10) that reads ``shape_out`` as its data and picks only
    dims that are static ints; None otherwise."""
    if not is_onnx_op(reader) or len(reader.outputs) != 1 or not reader.inputs or reader.inputs[0] is not shape_out:
        return None
    rank = len(dims)
    if reader.op == "Gather" and len(reader.inputs) == 2 and int(reader.attrs.get("axis", 0)) in (0, -1):
        indices = _constant_ints(reader.inputs[1])
        if indices is None or not all(-rank <= i < rank for i in indices):
            return None
        picked = [dims[i] for i in indices]
        shape = np.asarray(reader.inputs[1].values).shape
    elif reader.op == "Slice" and 3 <= len(reader.inputs) <= 5:
        starts, ends = _constant_ints(reader.inputs[1]), _constant_ints(reader.inputs[2])
        axes = _constant_ints(reader.inputs[3]) if len(reader.inputs) > 3 and reader.inputs[3].name else [0]
        steps = _constant_ints(reader.inputs[4]) if len(reader.inputs) > 4 and reader.inputs[4].name else [1]
        if starts is None or ends is None or axes is None or steps is None:
            return None
        if len(starts) != 1 or axes not in ([0], [-1]) or steps[0] == 0:
            return None
        # Python slicing clamps out-of-range starts and ends the way ONNX Slice does.
        picked = dims[starts[0] : ends[0] : steps[0]]
        shape = (len(picked),)
    else:
        return None
    if not all(isinstance(d, int) for d in picked):
        return None
    return np.array(picked, dtype=np.int64).reshape(shape)


def inline_constant_ifs(graph: gs.Graph) -> int:
    """Replace each If whose condition is a constant by the nodes of the branch it always takes.

    The branch's outputs reach the If's outputs through Identity nodes, so names and graph outputs stay;
    remove-noops drops those Identities where it can. Tensors a branch reads from outer scopes are the
    same objects in graphsurgeon, so the moved nodes stay wired. Returns the number of Ifs inlined.
    """
    inlined = 0
    for node in list(graph.nodes):
        if node.op != "If" or not is_onnx_op(node) or not node.inputs or not isinstance(node.inputs[0], gs.Constant):
            continue
        condition = np.asarray(node.inputs[0].values)
        if condition.size != 1:
            continue
        branch = node.attrs["then_branch" if bool(condition.reshape(-1)[0]) else "else_branch"]
        if len(branch.outputs) != len(node.outputs):
            continue
        outputs = list(node.outputs)
        node.outputs.clear()
        node.inputs.clear()
        graph.nodes.extend(branch.nodes)
        for source, target in zip(branch.outputs, outputs):
            graph.nodes.append(gs.Node("Identity", name=f"{target.name}_inlined_if", inputs=[source], outputs=[target]))
        inlined += 1
    return inlined


# ---------------------------------------------------------------------------------------------- size rule
def _known_nbytes(tensor: gs.Tensor, types: dict[str, TensorType]) -> int | None:
    if isinstance(tensor, gs.Constant):
        return int(tensor._values.nbytes)
    known = types.get(tensor.name)
    return known.nbytes if known is not None else None


def _size_rule(
    types: dict[str, TensorType], consumers: dict[str, int], pinned: set[str]
) -> Callable[[gs.Node], bool]:
    """``should_exclude_node`` for graphsurgeon: True for nodes that must not be folded.

    A node folds only when its outputs' bytes are at most ``freed + SLACK_BYTES``, where
    ``freed`` counts the inputs that die with it (used by this node alone and not a graph output), so
    folding never grows the model: a ConstantOfShape/Expand/Tile/Range that builds a large tensor from a
    small one stays, and so does a Transpose of a weight that other nodes also read. Outputs whose size
    inference cannot establish, random ops, other domains and graph outputs stay too.
    """

    def exclude(node: gs.Node) -> bool:
        if node.op in NONDETERMINISTIC_OPS or not is_onnx_op(node):
            return True
        out_bytes = 0
        for out in node.outputs:
            if out.is_empty():
                continue
            size = _known_nbytes(out, types)
            if out.name in pinned or size is None:
                return True
            out_bytes += size
        freed = 0
        seen: set[str] = set()
        for inp in node.inputs:
            if inp.is_empty() or inp.name in seen:
                continue
            seen.add(inp.name)
            if consumers.get(inp.name, 0) == 1 and inp.name not in pinned:
                freed += _known_nbytes(inp, types) or 0
        return out_bytes > freed + SLACK_BYTES

    return exclude


def _consumer_counts(model: Model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for graph in model.all_graphs():
        for name, tensor in graph.tensors().items():
            counts[name] = max(counts.get(name, 0), len({id(n) for n in tensor.outputs}))
    return counts


# ---------------------------------------------------------------------------------------------- the pass
class FoldConstants(Pass):
    """Fold nodes whose inputs are all constant into constants, with onnx-graphsurgeon and onnxruntime.

    Matches: nodes (main graph and subgraphs) whose inputs are constants or folded values, Shape/Size
    nodes whose input has a static shape by fresh ONNX shape inference (never by the model's value_info),
    Gather/Slice nodes that pick only static dims out of a partly dynamic Shape, and If nodes whose
    condition is (or folds to) a constant, which are replaced by the branch they take.
    Rewrites: their outputs become initializers (evaluated by graphsurgeon's ``fold_constants``, which
    runs onnxruntime); nodes left dead are removed. A node is not folded when its outputs are larger than
    the constant inputs it frees plus ``SLACK_BYTES`` (so the model does not grow: ConstantOfShape, Expand,
    Tile or Range building a large tensor stay), nor when it is random, in another domain, produces a
    graph output or has outputs of unknown size. Constant nodes are lowered to initializers as a side
    effect, except those producing graph outputs. Lossless.
    Preconditions: none; nodes onnxruntime cannot evaluate are left alone.
    """

    name = "fold-constants"
    lossy = False

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        analyses = ctx.analyses_for(model)
        snapshot = analyses.proto()  # cached: shared with the verification; read-only
        inferred = analyses.shapes()
        types = {} if inferred.error is not None else dict(inferred.types)
        pinned = {t.name for g in model.all_graphs() for t in g.outputs}
        outputs_before = _graph_output_producers(model)
        had_outputs = {id(n) for g in model.all_graphs() for n in g.nodes if n.outputs}
        # graphsurgeon would lower Constant nodes too, but turns value_float(s) into float64 tensors.
        lowered = lower_model_constants(model)
        consumers = _consumer_counts(model)
        shape_folds = inlined_ifs = 0
        ir_versions: list[tuple[gs.Graph, int | None]] = []
        try:
            # graphsurgeon logs a warning for every node onnxruntime cannot evaluate; those simply stay.
            with G_LOGGER.suppress():
                graphs = [model.graph]
                while graphs:
                    graph = graphs.pop(0)
                    # NOTE: graphsurgeon's fold_constants requires topologically sorted nodes.
                    graph.nodes = topological_nodes(graph)
                    shape_folds += fold_shape_ops(graph, types, pinned)
                    # graphsurgeon evaluates an export of the graph in onnxruntime. Subgraphs carry no IR
                    # version (the export would get onnx's newest, which onnxruntime may not read yet), and
                    # before IR 4 initializers had to be graph inputs; evaluate with the model's, at least 4.
                    ir_versions.append((graph, graph.ir_version))
                    graph.ir_version = max(model.ir_version, 4)
                    with _typed_constant_nodes(graph):
                        _fold_graph(graph, _size_rule(types, consumers, pinned))
                    inlined = inline_constant_ifs(graph)
                    if inlined:
                        inlined_ifs += inlined
                        graph.nodes = topological_nodes(graph)
                    graphs.extend(sub for node in graph.nodes if node.outputs for sub in subgraphs_of(node))
        except Exception as exc:  # boundary: graphsurgeon and onnxruntime on arbitrary models
            model.restore(snapshot)
            reason = f"graphsurgeon fold_constants failed: {type(exc).__name__}: {str(exc).strip()[:200]}"
            return PassResult(modified=False, layers=[LayerDecision("*", "", "declined", reason)])
        finally:
            for graph, version in ir_versions:
                graph.ir_version = version
        _restore_graph_outputs(outputs_before)
        emptied = any(id(n) in had_outputs and not n.outputs for g in model.all_graphs() for n in g.nodes)
        # Folded nodes lost their outputs; they, and producers only they used, are now dead.
        folded = remove_dead_nodes(model.graph)
        return PassResult(
            modified=folded > 0 or lowered > 0 or emptied,
            stats={"nodes_folded": folded, "shape_ops_folded": shape_folds, "constants_lowered": lowered,
                   "ifs_inlined": inlined_ifs},
        )


def _fold_graph(graph: gs.Graph, exclude: Callable[[gs.Node], bool]) -> None:
    """One level of graphsurgeon constant folding: all at once, or node by node if that fails.

    fold_shapes=False: graphsurgeon's shape folding trusts possibly stale value_info and its cast elision
    rounds float constants to ints; shapes are folded beforehand by ``fold_shape_ops`` instead.
    """
    options: dict[str, Any] = {
        "fold_shapes": False,
        "recurse_subgraphs": False,
        "flatten_subgraphs": False,
        "size_threshold": None,
        "should_exclude_node": exclude,
        "recurse_functions": False,
    }
    try:
        # One onnxruntime session for every foldable tensor; it fails as a whole if any node cannot run.
        graph.fold_constants(partitioning=None, error_ok=False, **options)
    except Exception:  # boundary: onnxruntime rejected the folded subgraph; fold around the failing nodes
        # "recursive" evaluates each output separately, peeling off nodes that fail ("basic" retries a
        # failing part forever in graphsurgeon 0.6).
        graph.fold_constants(partitioning="recursive", error_ok=True, **options)


@contextlib.contextmanager
def _typed_constant_nodes(graph: gs.Graph) -> Iterator[None]:
    """While folding, give the Constant nodes left (graph outputs) a private ``value`` of the right dtype.

    graphsurgeon lowers every Constant node it meets, reading value_float(s) as float64 (consumers folded
    against that value would come out float64), and renames the TensorProto of a lazily loaded ``value``
    on export. The original attributes are put back afterwards.
    """
    saved: list[tuple[gs.Node, Any]] = []
    for node in graph.nodes:
        payload = constant_node_payload(node)
        if payload is None or not node.outputs:
            continue
        saved.append((node, node.attrs))
        if isinstance(payload, gs.Constant):
            # A private copy: graphsurgeon renames the TensorProto behind lazily loaded values on export.
            payload = gs.Constant(payload.name, detached_values(payload), export_dtype=payload._export_dtype)
        else:
            payload = gs.Constant(f"{node.outputs[0].name}_value", payload)
        node.attrs = OrderedDict(value=payload)
    try:
        yield
    finally:
        for node, attrs in saved:
            node.attrs = attrs


@dataclass
class _OutputProducer:
    tensor: gs.Variable
    node: gs.Node
    index: int
    dtype: object
    shape: object


def _graph_output_producers(model: Model) -> list[_OutputProducer]:
    found = []
    for graph in model.all_graphs():
        for t in graph.outputs:
            if isinstance(t, gs.Variable) and len(t.inputs) == 1:
                node = t.inputs[0]
                found.append(_OutputProducer(t, node, list(node.outputs).index(t), t.dtype, t.shape))
    return found


def _restore_graph_outputs(records: list[_OutputProducer]) -> None:
    """Give graph outputs that graphsurgeon turned into constants their producer node back.

    graphsurgeon lowers every Constant node, graph outputs included; the output then stays produced by its
    Constant node, keeping the interface free of initializer outputs.
    """
    for rec in records:
        if isinstance(rec.tensor, gs.Constant):
            rec.tensor.to_variable(dtype=rec.dtype, shape=rec.shape)
            rec.node.outputs.insert(rec.index, rec.tensor)
