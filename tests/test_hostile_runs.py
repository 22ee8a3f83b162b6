"""Hostile runs (issue 13): models that never finish, data that would flood memory, budgets nothing can check.

Each fault ends in a documented way: verification reported impossible (and a lossy pass with a budget rolled
back), or a one-line exit 2 with nothing written.
"""

from __future__ import annotations

import io
import json
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import pytest

from nnopt import Budget, Pipeline
from nnopt.cli import main
from nnopt.errors import DataError, OptionError
from nnopt.pipeline.verify import Verifier
from nnopt.runtime import MAX_DATA_SAMPLES, RunTimeLimitExceeded, make_session, run_model
from nnopt.testing import model_from_text

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "small_cnn.onnx"
#: small_cnn's input: samples of [1, 3, 32, 32] (the batch dim N is 1 here).
EXAMPLE_SAMPLE = (1, 3, 32, 32)


def _endless_loop(initial: str) -> onnx.NodeProto:
    """A valid Loop with neither trip count nor condition: it never ends (the body passes `cond` on as is)."""
    body = oh.make_graph(
        [oh.make_node("Identity", ["cond_in"], ["cond_out"]), oh.make_node("Add", ["v_in", "one"], ["v_out"])],
        "body",
        [oh.make_tensor_value_info("i", onnx.TensorProto.INT64, []),
         oh.make_tensor_value_info("cond_in", onnx.TensorProto.BOOL, []),
         oh.make_tensor_value_info("v_in", onnx.TensorProto.FLOAT, [1])],
        [oh.make_tensor_value_info("cond_out", onnx.TensorProto.BOOL, []),
         oh.make_tensor_value_info("v_out", onnx.TensorProto.FLOAT, [1])],
        [oh.make_tensor("one", onnx.TensorProto.FLOAT, [1], [1.0])],
    )
    return oh.make_node("Loop", ["", "", initial], ["forever"], body=body)


def _cnn_with_endless_output(tmp_path: Path) -> Path:
    """small_cnn plus a second output computed by an endless Loop: the original model never finishes a run."""
    proto = onnx.load(str(EXAMPLE))
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(1, np.float32), "start"))
    proto.graph.node.append(_endless_loop("start"))
    proto.graph.output.append(oh.make_tensor_value_info("forever", onnx.TensorProto.FLOAT, [1]))
    onnx.checker.check_model(proto)
    path = tmp_path / "endless.onnx"
    onnx.save(proto, str(path))
    return path


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line_error(code: int, err: str, needle: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("nnopt: error: ") and needle in lines[0], err


# ---------------------------------------------------------------------------------------------- time limits
def test_run_model_stops_an_endless_loop_at_its_time_limit() -> None:
    proto = onnx.load(str(EXAMPLE))
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(1, np.float32), "start"))
    proto.graph.node.append(_endless_loop("start"))
    proto.graph.output.append(oh.make_tensor_value_info("forever", onnx.TensorProto.FLOAT, [1]))
    session = make_session(proto)
    feeds = {"x": np.zeros(EXAMPLE_SAMPLE, np.float32)}
    with pytest.raises(RunTimeLimitExceeded, match=r"did not finish one run within 0\.5 s"):
        run_model(session, feeds, time_limit=0.5)
    # Without a limit the call would not return; a model that ends is unaffected by one.
    plain = make_session(str(EXAMPLE))
    (probs,) = run_model(plain, feeds, time_limit=5)
    assert probs.shape == (1, 10) and abs(float(probs.sum()) - 1.0) < 1e-5


def test_an_endless_original_model_is_reported_as_verification_impossible(tmp_path, capsys) -> None:
    model = _cnn_with_endless_output(tmp_path)
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code, stdout, _ = _run(capsys, "optimize", str(model), "-o", str(out), "--report", str(report),
                           "--run-time-limit", "0.5")
    assert code == 0
    assert "numerical verification skipped: verification impossible: the original model on the generated inputs: " \
           "onnxruntime did not finish one run within 0.5 s and was stopped" in stdout
    assert json.loads(report.read_text())["verification"].startswith("verification impossible")
    assert onnx.load(str(out)).graph.output[1].name == "forever"


