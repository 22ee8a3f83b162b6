"""Empirical bias correction of a QDQ model: fold each layer's mean output shift E[y_float − y_quant] into its bias."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from nnopt.passes import _qdq

#: At most this many calibration samples feed the correction (each costs one run of the float and of the
#: quantized model per round); a seeded half fits the shift, the other half validates it.
MAX_SAMPLES = 16
#: The float model's layer outputs on the samples are kept in memory up to this size (else run per wave).
FLOAT_CACHE_BYTES = 256 << 20
#: Op types whose int32 bias (input 2, a DequantizeLinear of an int32 initializer) carries the correction,
#: with the channel axis of their output.
BIAS_OPS: dict[str, int] = {"Conv": 1, "ConvTranspose": 1, "Gemm": -1}


@dataclass
class Layer:
    """One quantized layer whose int32 bias can take a correction."""

    node: str
    op_type: str
    float_out: str  # its output in the float model (before any activation the quantized model absorbed)
    quant_out: str  # its output in the quantized model (before its QuantizeLinear)
    bias: str  # the int32 initializer of its bias
    scale: np.ndarray  # the bias's scale (input scale × weight scale), per channel or one
    axis: int
    wave: int  # no layer of a wave is upstream of another of it: one run measures them all
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Stats:
    """Per-channel sums of d = y_float − y_quant over the rows of one half of the samples."""

    d: np.ndarray
    d2: np.ndarray
    ref2: float = 0.0
    rows: int = 0

    def add(self, ref: np.ndarray, got: np.ndarray, axis: int) -> None:
        r = np.moveaxis(np.asarray(ref, np.float64), axis, -1)
        diff = (r - np.moveaxis(np.asarray(got, np.float64), axis, -1)).reshape(-1, r.shape[-1])
        if self.d.size == 0:  # the channel count is known at the first sample
            self.d, self.d2 = np.zeros(diff.shape[1]), np.zeros(diff.shape[1])
        self.d += diff.sum(axis=0)
        self.d2 += np.einsum("ij,ij->j", diff, diff)
        self.ref2 += float(np.einsum("ij,ij->", r.reshape(diff.shape), r.reshape(diff.shape)))
        self.rows += diff.shape[0]

    def sq_error(self, delta: np.ndarray) -> float:
        """Σ (d − δ)² over the rows, from the sums alone."""
        return float(np.sum(self.d2 - 2.0 * delta * self.d + self.rows * delta * delta))


def find_layers(float_proto: onnx.ModelProto, qproto: onnx.ModelProto, eligible: set[str],
                ) -> tuple[list[Layer], list[tuple[str, str, str]]]:
    """The layers of ``qproto`` among ``eligible`` whose bias can carry a correction, and the others as
    (node, op type, why not)."""
    inits = {t.name: t for t in qproto.graph.initializer}
    producer = {o: n for n in qproto.graph.node for o in n.output}
    float_nodes = {n.name: n for n in float_proto.graph.node}
    layers: list[Layer] = []
    declined: list[tuple[str, str, str]] = []
    readers: dict[str, int] = {}
    for node in qproto.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    wave_of: dict[str, int] = {}  # per tensor: the corrected layers upstream of it, at most
    for node in qproto.graph.node:  # topological: the QDQ graph is sorted after placement
        level = max((wave_of.get(x, 0) for x in node.input), default=0)
        found = _layer(node, inits, producer, float_nodes, readers, level) if node.name in eligible else None
        if isinstance(found, Layer):
            layers.append(found)
            level += 1
        elif isinstance(found, str):
            declined.append((node.name, node.op_type, found))
        wave_of.update((out, level) for out in node.output)
    return layers, declined


def _layer(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto], producer: dict[str, onnx.NodeProto],
           float_nodes: dict[str, onnx.NodeProto], readers: dict[str, int], wave: int) -> Layer | str | None:
    """The correctable layer ``node`` is, or why it is not (None: not a weighted layer at all)."""
    if node.op_type not in BIAS_OPS:
        return "no bias input to carry a correction" if node.op_type == "MatMul" else None
    dq = producer.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits or dq.input[1] not in inits:
        return "no int32 bias (a DequantizeLinear of an initializer) to carry a correction"
    bias = inits[dq.input[0]]
    if bias.data_type != onnx.TensorProto.INT32 or readers.get(dq.input[0], 0) != 1:
        return "its bias is not an int32 initializer of its own"
    reference = float_nodes.get(node.name)
    if reference is None or not reference.output or not node.output[0]:
        return "no float counterpart of its output"
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64).reshape(-1)
    return Layer(node.name, node.op_type, reference.output[0], node.output[0], bias.name, scale,
                 BIAS_OPS[node.op_type], wave)


def _probe(qproto: onnx.ModelProto, layers: list[Layer]) -> tuple[Any, dict[str, np.ndarray]]:
    """A session of ``qproto`` whose corrected biases are graph inputs (one session for every wave), every
    layer output an extra output; and the current int32 biases by name."""
    probe = onnx.ModelProto()
    probe.CopyFrom(qproto)
    names = {layer.bias for layer in layers}
    biases = {t.name: numpy_helper.to_array(t).copy() for t in probe.graph.initializer if t.name in names}
    kept = [t for t in probe.graph.initializer if t.name not in names]
    del probe.graph.initializer[:]
    probe.graph.initializer.extend(kept)
    probe.graph.input.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT32, list(array.shape))
                             for name, array in sorted(biases.items()))
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in dict.fromkeys(x.quant_out for x in layers)
                              if n not in present)
    from nnopt.runtime import make_session

    return make_session(probe), biases


@dataclass
class Outcome:
    """What ``correct`` gave: the corrected model, how many layers kept a correction, the held-out samples."""

    qproto: onnx.ModelProto
    corrected: int
    held: list[int]


def correct(float_proto: onnx.ModelProto, qproto: onnx.ModelProto, layers: list[Layer],
            samples: Sequence[dict[str, np.ndarray]], validate: bool, seed: int) -> Outcome:
    """``qproto`` with corrected int32 biases.

    Wave by wave, upstream layers first (so each layer's shift is measured with the corrections above it
    in place; correcting all layers at once over-corrects, since a layer also takes the shift it inherits
    from upstream, and did not converge on ppocr_cls): run the quantized model on the samples, take each
    output channel's mean shift against float and add it to the int32 bias (rounded to its scale). With
    ``validate``, the samples are split in two seeded halves: a layer's shift is fitted on one and taken
    only if it lowers the layer's output error on the other (the shift taken is then estimated on all);
    otherwise every layer takes it. Each layer's ``figures`` get held-out figures (relative output error
    and RMS mean shift of its output, before and after).
    """
    used = list(samples[:MAX_SAMPLES])
    order = np.random.default_rng(seed).permutation(len(used))
    held = sorted(int(i) for i in order[len(used) // 2:]) if validate and len(used) >= 2 else []
    in_held = set(held)
    session, biases = _probe(qproto, layers)
    floats = _FloatOutputs(float_proto, layers, used, [i for i in range(len(used)) if i not in in_held], held)
    done = 0
    for wave in sorted({x.wave for x in layers}):
        members = [x for x in layers if x.wave == wave]
        halves = {x.node: (_Stats(np.zeros(0), np.zeros(0)), _Stats(np.zeros(0), np.zeros(0))) for x in members}
        for c, (indices, feeds) in enumerate(floats.chunks):
            ref = floats.get(c, members)
            got = _qdq.run_probe(session, [x.quant_out for x in members], {**feeds, **biases})
            for x in members:
                halves[x.node][int(indices[0] in in_held)].add(ref[x.float_out], got[x.quant_out], x.axis)
        for x in members:
            done += _correct_layer(x, *halves[x.node], biases, bool(held))
    out = onnx.ModelProto()
    out.CopyFrom(qproto)
    for t in out.graph.initializer:
        if t.name in biases:
            t.CopyFrom(numpy_helper.from_array(biases[t.name], t.name))
    return Outcome(out, done, held)


def _correct_layer(x: Layer, fit: _Stats, held: _Stats, biases: dict[str, np.ndarray], validate: bool) -> int:
    """Add the layer's mean shift to its int32 bias in ``biases`` (if validation allows); 1 if it did."""
    if held.rows == 0:
        held = _Stats(np.zeros_like(fit.d), np.zeros_like(fit.d))
    total = _Stats(fit.d + held.d, fit.d2 + held.d2, fit.ref2 + held.ref2, fit.rows + held.rows)
    step = np.round((total.d / max(total.rows, 1)) / x.scale)
    keep = bool(np.any(step != 0))
    if validate:
        trial = np.round((fit.d / max(fit.rows, 1)) / x.scale) * x.scale
        x.figures.update(_held_figures(held, np.zeros_like(trial), "before"))
        x.figures.update(_held_figures(held, trial, "after"))
        keep = keep and held.sq_error(trial) < held.sq_error(np.zeros_like(trial))
    x.figures["bias_correction"] = "applied" if keep else "not kept"
    if not keep:
        return 0
    q = biases[x.bias].astype(np.int64) + step.astype(np.int64)
    biases[x.bias] = np.clip(q, -(2 ** 31), 2 ** 31 - 1).astype(np.int32)
    x.figures["mean_shift_corrected"] = round(float(np.sqrt(np.mean((step * x.scale) ** 2))), 8)
    return 1


