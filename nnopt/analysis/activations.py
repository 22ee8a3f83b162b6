"""Intermediate tensors of a model on reference inputs, for data-aware passes (least-squares refits)."""

from __future__ import annotations

from collections.abc import Sequence

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