def test_a_budget_nothing_can_check_rolls_the_lossy_pass_back(tmp_path, capsys) -> None:
    model = _cnn_with_endless_output(tmp_path)
    out = tmp_path / "out.onnx"
    argv = ["optimize", str(model), "-o", str(out), "-p", "prune:ratio=0.5", "--min-cosine", "0.99",
            "--run-time-limit", "0.5", "--json"]
    code, stdout, _ = _run(capsys, *argv)
    assert code == 0
    (record,) = json.loads(stdout)["passes"]
    assert record["status"] == "rolled_back"
    assert record["reason"].startswith("the budget cannot be checked: verification impossible")
    code, _, err = _run(capsys, *argv[:-1], "--strict", "-o", str(tmp_path / "strict.onnx"))
    assert code == 3 and "the budget cannot be checked" in err
    assert not (tmp_path / "strict.onnx").exists()


def test_a_rewritten_model_that_never_ends_fails_verification_at_the_limit() -> None:
    text = """<ir_version: 8, opset_import: ["" : 17]>
        g (float[1] x) => (float[1] forever) { forever = Identity(x) }"""
    original = model_from_text(text)
    endless = oh.make_model(
        oh.make_graph([_endless_loop("x")], "g", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                      [oh.make_tensor_value_info("forever", onnx.TensorProto.FLOAT, [1])]),
        opset_imports=[oh.make_opsetid("", 17)], ir_version=8,
    )
    verifier = Verifier(original, time_limit=0.5)
    assert verifier.unavailable is None and len(verifier.reference) == 2
    with pytest.raises(RunTimeLimitExceeded):
        verifier.run(endless)


def test_analyze_measure_gives_up_on_an_endless_model(tmp_path, capsys) -> None:
    model = _cnn_with_endless_output(tmp_path)
    code, _, err = _run(capsys, "analyze", str(model), "--measure", "--run-time-limit", "0.5")
    _one_line_error(code, err, "onnxruntime did not finish one run within 0.5 s and was stopped")
    code, _, err = _run(capsys, "analyze", str(model), "--measure", "--run-time-limit", "0")
    _one_line_error(code, err, "--run-time-limit: expected a positive number of seconds, got '0'")


# ---------------------------------------------------------------------------------------------- budgets
def test_a_top1_budget_without_data_is_refused(tmp_path, capsys) -> None:
    out = tmp_path / "out.onnx"
    code, _, err = _run(capsys, "optimize", str(EXAMPLE), "-o", str(out), "-p", "prune:ratio=0.3",
                        "--min-top1", "0.99")
    _one_line_error(code, err, "a top-1 budget (--min-top1) needs reference data (--data)")
    assert not out.exists()
    with pytest.raises(DataError):
        Pipeline(["prune:ratio=0.3"], budget=Budget(min_top1=0.99)).run(str(EXAMPLE))


def test_a_budget_with_verification_disabled_is_refused(tmp_path, capsys) -> None:
    out = tmp_path / "out.onnx"
    code, _, err = _run(capsys, "optimize", str(EXAMPLE), "-o", str(out), "-p", "prune:ratio=0.3",
                        "--min-cosine", "0.9", "--no-verify")
    _one_line_error(code, err, "a budget needs numerical verification")
    assert not out.exists()


def test_a_budget_on_generated_inputs_uses_more_of_them_and_says_so() -> None:
    _, report = Pipeline(["prune:ratio=0.1"], budget=Budget(min_cosine=0.5)).run(str(EXAMPLE))
    assert report.fidelity is not None and report.fidelity["samples"] == 16
    assert any("the budget is judged on 16 generated inputs (seeded noise), not on task data" in n
               for n in report.notes)
    _, lossless = Pipeline().run(str(EXAMPLE))
    assert lossless.fidelity is not None and lossless.fidelity["samples"] == 2
    assert not any("generated inputs" in n for n in lossless.notes)


