"""quantize: insert QuantizeLinear/DequantizeLinear pairs (QDQ) so onnxruntime runs int8 kernels."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

from nnopt.analysis.refit import MIN_REFIT_SAMPLES
from nnopt.analysis.selection import NodeSelection
from nnopt.cost.hardware import HardwareProfile
from nnopt.errors import OptionError
from nnopt.ir.constants import lower_model_constants
from nnopt.ir.model import Model
from nnopt.ir.naming import taken_names, unique_name
from nnopt.passes import _biascorrect, _equalize, _int8_measure, _int8_select, _qdq, _weight_kernels
from nnopt.passes._latency import run_profile
from nnopt.pipeline.base import LayerDecision, Pass, PassContext, PassResult
from nnopt.pipeline.verify import LOSSLESS_ATOL, LOSSLESS_TOLERANCE, compare_outputs
from nnopt.runtime import make_session, run_model

_PREFIX = "quantize"
#: At most this many samples feed the per-layer SQNR (each costs a run of the float and the quantized model).
SENSITIVITY_SAMPLES = 16
#: Op types quantized by default: the ones onnxruntime has int8 kernels for (QLinearConv, QLinearMatMul,
#: QGemm, QLinearAdd, QLinearMul, QLinearSigmoid...), the activations it absorbs into a QuantizeLinear
#: (Relu, Clip), and the data-movement ops that keep int8 flowing between them, so a DequantizeLinear →
#: float op → QuantizeLinear round trip is avoided. onnxruntime's own default also takes index and
#: normalisation ops (Gather, Where, TopK, ArgMax, CumSum, *Normalization); those are left out here.
#: Mul and Sigmoid matter for speed: without them SiLU (x * sigmoid(x)) breaks every int8 chain of
#: ddddocr's detector (0.80x instead of 0.52x float latency).
#: LSTM, GRU and RNN have no int8 kernel: their weights W and R can only be stored as int8 + DequantizeLinear
#: and computed in float (see ``recurrent_weights``).
DEFAULT_OP_TYPES = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Relu", "Clip", "LeakyRelu", "Sigmoid", "Mul",
                    "Add", "MaxPool", "GlobalAveragePool", "AveragePool", "Concat", "Reshape", "Transpose",
                    "Flatten", "Squeeze", "Unsqueeze", "Resize", "Pad", "Slice", "Split", "Softmax",
                    "LSTM", "GRU", "RNN")


@dataclass(frozen=True)
class QuantizeOptions(NodeSelection):
    mode: Literal["static", "weight_only"] = field(
        default="static",
        metadata={"help": "static: int8 weights and activations (calibrated on --data), run by onnxruntime's int8 "
                          "kernels; weight_only: int8 weights + DequantizeLinear, float compute, no data needed"},
    )
    kernel: Literal["dequantize", "dynamic", "matmul_nbits", "auto"] = field(
        default="dequantize",
        metadata={"help": "weight_only: how onnxruntime runs the int8 weights. dequantize: DequantizeLinear at every "
                          "run (smallest, slower than float); dynamic: MatMul/Gemm/LSTM on onnxruntime's dynamic int8 "
                          "kernels (DynamicQuantizeMatMul/LSTM), other layers stay float; matmul_nbits: MatMul/Gemm on "
                          "MatMulNBits (nbits-bit blocks; needs onnx-ir), others float; auto: the fast kernel where "
                          "one exists (dynamic), dequantize elsewhere. The report says per layer which"},
    )
    nbits: Literal[4, 8] = field(default=8, metadata={"help": "weight bits of kernel=matmul_nbits"})
    prepare: Literal["ort", "off"] = field(
        default="off",
        metadata={"help": "static: before calibration and placement, run the graph optimisation of onnxruntime's "
                          "quant_pre_process (bias Add folded into Conv, MatMul+Add -> Gemm, HardSwish inlined, "
                          "constant folding), kept only if the outputs are unchanged: ort, or off"},
    )
    activation_type: Literal["uint8", "int8"] = field(
        default="uint8", metadata={"help": "activation type in static mode (uint8 is the fast path on x86 CPUs)"}
    )
    per_channel: bool = field(
        default=True,
        metadata={"help": "one weight scale per output channel (needs opset >= 13; older models fall back to "
                          "per-tensor, reported in stats)"},
    )
    calibration: Literal["minmax", "percentile", "entropy"] = field(
        default="minmax", metadata={"help": "onnxruntime calibrator for activation ranges (static mode)"}
    )
    op_types: tuple[str, ...] = field(
        default=DEFAULT_OP_TYPES,
        metadata={"help": "op types to quantize (weight_only: those of Conv, ConvTranspose, Gemm, MatMul, LSTM, GRU, "
                          "RNN present)"},
    )
    recurrent_weights: bool | None = field(
        default=None,
        metadata={"help": "store LSTM/GRU/RNN weights (W, R) as int8 + DequantizeLinear, computed in float "
                          "(default: on in weight_only; off in static, where dequantizing them at every run costs "
                          "latency: ddddocr's CRNN ~0.8x -> ~1.4x float)"},
    )
    min_cosine: float | None = field(
        default=None,
        metadata={"help": "fidelity budget (static): exclude the most sensitive layer, one at a time, until the "
                          "outputs' cosine similarity to float on --data is at least this"},
    )
    max_rel_error: float | None = field(
        default=None,
        metadata={"help": "fidelity budget (static): ... until the largest output error relative to the output's "
                          "largest magnitude is at most this"},
    )
    max_excluded: int = field(default=8, metadata={"help": "the budget loop excludes at most this many layers"})
    equalize: Literal["auto", "on", "off"] = field(
        default="off",
        metadata={"help": "cross-layer equalization of Conv -> (Relu|LeakyRelu|PRelu|none) -> Conv pairs before "
                          "quantizing (lossless in float): on, off, or auto (static mode: quantize with and "
                          "without it and keep the one with the lower output error on --data; weight_only: off). "
                          "Off by default: on held-out inputs it did not pay on the models measured (docs/quantize.md)"},
    )
    select: Literal["latency", "all", "measured"] = field(
        default="latency",
        metadata={"help": "static: which layers become int8. latency: only those predicted to make onnxruntime "
                          "(CPU) faster, region edges' Q/DQ included (depthwise convs, layers too small or with "
                          "few channels, islands between ops without int8 kernels stay float; the report says "
                          "why per layer, docs/quantize.md); all: every selected layer (the behaviour before this option); "
                          "measured: latency's choice, float, all and the choice with each of its regions left float "
                          "timed in onnxruntime here (one thread, interleaved), the fastest kept, never slower than "
                          "float; the report gives each region's predicted and measured gain. Not deterministic: "
                          "the result depends on this machine's timings. Ignored in weight_only"},
    )
    threads: int = field(
        default=1,
        metadata={"help": "static, select=latency/measured: the onnxruntime intra-op threads the model will run "
                          "with. Int8 pays less with several threads (float convs split across threads better "
                          "than the int8 path and its Q/DQ), so the choice is made with the built-in kernel table "
                          "measured at that count (1 or 2 here; more: the 2-thread one) and select=measured times "
                          "at it. A calibrated --hardware profile decides with its own thread count"},
    )
    bias_correction: Literal["auto", "on", "off"] = field(
        default="auto",
        metadata={"help": "static: fold each quantized Conv/Gemm's mean output shift against float on --data "
                          "into its int32 bias, upstream layers first: on (every layer), off, or auto (fitted "
                          "on half the samples, kept per layer where it lowers that layer's output error on the "
                          "other half, and only if it lowers the model's output error there)"},
    )

    def __post_init__(self) -> None:
        if self.min_cosine is not None and not -1.0 <= self.min_cosine <= 1.0:
            raise OptionError(f"quantize: min_cosine must be in [-1, 1], got {self.min_cosine!r}")
        if self.threads < 1:
            raise OptionError(f"quantize: threads must be >= 1, got {self.threads!r}")
        if self.max_rel_error is not None and not self.max_rel_error >= 0:
            raise OptionError(f"quantize: max_rel_error must be >= 0, got {self.max_rel_error!r}")
        if isinstance(self.max_excluded, bool) or not isinstance(self.max_excluded, int) or self.max_excluded < 0:
            raise OptionError(f"quantize: max_excluded must be a non-negative integer, got {self.max_excluded!r}")
        if not self.op_types:
            raise OptionError("quantize: op_types must name at least one op type")
        if self.kernel != "dequantize" and self.mode != "weight_only":
            raise OptionError(f"quantize: kernel={self.kernel} applies to mode=weight_only only")


class Quantize(Pass[QuantizeOptions]):
    """Insert QuantizeLinear/DequantizeLinear pairs (QDQ format) for int8 weights and activations.

    Matches: main-graph nodes of ``op_types`` selected by ``nodes``/``exclude``. Rewrites (static mode):
    weights to int8 symmetric (per output channel), biases to int32, and every activation those nodes read
    or write to a QuantizeLinear → DequantizeLinear pair with a per-tensor scale from onnxruntime's
    calibrator on ``--data``; placement is onnxruntime's QDQ quantizer's, so onnxruntime fuses each group
    into QLinearConv / QLinearMatMul / QGemm. A Relu or Clip right after a quantized op is dropped: the
    saturation of the following QuantizeLinear does its work. Weight-only mode stores Conv/ConvTranspose/
    Gemm/MatMul weights as int8 + DequantizeLinear and leaves compute in float; LSTM/GRU/RNN weights (W, R)
    are stored that way in weight-only mode, and in static mode with ``recurrent_weights=true`` (onnxruntime
    has no int8 kernel for them).

        x → Conv(W, b) → Relu → y
      ⇒ x → Q → DQ ┐
        W_int8 → DQ ┼→ Conv → Q → DQ → y        (Relu absorbed; onnxruntime: QLinearConv)
        b_int32 → DQ┘

    Recovery (static mode, defaults ``auto``): ``equalize`` rescales Conv → [Relu|LeakyRelu|PRelu] → Conv
    pairs so their per-channel weight ranges match before calibration (lossless in float; auto keeps it only
    if the quantized outputs on ``--data`` get closer to float), and ``bias_correction`` folds each quantized
    Conv/Gemm's mean output shift against float into its int32 bias, upstream layers first (auto: per layer
    only where held-out samples confirm it). Each layer's entry reports the decision and its figures.

    Lossy. With ``min_cosine``/``max_rel_error`` the pass excludes the layer with the lowest own SQNR (the
    noise it adds beyond its inputs', measured on the calibration data) and re-quantizes, until the
    budget holds; each layer's SQNR is in the report. Preconditions: static mode needs ``--data``; a model
    that already holds QDQ or int8 ops is left alone; Constant-node weights are lowered to initializers
    first; per-channel scales need opset >= 13 (older: per-tensor, said in stats).
    """

    name = "quantize"
    lossy = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        opts = self.options
        refusal = _precondition(model, opts, ctx)
        if refusal is not None:
            return refusal
        float_proto, lowered, renamed = _float_model(model, ctx)
        stats: dict[str, Any] = {"constants_lowered": lowered}
        float_proto, per_channel = _per_channel_model(model, float_proto, opts, ctx, stats)
        if opts.mode == "static" and opts.prepare == "ort":
            float_proto, stats["prepared"] = _qdq.ort_prepared(float_proto, ctx.samples)

        candidates = [n for n in float_proto.graph.node if n.op_type in opts.op_types]
        selected = [n for n in candidates if opts.selects(n.name)]
        layers: list[LayerDecision] = [
            LayerDecision(n.name, n.op_type, "declined", "not selected by nodes/exclude")
            for n in candidates if not opts.selects(n.name)
        ]
        recurrent_weights = opts.mode == "weight_only" if opts.recurrent_weights is None else opts.recurrent_weights
        if not recurrent_weights:
            layers.extend(LayerDecision(n.name, n.op_type, "declined",
                                        f"recurrent weights stay float in {opts.mode} mode (recurrent_weights=true "
                                        "stores them int8; dequantized at every run, which costs latency)")
                          for n in selected if n.op_type in _qdq.RECURRENT_OPS)
            selected = [n for n in selected if n.op_type not in _qdq.RECURRENT_OPS]
        if not selected:
            return PassResult(modified=False, stats={"layers_quantized": 0}, layers=layers)

        if opts.mode == "weight_only":
            out_proto = _run_weight_only(float_proto, selected, per_channel, opts, stats, layers)
        else:
            out_proto = _run_static(float_proto, selected, candidates, per_channel, opts, ctx, stats, layers,
                                    run_profile(model, ctx))
        if out_proto is None:
            return PassResult(modified=False, stats=stats, layers=layers)
        if out_proto is float_proto:  # nothing was placed (all excluded): never edit the shared export
            out_proto = onnx.ModelProto()
            out_proto.CopyFrom(float_proto)
        _prefix_new_node_names(out_proto, {n.name for n in float_proto.graph.node})
        _install(model, out_proto)
        stats["nodes_named"] = renamed
        return PassResult(modified=True, stats=stats, layers=layers)


def _precondition(model: Model, opts: QuantizeOptions, ctx: PassContext) -> PassResult | None:
    """The refusal when the pass cannot run on ``model`` (already quantized, opset < 10, no data), or None."""
    present = _qdq.quantized_ops_present(n.op for n in model.graph.nodes)
    if present:
        return _refuse(f"already quantized: the model holds {', '.join(present)}; quantize leaves it alone")
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    if opset < 10:
        return _refuse(f"QuantizeLinear/DequantizeLinear need opset >= 10; the model has opset {opset}")
    if opts.mode == "static" and not ctx.samples:
        return _refuse("static quantization needs --data (calibration samples); without data, use mode=weight_only")
    return None


def _per_channel_model(model: Model, float_proto: onnx.ModelProto, opts: QuantizeOptions, ctx: PassContext,
                       stats: dict[str, Any]) -> tuple[onnx.ModelProto, bool]:
    """(the float model to quantize, whether weights get per-channel scales); what was done goes to ``stats``."""
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    # NOTE: DequantizeLinear has an ``axis`` (per-channel scales) only from opset 13. Per-tensor int8
    # weights after BatchNorm folding can lose whole channels, so an older model is converted to
    # opset 13 by onnx's version converter (Split, Squeeze, Unsqueeze, ReduceSum move attributes to
    # inputs) when the converted model gives the same outputs; otherwise weights get per-tensor scales.
    per_channel = opts.per_channel and opset >= 13
    if opts.per_channel and opset < 13:
        raised = _raise_opset(float_proto, ctx)
        if raised is not None:
            float_proto, per_channel = raised, True
            stats["opset_raised"] = f"{opset} -> 13"
        else:
            stats["per_channel_fallback"] = f"opset {opset} < 13 and not safely convertible: per-tensor scales"
    stats["per_channel"] = per_channel
    return float_proto, per_channel


def _run_weight_only(float_proto: onnx.ModelProto, selected: list[onnx.NodeProto], per_channel: bool,
                     opts: QuantizeOptions, stats: dict[str, Any], layers: list[LayerDecision],
                     ) -> onnx.ModelProto | None:
    """Weight-only mode: the rewritten model, or None when no layer was rewritten (``stats``/``layers`` grow)."""
    if opts.equalize == "on":
        float_proto, stats["equalize"] = _equalized(float_proto)
    if opts.kernel == "dequantize":
        out_proto, wlayers = _weight_only(float_proto, selected, per_channel)
    else:
        out_proto, wlayers = _weight_only_fast(float_proto, selected, per_channel, opts)
        stats["kernels"] = _weight_kernels.kernel_counts(wlayers)
    layers.extend(wlayers)
    done = sum(1 for entry in wlayers if entry.action == "rewritten")
    stats.update({"layers_quantized": done,
                  "dequantize_nodes": sum(n.op_type == "DequantizeLinear" for n in out_proto.graph.node)})
    return out_proto if done else None


def _run_static(float_proto: onnx.ModelProto, selected: list[onnx.NodeProto], candidates: list[onnx.NodeProto],
                per_channel: bool, opts: QuantizeOptions, ctx: PassContext, stats: dict[str, Any],
                layers: list[LayerDecision], profile: HardwareProfile | None) -> onnx.ModelProto | None:
    """Static mode: the quantized model, or None when no layer is int8 (``stats``/``layers`` grow); the
    selection reads ``profile``'s int8 times when it is a calibrated one."""
    left_float: frozenset[str] = frozenset()
    selection = None
    if opts.select in ("latency", "measured"):
        rates = _int8_select.rates_for(profile, opts.threads)
        selection = _select(float_proto, selected, candidates, ctx, rates)
        if opts.select == "measured":
            # The one setting whose result depends on this machine: the timings of a few candidates.
            build = _qdq_builder(float_proto, selected, candidates, per_channel, opts, ctx)
            selection = _int8_measure.refine(float_proto, [n for n in selected if n.op_type not in
                                                           _qdq.RECURRENT_OPS], selection, build, ctx.samples[0],
                                             rates=rates, threads=rates.threads or opts.threads)
        layers.extend(selection.declined)
        stats.update(selection.stats)
        left_float = frozenset(n.name for n in selected) - set(selection.chosen)
        selected = [n for n in selected if n.name not in left_float]
        if not selected:
            stats["layers_quantized"] = 0
            return None
    out_proto, slayers, sstats = _static_recovered(float_proto, selected, candidates, opts, per_channel, ctx,
                                                   left_float)
    if selection is not None:
        _annotate(slayers, selection)
    layers.extend(slayers)
    stats.update(sstats)
    # The budget may have excluded every layer: the layers say why.
    return out_proto if stats["layers_quantized"] else None


# ---------------------------------------------------------------------------------------------- static
@dataclass
class _Static:
    """What one static quantization of a float model gave: the model, its report, and the outputs of both
    models on the calibration samples (for the recovery steps that compare them)."""

    qproto: onnx.ModelProto
    layers: list[LayerDecision]
    stats: dict[str, Any]
    reference: list[list[np.ndarray]]
    outputs: list[list[np.ndarray]]
    budget_excluded: list[LayerDecision]


def _static(float_proto: onnx.ModelProto, selected: list[onnx.NodeProto], candidates: list[onnx.NodeProto],
            opts: QuantizeOptions, per_channel: bool, ctx: PassContext,
            left_float: frozenset[str] = frozenset()) -> _Static:
    """Calibrate once, place QDQ, and exclude the most sensitive layer until the budget holds.

    ``left_float``: layers select=latency keeps float. They are not excluded (an excluded layer reads the
    float tensor, and a quantized Conv whose readers are all excluded loses its output QuantizeLinear and
    runs in float with its weights dequantized at every run); onnxruntime is asked to quantize only the
    chosen layers instead, so a float layer after an int8 one reads its DequantizeLinear, as any op
    without an int8 kernel does.
    """
    # onnxruntime's QDQ quantizer has no rule for recurrent ops (it would quantize every input, the
    # sequence lengths included); their weights are stored int8 by the weight-only rewrite below.
    ort_op_types = tuple(t for t in opts.op_types if t not in _qdq.RECURRENT_OPS)
    ranges = _qdq.calibrate(float_proto, ctx.samples, opts.calibration, ort_op_types) if ort_op_types else None
    chosen = {n.name for n in selected}
    # NOTE: recurrent nodes are never onnxruntime's to quantize, so they are not on its exclusion list either
    # (an excluded node is rewired to read float activations): they read what they would without them.
    recurrent_names = {n.name for n in candidates if n.op_type in _qdq.RECURRENT_OPS}
    base_exclude = [n.name for n in candidates
                    if n.name not in chosen and n.name not in recurrent_names and n.name not in left_float]
    reference: list[list[np.ndarray]] | None = None  # the float model's outputs, from the first round
    budget_excluded: list[LayerDecision] = []
    attempts: list[tuple[onnx.ModelProto, list[dict[str, Any]], Any, int, list[list[np.ndarray]]]] = []
    while True:
        # Each round of the budget loop re-places QDQ and re-measures every layer: the slow part.
        ctx.progress(len(budget_excluded), opts.max_excluded, f"{len(budget_excluded)} layer(s) excluded")
        by_budget = [e.node for e in budget_excluded]
        qproto = float_proto
        if ort_op_types:  # an empty list means "every op type" to onnxruntime's quantizer
            only = [n.name for n in selected if n.name not in by_budget and n.name not in recurrent_names]
            qproto = _qdq.place_qdq(float_proto, ranges, per_channel=per_channel,
                                    activation_type=opts.activation_type,
                                    nodes_to_quantize=only if left_float else [],
                                    nodes_to_exclude=base_exclude + [n for n in by_budget if n not in recurrent_names],
                                    op_types=ort_op_types)
        recurrent = [n for n in selected if n.name in recurrent_names and n.name not in by_budget]
        if recurrent:
            qproto, _ = _weight_only(qproto, recurrent, per_channel)
        eligible = chosen - {e.node for e in budget_excluded}
        sens, float_outputs, quant_outputs = _measure(float_proto, qproto, ctx.samples, eligible,
                                                      float_outputs=reference is None)
        reference = float_outputs if reference is None else reference
        fidelity = compare_outputs(reference, quant_outputs)
        violation = _violation(fidelity, opts)
        attempts.append((qproto, sens, fidelity, len(budget_excluded), quant_outputs))
        if violation is None or len(budget_excluded) >= opts.max_excluded or not sens:
            break
        worst = min(sens, key=lambda s: (s["own_sqnr"], s["node"]))
        budget_excluded.append(LayerDecision(
            worst["node"], worst["op_type"], "declined",
            f"excluded by the fidelity budget ({violation}): the most sensitive layer left, "
            f"adding noise at {_db(worst['own_sqnr'])} dB SQNR",
            {"own_sqnr_db": _db(worst["own_sqnr"]), "sqnr_db": _db(worst["sqnr"])},
        ))
    if _violation(fidelity, opts) is not None and len(attempts) > 1:
        # The budget was not reached: keep the attempt closest to float (excluding a layer does not
        # always help: the noise it stops adding can have been masking, or masked by, another's).
        qproto, sens, fidelity, kept, quant_outputs = max(
            attempts, key=lambda a: (a[2].cosine_similarity, -a[2].max_rel_error, -a[3]))
        budget_excluded = budget_excluded[:kept]
    assert reference is not None  # the loop ran at least once
    layers, stats = _report(qproto, sens, fidelity, budget_excluded, opts, ctx)
    return _Static(qproto, layers, stats, reference, quant_outputs, budget_excluded)


def _report(qproto: onnx.ModelProto, sens: list[dict[str, Any]], fidelity: Any, budget_excluded: list[LayerDecision],
            opts: QuantizeOptions, ctx: PassContext) -> tuple[list[LayerDecision], dict[str, Any]]:
    """The per-layer report and the stats of a static quantization."""
    layers: list[LayerDecision] = [
        LayerDecision(s["node"], s["op_type"], "rewritten", figures={
            "sqnr_db": _db(s["sqnr"]), "own_sqnr_db": _db(s["own_sqnr"]), "int8_kernel": s["op_type"] in _qdq.WEIGHT_AXIS})
        for s in sens
    ]
    layers.extend(budget_excluded)
    stats = {
        "layers_quantized": len(sens),
        "layers_excluded_by_budget": len(budget_excluded),
        "quantize_nodes": sum(n.op_type == "QuantizeLinear" for n in qproto.graph.node),
        "dequantize_nodes": sum(n.op_type == "DequantizeLinear" for n in qproto.graph.node),
        "calibration_samples": len(ctx.samples),
        "calibration": opts.calibration,
        "cosine_on_data": round(fidelity.cosine_similarity, 6),
        "max_rel_error_on_data": round(fidelity.max_rel_error, 6),
        "budget_met": _violation(fidelity, opts) is None,
    }
    if fidelity.top1_agreement is not None:
        stats["top1_agreement_on_data"] = round(fidelity.top1_agreement, 4)
    return layers, stats


def _equalized(float_proto: onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """``float_proto`` with its Conv pairs equalized (weight-only mode: no data to decide by), and a line
    for the stats."""
    pairs = _equalize.find_pairs(float_proto)
    if not pairs:
        return float_proto, "no equalizable Conv pairs"
    return _equalize.equalize(float_proto, pairs), f"on ({len(pairs)} pairs)"


# ---------------------------------------------------------------------------------------------- recovery
def _static_recovered(float_proto: onnx.ModelProto, selected: list[onnx.NodeProto],
                      candidates: list[onnx.NodeProto], opts: QuantizeOptions, per_channel: bool,
                      ctx: PassContext, left_float: frozenset[str] = frozenset(),
                      ) -> tuple[onnx.ModelProto, list[LayerDecision], dict[str, Any]]:
    """``_static``, with cross-layer equalization before it and bias correction after it as the options ask.

    With ``equalize=auto`` the model is quantized with and without equalization, and the one with the
    lower squared output error against float on the calibration samples is kept; with fewer than
    ``MIN_REFIT_SAMPLES`` samples that comparison is noise, and auto means off.
    """
    started = time.perf_counter()
    too_few = opts.equalize == "auto" and len(ctx.samples) < MIN_REFIT_SAMPLES
    pairs = _equalize.find_pairs(float_proto) if opts.equalize != "off" and not too_few else []
    variants: list[tuple[onnx.ModelProto, bool]] = [(float_proto, False)]
    if pairs:
        equalized = _equalize.equalize(float_proto, pairs)
        variants = [(equalized, True)] if opts.equalize == "on" else [(float_proto, False), (equalized, True)]
    equalize_seconds = time.perf_counter() - started
    results = []
    for proto, used in variants:
        started = time.perf_counter()
        results.append((_static(proto, selected, candidates, opts, per_channel, ctx, left_float), proto, used))
        # The cost of equalization: the transform, and in auto mode the quantization of the second variant.
        equalize_seconds += (time.perf_counter() - started) if used and len(variants) > 1 else 0.0
    errors = [_sq_error(r.reference, r.outputs, range(len(r.outputs))) for r, _, _ in results]
    best = min(range(len(results)), key=lambda i: (errors[i], i))
    result, chosen_float, cle_used = results[best]
    extra: dict[str, Any] = {}
    if too_few:
        extra = {"equalize": f"off: {len(ctx.samples)} samples, fewer than {MIN_REFIT_SAMPLES} to choose by"}
    elif opts.equalize != "off":
        extra = _equalize_report(result, pairs, cle_used, errors)
        extra["equalize_seconds"] = round(equalize_seconds, 3)
    if opts.bias_correction != "off" and result.stats["layers_quantized"]:
        started = time.perf_counter()
        result = _bias_corrected(chosen_float, result, opts, ctx)
        result.stats["bias_correction_seconds"] = round(time.perf_counter() - started, 3)
    result.stats.update(extra)
    return result.qproto, result.layers, result.stats


def _sq_error(reference: list[list[np.ndarray]], outputs: list[list[np.ndarray]], indices: Any) -> float:
    """Σ over the given samples and all outputs of the squared error against the reference, in float64."""
    total = 0.0
    for i in indices:
        for r, o in zip(reference[i], outputs[i]):
            if np.issubdtype(np.asarray(r).dtype, np.floating):
                total += float(np.sum((np.asarray(r, np.float64) - np.asarray(o, np.float64)) ** 2))
    return total


def _equalize_report(result: _Static, pairs: list[_equalize.Pair], used: bool, errors: list[float],
                     ) -> dict[str, Any]:
    """Stats of the equalization step; each pair's figures go to its first conv's layer entry."""
    if not pairs:
        return {"equalize": "no equalizable Conv pairs"}
    decision = "kept" if used else "not kept"
    by_node = {entry.node: entry for entry in result.layers if entry.action == "rewritten"}
    for p in pairs:
        entry = by_node.get(p.first.name)
        if entry is not None:
            entry.figures["equalized_with"] = {"next": p.second.name, "decision": decision, **p.figures}
    stats: dict[str, Any] = {"equalize": f"{decision} ({len(pairs)} pairs)"}
    if len(errors) > 1:
        why = "lowers" if used else "does not lower"
        stats["equalize"] += f": it {why} the output error on the calibration data"
        stats["equalize_output_sq_error"] = {"without": float(f"{errors[0]:.6g}"), "with": float(f"{errors[1]:.6g}")}
    return stats


def _bias_corrected(float_proto: onnx.ModelProto, result: _Static, opts: QuantizeOptions,
                    ctx: PassContext) -> _Static:
    """``result`` with the int32 biases corrected for the mean output shift (see ``_biascorrect``), and its
    report re-measured; unchanged when no layer keeps a correction, or (auto) when the corrected model's
    output error on the held-out calibration samples is not lower."""
    validate = opts.bias_correction == "auto"
    if validate and len(ctx.samples) < MIN_REFIT_SAMPLES:
        result.stats["bias_correction"] = (f"not applied: {len(ctx.samples)} samples, fewer than "
                                           f"{MIN_REFIT_SAMPLES} to fit and validate on")
        return result
    eligible = {e.node for e in result.layers if e.action == "rewritten"}
    layers, declined = _biascorrect.find_layers(float_proto, result.qproto, eligible)
    result.stats["bias_correction"] = "no layer with an int32 bias"
    if not layers:
        return result
    outcome = _biascorrect.correct(float_proto, result.qproto, layers, ctx.samples, validate,
                                   ctx.seed_for("quantize:bias_correction"))
    corrected, count, held = outcome.qproto, outcome.corrected, outcome.held
    if count:
        sens, _, outputs = _measure(float_proto, corrected, ctx.samples, eligible, float_outputs=False)
        before, after = _sq_error(result.reference, result.outputs, held), _sq_error(result.reference, outputs, held)
        if validate and not after < before:
            count = 0
            result.stats["bias_correction_model_check"] = (
                f"not kept: held-out output squared error {before:.6g} -> {after:.6g}")
        else:
            fidelity = compare_outputs(result.reference, outputs)
            new_layers, stats = _report(corrected, sens, fidelity, result.budget_excluded, opts, ctx)
            _carry_figures(result.layers, new_layers)
            result = _Static(corrected, new_layers, {**result.stats, **stats}, result.reference, outputs,
                             result.budget_excluded)
            if held:
                result.stats["bias_correction_heldout_sq_error"] = {"before": float(f"{before:.6g}"),
                                                                    "after": float(f"{after:.6g}")}
    by_node = {entry.node: entry for entry in result.layers if entry.action == "rewritten"}
    for layer in layers:
        if layer.node in by_node:
            applied = count > 0 and layer.figures.get("bias_correction") == "applied"
            by_node[layer.node].figures["bias_correction"] = {**layer.figures,
                                                              "bias_correction": "applied" if applied else "not kept"}
    for node, _, why in declined:
        if node in by_node:
            by_node[node].figures["bias_correction"] = {"bias_correction": f"not applicable: {why}"}
    result.stats["bias_correction"] = f"{count} of {len(layers)} layers corrected"
    return result


def _carry_figures(old: list[LayerDecision], new: list[LayerDecision]) -> None:
    """Figures added to ``old`` entries by earlier recovery steps, copied to the re-measured ``new`` ones."""
    previous = {e.node: e.figures for e in old}
    for entry in new:
        for key, value in previous.get(entry.node, {}).items():
            entry.figures.setdefault(key, value)


def _violation(fidelity: Any, opts: QuantizeOptions) -> str | None:
    if opts.min_cosine is not None and not fidelity.cosine_similarity >= opts.min_cosine:
        return f"cosine {fidelity.cosine_similarity:.6f} < {opts.min_cosine:g}"
    if opts.max_rel_error is not None and not fidelity.max_rel_error <= opts.max_rel_error:
        return f"relative error {fidelity.max_rel_error:.3g} > {opts.max_rel_error:g}"
    return None


def _sensitivity(float_proto: onnx.ModelProto, qproto: onnx.ModelProto,
                 samples: list[dict[str, np.ndarray]], eligible: set[str]) -> list[dict[str, Any]]:
    """Per quantized layer (an ``eligible`` node reading a DequantizeLinear output): SQNR of its output.

    The output compared is the one its readers see: after its QuantizeLinear → DequantizeLinear when it
    has one (so output rounding, and an absorbed Relu's clamping, are included), against float.

    ``sqnr`` is cumulative (all quantization upstream included); ``own_sqnr`` is the part this layer
    adds, from the SQNR of its output and of its worst activation input (see ``_qdq.own_sqnr_db``).
    """
    return _measure(float_proto, qproto, samples, eligible, float_outputs=False, quant_outputs=False,
                    probed=len(samples))[0]


def _measure(float_proto: onnx.ModelProto, qproto: onnx.ModelProto, samples: list[dict[str, np.ndarray]],
             eligible: set[str], *, float_outputs: bool, quant_outputs: bool = True,
             probed: int = SENSITIVITY_SAMPLES,
             ) -> tuple[list[dict[str, Any]], list[list[np.ndarray]], list[list[np.ndarray]]]:
    """One run of each model per sample: (``_sensitivity`` on the first ``probed`` samples, the float and
    the quantized model's outputs per sample (each empty unless asked for)).

    One onnxruntime session per model gives the graph outputs and the probed activations (sessions of
    large QDQ models cost more than their runs, and grow faster than the model).
    """
    layers = _probed_layers(float_proto, qproto, eligible)
    # NOTE: every intermediate tensor of both models for one sample is held at once (the float model's
    # and the quantized one's), never for all samples: per pair of tensors only each sample's signal and
    # noise power is kept, and ``sqnr_db`` sums them as it always has, so the figures are the same.
    ref_names = sorted({f for _, f, _, _ in layers} | {s for _, _, _, srcs in layers for s in srcs})
    got_names = sorted(set(ref_names) | {seen for _, _, seen, _ in layers})
    pairs = sorted({(f, seen) for _, f, seen, _ in layers} | {(s, s) for _, _, _, srcs in layers for s in srcs})
    powers: dict[tuple[str, str], list[tuple[float, float]]] = {pair: [] for pair in pairs}
    float_out = [o.name for o in float_proto.graph.output] if float_outputs else []
    quant_out = [o.name for o in qproto.graph.output] if quant_outputs else []
    float_probe, quant_probe = _qdq.probe_session(float_proto, ref_names), _qdq.probe_session(qproto, got_names)
    ref_outputs: list[list[np.ndarray]] = []
    got_outputs: list[list[np.ndarray]] = []
    for i, feeds in enumerate(samples):
        probing = i < probed
        ref_wanted = _union(float_out, ref_names if probing else [])
        got_wanted = _union(quant_out, got_names if probing else [])
        ref = _qdq.run_probe(float_probe, ref_wanted, feeds) if ref_wanted else {}
        got = _qdq.run_probe(quant_probe, got_wanted, feeds) if got_wanted else {}
        if float_out:
            ref_outputs.append([ref[name] for name in float_out])
        if quant_out:
            got_outputs.append([got[name] for name in quant_out])
        if probing:
            for ref_name, got_name in pairs:
                powers[ref_name, got_name].append(_qdq.signal_noise_power(ref[ref_name], got[got_name]))
        del ref, got  # before the next sample's run: one sample's activations at a time
    out = []
    for node, float_name, seen, srcs in layers:
        sqnr = _qdq.sqnr_db_from_powers(powers[float_name, seen])
        in_sqnr = min((_qdq.sqnr_db_from_powers(powers[s, s]) for s in srcs), default=math.inf)
        out.append({"node": node.name, "op_type": node.op_type, "sqnr": sqnr,
                    "own_sqnr": _qdq.own_sqnr_db(sqnr, in_sqnr)})
    return out, ref_outputs, got_outputs


def _union(first: list[str], second: list[str]) -> list[str]:
    """``first`` then the names of ``second`` not in it (a session is asked for each output once)."""
    seen = set(first)
    return first + [name for name in second if name not in seen]


def _probed_layers(float_proto: onnx.ModelProto, qproto: onnx.ModelProto, eligible: set[str],
                   ) -> list[tuple[onnx.NodeProto, str, str, list[str]]]:
    """The layers ``_sensitivity`` measures: (node, its float output, the tensor its readers see, the float
    tensors quantized for its inputs)."""
    producer = {o: n for n in qproto.graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in qproto.graph.node:
        for name in n.input:
            readers.setdefault(name, []).append(n)
    float_names = {o for n in float_proto.graph.node for o in n.output}
    layers = []
    for node in qproto.graph.node:
        if node.name not in eligible or not node.output or not node.output[0]:
            continue
        sources = []
        for name in node.input:
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                sources.append(q.input[0])  # the float tensor that was quantized
            elif dq.input[0] not in producer:
                sources.append("")  # a quantized weight: no activation error of its own
        if sources:
            seen = node.output[0]
            q = [r for r in readers.get(seen, []) if r.op_type == "QuantizeLinear"]
            dq = [r for r in readers.get(q[0].output[0], []) if r.op_type == "DequantizeLinear"] if q else []
            if dq:
                seen = dq[0].output[0]
            # NOTE: a quantized graph output keeps its name on the DequantizeLinear; the node's own output
            # is renamed, so the float tensor is found under the DequantizeLinear's output name.
            float_name = node.output[0] if node.output[0] in float_names else seen
            if float_name in float_names:
                layers.append((node, float_name, seen, [s for s in sources if s in float_names]))
    return layers


def _db(value: float) -> float | None:
    """A dB figure for the report: rounded; None for an exact (infinite-SQNR) result."""
    return round(value, 2) if math.isfinite(value) else None


# ---------------------------------------------------------------------------------------------- select=latency
def _select(float_proto: onnx.ModelProto, selected: list[onnx.NodeProto], candidates: list[onnx.NodeProto],
            ctx: PassContext, rates: _int8_select.TableRates) -> _int8_select.Selection:
    """select=latency's choice among ``selected`` (see ``_int8_select``) with ``rates`` (``rates_for``: the
    run's calibrated profile, or the built-in table for the option's threads), with the float islands
    reported."""
    # Recurrent layers are not int8 kernels (their weights are stored int8 or not, by recurrent_weights).
    recurrent = [n.name for n in selected if n.op_type in _qdq.RECURRENT_OPS]
    selection = _int8_select.select(float_proto, [n for n in selected if n.op_type not in _qdq.RECURRENT_OPS],
                                    ctx.samples[0], rates=rates)
    selection.chosen.extend(recurrent)
    selection.declined.extend(_int8_select.float_islands(float_proto, [n.name for n in candidates],
                                                         {n.op_type for n in candidates}))
    return selection


def _qdq_builder(float_proto: onnx.ModelProto, selected: list[onnx.NodeProto], candidates: list[onnx.NodeProto],
                 per_channel: bool, opts: QuantizeOptions, ctx: PassContext) -> _int8_measure.Builder:
    """A function giving ``float_proto`` with QDQ placed on a set of layers, for select=measured's timing.

    Calibrated once; no recovery step (equalization and bias correction change values, not what runs) and
    no fidelity budget. Placement as ``_static``'s: the layers outside ``selected`` are excluded, the
    layers left float are simply not asked for.
    """
    ort_op_types = tuple(t for t in opts.op_types if t not in _qdq.RECURRENT_OPS)
    ranges = _qdq.calibrate(float_proto, ctx.samples, opts.calibration, ort_op_types) if ort_op_types else None
    wanted = {n.name for n in selected}
    exclude = [n.name for n in candidates if n.name not in wanted and n.op_type not in _qdq.RECURRENT_OPS]

    def build(chosen: frozenset[str]) -> onnx.ModelProto:
        if not chosen or not ort_op_types:  # nothing onnxruntime's quantizer is to place
            return float_proto
        return _qdq.place_qdq(float_proto, ranges, per_channel=per_channel, activation_type=opts.activation_type,
                              nodes_to_quantize=sorted(chosen), nodes_to_exclude=exclude, op_types=ort_op_types)

    return build


def _annotate(layers: list[LayerDecision], selection: _int8_select.Selection) -> None:
    """The selection's predicted figures, added to the quantized layers' report entries."""
    for entry in layers:
        if entry.action == "rewritten" and entry.node in selection.figures:
            entry.figures.update(selection.figures[entry.node])


# ---------------------------------------------------------------------------------------------- weight-only
def _weight_only(proto: onnx.ModelProto, selected: list[onnx.NodeProto], per_channel: bool,
                 ) -> tuple[onnx.ModelProto, list[LayerDecision]]:
    """Replace each selected node's float weight initializer with int8 + scale → DequantizeLinear."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    inits = {t.name: t for t in out.graph.initializer}
    taken = taken_names(out)
    wanted = {n.name for n in selected}
    readers: dict[str, int] = {}
    for node in out.graph.node:
        for name in (*node.input, *_qdq.subgraph_reads(node)):  # a subgraph may read a weight by name too
            readers[name] = readers.get(name, 0) + 1
    layers: list[LayerDecision] = []
    new_nodes: list[onnx.NodeProto] = []
    done: dict[tuple[str, int | None], str] = {}
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    for node in out.graph.node:
        if node.name not in wanted:
            continue
        rules = _qdq.WEIGHT_ONLY_INPUTS.get(node.op_type, ())
        found = [(index, axis_of, inits.get(node.input[index])) for index, axis_of in rules
                 if len(node.input) > index and node.input[index]]
        weights = [(index, axis_of, w) for index, axis_of, w in found if w is not None and w.data_type in floats]
        if not weights:
            layers.append(LayerDecision(node.name, node.op_type, "declined",
                                        "no float weight initializer" if rules else "weight_only quantizes Conv, "
                                        "ConvTranspose, Gemm, MatMul, LSTM, GRU and RNN weights only"))
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        entry: dict[str, Any] = {"weights": [], "axis": None, "weight_max_abs_error": 0.0, "weight_bytes_before": 0,
                                 "weight_bytes_after": 0}
        for index, axis_of, weight in weights:
            array = numpy_helper.to_array(weight)
            axis = axis_of(attrs) % array.ndim if per_channel and array.ndim >= 2 else None
            key = (weight.name, axis)
            if key not in done:
                done[key] = _dequantized_weight(out, new_nodes, weight, array, axis, taken, entry)
            node.input[index] = done[key]
            readers[weight.name] -= 1
        if entry["weights"]:  # a weight shared with an earlier node is reported there
            layers.append(LayerDecision(node.name, node.op_type, "rewritten", figures=entry))
    # Float weights nobody reads any more go; DequantizeLinear nodes go first (topological order).
    kept = [t for t in out.graph.initializer if readers.get(t.name, 1) > 0 or t.name not in readers]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    nodes = new_nodes + list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out, layers


def _weight_only_fast(proto: onnx.ModelProto, selected: list[onnx.NodeProto], per_channel: bool,
                      opts: QuantizeOptions) -> tuple[onnx.ModelProto, list[LayerDecision]]:
    """Weight-only int8 on onnxruntime's fast kernels (``opts.kernel``; see ``_weight_kernels``)."""
    out, layers = _weight_kernels.weight_only_fast(proto, selected, per_channel, opts.kernel, opts.nbits,
                                                   _weight_only)
    if out is not proto:
        _weight_kernels.strip_extras(out, proto)
        _qdq.toposort(out.graph)
    return out, layers


def _dequantized_weight(out: onnx.ModelProto, new_nodes: list[onnx.NodeProto], weight: onnx.TensorProto,
                        array: np.ndarray, axis: int | None, taken: set[str], entry: dict[str, Any]) -> str:
    """Add ``weight`` as int8 + scale + zero point and the DequantizeLinear reading them; its output's name.

    The figures of the rewrite are added to the layer's report ``entry``.
    """
    q, scale = _qdq.symmetric_int8(array, axis)
    base = f"{_PREFIX}/{weight.name}"
    names = [unique_name(f"{base}_{s}", taken) for s in ("int8", "scale", "zero_point", "dq")]
    out.graph.initializer.extend([
        numpy_helper.from_array(q, names[0]),
        numpy_helper.from_array(scale.astype(np.float32), names[1]),
        numpy_helper.from_array(np.zeros(scale.shape, np.int8), names[2]),
    ])
    kwargs: dict[str, Any] = {"axis": axis} if axis is not None else {}
    dq_out = names[3]
    if weight.data_type == onnx.TensorProto.FLOAT16:
        # NOTE: DequantizeLinear outputs the scale's type; float32 scales give float32, so cast back.
        dq_out = unique_name(f"{base}_dq_f32", taken)
        new_nodes.append(helper.make_node("Cast", [dq_out], [names[3]], name=unique_name(f"{base}_cast", taken),
                                          to=onnx.TensorProto.FLOAT16))
    new_nodes.append(helper.make_node("DequantizeLinear", names[:3], [dq_out],
                                      name=unique_name(f"{base}_DequantizeLinear", taken), **kwargs))
    shape = [-1 if i == axis else 1 for i in range(array.ndim)] if axis is not None else ()
    err = float(np.abs(q.astype(np.float32) * scale.reshape(shape) - array).max())
    entry["weights"].append(weight.name)
    entry["axis"] = axis
    entry["weight_max_abs_error"] = max(entry["weight_max_abs_error"], round(err, 8))
    entry["weight_bytes_before"] += int(array.nbytes)
    entry["weight_bytes_after"] += int(q.nbytes + scale.nbytes)
    return names[3]


# ---------------------------------------------------------------------------------------------- plumbing
def _raise_opset(proto: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto | None:
    """``proto`` converted to opset 13 if the conversion is valid and keeps the outputs; else None."""
    from onnx import version_converter

    from nnopt.runtime import generate_samples

    graph_attrs = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    if any(op.domain not in ("", "ai.onnx") for op in proto.opset_import) or any(
            a.type in graph_attrs for n in proto.graph.node for a in n.attribute):
        return None  # custom domains and subgraphs: the converter's coverage is not to be trusted there
    try:
        raised = version_converter.convert_version(proto, 13)
        raised.ir_version = max(raised.ir_version, 7)
        onnx.checker.check_model(raised)
        sess = make_session(proto)
        feeds = ctx.samples[:4] or generate_samples(sess, count=2, input_shapes=ctx.input_shapes)
        before = [run_model(sess, f) for f in feeds]
        after_sess = make_session(raised)
        after = [run_model(after_sess, f) for f in feeds]
    except Exception:  # noqa: BLE001 - any failure of the converter or of the converted model: keep opset
        return None
    fidelity = compare_outputs(before, after)
    if not (fidelity.max_rel_error <= LOSSLESS_TOLERANCE or fidelity.max_abs_error <= LOSSLESS_ATOL):
        return None
    return raised


def _refuse(reason: str) -> PassResult:
    return PassResult(modified=False, stats={"layers_quantized": 0},
                      layers=[LayerDecision("(model)", "", "declined", reason)])


def _float_model(model: Model, ctx: PassContext) -> tuple[onnx.ModelProto, int, int]:
    """``model`` as a proto with Constant nodes lowered and main-graph nodes named; (proto, lowered, named).

    The proto is read-only (it may be the pass manager's cached export, shared); ``model`` is not changed.
    Only when there is something to lower or name does the pass import a copy and export it again (a
    graphsurgeon model exported, imported and exported again gives the same bytes, so the round trip is
    skipped when it would change nothing).
    """
    proto = ctx.analyses_for(model).proto()
    constants = any(n.op == "Constant" for g in model.all_graphs() for n in g.nodes)
    if not constants and all(n.name for n in model.graph.nodes):
        return proto, 0, 0
    work = Model.from_proto(proto)
    lowered = lower_model_constants(work)
    renamed = _name_unnamed_nodes(work)
    return work.to_proto(), lowered, renamed


def _name_unnamed_nodes(model: Model) -> int:
    """Give main-graph nodes without a name one (``quantize/<op>``): layers are selected and reported by name."""
    taken = taken_names(model)
    next_suffix: dict[str, int] = {}
    count = 0
    for node in model.graph.nodes:
        if not node.name:
            node.name = unique_name(f"{_PREFIX}/{node.op}", taken, next_suffix)
            count += 1
    return count


def _prefix_new_node_names(proto: onnx.ModelProto, original: set[str]) -> None:
    """Prefix the names of nodes onnxruntime's quantizer added with ``quantize/`` (unique)."""
    taken = taken_names(proto)
    next_suffix: dict[str, int] = {}
    for node in proto.graph.node:
        if node.name not in original and not node.name.startswith(f"{_PREFIX}/"):
            node.name = unique_name(f"{_PREFIX}/{node.name or node.op_type}", taken, next_suffix)


def _install(model: Model, proto: onnx.ModelProto) -> None:
    """Make ``model`` the quantized ``proto`` (graph and opset imports; the rest of the model is kept)."""
    new = Model.from_proto(proto, copy_proto=False)
    model.graph = new.graph
    model.opset_imports = new.opset_imports
    model.ir_version = max(model.ir_version, new.ir_version)
    model.top_level_initializers = model.top_level_initializers | new.top_level_initializers
