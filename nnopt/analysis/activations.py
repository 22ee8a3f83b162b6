"""Intermediate tensors of a model on reference inputs, for data-aware passes (least-squares refits)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx

from nnopt.ir.model import Model
from nnopt.runtime import make_session, run_model


def collect_activations(
    model: Model | onnx.ModelProto,
    names: Sequence[str],
    samples: Sequence[dict[str, np.ndarray]],
    reduce: Callable[[str, int, np.ndarray], np.ndarray] | None = None,
) -> dict[str, list[np.ndarray]]:
    """Run the model on each sample and return the values of the named main-graph tensors.

    The named tensors are added as extra graph outputs of a copy of the model, so one onnxruntime run per
    sample yields all of them; the model itself is not changed. Returns name → one array per sample.
    ``reduce(name, sample_index, value)``, when given, is kept instead of each value as it arrives: a pass
    that needs a few rows of many large activations never holds them all.
    """
    proto = model.to_proto() if isinstance(model, Model) else model
    wanted = list(dict.fromkeys(names))
    if not wanted or not samples:
        return {name: [] for name in wanted}
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    present = {o.name for o in probe.graph.output}
    # NOTE: an output needs only a name for onnxruntime; type and shape come from the producing node.
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in wanted if n not in present)
    sess = make_session(probe)
    values: dict[str, list[np.ndarray]] = {name: [] for name in wanted}
    for feeds in samples:
        outs = run_model(sess, feeds, wanted)
        for name, value in zip(wanted, outs):
            value = np.asarray(value)
            values[name].append(value if reduce is None else reduce(name, len(values[name]), value))
    return values


def layer_inputs(
    model: Model | onnx.ModelProto, names: Sequence[str], samples: Sequence[dict[str, np.ndarray]]
) -> dict[str, list[np.ndarray]]:
    """Values of main-graph tensors on the reference samples: graph inputs from the feeds, others by a run.

    ``model`` may be the run's cached export (it is copied, never changed).
    """
    feeds = samples[0].keys() if samples else ()
    direct = [n for n in names if n in feeds]
    values = collect_activations(model, [n for n in names if n not in feeds], samples)
    values.update({n: [np.asarray(s[n]) for s in samples] for n in direct})
    return values


def run_convs(
    xs: Sequence[np.ndarray], convs: Sequence[tuple[np.ndarray, dict[str, Any]]], opset: int
) -> list[list[np.ndarray]]:
    """Run Conv(x, weight, **attrs) for each conv on each sample in onnxruntime; outputs per sample, per conv.

    A one-input model built in memory: onnxruntime applies pads, auto_pad, strides, dilations and groups
    exactly as the rewritten model will.
    """
    dtype = xs[0].dtype
    elem = onnx.helper.np_dtype_to_tensor_dtype(dtype)
    x_info = onnx.helper.make_tensor_value_info("x", elem, [f"d{i}" for i in range(xs[0].ndim)])
    nodes, inits, outs = [], [], []
    for i, (weight, attrs) in enumerate(convs):
        inits.append(onnx.numpy_helper.from_array(np.ascontiguousarray(weight.astype(dtype)), f"w{i}"))
        nodes.append(onnx.helper.make_node("Conv", ["x", f"w{i}"], [f"y{i}"], **attrs))
        outs.append(onnx.helper.make_tensor_value_info(f"y{i}", elem, None))
    opsets = [onnx.helper.make_opsetid("", opset)]
    graph = onnx.helper.make_graph(nodes, "lowrank_probe", [x_info], outs, inits)
    proto = onnx.helper.make_model(
        graph, opset_imports=opsets, ir_version=onnx.helper.find_min_ir_version_for(opsets)
    )
    sess = make_session(proto)
    return [sess.run(None, {"x": x}) for x in xs]


def channel_rows(y: np.ndarray) -> np.ndarray:
    """(N, C, *spatial) → (N·spatial, C) in float64: one row per output position."""
    return np.moveaxis(np.asarray(y, dtype=np.float64), 1, -1).reshape(-1, y.shape[1])


def conv_pads(x_spatial: Sequence[int], attrs: dict[str, Any]) -> list[tuple[int, int]]:
    """(begin, end) padding per spatial axis of a Conv on an input of spatial size ``x_spatial``.

    ONNX's rules: explicit ``pads`` under NOTSET, none under VALID, and under SAME_UPPER / SAME_LOWER
    the total that keeps ceil(in / stride) outputs, the odd unit at the end (UPPER) or the start (LOWER).
    """
    kernel = list(attrs["kernel_shape"])
    rank = len(kernel)
    strides = list(attrs.get("strides", [1] * rank))
    dilations = list(attrs.get("dilations", [1] * rank))
    auto_pad = attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad == "VALID":
        return [(0, 0)] * rank
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for size, k, s, d in zip(x_spatial, kernel, strides, dilations):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            pads.append((small, large) if auto_pad == "SAME_UPPER" else (large, small))
        return pads
    explicit = list(attrs.get("pads", [0] * (2 * rank)))
    return list(zip(explicit[:rank], explicit[rank:]))


def conv_patch_rows(x: np.ndarray, attrs: dict[str, Any], rows: np.ndarray | None = None) -> np.ndarray:
    """The input patches a group-1 Conv reads (im2col), one row per output position, in float64.

    ``x`` is (N, C, *spatial). Rows follow ``channel_rows`` of the Conv's output (batch, then spatial
    positions in C order) and columns the flattening of its weight (channel, then kernel offsets), so
    ``patches @ W.reshape(C_out, -1).T`` is the Conv's output before its bias. ``rows`` picks a subset of
    the rows without building the others.
    """
    kernel = list(attrs["kernel_shape"])
    rank = len(kernel)
    strides = list(attrs.get("strides", [1] * rank))
    dilations = list(attrs.get("dilations", [1] * rank))
    padded = np.pad(x, [(0, 0), (0, 0), *conv_pads(x.shape[2:], attrs)])
    spans = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    view = np.lib.stride_tricks.sliding_window_view(padded, spans, axis=tuple(range(2, 2 + rank)))
    # view: (N, C, *window positions, *span offsets) → stride the positions, dilate the offsets.
    view = view[(slice(None), slice(None), *(slice(None, None, s) for s in strides), *(slice(None, None, d) for d in dilations))]
    positions = view.shape[2 : 2 + rank]
    view = np.moveaxis(view, 1, 1 + rank)  # (N, *positions, C, *kernel)
    flat = view.reshape(-1, *view.shape[1 + rank :]) if rows is None else None
    if flat is None:
        index = np.unravel_index(np.asarray(rows), (x.shape[0], *positions))
        flat = view[index]
    return np.asarray(flat, dtype=np.float64).reshape(flat.shape[0], -1)
