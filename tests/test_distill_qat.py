"""Quantization-aware fine-tuning: distill through QuantizeLinear/DequantizeLinear with straight-through gradients."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from nnopt.api import optimize
from nnopt.ir.model import Model, load_model
from nnopt.runtime import make_session, run_model
from nnopt.testing import model_from_text

DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits"
MODEL = DIGITS / "digits_cnn.onnx"
QUANTIZE = "quantize:mode=static"
DISTILL = "distill:lr=0.0001"  # int8 weights move by whole steps: a small rate, or the first epoch overshoots


def _split(tmp: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """Half of digits_test (with labels) as distill data, the other, disjoint half for evaluation."""
    x = np.load(DIGITS / "digits_test.npz")["x"]
    y = np.load(DIGITS / "digits_test_labels.npy")
    order = np.random.default_rng(0).permutation(len(x))
    fit, held = np.sort(order[: len(x) // 2]), np.sort(order[len(x) // 2 :])
    np.savez(tmp / "fit.npz", x=x[fit], labels=y[fit])
    return tmp / "fit.npz", x[held], y[held]


def _accuracy(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    session = make_session(model, optimize=True)  # onnxruntime's int8 kernels, as deployed
    return float(np.mean([run_model(session, {"x": x[i : i + 1]})[0].argmax() == y[i] for i in range(len(x))]))


def _initializers(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}


def test_quantize_linear_forward_rounds_and_gradient_is_straight_through_inside_the_range() -> None:
    torch = pytest.importorskip("torch")
    from nnopt.passes._torch_graph import TorchGraph

    proto = model_from_text("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[5] x) => (float[5] y) <float s = {0.5}, uint8 z = {128}> {
          q = QuantizeLinear (x, s, z)
          y = DequantizeLinear (q, s, z)
        }""")
    net = TorchGraph(Model.from_proto(proto).graph, 17)
    x = torch.tensor([-70.0, -1.26, 0.3, 0.74, 70.0], requires_grad=True)
    (y,) = net({"x": x})
    # round(x / 0.5) + 128, saturated to [0, 255], back: (q - 128) * 0.5; half to even as ONNX (0.74 / 0.5 = 1.48 -> 1).
    assert y.tolist() == [-64.0, -1.5, 0.5, 0.5, 63.5]
    assert np.allclose(y.detach().numpy(), run_model(make_session(proto), {"x": x.detach().numpy()})[0])
    (y * torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])).sum().backward()
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 0.0]  # identity inside the clamp range, zero where it saturates


def test_an_int8_weight_trains_as_a_float_shadow_on_its_fixed_per_channel_grid() -> None:
    torch = pytest.importorskip("torch")
    from nnopt.passes._torch_graph import TorchGraph

    w = np.array([[-128, 3], [127, -2]], dtype=np.int8)
    proto = model_from_text("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 2] x) => (float[1, 2] y) <int8[2, 2] w, float[2] s = {0.5, 0.25}, int8[2] z = {0, 0}> {
          d = DequantizeLinear <axis = 1> (w, s, z)
          y = MatMul (x, d)
        }""", {"w": w})
    model = Model.from_proto(proto)
    net = TorchGraph(model.graph, 17)
    (weight,) = net.weights
    assert weight.name == "w" and weight.grid is not None
    assert net.params[0].tolist() == [[-64.0, 0.75], [63.5, -0.5]]  # the dequantized values (columns: 0.5, 0.25)
    x = torch.tensor([[1.0, 2.0]])
    net({"x": x})[0].sum().backward()
    # d(sum y)/dw[i, j] = x[i] inside the range; w[0, 0] = -128 and w[1, 0] = 127 sit on its ends and the
    # gradient passes there too (clamp's gradient is 1 at the bounds); it is cut only beyond them.
    assert net.params[0].grad.tolist() == [[1.0, 1.0], [2.0, 2.0]]
    with torch.no_grad():
        net.params[0].add_(torch.tensor([[-9.0, 0.3], [9.0, -0.2]]))  # past both ends; 0.3 / 0.25 -> +1 step
    net.write_back()
    written = model.graph.tensors()["w"].values
    assert written.dtype == np.int8 and written.tolist() == [[-128, 4], [127, -3]]


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    pytest.importorskip("torch")
    data, x, y = _split(tmp_path_factory.mktemp("qat"))
    quantized, _ = optimize(str(MODEL), [QUANTIZE], data=data)
    runs = [optimize(str(MODEL), [QUANTIZE, DISTILL], data=data) for _ in range(2)]
    return {"x": x, "y": y, "quantized": quantized.to_proto(), "runs": [(m.to_proto(), r) for m, r in runs]}


def test_qat_on_digits_keeps_the_qdq_graph_and_changes_only_initializer_values(digits) -> None:
    before, (after, report) = digits["quantized"], digits["runs"][0]
    record = next(p for p in report.passes if p.name == "distill")
    assert record.status == "applied" and record.stats["interpreter_error"] < 1e-5
    assert [(n.op_type, n.name, list(n.input), list(n.output), list(n.attribute)) for n in after.graph.node] == \
        [(n.op_type, n.name, list(n.input), list(n.output), list(n.attribute)) for n in before.graph.node]
    assert sum(n.op_type == "QuantizeLinear" for n in after.graph.node) >= 3
    old, new = _initializers(before), _initializers(after)
    assert list(old) == list(new)
    assert all(old[k].dtype == new[k].dtype and old[k].shape == new[k].shape for k in old)
    assert [old[k].nbytes for k in old] == [new[k].nbytes for k in new]  # same bytes per tensor, same order
    changed = [k for k in old if not np.array_equal(old[k], new[k])]
    int8_changed = [k for k in changed if new[k].dtype == np.int8]
    assert len(int8_changed) >= 2  # the weights of the convs and gemms (stored int8) moved on their grids
    scales = [n.input[1] for n in before.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert not set(scales) & set(changed)  # scales (and zero points) kept
    assert record.stats["tensors_trained"] >= len(changed)


def test_qat_on_digits_is_not_less_accurate_on_held_out_images_and_is_deterministic(digits) -> None:
    x, y = digits["x"], digits["y"]
    (first, _), (second, _) = digits["runs"]
    assert first.SerializeToString() == second.SerializeToString()
    original = _accuracy(load_model(MODEL).to_proto(), x, y)
    quantized, trained = _accuracy(digits["quantized"], x, y), _accuracy(first, x, y)
    # Measured on the 225 held-out images: float 98.7 %, int8 98.7 %, int8 + distill 98.7 %.
    assert original > 0.98 and quantized > 0.97
    assert trained >= quantized


def test_qat_recovers_int8_digits_after_pruning_by_training_the_int8_weights(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    data, x, y = _split(tmp_path)
    passes = ["default", "prune:ratio=0.5,reconstruct=off", "quantize:mode=static,select=all"]  # all: too small for latency
    quantized, _ = optimize(str(MODEL), passes, data=data)
    trained, report = optimize(str(MODEL), [*passes, "distill"], data=data)
    old, new = _initializers(quantized.to_proto()), _initializers(trained.to_proto())
    assert any(new[k].dtype == np.int8 and not np.array_equal(old[k], new[k]) for k in old)
    # Measured on the 225 held-out images: 14.7 % after prune 0.5 + int8, 99.6 % once distill trains the int8
    # weights through the QDQ graph (the float model: 98.7 %).
    assert _accuracy(quantized.to_proto(), x, y) < 0.3
    assert _accuracy(trained.to_proto(), x, y) > 0.97
    assert next(p for p in report.passes if p.name == "distill").stats["stopped_by"] == "epochs"
