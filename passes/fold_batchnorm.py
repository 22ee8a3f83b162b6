"""fold-batchnorm: fold inference BatchNormalization into the weights and bias of the Conv/Gemm before it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx_graphsurgeon as gs

from nnopt.ir.model import Model
from nnopt.passes.constants_to_initializers import constant_array, is_onnx_op, taken_names, unique_name
from nnopt.pipeline.base import Pass, PassContext, PassResult


@dataclass(frozen=True)
class _Affine:
    """A BatchNormalization at inference as ``y = x * scale + shift`` per channel, in float64."""

    scale: np.ndarray
    shift: np.ndarray


@dataclass
class _Plan:
    """New constant inputs (by input index) and attribute values for the producer, computed in float64."""

    inputs: dict[int, np.ndarray] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)


class _Decline(Exception):
    """Raised inside the pass (never escapes it) with the reason a BatchNormalization stays."""


def _float_constant(tensor: gs.Tensor, what: str) -> np.ndarray:
    values = constant_array(tensor)
    if values is None:
        raise _Decline(f"{what} is not a constant")
    values = np.asarray(values)
    if values.dtype.kind != "f":
        raise _Decline(f"{what} is {values.dtype}, not floating point")
    return values


def _batchnorm_affine(bn: gs.Node, opset: int) -> _Affine:
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
    gamma, beta, mean, var = (_float_constant(t, n) for t, n in zip(bn.inputs[1:], ("scale", "B", "mean", "var")))
    if not (gamma.ndim == beta.ndim == mean.ndim == var.ndim == 1) or len({gamma.size, beta.size, mean.size, var.size}) != 1:
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
def _plan_conv(node: gs.Node, bn: _Affine) -> _Plan:
    # Conv weight is [M, C/group, k...]: output channel m is row m, whatever the group count.
    w = _weight(node, 1)
    if w.ndim < 3 or w.shape[0] != bn.scale.size:
        raise _Decline(f"weight shape {list(w.shape)} does not match {bn.scale.size} channels")
    bias = _optional_bias(node, 2, w.shape[0])
    scale = bn.scale.reshape((-1,) + (1,) * (w.ndim - 1))
    return _Plan({1: (w.astype(np.float64) * scale).astype(w.dtype), 2: (bias * bn.scale + bn.shift).astype(w.dtype)})


def _plan_conv_transpose(node: gs.Node, bn: _Affine) -> _Plan:
    # NOTE: ConvTranspose weight is [C, M/group, k...]: output channel g*(M/group)+j of group g is column j
    # of the rows of that group's input channels.
    w = _weight(node, 1)
    group = int(node.attrs.get("group", 1))
    if w.ndim < 3 or group < 1 or w.shape[0] % group:
        raise _Decline(f"weight shape {list(w.shape)} does not split into {group} groups")
    per_group = w.shape[1]
    channels = per_group * group
    if channels != bn.scale.size:
        raise _Decline(f"{channels} output channels, BatchNormalization has {bn.scale.size}")
    bias = _optional_bias(node, 2, channels)
    kernel = w.shape[2:]
    grouped = w.astype(np.float64).reshape((group, w.shape[0] // group, per_group, *kernel))
    scale = bn.scale.reshape((group, 1, per_group) + (1,) * len(kernel))
    new_w = (grouped * scale).reshape(w.shape).astype(w.dtype)
    return _Plan({1: new_w, 2: (bias * bn.scale + bn.shift).astype(w.dtype)})


def _plan_gemm(node: gs.Node, bn: _Affine) -> _Plan:
    # Gemm: Y = alpha * A' B' + beta * C with B' = B^T if transB. BN over axis 1 of the 2-D output scales
    # column n of B' and maps C to beta*C*scale + shift, so the new C is used with beta=1.
    b = _weight(node, 1)
    trans_b = int(node.attrs.get("transB", 0))
    if b.ndim != 2:
        raise _Decline("B is not 2-D")
    channels = b.shape[0] if trans_b else b.shape[1]
    if channels != bn.scale.size:
        raise _Decline(f"{channels} output features, BatchNormalization has {bn.scale.size}")
    scale = bn.scale[:, None] if trans_b else bn.scale[None, :]
    new_b = (b.astype(np.float64) * scale).astype(b.dtype)
    beta = float(node.attrs.get("beta", 1.0))
    if len(node.inputs) > 2 and not node.inputs[2].is_empty():
        c = _float_constant(node.inputs[2], "C").astype(np.float64)
        if c.ndim > 2:
            raise _Decline("C has more than 2 dims")
        new_c = beta * c * bn.scale + bn.shift
    else:
        new_c = bn.shift.copy()
    return _Plan({1: new_b, 2: new_c.astype(b.dtype)}, {"beta": 1.0})


#: Producer op type → how to fold a following BatchNormalization into it.
FOLDERS: dict[str, Callable[[gs.Node, _Affine], _Plan]] = {
    "Conv": _plan_conv,
    "ConvTranspose": _plan_conv_transpose,
    "Gemm": _plan_gemm,
}


# ---------------------------------------------------------------------------------------------- the pass
def _unused(tensor: gs.Tensor, pinned: set[int]) -> bool:
    return tensor.is_empty() or (not tensor.outputs and id(tensor) not in pinned)


def _producer(graph: gs.Graph, bn: gs.Node, pinned: set[int]) -> gs.Node:
    x = bn.inputs[0]
    if len(x.inputs) != 1:
        raise _Decline("input is not produced by a node")
    producer = x.inputs[0]
    if producer.op not in FOLDERS or not is_onnx_op(producer):
        raise _Decline(f"input comes from {producer.op}, not Conv, ConvTranspose or Gemm")
    if not any(n is producer for n in graph.nodes):
        raise _Decline("producer is in an enclosing graph")
    if len(producer.outputs) != 1 or id(x) in pinned or len({id(n) for n in x.outputs}) != 1:
        raise _Decline(f"{producer.op} output is also used elsewhere")
    return producer


class FoldBatchNorm(Pass):
    """Fold inference-mode BatchNormalization into the Conv, ConvTranspose or Gemm that feeds it.

    Matches: a BatchNormalization (inference form: training outputs absent or unused, no training_mode,
    spatial) whose input is the only use of the output of a Conv, ConvTranspose (any group) or Gemm
    (transB either way; BN over the feature axis of its 2-D output), with constant float weights and
    constant BN parameters, in the main graph or any subgraph.
    Rewrites: the producer's weight and bias (Gemm: B, C and beta=1) become new initializers computed in
    float64 and cast back to the weight's dtype; the producer then writes the BN's output tensor and the
    BN is removed. Lossless up to float rounding (outputs agree to about 1e-6 relative).
    Preconditions: none. Declined (reported per layer): non-constant or shared weights, other producers,
    a producer output used elsewhere, training mode.
    """

    name = "fold-batchnorm"
    lossy = False

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        pinned = {id(t) for g in model.all_graphs() for t in g.outputs}
        taken = taken_names(model)
        layers: list[dict[str, Any]] = []
        folded = 0
        for graph in model.all_graphs():
            gone: set[int] = set()
            for bn in list(graph.nodes):
                if bn.op != "BatchNormalization" or not is_onnx_op(bn):
                    continue
                entry: dict[str, Any] = {"node": bn.name}
                try:
                    if not bn.outputs or not all(_unused(t, pinned) for t in bn.outputs[1:]):
                        raise _Decline("training outputs are used")
                    affine = _batchnorm_affine(bn, model.opset)
                    producer = _producer(graph, bn, pinned)
                    entry["into"] = producer.name
                    plan = FOLDERS[producer.op](producer, affine)
                except _Decline as why:
                    layers.append({**entry, "action": "declined", "reason": str(why)})
                    continue
                self._apply(producer, bn, plan, taken)
                gone.add(id(bn))
                folded += 1
                layers.append({**entry, "action": "folded"})
            if gone:
                graph.nodes = [n for n in graph.nodes if id(n) not in gone]
        declined = sum(1 for layer in layers if layer["action"] == "declined")
        return PassResult(
            modified=folded > 0,
            stats={"batchnorms_folded": folded, "batchnorms_declined": declined},
            layers=layers,
        )

    def _apply(self, producer: gs.Node, bn: gs.Node, plan: _Plan, taken: set[str]) -> None:
        label = producer.name or producer.outputs[0].name
        for index, values in sorted(plan.inputs.items()):
            old = producer.inputs[index] if index < len(producer.inputs) and not producer.inputs[index].is_empty() else None
            base = old.name if old is not None else f"{label}_bias"
            # New tensors, never new values in the old arrays: graphsurgeon copies share them.
            const = gs.Constant(unique_name(f"{base}_{self.name.replace('-', '_')}", taken), values)
            while len(producer.inputs) < index:
                producer.inputs.append(gs.Variable.empty())
            if index < len(producer.inputs):
                producer.inputs[index] = const
            else:
                producer.inputs.append(const)
        producer.attrs.update(plan.attrs)
        out = bn.outputs[0]
        bn.inputs.clear()
        bn.outputs.clear()
        producer.outputs[0] = out
