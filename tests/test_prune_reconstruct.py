"""prune's reconstruction: layers downstream of removed channels refit on --data, judged on held-out samples.

The digits CNN's 450 test images are split: the first 225 are the calibration data (--data), the other 225
are never seen by the pass and give every accuracy and error asserted here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from nnopt.analysis.activations import channel_rows, conv_patch_rows, run_convs
from nnopt.api import optimize
from nnopt.runtime import make_session

DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits"
HALF = 225


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    x = np.load(DIGITS / "digits_test.npz")["x"]
    labels = np.load(DIGITS / "digits_test_labels.npy")
    calib = tmp_path_factory.mktemp("digits") / "calib.npz"
    np.savez(calib, x=x[:HALF])
    return {"calib": calib, "x": x[HALF:], "y": labels[HALF:], "model": DIGITS / "digits_cnn.onnx"}


def _prune(digits: dict[str, Any], spec: str, data: bool = True) -> tuple[onnx.ModelProto, dict[str, Any]]:
    model, report = optimize(str(digits["model"]), ["default", spec], data=digits["calib"] if data else None)
    prune = next(p for p in report.to_dict()["passes"] if p["name"] == "prune")
    return model.to_proto(), prune


def _logits(model: onnx.ModelProto | Path, x: np.ndarray) -> np.ndarray:
    return np.asarray(make_session(model).run(None, {"x": x})[0])


def _accuracy(model: onnx.ModelProto | Path, digits: dict[str, Any]) -> float:
    return float((_logits(model, digits["x"]).argmax(axis=1) == digits["y"]).mean())


def test_reconstruction_recovers_held_out_accuracy(digits):
    original = _accuracy(digits["model"], digits)
    assert original == pytest.approx(222 / 225)
    sliced, _ = _prune(digits, "prune:ratio=0.3,round_to=8,reconstruct=off")
    refit, report = _prune(digits, "prune:ratio=0.3,round_to=8")
    # Without reconstruction 30 % of the channels cost 26 points; with it, nothing on these 225 images.
    assert _accuracy(sliced, digits) < 0.75
    assert _accuracy(refit, digits) >= original - 0.005
    assert report["stats"]["layers_reconstructed"] == 4
    half, _ = _prune(digits, "prune:ratio=0.5,round_to=8")
    assert _accuracy(half, digits) >= original - 0.01


def test_each_refit_lowers_the_layers_error_and_the_logits_error_on_held_out_samples(digits):
    _, report = _prune(digits, "prune:ratio=0.3,round_to=8")
    refits = [layer for layer in report["layers"] if layer.get("fit") == "data"]
    assert [layer["node"] for layer in refits] == ["/3/Conv", "/7/Conv", "/12/Gemm", "/14/Gemm"]
    for layer in refits:
        assert layer["heldout_error_refit"] < 0.5 * layer["heldout_error_weight_fit"], layer
    # The classifier kept its 10 outputs: its line says it was rewritten (refit), not declined.
    last = refits[-1]
    assert last["action"] == "rewritten" and "output channels kept" in last["reason"]
    # Measured independently, on the 225 images the pass never saw: the logits' relative error.
    reference = _logits(digits["model"], digits["x"])
    errors = {}
    for mode in ("off", "auto"):
        model, _ = _prune(digits, f"prune:ratio=0.3,round_to=8,reconstruct={mode}")
        errors[mode] = np.linalg.norm(_logits(model, digits["x"]) - reference) / np.linalg.norm(reference)
    assert errors["off"] > 0.15 and errors["auto"] < 0.05, errors


def test_reconstruction_is_deterministic_and_needs_data(digits):
    first, _ = _prune(digits, "prune:ratio=0.3,round_to=8")
    second, _ = _prune(digits, "prune:ratio=0.3,round_to=8")
    assert first.SerializeToString() == second.SerializeToString()
    no_data, report = _prune(digits, "prune:ratio=0.3,round_to=8", data=False)
    off, _ = _prune(digits, "prune:ratio=0.3,round_to=8,reconstruct=off", data=False)
    assert no_data.SerializeToString() == off.SerializeToString()
    assert "layers_reconstructed" not in report["stats"]


@pytest.mark.parametrize(
    "attrs, shape",
    [
        ({"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, (2, 4, 9, 7)),
        ({"kernel_shape": [3, 2], "strides": [2, 3], "dilations": [2, 1], "pads": [0, 1, 2, 0]}, (1, 3, 11, 10)),
        ({"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"}, (1, 3, 8, 9)),
        ({"kernel_shape": [4, 3], "strides": [3, 2], "auto_pad": "SAME_LOWER"}, (1, 2, 10, 9)),
        ({"kernel_shape": [3], "pads": [1, 0]}, (2, 3, 12)),
    ],
)
def test_conv_patch_rows_times_the_weight_is_onnxruntimes_conv(attrs, shape):
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype(np.float32)
    w = rng.normal(size=(5, shape[1], *attrs["kernel_shape"])).astype(np.float32)
    expected = channel_rows(run_convs([x], [(w, attrs)], 17)[0][0])
    patches = conv_patch_rows(x, attrs)
    assert patches.shape == (expected.shape[0], w[0].size)
    np.testing.assert_allclose(patches @ w.reshape(5, -1).T, expected, atol=1e-5)
    rows = np.array([0, 3, expected.shape[0] - 1])
    assert np.array_equal(conv_patch_rows(x, attrs, rows), patches[rows])


def _matmul_net(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    """x → MatMul(16→24) → Relu → Gemm(24→12, transB, no bias) → Relu → MatMul(12→4) → y."""
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(rng.normal(size=(16, 24)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(size=(12, 24)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.normal(size=(12, 4)).astype(np.float32), "w3"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="mm1"),
        helper.make_node("Relu", ["h1"], ["a1"], name="r1"),
        helper.make_node("Gemm", ["a1", "w2"], ["h2"], name="gemm", transB=1),
        helper.make_node("Relu", ["h2"], ["a2"], name="r2"),
        helper.make_node("MatMul", ["a2", "w3"], ["y"], name="mm2"),
    ]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits,
    )
    path = tmp_path / "mlp.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    x = rng.normal(size=(400, 16)).astype(np.float32)
    data = tmp_path / "calib.npz"
    np.savez(data, x=x[:200])
    return path, data, x[200:]


def test_gemm_without_bias_gets_one_and_matmul_refits_without(tmp_path):
    path, data, held = _matmul_net(tmp_path)
    model, report = optimize(str(path), ["prune:ratio=0.5"], data=data)
    prune = next(p for p in report.to_dict()["passes"] if p["name"] == "prune")
    fits = {layer["node"]: layer for layer in prune["layers"] if "fit" in layer}
    assert set(fits) == {"gemm", "mm2"} and all(f["fit"] == "data" for f in fits.values())
    proto = model.to_proto()
    gemm = next(n for n in proto.graph.node if n.name == "gemm")
    assert len(gemm.input) == 3  # the fitted bias correction needs a C input the layer did not have
    off, _ = optimize(str(path), ["prune:ratio=0.5,reconstruct=off"], data=data)
    reference = _logits_mlp(path, held)
    err = {k: np.linalg.norm(_logits_mlp(m, held) - reference) for k, m in (("off", off.to_proto()), ("auto", proto))}
    assert err["auto"] < 0.7 * err["off"], err  # measured: 0.60 (half the hidden units of a random net are gone)


def _logits_mlp(model: onnx.ModelProto | Path, x: np.ndarray) -> np.ndarray:
    return np.asarray(make_session(model).run(None, {"x": x})[0])


def test_channels_ranked_by_output_error_differ_from_norm_ranking_and_still_recover(digits):
    by_norm, _ = _prune(digits, "prune:ratio=0.5,round_to=8,reconstruct=off")
    by_output, report = _prune(digits, "prune:ratio=0.5,round_to=8,reconstruct=off,criterion=output")
    assert report["stats"]["criterion"] == "output"
    # Same channel counts (the same parameters removed), other channels kept: other weights.
    assert report["stats"]["weight_params_removed"] == 82368
    norm_weights = {t.name: numpy_helper.to_array(t) for t in by_norm.graph.initializer}
    output_weights = [numpy_helper.to_array(t) for t in by_output.graph.initializer]
    assert sorted(w.shape for w in norm_weights.values()) == sorted(w.shape for w in output_weights)
    assert not all(any(np.array_equal(w, v) for v in norm_weights.values()) for w in output_weights)
    recovered, _ = _prune(digits, "prune:ratio=0.5,round_to=8,criterion=output")
    assert _accuracy(recovered, digits) >= _accuracy(digits["model"], digits) - 0.01
    _, no_data = _prune(digits, "prune:ratio=0.5,round_to=8,criterion=output", data=False)
    assert no_data["stats"]["criterion"].startswith("norm: ")