def test_a_top1_budget_on_a_model_without_class_scores_is_refused(tmp_path) -> None:
    proto = model_from_text("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4, 4] x) => (float[1, 4, 4] y) { y = Relu(x) }""")
    data = tmp_path / "d.npz"
    np.savez(data, x=np.ones((3, 1, 4, 4), np.float32))
    with pytest.raises(OptionError, match="no output of the model looks like class scores"):
        Pipeline(["dce"], data=data, budget=Budget(min_top1=0.9)).run(proto)


# ---------------------------------------------------------------------------------------------- data files
def _data_for_example(tmp_path: Path, count: int) -> Path:
    path = tmp_path / "d.npz"
    x = np.random.default_rng(0).standard_normal((count, *EXAMPLE_SAMPLE[1:])).astype(np.float32)
    np.savez(path, x=x)  # rank 4 = the input's own rank: split along axis 0 into samples of batch 1
    return path


def test_only_the_first_samples_of_a_big_data_file_are_used_and_the_report_says_so(tmp_path) -> None:
    data = _data_for_example(tmp_path, MAX_DATA_SAMPLES + 5)
    _, report = Pipeline(["dce"], data=data).run(str(EXAMPLE))
    assert report.fidelity is not None and report.fidelity["samples"] == MAX_DATA_SAMPLES
    assert f"data file d.npz holds {MAX_DATA_SAMPLES + 5} samples; only the first {MAX_DATA_SAMPLES} are used" \
        in report.notes


def test_two_million_tiny_samples_are_cut_when_read(tmp_path) -> None:
    proto = model_from_text("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[1] x) => (float[1] y) { y = Relu(x) }""")
    data = tmp_path / "many.npz"
    np.savez_compressed(data, x=np.ones((2_000_000, 1), np.float32))
    assert data.stat().st_size < 100_000
    verifier = Verifier(proto, data=str(data))
    assert len(verifier.samples) == MAX_DATA_SAMPLES and verifier.samples[0]["x"].shape == (1,)
    assert verifier.notes == [f"data file many.npz holds 2000000 samples; only the first {MAX_DATA_SAMPLES} are used"]


