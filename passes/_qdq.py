"""Helpers of the quantize pass: onnxruntime calibration and QDQ placement, weight-only QDQ, per-layer SQNR."""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from nnopt.ir.graphview import rename_outer_reads, stable_topological_order, subgraph_protos, subgraph_reads
from nnopt.ir.naming import taken_names, unique_name
from nnopt.passes import _ort_quant
from nnopt.runtime import run_model

#: Ops whose presence means the model is already quantized (any domain: ONNX and com.microsoft).
QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger",
    "QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu",
    "QLinearConcat", "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearSoftmax", "QGemm",
    "QAttention", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulNBits", "QOrderedMatMul",
})

#: Per op type: (index of the weight input, function (node attributes) → output-channel axis of it).
#: The axis is the one that per-channel scales run along: the output channels.
WEIGHT_AXIS: dict[str, tuple[int, Any]] = {
    "Conv": (1, lambda attrs: 0),
    "ConvTranspose": (1, lambda attrs: 1),
    "Gemm": (1, lambda attrs: 0 if attrs.get("transB", 0) else 1),
    "MatMul": (1, lambda attrs: -1),
}

#: Recurrent ops: onnxruntime has no QDQ int8 kernel for them, so both modes store their weights as int8 +
#: DequantizeLinear and run them in float.
RECURRENT_OPS = ("LSTM", "GRU", "RNN")

#: Per op type: the weight inputs stored as int8 + DequantizeLinear, each (input index, function (node
#: attributes) → output-channel axis). LSTM/GRU/RNN: W [num_directions, gates*hidden, input] (input 1) and
#: R [num_directions, gates*hidden, hidden] (input 2); axis 1 are the output rows (gate × hidden unit).
#: One scale per row is shared by the two directions of a bidirectional layer: a scale per direction and
#: row would need blocked quantization (DequantizeLinear block_size, opset 21).
WEIGHT_ONLY_INPUTS: dict[str, tuple[tuple[int, Any], ...]] = {
    **{op: (rule,) for op, rule in WEIGHT_AXIS.items()},
    **{op: ((1, lambda attrs: 1), (2, lambda attrs: 1)) for op in RECURRENT_OPS},
}


def quantized_ops_present(op_types: Iterable[str]) -> list[str]:
    """The distinct already-quantized op types among ``op_types`` (a graph's nodes'), sorted."""
    return sorted({op for op in op_types if op in QUANTIZED_OPS})


class _SampleReader:
    """An onnxruntime ``CalibrationDataReader`` over in-memory feed dicts (restartable with ``rewind``)."""

    def __init__(self, samples: Sequence[dict[str, np.ndarray]]) -> None:
        self._samples = list(samples)
        self._it: Iterator[dict[str, np.ndarray]] = iter(self._samples)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._samples)

    def __len__(self) -> int:
        return len(self._samples)


