"""remove-noops: remove nodes that provably return their input unchanged (Identity, same-type Cast, …)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from nnopt.analysis.shapes import TensorType
from nnopt.ir.constants import constant_values
from nnopt.ir.model import Model, replace_tensor
from nnopt.ir.walk import all_graphs, is_onnx_op
from nnopt.pipeline.base import LayerDecision, Pass, PassContext, PassResult

#: A Slice end at least this large reaches the end of any axis a real model has: exporters write
#: INT32_MAX or INT64_MAX for "to the end".
_SLICE_TO_END = 2**31 - 1


@dataclass
class _Facts:
    """What the rules may consult: inferred types (by tensor name) and the model's opset."""

    types: dict[str, TensorType]
    opset: int

    def type_of(self, tensor: gs.Tensor) -> TensorType | None:
        known = self.types.get(tensor.name)
        if known is not None and known.is_tensor:
            return known
        if isinstance(tensor, gs.Constant):
            dtype = tensor.export_dtype
            elem = dtype if isinstance(dtype, int) else onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
            return TensorType(int(elem), tuple(int(d) for d in tensor.shape))
        return None

    def shape_of(self, tensor: gs.Tensor) -> tuple[int | str | None, ...] | None:
        known = self.type_of(tensor)
        return known.shape if known is not None else None

    def static_shape_of(self, tensor: gs.Tensor) -> tuple[int, ...] | None:
        known = self.type_of(tensor)
        return known.static_shape if known is not None else None

    def ints(self, node: gs.Node, input_index: int | None, attr: str | None) -> list[int] | None:
        """An int list given as a constant input (newer opsets) or an attribute (older), else None."""
        if input_index is not None and _present(node, input_index):
            values = constant_values(node.inputs[input_index])
            return None if values is None else [int(v) for v in np.asarray(values).reshape(-1)]
        if attr is not None and attr in node.attrs:
            return [int(v) for v in node.attrs[attr]]
        return None


def _present(node: gs.Node, index: int) -> bool:
    return index < len(node.inputs) and not node.inputs[index].is_empty()


# ---------------------------------------------------------------------------------------------- rules
# Each rule returns the input tensor that the node's first output provably equals, or None.
NoopRule = Callable[[gs.Node, _Facts], "gs.Tensor | None"]


def _identity(node: gs.Node, facts: _Facts) -> gs.Tensor | None:
    return node.inputs[0] if node.inputs else None


def _dropout(node: gs.Node, facts: _Facts) -> gs.Tensor | None:
    if facts.opset < 7:
        # NOTE: Dropout-1/6 is inference-only when is_test=1; its default (0) means training.
        return node.inputs[0] if int(node.attrs.get("is_test", 0)) == 1 else None
    if facts.opset >= 12 and _present(node, 2):
        # NOTE: Dropout-12+ takes optional inputs ratio (1) and training_mode (2); it is the identity
        # unless training_mode is true. Dropout-7..11 is always the identity at inference.
        mode = constant_values(node.inputs[2])
        if mode is None or bool(np.asarray(mode).reshape(-1)[0]):
            return None
    return node.inputs[0]


def _cast(node: gs.Node, facts: _Facts) -> gs.Tensor | None:
    known = facts.type_of(node.inputs[0])
    target = node.attrs.get("to")
    if known is None or not known.elem_type or target is None:
        return None
    return node.inputs[0] if int(target) == known.elem_type else None


def _cast_like(node: gs.Node, facts: _Facts) -> gs.Tensor | None:
    a, b = facts.type_of(node.inputs[0]), facts.type_of(node.inputs[1])
    if a is None or b is None or not a.elem_type:
        return None
    return node.inputs[0] if a.elem_type == b.elem_type else None


