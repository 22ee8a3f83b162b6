"""fold-batchnorm: fold inference BatchNormalization (and per-channel Mul/Add) into the Conv/Gemm before."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from nnopt.ir.model import Model
from nnopt.passes.constants_to_initializers import constant_array, is_onnx_op, taken_names, unique_name
from nnopt.pipeline.base import Figure, LayerDecision, Pass, PassContext, PassResult


@dataclass(frozen=True)
class _Affine:
    """A per-channel ``y = x * scale + shift`` in float64; each vector has one entry or one per channel."""

    scale: np.ndarray
    shift: np.ndarray

    def per_channel(self, channels: int, what: str) -> tuple[np.ndarray, np.ndarray]:
        """(scale, shift) broadcast to ``channels`` entries each."""
        for vector in (self.scale, self.shift):
            if vector.size not in (1, channels):
                raise _Decline(f"{vector.size} values for {channels} {what}")
        return np.broadcast_to(self.scale, (channels,)), np.broadcast_to(self.shift, (channels,))


@dataclass
class _Plan:
    """New constant inputs (by input index) and attribute values for the producer, computed in float64."""

    inputs: dict[int, np.ndarray] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)


class _Decline(Exception):
    """Raised inside the pass (never escapes it) with the reason a node is not folded."""


def _float_constant(tensor: gs.Tensor, what: str) -> np.ndarray:
    values = constant_array(tensor)
    if values is None:
        raise _Decline(f"{what} is not a constant")
    values = np.asarray(values)
    if values.dtype.kind != "f":
        raise _Decline(f"{what} is {values.dtype}, not floating point")
    return values


def _batchnorm_affine(bn: gs.Node, data_index: int, rank: int, opset: int) -> _Affine:
    if len(bn.inputs) != 5 or any(t.is_empty() for t in bn.inputs):
        raise _Decline("expected 5 inputs")
    # NOTE: BatchNormalization-1/6 computes batch statistics unless is_test=1; -1 to -7 have an attribute
    # spatial (default 1; 0 normalises per activation), removed in -9; -14+ trains when training_mode=1.
    if opset < 7 and int(bn.attrs.get("is_test", 0)) != 1:
        raise _Decline("is_test is not set (training mode)")
    if int(bn.attrs.get("spatial", 1)) != 1:
        raise _Decline("spatial=0 (per-activation statistics)")
    if int(bn.attrs.get("training_mode", 0)) != 0:
        raise _Decline("training_mode=1")
    params = [_float_constant(t, n) for t, n in zip(bn.inputs[1:], ("scale", "B", "mean", "var"))]
    gamma, beta, mean, var = params
    if any(p.ndim != 1 for p in params) or len({p.size for p in params}) != 1:
        raise _Decline("parameters are not per-channel vectors of one length")
    eps = float(bn.attrs.get("epsilon", 1e-5))
    denom = var.astype(np.float64) + eps
    if not np.all(denom > 0):
        raise _Decline("var + epsilon is not positive")
    scale = gamma.astype(np.float64) / np.sqrt(denom)
    shift = beta.astype(np.float64) - mean.astype(np.float64) * scale
    if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(shift))):
        raise _Decline("non-finite folded scale or shift")
    return _Affine(scale, shift)


def _channel_vector(node: gs.Node, data_index: int, rank: int) -> np.ndarray:
    """The constant operand of a binary op as per-channel values (1 or C of them), in float64.

    The constant must broadcast along the channel axis (1) only, so the result keeps the producer's shape.
    """
    values = _float_constant(node.inputs[1 - data_index], "operand")
    if values.ndim > rank:
        raise _Decline(f"operand of rank {values.ndim} broadcasts beyond the rank-{rank} output")
    shape = (1,) * (rank - values.ndim) + tuple(values.shape)
    if any(d != 1 for axis, d in enumerate(shape) if axis != 1):
        raise _Decline(f"operand of shape {list(values.shape)} is not per-channel")
    return values.astype(np.float64).reshape(-1)


def _mul_affine(node: gs.Node, data_index: int, rank: int, opset: int) -> _Affine:
    return _Affine(_channel_vector(node, data_index, rank), np.zeros(1))


def _add_affine(node: gs.Node, data_index: int, rank: int, opset: int) -> _Affine:
    return _Affine(np.ones(1), _channel_vector(node, data_index, rank))


def _sub_affine(node: gs.Node, data_index: int, rank: int, opset: int) -> _Affine:
    return _Affine(np.ones(1), -_channel_vector(node, data_index, rank))


def _div_affine(node: gs.Node, data_index: int, rank: int, opset: int) -> _Affine:
    divisor = _channel_vector(node, data_index, rank)
    if not np.all(np.isfinite(divisor)) or np.any(divisor == 0):
        raise _Decline("divisor has zeros or non-finite values")
    return _Affine(1.0 / divisor, np.zeros(1))


@dataclass(frozen=True)
class _Follower:
    """An op that is a per-channel affine map of a producer's output.

    Attributes:
        data_inputs: the input positions that may carry the producer's output (both for Mul/Add).
        affine: (node, data input index, output rank, opset) → the affine map, or raises ``_Decline``.
        needs_constant_operand: a binary op is a candidate only when its other operand is a constant;
            without one (a residual Add, say) it is skipped without a report.
    """

    data_inputs: tuple[int, ...]
    affine: Callable[[gs.Node, int, int, int], _Affine]
    needs_constant_operand: bool = True


#: Op type → how it acts per channel on the output of the Conv/ConvTranspose/Gemm before it.
FOLLOWERS: dict[str, _Follower] = {
    "BatchNormalization": _Follower((0,), _batchnorm_affine, needs_constant_operand=False),
    "Mul": _Follower((0, 1), _mul_affine),
    "Add": _Follower((0, 1), _add_affine),
    "Sub": _Follower((0,), _sub_affine),
    "Div": _Follower((0,), _div_affine),
}


def _weight(node: gs.Node, index: int) -> np.ndarray:
    if index >= len(node.inputs) or node.inputs[index].is_empty():
        raise _Decline("weight input missing")
    tensor = node.inputs[index]
    if len({id(n) for n in tensor.outputs}) > 1:
        # Folding would give this node a private copy of a shared weight: the model would grow.
        raise _Decline("weight is shared with other nodes")
    return _float_constant(tensor, "weight")


def _optional_bias(node: gs.Node, index: int, channels: int) -> np.ndarray:
    if index >= len(node.inputs) or node.inputs[index].is_empty():
        return np.zeros(channels, dtype=np.float64)
    bias = _float_constant(node.inputs[index], "bias")
    if bias.shape != (channels,):
        raise _Decline(f"bias shape {list(bias.shape)} is not [{channels}]")
    return bias.astype(np.float64)


# ---------------------------------------------------------------------------------------------- producers
def _plan_conv(node: gs.Node, affine: _Affine) -> _Plan:
    # Conv weight is [M, C/group, k...]: output channel m is row m, whatever the group count.
    w = _weight(node, 1)
    if w.ndim < 3:
        raise _Decline(f"weight shape {list(w.shape)} is not [M, C/group, k...]")
    scale, shift = affine.per_channel(w.shape[0], "output channels")
    bias = _optional_bias(node, 2, w.shape[0])
    new_w = w.astype(np.float64) * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    return _Plan({1: new_w.astype(w.dtype), 2: (bias * scale + shift).astype(w.dtype)})


def _plan_conv_transpose(node: gs.Node, affine: _Affine) -> _Plan:
    # NOTE: ConvTranspose weight is [C, M/group, k...]: output channel g*(M/group)+j of group g is column j
    # of the rows of that group's input channels.
    w = _weight(node, 1)
    group = int(node.attrs.get("group", 1))
    if w.ndim < 3 or group < 1 or w.shape[0] % group:
        raise _Decline(f"weight shape {list(w.shape)} does not split into {group} groups")
    per_group = w.shape[1]
    channels = per_group * group
    scale, shift = affine.per_channel(channels, "output channels")
    bias = _optional_bias(node, 2, channels)
    kernel = w.shape[2:]
    grouped = w.astype(np.float64).reshape((group, w.shape[0] // group, per_group, *kernel))
    new_w = (grouped * scale.reshape((group, 1, per_group) + (1,) * len(kernel))).reshape(w.shape)
    return _Plan({1: new_w.astype(w.dtype), 2: (bias * scale + shift).astype(w.dtype)})


def _plan_gemm(node: gs.Node, affine: _Affine) -> _Plan:
    # Gemm: Y = alpha * A' B' + beta * C with B' = B^T if transB. A per-feature map of the 2-D output (axis
    # 1) scales column n of B' and maps C to beta*C*scale + shift, so the new C is used with beta=1.
    b = _weight(node, 1)
    trans_b = int(node.attrs.get("transB", 0))
    if b.ndim != 2:
        raise _Decline("B is not 2-D")
    scale, shift = affine.per_channel(b.shape[0] if trans_b else b.shape[1], "output features")
    new_b = b.astype(np.float64) * (scale[:, None] if trans_b else scale[None, :])
    beta = float(node.attrs.get("beta", 1.0))
    if len(node.inputs) > 2 and not node.inputs[2].is_empty():
        c = _float_constant(node.inputs[2], "C").astype(np.float64)
        if c.ndim > 2:
            raise _Decline("C has more than 2 dims")
        new_c = beta * c * scale + shift
    else:
        new_c = np.array(shift)
    return _Plan({1: new_b.astype(b.dtype), 2: new_c.astype(b.dtype)}, {"beta": 1.0})


def _output_rank(node: gs.Node) -> int:
    if node.op == "Gemm":
        return 2
    weight = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None:
        raise _Decline("weight is not a constant")
    return int(np.ndim(weight))


#: Producer op type → how to fold a per-channel affine map of its output into it.
FOLDERS: dict[str, Callable[[gs.Node, _Affine], _Plan]] = {
    "Conv": _plan_conv,
    "ConvTranspose": _plan_conv_transpose,
    "Gemm": _plan_gemm,
}


# ---------------------------------------------------------------------------------------------- the pass
def _unused(tensor: gs.Tensor, pinned: set[int]) -> bool:
    return tensor.is_empty() or (not tensor.outputs and id(tensor) not in pinned)


def _foldable_producer(graph: gs.Graph, tensor: gs.Tensor) -> gs.Node | None:
    producer = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    if producer is None or producer.op not in FOLDERS or not is_onnx_op(producer):
        return None
    return producer


def _producer(graph: gs.Graph, x: gs.Tensor, pinned: set[int], local: set[int]) -> gs.Node:
    """The Conv/ConvTranspose/Gemm of this graph whose only use is ``x``, or raise why there is none.

    ``local``: ids of ``graph``'s nodes (a set, so that the check is not a walk over the graph per node).
    """
    producer = _foldable_producer(graph, x)
    if producer is None:
        source = x.inputs[0].op if len(x.inputs) == 1 else "no node"
        raise _Decline(f"input comes from {source}, not Conv, ConvTranspose or Gemm")
    if id(producer) not in local:
        raise _Decline("producer is in an enclosing graph")
    if len(producer.outputs) != 1 or id(x) in pinned or len({id(n) for n in x.outputs}) != 1:
        raise _Decline(f"{producer.op} output is also used elsewhere")
    return producer


def _candidate_input(graph: gs.Graph, node: gs.Node, follower: _Follower) -> int | None:
    """Which input of ``node`` is worth trying to fold into its producer; None to skip it silently."""
    if not follower.needs_constant_operand:
        return follower.data_inputs[0]
    if len(node.inputs) != 2:
        return None
    for index in follower.data_inputs:
        produced = _foldable_producer(graph, node.inputs[index]) is not None
        if produced and constant_array(node.inputs[1 - index]) is not None:
            return index
    return None


class FoldBatchNorm(Pass):
    """Fold inference BatchNormalization, and per-channel Mul/Add/Sub/Div, into the Conv/Gemm that feeds it.

    Matches: a BatchNormalization (inference form: training outputs absent or unused, no training_mode,
    spatial), or a Mul/Add (either operand order), Sub/Div (producer output first) by a constant that
    broadcasts along the channel axis only (a scalar, [C,1,1], [1,C,1,1]…: BN written out by hand), whose
    data input is the only use of the output of a Conv, ConvTranspose (any group; its weight's channel
    axis is 1) or Gemm (transB either way; features on axis 1 of its 2-D output) with constant float
    weights, in the main graph or any subgraph.
    Rewrites: the producer's weight and bias (Gemm: B, C and beta=1) become new initializers computed in
    float64 and cast back to the weight's dtype; the producer then writes the folded node's output tensor,
    and the node is removed. Lossless up to float rounding (about 1e-7 relative per fold).
    Preconditions: none. Declined and reported per layer: non-constant or shared weights, another
    producer, a producer output used elsewhere, training mode, constants that are not per-channel.
    Binary ops without a constant operand or a foldable producer are not reported.
    """

    name = "fold-batchnorm"
    lossy = False

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        pinned = {id(t) for g in model.all_graphs() for t in g.outputs}
        taken = taken_names(model)
        layers: list[LayerDecision] = []
        folded: dict[str, int] = {}
        for graph in model.all_graphs():
            gone: set[int] = set()
            # Folding removes followers only, never a producer: the set stays right for the whole walk.
            local = {id(n) for n in graph.nodes}
            for node in list(graph.nodes):
                follower = FOLLOWERS.get(node.op)
                if follower is None or not is_onnx_op(node):
                    continue
                index = _candidate_input(graph, node, follower)
                if index is None:
                    continue
                figures: dict[str, Figure] = {}
                try:
                    if not node.outputs or not all(_unused(t, pinned) for t in node.outputs[1:]):
                        raise _Decline("training outputs are used")
                    producer = _producer(graph, node.inputs[index], pinned, local)
                    figures["into"] = producer.name
                    affine = follower.affine(node, index, _output_rank(producer), model.opset)
                    plan = FOLDERS[producer.op](producer, affine)
                except _Decline as why:
                    layers.append(LayerDecision(node.name, node.op, "declined", str(why), figures))
                    continue
                self._apply(producer, node, plan, taken)
                gone.add(id(node))
                folded[node.op] = folded.get(node.op, 0) + 1
                layers.append(LayerDecision(node.name, node.op, "folded", figures=figures))
            if gone:
                graph.nodes = [n for n in graph.nodes if id(n) not in gone]
        batchnorms = folded.pop("BatchNormalization", 0)
        stats: dict[str, Any] = {
            "batchnorms_folded": batchnorms,
            "affine_ops_folded": sum(folded.values()),
            "declined": sum(1 for layer in layers if layer.action == "declined"),
        }
        return PassResult(modified=batchnorms > 0 or bool(folded), stats=stats, layers=layers)

    def _apply(self, producer: gs.Node, follower: gs.Node, plan: _Plan, taken: set[str]) -> None:
        label = producer.name or producer.outputs[0].name
        for index, values in sorted(plan.inputs.items()):
            present = index < len(producer.inputs) and not producer.inputs[index].is_empty()
            base = producer.inputs[index].name if present else f"{label}_bias"
            # New tensors, never new values in the old arrays: graphsurgeon copies share them.
            const = gs.Constant(unique_name(f"{base}_{self.name.replace('-', '_')}", taken), values)
            while len(producer.inputs) < index:
                producer.inputs.append(gs.Variable.empty())
            if index < len(producer.inputs):
                producer.inputs[index] = const
            else:
                producer.inputs.append(const)
        producer.attrs.update(plan.attrs)
        out = follower.outputs[0]
        follower.inputs.clear()
        follower.outputs.clear()
        producer.outputs[0] = out
