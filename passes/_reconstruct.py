"""Reconstruction after structured pruning: refit the layers downstream of removed channels on real data.

Channel pruning by reconstruction (He et al. 2017, ThiNet): once channels are gone, every Conv/Gemm/MatMul
whose input changed is refit by least squares so that its output on the pruned model's actual input
matches the output the unpruned model gave on the same samples (for the output channels it keeps). Layers
are refit in graph order, each on the input the already-refit layers before it produce, so a refit also
absorbs the error accumulated upstream. The shared machinery (``nnopt.analysis.refit``) validates each
refit on samples it was not fitted on and keeps the sliced weights where the refit does not help.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from nnopt.analysis.activations import channel_rows, collect_activations, conv_patch_rows
from nnopt.analysis.refit import MAX_FIT_ROWS, fit_figures, refit_linear
from nnopt.errors import first_line
from nnopt.ir.constants import constant_values
from nnopt.ir.model import Model
from nnopt.ir.walk import is_onnx_op
from nnopt.pipeline.base import PassContext

#: Keep(tensor) → the mask of its original channels that survive pruning (all-true of length 1: untouched).
KeepMask = Callable[[gs.Tensor], np.ndarray]


@dataclass
class Layer:
    """A linear layer whose input lost channels (or lies downstream of a layer that did): a refit target.

    ``p`` is the layer's map as the k × n matrix of ``Z·P`` (Z: input rows, or Conv patches), for the
    weights as pruning left them; ``bias`` the pruned bias (zeros if none).
    """

    node: gs.Node
    kind: str  # "Conv", "Gemm" or "MatMul"
    p: np.ndarray
    bias: np.ndarray
    kept_out: np.ndarray  # mask over the original output channels
    dtype: np.dtype  # the weight's own float type, kept by the refit
    weight_shape: tuple[int, ...]
    rows: list[np.ndarray] = field(default_factory=list)  # per sample, the output rows fitted on
    targets: list[np.ndarray] = field(default_factory=list)  # per sample, original output rows (kept, − bias)

    @property
    def input_name(self) -> str:
        return str(self.node.inputs[0].name)

    @property
    def output_name(self) -> str:
        return str(self.node.outputs[0].name)

    def rows_of(self, value: np.ndarray) -> np.ndarray:
        """(rows × channels) of one of this layer's outputs: channels on axis 1 for Conv, last otherwise."""
        if self.kind == "Conv":
            return channel_rows(value)
        return np.asarray(value, dtype=np.float64).reshape(-1, value.shape[-1])

    def input_rows(self, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Z for the given output rows: Conv input patches, or the input's rows for Gemm/MatMul."""
        if self.kind == "Conv":
            return conv_patch_rows(x, _attrs(self.node), rows)
        return np.asarray(x, dtype=np.float64).reshape(-1, x.shape[-1])[rows]


def _attrs(node: gs.Node) -> dict[str, Any]:
    attrs = dict(node.attrs)
    if "kernel_shape" not in attrs:
        attrs["kernel_shape"] = list(node.inputs[1].shape[2:])
    return attrs


def changed_layers(model: Model, keep: KeepMask) -> list[Layer]:
    """The main-graph layers pruning left with a different input, in graph order, as refit targets.

    Call after the pruning edits: the weights read are the sliced ones. A tensor changed if it lost
    channels or is computed from one that did. Layers that cannot carry a refit are skipped: a weight
    shared with another node, a Conv with groups, a Gemm with transA or alpha/beta ≠ 1.
    """
    changed: set[int] = set()
    layers: list[Layer] = []
    for node in model.graph.nodes:
        inputs_changed = any(id(t) in changed or not keep(t).all() for t in node.inputs)
        if inputs_changed or any(not keep(t).all() for t in node.outputs):
            changed.update(id(t) for t in node.outputs)
        if inputs_changed and is_onnx_op(node):
            layer = _layer(node, keep)
            if layer is not None:
                layers.append(layer)
    return layers


def _layer(node: gs.Node, keep: KeepMask) -> Layer | None:
    if node.op not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2 or len(node.outputs) != 1:
        return None
    weight = node.inputs[1]
    values = constant_values(weight)
    if values is None or values.dtype.kind != "f" or len(weight.outputs) != 1:
        return None
    bias_tensor = node.inputs[2] if len(node.inputs) > 2 else None
    bias = constant_values(bias_tensor) if bias_tensor is not None else None
    if bias_tensor is not None and (bias is None or len(bias_tensor.outputs) != 1):
        return None
    w = np.asarray(values, dtype=np.float64)
    if node.op == "Conv":
        if node.attrs.get("group", 1) != 1:
            return None
        p = w.reshape(w.shape[0], -1).T
    elif node.op == "Gemm":
        if node.attrs.get("transA", 0) or node.attrs.get("alpha", 1.0) != 1.0 or node.attrs.get("beta", 1.0) != 1.0:
            return None
        p = w.T if node.attrs.get("transB", 0) else w
    else:
        if w.ndim != 2:
            return None
        p = w
    n = p.shape[1]
    if bias is not None and np.asarray(bias).size not in (1, n):
        return None
    b = np.zeros(n) if bias is None else np.broadcast_to(np.asarray(bias, dtype=np.float64).reshape(-1), (n,)).copy()
    kept = keep(node.outputs[0])
    kept = np.ones(n, dtype=bool) if kept.size == 1 and n != 1 else kept
    if int(kept.sum()) != n:
        return None
    return Layer(node, node.op, p, b, kept, np.asarray(values).dtype, tuple(np.shape(values)))


def reconstruct(
    model: Model,
    ctx: PassContext,
    teacher: onnx.ModelProto,
    layers: Sequence[Layer],
    pass_name: str,
    namer: Callable[[str], str],
) -> dict[str, dict[str, Any]]:
    """Refit each layer on ``ctx.samples``; returns node name → its report figures (fit errors, rows).

    ``teacher`` is the model before pruning (its outputs are the targets). A layer whose refit does not
    lower the held-out error keeps its pruned weights; where onnxruntime cannot run the data, every layer
    keeps them and its figures say why.
    """
    if not layers or not ctx.samples:
        return {}
    cap = max(1, MAX_FIT_ROWS // len(ctx.samples))
    by_output = {layer.output_name: layer for layer in layers}

    def targets(name: str, index: int, value: np.ndarray) -> np.ndarray:
        layer = by_output[name]
        rows = layer.rows_of(value)
        pick = np.arange(rows.shape[0])
        if rows.shape[0] > cap:
            pick = np.sort(ctx.rng(f"{pass_name}:reconstruct:{name}:{index}").choice(rows.shape[0], cap, replace=False))
        layer.rows.append(pick)
        return rows[pick][:, layer.kept_out] - layer.bias

    figures: dict[str, dict[str, Any]] = {}
    try:
        for name, values in collect_activations(teacher, list(by_output), ctx.samples, reduce=targets).items():
            by_output[name].targets = values
    except Exception as exc:  # boundary: onnxruntime on the user's model and data
        note = f"the reference data did not run: {first_line(exc, 160)}"
        return {layer.node.name: {"fit": "weights", "fit_note": note} for layer in layers}
    for done, layer in enumerate(layers):
        ctx.progress(done, len(layers), layer.node.name)
        try:
            zs = _input_rows(model, layer, ctx.samples)
        except Exception as exc:  # boundary: onnxruntime on the pruned model
            figures[layer.node.name] = {"fit": "weights", "fit_note": f"the pruned model did not run: {first_line(exc, 160)}"}
            continue
        pairs = list(zip(zs, layer.targets))
        refit = refit_linear(pairs, layer.p, layer.bias, layer.kind != "MatMul", ctx.rng(f"{pass_name}:refit:{layer.node.name}"))
        if refit.used:
            _write(layer, refit.p, refit.delta, namer)
        figures[layer.node.name] = fit_figures(refit)
    return figures


def _input_rows(model: Model, layer: Layer, samples: Sequence[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """Per sample, Z: the layer's input on the pruned model as it is now, reduced to the fitted rows."""

    def rows(name: str, index: int, value: np.ndarray) -> np.ndarray:
        return layer.input_rows(value, layer.rows[index])

    name = layer.input_name
    if name in samples[0]:
        return [rows(name, i, np.asarray(s[name])) for i, s in enumerate(samples)]
    return collect_activations(model.to_proto(), [name], samples, reduce=rows)[name]


def _write(layer: Layer, p: np.ndarray, delta: np.ndarray | None, namer: Callable[[str], str]) -> None:
    """Give the layer new weight (and bias) constants holding the refit; the old arrays are never written."""
    node = layer.node
    if layer.kind == "Conv":
        values = p.T.reshape(layer.weight_shape)
    elif layer.kind == "Gemm" and node.attrs.get("transB", 0):
        values = p.T
    else:
        values = p
    node.inputs[1] = gs.Constant(namer(node.inputs[1].name), np.ascontiguousarray(values.astype(layer.dtype)))
    if delta is None:
        return
    bias = (layer.bias + delta).astype(layer.dtype)
    if len(node.inputs) > 2:
        node.inputs[2] = gs.Constant(namer(node.inputs[2].name), bias)
    else:
        node.inputs.append(gs.Constant(namer(f"{node.name or node.outputs[0].name}_bias"), bias))


def output_error_scores(
    model: Model, tracks: dict[int, Any], label_count: int, ctx: PassContext
) -> np.ndarray | None:
    """Per channel label, the error its removal alone causes in the layers that read it, on ``ctx.samples``.

    For a layer y = Σ_j W[:, j]·x_j, dropping input j changes the output by W[:, j]·x_j; its expected
    squared size is taken as E[x_j²]·‖W[:, j]‖² (cross terms between positions ignored), summed over
    every Conv (group 1) / Gemm / MatMul that reads the channel. ThiNet and He et al. pick channels by this
    reconstruction error rather than by the producing filter's norm: a large filter whose output is
    nearly always zero after its activation, or that the next layer barely weighs, goes first.
    Returns None when the data does not run.
    """
    readers = []
    for node in model.graph.nodes:
        if node.op not in ("Conv", "Gemm", "MatMul") or not is_onnx_op(node) or len(node.inputs) < 2:
            continue
        track = tracks.get(id(node.inputs[0]))
        weight = constant_values(node.inputs[1])
        if track is None or weight is None or (node.op == "Conv" and node.attrs.get("group", 1) != 1):
            continue
        readers.append((node, track, _column_energy(node, np.asarray(weight, dtype=np.float64))))
    if not readers:
        return None
    axes = {str(node.inputs[0].name): track.axis for node, track, _ in readers}

    def mean_square(name: str, index: int, value: np.ndarray) -> np.ndarray:
        moved = np.moveaxis(np.asarray(value, dtype=np.float64), axes[name], 0)
        return np.mean(moved.reshape(moved.shape[0], -1) ** 2, axis=1)

    try:
        energy = collect_activations(model.to_proto(), list(axes), ctx.samples, reduce=mean_square)
    except Exception:  # boundary: onnxruntime on the user's model and data
        return None
    scores = np.zeros(label_count)
    for node, track, columns in readers:
        x_sq = np.mean(energy[str(node.inputs[0].name)], axis=0)
        if x_sq.shape != columns.shape or columns.shape != track.labels.shape:
            continue
        np.add.at(scores, track.labels, x_sq * columns)
    return scores


def _column_energy(node: gs.Node, w: np.ndarray) -> np.ndarray:
    """‖W[:, j]‖² per input position j of a Conv (channel), Gemm or MatMul (feature)."""
    if node.op == "Conv":
        return np.sum(np.moveaxis(w, 1, 0).reshape(w.shape[1], -1) ** 2, axis=1)
    if node.op == "Gemm" and node.attrs.get("transB", 0):
        return np.sum(w**2, axis=0)
    return np.sum(w.reshape(w.shape[0], -1) ** 2, axis=1)
