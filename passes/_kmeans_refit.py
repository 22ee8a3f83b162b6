"""kmeans centroid refit: with the assignments fixed, fit the centroids to the layer's outputs by least squares."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import onnx_graphsurgeon as gs

from nnopt.analysis.activations import channel_rows, collect_activations, conv_patch_rows
from nnopt.analysis.refit import refit_linear
from nnopt.ir.constants import constant_values

#: At most this many samples feed the refit (each is one run of the model, before the rewrite).
MAX_SAMPLES = 32
#: Output positions kept per sample (seeded subset): Z has rows × channels × k entries per sample.
ROWS_PER_SAMPLE = 512
#: Layers with more unknowns than this (output channels × centroids) are not refit: at 8 bits the weight
#: error is already small, and the per-channel problems would cost more than the clustering.
MAX_UNKNOWNS = 1 << 14


#: A planned layer's key (the caller's: e.g. id() of the weight tensor).
K = TypeVar("K")


@dataclass
class Layer:
    """A layer whose weight kmeans shares and whose outputs the refit can see."""

    node: gs.Node
    x: str  # the input it multiplies the weight with
    y: str  # its output
    weight: np.ndarray  # the original weight
    bias: np.ndarray  # its bias per output channel (zeros without one)
    bias_tensor: gs.Constant | None  # where a correction goes (None: no bias that only this node reads)
    channels: int
    groups: int
    alpha: float
    figures: dict[str, Any] = field(default_factory=dict)


def plan(node: gs.Node, weight: np.ndarray, readers: int) -> Layer | str:
    """The refit layer ``node`` is (reading ``weight`` as its input 1), or why it cannot be refit."""
    if readers != 1:
        return "the weight has several readers"
    attrs = node.attrs
    x, y = node.inputs[0].name, node.outputs[0].name
    if node.op == "Conv":
        channels, groups, alpha = weight.shape[0], int(attrs.get("group", 1)), 1.0
    elif node.op == "Gemm" and not int(attrs.get("transA", 0)) and weight.ndim == 2:
        channels, groups, alpha = weight.shape[0 if int(attrs.get("transB", 0)) else 1], 1, float(attrs.get("alpha", 1.0))
    elif node.op == "MatMul" and weight.ndim == 2:
        channels, groups, alpha = weight.shape[1], 1, 1.0
    else:
        return f"refit covers Conv, Gemm (transA=0) and MatMul with a 2-D weight, not this {node.op}"
    bias, tensor = np.zeros(channels), None
    if len(node.inputs) > 2 and not node.inputs[2].is_empty():
        values = constant_values(node.inputs[2])
        beta = float(attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
        if values is None or np.size(values) != channels or beta != 1.0:
            return "its bias is not a constant of one value per output channel"
        bias = np.asarray(values, np.float64).reshape(-1)
        own = isinstance(node.inputs[2], gs.Constant) and len(node.inputs[2].outputs) == 1
        tensor = node.inputs[2] if own else None
    return Layer(node, x, y, weight, bias, tensor, channels, groups, alpha)


def collect_planned(model: Any, planned: dict[K, Layer], samples: Sequence[dict[str, np.ndarray]], seed: int,
                    ) -> dict[K, tuple[Layer, list[np.ndarray], list[np.ndarray]]]:
    """``collect`` for the planned layers (key -> layer), each with its input and output rows; a layer whose
    input tensor another planned layer reads too is left out (it would need two sets of rows)."""
    inputs = [layer.x for layer in planned.values()]
    kept = {key: layer for key, layer in planned.items() if inputs.count(layer.x) == 1}
    if not kept:
        return {}
    acts = collect(model, list(kept.values()), samples, seed)
    return {key: (layer, *acts[layer.y]) for key, layer in kept.items()}


def collect(model: Any, layers: Sequence[Layer], samples: Sequence[dict[str, np.ndarray]], seed: int,
            ) -> dict[str, tuple[list[np.ndarray], list[np.ndarray]]]:
    """Per layer (by output name) its input rows (patches for a Conv) and output rows, per sample: a seeded
    subset of the rows of each activation.

    One run of the (unchanged) model per sample; only the chosen rows of each activation are kept, except
    for a tensor that is one layer's output and another's input, kept whole until both are taken from it.
    """
    by_x = {layer.x: layer for layer in layers}
    by_y = {layer.y: layer for layer in layers}
    both = set(by_x) & set(by_y)
    used = samples[:MAX_SAMPLES]
    feeds = used[0].keys() if used else ()

    def rows_for(layer: Layer, index: int, count: int) -> np.ndarray:
        rng = np.random.default_rng([seed, index, count])
        return np.sort(rng.choice(count, size=min(count, ROWS_PER_SAMPLE), replace=False))

    def as_y(layer: Layer, index: int, value: np.ndarray) -> np.ndarray:
        rows = _output_rows(layer, value)
        return rows[rows_for(layer, index, rows.shape[0])]

    def reduce(name: str, index: int, value: np.ndarray) -> np.ndarray:
        if name in both:
            return value
        if name in by_y:
            return as_y(by_y[name], index, value)
        return _input_rows(by_x[name], value, rows_for)(index)

    values = collect_activations(model, [n for n in (*by_x, *by_y) if n not in feeds], used, reduce=reduce)
    for name in by_x:
        if name in feeds:
            values[name] = [np.asarray(s[name]) for s in used]
    out = {}
    for layer in layers:
        xs = [v if layer.x not in both and layer.x not in feeds else _input_rows(layer, v, rows_for)(i)
              for i, v in enumerate(values[layer.x])]
        ys = [v if layer.y not in both else as_y(layer, i, v) for i, v in enumerate(values[layer.y])]
        out[layer.y] = (xs, ys)
    return out


def _output_rows(layer: Layer, y: np.ndarray) -> np.ndarray:
    if layer.node.op == "Conv":
        return channel_rows(y)
    return np.asarray(y, np.float64).reshape(-1, layer.channels)


def _input_rows(layer: Layer, x: np.ndarray, rows_for: Any) -> Any:
    """A function of the sample index giving the layer's input rows: [rows, groups, values per group]."""
    def pick(index: int) -> np.ndarray:
        if layer.node.op != "Conv":
            rows = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
            return rows[rows_for(layer, index, rows.shape[0])][:, None, :]
        attrs = {k: v for k, v in layer.node.attrs.items() if k != "group"}
        attrs.setdefault("kernel_shape", list(layer.weight.shape[2:]))
        per_group = x.shape[1] // layer.groups
        probe = conv_patch_rows(x[:, :1], attrs)  # one channel's patches: only for the row count
        chosen = rows_for(layer, index, probe.shape[0])
        return np.stack([conv_patch_rows(x[:, g * per_group:(g + 1) * per_group], attrs, chosen)
                         for g in range(layer.groups)], axis=1)
    return pick