def _reshape(node: gs.Node, facts: _Facts) -> gs.Tensor | None:
    # NOTE: Reshape-1/4 takes the shape as an attribute, Reshape-5+ as input 1. In the target, 0 copies
    # the input's dim unless allowzero=1 (Reshape-14+), and one -1 takes what the other dims leave.
    target = facts.ints(node, 1, "shape" if facts.opset < 5 else None)
    shape = facts.shape_of(node.inputs[0])
    if target is None or shape is None or len(target) != len(shape):
        return None
    allowzero = int(node.attrs.get("allowzero", 0))
    inferred_at: int | None = None
    for i, (want, have) in enumerate(zip(target, shape)):
        if want == 0 and not allowzero:
            continue
        if want == -1 and inferred_at is None:
            inferred_at = i
            continue
        if not isinstance(have, int) or want != have:
            return None
    if inferred_at is not None:
        # -1 resolves to the input's dim only when every other dim is a known, non-zero int.
        others = [d for i, d in enumerate(shape) if i != inferred_at]
        if not all(isinstance(d, int) and d > 0 for d in others):
            return None
    return node.inputs[0]


def _transpose(node: gs.Node, facts: _Facts) -> gs.Tensor | None:
    perm = node.attrs.get("perm")
    if perm is not None:
        return node.inputs[0] if list(perm) == list(range(len(perm))) else None
    # NOTE: without perm, Transpose reverses the dims: the identity only for rank 0 and 1.
    shape = facts.shape_of(node.inputs[0])
    return node.inputs[0] if shape is not None and len(shape) <= 1 else None


def _squeeze(node: gs.Node, facts: _Facts) -> gs.Tensor | None:
    # NOTE: Squeeze-1/11 takes axes as an attribute, Squeeze-13+ as optional input 1. Listed axes must be
    # 1-dims and are always removed, so only "no axes" (squeeze every 1-dim) can be the identity.
    axes = facts.ints(node, 1, "axes" if facts.opset < 13 else None)
    if _present(node, 1) and axes is None:
        return None
    shape = facts.static_shape_of(node.inputs[0])
    if axes or shape is None or 1 in shape:
        return None
    return node.inputs[0]


def _pad(node: gs.Node, facts: _Facts) -> gs.Tensor | None:
    # NOTE: pads is the attribute "paddings" in Pad-1, "pads" in Pad-2/10 and input 1 from Pad-11.
    attr = "paddings" if facts.opset < 2 else ("pads" if facts.opset < 11 else None)
    pads = facts.ints(node, 1 if facts.opset >= 11 else None, attr)
    if pads is None or any(p != 0 for p in pads):
        return None
    return node.inputs[0]


def _slice(node: gs.Node, facts: _Facts) -> gs.Tensor | None:
    # NOTE: Slice-1/9 takes starts/ends/axes as attributes; Slice-10+ takes inputs starts, ends and
    # optional axes, steps. Starts and ends are clamped to each dim; negative values count from the end.
    if facts.opset < 10:
        starts, ends = facts.ints(node, None, "starts"), facts.ints(node, None, "ends")
        axes = facts.ints(node, None, "axes")
        steps: list[int] | None = None
    else:
        starts, ends = facts.ints(node, 1, None), facts.ints(node, 2, None)
        axes = facts.ints(node, 3, None)
        steps = facts.ints(node, 4, None)
        if (_present(node, 3) and axes is None) or (_present(node, 4) and steps is None):
            return None
    shape = facts.shape_of(node.inputs[0])
    if starts is None or ends is None or shape is None or len(starts) != len(ends):
        return None
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    if len(axes) != len(starts) or len(steps) != len(starts):
        return None
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if not -len(shape) <= axis < len(shape) or step != 1:
            return None
        dim = shape[axis]
        whole_start = start == 0 or (isinstance(dim, int) and start <= -dim)
        whole_end = end >= _SLICE_TO_END or (isinstance(dim, int) and end >= dim)
        if not (whole_start and whole_end):
            return None
    return node.inputs[0]


