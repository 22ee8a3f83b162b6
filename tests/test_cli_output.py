"""What the command line tells a person: why a pass changed nothing, the summary line, units, progress, conventions."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import onnx
import pytest

from nnopt.api import Pipeline
from nnopt.cli import main
from nnopt.errors import PassFailedError
from nnopt.ir.model import Model
from nnopt.pipeline.base import LayerDecision, Pass, PassResult
from nnopt.pipeline.manager import Budget, PassManager, PassRecord, declined_reason
from nnopt.pipeline.progress import StreamProgress
from nnopt.pipeline.table import int8_estimate_note
from nnopt.pipeline.verify import Verifier
from nnopt.testing import model_from_text

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits" / "digits_cnn.onnx"
DIGITS_DATA = ROOT / "examples" / "digits" / "digits_test.npz"
EXAMPLE = ROOT / "examples" / "small_cnn.onnx"


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------------------------------------- why unchanged
def test_quantize_without_data_says_why_in_the_table_the_report_and_a_warning(tmp_path, capsys):
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    code, stdout, err = _run(capsys, "optimize", str(DIGITS), "-o", str(out), "-p", "quantize", "--report", str(rep))
    assert code == 0 and out.exists()  # a warning, not an error
    why = "static quantization needs --data"
    assert f"unchanged: quantize: {why}" in stdout
    assert f"nnopt: warning: quantize changed nothing: {why}" in err
    [record] = json.loads(rep.read_text())["passes"]
    assert record["status"] == "unchanged" and record["reason"].startswith(why)


def test_prune_with_nothing_to_remove_says_so(tmp_path, capsys):
    # floor(0.02 * channels) rounded up to a multiple of 8 keeps every channel of every layer.
    code, stdout, err = _run(capsys, "optimize", str(DIGITS), "-o", str(tmp_path / "o.onnx"),
                             "-p", "prune:ratio=0.02,round_to=8", "-q")
    assert code == 0 and stdout == ""
    [line] = [w for w in err.splitlines() if w.startswith("nnopt: warning: prune changed nothing")]
    assert "5 layers declined: nothing to remove at this ratio (4)" in line


def test_default_pipeline_passes_that_find_nothing_are_not_warnings(tmp_path, capsys):
    code, _, err = _run(capsys, "optimize", str(DIGITS), "-o", str(tmp_path / "o.onnx"), "-q")
    assert code == 0 and err == ""
    # ...but a pass named after `default` is, though the default pipeline runs it too.
    code, _, err = _run(capsys, "optimize", str(DIGITS), "-o", str(tmp_path / "o.onnx"), "-p", "default",
                        "-p", "dce", "-q")
    assert code == 0 and err.splitlines() == [
        "nnopt: warning: dce changed nothing: it found nothing to change in this model"]


class _Declines(Pass):
    """Changes nothing; says why itself, or through a declined layer."""

    name = "declines"

    def __init__(self, reason: str, layer_reason: str) -> None:
        super().__init__()
        self.reason, self.layer_reason = reason, layer_reason

    def run(self, model, ctx) -> PassResult:
        return PassResult(False, layers=[LayerDecision("n", "Relu", "declined", self.layer_reason)],
                          reason=self.reason)


def test_a_pass_own_reason_wins_over_its_layers_and_reaches_the_record():
    proto = model_from_text("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4] x) => (float[1, 4] y) { y = Relu(x) }
        """)
    manager = PassManager([_Declines("no Relu worth it", "tiny"), _Declines("", "tiny")], verifier=Verifier(proto))
    report = manager.run(Model.from_proto(proto))
    assert [(r.status, r.reason) for r in report.passes] == [("unchanged", "no Relu worth it"), ("unchanged", "tiny")]
    assert "unchanged: declines: no Relu worth it" in report.format_table()