def channel_weights(layer: Layer, array: np.ndarray) -> np.ndarray:
    """A weight-shaped array as [output channel, values it multiplies with its group's input rows]."""
    if layer.node.op == "Conv":
        return array.reshape(array.shape[0], -1)
    if layer.node.op == "Gemm" and int(layer.node.attrs.get("transB", 0)):
        return array
    return array.T


def refit(layer: Layer, codes: np.ndarray, codebook: np.ndarray, per_channel: bool, xs: list[np.ndarray],
          ys: list[np.ndarray], seed: int) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """New codebook [codebooks, k], bias correction (or None) and whether either changes anything.

    ``codes`` is weight-shaped. Centroids that are exactly 0 stay 0 (pruned weights stay pruned). Each
    output channel (per_channel) or the whole tensor is one ridge least-squares problem in its centroids
    (``refit_linear``: fitted on the even samples, kept only where the odd ones' output error drops, then
    fitted on all). ``layer.figures`` get the odd samples' relative output error over all channels with
    the k-means codebook and with the even samples' fit (the refit kept where it lowered it).
    """
    ch_codes = channel_weights(layer, codes)
    rng = np.random.default_rng(seed)
    per_group = layer.channels // layer.groups
    targets = [y - layer.bias[None, :] for y in ys]
    held = [i for i in range(len(ys)) if i % 2 == 1] if len(ys) >= 2 else []
    new = codebook.copy()
    delta = np.zeros(layer.channels)
    corrected = moved = False
    sq_before = sq_after = 0.0
    if per_channel:
        for o in range(layer.channels):
            free = np.flatnonzero(codebook[o] != 0.0)
            onehot = (ch_codes[o][:, None] == free[None, :]).astype(np.float64)
            pairs = [(layer.alpha * (x[:, o // per_group, :] @ onehot), t[:, o:o + 1]) for x, t in zip(xs, targets)]
            result = refit_linear(pairs, codebook[o, free][:, None], layer.bias[o:o + 1],
                                  layer.bias_tensor is not None, rng)
            norm2 = sum(float(np.sum(ys[i][:, o] ** 2)) for i in held)
            sq_before += result.figures["heldout_error_weight_fit"] ** 2 * norm2
            sq_after += min(result.figures["heldout_error_refit"], result.figures["heldout_error_weight_fit"]) ** 2 * norm2
            if result.used:
                new[o, free], moved = result.p[:, 0], True
                if result.delta is not None:
                    delta[o], corrected = float(result.delta[0]), True
    else:
        free = np.flatnonzero(codebook[0] != 0.0)
        pairs = []
        for x, t in zip(xs, targets):
            z = np.concatenate([layer.alpha * (x[:, o // per_group, :] @ (ch_codes[o][:, None] == free[None, :]))
                                for o in range(layer.channels)])
            pairs.append((z, t.T.reshape(-1, 1)))
        # NOTE: the per-channel means of the layer's output (zero here) make its norm the same as ‖y‖.
        result = refit_linear(pairs, codebook[0, free][:, None], np.zeros(1), False, rng)
        norm2 = sum(float(np.sum(ys[i] ** 2)) for i in held)
        sq_before = result.figures["heldout_error_weight_fit"] ** 2 * norm2
        sq_after = min(result.figures["heldout_error_refit"], result.figures["heldout_error_weight_fit"]) ** 2 * norm2
        if result.used:
            new[0, free], moved = result.p[:, 0], True
        if layer.bias_tensor is not None:
            delta, gain = _channel_shift(layer, ch_codes, new[0], xs, targets, held)
            if gain > 0:
                corrected, sq_after = True, max(sq_after - gain, 0.0)
    total = math.sqrt(max(sum(float(np.sum(ys[i] ** 2)) for i in held), 1e-300))
    layer.figures.update({"heldout_output_error_before": round(math.sqrt(sq_before) / total, 6),
                          "heldout_output_error_after": round(math.sqrt(sq_after) / total, 6)})
    return new, (delta if corrected else None), moved or corrected


def _channel_shift(layer: Layer, ch_codes: np.ndarray, table: np.ndarray, xs: list[np.ndarray],
                   targets: list[np.ndarray], held: list[int]) -> tuple[np.ndarray, float]:
    """A per-tensor codebook's bias correction: per output channel, the mean of the layer's output error on
    the even samples, kept where it lowers the odd samples' error; (correction fitted on all samples, the
    drop of the odd samples' squared error)."""
    per_group = layer.channels // layer.groups
    weights = table[ch_codes]  # [channels, values per channel]
    sums = {0: np.zeros(layer.channels), 1: np.zeros(layer.channels)}
    rows = {0: 0, 1: 0}
    for i, (x, t) in enumerate(zip(xs, targets)):
        out = np.stack([x[:, o // per_group, :] @ weights[o] for o in range(layer.channels)], axis=1)
        side = int(i in held)
        sums[side] += (t - layer.alpha * out).sum(axis=0)
        rows[side] += t.shape[0]
    fit = sums[0] / max(rows[0], 1)
    held_mean = sums[1] / max(rows[1], 1)
    # Σ over held rows of (r − δ)² − r² = n·(δ² − 2·δ·mean(r)), per channel.
    change = rows[1] * (fit ** 2 - 2.0 * fit * held_mean)
    keep = change < 0
    delta = np.where(keep, (sums[0] + sums[1]) / max(rows[0] + rows[1], 1), 0.0)
    return delta, float(-change[keep].sum())
