"""The command line: main jobs end to end, and every kind of bad input → one line, exit 2, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from nnopt.cli import main
from nnopt.testing import model_from_text, run

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "small_cnn.onnx"


def _small(tmp_path: Path) -> Path:
    proto = model_from_text(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 4] y) {
          a = Identity(x)
          dead = Neg(x)
          y = Relu(a)
        }
        """
    )
    path = tmp_path / "in.onnx"
    onnx.save_model(proto, str(path))
    return path


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_optimize_writes_model_and_report(tmp_path, capsys):
    src = _small(tmp_path)
    before = src.read_bytes()
    out, rep = tmp_path / "out.onnx", tmp_path / "report.json"
    code, stdout, err = _run(capsys, "optimize", str(src), "-o", str(out), "-p", "dce", "--report", str(rep))
    assert code == 0, err
    assert "dce" in stdout and "applied" in stdout
    assert src.read_bytes() == before  # the input is never modified
    result = onnx.load(str(out))
    assert [n.op_type for n in result.graph.node] == ["Identity", "Relu"]
    report = json.loads(rep.read_text())
    [p] = report["passes"]
    assert p["name"] == "dce" and p["status"] == "applied" and p["stats"]["nodes_removed"] == 1
    assert p["before"]["nodes"] == 3 and p["after"]["nodes"] == 2
    assert set(report) >= {"passes", "final"}
    assert report["passes"][0]["fidelity"]["max_abs_error"] == 0.0
    x = np.arange(8, dtype=np.float32).reshape(2, 4) - 4
    np.testing.assert_array_equal(run(result, {"x": x})[0], np.maximum(x, 0))


def test_default_pipeline_on_the_example_model(tmp_path, capsys):
    out = tmp_path / "small.onnx"
    code, stdout, err = _run(capsys, "optimize", str(EXAMPLE), "-o", str(out))
    assert code == 0, err
    before, after = onnx.load(str(EXAMPLE)), onnx.load(str(out))
    assert len(after.graph.node) < len(before.graph.node)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(run(after, {"x": x})[0], run(before, {"x": x})[0], rtol=1e-4, atol=1e-5)


def test_analyze_json_contract(capsys):
    code, stdout, err = _run(capsys, "analyze", str(EXAMPLE), "--json")
    assert code == 0, err
    data = json.loads(stdout)
    assert {"params", "macs", "flops", "weight_bytes", "activation_bytes", "latency_s"} <= set(data["totals"])
    assert {"name", "op_type", "params", "macs", "flops", "weight_bytes", "output_bytes"} <= set(data["nodes"][0])
    conv1 = next(n for n in data["nodes"] if n["name"] == "conv1")
    assert conv1["macs"] == 16 * 32 * 32 * 3 * 9  # N counted as 1
    assert conv1["flops"] == 2 * conv1["macs"]
    assert any("batch" in note for note in data["notes"])


def test_passes_lists_dce_with_its_description(capsys):
    code, stdout, _ = _run(capsys, "passes", "--json")
    assert code == 0
    entries = {p["name"]: p for p in json.loads(stdout)["passes"]}
    assert entries["dce"]["lossy"] is False and entries["dce"]["plugin"] == "nnopt (built-in)"


def _assert_one_line_error(code: int, err: str, needle: str) -> None:
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err
    assert lines[0].startswith("nnopt: error:") and needle in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda d: d / "missing.onnx", "no such file"),
        (lambda d: (d / "text.onnx").write_text("hello, not onnx\n") and d / "text.onnx", "not"),
        (lambda d: (d / "empty.onnx").write_bytes(b"") or d / "empty.onnx", "not an ONNX model"),
    ],
    ids=["missing", "not-onnx", "empty"],
)
def test_bad_model_paths(tmp_path, capsys, make, needle):
    path = make(tmp_path)
    out = tmp_path / "out.onnx"
    code, _, err = _run(capsys, "optimize", str(path), "-o", str(out))
    _assert_one_line_error(code, err, needle)
    assert not out.exists()


