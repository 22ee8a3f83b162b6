"""Cross-layer equalization (Nagel et al. 2019): rescale Conv → ReLU → Conv pairs so per-channel ranges match."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

#: Activations between the two convs that commute with a positive per-channel scale: f(s·x) = s·f(x) for
#: s > 0. ReLU6 / Clip (a fixed cap), HardSwish, Sigmoid do not, so a pair through them is not equalized.
POSITIVE_HOMOGENEOUS = frozenset({"Relu", "LeakyRelu", "PRelu"})
#: Rounds over all pairs: a layer in the middle of a stack (pointwise → depthwise → pointwise) is in two
#: pairs, so equalizing one pair disturbs the other; a few rounds settle it (AIMET iterates the same way).
MAX_ROUNDS = 32
#: A round whose scales all lie within this factor of 1 ends the iteration.
CONVERGED = 1e-4


@dataclass
class Pair:
    """Two convs where the second reads the first's output channel i as its input channel i, through an
    optional positive-homogeneous activation."""

    first: onnx.NodeProto
    second: onnx.NodeProto
    activation: str  # op type between them, "" for none
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.first.name} -> {self.second.name}"


def _group(node: onnx.NodeProto) -> int:
    return next((int(a.i) for a in node.attribute if a.name == "group"), 1)


def find_pairs(proto: onnx.ModelProto) -> list[Pair]:
    """The Conv → [Relu | LeakyRelu | PRelu] → Conv pairs of the main graph that can be equalized.

    Both convs read float32 initializer weights (and bias) no other node reads; the tensors between them
    have exactly one reader each and are not graph outputs; the second conv is a plain (group 1) or a
    depthwise conv (one group per input channel), so its input channel i meets only the first's output i.
    """
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}

    def only_reader(tensor: str) -> onnx.NodeProto | None:
        found = readers.get(tensor, [])
        return found[0] if len(found) == 1 and tensor not in outputs else None

    def owned(node: onnx.NodeProto) -> bool:
        names = [n for n in node.input[1:3] if n]
        return all(n in inits and inits[n].data_type == onnx.TensorProto.FLOAT and len(readers[n]) == 1
                   for n in names) and len(names) >= 1

    pairs = []
    for node in graph.node:
        if node.op_type != "Conv" or not owned(node):
            continue
        nxt = only_reader(node.output[0])
        activation = ""
        if nxt is not None and nxt.op_type in POSITIVE_HOMOGENEOUS:
            activation = nxt.op_type
            nxt = only_reader(nxt.output[0])
        if nxt is None or nxt.op_type != "Conv" or not owned(nxt) or nxt.input[0] != _last_output(node, activation,
                                                                                                   readers):
            continue
        c = inits[node.input[1]].dims[0]
        if _group(nxt) in (1, c):
            pairs.append(Pair(node, nxt, activation))
    return pairs


def _last_output(first: onnx.NodeProto, activation: str, readers: dict[str, list[onnx.NodeProto]]) -> str:
    return readers[first.output[0]][0].output[0] if activation else first.output[0]


def _input_ranges(w2: np.ndarray, group: int, channels: int) -> np.ndarray:
    """max |W2| over everything that reads input channel i, per i (plain: W2[:, i]; depthwise: its rows)."""
    if group == 1:
        return np.abs(w2).max(axis=(0, *range(2, w2.ndim)))
    return np.abs(w2.reshape(channels, -1)).max(axis=1)


def _scale_input(w2: np.ndarray, group: int, s: np.ndarray) -> np.ndarray:
    if group == 1:
        return w2 * s.reshape(1, -1, *([1] * (w2.ndim - 2)))
    mult = w2.shape[0] // s.size
    return w2 * np.repeat(s, mult).reshape(-1, *([1] * (w2.ndim - 1)))


def _spread(r: np.ndarray) -> float:
    """max/min of per-channel ranges (channels with range 0 left out): 1 means equal ranges."""
    live = r[r > 0]
    return float(live.max() / live.min()) if live.size else 1.0


def equalize(proto: onnx.ModelProto, pairs: list[Pair]) -> onnx.ModelProto:
    """A copy of ``proto`` with each pair's weights rescaled; lossless in exact arithmetic.

    Channel i of the first conv (weight rows and bias) is divided by s_i and input channel i of the second
    multiplied by s_i, with s_i = sqrt(r1_i / r2_i) (r1_i: range of the first's output-channel weights,
    r2_i: range of the second's input-channel weights), so both ranges become sqrt(r1_i · r2_i).
    Each pair's ``figures`` get the range spreads (max/min over channels) before and after.
    """
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    inits = {t.name: t for t in out.graph.initializer}
    arrays = {name: numpy_helper.to_array(inits[name]).astype(np.float64)
              for p in pairs for node in (p.first, p.second) for name in node.input[1:3] if name}
    for p in pairs:
        w1, w2 = arrays[p.first.input[1]], arrays[p.second.input[1]]
        r1 = np.abs(w1.reshape(w1.shape[0], -1)).max(axis=1)
        r2 = _input_ranges(w2, _group(p.second), w1.shape[0])
        p.figures.update({"activation": p.activation or "none", "range_spread_first_before": round(_spread(r1), 3),
                          "range_spread_second_before": round(_spread(r2), 3)})
    for _ in range(MAX_ROUNDS):
        largest = 0.0
        for p in pairs:
            w1, w2 = arrays[p.first.input[1]], arrays[p.second.input[1]]
            group = _group(p.second)
            r1 = np.abs(w1.reshape(w1.shape[0], -1)).max(axis=1)
            r2 = _input_ranges(w2, group, w1.shape[0])
            s = np.where((r1 > 0) & (r2 > 0), np.sqrt(r1 / np.where(r2 > 0, r2, 1.0)), 1.0)
            arrays[p.first.input[1]] = w1 / s.reshape(-1, *([1] * (w1.ndim - 1)))
            if len(p.first.input) > 2 and p.first.input[2]:
                arrays[p.first.input[2]] = arrays[p.first.input[2]] / s
            arrays[p.second.input[1]] = _scale_input(w2, group, s)
            largest = max(largest, float(np.abs(np.log(s)).max()) if s.size else 0.0)
        if largest < CONVERGED:
            break
    for p in pairs:
        w1, w2 = arrays[p.first.input[1]], arrays[p.second.input[1]]
        r1 = np.abs(w1.reshape(w1.shape[0], -1)).max(axis=1)
        r2 = _input_ranges(w2, _group(p.second), w1.shape[0])
        p.figures.update({"range_spread_first_after": round(_spread(r1), 3),
                          "range_spread_second_after": round(_spread(r2), 3)})
    for name, array in arrays.items():
        inits[name].CopyFrom(numpy_helper.from_array(array.astype(np.float32), name))
    return out
