"""Benchmark: how nnopt's time and memory grow with model size (issue #6, "Scale").

Graphs: seeded synthetic residual nets of about 2,000 / 10,000 / 40,000 nodes
(``synthetic_models.residual_net``), a synthetic model of about 25 M parameters (``big_net``) and the
largest installed real models of ``tests/realmodels.py``: by parameters (ddddocr_ocr) and by nodes
(ppocr_rec). Tasks: loading, ``nnopt analyze``, the default pipeline with and without onnxruntime
verification, each built-in pass alone (``optimize -p PASS --no-verify``: the pass plus the pass manager's
checker, shape inference and cost analysis), ``onnxslim.slim`` and ``onnxsim.simplify`` on the same file, and a reference: the onnx
checker plus ONNX shape inference, C++ code that is linear in the nodes, which shows what the machine
alone does to the growth exponent (the 2k graph fits in the CPU caches, the larger ones do not).

Each (graph, task) runs in a fresh process that reads the model, runs the task (a fresh load each repeat;
the median counts) and reports wall time, CPU time (all threads) and its own peak RSS; "+MB" is that peak
minus the RSS after its imports, before the model was read. The growth exponent is the least-squares slope
of log(time) on log(nodes) over the synthetic nets: 1 is linear. It is computed on CPU time too, which
other jobs sharing the machine disturb less than wall time. Writes docs/scale.{md,json,png}.

    python benchmarks/scale.py                        # everything, about 20 min on 2 cores
    python benchmarks/scale.py --quick                # 2k and 10k nets only; prints, writes nothing
    python benchmarks/scale.py --tasks analyze dce --graphs res2k res10k --no-write
    python benchmarks/scale.py --tasks quantize:mode=static --graphs res1k res2k res5k res10k --no-write
    python benchmarks/scale.py --before OLD.json      # also show an earlier run's exponents (before a fix)
    python benchmarks/scale.py --render docs/scale.json   # rewrite .md/.png from an earlier run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from procmem import peak_rss_mb  # noqa: E402

#: Growth exponents above this are findings: the work should be about linear in the node count.
SUPERLINEAR = 1.2
#: A child process that runs longer is stopped; its time is reported as "> TIMEOUT".
CHILD_TIMEOUT_S = 300


# ---------------------------------------------------------------------------------------------- graphs
@dataclass(frozen=True)
class GraphSpec:
    key: str
    label: str
    #: Synthetic residual-net size (None: not part of the growth series).
    series_nodes: int | None = None
    repeats: int = 2
    real_model: str | None = None  # key in tests/realmodels.py
    #: Run by every task (False: only by the tasks that list it in ``Task.graphs``).
    default: bool = True


GRAPHS = [
    GraphSpec("res1k", "synthetic, ~1k nodes", 1_000, repeats=1, default=False),
    GraphSpec("res2k", "synthetic, ~2k nodes", 2_000, repeats=3),
    GraphSpec("res5k", "synthetic, ~5k nodes", 5_000, repeats=1, default=False),
    GraphSpec("res10k", "synthetic, ~10k nodes", 10_000, repeats=2),
    GraphSpec("res40k", "synthetic, ~40k nodes", 40_000, repeats=1),
    GraphSpec("big25m", "synthetic, ~25 M params", repeats=1),
    GraphSpec("ddddocr_ocr", "ddddocr_ocr (largest real model by params)", repeats=1, real_model="ddddocr_ocr"),
    GraphSpec("ppocr_rec", "ppocr_rec (largest real model by nodes)", repeats=1, real_model="ppocr_rec"),
]
QUICK_GRAPHS = ("res2k", "res10k")
GRAPH_LABELS = {g.key: g.label for g in GRAPHS}


# ---------------------------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class Task:
    key: str
    #: What the child runs: "load", "analyze", "slim", "onnxsim", "reference", or "pipeline" (``passes``; () = default).
    kind: str
    passes: tuple[str, ...] = ()
    verify: bool = False
    needs_data: bool = False
    #: Graphs to run on (None: every default graph).
    graphs: tuple[str, ...] | None = None
    #: Repeats, overriding the graph's (heavy third-party tasks run once).
    repeats: int | None = None
    #: Time limit of one child, overriding ``CHILD_TIMEOUT_S``.
    timeout_s: int | None = None


#: ``quantize:mode=static`` also runs on the 1k and 5k nets: its growth is the finding of issue #12.
_STATIC_QUANTIZE_GRAPHS = ("res1k", "res2k", "res5k", "res10k", "res40k", "big25m", "ddddocr_ocr", "ppocr_rec")

TASKS = [
    Task("reference", "reference", repeats=5),
    Task("load", "load"),
    Task("analyze", "analyze"),
    Task("default", "pipeline"),
    Task("default+verify", "pipeline", verify=True),
    Task("dce", "pipeline", ("dce",)),
    Task("fold-constants", "pipeline", ("fold-constants",)),
    Task("remove-noops", "pipeline", ("remove-noops",)),
    Task("fold-batchnorm", "pipeline", ("fold-batchnorm",)),
    Task("constants-to-initializers", "pipeline", ("constants-to-initializers",)),
    Task("prune:ratio=0.3", "pipeline", ("prune:ratio=0.3",)),
    Task("kmeans:bits=4", "pipeline", ("kmeans:bits=4",)),
    Task("svd:energy=0.9", "pipeline", ("svd:energy=0.9",)),
    Task("conv-to-separable:energy=0.9", "pipeline", ("conv-to-separable:energy=0.9",)),
    Task("quantize:mode=weight_only", "pipeline", ("quantize:mode=weight_only",)),
    Task("quantize:mode=static", "pipeline", ("quantize:mode=static",), needs_data=True,
         graphs=_STATIC_QUANTIZE_GRAPHS, repeats=1, timeout_s=900),
    # Quadratic: about 50 s at 10k nodes; at 40k the time limit gives a lower bound, not worth 30 min.
    Task("onnxslim", "slim", repeats=1, timeout_s=120),
    # onnxsim's simplify (ORT constant folding and its optimizer passes): issue #12's yardstick for `default`.
    Task("onnxsim", "onnxsim", repeats=1, timeout_s=300),
]
TASK_NOTES = {
    "reference": "onnx.checker.check_model + onnx.shape_inference.infer_shapes (C++, linear): the machine's own curve",
    "load": "load_model: onnx.load, checker, graphsurgeon import",
    "analyze": "nnopt analyze --json",
    "default": "the default pipeline to its fixed point, --no-verify",
    "default+verify": "the same with onnxruntime verification of every pass (one session per applied pass)",
    "quantize:mode=static": "calibrated on 2 generated samples (also run on the 1k and 5k nets)",
    "onnxslim": "onnxslim.slim(model) on the same file, once",
    "onnxsim": "onnxsim.simplify(model) on the same file, once",
}


# ---------------------------------------------------------------------------------------------- child
def _timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def _child_runner(task: Task, model_path: str, data_path: str | None, input_shapes: dict) -> Callable[[], dict]:
    """Import what the task needs (before the memory baseline); return a function that runs it once."""
    import onnx

    from nnopt.ir.model import load_model

    if task.kind == "slim":
        import onnxslim

        def run_slim() -> dict:
            proto = onnx.load(model_path)
            wall, cpu, slimmed = _timed(lambda: onnxslim.slim(proto))
            return {"seconds": wall, "cpu_seconds": cpu, "nodes_after": len(slimmed.graph.node)}

        return run_slim
    if task.kind == "onnxsim":
        import onnxsim

        def run_onnxsim() -> dict:
            proto = onnx.load(model_path)
            wall, cpu, (simplified, _) = _timed(lambda: onnxsim.simplify(proto))
            return {"seconds": wall, "cpu_seconds": cpu, "nodes_after": len(simplified.graph.node)}

        return run_onnxsim
    if task.kind == "reference":
        def run_reference() -> dict:
            proto = onnx.load(model_path)
            wall, cpu, _ = _timed(lambda: (onnx.checker.check_model(proto), onnx.shape_inference.infer_shapes(proto)))
            return {"seconds": wall, "cpu_seconds": cpu}

        return run_reference
    if task.kind == "load":
        def run_load() -> dict:
            wall, cpu, _ = _timed(lambda: load_model(model_path))
            return {"seconds": wall, "cpu_seconds": cpu}

        return run_load
    if task.kind == "analyze":
        from nnopt.cost import analyze

        def run_analyze() -> dict:
            model = load_model(model_path)
            wall, cpu, _ = _timed(lambda: json.dumps(analyze(model, input_shapes=input_shapes).to_dict()))
            return {"seconds": wall, "cpu_seconds": cpu}

        return run_analyze
    import sklearn.cluster  # noqa: F401 - a one-off import of 1-2 s, not the pass's time

    from nnopt.api import optimize
    from nnopt.plugin_manager import build_plugins

    plugins = build_plugins(load_entry_points=False)

    def run_pipeline() -> dict:
        model = load_model(model_path)
        wall, cpu, (_, report) = _timed(lambda: optimize(
            model, list(task.passes) or None, verify=task.verify, data=data_path, input_shapes=input_shapes,
            plugins=plugins))
        return {
            "seconds": wall,
            "cpu_seconds": cpu,
            "pass_seconds": sum(r.seconds for r in report.passes),
            "check_seconds": sum(r.verify_seconds for r in report.passes),
            "statuses": sorted({f"{r.name}:{r.status}" for r in report.passes}),
            "rolled_back": [f"{r.name}: {r.reason}" for r in report.rolled_back],
            "nodes_after": report.final.get("nodes"),
        }

    return run_pipeline


def child_main(task_key: str, model_path: str, data_path: str | None, shapes_json: str, repeats: int) -> None:
    import onnx_graphsurgeon as gs
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)
    gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR
    task = next(t for t in TASKS if t.key == task_key)
    run = _child_runner(task, model_path, data_path, json.loads(shapes_json))
    baseline = peak_rss_mb()
    runs = [run() for _ in range(repeats)]
    out = dict(runs[-1])
    for key in ("seconds", "cpu_seconds", "pass_seconds", "check_seconds"):
        if key in out:
            out[key] = statistics.median(r[key] for r in runs)
    out["seconds_all"] = [round(r["seconds"], 4) for r in runs]
    out["peak_mb"] = peak_rss_mb()
    out["baseline_mb"] = baseline
    print(json.dumps(out))


# ---------------------------------------------------------------------------------------------- parent
def prepare_graphs(selected: list[GraphSpec], tmp: Path) -> dict[str, dict]:
    """Write each graph's model and 2 samples of reference data into ``tmp``; skip missing real models."""
    import numpy as np
    import onnx
    import synthetic_models
    from realmodels import REAL_MODELS, write_data

    prepared: dict[str, dict] = {}
    for spec in selected:
        input_shapes: dict[str, list[int]] = {}
        if spec.real_model:
            real = next(m for m in REAL_MODELS if m.key == spec.real_model)
            path = real.path()
            if path is None:
                print(f"{spec.key}: {real.requirement} is not installed; skipped", file=sys.stderr)
                continue
            input_shapes = dict(real.input_shapes)
            data = write_data(real, path, tmp / f"{spec.key}.npz")
        else:
            proto = synthetic_models.big_net() if spec.series_nodes is None else synthetic_models.residual_net(
                spec.series_nodes)
            path = tmp / f"{spec.key}.onnx"
            onnx.save(proto, str(path))
            shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
            data = tmp / f"{spec.key}.npz"
            np.savez(data, X=np.random.default_rng(0).standard_normal([2, *shape]).astype(np.float32))
        proto = onnx.load(str(path))
        prepared[spec.key] = {
            "path": str(path),
            "data": str(data),
            "input_shapes": input_shapes,
            "nodes": len(proto.graph.node),
            "params": int(sum(math.prod(t.dims) for t in proto.graph.initializer)),
            "bytes": path.stat().st_size,
        }
    return prepared