def _npz_with_header(path: Path, header: dict[str, object], payload: bytes) -> None:
    """An .npz whose one array 'x' declares ``header`` but holds only ``payload``."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", buffer.getvalue() + payload)


def test_an_array_that_would_flood_memory_is_refused_before_it_is_read(tmp_path, capsys) -> None:
    data = tmp_path / "bomb.npz"
    # Two samples of 3 GiB each: the cut to MAX_DATA_SAMPLES rows leaves 6 GiB, over the 4 GiB limit.
    _npz_with_header(data, {"descr": "<f4", "fortran_order": False, "shape": (2, 3 * 2**28)}, b"")
    out = tmp_path / "out.onnx"
    code, _, err = _run(capsys, "optimize", str(EXAMPLE), "-o", str(out), "--data", str(data))
    _one_line_error(code, err, "array 'x' would take 6.0 GiB in memory (limit 4 GiB)")
    assert not out.exists()


def test_a_truncated_array_is_refused(tmp_path, capsys) -> None:
    data = tmp_path / "short.npz"
    _npz_with_header(data, {"descr": "<f4", "fortran_order": False, "shape": (2, 3, 32, 32)}, b"\0" * 100)
    code, _, err = _run(capsys, "optimize", str(EXAMPLE), "-o", str(tmp_path / "o.onnx"), "--data", str(data))
    _one_line_error(code, err, "array 'x' is truncated")


def test_a_fortran_ordered_array_reads_the_same_samples(tmp_path) -> None:
    x = np.random.default_rng(1).standard_normal((3, *EXAMPLE_SAMPLE[1:])).astype(np.float32)
    c_path, f_path = tmp_path / "c.npz", tmp_path / "f.npz"
    np.savez(c_path, x=x)
    np.savez(f_path, x=np.asfortranarray(x))
    session = make_session(str(EXAMPLE))
    from nnopt.runtime import load_samples

    c_samples, f_samples = load_samples(c_path, session), load_samples(f_path, session)
    assert len(c_samples) == len(f_samples) == 3
    for a, b in zip(c_samples, f_samples):
        np.testing.assert_array_equal(a["x"], b["x"])


def test_pickled_object_arrays_are_refused(tmp_path, capsys) -> None:
    data = tmp_path / "pickled.npz"
    np.savez(data, x=np.array([{"a": 1}], dtype=object))
    code, _, err = _run(capsys, "optimize", str(EXAMPLE), "-o", str(tmp_path / "o.onnx"), "--data", str(data))
    _one_line_error(code, err, "array 'x' holds Python objects (pickled data is refused)")


# ---------------------------------------------------------------------------------------------- memory
def _constant_of_shape_bomb(tmp_path: Path) -> Path:
    """183 bytes of valid model: a ConstantOfShape of 2^31 floats (8 GiB; onnxruntime peaks at 17 GB) → ReduceMax."""
    graph = oh.make_graph(
        [oh.make_node("ConstantOfShape", ["shape"], ["big"],
                      value=oh.make_tensor("v", onnx.TensorProto.FLOAT, [1], [1.0])),
         oh.make_node("ReduceMax", ["big"], ["m"], keepdims=0),
         oh.make_node("Add", ["x", "m"], ["y"])],
        "g", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        [onnx.numpy_helper.from_array(np.array([2**31], np.int64), "shape")],
    )
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)
    path = tmp_path / "bomb.onnx"
    onnx.save(proto, str(path))
    return path


def test_a_model_that_would_build_a_huge_tensor_is_not_run(tmp_path, capsys) -> None:
    model = _constant_of_shape_bomb(tmp_path)
    out = tmp_path / "out.onnx"
    code, stdout, _ = _run(capsys, "optimize", str(model), "-o", str(out))
    assert code == 0
    assert "verification impossible: running the model would build tensor 'big' of 8.0 GiB (limit 4 GiB)" in stdout
    # fold-constants leaves the ConstantOfShape alone: folding it would write 8 GiB into the model.
    assert [n.op_type for n in onnx.load(str(out)).graph.node] == ["ConstantOfShape", "ReduceMax", "Add"]
    assert out.stat().st_size < 1000
    code, _, err = _run(capsys, "analyze", str(model), "--measure")
    _one_line_error(code, err, "cannot measure latency: running the model would build tensor 'big' of 8.0 GiB")


def test_passes_that_run_the_model_inherit_the_pipelines_time_limit(tmp_path) -> None:
    """quantize's calibration runs the model in onnxruntime's own calibrator: stopped at the same limit."""
    model = _cnn_with_endless_output(tmp_path)
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((2, *EXAMPLE_SAMPLE)).astype(np.float32))
    _, report = Pipeline(["quantize"], data=data, run_time_limit=0.5).run(str(model))
    (record,) = report.passes
    assert record.status == "rolled_back"
    assert record.reason == "raised RunTimeLimitExceeded: onnxruntime did not finish one run within 0.5 s and was stopped"
    assert report.verification.startswith("verification impossible: the original model on the given inputs")


def test_data_values_a_cast_would_change_are_refused_without_a_warning(tmp_path, capsys) -> None:
    proto = model_from_text("""<ir_version: 8, opset_import: ["" : 17]>
        g (int32[1, 2] x, float16[1, 2] h) => (int32[1, 2] y, float16[1, 2] z) { y = Identity(x) z = Identity(h) }""")
    model = tmp_path / "m.onnx"
    onnx.save(proto, str(model))
    big_int, big_float = tmp_path / "int.npz", tmp_path / "float.npz"
    np.savez(big_int, x=np.array([[[1, 2**40]]], np.int64), h=np.ones((1, 1, 2), np.float16))
    np.savez(big_float, x=np.ones((1, 1, 2), np.int32), h=np.full((1, 1, 2), 1e6, np.float64))
    for data, message in ((big_int, "array 'x' holds values outside the range of int32"),
                          (big_float, "array 'h' holds infinite values (sample 0)")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # numpy's RuntimeWarning on an overflowing cast would print a line
            code, _, err = _run(capsys, "optimize", str(model), "-o", str(tmp_path / "o.onnx"), "--data", str(data))
        _one_line_error(code, err, message)
