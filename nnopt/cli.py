"""The ``nnopt`` command line. Exit codes: 0 success, 1 internal error, 2 bad input, 3 a pass failed under --strict."""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import json
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from nnopt.errors import InputError, NnoptError, OutputError, first_line
from nnopt.search.objectives import OBJECTIVES

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_PASS_FAILED = 3
#: A reader closed the pipe nnopt was writing to (128 + SIGPIPE, what a shell reports for such a tool).
EXIT_BROKEN_PIPE = 141


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the problem (exit code 2), and an epilog may be
    computed when help is shown (``epilog_factory``: ``optimize --help`` lists the registered passes)."""

    epilog_factory: Callable[[], str] | None = None

    def error(self, message: str) -> None:  # type: ignore[override]
        # main() prints "nnopt: error: "; the command after it, not "nnopt" again.
        command = self.prog.removeprefix("nnopt").strip()
        raise InputError(f"{command + ': ' if command else ''}{message} (see {self.prog} --help)")

    def format_help(self) -> str:
        if self.epilog_factory is not None:
            self.epilog = self.epilog_factory()
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    from nnopt import __version__

    parser = _Parser(prog="nnopt", description="Optimize ONNX models: ONNX in, smaller and faster ONNX out.")
    parser.add_argument("--version", action="version", version=f"nnopt {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    parser.add_argument(
        "--no-plugins",
        action="store_true",
        help="do not load third-party plugins (same as NNOPT_NO_PLUGINS=1)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_analyze(sub)
    _add_optimize(sub)
    passes = sub.add_parser("passes", help="list the registered passes and their options; NAME: one pass's full help")
    passes.add_argument("name", nargs="?", default=None, metavar="NAME", help="show this pass's full help")
    passes.add_argument("--json", action="store_true")
    sub.add_parser("plugins", help="list loaded plugins and where they come from").add_argument("--json",
                                                                                                action="store_true")
    _add_calibrate(sub)
    _add_diff(sub)
    for command in sub.choices.values():
        # Global flags are accepted after the command too (`nnopt optimize ... --no-plugins`, as a build step
        # appends them); SUPPRESS keeps a command that does not repeat a flag from resetting it.
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        command.add_argument("--no-plugins", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _add_analyze(sub: Any) -> None:
    analyze = sub.add_parser("analyze", help="per-node cost: params, MACs, FLOPs, bytes, estimated latency and "
                                             "energy")
    analyze.add_argument("model")
    analyze.add_argument("--json", action="store_true", help="one JSON object on stdout")
    analyze.add_argument("--hardware", default=None,
                         help="profile name, flops=...,bandwidth=..., or a PROFILE.json from nnopt calibrate")
    analyze.add_argument("--input-shape", action="append", default=[], metavar="NAME=DIMS",
                         help="concrete shape for a dynamic input, e.g. x=1,3,224,224 (repeatable)")
    analyze.add_argument("--measure", action="store_true", help="also time the model in onnxruntime")
    analyze.add_argument("--runs", type=int, default=20, help="timed runs for --measure (median is reported)")
    analyze.add_argument("--run-time-limit", type=_seconds, default=None, metavar="SECONDS",
                         help="stop one onnxruntime run (shape probing, --measure's first run) after this long "
                              "(default 60); --measure then exits 2")
    analyze.add_argument("--data", default=None,
                         help=".npz of inputs: its first sample's shapes are costed (dynamic dims; --input-shape "
                              "wins) and timed by --measure; default: generated inputs")
    analyze.add_argument("--top", type=int, default=None, help="show only the N most expensive nodes")
    analyze.add_argument("--batch", type=_positive_int, default=None, metavar="N",
                         help="cost (and with --measure, time) one run of N samples: every input's dynamic or 1 "
                              "batch dim set to N; reports latency per batch and throughput = N / latency")


def _add_optimize(sub: Any) -> None:
    opt = sub.add_parser("optimize", help="run a pass pipeline and write the optimized model",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    opt.epilog_factory = _optimize_epilog
    opt.add_argument("model")
    opt.add_argument("-o", "--output", required=True, help="where to write the optimized model")
    opt.add_argument("-p", "--pass", dest="passes", action="append", default=None, metavar="PASS[:k=v,...]",
                     help="a pass to run, with options (repeatable, in order); default: the lossless pipeline")
    opt.add_argument("--pipeline", default=None, metavar="FILE",
                     help="a pipeline file (.toml or .json): passes, options, verification settings; "
                          "flags given on the command line override it")
    opt.add_argument("--data", default=None, help=".npz of reference inputs (arrays keyed by input name)")
    opt.add_argument("--report", default=None, help="write the pipeline report as JSON")
    opt.add_argument("--html", default=None, metavar="REPORT.html",
                     help="write the report as one self-contained HTML page: the per-pass table, per-node cost "
                          "before/after, per-layer SQNR and errors, fidelity, and a search's Pareto plot")
    opt.add_argument("--strict", action="store_true", default=None,
                     help="a pass that is rolled back is an error (exit 3)")
    opt.add_argument("--hardware", default=None,
                     help="profile for the cost estimates: a name, flops=...,bandwidth=..., or PROFILE.json")
    opt.add_argument("--input-shape", action="append", default=[], metavar="NAME=DIMS")
    opt.add_argument("--seed", type=_non_negative_int, default=None, help="seed for generated inputs and randomised passes (default 0)")
    opt.add_argument("--max-rel-error", type=float, default=None, help="lossy budget: max relative output error")
    opt.add_argument("--min-cosine", type=float, default=None, help="lossy budget: min cosine similarity")
    opt.add_argument("--min-top1", type=float, default=None, help="lossy budget: min top-1 agreement")
    opt.add_argument("--no-verify", action="store_true", default=None,
                     help="skip numerical verification in onnxruntime")
    opt.add_argument("--run-time-limit", type=_seconds, default=None, metavar="SECONDS",
                     help="stop one onnxruntime run of verification after this long and report verification "
                          "impossible (default 60; a valid Loop may never end)")
    opt.add_argument("--fixed-point", choices=["auto", "on", "off"], default=None,
                     help="repeat the pipeline until nothing changes (auto, the default: for the default pipeline)")
    opt.add_argument("--external-data", choices=["auto", "on", "off"], default="auto",
                     help="write weights to OUTPUT.<hash>.data, named after its content (auto: if the input had external data or is > 1.8 GB)")
    _add_search_flags(opt)
    opt.add_argument("--measure", action="store_true",
                     help="also time the input and the output model in onnxruntime (interleaved runs; with --json: "
                          "measured)")
    opt.add_argument("--runs", type=_positive_int, default=20, help="timed runs of each model for --measure")
    opt.add_argument("--ops", action="store_true",
                     help="also print the node count of each op type before and after (with --json: op_types)")
    opt.add_argument("--no-provenance", action="store_true",
                     help="do not record nnopt's version, the pipeline, the options and the seed in the output "
                          "model's metadata_props")
    opt.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    opt.add_argument("-q", "--quiet", action="store_true",
                     help="print nothing on success: no table, no progress (warnings and errors still go to stderr; "
                          "with --json: JSON on stdout, nothing on stderr, the warnings in the report)")


def _optimize_epilog() -> str:
    """``optimize --help``'s tail: the -p syntax with examples, then every registered pass in one line."""
    import shutil

    from nnopt.pipeline.spec import DEFAULT_PIPELINE
    from nnopt.plugin_manager import build_plugins

    width = max(60, min(shutil.get_terminal_size().columns, 120)) - 2
    plugins = build_plugins(load_entry_points="--no-plugins" not in sys.argv)  # the env var: build_plugins
    lines = [
        "passes (-p NAME:key=value,key=value; repeat -p for several, run in order):",
        "  nnopt optimize model.onnx -o small.onnx -p default -p prune:ratio=0.3,round_to=4 \\",
        "      -p quantize:mode=static --data calib.npz --min-top1 0.99",
        f"  default: the lossless clean-ups ({', '.join(dict.fromkeys(DEFAULT_PIPELINE))}),",
        "  repeated until nothing changes; `nnopt passes NAME` shows a pass's options in full.",
        "",
    ]
    name_width = max((len(n) for n in plugins.passes), default=0)
    for name in sorted(plugins.passes):
        cls = plugins.passes[name].cls
        head = f"  {name.ljust(name_width)}  {'lossy   ' if cls.lossy else 'lossless'}  "
        lines.extend(_wrap(cls.summary(), width, head, " " * len(head)))
    return "\n".join(lines)