def test_declined_reason_summarises_the_layers_decisions():
    def declined(*reasons: str) -> list[LayerDecision]:
        return [LayerDecision(f"n{i}", "Conv", "declined", r) for i, r in enumerate(reasons)]

    assert declined_reason([]) == ""
    assert declined_reason([LayerDecision("a", "Conv", "rewritten")]) == ""
    assert declined_reason(declined("needs data")) == "needs data"
    assert declined_reason(declined("small", "small")) == "small (2 layers)"
    assert declined_reason(declined("small", "pinned", "small", "odd")) == "4 layers declined: small (2); pinned (1); ..."
    assert declined_reason(declined("rank 9 saves 1%", "rank 60 saves 2%")) == "2 layers declined, e.g. rank 9 saves 1%"


# ---------------------------------------------------------------------------------------------- summary line
PIPELINE = ROOT / "examples" / "pipelines" / "digits_prune_quantize.toml"


def test_the_table_ends_with_a_summary_line_and_the_budgeted_metric(tmp_path, capsys):
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    code, stdout, err = _run(capsys, "optimize", str(DIGITS), "-o", str(out), "--pipeline", str(PIPELINE),
                             "--report", str(rep))
    assert code == 0, err
    report = json.loads(rep.read_text())
    before, after = report["original"], report["final"]
    lines = stdout.splitlines()
    [summary] = [line for line in lines if line.startswith("summary: ")]
    # Every figure of the line is the report's or the files' own; weight bytes shrink by int8 (about 4x).
    assert f"weight bytes {before['weight_bytes']:,} -> {after['weight_bytes']:,} (" in summary
    assert f"params {before['params']:,} -> {after['params']:,} (" in summary
    assert f"nodes {before['nodes']} -> {after['nodes']} (" in summary
    assert f"file bytes {DIGITS.stat().st_size:,} -> {out.stat().st_size:,} (" in summary
    change = (after["weight_bytes"] - before["weight_bytes"]) / before["weight_bytes"] * 100
    assert f"(-{abs(change):.1f} %)" in summary and change < -70
    # The budget is top-1 agreement (the file's min_top1 = 0.98), not the cosine/max_rel_err columns.
    top1 = report["fidelity"]["top1_agreement"]
    assert top1 >= 0.98
    assert f"budget: top-1 agreement {top1:.4f} >= 0.98: met" in lines
    assert lines[0].split()[-2:] == ["top1_agree", "seconds"]  # a top-1 budget gets its column
    assert [line.split()[-2] for line in lines if line.startswith("quantize ")] == [f"{top1:.4f}"]
    assert lines.index(summary) < lines.index(f"wrote {out}")


def test_a_rolled_back_pass_says_what_its_attempt_would_have_given(tmp_path, capsys):
    rep = tmp_path / "r.json"
    code, stdout, err = _run(capsys, "optimize", str(DIGITS), "-o", str(tmp_path / "o.onnx"), "-p",
                             "quantize:select=all", "--data", str(DIGITS_DATA), "--max-rel-error", "0.01",
                             "--report", str(rep))
    assert code == 0, err
    [record] = json.loads(rep.read_text())["passes"]
    assert record["status"] == "rolled_back" and record["after"] == record["before"]
    tried, before = record["attempted"]["weight_bytes"], record["before"]["weight_bytes"]
    assert tried < before / 3  # int8 weights: what the rejected attempt would have saved
    [line] = [w for w in stdout.splitlines() if w.startswith("rolled back: quantize: relative error")]
    assert f"it would have given weight bytes {before:,} -> {tried:,} ({(tried - before) / before * 100:+.1f} %)" in line
    assert "budget: max relative error 0.0000 <= 0.01: met" in stdout  # the rollback kept the budget


