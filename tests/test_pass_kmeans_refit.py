"""kmeans centroid refit on --data: held-out layer errors and digits accuracy, zeros kept, determinism, off."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from nnopt.analysis.activations import collect_activations
from nnopt.api import optimize
from nnopt.ir.model import Model
from nnopt.runtime import make_session

DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits"
LAYERS = ("/3/Conv", "/7/Conv", "/12/Gemm", "/14/Gemm")


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """digits_test split in two: even samples calibrate (--data), odd ones evaluate (never seen by the pass)."""
    with np.load(DIGITS / "digits_test.npz") as npz:
        name = npz.files[0]
        x = npz[name]
    labels = np.load(DIGITS / "digits_test_labels.npy")
    path = tmp_path_factory.mktemp("digits") / "calibration.npz"
    np.savez(path, **{name: x[0::2]})
    return {"name": name, "data": str(path), "x": x[1::2], "labels": labels[1::2]}


def _accuracy(model: Model | onnx.ModelProto, digits: dict[str, object]) -> float:
    proto = model.to_proto() if isinstance(model, Model) else model
    sess = make_session(proto)
    x, labels = digits["x"], digits["labels"]
    assert isinstance(x, np.ndarray) and isinstance(labels, np.ndarray)
    preds = [int(np.argmax(sess.run(None, {str(digits["name"]): x[i:i + 1]})[0])) for i in range(len(x))]
    return float(np.mean(np.array(preds) == labels))


def _kmeans(digits: dict[str, object], spec: str, data: bool = True) -> tuple[Model, dict[str, object]]:
    model, report = optimize(str(DIGITS / "digits_cnn.onnx"), ["default", spec],
                             data=str(digits["data"]) if data else None, seed=0)
    record = report.passes[-1]
    assert record.name == "kmeans" and record.status == "applied", record.reason
    return model, {"stats": record.stats, "layers": {entry["node"]: entry for entry in record.layers}}


def _layer_errors(model: Model, digits: dict[str, object]) -> dict[str, float]:
    """Relative error of each refit layer's output against the float model (after ``default``, which folds
    BatchNorm into the convs, as before kmeans) on the evaluation samples."""
    original, _ = optimize(str(DIGITS / "digits_cnn.onnx"), ["default"], seed=0)
    outputs = {n.name: n.outputs[0].name for n in original.graph.nodes if n.name in LAYERS}
    assert outputs == {n.name: n.outputs[0].name for n in model.graph.nodes if n.name in LAYERS}
    x = digits["x"]
    assert isinstance(x, np.ndarray)
    samples = [{str(digits["name"]): x[i:i + 1]} for i in range(len(x))]
    ref = collect_activations(original, list(outputs.values()), samples)
    got = collect_activations(model, list(outputs.values()), samples)
    errors = {}
    for layer, name in outputs.items():
        r, g = np.concatenate(ref[name]), np.concatenate(got[name])
        errors[layer] = float(np.linalg.norm(r - g) / np.linalg.norm(r))
    return errors


def test_digits_2bit_per_channel_keeps_accuracy_within_one_point(digits: dict[str, object]) -> None:
    original = _accuracy(onnx.load(DIGITS / "digits_cnn.onnx"), digits)
    refit, report = _kmeans(digits, "kmeans:bits=2,per_channel=true")
    plain, _ = _kmeans(digits, "kmeans:bits=2,per_channel=true,refit=off")
    # Measured: original 98.67 % on these 225 held-out digits, 98.22 % without refit, 98.67 % with it.
    assert original == pytest.approx(0.9867, abs=1e-3)
    assert _accuracy(plain, digits) == pytest.approx(0.9822, abs=1e-3)
    assert _accuracy(refit, digits) >= original - 0.01
    assert report["stats"]["layers_refit"] == 4


def test_digits_2bit_per_tensor_refit_recovers_most_of_the_loss(digits: dict[str, object]) -> None:
    refit, _ = _kmeans(digits, "kmeans:bits=2")
    plain, _ = _kmeans(digits, "kmeans:bits=2,refit=off")
    # Measured: 79.1 % without refit, 97.8 % with it (original 98.67 %): the per-channel bias correction does
    # most of it (94.2 % with the centroid refit alone), a per-tensor codebook shifts each channel's mean.
    assert _accuracy(plain, digits) < 0.80
    assert _accuracy(refit, digits) > 0.97


def test_refit_lowers_each_layers_output_error_on_unseen_samples(digits: dict[str, object]) -> None:
    refit, report = _kmeans(digits, "kmeans:bits=2,per_channel=true")
    plain, _ = _kmeans(digits, "kmeans:bits=2,per_channel=true,refit=off")
    after, before = _layer_errors(refit, digits), _layer_errors(plain, digits)
    # Evaluation samples, which neither the clustering nor the refit saw; errors include upstream layers'.
    for layer in LAYERS:
        assert after[layer] < 0.9 * before[layer], (layer, before[layer], after[layer])
        figures = report["layers"][layer]["refit"]
        assert figures["fit"] == "data" and figures["bias_corrected"] is True
        # The report's own held-out figure (odd calibration samples, fitted on the even ones).
        assert figures["heldout_output_error_after"] < figures["heldout_output_error_before"]
    assert after["/12/Gemm"] < 0.75 * before["/12/Gemm"]


def test_exact_zeros_stay_zero_after_refit(digits: dict[str, object], tmp_path: Path) -> None:
    proto = onnx.load(DIGITS / "digits_cnn.onnx")
    gemm = next(n for n in proto.graph.node if n.name == "/12/Gemm")
    init = next(t for t in proto.graph.initializer if t.name == gemm.input[1])
    w = onnx.numpy_helper.to_array(init).copy()
    w[np.abs(w) < np.quantile(np.abs(w), 0.5)] = 0.0  # half the weights pruned
    init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
    model, report = optimize(proto, ["kmeans:bits=2,per_channel=true"], data=str(digits["data"]), seed=0)
    assert report.passes[-1].stats["layers_refit"] >= 1
    decoded = next(n for n in model.graph.nodes if n.name == "/12/Gemm").inputs[1].name
    x = digits["x"]
    assert isinstance(x, np.ndarray)
    value = collect_activations(model, [decoded], [{str(digits["name"]): x[:1]}])[decoded][0]
    assert np.all(value[w == 0] == 0)
    assert np.count_nonzero(value) == np.count_nonzero(w)


def test_refit_is_deterministic_and_off_gives_the_no_data_bytes(digits: dict[str, object]) -> None:
    first, _ = _kmeans(digits, "kmeans:bits=2,per_channel=true")
    second, _ = _kmeans(digits, "kmeans:bits=2,per_channel=true")
    assert first.to_proto().SerializeToString() == second.to_proto().SerializeToString()
    off, report = _kmeans(digits, "kmeans:bits=2,per_channel=true,refit=off")
    no_data, _ = _kmeans(digits, "kmeans:bits=2,per_channel=true", data=False)
    assert off.to_proto().SerializeToString() == no_data.to_proto().SerializeToString()
    assert "layers_refit" not in report["stats"]