def _add_search_flags(opt: Any) -> None:
    """``optimize --level``: the automatic search under an accuracy constraint (nnopt.search)."""
    group = opt.add_argument_group("automatic search (--level): the smallest or fastest model within --max-drop")
    group.add_argument("--level", type=int, choices=[1, 2, 3], default=None,
                       help="1: int8 with accuracy control; 2: + per-layer pruning, low-rank, k-means chosen by "
                            "sensitivity; 3: + a joint Optuna search and distillation until --time-budget")
    group.add_argument("--eval", dest="eval_data", default=None, metavar="EVAL.npz",
                       help="held-out data the drop is measured on (default: a seeded quarter of --data)")
    group.add_argument("--max-drop", type=float, default=None,
                       help="largest metric drop accepted, in [0, 1] (default 0.01)")
    group.add_argument("--metric", default=None,
                       help="top1 (needs labels), agreement, cosine, a plugin's metric, or MODULE:FUNCTION "
                            "(default: agreement for class scores, cosine otherwise)")
    group.add_argument("--labels", dest="labels_key", default="labels", metavar="KEY",
                       help="the array of class labels in the data files (default: labels)")
    group.add_argument("--drop-type", choices=["absolute", "relative"], default="absolute")
    group.add_argument("--objective", choices=list(OBJECTIVES), default="size",
                       help="what the search minimises within the drop (default: size; latency and energy: the "
                            "cost model's estimates, latency measured at the end)")
    group.add_argument("--time-budget", type=_seconds, default=None, metavar="SECONDS",
                       help="stop searching after this long (level 3 default: 600)")
    group.add_argument("--workers", type=_positive_int, default=None,
                       help="local processes evaluating candidates (default: the number of cores)")
    group.add_argument("--ray", dest="ray_address", default=None, metavar="ADDRESS",
                       help="evaluate candidates on this Ray cluster (host:port); needs nnopt[ray]")
    group.add_argument("--study", default=None, metavar="DIR",
                       help="keep every evaluated candidate here; a repeated or interrupted run resumes from it")


def _add_calibrate(sub: Any) -> None:
    calibrate = sub.add_parser("calibrate", help="measure this machine in onnxruntime and write a hardware profile")
    calibrate.add_argument("-o", "--output", default=None, metavar="PROFILE.json",
                           help="write the profile here (default: print it on stdout); use it with --hardware")
    calibrate.add_argument("--runs", type=int, default=20, help="timed runs per probe and round (median is kept)")
    calibrate.add_argument("--rounds", type=int, default=5,
                           help="interleaved rounds over the probes (the least disturbed one is kept)")
    calibrate.add_argument("--name", default="calibrated", help="the profile's name")
    calibrate.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                           help="onnxruntime intra-op threads to measure with, recorded in the profile (default: "
                                "onnxruntime's, one per core); int8 gains depend on it: measure at the count the "
                                "models will run with")
    calibrate.add_argument("--quick", action="store_true",
                           help="tiny probes: checks the machinery in a second; the figures are not representative")


