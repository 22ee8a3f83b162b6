"""nnopt as a build step: exit codes, --quiet, --json with progress on stderr, byte-identical output."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from nnopt.cli import EXIT_BAD_INPUT, EXIT_OK, EXIT_PASS_FAILED, main
from nnopt.pipeline.manager import PassRecord
from nnopt.pipeline.progress import StreamProgress

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "small_cnn.onnx"
DIGITS = ROOT / "examples" / "digits" / "digits_cnn.onnx"
DIGITS_DATA = ROOT / "examples" / "digits" / "digits_test.npz"


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_exit_codes_are_the_documented_ones(tmp_path, capsys):
    out = tmp_path / "o.onnx"
    assert (EXIT_OK, EXIT_BAD_INPUT, EXIT_PASS_FAILED) == (0, 2, 3)
    code, _, _ = _run(capsys, "optimize", str(EXAMPLE), "-o", str(out), "--quiet")
    assert code == 0 and out.exists()
    code, _, err = _run(capsys, "optimize", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "x.onnx"))
    assert code == 2 and err.count("\n") == 1
    # A lossy pass that breaks the budget under --strict: exit 3, one line naming the pass, nothing written.
    failed = tmp_path / "failed.onnx"
    code, stdout, err = _run(capsys, "optimize", str(EXAMPLE), "-o", str(failed), "-p", "kmeans:bits=1,min_size=1",
                             "--min-cosine", "0.99999", "--strict", "--quiet")
    assert code == 3, err
    assert "kmeans" in err and "cosine" in err and err.strip().count("\n") == 0
    assert stdout == "" and not failed.exists()


def test_quiet_prints_nothing_on_success(tmp_path, capsys):
    code, stdout, err = _run(capsys, "optimize", str(EXAMPLE), "-o", str(tmp_path / "o.onnx"), "-q")
    assert (code, stdout, err) == (0, "", "")


def test_progress_goes_to_stderr_and_json_stays_clean(tmp_path, capsys):
    code, stdout, err = _run(capsys, "optimize", str(EXAMPLE), "-o", str(tmp_path / "o.onnx"), "-p", "dce",
                             "-p", "fold-batchnorm")
    assert code == 0
    # Not a terminal: one line per pass when it ends, the table on stdout.
    lines = err.splitlines()
    assert lines[0].startswith("nnopt: [1/2] dce: unchanged in ") or lines[0].startswith("nnopt: [1/2] dce: applied in ")
    assert lines[1].startswith("nnopt: [2/2] fold-batchnorm: applied in ")
    assert "pass" in stdout and "wrote" in stdout
    # --json: stdout is exactly one JSON document; no progress is mixed into it.
    code, stdout, err = _run(capsys, "optimize", str(EXAMPLE), "-o", str(tmp_path / "p.onnx"), "--json")
    assert code == 0
    report = json.loads(stdout)
    assert report["passes"][0]["name"] == "strip-debug-info"


def test_stream_progress_throttles_layer_lines_off_a_terminal():
    now = [0.0]
    stream = io.StringIO()
    progress = StreamProgress(stream, interval=2.0, clock=lambda: now[0])
    progress.pass_started("kmeans", 3, 5, 0)
    for layer in range(10):  # a layer every 0.5 s: one line per 2 s, plus the last layer
        now[0] += 0.5
        progress.layer(layer + 1, 10, f"conv{layer}")
    record = PassRecord("kmeans", {}, True, 0, status="rolled_back", reason="budget", seconds=4.0, verify_seconds=1.0)
    progress.pass_finished(record)
    assert stream.getvalue().splitlines() == [
        "nnopt: [3/5] kmeans: 4/10 conv3",
        "nnopt: [3/5] kmeans: 8/10 conv7",
        "nnopt: [3/5] kmeans: 10/10 conv9",
        "nnopt: [3/5] kmeans: rolled back in 5.00 s: budget",
    ]


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_stream_progress_rewrites_one_line_on_a_terminal():
    stream = _Tty()
    progress = StreamProgress(stream, interval=0.0, clock=lambda: 0.0)
    progress.pass_started("svd", 1, 1, 1)
    progress.layer(1, 2, "gemm")
    progress.pass_finished(PassRecord("svd", {}, True, 1, status="applied", seconds=0.5))
    text = stream.getvalue()
    assert "\n" not in text and text.endswith("applied in 0.50 s")  # no permanent line: rewritten in place
    assert "\r\x1b[2Knnopt: [1/1] svd (repeat 2) ..." in text and "\r\x1b[2Knnopt: [1/1] svd (repeat 2): 1/2 gemm" in text
    progress.finished()  # the run is over: the line is cleared before the table is printed
    assert stream.getvalue() == text + "\r\x1b[2K"


@pytest.mark.parametrize(
    "passes",
    [
        ("default", "kmeans:bits=4"),
        ("default", "prune:ratio=0.25,round_to=4", "quantize:mode=static"),
        ("svd:energy=0.9", "conv-to-separable:energy=0.9"),
    ],
    ids=["kmeans", "prune+quantize", "lowrank"],
)
def test_same_input_pipeline_and_seed_give_the_same_bytes(tmp_path, capsys, passes):
    outputs = []
    for run in ("a", "b"):
        out = tmp_path / f"{run}.onnx"
        argv = ["optimize", str(DIGITS), "-o", str(out), "--data", str(DIGITS_DATA), "--seed", "7", "-q"]
        for spec in passes:
            argv += ["-p", spec]
        code, _, err = _run(capsys, *argv)
        assert code == 0, err
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
    assert len(outputs[0]) != DIGITS.stat().st_size  # the lossy passes did change the model


# ---------------------------------------------------------------------------------------------- pipeline files
PIPELINES = ROOT / "examples" / "pipelines"


def test_every_example_pipeline_file_runs_through_the_cli(tmp_path, capsys):
    # Each example file, on the model it is written for; a file added without a model here fails.
    models = {"digits_prune_quantize.toml": DIGITS, "lossless.json": EXAMPLE}
    assert sorted(p.name for p in PIPELINES.iterdir()) == sorted(models)
    for name, model in models.items():
        out, report = tmp_path / f"{name}.onnx", tmp_path / f"{name}.json"
        code, _, err = _run(capsys, "optimize", str(model), "-o", str(out), "--pipeline", str(PIPELINES / name),
                            "--report", str(report), "-q")
        assert code == 0, err
        passes = json.loads(report.read_text())["passes"]
        assert [p["status"] for p in passes if p["status"] == "rolled_back"] == []
        if name == "digits_prune_quantize.toml":
            assert [p["name"] for p in passes if p["lossy"]] == ["prune", "quantize"]


def test_command_line_flags_override_the_pipeline_file(tmp_path, capsys):
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    # The file's budget (min_top1 0.98) lets both lossy passes through; --max-rel-error 0.001 on the command
    # line is a budget neither meets, so both are rolled back.
    code, _, err = _run(capsys, "optimize", str(DIGITS), "-o", str(out), "--pipeline",
                        str(PIPELINES / "digits_prune_quantize.toml"), "--max-rel-error", "0.001", "--report", str(report),
                        "-q")
    assert code == 0, err
    statuses = {p["name"]: p["status"] for p in json.loads(report.read_text())["passes"]}
    assert statuses["prune"] == "rolled_back" and statuses["quantize"] == "rolled_back"
    # --no-verify turns off what the file's [verify] section turned on.
    code, stdout, err = _run(capsys, "optimize", str(EXAMPLE), "-o", str(out), "--pipeline",
                             str(PIPELINES / "lossless.json"), "--no-verify", "--json")
    assert code == 0, err
    assert json.loads(stdout)["verification"] == "disabled"


def test_a_bad_pipeline_file_is_one_line_exit_2_and_nothing_written(tmp_path, capsys):
    bad = tmp_path / "p.toml"
    bad.write_text('[[passes]]\nname = "prune"\nratio = 1.5\n')
    out = tmp_path / "o.onnx"
    code, stdout, err = _run(capsys, "optimize", str(EXAMPLE), "-o", str(out), "--pipeline", str(bad))
    assert code == 2 and stdout == "" and not out.exists()
    assert err.startswith("nnopt: error: ") and err.count("\n") == 1
    assert "p.toml: passes[1].ratio:" in err and "1.5" in err
    code, _, err = _run(capsys, "optimize", str(EXAMPLE), "-o", str(out), "--pipeline", str(bad), "-p", "dce")
    assert code == 2 and "either with -p or in --pipeline" in err and not out.exists()
