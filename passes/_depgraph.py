"""Channel dependency analysis for prune: which output channels of which layers must be removed together."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from nnopt.analysis import shapes as shape_inference
from nnopt.analysis.shapes import ShapeOptions
from nnopt.ir.constants import constant_values
from nnopt.ir.graphview import implicit_inputs, subgraphs_of
from nnopt.ir.walk import is_onnx_op

#: A rewrite to apply once the kept channels are known: called with ``keep(tensor) -> bool mask``.
Edit = Callable[[Callable[[gs.Tensor], np.ndarray]], None]


class Decline(Exception):
    """Raised while tracing with the reason a channel group cannot be pruned; never escapes the pass."""


@dataclass
class Track:
    """A tensor whose ``axis`` carries channels of pruned layers: one label per position on that axis.

    Labels are ints; positions with labels in one union-find class are removed together. A channel seen
    through Flatten/Reshape becomes a block of repeated labels (one per spatial position).
    """

    axis: int
    labels: np.ndarray
    zeros: np.ndarray  # per position: True when the value there is exactly 0 for every input
    rank: int | None = None  # the tensor's rank, for when shape inference does not know it


@dataclass
class Root:
    """A layer whose output channels may be removed (Conv with group=1, Gemm, MatMul by a 2-D constant)."""

    node: gs.Node
    first_label: int
    norms: np.ndarray
    dead: np.ndarray  # all-zero filter and zero bias


@dataclass(frozen=True)
class Sink:
    """Where a sink's positions meet a weight: input ``index`` of ``node``, position p at ``axis`` index p.

    Zeroing those weight slices is what removing the positions does to the layer's output (its bias stays).
    """

    node: gs.Node
    index: int
    axis: int


@dataclass
class Analysis:
    """The result of tracing one graph: tracked tensors, roots, label unions, declines and pending edits."""

    tracks: dict[int, Track] = field(default_factory=dict)
    roots: list[Root] = field(default_factory=list)
    root_of_node: dict[int, int] = field(default_factory=dict)  # id of a root's node → its index in roots
    label_root: list[int] = field(default_factory=list)  # label → root index, -1 for pinned labels
    unions: nx.Graph = field(default_factory=nx.Graph)
    declined: dict[int, str] = field(default_factory=dict)  # root index → reason
    edits: list[Edit] = field(default_factory=list)
    sinks: list[Track] = field(default_factory=list)  # channel views read by weights (Conv/Gemm/MatMul)
    sink_weights: list[Sink] = field(default_factory=list)  # per sink: which weight axis reads its positions

    def new_labels(self, count: int, root: int) -> np.ndarray:
        start = len(self.label_root)
        self.label_root.extend([root] * count)
        return np.arange(start, start + count)

    def roots_of(self, labels: np.ndarray) -> set[int]:
        return {self.label_root[int(lab)] for lab in np.unique(labels)} - {-1}

    def decline(self, tracks: list[Track], reason: str) -> None:
        for t in tracks:
            for r in self.roots_of(t.labels):
                self.declined.setdefault(r, reason)

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            if x != y:
                self.unions.add_edge(x, y)


def infer_shapes(proto: onnx.ModelProto, input_shapes: dict[str, list[int]]) -> dict[str, list[int | None]]:
    """Tensor name → dims (None where unknown) from ONNX shape inference, with ``input_shapes`` applied.

    ``proto`` is not modified (it is the run's cached export). Inference is best effort: when it fails, the
    declared shapes are what is known, and unknown shapes make the pass decline.
    """
    options = ShapeOptions(data_prop=True).with_inputs(input_shapes)
    return shape_inference.infer_shapes(proto, options).dims()


# ---------------------------------------------------------------------------------------------- helpers
def _replace_input(node: gs.Node, index: int, values: np.ndarray, namer: Callable[[str], str]) -> int:
    """Give ``node`` a new constant at ``index`` (never writing into the old array); returns elements saved."""
    old = node.inputs[index]
    old_values = constant_values(old)
    node.inputs[index] = gs.Constant(namer(old.name), np.ascontiguousarray(values))
    return 0 if old_values is None else int(np.size(old_values) - np.size(values))


def _const(node: gs.Node, index: int) -> np.ndarray | None:
    if index >= len(node.inputs) or node.inputs[index].is_empty():
        return None
    values = constant_values(node.inputs[index])
    return None if values is None else np.asarray(values)


def _extra_outputs_unused(node: gs.Node, pinned: set[int]) -> None:
    for t in node.outputs[1:]:
        if t.outputs or id(t) in pinned:
            raise Decline(f"{node.op} output {t.name} (beyond the first) is used")


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


class Tracer:
    """Walks one graph in order, tracking channel labels from roots through every op that keeps them.

    Handlers are looked up in ``HANDLERS`` (op type → method); anything else that reads a tracked tensor
    declines the groups it carries.
    """

    def __init__(
        self,
        graph: gs.Graph,
        shapes: dict[str, list[int | None]],
        norm: str,
        selected: Callable[[gs.Node], bool],
        namer: Callable[[str], str],
        opset: int,
    ) -> None:
        self.graph = graph
        self.shapes = shapes
        self.norm = norm
        self.selected = selected
        self.namer = namer
        self.opset = opset
        self.a = Analysis()
        self.pinned = {id(t) for t in graph.outputs}
        self.saved = [0]  # elements removed from constants, filled in by the edits

    # ------------------------------------------------------------------ driver
    def trace(self) -> Analysis:
        a = self.a
        for node in self.graph.nodes:
            reads = list(node.inputs) + (implicit_inputs(node) if subgraphs_of(node) else [])
            tracked = [t for t in reads if id(t) in a.tracks]
            if tracked:
                handler = HANDLERS.get(node.op) if is_onnx_op(node) else None
                try:
                    if handler is None or subgraphs_of(node):
                        raise Decline(f"{node.op} {node.name} reads the channels and is not understood")
                    handler(self, node)
                except Decline as why:
                    a.decline([a.tracks[id(t)] for t in tracked], str(why))
                    for t in node.outputs:
                        a.tracks.pop(id(t), None)
                    continue
            elif is_onnx_op(node) and node.op in ROOT_OPS:
                self._maybe_root(node)
        for t in self.graph.outputs:
            if id(t) in a.tracks:
                a.decline([a.tracks[id(t)]], f"graph output {t.name} exposes the channels")
        return a

    def track(self, t: gs.Tensor) -> Track | None:
        return self.a.tracks.get(id(t))

    def shape(self, t: gs.Tensor) -> list[int | None] | None:
        values = constant_values(t) if not t.is_empty() else None
        if values is not None:
            return list(np.shape(values))
        return self.shapes.get(t.name)

    def rank(self, t: gs.Tensor) -> int:
        s = self.shape(t)
        if s is not None:
            return len(s)
        track = self.track(t)
        if track is None or track.rank is None:
            raise Decline(f"rank of {t.name} is unknown")
        return track.rank

    def defer(self, ref: gs.Tensor, edit: Callable[..., None], *args: Any) -> None:
        """Run ``edit(*args, mask)`` once the kept channels are known, ``mask`` being ``ref``'s kept positions."""
        self.a.edits.append(lambda keep: edit(*args, keep(ref)))

    def set_out(self, node: gs.Node, track: Track) -> None:
        _extra_outputs_unused(node, self.pinned)
        if track.rank is None:
            # Every other handler keeps the rank of its (first tracked) data input.
            source = next((self.track(x) for x in node.inputs if self.track(x) is not None), None)
            track.rank = None if source is None else source.rank
        self.a.tracks[id(node.outputs[0])] = track

    # ------------------------------------------------------------------ roots
    def _root_info(self, node: gs.Node) -> tuple[np.ndarray, np.ndarray, int] | None:
        """(per-channel weight rows [M, k], bias [M], output axis) of a prunable layer, or None."""
        w = _const(node, 1)
        if w is None or w.dtype.kind != "f":
            return None
        if node.op == "Conv":
            if int(node.attrs.get("group", 1)) != 1 or w.ndim < 3:
                return None
            rows = w.reshape(w.shape[0], -1)
            bias = _const(node, 2)
            return rows, (np.zeros(w.shape[0]) if bias is None else bias), 1
        if node.op == "Gemm":
            if w.ndim != 2 or int(node.attrs.get("transA", 0)):
                return None
            rows = w if int(node.attrs.get("transB", 0)) else w.T
            c = _const(node, 2)
            if len(node.inputs) > 2 and not node.inputs[2].is_empty() and c is None:
                return None
            if c is None:
                bias = np.zeros(rows.shape[0])
            elif c.size == 1:
                bias = np.broadcast_to(c.reshape(-1), (rows.shape[0],))
            elif c.shape[-1] == rows.shape[0] and c.size == rows.shape[0]:
                bias = c.reshape(-1) * float(node.attrs.get("beta", 1.0))
            else:
                return None
            return rows, bias, 1
        if node.op == "MatMul":
            if w.ndim != 2 or node.inputs[0].is_empty():
                return None
            rank = len(self.shapes.get(node.inputs[0].name) or [])
            if rank < 2:
                return None
            return w.T, np.zeros(w.shape[1]), rank - 1
        return None

    def _maybe_root(self, node: gs.Node) -> None:
        if not self.selected(node) or len(node.outputs) != 1:
            return
        info = self._root_info(node)
        if info is None:
            return
        rows, bias, axis = info
        a = self.a
        r = len(a.roots)
        flat = rows.astype(np.float64)
        norms = np.abs(flat).sum(axis=1) if self.norm == "l1" else np.sqrt((flat**2).sum(axis=1))
        dead = ~np.any(flat != 0, axis=1) & (np.asarray(bias) == 0)
        labels = a.new_labels(rows.shape[0], r)
        a.roots.append(Root(node, int(labels[0]), norms, dead))
        a.root_of_node[id(node)] = r
        # The ignore: a root's weight is a constant (it was read above), so _const is not None here.
        rank = int(_const(node, 1).ndim) if node.op == "Conv" else axis + 1  # type: ignore[union-attr]
        a.tracks[id(node.outputs[0])] = Track(axis, labels, dead.copy(), rank)
        self.defer(node.outputs[0], self._edit_root, node)

    def _edit_root(self, node: gs.Node, mask: np.ndarray) -> None:
        if mask.all():
            return
        w = _const(node, 1)
        assert w is not None
        if node.op == "Conv":
            self.saved[0] += _replace_input(node, 1, w[mask], self.namer)
            bias = _const(node, 2)
            if bias is not None:
                self.saved[0] += _replace_input(node, 2, bias[mask], self.namer)
        elif node.op == "Gemm":
            trans = int(node.attrs.get("transB", 0))
            self.saved[0] += _replace_input(node, 1, w[mask] if trans else w[:, mask], self.namer)
            c = _const(node, 2)
            if c is not None and c.size > 1:
                self.saved[0] += _replace_input(node, 2, c[..., mask], self.namer)
        else:
            self.saved[0] += _replace_input(node, 1, w[:, mask], self.namer)

    # ------------------------------------------------------------------ handlers
    def passthrough(self, node: gs.Node) -> None:
        t = self.track(node.inputs[0])
        if t is None or any(id(x) in self.a.tracks for x in node.inputs[1:]):
            raise Decline(f"{node.op} {node.name} reads the channels in a side input")
        self.set_out(node, Track(t.axis, t.labels, t.zeros & (node.op in ZERO_PRESERVING)))

    def clip(self, node: gs.Node) -> None:
        t = self.track(node.inputs[0])
        lo = _const(node, 1) if len(node.inputs) > 1 else node.attrs.get("min")
        hi = _const(node, 2) if len(node.inputs) > 2 else node.attrs.get("max")
        keeps_zero = (lo is None or float(np.max(lo)) <= 0) and (hi is None or float(np.min(hi)) >= 0)
        if t is None:
            raise Decline("Clip bounds carry the channels")
        self.set_out(node, Track(t.axis, t.labels, t.zeros & keeps_zero))

    def pool(self, node: gs.Node) -> None:
        t = self.track(node.inputs[0])
        if t is None or t.axis != 1:
            raise Decline(f"{node.op} {node.name}: channels are not on axis 1")
        self.set_out(node, Track(1, t.labels, t.zeros.copy()))

    def resize(self, node: gs.Node) -> None:
        t = self.track(node.inputs[0])
        # NOTE: Resize-11+ takes (X, roi, scales, sizes); sizes would spell out the channel count.
        if t is None or (len(node.inputs) > 3 and not node.inputs[3].is_empty()):
            raise Decline(f"{node.op} {node.name} gives explicit sizes")
        scales = _const(node, 2 if node.op == "Resize" and self.opset >= 11 else 1)
        if scales is None or scales.size <= t.axis or scales.reshape(-1)[t.axis] != 1:
            raise Decline(f"{node.op} {node.name}: scales are not constant or resize the channel axis")
        self.set_out(node, Track(t.axis, t.labels, t.zeros.copy()))

    def elementwise(self, node: gs.Node) -> None:
        out_shape = self.shape(node.outputs[0])
        ranks = [self.rank(x) for x in node.inputs]
        out_rank = max(ranks) if out_shape is None else len(out_shape)
        tracks = [self.track(x) for x in node.inputs]
        out_axes = {t.axis + out_rank - r for t, r in zip(tracks, ranks) if t is not None}
        if len(out_axes) != 1 or len({len(t.labels) for t in tracks if t is not None}) != 1:
            raise Decline(f"{node.op} {node.name} joins channels on different axes or counts")
        axis = out_axes.pop()
        first = next(t for t in tracks if t is not None)
        count = len(first.labels)
        zero_each: list[np.ndarray] = []
        for i, (x, t, r) in enumerate(zip(node.inputs, tracks, ranks)):
            local = axis - (out_rank - r)
            if t is not None:
                self.a.union(first.labels, t.labels)
                zero_each.append(t.zeros)
                continue
            dims = self.shape(x)
            dim = None if local < 0 else (dims[local] if dims is not None else None)
            values = _const(node, i)
            if local < 0 or dim == 1:
                z = np.full(count, values is not None and not np.any(values))
            elif dim != count:
                raise Decline(f"{node.op} {node.name}: operand {x.name} has {dim} values on the channel axis")
            elif values is None:
                # A variable operand with all channels (from an unpruned layer or an input) pins them.
                pins = self.a.new_labels(count, -1)
                self.a.union(first.labels, pins)
                z = np.zeros(count, dtype=bool)
            else:
                moved = np.moveaxis(values, local, 0).reshape(count, -1)
                z = ~np.any(moved != 0, axis=1)
                self.defer(node.outputs[0], self._slice_const, node, i, local)
            zero_each.append(z)
        combine = ZERO_RULES.get(node.op, lambda zs: np.zeros_like(zs[0]))
        self.set_out(node, Track(axis, first.labels, combine(zero_each), out_rank))

    def _slice_const(self, node: gs.Node, index: int, axis: int, mask: np.ndarray) -> None:
        values = _const(node, index)
        if values is not None and not mask.all():
            self.saved[0] += _replace_input(node, index, np.compress(mask, values, axis=axis), self.namer)

    def per_channel_params(self, node: gs.Node) -> None:
        t = self.track(node.inputs[0])
        if t is None or t.axis != 1 or any(id(x) in self.a.tracks for x in node.inputs[1:]):
            raise Decline(f"{node.op} {node.name}: channels are not on axis 1 of its data input")
        params = [_const(node, i) for i in range(1, len(node.inputs))]
        if any(p is None or p.shape != (len(t.labels),) for p in params):
            raise Decline(f"{node.op} {node.name}: parameters are not constant per-channel vectors")
        if node.op == "BatchNormalization":
            if int(node.attrs.get("training_mode", 0)):
                raise Decline("BatchNormalization in training mode")
            gamma, beta, mean, var = (p.astype(np.float64) for p in params if p is not None)  # none is None
            shift_if_zero = beta - mean * gamma / np.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))
            zeros = (t.zeros & (shift_if_zero == 0)) | ((gamma == 0) & (beta == 0))
            self._scale_norms(node.inputs[0], t, np.abs(gamma) / np.sqrt(var + float(node.attrs.get("epsilon", 1e-5))))
        else:  # InstanceNormalization: a constant channel normalises to 0, so it outputs B there
            zeros = (t.zeros | (params[0] == 0)) & (params[1] == 0)
        for i in range(1, len(node.inputs)):
            self.defer(node.inputs[0], self._slice_const, node, i, 0)
        self.set_out(node, Track(1, t.labels, zeros))

    def _scale_norms(self, x: gs.Tensor, t: Track, factor: np.ndarray) -> None:
        """Rank an unfused Conv → BN by the norms of the folded filters: times |gamma| / sqrt(var + eps)."""
        # A lookup, not a search of all roots: one BN per conv would make the trace quadratic.
        index = self.a.root_of_node.get(id(x.inputs[0])) if len(x.inputs) == 1 else None
        root = self.a.roots[index] if index is not None else None
        if root is not None and len(root.norms) == len(t.labels) == len(factor):
            root.norms = root.norms * factor

    def conv(self, node: gs.Node) -> None:
        t = self.track(node.inputs[0])
        w = _const(node, 1)
        if t is None or t.axis != 1 or w is None or any(id(x) in self.a.tracks for x in node.inputs[1:]):
            raise Decline(f"Conv {node.name}: channels reach it other than as its data input, or W is not constant")
        group = int(node.attrs.get("group", 1))
        count = len(t.labels)
        if group == 1:
            self.a.sinks.append(t)
            self.a.sink_weights.append(Sink(node, 1, 1))
            self.defer(node.inputs[0], self._slice_const, node, 1, 1)
            self._maybe_root(node)
            return
        if group == count and w.shape[0] == count and w.shape[1] == 1:
            # Depthwise with multiplier 1: output channel c is input channel c, so it loses the same ones.
            bias = _const(node, 2)
            b = np.zeros(count) if bias is None else bias
            if len(node.inputs) > 2 and not node.inputs[2].is_empty() and bias is None:
                raise Decline(f"Conv {node.name}: bias is not constant")
            zeros = (t.zeros | ~np.any(w.reshape(count, -1) != 0, axis=1)) & (b == 0)
            self.defer(node.inputs[0], self._edit_depthwise, node)
            self.set_out(node, Track(1, t.labels, zeros))
            return
        raise Decline(f"Conv {node.name}: grouped convolution (group={group}) that is not depthwise")

    def _edit_depthwise(self, node: gs.Node, mask: np.ndarray) -> None:
        if mask.all():
            return
        self._slice_const(node, 1, 0, mask)
        if len(node.inputs) > 2 and not node.inputs[2].is_empty():
            self._slice_const(node, 2, 0, mask)
        node.attrs["group"] = int(mask.sum())

    def gemm(self, node: gs.Node) -> None:
        t = self.track(node.inputs[0])
        w = _const(node, 1)
        if t is None or w is None or w.ndim != 2 or int(node.attrs.get("transA", 0)) or t.axis != 1:
            raise Decline(f"Gemm {node.name}: features reach it other than as A (transA=0) with constant B")
        if any(id(x) in self.a.tracks for x in node.inputs[1:]):
            raise Decline(f"Gemm {node.name}: B or C carries the features")
        self.a.sinks.append(t)
        axis = 1 if int(node.attrs.get("transB", 0)) else 0
        self.a.sink_weights.append(Sink(node, 1, axis))
        self.defer(node.inputs[0], self._slice_const, node, 1, axis)
        self._maybe_root(node)

    def matmul(self, node: gs.Node) -> None:
        t = self.track(node.inputs[0])
        w = _const(node, 1)
        if t is None or w is None or w.ndim != 2 or t.axis != self.rank(node.inputs[0]) - 1:
            raise Decline(f"MatMul {node.name}: features are not the last axis of A with a 2-D constant B")
        self.a.sinks.append(t)
        self.a.sink_weights.append(Sink(node, 1, 0))
        self.defer(node.inputs[0], self._slice_const, node, 1, 0)
        self._maybe_root(node)

    def concat(self, node: gs.Node) -> None:
        rank = self.rank(node.outputs[0]) if self.shape(node.outputs[0]) else self.rank(node.inputs[0])
        axis = _norm_axis(int(node.attrs.get("axis", 0)), rank)
        labels, zeros = [], []
        for x in node.inputs:
            t = self.track(x)
            if t is not None:
                if t.axis != axis:
                    raise Decline(f"Concat {node.name} joins along axis {axis}, channels are on axis {t.axis}")
                labels.append(t.labels)
                zeros.append(t.zeros)
                continue
            dims = self.shape(x)
            size = None if dims is None else dims[axis]
            if size is None:
                raise Decline(f"Concat {node.name}: size of untracked input {x.name} is unknown")
            labels.append(self.a.new_labels(int(size), -1))
            zeros.append(np.zeros(int(size), dtype=bool))
        self.set_out(node, Track(axis, np.concatenate(labels), np.concatenate(zeros)))

    def split(self, node: gs.Node) -> None:
        t = self.track(node.inputs[0])
        rank = self.rank(node.inputs[0])
        if t is None or _norm_axis(int(node.attrs.get("axis", 0)), rank) != t.axis:
            raise Decline(f"Split {node.name} does not split the channel axis")
        count = len(t.labels)
        # NOTE: split sizes are an attribute before opset 13 and an optional input from 13; opset 18 adds
        # num_outputs for equal splits.
        sizes = _const(node, 1) if self.opset >= 13 else node.attrs.get("split")
        if sizes is None:
            n = len(node.outputs)
            if count % n:
                raise Decline(f"Split {node.name}: {count} channels do not split evenly")
            sizes = [count // n] * n
        bounds = np.cumsum([0, *[int(s) for s in np.asarray(sizes).reshape(-1)]])
        for i, out in enumerate(node.outputs):
            part = slice(bounds[i], bounds[i + 1])
            self.a.tracks[id(out)] = Track(t.axis, t.labels[part], t.zeros[part], t.rank)
        self.a.edits.append(lambda keep: self._edit_split(node, [keep(o) for o in node.outputs]))

    def _edit_split(self, node: gs.Node, masks: list[np.ndarray]) -> None:
        if all(m.all() for m in masks):
            return
        sizes = np.array([int(m.sum()) for m in masks], dtype=np.int64)
        node.attrs.pop("num_outputs", None)
        if self.opset >= 13:
            if len(node.inputs) > 1:
                node.inputs[1] = gs.Constant(self.namer(f"{node.name}_split"), sizes)
            else:
                node.inputs.append(gs.Constant(self.namer(f"{node.name}_split"), sizes))
        else:
            node.attrs["split"] = [int(s) for s in sizes]

    def slice(self, node: gs.Node) -> None:
        t = self.track(node.inputs[0])
        if t is None or self.opset < 10 or any(id(x) in self.a.tracks for x in node.inputs[1:]):
            raise Decline(f"Slice {node.name}: attribute form or channels in its parameters")
        rank = self.rank(node.inputs[0])
        starts, ends = _const(node, 1), _const(node, 2)
        axes = _const(node, 3)
        if axes is None and (len(node.inputs) <= 3 or node.inputs[3].is_empty()):
            axes = np.arange(len(starts) if starts is not None else 0)
        steps = _const(node, 4) if len(node.inputs) > 4 and not node.inputs[4].is_empty() else None
        if starts is None or ends is None or axes is None:
            raise Decline(f"Slice {node.name}: starts/ends/axes are not constant")
        where = [i for i, ax in enumerate(axes.tolist()) if _norm_axis(int(ax), rank) == t.axis]
        if not where:
            self.set_out(node, Track(t.axis, t.labels, t.zeros))
            return
        j = where[0]
        if steps is not None and int(steps[j]) != 1:
            raise Decline(f"Slice {node.name}: step {int(steps[j])} on the channel axis")
        s, e, _ = slice(int(starts[j]), int(ends[j])).indices(len(t.labels))
        self.set_out(node, Track(t.axis, t.labels[s:e], t.zeros[s:e]))
        self.defer(node.inputs[0], self._edit_slice, node, j, s, e)

    def _edit_slice(self, node: gs.Node, j: int, s: int, e: int, mask: np.ndarray) -> None:
        if mask.all():
            return
        new_s = int(mask[:s].sum())
        new_e = new_s + int(mask[s:e].sum())
        for index, value in ((1, new_s), (2, new_e)):
            values = np.array(_const(node, index), copy=True)
            values[j] = value
            node.inputs[index] = gs.Constant(self.namer(node.inputs[index].name), values)

    def transpose(self, node: gs.Node) -> None:
        t = self.track(node.inputs[0])
        if t is None:
            raise Decline(f"Transpose {node.name}: the channels are not its data input")
        perm = node.attrs.get("perm")
        rank = len(perm) if perm is not None else self.rank(node.inputs[0])
        perm = list(range(rank))[::-1] if perm is None else [_norm_axis(int(p), rank) for p in perm]
        # Output axis i is input axis perm[i]: the channels move to where perm names their axis.
        self.set_out(node, Track(perm.index(t.axis), t.labels, t.zeros, rank))

    def squeeze(self, node: gs.Node) -> None:
        t = self.track(node.inputs[0])
        rank = self.rank(node.inputs[0])
        # NOTE: axes are an attribute before opset 13 and an input from 13.
        axes = node.attrs.get("axes") if self.opset < 13 else _const(node, 1)
        if t is None or axes is None or any(id(x) in self.a.tracks for x in node.inputs[1:]):
            raise Decline(f"{node.op} {node.name}: axes are not constant or carry the channels")
        if node.op == "Squeeze":
            gone = {_norm_axis(int(ax), rank) for ax in np.asarray(axes).reshape(-1)}
            if t.axis in gone:
                raise Decline(f"Squeeze {node.name} removes the channel axis")
            axis, out_rank = t.axis - sum(1 for g in gone if g < t.axis), rank - len(gone)
        else:
            out_rank = rank + int(np.size(axes))
            new = sorted(_norm_axis(int(ax), out_rank) for ax in np.asarray(axes).reshape(-1))
            kept = [i for i in range(out_rank) if i not in new]
            axis = kept[t.axis]
        self.set_out(node, Track(axis, t.labels, t.zeros, out_rank))

    def flatten(self, node: gs.Node) -> None:
        t = self.track(node.inputs[0])
        dims = self.shape(node.inputs[0])
        if t is None or dims is None:
            raise Decline(f"{node.op} {node.name}: the channels are in its shape input, or its rank is unknown")
        target = None
        if node.op == "Flatten":
            start = _norm_axis(int(node.attrs.get("axis", 1)), len(dims))
            # Output axis 0 merges input axes [0, start), axis 1 merges [start, rank).
            j, span = (0, (0, start)) if t.axis < start else (1, (start, len(dims)))
        else:
            out = self.shape(node.outputs[0]) or []
            target = _const(node, 1)
            known_in, known_out = [d for d in dims if d is not None], [d for d in out if d is not None]
            if len(known_in) != len(dims) or not out or len(known_out) != len(out) or target is None:
                raise Decline(f"Reshape {node.name}: shapes or the target are not static")
            j, span = _reshape_channel_axis(known_in, known_out, t.axis)
            zero_at = {k for k, v in enumerate(target.tolist()) if int(v) == 0}
            if zero_at & {t.axis, j} - ({j} if t.axis == j else set()):
                raise Decline(f"Reshape {node.name}: a 0 in the target copies a dim across the channel axis")
        sizes = dims[span[0] : span[1]]
        if any(d is None for d in sizes) or not span[0] <= t.axis < span[1]:
            raise Decline(f"{node.op} {node.name} does not keep the channels on one axis with static sizes")
        grid = [int(d) for d in sizes if d is not None]  # none is None
        where = t.axis - span[0]
        rank = 2 if target is None else int(target.size)
        self.set_out(node, Track(j, _spread(t.labels, grid, where), _spread(t.zeros, grid, where), rank))
        if target is not None and int(target[j]) not in (-1, 0):
            self.defer(node.outputs[0], self._edit_reshape, node, j)

    def _edit_reshape(self, node: gs.Node, start: int, mask: np.ndarray) -> None:
        if mask.all():
            return
        values = np.array(_const(node, 1), copy=True)
        values[start] = int(mask.sum())
        node.inputs[1] = gs.Constant(self.namer(node.inputs[1].name), values)

    def reduce(self, node: gs.Node) -> None:
        t = self.track(node.inputs[0])
        rank = self.rank(node.inputs[0])
        # NOTE: ReduceSum takes axes as an input from opset 13, the other Reduce ops from opset 18.
        axes = node.attrs.get("axes")
        if axes is None and len(node.inputs) > 1:
            axes = _const(node, 1)
            if axes is None:
                raise Decline(f"{node.op} {node.name}: axes are not constant")
        if t is None or axes is None:
            raise Decline(f"{node.op} {node.name} may reduce the channel axis")
        reduced = {_norm_axis(int(ax), rank) for ax in np.asarray(axes).reshape(-1)}
        if t.axis in reduced:
            raise Decline(f"{node.op} {node.name} reduces over the channel axis")
        axis, out_rank = t.axis, rank
        if not int(node.attrs.get("keepdims", 1)):  # the reduced axes go: the channel axis moves down
            axis, out_rank = t.axis - sum(1 for r in reduced if r < t.axis), rank - len(reduced)
        self.set_out(node, Track(axis, t.labels, t.zeros & (node.op in ZERO_PRESERVING), out_rank))


def _reshape_channel_axis(dims: list[int], out: list[int], axis: int) -> tuple[int, tuple[int, int]]:
    """(output axis j, input axes [s, e)) where output axis j is exactly input axes s..e-1 merged, s ≤ axis < e.

    The channel axis stays intact (s = axis, e = axis + 1) or is merged with neighbours whole; a Reshape
    that splits it or mixes it with part of another axis has no such j.
    """
    before = np.cumprod([1, *dims], dtype=np.int64).tolist()  # before[k] = product of dims[:k]
    after = np.cumprod([1, *out], dtype=np.int64).tolist()
    for j in range(len(out)):
        if after[j] in before[: axis + 1] and after[j + 1] in before[axis + 1 :]:
            s = max(k for k in range(axis + 1) if before[k] == after[j])
            e = min(k for k in range(axis + 1, len(before)) if before[k] == after[j + 1])
            return j, (s, e)
    raise Decline(f"Reshape {dims} → {out} splits the channel axis or mixes it with part of another")


def _spread(values: np.ndarray, grid: list[int], where: int) -> np.ndarray:
    """``values`` (one per channel, channels being axis ``where`` of ``grid``) at every position of the
    flattened grid: a block of repeats when the channels lead, a strided pattern when they trail (NHWC)."""
    shape = [1] * len(grid)
    shape[where] = len(values)
    return np.broadcast_to(values.reshape(shape), grid).reshape(-1).copy()


def _any(zs: list[np.ndarray]) -> np.ndarray:
    return np.logical_or.reduce(zs)


def _all(zs: list[np.ndarray]) -> np.ndarray:
    return np.logical_and.reduce(zs)


#: Binary op → which operands being zero makes the output zero.
ZERO_RULES: dict[str, Callable[[list[np.ndarray]], np.ndarray]] = {
    "Mul": _any,
    "Add": _all,
    "Sum": _all,
    "Sub": _all,
    "Div": lambda zs: zs[0],
    "PRelu": lambda zs: zs[0],
}

#: Ops with f(0) = 0, through which an exactly-zero channel stays exactly zero.
ZERO_PRESERVING = {
    "Relu", "LeakyRelu", "HardSwish", "Tanh", "Elu", "Selu", "Celu", "Gelu", "Mish", "Softsign", "Neg", "Abs",
    "Identity", "Dropout", "Cast", "Sqrt", "Sign", "Sin", "Asinh", "Atanh", "Erf", "ThresholdedRelu",
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin",
}

ROOT_OPS = {"Conv", "Gemm", "MatMul"}

_UNARY = [
    "Relu", "LeakyRelu", "HardSwish", "HardSigmoid", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "Gelu", "Mish",
    "Softplus", "Softsign", "Neg", "Abs", "Exp", "Identity", "Dropout", "Cast", "Sqrt", "Sign", "Sin", "Cos",
    "Asinh", "Atanh", "Erf", "ThresholdedRelu", "Reciprocal", "Floor", "Ceil", "Round",
]

#: Op type → how channels flow through it (Tracer method).
HANDLERS: dict[str, Callable[[Tracer, gs.Node], Any]] = {
    **{op: Tracer.passthrough for op in _UNARY},
    "Clip": Tracer.clip,
    **{op: Tracer.pool for op in ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool")},
    "Resize": Tracer.resize,
    "Upsample": Tracer.resize,
    **{op: Tracer.elementwise for op in ("Add", "Sub", "Mul", "Div", "PRelu", "Sum")},
    "BatchNormalization": Tracer.per_channel_params,
    "InstanceNormalization": Tracer.per_channel_params,
    "Conv": Tracer.conv,
    "Gemm": Tracer.gemm,
    "MatMul": Tracer.matmul,
    "Concat": Tracer.concat,
    "Split": Tracer.split,
    "Slice": Tracer.slice,
    "Flatten": Tracer.flatten,
    "Reshape": Tracer.flatten,
    "Transpose": Tracer.transpose,
    "Squeeze": Tracer.squeeze,
    "Unsqueeze": Tracer.squeeze,
    **{op: Tracer.reduce for op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin")},
}