def test_truncated_and_checker_rejected(tmp_path, capsys):
    data = EXAMPLE.read_bytes()
    trunc = tmp_path / "trunc.onnx"
    trunc.write_bytes(data[: len(data) // 3])
    code, _, err = _run(capsys, "analyze", str(trunc))
    _assert_one_line_error(code, err, "trunc.onnx")
    proto = onnx.load(str(EXAMPLE))
    proto.graph.node[0].input[0] = "nowhere"
    bad = tmp_path / "bad.onnx"
    onnx.save_model(proto, str(bad))
    code, _, err = _run(capsys, "optimize", str(bad), "-o", str(tmp_path / "o.onnx"))
    _assert_one_line_error(code, err, "checker")
    assert not (tmp_path / "o.onnx").exists()


def test_unknown_pass_and_option(tmp_path, capsys):
    src, out = _small(tmp_path), tmp_path / "o.onnx"
    code, _, err = _run(capsys, "optimize", str(src), "-o", str(out), "-p", "dcee")
    _assert_one_line_error(code, err, "did you mean 'dce'")
    code, _, err = _run(capsys, "optimize", str(src), "-o", str(out), "-p", "dce:depth=3")
    _assert_one_line_error(code, err, "has no option 'depth'")
    assert not out.exists()


def test_data_file_that_does_not_match(tmp_path, capsys):
    src, out = _small(tmp_path), tmp_path / "o.onnx"
    data = tmp_path / "data.npz"
    np.savez(data, wrong_name=np.zeros((3, 1, 4), np.float32))
    code, _, err = _run(capsys, "optimize", str(src), "-o", str(out), "--data", str(data))
    _assert_one_line_error(code, err, "missing input(s) x")
    np.savez(data, x=np.zeros((3, 1, 5), np.float32))
    code, _, err = _run(capsys, "optimize", str(src), "-o", str(out), "--data", str(data))
    _assert_one_line_error(code, err, "shape")
    assert not out.exists()


def test_output_may_not_overwrite_input(tmp_path, capsys):
    src = _small(tmp_path)
    code, _, err = _run(capsys, "optimize", str(src), "-o", str(src))
    _assert_one_line_error(code, err, "overwrite the input")


def test_usage_error_is_one_line(capsys):
    code, _, err = _run(capsys, "optimize")
    _assert_one_line_error(code, err, "required")


def test_python_dash_m_and_debug_traceback(tmp_path):
    env = {**os.environ, "NNOPT_NO_PLUGINS": "1"}
    done = subprocess.run([sys.executable, "-m", "nnopt", "analyze", str(tmp_path / "nope.onnx")],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "no such file" in done.stderr and "Traceback" not in done.stderr
    done = subprocess.run([sys.executable, "-m", "nnopt", "--debug", "analyze", str(tmp_path / "nope.onnx")],
                          capture_output=True, text=True, env=env)
    assert "Traceback" in done.stderr


def test_same_input_same_options_same_bytes(tmp_path, capsys):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert main(["optimize", str(EXAMPLE), "-o", str(a)]) == 0
    assert main(["optimize", str(EXAMPLE), "-o", str(b)]) == 0
    assert a.read_bytes() == b.read_bytes()


def test_analyze_measure_with_data(tmp_path, capsys):
    src = _small(tmp_path)
    data = tmp_path / "d.npz"
    np.savez(data, x=np.ones((2, 3, 4), np.float32))
    code, stdout, err = _run(capsys, "analyze", str(src), "--measure", "--runs", "3", "--data", str(data), "--json")
    assert code == 0, err
    out = json.loads(stdout)
    assert out["measured"]["runs"] == 3 and out["totals"]["measured_latency_s"] > 0


def test_default_can_start_an_explicit_pipeline(tmp_path, capsys):
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    code, _, err = _run(capsys, "optimize", str(EXAMPLE), "-o", str(out), "-p", "default", "-p", "dce", "--report", str(rep))
    assert code == 0, err
    names = [p["name"] for p in json.loads(rep.read_text())["passes"]]
    assert names == ["strip-debug-info", "constants-to-initializers", "dce", "fold-constants", "remove-noops",
                     "fold-batchnorm", "fuse-hardswish", "dce", "dce"]


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--max-rel-error", "nan", "--max-rel-error: nan is out of range: expected a number of at least 0"),
        ("--max-rel-error", "-0.1", "--max-rel-error: -0.1 is out of range"),
        ("--min-cosine", "2", "--min-cosine: 2.0 is out of range: expected a number from -1 to 1"),
        ("--min-top1", "7", "--min-top1: 7.0 is out of range: expected a number from 0 to 1"),
        ("--min-top1", "inf", "--min-top1: inf is out of range"),
    ],
)
def test_budget_flags_are_held_to_the_ranges_pipeline_files_use(tmp_path, capsys, flag, value, message):
    out = tmp_path / "out.onnx"
    code, _, err = _run(capsys, "optimize", str(EXAMPLE), "-o", str(out), flag, value)
    _assert_one_line_error(code, err, message)
    assert not out.exists()


def test_the_python_api_refuses_the_same_budgets():
    import nnopt

    with pytest.raises(nnopt.OptionError, match=r"^budget min_cosine: 2 is out of range"):
        nnopt.Budget(min_cosine=2)
    with pytest.raises(nnopt.OptionError, match=r"^budget max_rel_error: nan is out of range"):
        nnopt.Budget(max_rel_error=float("nan"))
    assert nnopt.Budget(min_top1=1).min_top1 == 1.0 and isinstance(nnopt.Budget(min_top1=1).min_top1, float)


@pytest.mark.parametrize("position", ["before", "after"])
def test_global_flags_work_before_or_after_the_command(capsys, position):
    argv = ["plugins", "--json"]
    argv = ["--no-plugins", *argv] if position == "before" else [*argv, "--no-plugins"]
    assert main(argv) == 0
    names = [p["name"] for p in json.loads(capsys.readouterr().out)["plugins"]]
    assert names == ["nnopt.passes"]  # the installed example plugin is not loaded either way
    assert main(["plugins", "--json"]) == 0  # and without the flag it is
    assert len(json.loads(capsys.readouterr().out)["plugins"]) >= 1


def _prune_budget_run(capsys, tmp_path: Path, data: dict[str, np.ndarray]) -> tuple[int, str, Path]:
    path = tmp_path / "data.npz"
    np.savez(path, **data)
    out = tmp_path / "out.onnx"
    code, _, err = _run(capsys, "optimize", str(EXAMPLE), "-o", str(out), "-p", "prune:ratio=0.5",
                        "--data", str(path), "--min-cosine", "0.9999", "--strict")
    return code, err, out


@pytest.mark.parametrize(
    ("fill", "message"),
    [
        (np.nan, "holds NaN values (sample 0); give finite data"),
        (np.inf, "holds infinite values (sample 0); give finite data"),
        (None, "holds no samples"),
    ],
)
def test_data_that_cannot_measure_fidelity_is_refused(capsys, tmp_path, fill, message):
    """NaN, infinite or no samples would score a lossy pass 'perfect' (issue #13): exit 2, nothing written."""
    name, shape = _input_signature(EXAMPLE)
    x = np.zeros((0, *shape), np.float32) if fill is None else np.full((2, *shape), fill, np.float32)
    code, err, out = _prune_budget_run(capsys, tmp_path, {name: x})
    _assert_one_line_error(code, err, message)
    assert not out.exists()


def test_real_data_still_holds_the_budget(capsys, tmp_path):
    name, shape = _input_signature(EXAMPLE)
    x = np.random.default_rng(0).standard_normal((2, *shape)).astype(np.float32)
    code, err, out = _prune_budget_run(capsys, tmp_path, {name: x})
    assert code == 3 and "below the budget" in err and not out.exists()


def _input_signature(path: Path) -> tuple[str, list[int]]:
    graph = onnx.load(str(path)).graph
    inits = {t.name for t in graph.initializer}
    first = next(i for i in graph.input if i.name not in inits)
    return first.name, [d.dim_value or 1 for d in first.type.tensor_type.shape.dim]


def test_a_model_whose_outputs_are_nan_on_the_data_is_refused(capsys, tmp_path):
    proto = model_from_text("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4] x) => (float[1, 4] y) { y = Log(x) }
    """)
    model = tmp_path / "log.onnx"
    onnx.save(proto, model)
    data = tmp_path / "negative.npz"
    np.savez(data, x=-np.ones((2, 1, 4), np.float32))  # log of a negative number is NaN
    out = tmp_path / "out.onnx"
    code, _, err = _run(capsys, "optimize", str(model), "-o", str(out), "--data", str(data))
    _assert_one_line_error(code, err, "the original model's output 'y' is NaN on sample 0")
    assert not out.exists()


def test_a_huge_input_shape_is_an_input_error_and_a_huge_model_input_skips_verification(capsys, tmp_path):
    out = tmp_path / "out.onnx"
    code, _, err = _run(capsys, "optimize", str(EXAMPLE), "-o", str(out), "--input-shape", "x=100000000,3,32,32")
    _assert_one_line_error(code, err, "input shape for 'x' [100000000, 3, 32, 32] would need 1,144.4 GiB")
    assert not out.exists()
    huge = tmp_path / "huge.onnx"
    onnx.save(model_from_text("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[100000, 100000] x) => (float[100000, 100000] y) { y = Relu(x) }
    """), huge)
    code, stdout, _ = _run(capsys, "optimize", str(huge), "-o", str(out))
    assert code == 0 and "numerical verification skipped: input 'x' of shape [100000, 100000] would need 37.3 GiB" in stdout
    code, _, err = _run(capsys, "analyze", str(huge), "--measure")
    _assert_one_line_error(code, err, "would need 37.3 GiB of generated values")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seed", "-1"], "argument --seed: expected a non-negative integer, got '-1'"),
        (["-p", "prune:ratio=0.5,ratio=0.6"], "pass 'prune': option 'ratio' given twice in 'prune:ratio=0.5,ratio=0.6'"),
        (["-p", "prune:"], "pass 'prune': nothing after ':' in 'prune:' (give key=value options or drop the ':')"),
    ],
)
def test_flags_found_by_fuzzing_are_input_errors(tmp_path, capsys, argv, message):
    out = tmp_path / "out.onnx"
    code, _, err = _run(capsys, "optimize", str(EXAMPLE), "-o", str(out), *argv)
    _assert_one_line_error(code, err, message)
    assert not out.exists()


def test_data_for_a_model_onnxruntime_cannot_load_is_an_input_error(tmp_path, capsys):
    """Without --data verification is skipped; with it, the data cannot be used: exit 2, not an internal error."""
    proto = model_from_text("""
        <ir_version: 8, opset_import: ["" : 17, "fz.unknown" : 1]>
        g (float[1, 4] x) => (float[1, 4] y) { y = fz.unknown.Thing(x) }
    """)
    model, data, out = tmp_path / "m.onnx", tmp_path / "d.npz", tmp_path / "out.onnx"
    onnx.save(proto, model)
    np.savez(data, x=np.ones((2, 1, 4), np.float32))
    code, _, err = _run(capsys, "optimize", str(model), "-o", str(out), "--data", str(data))
    _assert_one_line_error(code, err, "onnxruntime cannot load the model")
    assert not out.exists()
    code, stdout, _ = _run(capsys, "optimize", str(model), "-o", str(out))
    assert code == 0 and "numerical verification skipped: onnxruntime cannot load the model" in stdout
