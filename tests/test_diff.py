"""``nnopt diff A B``: op types, params, FLOPs, bytes, estimated and measured latency, fidelity of B against A."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from nnopt.cli import main
from nnopt.cost import analyze

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "small_cnn.onnx"
DIGITS = ROOT / "examples" / "digits" / "digits_cnn.onnx"
DIGITS_DATA = ROOT / "examples" / "digits" / "digits_test.npz"


def _diff(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["diff", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def cleaned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example model through the default pipeline."""
    out = tmp_path_factory.mktemp("diff") / "cleaned.onnx"
    assert main(["optimize", str(EXAMPLE), "-o", str(out), "-q"]) == 0
    return out


def test_diff_of_the_cleaned_example_gives_its_figures(cleaned, capsys):
    code, stdout, err = _diff(capsys, str(EXAMPLE), str(cleaned), "--json")
    assert (code, err) == (0, "")
    result = json.loads(stdout)
    assert result["a"] == {"path": str(EXAMPLE), "bytes": 27734}
    assert result["b"] == {"path": str(cleaned), "bytes": cleaned.stat().st_size}
    a, b = result["totals"]["a"], result["totals"]["b"]
    assert (a["nodes"], b["nodes"]) == (16, 10) and (a["params"], b["params"]) == (6634, 6474)
    assert (a["flops"], a["weight_bytes"]) == (3875506, 26536)
    assert b["latency_s"] == pytest.approx(analyze(str(cleaned)).totals["latency_s"])
    assert result["op_types"]["a"]["BatchNormalization"] == 2 and "BatchNormalization" not in result["op_types"]["b"]
    assert result["op_types"]["b"] == {"Conv": 3, "Flatten": 1, "Gemm": 1, "GlobalAveragePool": 1, "Relu": 3,
                                       "Softmax": 1}
    fid = result["fidelity"]
    assert (fid["source"], fid["samples"]) == ("generated inputs", 16) and result["verification"] == "onnxruntime"
    assert 0 < fid["max_abs_error"] < 1e-5 and fid["top1_agreement"] == 1.0
    assert "measured" not in result and result["profile"] == {"name": "x86-avx2-2core", "calibrated": False}

    code, table, _ = _diff(capsys, str(EXAMPLE), str(cleaned))
    assert code == 0
    assert "nodes 16 -> 10 (-37.5 %)" in table and f"file bytes 27,734 -> {cleaned.stat().st_size:,}" in table
    assert "fidelity of B against A on 16 samples of generated inputs: max abs error" in table
    assert "BatchNormalization   2   0      -2" in table


def test_a_model_against_itself_is_exact(capsys):
    code, stdout, _ = _diff(capsys, str(DIGITS), str(DIGITS), "--json", "--data", str(DIGITS_DATA))
    result = json.loads(stdout)
    assert code == 0 and result["totals"]["a"] == result["totals"]["b"]
    fid = result["fidelity"]
    assert (fid["max_abs_error"], fid["max_rel_error"], fid["top1_agreement"]) == (0.0, 0.0, 1.0)
    assert fid["cosine_similarity"] == pytest.approx(1.0, abs=1e-12)  # float64 rounding of |x|^2 / (|x| |x|)
    assert (fid["samples"], fid["source"]) == (450, "user data")


def test_measure_times_both_models(cleaned, capsys):
    code, stdout, _ = _diff(capsys, str(EXAMPLE), str(cleaned), "--json", "--measure", "--runs", "3")
    measured = json.loads(stdout)["measured"]
    assert code == 0 and measured["runs"] == 3 and measured["before_s"] > 0 and measured["after_s"] > 0
    assert measured["ratio"] == pytest.approx(measured["after_s"] / measured["before_s"])
    code, table, _ = _diff(capsys, str(EXAMPLE), str(cleaned), "--measure", "--runs", "3")
    assert "interleaved runs each" in table and "estimated latency (x86-avx2-2core):" in table


def test_models_with_different_inputs_are_one_line_exit_2(tmp_path, capsys):
    code, stdout, err = _diff(capsys, str(EXAMPLE), str(DIGITS))
    assert (code, stdout) == (2, "") and err.count("\n") == 1
    assert err == (f"nnopt: error: nnopt diff: {EXAMPLE} and {DIGITS} take different inputs: x[N,3,32,32] float "
                   "against x[N,1,8,8] float; diff compares two versions of one model\n")
    renamed = onnx.load(str(DIGITS))
    renamed.graph.input[0].name = "image"
    for node in renamed.graph.node:
        node.input[:] = ["image" if i == "x" else i for i in node.input]
    onnx.save(renamed, str(tmp_path / "renamed.onnx"))
    code, _, err = _diff(capsys, str(DIGITS), str(tmp_path / "renamed.onnx"))
    assert code == 2 and "take different inputs: x[N,1,8,8] float against image[N,1,8,8] float" in err
    code, _, err = _diff(capsys, str(DIGITS), str(tmp_path / "missing.onnx"))
    assert code == 2 and err == f"nnopt: error: {tmp_path / 'missing.onnx'}: no such file\n"