# ---------------------------------------------------------------------------------------------- units
def test_one_unit_per_column_and_the_estimate_names_its_profile(tmp_path, capsys):
    tiny = tmp_path / "tiny.onnx"
    onnx.save_model(model_from_text("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4] x) => (float[1, 4] y) {
          a = Identity(x)
          y = Relu(a)
        }
        """), str(tiny))
    code, stdout, err = _run(capsys, "optimize", str(tiny), "-o", str(tmp_path / "o.onnx"), "-p", "remove-noops")
    assert code == 0, err
    header, _, first, row = stdout.splitlines()[:4]
    assert "est_us (x86-avx2-2core)" in header and "latency_us" not in header
    # A model of nanoseconds: the column shows them in us with enough decimals, not "0.0".
    cells = [line.split()[-1] if line.startswith("(input)") else line.split()[5] for line in (first, row)]
    assert all(float(c) > 0 and len(c.split(".")[1]) == 3 for c in cells), cells
    code, stdout, _ = _run(capsys, "analyze", str(EXAMPLE), "--measure", "--runs", "3")
    assert code == 0
    lines = stdout.splitlines()
    assert "est. latency (us)" in lines[0] and "% of latency" in lines[0]
    assert not any(unit in line for line in lines[2:18] for unit in (" us", " ns", " ms"))
    [measured] = [line for line in lines if line.startswith("latency: ")]
    assert measured.startswith("latency: estimated 38.") and " us (x86-avx2-2core), measured " in measured
    assert measured.split("measured ")[1].split()[1] == "us"


def test_after_quantize_the_output_says_what_the_estimate_assumes_about_int8(tmp_path, capsys):
    out = tmp_path / "o.onnx"
    argv = ["optimize", str(DIGITS), "-o", str(out), "-p", "quantize", "--data", str(DIGITS_DATA)]
    code, stdout, err = _run(capsys, *argv)
    assert code == 0, err
    assert "note: est_us: hardware profile x86-avx2-2core assumes int8 kernels (int8, int8_matmul) at 2x its " \
           "FP32 rate" in stdout and f"nnopt analyze {out} --measure" in stdout
    code, stdout, err = _run(capsys, *argv, "--hardware", "rpi4")
    assert "note: est_us: hardware profile rpi4 has no int8 figures" in stdout and "ignores int8" in stdout
    code, stdout, err = _run(capsys, "optimize", str(DIGITS), "-o", str(out), "-p", "prune")
    assert code == 0 and "int8" not in stdout  # no int8 op, no note


def test_a_calibrated_profile_gets_no_int8_note():
    from nnopt.cost.hardware import DEFAULT_PROFILE, KernelFigures

    ops = {"QuantizeLinear", "Conv"}
    assert int8_estimate_note(DEFAULT_PROFILE, {"Conv"}) is None
    assert "2x its FP32 rate" in int8_estimate_note(DEFAULT_PROFILE, ops)
    measured = replace(DEFAULT_PROFILE, name="calibrated", kernels={"int8": KernelFigures(flops=3.1e11)})
    assert int8_estimate_note(measured, ops) is None
    plain = replace(DEFAULT_PROFILE, name="mine", kernels={}, runtime=None)
    assert "plus every QuantizeLinear/DequantizeLinear as a node" in int8_estimate_note(plain, ops)


# ---------------------------------------------------------------------------------------------- progress
def _records(progress: StreamProgress, iteration: int, statuses: list[str]) -> None:
    for position, status in enumerate(statuses, start=1):
        progress.pass_started(f"p{position}", position, len(statuses), iteration)
        progress.pass_finished(PassRecord(f"p{position}", {}, False, iteration, status=status, seconds=0.25))


def test_a_log_gets_one_line_for_a_repeat_that_changed_nothing():
    stream = io.StringIO()
    progress = StreamProgress(stream)
    _records(progress, 0, ["applied", "unchanged", "applied"])
    _records(progress, 1, ["unchanged", "unchanged", "unchanged"])
    progress.finished()
    assert stream.getvalue().splitlines() == [
        "nnopt: [1/3] p1: applied in 0.25 s",
        "nnopt: [2/3] p2: unchanged in 0.25 s",
        "nnopt: [3/3] p3: applied in 0.25 s",
        "nnopt: repeat 2: nothing changed in 3 passes (0.75 s): fixed point reached",
    ]


def test_a_repeat_that_changes_something_shows_each_pass_in_order():
    stream = io.StringIO()
    progress = StreamProgress(stream)
    _records(progress, 1, ["unchanged", "applied", "unchanged"])
    _records(progress, 2, ["unchanged", "unchanged", "unchanged"])
    progress.finished()
    assert stream.getvalue().splitlines() == [
        "nnopt: [1/3] p1 (repeat 2): unchanged in 0.25 s",
        "nnopt: [2/3] p2 (repeat 2): applied in 0.25 s",
        "nnopt: [3/3] p3 (repeat 2): unchanged in 0.25 s",
        "nnopt: repeat 3: nothing changed in 3 passes (0.75 s): fixed point reached",
    ]


def test_the_default_pipeline_in_a_log(tmp_path, capsys):
    code, stdout, err = _run(capsys, "optimize", str(EXAMPLE), "-o", str(tmp_path / "o.onnx"))
    assert code == 0
    lines = err.splitlines()
    assert len(lines) == 9 and lines[-1].startswith("nnopt: repeat 2: nothing changed in 8 passes (")
    assert stdout.splitlines()[-1] == f"wrote {tmp_path / 'o.onnx'}"


def test_a_strict_failure_clears_the_terminal_line_before_the_error(tmp_path):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Tty()
    pipeline = Pipeline(["quantize:select=all"], data=DIGITS_DATA, budget=Budget(max_rel_error=0.001), strict=True)
    with pytest.raises(PassFailedError):
        pipeline.run(str(DIGITS), progress=StreamProgress(stream))
    assert "\n" not in stream.getvalue() and stream.getvalue().endswith("\r\x1b[2K")


# ---------------------------------------------------------------------------------------------- conventions
def test_version(capsys):
    from nnopt import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"nnopt {__version__}\n"


def test_a_usage_error_says_nnopt_error_once(capsys):
    code, stdout, err = _run(capsys, "optimize")
    assert code == 2 and stdout == ""
    assert err == ("nnopt: error: optimize: the following arguments are required: model, -o/--output "
                   "(see nnopt optimize --help)\n")
    code, _, err = _run(capsys, "bogus")
    assert code == 2 and err.startswith("nnopt: error: argument COMMAND: invalid choice: 'bogus'")
    assert err.count("nnopt") == 2 and err.endswith("(see nnopt --help)\n")  # the prefix and the hint


def test_a_closed_pipe_exits_quietly():
    import os
    import subprocess
    import sys

    for args in (["passes", "--json"], ["passes"]):
        # `nnopt passes --json | head -1` where head has already gone: the output (tens of KB) would fit in
        # the pipe's buffer, so the reader's end is closed before nnopt writes, for a deterministic test.
        read, write = os.pipe()
        os.close(read)
        try:
            proc = subprocess.run([sys.executable, "-m", "nnopt", *args], stdout=write, stderr=subprocess.PIPE,
                                  check=False)
        finally:
            os.close(write)
        assert proc.returncode == 141 and proc.stderr == b"", proc.stderr


def test_passes_name_shows_one_pass_in_full(capsys):
    code, stdout, _ = _run(capsys, "passes", "prune")
    assert code == 0
    lines = stdout.splitlines()
    assert lines[0] == "prune  [lossy; nnopt (built-in)]"
    assert "Unstructured mode sets the smallest-magnitude weights" in stdout  # the whole doc, not its first line
    assert any(line.startswith("  -p prune:ratio=VALUE  (float, default ") for line in lines)
    assert not any(line.startswith("quantize") for line in lines)
    code, stdout, _ = _run(capsys, "passes", "prune", "--json")
    assert [p["name"] for p in json.loads(stdout)["passes"]] == ["prune"]
    code, _, err = _run(capsys, "passes", "prun")
    assert code == 2 and err == "nnopt: error: unknown pass 'prun'; did you mean 'prune'?\n"


def test_optimize_help_lists_the_passes_and_the_syntax(capsys):
    with pytest.raises(SystemExit):
        main(["optimize", "--help"])
    text = capsys.readouterr().out
    assert "-p NAME:key=value,key=value" in text and "-p prune:ratio=0.3,round_to=4" in text
    for name in ("prune", "quantize", "kmeans", "svd", "dce", "fold-batchnorm"):
        assert any(line.split()[:1] == [name] for line in text.splitlines()), name


# ---------------------------------------------------------------------------------------------- --ops
def test_ops_prints_the_op_types_before_and_after(tmp_path, capsys):
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    code, stdout, err = _run(capsys, "optimize", str(EXAMPLE), "-o", str(out), "--ops", "--report", str(rep))
    assert code == 0, err
    lines = stdout.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("op type ")))
    rows = {line.split()[0]: line.split()[1:] for line in lines[start + 2:] if not line.startswith(("-", "wrote"))}
    # The example's unfused BNs, Identity, Dropout, Constant weight and dead Neg go; the convs stay.
    assert rows["BatchNormalization"] == ["2", "0", "-2"] and rows["Conv"] == ["3", "3"]
    assert rows["Neg"] == ["1", "0", "-1"] and rows["total"] == ["16", "10", "-6"]
    result = onnx.load(str(out))
    assert sum(1 for n in result.graph.node if n.op_type == "Conv") == 3 and len(result.graph.node) == 10
    report = json.loads(rep.read_text())
    assert report["op_types"]["before"]["BatchNormalization"] == 2 and "BatchNormalization" not in report["op_types"]["after"]
    code, stdout, _ = _run(capsys, "optimize", str(EXAMPLE), "-o", str(out))
    assert "op type" not in stdout  # only when asked


def test_passes_lists_the_default_pipeline_and_options_in_p_syntax(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    code, stdout, _ = _run(capsys, "passes")
    assert code == 0
    lines = stdout.splitlines()
    assert lines[0].startswith("default (-p default, or no -p): strip-debug-info -> constants-to-initializers")
    assert "    -p prune:ratio=VALUE (float, default " in stdout
    assert max(len(line) for line in lines) <= 99  # wrapped to the terminal's width
    # Defaults as they are typed after -p NAME:key= (not Python's True/None), and no name cut at a hyphen.
    assert "-p svd:data_aware=VALUE (bool, default true)" in stdout and "default True" not in stdout
    assert "-p svd:rank=VALUE (int | none, default none)" in stdout and "default None" not in stdout
    monkeypatch.setenv("COLUMNS", "60")
    _, narrow, _ = _run(capsys, "passes")
    cut = [w for w in narrow.split() if len(w) > 1 and w.endswith("-")]
    assert not cut, cut
    assert {"fold-constants", "fold-batchnorm", "constants-to-initializers"} <= set(narrow.split())


# ---------------------------------------------------------------------------------------------- --measure
def test_measure_times_both_models_interleaved(tmp_path, capsys):
    rep = tmp_path / "r.json"
    code, stdout, err = _run(capsys, "optimize", str(DIGITS), "-o", str(tmp_path / "o.onnx"), "-p", "quantize",
                             "--data", str(DIGITS_DATA), "--measure", "--runs", "5", "--report", str(rep))
    assert code == 0, err
    measured = json.loads(rep.read_text())["measured"]
    assert measured["runs"] == 5 and measured["before_s"] > 0 and measured["after_s"] > 0
    assert measured["ratio"] == pytest.approx(measured["after_s"] / measured["before_s"])
    [line] = [w for w in stdout.splitlines() if w.startswith("measured: ")]
    before, after = measured["before_s"] * 1e6, measured["after_s"] * 1e6
    assert line == (f"measured: {before:,.1f} -> {after:,.1f} us ({(after - before) / before * 100:+.1f} %), "
                    "onnxruntime CPU, median of 5 interleaved runs each")
    code, stdout, _ = _run(capsys, "optimize", str(DIGITS), "-o", str(tmp_path / "o.onnx"), "-q")
    assert "measured" not in stdout
