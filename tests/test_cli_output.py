"""What the command line tells a person: why a pass changed nothing, the summary line, units, progress, conventions."""

from __future__ import annotations

import json
from pathlib import Path

from nnopt.cli import main
from nnopt.pipeline.base import LayerDecision
from nnopt.pipeline.manager import declined_reason

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits" / "digits_cnn.onnx"
DIGITS_DATA = ROOT / "examples" / "digits" / "digits_test.npz"


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


def test_declined_reason_summarises_the_layers_decisions():
    def declined(*reasons: str) -> list[LayerDecision]:
        return [LayerDecision(f"n{i}", "Conv", "declined", r) for i, r in enumerate(reasons)]

    assert declined_reason([]) == ""
    assert declined_reason([LayerDecision("a", "Conv", "rewritten")]) == ""
    assert declined_reason(declined("needs data")) == "needs data"
    assert declined_reason(declined("small", "small")) == "small (2 layers)"
    assert declined_reason(declined("small", "pinned", "small", "odd")) == "4 layers declined: small (2); pinned (1); ..."
    assert declined_reason(declined("rank 9 saves 1%", "rank 60 saves 2%")) == "2 layers declined, e.g. rank 9 saves 1%"
