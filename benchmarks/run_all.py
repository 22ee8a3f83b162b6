"""Run the issue #6 benchmark suite and write its headline summary, ``docs/benchmarks.md``.

    python benchmarks/run_all.py                  # scale, cost model, peers (~95 min on 2 cores), then the summary
    python benchmarks/run_all.py --only peers     # one or more of: scale cost_model peers
    python benchmarks/run_all.py --render         # measure nothing: rewrite docs/benchmarks.md from the JSONs

Each benchmark runs as its own script, in its own process, one after the other (never two timed runs at
once on a shared machine), and writes its full report beside its raw JSON and plot:
``docs/scale.*``, ``docs/cost_model.*``, ``docs/peers.*``. The summary here only reads those JSONs, so it
always quotes the figures of the reports it links to, with the date each was measured.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
DOCS = ROOT / "docs"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))


# ------------------------------------------------------------------------------------------------ the suite
#: The benchmarks in the order they run: name → the script's arguments for a full run. The cost model
#: re-times every point (``--measure``); the others always measure.
SUITE: dict[str, list[str]] = {
    "scale": ["scale.py"],
    "cost_model": ["cost_model.py", "--measure"],
    "peers": ["peers.py"],
}


def run_suite(names: list[str]) -> dict[str, float]:
    """Run each named benchmark script to completion; minutes per script. A failing script stops the
    suite (its report would be stale or half-written, and the summary must not quote it)."""
    minutes = {}
    for name in names:
        command = [sys.executable, str(BENCH / SUITE[name][0]), *SUITE[name][1:]]
        print(f"== {name}: {' '.join(['python', 'benchmarks/' + SUITE[name][0], *SUITE[name][1:]])}", flush=True)
        start = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, check=False)
        minutes[name] = (time.perf_counter() - start) / 60
        if done.returncode != 0:
            raise SystemExit(f"run_all: {name} failed with exit code {done.returncode}; docs/benchmarks.md not written")
        print(f"== {name}: done in {minutes[name]:.0f} min", flush=True)
    return minutes


# ------------------------------------------------------------------------------------------------ sections
def _load(name: str) -> dict[str, Any] | None:
    path = DOCS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _missing(name: str) -> list[str]:
    return [f"`docs/{name}.json` is missing: run `python benchmarks/run_all.py --only {name}`.", ""]


def peers_section(payload: dict[str, Any] | None) -> list[str]:
    lines = ["## Against the peers", ""]
    if payload is None:
        return lines + _missing("peers")
    import peers  # benchmarks/peers.py: the goal check and its wording live there, once

    info = payload["machine"]
    summaries = [(res, s) for res in payload["models"] for s in peers.summarise(res)]
    compared = [(res, s) for res, s in summaries if s["peer"] and s["nnopt"]]
    met = [(res, s) for res, s in compared if not s["shortfalls"]]
    trade_offs = [(res, s) for res, s in compared if s["shortfalls"] and "trade-off" in peers.verdict(s["shortfalls"])]
    lines += [
        f"Measured on {info['date']} by `python benchmarks/peers.py` "
        f"({', '.join(f'{k} {v}' for k, v in info['tools'].items())}); full report: [peers.md](peers.md), "
        "raw figures `docs/peers.json`.",
        "",
        f"**nnopt meets the goal in {len(met)} of the {len(compared)} (model, comparison) pairs** that have a "
        f"competing peer output; {len(trade_offs)} of the misses are trade-offs (smaller but less faithful, or "
        "larger but more faithful) rather than a peer output that is better on every count. Per cell: *yes*, "
        "or what nnopt misses against the strongest peer; *–*: no peer produced a competing output (it failed, "
        "or its file was no smaller than the lossless clean-up).",
        "",
    ]
    groups = list(peers.GROUPS)
    lines += [_row(["model", *(peers.GROUPS[g][1] for g in groups)]), _row(["---"] * (len(groups) + 1))]
    for res in payload["models"]:
        by_group = {s["group"]: s for s in peers.summarise(res)}
        cells = []
        for group in groups:
            s = by_group.get(group)
            if s is None or not (s["peer"] and s["nnopt"]):
                cells.append("–")
            elif not s["shortfalls"]:
                cells.append("yes")
            else:
                cells.append("no: " + ", ".join(r.split(" (")[0] for r in s["shortfalls"] if r != peers.MORE_FAITHFUL))
        lines.append(_row([res["model"], *cells]))
    lines += ["", "Medians over the models of each comparison (nnopt's setting and the strongest peer as in the "
              "report's summary; size and latency as ratios to the original model, fidelity as the lowest output "
              "cosine):", "",
              _row(["comparison", "pairs", "nnopt size", "peer size", "nnopt latency", "peer latency",
                    "nnopt cosine", "peer cosine"]),
              _row(["---", "---:", "---:", "---:", "---:", "---:", "---:", "---:"])]
    for group in groups:
        pairs = [s for _, s in compared if s["group"] == group]
        if not pairs:
            continue
        _, ratio = peers.SIZE_MEASURE.get(group, ("bytes", "bytes_ratio"))

        def median(side: str, key: str, fmt: str, pairs: list[dict[str, Any]] = pairs) -> str:
            values = [float(s[side][key]) for s in pairs if s[side].get(key) is not None]
            return format(statistics.median(values), fmt) if values else "–"

        cosine = group != "lossless"
        lines.append(_row([
            peers.GROUPS[group][1] + (" (zlib)" if ratio == "zlib_ratio" else ""), len(pairs),
            median("nnopt", ratio, ".3f"), median("peer", ratio, ".3f"),
            median("nnopt", "latency_ratio", ".2f"), median("peer", "latency_ratio", ".2f"),
            median("nnopt", "cosine_similarity", ".4f") if cosine else "lossless",
            median("peer", "cosine_similarity", ".4f") if cosine else "lossless",
        ]))
    failed = sorted({(r["tool"], r["setting"]) for res in payload["models"] for r in res["rows"]
                     if not peers._measured(r)})
    lines += ["", f"Peer runs that failed or were refused: {len(failed)} (tool, setting) kinds, listed with "
              "their messages in the report. nnopt's own runs: "
              + _nnopt_failures(payload, peers) + ".", "",
              "![size against fidelity per tool](peers.png)", ""]
    return lines


def _nnopt_failures(payload: dict[str, Any], peers: Any) -> str:
    failed = [f"{res['model']} `{r['setting']}`" for res in payload["models"] for r in res["rows"]
              if r["tool"] == "nnopt" and not peers._measured(r)]
    return "none failed" if not failed else f"{len(failed)} failed ({', '.join(failed)})"


#: The scale tasks the summary quotes (all are in the report).
SCALE_TASKS = ("analyze", "default", "default+verify", "kmeans:bits=4", "prune:ratio=0.3",
               "quantize:mode=static", "onnxslim", "onnxsim")


def scale_section(doc: dict[str, Any] | None) -> list[str]:
    lines = ["## Scale", ""]
    if doc is None:
        return lines + _missing("scale")
    import scale  # benchmarks/scale.py

    graphs, results, summary = doc["graphs"], doc["results"], doc["summary"]
    series = [k for k in scale.series_keys(graphs) if k in {g.key for g in scale.GRAPHS if g.default}]
    lines += [
        f"Measured on {doc['date']} by `python benchmarks/scale.py`; full report with every pass: "
        "[scale.md](scale.md). Median wall seconds in a fresh process on synthetic residual nets; the exponent "
        "is the log-log slope of time against nodes (1 = linear; the machine alone adds about "
        f"{_fmt_exponent(summary.get('reference', {}).get('slope'))}, see `reference` in the report); peak "
        "memory is what the task added to the process at the largest net.",
        "",
        _row(["task", *(f"{graphs[k]['nodes']:,} nodes" for k in series), "exponent", "exponent (CPU time)",
              f"added MB at {graphs[series[-1]]['nodes']:,} nodes" if series else "added MB"]),
        _row(["---", *(["---:"] * (len(series) + 3))]),
    ]
    for task in SCALE_TASKS:
        row = results.get(task)
        if row is None:
            continue
        s = summary.get(task, {})
        last = row.get(series[-1], {}) if series else {}
        added = f"{last['peak_mb'] - last['baseline_mb']:.0f}" if "peak_mb" in last else "–"
        lines.append(_row([f"`{task}`", *(scale._fmt_s(row.get(k)) for k in series),
                           _fmt_exponent(s.get("slope"), s.get("at_least", False)),
                           _fmt_exponent(s.get("cpu_slope")), added]))
    lines += ["", "![time against nodes](scale.png)", ""]
    return lines


def _fmt_exponent(value: float | None, at_least: bool = False) -> str:
    return "–" if value is None else ("≥ " if at_least else "") + f"{value:.2f}"


def cost_model_section(payload: dict[str, Any] | None) -> list[str]:
    lines = ["## Cost model against onnxruntime", ""]
    if payload is None:
        return lines + _missing("cost_model")
    import cost_model  # benchmarks/cost_model.py

    summary = payload["summary"]
    calibrated = summary["calibrated"]
    signs = summary.get("signs", {"judged": 0, "correct": 0})
    # Issue #16: Spearman >= 0.97, median error <= x 1.25, every sign beyond the A/A noise right.
    goal = (calibrated["spearman"] >= 0.97 and math.exp(calibrated["median_abs_log_ratio"]) <= 1.25
            and signs["correct"] == signs["judged"])
    lines += [
        f"Measured on {payload['machine'].get('date', '?')} by `python benchmarks/cost_model.py --measure`; full "
        "report with every point and the calibration probes: [cost_model.md](cost_model.md).",
        "",
        f"Over {summary['points']} (model, variant) points (the real models and their optimized variants), the "
        "rank correlation of nnopt's estimated latency with onnxruntime's measured latency, and the typical "
        "error of the estimate (the median of |log(estimate / measured)|, as a factor):",
        "",
        _row(["hardware profile", "Spearman", "median error factor", "median bias"]),
        _row(["---", "---:", "---:", "---:"]),
    ]
    for key, label in (("default", f"built-in (`{payload['default_profile']['name']}`, roofline)"),
                       ("calibrated", "calibrated (`nnopt calibrate` on this machine)")):
        s = summary[key]
        lines.append(_row([label, f"{s['spearman']:.3f}", f"× {math.exp(s['median_abs_log_ratio']):.2f}",
                           f"× {math.exp(s['median_log_ratio']):.2f}"]))
    lines += ["", f"The calibrated estimate predicted the sign of {signs['correct']} of {signs['judged']} pass "
              "latency changes larger than the A/A noise. Goal (issue #16: Spearman ≥ 0.97, median error ≤ × 1.25 "
              f"with the calibrated profile, every such sign right): **{'met' if goal else 'not met'}**. A bias "
              "below × 1 means the estimate is too low.", ""]
    lines += [*cost_model.busy_warning(payload), "![estimated against measured latency](cost_model.png)", ""]
    return lines


SECTIONS: dict[str, Callable[[dict[str, Any] | None], list[str]]] = {
    "peers": peers_section,
    "scale": scale_section,
    "cost_model": cost_model_section,
}


def render() -> str:
    lines = [
        "# Benchmarks: headline results",
        "",
        "Written by `python benchmarks/run_all.py` from the JSON of the three benchmark reports below (each "
        "section says when it was measured). Every figure is a ratio against the original model or a peer "
        "measured in the same run, or a median; the machine is 2 shared cores, so latency ratios within "
        "about ±0.1 of each other are a tie. `benchmarks/README.md` says how each benchmark measures.",
        "",
        "**Goal** (README): at equal or better fidelity, nnopt's output is smaller and at least as fast as every "
        "peer's on every model; where it is not, the tables show it and the reports say why.",
        "",
    ]
    for name, section in SECTIONS.items():
        lines += section(_load(name))
    return "\n".join(lines).rstrip() + "\n"


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(SUITE), help="run only these benchmarks")
    parser.add_argument("--render", action="store_true", help="measure nothing; rewrite docs/benchmarks.md")
    parser.add_argument("--out", default=str(DOCS / "benchmarks.md"), help="the summary to write")
    args = parser.parse_args(argv)
    if not args.render:
        run_suite(args.only or list(SUITE))
    write_atomically(Path(args.out), render())
    print(f"wrote {Path(args.out).relative_to(ROOT) if Path(args.out).is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