class _FloatOutputs:
    """The runs of the correction: ``chunks`` of samples, each (sample indices, feeds), and the float
    model's layer outputs per chunk (kept when they fit in ``FLOAT_CACHE_BYTES``, else run again per wave).

    A chunk is a whole half of the samples stacked on the batch axis when the model takes it (every feed of
    batch 1, and a batched run of the float model gives the same outputs as one sample's run, checked on the
    first sample): one run per half and wave instead of one per sample. Otherwise one sample per chunk.
    """

    def __init__(self, float_proto: onnx.ModelProto, layers: list[Layer], samples: Sequence[dict[str, np.ndarray]],
                 fit: list[int], held: list[int]) -> None:
        self._names = sorted({x.float_out for x in layers})
        self._session = _qdq.probe_session(float_proto, self._names)
        halves = [half for half in (fit, held) if half]
        stacked = [_stack([samples[i] for i in half]) for half in halves]
        self.chunks: list[tuple[list[int], dict[str, np.ndarray]]] = [([i], dict(x)) for i, x in enumerate(samples)]
        self._cache: list[dict[str, np.ndarray]] | None = []
        batched = [(half, feeds) for half, feeds in zip(halves, stacked) if feeds is not None]
        if batched and len(batched) == len(halves):
            try:
                first = self._batch_matches(samples, batched[0])
            except Exception:  # noqa: BLE001 - a model that does not take a batch: one sample per run
                first = None
            if first is not None:
                self.chunks, self._cache = batched, [first]
        for _, feeds in self.chunks[len(self._cache):]:
            self._cache.append(_qdq.run_probe(self._session, self._names, feeds))
            if sum(v.nbytes for c in self._cache for v in c.values()) > FLOAT_CACHE_BYTES:
                self._cache = None
                break

    def _batch_matches(self, samples: Sequence[dict[str, np.ndarray]],
                       chunk: tuple[list[int], dict[str, np.ndarray]]) -> dict[str, np.ndarray] | None:
        """The batched run of ``chunk`` if it matches its first sample's own run (shape and values), else None."""
        indices, feeds = chunk
        batch = _qdq.run_probe(self._session, self._names, feeds)
        single = _qdq.run_probe(self._session, self._names, samples[indices[0]])
        for name in self._names:
            b, s = batch[name], single[name]
            if b.shape[0] != len(indices) or b.shape[1:] != s.shape[1:] or s.shape[0] != 1:
                return None
            if not np.allclose(b[:1], s, rtol=1e-4, atol=1e-5 * max(float(np.abs(s).max()), 1.0)):
                return None
        return batch

    def get(self, chunk: int, members: list[Layer]) -> dict[str, np.ndarray]:
        if self._cache is not None:
            return self._cache[chunk]
        return _qdq.run_probe(self._session, [x.float_out for x in members], self.chunks[chunk][1])


def _stack(samples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray] | None:
    """The samples' feeds stacked on the batch axis, or None when a feed is not of batch 1."""
    if any(np.ndim(v) == 0 or np.shape(v)[0] != 1 for s in samples for v in s.values()):
        return None
    return {name: np.concatenate([np.asarray(s[name]) for s in samples]) for name in samples[0]}


def _held_figures(held: _Stats, delta: np.ndarray, when: str) -> dict[str, float]:
    """Held-out relative output error and RMS per-channel mean shift of a layer with ``delta`` added."""
    norm = math.sqrt(max(held.ref2, 1e-300))
    rows = max(held.rows, 1)
    return {
        f"heldout_error_{when}": round(math.sqrt(max(held.sq_error(delta), 0.0)) / norm, 6),
        f"heldout_mean_shift_{when}": round(float(np.sqrt(np.mean((held.d / rows - delta) ** 2))), 8),
    }