def _add_diff(sub: Any) -> None:
    diff = sub.add_parser("diff", help="compare two versions of a model: ops, params, FLOPs, bytes, latency, fidelity")
    diff.add_argument("a", metavar="A.onnx", help="the reference model (say, the original)")
    diff.add_argument("b", metavar="B.onnx", help="the model compared with it (say, the optimized one)")
    diff.add_argument("--data", default=None,
                      help=".npz of inputs B's outputs are compared with A's on (default: 16 generated samples); "
                           "its first sample's shapes are costed and timed")
    diff.add_argument("--measure", action="store_true", help="also time both models in onnxruntime (interleaved)")
    diff.add_argument("--runs", type=_positive_int, default=20, help="timed runs of each model for --measure")
    diff.add_argument("--hardware", default=None,
                      help="profile for the latency estimates: a name, flops=...,bandwidth=..., or PROFILE.json")
    diff.add_argument("--input-shape", action="append", default=[], metavar="NAME=DIMS",
                      help="concrete shape for a dynamic input, e.g. x=1,3,224,224 (repeatable)")
    diff.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the generated inputs (default 0)")
    diff.add_argument("--json", action="store_true", help="one JSON object on stdout")


class _LowerCaseLevel(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record = logging.makeLogRecord({**record.__dict__, "levelname": record.levelname.lower()})
        return super().format(record)


def _non_negative_int(text: str) -> int:
    """An integer of at least 0 (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    """An integer of at least 1 (argparse type)."""
    value = _non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _seconds(text: str) -> float:
    """A positive, finite number of seconds (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (0 < value < math.inf):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="nnopt: %(message)s")
    # Log lines read like nnopt's own: "nnopt: warning: ..." (the level in lower case, as errors are).
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler:  # basicConfig's own, not a test harness's
            handler.setFormatter(_LowerCaseLevel("nnopt: %(levelname)s: %(message)s"))
    if not debug:
        _quiet_third_party()
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            build_parser().print_help()
            return EXIT_BAD_INPUT
        return _COMMANDS[args.command](args)
    except NnoptError as exc:
        if debug:
            raise
        for line in exc.lines():
            print(f"nnopt: error: {line}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("nnopt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`nnopt passes --json | head`): stop quietly, as a Unix tool killed by
        # SIGPIPE does. stdout goes to /dev/null so that the interpreter's final flush fails silently too.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except Exception as exc:  # boundary: the whole program
        if debug:
            raise
        print(f"nnopt: internal error: {type(exc).__name__}: {first_line(exc)} (rerun with --debug for a traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL


# ---------------------------------------------------------------------------------------------- commands
def _first_sample(args: argparse.Namespace, model: Any) -> dict[str, Any] | None:
    """The first sample of ``--data`` (None without it): its shapes are what is costed and timed."""
    if not args.data:
        return None
    from nnopt.runtime import load_samples, make_session

    samples = load_samples(args.data, make_session(model))
    if not samples:
        raise InputError(f"data file {args.data}: holds no samples")
    return samples[0]


def _measure(args: argparse.Namespace, proto: Any, shapes: dict[str, list[int]],
             feeds: dict[str, Any] | None) -> dict[str, Any]:
    """``analyze --measure``: latency on the first sample of ``--data``, or on generated inputs."""
    from nnopt.analysis.shapes import FRESH, infer_shapes
    from nnopt.cost.timing import measure_latency

    return measure_latency(proto, feeds, runs=args.runs, input_shapes=shapes, shapes=infer_shapes(proto, FRESH))


def cmd_analyze(args: argparse.Namespace) -> int:
    from nnopt.cost import analyze, parse_input_shapes
    from nnopt.cost.inputs import batched_feeds, format_shapes, free_batch_dims, sample_input_shapes
    from nnopt.ir.model import load_model
    from nnopt.runtime import run_time_limit

    plugins = _plugins(args)
    hardware = _hardware(args.hardware, plugins)
    given = parse_input_shapes(args.input_shape)
    model = load_model(args.model)
    sample = _first_sample(args, model)
    # The dynamic dims the data fixes are costed at the data's shapes (--input-shape wins).
    shapes = given if sample is None else sample_input_shapes(model.to_proto().graph, sample, given)
    limit = contextlib.nullcontext() if args.run_time_limit is None else run_time_limit(args.run_time_limit)
    with limit:  # shape probing runs the model too
        report = analyze(model, hardware=hardware, input_shapes=shapes, rules=plugins.cost_rules, batch=args.batch)
        timed = model.to_proto()
        if args.batch is not None:  # timed at the batch costed: generated inputs of its shapes, or the sample repeated
            given, sample = report.input_shapes, batched_feeds(sample, report.input_shapes)
            timed = free_batch_dims(timed, report.input_shapes)
        measured = _measure(args, timed, given, sample) if args.measure else None
    if measured is not None:
        measured["batch"] = report.batch
        measured["throughput_per_s"] = report.batch / measured["median_s"] if measured["median_s"] > 0 else 0.0
    from_data = {n: d for n, d in shapes.items() if n not in parse_input_shapes(args.input_shape)}
    if from_data:
        report.notes.insert(0, f"input shapes from the first sample of {Path(args.data).name}: "
                               f"{format_shapes(from_data)}")
    warning = report.uncosted_warning()
    if warning is not None:
        print(f"nnopt: warning: {warning}", file=sys.stderr)
    if args.json:
        out = report.to_dict()
        if measured is not None:
            out["totals"]["measured_latency_s"] = measured["median_s"]
            out["measured"] = measured
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(report.format_table(max_rows=args.top))
        if measured is not None:
            from nnopt.cost.report import time_unit

            est = report.totals["latency_s"]
            scale, unit = time_unit(est)  # the table's unit
            print(
                f"latency: estimated {est / scale:.3f} {unit} ({report.hardware.name}), measured "
                f"{measured['median_s'] / scale:.3f} {unit} (onnxruntime CPU, median of {measured['runs']} runs)"
            )
            if report.batch != 1:
                print(f"throughput at batch {report.batch}: estimated {report.totals['throughput_per_s']:,.1f}, "
                      f"measured {measured['throughput_per_s']:,.1f} inferences/s")
    return EXIT_OK


def cmd_optimize(args: argparse.Namespace) -> int:
    from nnopt.cli_report import collect_warnings

    src = Path(args.model)
    dst = Path(args.output)
    report_path = Path(args.report) if args.report else None
    plot_path = report_path.with_suffix(".png") if report_path and args.level is not None else None
    html_path = Path(args.html) if args.html else None
    input_files = _check_outputs(src, [dst] + [p for p in (report_path, plot_path, html_path) if p is not None])
    reports = _ReportFiles(report_path, html_path)
    if args.pipeline and args.passes:
        raise InputError("nnopt optimize: give the passes either with -p or in --pipeline FILE, not both")
    _check_search_flags(args)
    with collect_warnings(silent=args.json and args.quiet) as warned:
        if args.level is not None:
            return _cmd_search(args, src, dst, reports, input_files, warned)
        return _cmd_pipeline(args, src, dst, reports, input_files, warned)


class _ReportFiles:
    """Where the report goes (``--report`` JSON, ``--html`` page): both rendered from one report dict."""

    def __init__(self, json_path: Path | None, html_path: Path | None) -> None:
        self.json_path = json_path
        self.html_path = html_path

    def side_files(self, data: Callable[[], dict[str, Any]]) -> list[tuple[Path, Callable[[], bytes]]]:
        """(path, bytes) of each report file asked for; ``data`` gives the report dict (called once each)."""
        from nnopt.cli_report import report_text
        from nnopt.html_report import render

        files: list[tuple[Path | None, Callable[[], bytes]]] = [
            (self.json_path, lambda: report_text(data()).encode()), (self.html_path, lambda: render(data()).encode())]
        return [(path, content) for path, content in files if path is not None]

    def write(self, data: dict[str, Any]) -> None:
        """Write the report files of a run that ends without a model (exit 3): all of them, or none."""
        _write_outputs(None, None, None, set(), self.side_files(lambda: data))


def _cmd_pipeline(args: argparse.Namespace, src: Path, dst: Path, reports: _ReportFiles,
                  input_files: set[Path], warned: Any) -> int:
    """``optimize`` with a pass pipeline: run it, then write the model and the report together.

    A pass rolled back under --strict still gets its report (outcome ``rolled_back_strict``, no model).
    """
    from nnopt.api import Pipeline
    from nnopt.cli_measure import measured_line
    from nnopt.cli_report import pipeline_provenance, pipeline_report, report_text
    from nnopt.cost import parse_input_shapes
    from nnopt.errors import PassFailedError
    from nnopt.ir.model import bytes_on_disk, load_model
    from nnopt.pipeline.progress import StreamProgress
    from nnopt.pipeline.table import int8_estimate_note, op_type_counts, op_type_table
    from nnopt.provenance import stamp

    plugins = _plugins(args, warned)
    # Validate and build everything once, before loading the model: a typo in a pipeline file costs no time.
    pipeline = Pipeline.from_file(args.pipeline, plugins) if args.pipeline else Pipeline(args.passes)
    specs = pipeline.passes
    flags = _command_line_settings(args, pipeline, parse_input_shapes(args.input_shape), plugins)
    pipeline = pipeline.replace(**flags).resolved(plugins)
    model = load_model(src)
    ops_before = op_type_counts(model.all_graphs()) if args.ops else None
    progress = None if args.quiet or args.json else StreamProgress(sys.stderr)
    named = _named_positions(specs, plugins)

    def render(report: Any, *, written: bool, strict_failed: bool = False, **extra: Any) -> dict[str, Any]:
        return pipeline_report(report, pipeline, source=src, output=dst, written=written,
                               strict_failed=strict_failed, warned=warned, extra=extra)

    try:
        model, report = pipeline.run(model, plugins=plugins, progress=progress)
    except PassFailedError as exc:
        if exc.report is None:
            raise
        _report_failure(args, reports, render(exc.report, written=False, strict_failed=True),
                        exc.report.format_table())
        raise
    _warn_named_unchanged(report, named, warned)
    external = {"auto": None, "on": True, "off": False}[args.external_data]
    extra: dict[str, Any] = {}
    if ops_before is not None:
        extra["op_types"] = {"before": ops_before, "after": op_type_counts(model.all_graphs())}
    if args.measure:  # before writing: the report carries the figures, and a failure leaves nothing behind
        extra["measured"] = _measure_optimized(args, src, pipeline, model)
    if not args.no_provenance:
        stamp(model, pipeline_provenance(pipeline))
    # The report is rendered once the model is on disk (it holds the file's size), and only once.
    final_report = functools.cache(lambda: render(report, written=True, **extra))
    _write_outputs(model, dst, external, input_files, reports.side_files(final_report))
    if args.json:
        sys.stdout.write(report_text(final_report()))
    elif not args.quiet:
        print(report.format_table(file_bytes=(bytes_on_disk(src), bytes_on_disk(dst))))
        if "measured" in extra:
            print(measured_line(extra["measured"]))
        if "op_types" in extra:
            print(op_type_table(extra["op_types"]["before"], extra["op_types"]["after"]))
        note = int8_estimate_note(pipeline.hardware, {n.op for g in model.all_graphs() for n in g.nodes}, str(dst))
        if note is not None:
            print(f"note: {note}")
        print(f"wrote {dst}")
    return EXIT_OK


def _report_failure(args: argparse.Namespace, reports: _ReportFiles, data: dict[str, Any], table: str | None) -> None:
    """Exit 3 still has a report: written to --report and --html and printed by --json (the table, for a
    person, otherwise); the error line follows on stderr."""
    from nnopt.cli_report import report_text

    reports.write(data)
    if args.json:
        sys.stdout.write(report_text(data))
    elif not args.quiet and table is not None:
        print(table)


def _measure_optimized(args: argparse.Namespace, src: Path, pipeline: Any, model: Any) -> dict[str, Any]:
    """``optimize --measure``: both models timed on the first sample of the data, or on generated inputs."""
    from nnopt.cli_measure import measure_before_after
    from nnopt.runtime import load_samples, make_session

    data = pipeline.data
    samples = load_samples(str(data), make_session(model)) if data else []
    return measure_before_after(src, model, args.runs, samples[0] if samples else None, dict(pipeline.input_shapes))


def _named_positions(specs: Any, plugins: Any) -> list[bool]:
    """For each pass of the built pipeline, whether the user named it (``-p NAME`` or a file's ``name``)
    rather than getting it from the ``default`` pipeline (whose passes often have nothing to do)."""
    from nnopt.pipeline.spec import DEFAULT_PIPELINE, parse_pass_spec

    named: list[bool] = []
    for spec in specs or ["default"]:
        # A spec is a string, a (name, options) pair, or a built Pass (always one the user named).
        name, values = parse_pass_spec(spec) if isinstance(spec, str) else spec if isinstance(spec, tuple) else ("", {})
        if name == "default" and not values:
            named += [False] * sum(1 for n in DEFAULT_PIPELINE if n in plugins.passes)
        else:
            named.append(True)
    return named


def _warn_named_unchanged(report: Any, named: list[bool], warn: Callable[[str], None]) -> None:
    """A pass the user asked for by name that changed nothing is a warning (the exit code stays 0)."""
    first = [r for r in report.passes if r.iteration == 0]
    for record, asked in zip(first, named):
        if asked and record.status == "unchanged":
            why = record.reason or "it found nothing to change in this model"
            warn(f"{record.name} changed nothing: {why}")


#: Flags that only the search (--level) reads, with their defaults: given without --level they are an error.
_SEARCH_ONLY = {"eval_data": None, "max_drop": None, "metric": None, "labels_key": "labels", "drop_type": "absolute",
                "objective": "size", "time_budget": None, "workers": None, "ray_address": None, "study": None}
#: Pipeline flags the search does not take (it chooses the passes and judges them on --eval itself).
_PIPELINE_ONLY = ("passes", "pipeline", "max_rel_error", "min_cosine", "min_top1", "no_verify", "fixed_point")


def _check_search_flags(args: argparse.Namespace) -> None:
    """--level's flags only with --level; the pipeline's own flags never with it; --level needs --data."""
    if args.level is None:
        given = [k for k, default in _SEARCH_ONLY.items() if getattr(args, k) != default]
        if given:
            flag = given[0].replace("_data", "").replace("_address", "").replace("_key", "s").replace("_", "-")
            raise InputError(f"nnopt optimize: --{flag} belongs to the automatic search: add --level 1, 2 or 3")
        return
    clash = [k for k in _PIPELINE_ONLY if getattr(args, k) not in (None, False, [])]
    if clash:
        flag = {"passes": "-p", "pipeline": "--pipeline"}.get(clash[0], "--" + clash[0].replace("_", "-"))
        raise InputError(f"nnopt optimize: {flag} cannot be combined with --level (the search picks the passes "
                         "and judges them with --max-drop on --eval)")
    if not args.data:
        raise InputError("nnopt optimize --level needs --data: calibration samples (and, without --eval, the "
                         "held-out samples the drop is measured on)")
    if args.max_drop is not None and not (0.0 <= args.max_drop <= 1.0):
        raise InputError(f"--max-drop: expected a number in [0, 1], got {args.max_drop}")


def _cmd_search(args: argparse.Namespace, src: Path, dst: Path, reports: _ReportFiles,
                input_files: set[Path], warned: Any) -> int:
    """``optimize --level N``: search, then write the model, the report and its plot together."""
    from nnopt.cli_report import report_text, search_provenance, search_report
    from nnopt.cost import parse_input_shapes
    from nnopt.provenance import stamp
    from nnopt.search.driver import SearchFailed, SearchSettings, search

    plugins = _plugins(args, warned)
    settings = SearchSettings(
        level=args.level, max_drop=0.01 if args.max_drop is None else args.max_drop, metric=args.metric,
        labels_key=args.labels_key, drop_type=args.drop_type, objective=args.objective,
        time_budget=args.time_budget, workers=args.workers, ray_address=args.ray_address, study=args.study,
        seed=args.seed or 0, strict=bool(args.strict), input_shapes=parse_input_shapes(args.input_shape),
        hardware=_hardware(args.hardware, plugins), load_plugins=not args.no_plugins)
    log = None if args.quiet or args.json else (lambda line: print(f"nnopt: {line}", file=sys.stderr))
    if args.ray_address is not None:
        for module in ("ray", "optuna"):  # ray logs through the root logger at INFO
            logging.getLogger(module).setLevel(logging.WARNING)

    def render(report: Any, *, written: bool, exit_code: int = EXIT_OK) -> dict[str, Any]:
        return search_report(report, settings, source=src, output=dst, written=written, exit_code=exit_code,
                             warned=warned)

    try:
        model, report = search(src, data=args.data, eval_data=args.eval_data, settings=settings, log=log)
    except SearchFailed as exc:
        _report_failure(args, reports, render(exc.report, written=False, exit_code=exc.exit_code), None)
        raise
    external = {"auto": None, "on": True, "off": False}[args.external_data]
    if not args.no_provenance:
        stamp(model, search_provenance(report, settings))
    report_path = reports.json_path
    plot = _search_plot(report, warned) if report_path is not None else None
    final_report = functools.cache(lambda: render(report, written=True))
    extras = reports.side_files(final_report)
    if report_path is not None and plot is not None:
        extras.append((report_path.with_suffix(".png"), lambda: plot))
    _write_outputs(model, dst, external, input_files, extras)  # the model, the reports and the plot: all or none
    if args.json:
        sys.stdout.write(report_text(final_report()))
    elif not args.quiet:
        print("\n".join([*report.summary_lines(), f"wrote {dst}"]))
    return EXIT_OK


def _search_plot(report: Any, warned: Any) -> bytes | None:
    """The report's Pareto plot (PNG), or None with a warning when matplotlib (nnopt[search]) is missing."""
    try:
        return bytes(report.plot_png())
    except InputError as exc:
        warned(f"no plot beside the report: {exc}")
        return None


def _command_line_settings(
    args: argparse.Namespace, pipeline: Any, shapes: dict[str, list[int]], plugins: Any
) -> dict[str, Any]:
    """The settings given as flags: they override a pipeline file's (flags not given change nothing)."""
    from dataclasses import replace

    from nnopt.pipeline.manager import Budget

    settings: dict[str, Any] = {}
    if args.data is not None:
        settings["data"] = args.data
    if args.strict is not None:
        settings["strict"] = args.strict
    if args.seed is not None:
        settings["seed"] = args.seed
    if args.no_verify is not None:
        settings["verify"] = not args.no_verify
    if args.run_time_limit is not None:
        settings["run_time_limit"] = args.run_time_limit
    if args.hardware is not None:
        settings["hardware"] = _hardware(args.hardware, plugins)
    if args.fixed_point is not None:
        settings["fixed_point"] = {"auto": None, "on": True, "off": False}[args.fixed_point]
    if shapes:
        settings["input_shapes"] = {**pipeline.input_shapes, **shapes}
    budget = {}
    for key in ("max_rel_error", "min_cosine", "min_top1"):
        value = getattr(args, key)
        if value is not None:
            try:
                budget[key] = Budget.checked(key, value)
            except ValueError as exc:  # the same ranges as a pipeline file's [verify] and the Python API
                raise InputError(f"--{key.replace('_', '-')}: {exc}") from None
    if budget:
        settings["budget"] = replace(pipeline.budget, **budget)
    return settings


def cmd_passes(args: argparse.Namespace) -> int:
    from nnopt.plugin_manager import get_pass_class

    plugins = _plugins(args)
    if args.name is not None:
        get_pass_class(plugins, args.name)  # an unknown name: one line, a close match suggested, exit 2
    entries = []
    for name in sorted(plugins.passes) if args.name is None else [args.name]:
        entry = plugins.passes[name]
        entries.append(
            {
                "name": name,
                "lossy": entry.cls.lossy,
                "plugin": entry.plugin,
                "summary": entry.cls.summary(),
                "doc": (entry.cls.__doc__ or "").strip(),
                "options": entry.cls.Options.describe(),
            }
        )
    if args.json:
        json.dump({"passes": entries}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK
    if args.name is not None:
        print(_pass_help(entries[0]))
        return EXIT_OK
    print(_pass_list(entries))
    _print_plugin_errors(plugins)
    return EXIT_OK


def _pass_list(entries: list[dict[str, Any]]) -> str:
    """``nnopt passes``: the default pipeline, then each pass with its options as ``-p NAME:key=VALUE``,
    wrapped to the terminal's width."""
    from nnopt.pipeline.spec import DEFAULT_PIPELINE

    width = _terminal_width()
    lines = _wrap(f"default (-p default, or no -p): {' -> '.join(DEFAULT_PIPELINE)}, repeated until nothing changes",
                  width, "", "    ")
    lines.append("")
    for e in entries:
        lines.append(f"{e['name']}  [{'lossy' if e['lossy'] else 'lossless'}; {e['plugin']}]")
        lines += _wrap(e["summary"], width, "    ", "    ")
        for opt in e["options"]:
            text = f"-p {e['name']}:{opt['name']}=VALUE ({opt['type']}, default {_cli_value(opt['default'])}): {opt['help']}"
            lines += _wrap(text, width, "    ", "        ")
    return "\n".join(lines)


def _cli_value(value: Any) -> str:
    """An option's default as it is typed after ``-p NAME:key=``: true, none, 0.1, a,b ([] when empty)."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "none"
    if isinstance(value, list):
        return ",".join(_cli_value(v) for v in value) if value else "[]"
    return str(value)


def _terminal_width() -> int:
    """The width listings wrap to: the terminal's (or $COLUMNS), at least 60 columns, less one."""
    import shutil

    return max(60, shutil.get_terminal_size().columns) - 1


def _wrap(text: str, width: int, indent: str, subsequent: str) -> list[str]:
    """``text`` wrapped to ``width``, never inside a name: pass names (fold-constants) and option names
    break at spaces only."""
    import textwrap

    return textwrap.wrap(text, width, initial_indent=indent, subsequent_indent=subsequent, break_on_hyphens=False)


def _pass_help(entry: dict[str, Any]) -> str:
    """``nnopt passes NAME``: the pass's whole docstring, then each option as ``-p NAME:key=VALUE``."""
    import inspect

    lines = [f"{entry['name']}  [{'lossy' if entry['lossy'] else 'lossless'}; {entry['plugin']}]", ""]
    lines += ["    " + line if line else "" for line in inspect.cleandoc(entry["doc"]).splitlines()]
    if entry["options"]:
        lines += ["", "options:"]
    for opt in entry["options"]:
        lines.append(f"  -p {entry['name']}:{opt['name']}=VALUE  ({opt['type']}, default {_cli_value(opt['default'])})")
        lines.append(f"      {opt['help']}" if opt["help"] else "")
    return "\n".join(line.rstrip() for line in lines)


def cmd_plugins(args: argparse.Namespace) -> int:
    plugins = _plugins(args)
    rows = [
        {
            "name": p.name,
            "distribution": p.distribution,
            "version": p.version,
            "status": p.status,
            "error": p.error,
            "passes": p.passes,
            "cost_rules": p.cost_rules,
            "hardware": p.hardware,
        }
        for p in plugins.plugins
    ]
    if args.json:
        json.dump({"plugins": rows}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK
    print(_plugin_list(rows))
    return EXIT_OK


def cmd_diff(args: argparse.Namespace) -> int:
    from nnopt.cli_diff import DiffSettings, diff, format_diff
    from nnopt.cli_report import finite
    from nnopt.cost import parse_input_shapes

    plugins = _plugins(args)
    settings = DiffSettings(data=args.data, hardware=_hardware(args.hardware, plugins),
                            input_shapes=parse_input_shapes(args.input_shape), seed=args.seed,
                            runs=args.runs if args.measure else 0, rules=plugins.cost_rules)
    result = diff(Path(args.a), Path(args.b), settings)
    if args.json:
        json.dump(finite(result), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_diff(result))
    return EXIT_OK


#: Above this many entries, ``nnopt plugins`` gives a count instead of the names (``--json`` lists them all).
_LISTED_NAMES = 12


def _plugin_list(rows: list[dict[str, Any]]) -> str:
    """``nnopt plugins``: each plugin's name, distribution, version and status, then what it registered
    (passes, cost rules, hardware profiles) and any problem, wrapped to the terminal's width."""
    width = _terminal_width()
    lines: list[str] = []
    for r in rows:
        version = f", version {r['version']}" if r["version"] else ""
        lines.append(f"{r['name']}  ({r['distribution']}{version})  {r['status']}")
        for key, label in (("passes", "passes"), ("cost_rules", "cost rules"), ("hardware", "hardware profiles")):
            names = r[key]
            if not names:
                continue
            text = ", ".join(names) if len(names) <= _LISTED_NAMES else f"{len(names)} (nnopt plugins --json lists them)"
            lines += _wrap(f"{label}: {text}", width, "    ", "        ")
        if r["error"]:
            lines += _wrap(f"problem: {r['error']}", width, "    ", "        ")
    return "\n".join(lines)


#: Median ÷ fastest run of a calibration probe above which the CLI warns that the machine looks busy.
_BUSY_SPREAD = 1.5


def cmd_calibrate(args: argparse.Namespace) -> int:
    import time

    from nnopt.cost.calibrate import FULL_SIZES, QUICK_SIZES, calibrate
    from nnopt.cost.hardware import PROFILE_SUFFIX, write_profile

    out = Path(args.output) if args.output else None
    if out is not None and not out.name.lower().endswith(PROFILE_SUFFIX):
        raise InputError(f"{out}: a profile file must end in {PROFILE_SUFFIX}, so that --hardware recognises it")
    if out is not None and out.is_dir():
        raise InputError(f"{out}: is a directory; -o takes a file path")
    if not args.name.strip():
        raise InputError("nnopt calibrate: --name must not be empty")
    started = time.perf_counter()
    profile, measurements = calibrate(runs=args.runs, rounds=args.rounds, name=args.name.strip(),
                                      sizes=QUICK_SIZES if args.quick else FULL_SIZES, threads=args.threads)
    summary = f"{_profile_summary(profile)} ({time.perf_counter() - started:.1f} s" + (
        ", --quick: not representative)" if args.quick else ")"
    )
    if measurements["max_median_to_min"] > _BUSY_SPREAD:
        print(
            f"nnopt: warning: the machine looks busy (a probe's median run took {measurements['max_median_to_min']:.1f} "
            "x its fastest): other load inflates the figures; calibrate on an idle machine",
            file=sys.stderr,
        )
    if out is None:
        json.dump({**profile.to_dict(), "measurements": measurements}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        print(summary, file=sys.stderr)
    else:
        write_profile(profile, out, measurements)
        print(f"{summary}; wrote {out}")
    return EXIT_OK


#: Kernel class → how ``nnopt calibrate`` names it in its one-line summary.
_KERNEL_LABELS = {
    "conv": "dense conv",
    "depthwise": "depthwise",
    "grouped_conv": "grouped",
    "unblocked_conv": "unblocked",
    "conv1d": "1-D conv",
    "dynamic_weight": "run-time weights",
    "pointwise": "1x1 conv",
    "unblocked_pointwise": "unblocked 1x1",
    "int8": "int8 conv",
    "int8_depthwise": "int8 depthwise",
    "int8_pointwise": "int8 1x1 conv",
    "int8_matmul": "int8 matmul",
    "int8_elementwise": "int8 add/mul",
    "quantize": "Q/DQ nodes",
    "recurrent": "LSTM",
    "divide": "Div",
    "activation": "Sigmoid/Tanh",
}
#: Classes whose FLOPs are one per element: their rate reads as elements per second.
_PER_ELEMENT = frozenset({"int8_elementwise", "quantize", "divide", "activation"})


def _profile_summary(profile: Any) -> str:
    """One line: each kernel class's FLOP/s and fixed cost, bandwidth, per-node and per-run overhead."""
    parts = []
    for key, label in _KERNEL_LABELS.items():
        kernel = profile.kernels.get(key)
        if kernel is None:  # a profile calibrated before the class existed
            continue
        flops = kernel.flops if kernel.flops is not None else profile.peak_flops
        unit = " G elements/s" if key in _PER_ELEMENT else " GFLOP/s"
        parts.append(f"{label} {flops / 1e9:.1f}{unit} (+{kernel.overhead_s * 1e6:.1f} us)")
    bandwidth = f"{profile.bandwidth / 1e9:.1f} GB/s" if profile.bandwidth is not None else "no bandwidth"
    threads = f", {profile.threads} thread(s)" if profile.threads is not None else ""
    return (f"{profile.name}: {', '.join(parts)}, bandwidth {bandwidth}, "
            f"{profile.node_overhead_s * 1e6:.2f} us per node, {profile.run_overhead_s * 1e6:.1f} us per run{threads}")


_COMMANDS = {
    "analyze": cmd_analyze,
    "optimize": cmd_optimize,
    "passes": cmd_passes,
    "plugins": cmd_plugins,
    "calibrate": cmd_calibrate,
    "diff": cmd_diff,
}


# ---------------------------------------------------------------------------------------------- helpers
def _plugins(args: argparse.Namespace, warn: Callable[[str], None] | None = None) -> Any:
    """The plugins; one that failed to load is a warning (through ``warn``: optimize keeps it for the report)."""
    from nnopt.plugin_manager import build_plugins

    plugins = build_plugins(load_entry_points=not args.no_plugins)
    for p in plugins.errors:
        message = f"plugin {p.name} ({p.distribution}) not loaded: {p.error}"
        if warn is not None:
            warn(message)
        else:
            print(f"nnopt: warning: {message}", file=sys.stderr)
    return plugins


def _print_plugin_errors(plugins: Any) -> None:
    for p in plugins.plugins:
        if p.status == "loaded" and p.error:
            print(f"nnopt: warning: plugin {p.name} ({p.distribution}): {p.error}", file=sys.stderr)


def _hardware(spec: str | None, plugins: Any) -> Any:
    from nnopt.cost.hardware import DEFAULT_PROFILE, parse_hardware

    return parse_hardware(spec, plugins.hardware_registry()) if spec else DEFAULT_PROFILE


def _check_outputs(src: Path, outputs: list[Path]) -> set[Path]:
    """Refuse outputs that are folders, special files, or one of the input's files; return the input's files.

    Checked before any work, so that a bad destination costs no time and leaves nothing behind.
    """
    from nnopt.ir.model import external_data_files

    input_files = {src.resolve()} if src.is_file() else set()
    if src.is_file() and any(out.exists() for out in outputs):
        input_files |= external_data_files(src)
    seen: set[Path] = set()
    for out in outputs:
        if out.resolve() in seen:
            raise InputError(f"{out}: two of -o, --report and --html name the same file; choose different paths")
        seen.add(out.resolve())
    for out in outputs:
        _check_folder_writable(out)
        if out.exists() and out.is_dir():
            raise InputError(f"{out}: is a directory; -o, --report and --html take a file path")
        if out.exists() and not out.is_file():
            raise OutputError(f"{out}: is a special file (a device, pipe or socket); refusing to replace it")
        if out.exists() and out.resolve() in input_files:
            what = "model" if out.resolve() == src.resolve() else "model's external data"
            raise OutputError(f"{out}: the output would overwrite the input {what}; choose another path")
    return input_files


def _check_folder_writable(out: Path) -> None:
    """Refuse ``out`` early (before the pipeline runs) when the nearest existing folder above it cannot take it."""
    folder = out.resolve().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"{out}: cannot write: {os.strerror(errno.ENOTDIR)}: {folder}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{out}: cannot write: {os.strerror(errno.EACCES)}: {folder}")


def _write_outputs(model: Any, dst: Path | None, external: bool | None, input_files: set[Path],
                   side_files: list[tuple[Path, Callable[[], bytes]]]) -> None:
    """Write the model and its side files (reports, plot) together: the side files are staged (created
    empty) first, filled once the model is written (a report holds the written model's size) and renamed
    into place, so a model that cannot be written leaves no side file, and a side file that cannot be
    created no model. ``model`` None (with ``dst`` None): only the side files, all or none."""
    from nnopt.atomic import commit, fill, stage
    from nnopt.ir.model import save_model

    with _sigterm_as_exit():
        staged: list[tuple[Path, Path, Callable[[], bytes]]] = []
        try:
            for path, render in side_files:
                staged.append((stage(path, b""), path, render))
            if model is not None and dst is not None:
                save_model(model, dst, external_data=external, keep=input_files)
            for temporary, path, render in staged:
                fill(temporary, path, render())
                commit(temporary, path)
        finally:
            for temporary, _, _ in staged:
                temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM into SystemExit(143) while writing, so that temporary files are removed on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _exit(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _quiet_third_party() -> None:
    os.environ.setdefault("ORT_LOGGING_LEVEL", "3")
    try:
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)
    except Exception:  # boundary: optional quieting only
        pass
    import onnx_graphsurgeon as gs

    gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR



if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