def _broadcasts_into(small: tuple[int | str | None, ...], shape: tuple[int | str | None, ...]) -> bool:
    """Whether broadcasting a tensor of shape ``shape`` with one of shape ``small`` leaves ``shape`` as is."""
    if len(small) > len(shape):
        return False
    for s, d in zip(reversed(small), reversed(shape)):
        if s == 1:
            continue
        if not (isinstance(s, int) and isinstance(d, int) and s == d):
            return False
    return True


def _expand(node: gs.Node, facts: _Facts) -> gs.Tensor | None:
    target = facts.ints(node, 1, None)
    shape = facts.shape_of(node.inputs[0])
    if target is None or shape is None:
        return None
    return node.inputs[0] if _broadcasts_into(tuple(target), shape) else None


def _tile(node: gs.Node, facts: _Facts) -> gs.Tensor | None:
    repeats = facts.ints(node, 1, None)
    return node.inputs[0] if repeats is not None and all(r == 1 for r in repeats) else None


def _single_input(node: gs.Node, facts: _Facts) -> gs.Tensor | None:
    live = [t for t in node.inputs if not t.is_empty()]
    return live[0] if len(live) == 1 and len(node.inputs) == 1 else None


def _single_output_split(node: gs.Node, facts: _Facts) -> gs.Tensor | None:
    # A Split into one part returns its input whole (split sizes, when given, must then sum to the dim).
    return node.inputs[0] if len(node.outputs) == 1 else None


def _neutral_operand(identity: float, commutative: bool) -> NoopRule:
    """A rule for a binary op that returns its other operand when one operand is all ``identity``."""

    def rule(node: gs.Node, facts: _Facts) -> gs.Tensor | None:
        if len(node.inputs) != 2:
            return None
        candidates = [(node.inputs[0], node.inputs[1])]
        if commutative:
            candidates.append((node.inputs[1], node.inputs[0]))
        for data, other in candidates:
            values = constant_values(other)
            data_type, other_type = facts.type_of(data), facts.type_of(other)
            if values is None or data_type is None or other_type is None or data_type.shape is None:
                continue
            if data_type.elem_type != other_type.elem_type or other_type.shape is None:
                continue
            values = np.asarray(values)
            if values.dtype.kind not in "biuf" or not np.all(values == identity):
                continue
            # The result has the data operand's shape only if the constant broadcasts into it.
            if _broadcasts_into(tuple(values.shape), data_type.shape):
                return data
        return None

    return rule


#: op type → rule. Every rule proves that the node's first output equals one of its inputs.
NOOP_RULES: dict[str, NoopRule] = {
    "Identity": _identity,
    "Dropout": _dropout,
    "Cast": _cast,
    "CastLike": _cast_like,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Squeeze": _squeeze,
    "Pad": _pad,
    "Slice": _slice,
    "Expand": _expand,
    "Tile": _tile,
    "Concat": _single_input,
    "Sum": _single_input,
    "Max": _single_input,
    "Min": _single_input,
    "Mean": _single_input,
    "Split": _single_output_split,
    "Add": _neutral_operand(0, commutative=True),
    "Sub": _neutral_operand(0, commutative=False),
    "Mul": _neutral_operand(1, commutative=True),
    "Div": _neutral_operand(1, commutative=False),
}


# ---------------------------------------------------------------------------------------------- rewiring
def _extra_outputs_unused(node: gs.Node, pinned: set[int]) -> bool:
    """Outputs after the first (Dropout's mask) must be absent or unused for the node to go."""
    return all(t.is_empty() or (not t.outputs and id(t) not in pinned) for t in node.outputs[1:])


@dataclass
class _Scope:
    """The graph being cleaned, with what would cost a walk over all its nodes to find per no-op."""

    graph: gs.Graph
    #: ``graph`` and all its subgraphs: the graphs whose outputs may name a tensor of ``graph``.
    graphs: list[gs.Graph]
    #: ids of ``graph``'s own nodes (removed no-ops stay listed: they no longer produce anything).
    node_ids: set[int]

    @classmethod
    def of(cls, graph: gs.Graph) -> _Scope:
        return cls(graph, all_graphs(graph), {id(n) for n in graph.nodes})


