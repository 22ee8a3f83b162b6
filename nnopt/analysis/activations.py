"""Intermediate tensors of a model on reference inputs, for data-aware passes (least-squares refits)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx

from nnopt.ir.model import Model
from nnopt.runtime import make_session, run_model


def collect_activations(
    model: Model | onnx.ModelProto,
    names: Sequence[str],
    samples: Sequence[dict[str, np.ndarray]],
) -> dict[str, list[np.ndarray]]:
    """Run the model on each sample and return the values of the named main-graph tensors.

    The named tensors are added as extra graph outputs of a copy of the model, so one onnxruntime run per
    sample yields all of them; the model itself is not changed. Returns name → one array per sample.
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
            values[name].append(np.asarray(value))
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