class _TimeLimitedSession:
    """An onnxruntime session whose ``run`` stops at the run time limit in force (see ``run_model``): the
    calibrators run the model themselves, and a model can run forever (a Loop without an end)."""

    def __init__(self, session: Any) -> None:
        self._session = session

    def run(self, outputs: Sequence[str] | None, feeds: dict[str, np.ndarray], run_options: Any = None) -> Any:
        return run_model(self._session, feeds, None if outputs is None else list(outputs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


def calibrate(proto: onnx.ModelProto, samples: Sequence[dict[str, np.ndarray]], method: str,
              op_types: Sequence[str]) -> Any:
    """Activation ranges (onnxruntime ``TensorsData``) from onnxruntime's own calibrators on ``samples``.

    ``method`` is minmax, percentile (99.999th) or entropy.
    """
    from onnxruntime.quantization.calibrate import CalibrationMethod

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    # NOTE: onnxruntime's calibrators only take a model path and write an augmented copy beside it, so
    # this one step goes through a private temporary folder (removed on return).
    with tempfile.TemporaryDirectory(prefix="nnopt-quantize-") as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save_model(proto, path.as_posix(), save_as_external_data=proto.ByteSize() > 1_800_000_000)
        calibrator = _ort_quant.create_calibrator(path, list(op_types), (Path(tmp) / "aug.onnx").as_posix(),
                                                  methods[method])
        calibrator.infer_session = _TimeLimitedSession(calibrator.infer_session)
        calibrator.collect_data(_SampleReader(samples))
        ranges = calibrator.compute_data()
        del calibrator
    return ranges


def place_qdq(proto: onnx.ModelProto, ranges: Any, *, per_channel: bool, activation_type: str,
              nodes_to_quantize: Sequence[str], nodes_to_exclude: Sequence[str],
              op_types: Sequence[str]) -> onnx.ModelProto:
    """QDQ placement by onnxruntime's ``QDQQuantizer`` (the engine behind ``quantize_static``), in memory.

    Weights int8 symmetric (per channel when asked), activations ``activation_type`` asymmetric with the
    given ranges; Relu/Clip after a quantized op are absorbed into the saturation of its QuantizeLinear.
    """
    from onnxruntime.quantization.quant_utils import QuantType

    act = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[activation_type]
    nodes_to_exclude = _with_feeding_activations(proto.graph, nodes_to_exclude)
    inferred = onnx.shape_inference.infer_shapes(proto)
    quantizer = _ort_quant.qdq_quantizer(inferred, per_channel, False, QuantType.QInt8, act, ranges,
                                         list(nodes_to_quantize), list(nodes_to_exclude), list(op_types),
                                         {"WeightSymmetric": True})
    quantizer.quantize_model()
    out = quantizer.model.model
    _float_inputs_for(out.graph, set(nodes_to_exclude), {t.name for t in proto.graph.initializer})
    _subgraphs_read_absorbed_activations(proto.graph, out)
    toposort(out.graph)
    # Shapes inferred for placement are not part of the result (the input had only its own value_info).
    keep = {v.name for v in proto.graph.value_info}
    kept = [v for v in out.graph.value_info if v.name in keep]
    del out.graph.value_info[:]
    out.graph.value_info.extend(kept)
    return out


#: Activations onnxruntime's quantizer absorbs into the QuantizeLinear after a quantized op (its saturation
#: clamps as they would).
ABSORBED_ACTIVATIONS = ("Relu", "Clip")


def _with_feeding_activations(graph: onnx.GraphProto, excluded: Sequence[str]) -> list[str]:
    """``excluded`` plus every Relu/Clip whose readers are all excluded.

    onnxruntime's quantizer drops such an activation when its producer is quantized (the QuantizeLinear's
    clamp does its work), and ``_float_inputs_for`` then rewires the excluded reader to the tensor before
    that QuantizeLinear: the activation would be lost (a Conv -> Relu -> excluded Conv lost its Relu and
    the digits CNN's output cosine fell to -0.02). Excluding the activation too keeps it, in float.
    """
    names = list(excluded)
    chosen = set(names)
    readers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.name)
    outputs = {o.name for o in graph.output}
    for node in reversed(graph.node):  # reversed: an activation feeding an activation kept in float is kept too
        if node.op_type not in ABSORBED_ACTIVATIONS or node.name in chosen or not node.output:
            continue
        out = node.output[0]
        reading = readers.get(out, [])
        if out not in outputs and reading and all(r in chosen for r in reading):
            names.append(node.name)
            chosen.add(node.name)
    return names


def _subgraphs_read_absorbed_activations(before: onnx.GraphProto, model: onnx.ModelProto) -> None:
    """Give If branches and Loop bodies that read an absorbed activation's output that activation back.

    onnxruntime's quantizer drops a Relu/Clip after a quantized op (its output's QuantizeLinear clamps) and
    rewires the main graph's readers to that QuantizeLinear's DequantizeLinear, but not a subgraph that reads
    the activation's output from the outer scope: the name is then the producer's, unclamped (Silero VAD's
    decoder If reads the encoder's last Relu: output cosine 0.65, 37 % of speech decisions flipped). The
    activation comes back, in float, for the subgraphs alone, reading the DequantizeLinear the main graph's
    readers read (the producer still fuses into an int8 kernel; onnxruntime 1.32 aborted the process when
    building a session whose subgraph read a DequantizeLinear's output directly) or, with no QuantizeLinear
    on it, the producer's output.
    """
    after = model.graph
    kept = {n.name for n in after.node}
    dropped = {n.output[0]: n for n in before.node
               if n.op_type in ABSORBED_ACTIVATIONS and n.output and n.name not in kept}
    read = sorted({x for n in after.node for x in subgraph_reads(n)} & dropped.keys())
    if not read:
        return
    quantized = {n.input[0]: n.output[0] for n in after.node if n.op_type == "QuantizeLinear"}
    dequantized = {n.input[0]: n.output[0] for n in after.node if n.op_type == "DequantizeLinear"}
    renames, taken = {}, taken_names(model)
    present = {t.name for t in after.initializer}
    for name in read:
        activation = onnx.NodeProto()
        activation.CopyFrom(dropped[name])
        activation.name = unique_name(activation.name or activation.op_type, taken)
        # The quantizer gave the activation's output name to its producer; Clip's bounds may be gone with it.
        activation.input[0] = dequantized.get(quantized.get(name, ""), name)
        after.initializer.extend(t for t in before.initializer if t.name in activation.input[1:] and t.name not in present)
        present.update(activation.input[1:])
        activation.output[0] = renames[name] = unique_name(name, taken)
        after.node.append(activation)  # toposort places it
    for node in after.node:
        for body in subgraph_protos(node):
            rename_outer_reads(body, renames)


def _float_inputs_for(graph: onnx.GraphProto, excluded: set[str], original_inits: set[str]) -> None:
    """Let excluded nodes read float activations, and drop the QDQ pairs and scales nobody reads then.

    onnxruntime's quantizer quantizes the output of a quantized op even when its reader is excluded (so
    the producer can fuse), and the excluded reader then sees the rounded DequantizeLinear output; an
    excluded layer is meant to run exactly as in float, so it is rewired to the tensor before the pair.
    """
    producer = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if node.name not in excluded or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[i] = q.input[0]
    outputs = {o.name for o in graph.output}
    nodes = list(graph.node)
    while True:
        read = {x for n in nodes for x in (*n.input, *subgraph_reads(n))}
        kept = [n for n in nodes if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
                or any(o in read or o in outputs for o in n.output)]
        if len(kept) == len(nodes):
            break
        nodes = kept
    # One rewrite of each list (removing element by element compares every element each time).
    if len(nodes) != len(graph.node):
        del graph.node[:]
        graph.node.extend(nodes)
    read = {x for n in nodes for x in (*n.input, *subgraph_reads(n))}
    inits = [t for t in graph.initializer if t.name in read or t.name in original_inits]
    if len(inits) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(inits)


def toposort(graph: onnx.GraphProto) -> None:
    """Order ``graph``'s nodes topologically, in place (stable: ties keep their order).

    onnxruntime's quantizer appends the QuantizeLinear/DequantizeLinear nodes it adds at the end of the
    node list, which onnxruntime accepts but the onnx checker does not.
    """
    nodes = list(graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    # An If/Loop/Scan body may read tensors of this graph by name (outer scope) without listing them as
    # node inputs; the node must still come after their producers (silero VAD: decoder/If_1's branches
    # read decoder/If's output).
    deps = [{producer[x] for x in (*n.input, *subgraph_reads(n)) if x in producer} for n in nodes]
    order = stable_topological_order(deps)
    if order is None:  # a cycle: leave the graph as it is, the checker will say so
        return
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)


def symmetric_int8(weight: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 quantization of a float weight: (int8 values, float32 scales), zero point 0.

    ``axis`` None gives one scale; otherwise one scale per index of that axis. Range [-127, 127], so
    negation is exact and the zero point is 0 (what onnxruntime's int8 kernels expect of weights).
    """
    w = np.asarray(weight, dtype=np.float32)
    if axis is None:
        amax = np.array(np.abs(w).max() if w.size else 0.0, dtype=np.float32)
    else:
        reduce = tuple(i for i in range(w.ndim) if i != axis)
        amax = np.abs(w).max(axis=reduce) if w.size else np.zeros(w.shape[axis], np.float32)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


def probe_session(proto: onnx.ModelProto, names: Sequence[str]) -> Any:
    """An onnxruntime session of a copy of ``proto`` with the named main-graph tensors as extra outputs."""
    from nnopt.runtime import make_session

    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    present = {o.name for o in probe.graph.output}
    # NOTE: an output needs only a name for onnxruntime; type and shape come from the producing node.
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in present)
    return make_session(probe)


def run_probe(session: Any, names: Sequence[str], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The named tensors of one run of a ``probe_session`` on ``feeds``."""
    return dict(zip(names, run_model(session, feeds, list(names))))


def signal_noise_power(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """(sum of squares of ``reference``, sum of squared differences), in float64, for one sample."""
    r = np.asarray(reference, np.float64)
    signal = float(np.sum(r ** 2))
    noise = float(np.sum((r - np.asarray(candidate, np.float64)) ** 2))
    return signal, noise


def sqnr_db_from_powers(powers: Sequence[tuple[float, float]]) -> float:
    """SQNR in dB from per-sample ``signal_noise_power`` terms (inf when identical)."""
    signal = sum(s for s, _ in powers)
    noise = sum(n for _, n in powers)
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def sqnr_db(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    """Signal-to-quantization-noise ratio in dB over all samples (inf when identical)."""
    return sqnr_db_from_powers([signal_noise_power(r, c) for r, c in zip(reference, candidate)])


def own_sqnr_db(out_db: float, in_db: float) -> float:
    """The SQNR a layer adds by itself, from the cumulative SQNR of its output and of its input.

    Noise-to-signal ratios add along a chain (to first order, for a layer that keeps the signal's scale),
    so the layer's own NSR is NSR(out) - NSR(in); a layer that lowers the error gets +inf.
    """
    nsr_out = 10.0 ** (-out_db / 10.0) if math.isfinite(out_db) else (0.0 if out_db > 0 else math.inf)
    nsr_in = 10.0 ** (-in_db / 10.0) if math.isfinite(in_db) else (0.0 if in_db > 0 else math.inf)
    own = nsr_out - nsr_in
    if not math.isfinite(own):
        return -math.inf
    return math.inf if own <= 0 else -10.0 * math.log10(own)


def ort_prepared(proto: onnx.ModelProto, samples: Sequence[dict[str, np.ndarray]]) -> tuple[onnx.ModelProto, str]:
    """``proto`` after the graph optimisation step of onnxruntime's ``quant_pre_process``, and what it changed.

    That step is onnxruntime's basic-level optimizer (constant folding, redundant-node removal, Conv+Add/
    Conv+Mul folding, MatMul+Add -> Gemm, function inlining such as HardSwish -> HardSigmoid * x); the
    quantizer then sees the graph onnxruntime will run: a bias Add folded into its Conv is no QLinearAdd of
    its own, a MatMul + Add pair becomes one QGemm. Only the graph is taken (the model's metadata and
    opset imports stay, plus any domain the new nodes use); ``quant_pre_process``'s symbolic shape
    inference is skipped (it fails on PP-OCR's dynamic dims), as is its onnx shape inference (placement runs
    its own). The input is returned unchanged, with the reason, when the optimizer fails or the optimized
    graph's outputs on (up to four of) ``samples`` differ from the input's beyond float rounding.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="nnopt-quantize-") as tmp:
        # A file, not the proto: onnxruntime's in-memory route mishandles tensors it moves to external data.
        in_path, out_path = Path(tmp) / "model.onnx", Path(tmp) / "prepared.onnx"
        try:
            onnx.save_model(proto, in_path.as_posix(), save_as_external_data=proto.ByteSize() > 1_800_000_000)
            quant_pre_process(in_path.as_posix(), out_path.as_posix(), skip_symbolic_shape=True,
                              skip_onnx_shape=True)
            optimized = onnx.load(out_path.as_posix())
        except Exception as exc:  # noqa: BLE001 - the optimizer is a bonus: without it, place as before
            return proto, f"not prepared: {type(exc).__name__}: {exc}"[:200]
    before = _op_counts(proto.graph)
    after = _op_counts(optimized.graph)
    if before == after:  # at most reordered: nothing the quantizer would place differently
        return proto, "nothing to change"
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    out.graph.CopyFrom(optimized.graph)
    domains = {o.domain for o in out.opset_import}
    used = {n.domain for n in out.graph.node} - domains - {"ai.onnx"}
    out.opset_import.extend(o for o in optimized.opset_import if o.domain in used)
    # Inlined functions' nodes come unnamed; layers are selected and reported by name.
    taken = taken_names(out)
    for node in out.graph.node:
        if not node.name:
            node.name = unique_name(f"quantize/{node.op_type}", taken)
    changes = [f"{op} {before.get(op, 0)} -> {after.get(op, 0)}" for op in sorted(set(before) | set(after))
               if before.get(op, 0) != after.get(op, 0)]
    differs = _outputs_differ(proto, out, samples[:4])
    if differs:
        return proto, f"not prepared: {differs}"
    return out, ", ".join(changes) or "nodes renamed or reordered"


def _outputs_differ(proto: onnx.ModelProto, other: onnx.ModelProto, samples: Sequence[dict[str, np.ndarray]],
                    ) -> str | None:
    """Why ``other`` does not compute what ``proto`` does on ``samples`` (float rounding aside), or None."""
    from nnopt.pipeline.verify import LOSSLESS_ATOL, LOSSLESS_TOLERANCE, compare_outputs
    from nnopt.runtime import make_session

    try:
        a, b = make_session(proto), make_session(other)
        fidelity = compare_outputs([run_model(a, f) for f in samples], [run_model(b, f) for f in samples])
    except Exception as exc:  # noqa: BLE001 - a model onnxruntime cannot run is not kept
        return f"the optimized graph does not run: {type(exc).__name__}"
    if fidelity.max_rel_error <= LOSSLESS_TOLERANCE or fidelity.max_abs_error <= LOSSLESS_ATOL:
        return None
    return f"outputs differ (max relative error {fidelity.max_rel_error:.3g})"


def _op_counts(graph: onnx.GraphProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