def _bypass(scope: _Scope, node: gs.Node, source: gs.Tensor, pinned: set[int]) -> str | None:
    """Remove ``node`` by making its readers read ``source``; return why not, or None when done.

    Graph outputs (of any graph) keep their names. When the no-op's output is one, the producer of
    ``source`` is made to write the output tensor instead, which is possible only if ``source`` is an
    intermediate of the same graph and no graph output itself.
    """
    graph = scope.graph
    out = node.outputs[0]
    if source is out:
        return "reads its own output"
    if id(out) not in pinned:
        node.inputs.clear()
        node.outputs.clear()
        replace_tensor(graph, out, source, graphs=scope.graphs)
        return None
    producer = source.inputs[0] if len(source.inputs) == 1 else None
    local = producer is not None and id(producer) in scope.node_ids
    if not local or id(source) in pinned or any(t is source for t in graph.inputs):
        return "its output is a graph output and its input is not an intermediate of the same graph"
    assert producer is not None
    index = next(i for i, t in enumerate(producer.outputs) if t is source)
    node.inputs.clear()
    node.outputs.clear()
    replace_tensor(graph, source, out, graphs=scope.graphs)
    producer.outputs[index] = out
    return None


class RemoveNoops(Pass):
    """Remove nodes that provably return their input unchanged.

    Matches (registry ``NOOP_RULES``): Identity; Dropout at inference (is_test=1 before opset 7; no or a
    constant false training_mode from opset 12) with its mask unused; Cast/CastLike to the input's own
    type; Reshape to the input's shape; Transpose with the identity perm; Squeeze without axes of a static
    shape with no 1-dims; Pad with all-zero pads; Slice covering every axis with step 1; Expand and Tile
    that do not change the shape; single-input Concat/Sum/Max/Min/Mean; single-output Split; Add/Sub of 0
    and Mul/Div by 1 where the constant broadcasts into the other operand's shape and has its type.
    Rewrites: readers of the node's output read its input; in the main graph and in every subgraph.
    Graph (and subgraph) outputs keep their names: the input's producer is renamed to write the output,
    and where that is impossible (the input is a graph input, an initializer, an outer-scope value or
    another output) the node stays. Lossless (Add of 0 may turn -0.0 into +0.0, which compares equal).
    Preconditions: shapes and types come from fresh ONNX shape inference; a node whose types it cannot
    establish is left alone.
    """

    name = "remove-noops"
    lossy = False

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        inferred = ctx.analyses_for(model).shapes()
        facts = _Facts({} if inferred.error is not None else dict(inferred.types), model.opset)
        removed: dict[str, int] = {}
        layers: list[LayerDecision] = []
        pinned = {id(t) for g in model.all_graphs() for t in g.outputs}
        for graph in model.all_graphs():
            gone: set[int] = set()
            scope = _Scope.of(graph)
            for node in list(graph.nodes):
                rule = NOOP_RULES.get(node.op)
                if rule is None or not is_onnx_op(node) or not node.inputs or not node.outputs:
                    continue
                if node.inputs[0].is_empty() or not _extra_outputs_unused(node, pinned):
                    continue
                source = rule(node, facts)
                if source is None:
                    continue
                op, name = node.op, node.name
                reason = _bypass(scope, node, source, pinned)
                if reason is not None:
                    layers.append(LayerDecision(name, op, "declined", reason))
                    continue
                gone.add(id(node))
                removed[op] = removed.get(op, 0) + 1
                layers.append(LayerDecision(name, op, "removed"))
            if gone:
                graph.nodes = [n for n in graph.nodes if id(n) not in gone]
        total = sum(removed.values())
        stats: dict[str, Any] = {"nodes_removed": total}
        stats.update({f"{op}_removed": n for op, n in sorted(removed.items())})
        return PassResult(modified=total > 0, stats=stats, layers=layers)