def run_child(task: Task, graph: dict, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--child", task.key, graph["path"], graph["data"] if task.needs_data else "",
           json.dumps(graph["input_shapes"]), str(repeats)]
    started = time.perf_counter()
    limit = task.timeout_s or CHILD_TIMEOUT_S
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"timeout": limit}
    if out.returncode != 0:
        lines = (out.stderr.strip() or "no output").splitlines()
        return {"error": lines[-1][:300]}
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - started
    return result


def runs_on(task: Task, graph: GraphSpec, explicit: bool) -> bool:
    """Every task runs on the graphs named with --graphs; otherwise a task with a graph list on those, the
    others on the default graphs."""
    if explicit:
        return True
    return graph.key in task.graphs if task.graphs is not None else graph.default


def growth_exponent(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of log(seconds) on log(nodes); None with fewer than two points."""
    pts = [(math.log(n), math.log(s)) for n, s in points if s and s > 0]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sxx


def series_keys(graphs: dict) -> list[str]:
    return [g.key for g in GRAPHS if g.series_nodes is not None and g.key in graphs]


def summarise(results: dict, graphs: dict) -> dict[str, dict]:
    """Per task, over the synthetic series: growth exponents (wall, CPU), CPU step slopes, timeouts.

    A timed-out size enters at the time limit, so its exponent is a lower bound (``at_least``).
    """
    out: dict[str, dict] = {}
    for task_key, per_graph in results.items():
        wall, cpu, capped = [], [], False
        for key in series_keys(graphs):
            r = per_graph.get(key)
            if r is None or "error" in r:
                continue
            nodes = graphs[key]["nodes"]
            if "timeout" in r:
                wall.append((nodes, float(r["timeout"])))
                capped = True
                continue
            wall.append((nodes, r["seconds"]))
            cpu.append((nodes, r["cpu_seconds"]))
        steps = [math.log(s2 / s1) / math.log(n2 / n1) for (n1, s1), (n2, s2) in zip(cpu, cpu[1:])]
        slope, cpu_slope = growth_exponent(wall), growth_exponent(cpu)
        out[task_key] = {
            "slope": slope,
            "cpu_slope": cpu_slope,
            "cpu_steps": steps,
            "sizes": [n for n, _ in wall],
            "at_least": capped,
            "superlinear": max(s for s in (slope, cpu_slope, 0.0) if s is not None) > SUPERLINEAR,
        }
    return out


# ---------------------------------------------------------------------------------------------- report
def _fmt_s(r: dict | None) -> str:
    if r is None:
        return "–"
    if "timeout" in r:
        return f"> {r['timeout']}"
    if "error" in r:
        return "error"
    s = r["seconds"]
    return f"{s:.3f}" if s < 10 else f"{s:.1f}"


def _fmt_slope(value: float | None, flagged: bool = False, at_least: bool = False) -> str:
    if value is None:
        return "–"
    text = ("≥ " if at_least else "") + f"{value:.2f}"
    return f"**{text}**" if flagged and value > SUPERLINEAR else text


def _size_label(nodes: int) -> str:
    return f"{round(nodes / 1000)}k" if nodes >= 900 else str(nodes)


def render_markdown(doc: dict) -> str:
    graphs, results, summary = doc["graphs"], doc["results"], doc["summary"]
    defaults = {g.key for g in GRAPHS if g.default}
    series = [k for k in series_keys(graphs) if k in defaults]
    others = [g.key for g in GRAPHS if g.series_nodes is None and g.key in graphs]
    lines = [
        "# Scale: optimizer time and memory against model size",
        "",
        f"Written by `python benchmarks/scale.py` ({doc['date']}, {doc['total_seconds'] / 60:.0f} min). "
        f"{doc['machine']}",
        "",
        "Each cell is the median wall time in seconds of the task in a fresh process (the model already read;",
        "`load` is the reading), over up to 3 runs (fewer on the larger models; each run's time is `seconds_all`",
        "in scale.json); \"> N\" is a run stopped at the time limit. Pass rows",
        "are `nnopt optimize -p PASS --no-verify`: the pass plus the pass manager's onnx checker, strict shape",
        "inference and cost analysis. The exponent is the log-log slope of time against nodes over the synthetic",
        "nets (1 = linear), on wall time and on CPU time (all threads; less disturbed by other jobs on the",
        f"machine); above {SUPERLINEAR} is in bold. \"CPU steps\" are the slopes between successive sizes (2k→10k,",
        "10k→40k; more steps where a task also ran on other sizes, listed below the table); \"ms/node\"",
        "is wall time per node at the largest net. `reference` is C++ code that is linear (the onnx checker",
        "plus shape inference): its exponent is what the machine alone adds, mostly the 2k net fitting in the",
        "CPU caches and the larger ones not.",
        "",
        "## Models",
        "",
        "| model | nodes | params | file MB |",
        "|---|---:|---:|---:|",
    ]
    for key in series + others:
        g = graphs[key]
        lines.append(f"| {GRAPH_LABELS.get(key, key)} | {g['nodes']:,} | {g['params']:,} | {g['bytes'] / 1e6:.1f} |")
    head = ["task", *[f"{_size_label(graphs[k]['nodes'])} s" for k in series], "exponent (wall)",
            "exponent (CPU)", "CPU steps", "ms/node", *[f"{k} s" for k in others]]
    lines += ["", "## Time", "", "| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for task in TASKS:
        row = results.get(task.key)
        if row is None:
            continue
        s = summary.get(task.key, {})
        last = next((k for k in reversed(series) if "seconds" in row.get(k, {})), None)
        per_node = f"{row[last]['seconds'] / graphs[last]['nodes'] * 1e3:.2f}" if last else "–"
        steps = ", ".join(f"{x:.2f}" for x in s.get("cpu_steps", []))
        cells = [*[_fmt_s(row.get(k)) for k in series],
                 _fmt_slope(s.get("slope"), True, s.get("at_least", False)),
                 _fmt_slope(s.get("cpu_slope"), True), steps, per_node, *[_fmt_s(row.get(k)) for k in others]]
        lines.append(f"| `{task.key}` | " + " | ".join(cells) + " |")
    extra_sizes = [k for k in series_keys(graphs) if k not in series]
    for task in TASKS:
        row = results.get(task.key, {})
        shown = [k for k in extra_sizes if k in row]
        if shown:
            s = summary.get(task.key, {})
            sizes = ", ".join(f"{_size_label(graphs[k]['nodes'])}: {_fmt_s(row[k])} s" for k in shown)
            lines += ["", f"`{task.key}` also ran on {sizes}; its exponent is over "
                          f"{', '.join(_size_label(n) for n in s.get('sizes', []))} nodes."]
    notes = [f"- `{k}`: {v}" for k, v in TASK_NOTES.items() if k in results]
    lines += ["", *notes]
    before = doc.get("before")
    if before:
        lines += render_before_after(before, doc)
    lines += ["", "## Peak memory", "",
              "Peak RSS of the process in MB and, after `+`, what the task added to the process after its imports.",
              "", "| task | " + " | ".join(GRAPH_LABELS.get(k, k) for k in series + others) + " |",
              "|---" + "|---:" * len(series + others) + "|"]
    for task in TASKS:
        row = results.get(task.key)
        if row is None:
            continue
        cells = []
        for k in series + others:
            r = row.get(k, {})
            cells.append("–" if "peak_mb" not in r else f"{r['peak_mb']:.0f} (+{r['peak_mb'] - r['baseline_mb']:.0f})")
        lines.append(f"| `{task.key}` | " + " | ".join(cells) + " |")
    lines += render_slim_comparison(doc, series + others)
    problems = []
    for task in TASKS:
        for k in series_keys(graphs) + others:
            r = results.get(task.key, {}).get(k)
            if r and (r.get("error") or r.get("rolled_back")):
                problems.append(f"- `{task.key}` on {k}: {r.get('error') or '; '.join(r['rolled_back'])}")
    if problems:
        lines += ["", "## Errors and rollbacks", "", *problems]
    if doc.get("findings"):
        lines += ["", "## Findings", "", *doc["findings"]]
    return "\n".join(lines) + "\n"


def render_before_after(before: dict, doc: dict) -> list[str]:
    """The growth exponents of an earlier run (the code before the fixes) beside this run's."""
    summary = doc["summary"]
    b_graphs, b_results, b_summary = before["graphs"], before["results"], before["summary"]
    b_series = series_keys(b_graphs)
    lines = ["", "## Before and after the fixes", "",
             f"\"Before\" is {before['label']}, on {', '.join(_size_label(b_graphs[k]['nodes']) for k in b_series)}"
             " nodes; its exponent is the CPU-time slope over those sizes. \"After\" is this run: the CPU slope over",
             "the same step, and over all sizes.", "",
             "| task | before: " + " | before: ".join(f"{_size_label(b_graphs[k]['nodes'])} s" for k in b_series)
             + " | before: exponent (CPU) | after: same step (CPU) | after: all sizes (CPU) |",
             "|---" + "|---:" * (len(b_series) + 3) + "|"]
    for task in TASKS:
        if task.key not in b_results:
            continue
        cells = [_fmt_s(b_results[task.key].get(k)) for k in b_series]
        b = b_summary.get(task.key, {})
        a = summary.get(task.key, {})
        same_step = a.get("cpu_steps", [None])[0] if a.get("cpu_steps") else None
        cells += [_fmt_slope(b.get("cpu_slope"), True), _fmt_slope(same_step, True), _fmt_slope(a.get("cpu_slope"), True)]
        lines.append(f"| `{task.key}` | " + " | ".join(cells) + " |")
    return lines


def render_slim_comparison(doc: dict, keys: list[str]) -> list[str]:
    results = doc["results"]
    peers = [k for k in ("onnxslim", "onnxsim") if k in results]
    if not peers or "default" not in results:
        return []
    lines = ["", "## nnopt's default pipeline, onnxslim and onnxsim", "",
             "Nodes left and wall time on the same files (nnopt without verification: the peers do not verify).",
             "", "| model | nodes | nnopt default: nodes | s | " + " | ".join(f"{p}: nodes | s" for p in peers) + " |",
             "|---|---:|---:|---:|" + "---:|---:|" * len(peers)]
    for k in keys:
        mine = results["default"].get(k, {})
        cells = [f"{GRAPH_LABELS.get(k, k)}", f"{doc['graphs'][k]['nodes']:,}", f"{mine.get('nodes_after', '–')}",
                 _fmt_s(mine or None)]
        for peer in peers:
            theirs = results[peer].get(k, {})
            cells += [f"{theirs.get('nodes_after', '–')}", _fmt_s(theirs or None)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_plot(doc: dict, path: Path) -> None:
    """Time against nodes, log-log: whole jobs and third-party tools on the left, passes alone on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    graphs, results = doc["graphs"], doc["results"]
    series = series_keys(graphs)
    fig, panels = plt.subplots(1, 2, figsize=(15, 7), sharey=True)
    cmap = plt.get_cmap("tab10")
    for panel, (title, tasks) in zip(panels, [
        ("jobs, reference and third-party tools", [t for t in TASKS if t.kind != "pipeline" or not t.passes
                                                  or t.needs_data]),
        ("passes alone (optimize -p PASS --no-verify)", [t for t in TASKS if t.passes and not t.needs_data]),
    ]):
        for i, task in enumerate(tasks):
            row = results.get(task.key, {})
            pts = [(graphs[k]["nodes"], row[k]["seconds"]) for k in series if "seconds" in row.get(k, {})]
            capped = [(graphs[k]["nodes"], row[k]["timeout"]) for k in series if "timeout" in row.get(k, {})]
            if len(pts) + len(capped) < 2:
                continue
            slope = doc["summary"].get(task.key, {}).get("cpu_slope")
            style = "--" if task.kind in ("slim", "onnxsim") or task.needs_data else (":" if task.kind == "reference" else "-")
            color = cmap(i % 10)
            panel.plot(*zip(*pts), style, marker="o", color=color,
                       label=f"{task.key} ({slope:.2f})" if slope is not None else task.key)
            if capped:  # a timeout: the time is at least the limit
                panel.plot(*zip(*(pts[-1:] + capped)), style, color=color, alpha=0.4)
                panel.plot(*zip(*capped), marker="^", linestyle="none", color=color)
        if series:
            n0, n1 = graphs[series[0]]["nodes"], graphs[series[-1]]["nodes"]
            panel.plot([n0, n1], [0.05, 0.05 * n1 / n0], color="black", linewidth=3, alpha=0.25,
                       label="slope 1 (linear)")
        panel.set_xscale("log")
        panel.set_yscale("log")
        panel.set_xlabel("nodes (synthetic residual nets)")
        panel.set_title(title)
        panel.legend(fontsize=8, loc="upper left")
        panel.grid(True, which="both", alpha=0.3)
    panels[0].set_ylabel("wall time, s")
    fig.suptitle("nnopt: time against graph size (legend: CPU-time growth exponent; ▲ = timed out, at least)")
    fig.tight_layout()
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)


def machine_line() -> str:
    import numpy
    import onnx
    import onnx_graphsurgeon
    import onnxruntime
    import onnxsim
    import onnxslim

    return (f"Machine: {os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}, numpy "
            f"{numpy.__version__}, onnx {onnx.__version__}, onnx-graphsurgeon {onnx_graphsurgeon.__version__}, "
            f"onnxruntime {onnxruntime.__version__}, onnxslim {onnxslim.__version__}, onnxsim {onnxsim.__version__}; shared with other jobs, so "
            "expect ±20 % on any one wall time.")


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2k and 10k nets only; print, write nothing")
    parser.add_argument("--graphs", nargs="+", help="graph keys: " + ", ".join(g.key for g in GRAPHS))
    parser.add_argument("--tasks", nargs="+", help="task keys: " + ", ".join(t.key for t in TASKS))
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--out", default=str(ROOT / "docs" / "scale"), help="writes OUT.md, OUT.json, OUT.png")
    parser.add_argument("--before", metavar="JSON", help="an earlier run's .json, shown as 'before' beside this run")
    parser.add_argument("--before-label", default="an earlier run", help="how the report names --before")
    parser.add_argument("--render", metavar="JSON", help="measure nothing: rewrite .md/.png from this .json")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        task, model, data, shapes, repeats = args.child
        child_main(task, model, data or None, shapes, int(repeats))
        return
    out = Path(args.out)
    if args.render:
        doc = json.loads(Path(args.render).read_text())
        out.with_suffix(".md").write_text(render_markdown(doc))
        render_plot(doc, out.with_suffix(".png"))
        return
    unknown = [k for k in args.graphs or [] if k not in GRAPH_LABELS]
    unknown += [k for k in args.tasks or [] if k not in {t.key for t in TASKS}]
    if unknown:
        parser.error(f"unknown graph or task: {', '.join(unknown)}")
    tasks = [t for t in TASKS if not args.tasks or t.key in args.tasks]
    explicit = args.graphs is not None
    keys = args.graphs or (QUICK_GRAPHS if args.quick else [g.key for g in GRAPHS])
    selected = [g for g in GRAPHS if g.key in keys and any(runs_on(t, g, explicit) for t in tasks)]
    write = not (args.no_write or args.quick)
    results: dict[str, dict[str, dict]] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nnopt-scale-") as tmp:
        graphs = prepare_graphs(selected, Path(tmp))
        for spec in selected:
            for task in tasks:
                if spec.key not in graphs or not runs_on(task, spec, explicit):
                    continue
                result = run_child(task, graphs[spec.key], task.repeats or spec.repeats)
                results.setdefault(task.key, {})[spec.key] = result
                shown = (f"timeout after {result['timeout']} s" if "timeout" in result else result.get("error")
                         or f"{result['seconds']:.3f} s (CPU {result['cpu_seconds']:.3f} s), "
                            f"peak {result['peak_mb']:.0f} MB")
                print(f"[{time.perf_counter() - started:6.0f} s] {spec.key:12s} {task.key:30s} {shown}",
                      file=sys.stderr, flush=True)
    for g in graphs.values():
        g.pop("path")
        g.pop("data")
    doc: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_line(),
        "graphs": graphs,
        "results": results,
        "summary": summarise(results, graphs),
        "total_seconds": time.perf_counter() - started,
    }
    if args.before:
        earlier = json.loads(Path(args.before).read_text())
        doc["before"] = {"label": args.before_label, **{k: earlier[k] for k in ("graphs", "results", "summary")}}
    json_path = out.with_suffix(".json")
    if json_path.exists():
        doc.setdefault("findings", json.loads(json_path.read_text()).get("findings", []))
    print(render_markdown(doc))
    if write:
        json_path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        out.with_suffix(".md").write_text(render_markdown(doc))
        render_plot(doc, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
