"""kmeans:mode=binary|ternary: sign(W)·α and {-α, 0, +α} codebooks, their storage, and digits accuracy."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from nnopt.api import optimize
from nnopt.errors import OptionError
from nnopt.ir.model import Model
from nnopt.passes import _ternary
from nnopt.passes.kmeans import KMeansOptions, KMeansWeightSharing
from nnopt.runtime import make_session
from nnopt.testing import apply_pass, model_from_text, run

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
DIGITS = ROOT / "examples" / "digits"
#: A 3×3 conv from 64 to 128 channels, W ~ N(0, 0.05²): 73,728 weights.
SHAPE = (128, 64, 3, 3)
N = math.prod(SHAPE)


def _kmeans(**options: object) -> KMeansWeightSharing:
    return KMeansWeightSharing(KMeansOptions.create("kmeans", **options))


def _conv(zeros: float = 0.0) -> tuple[onnx.ModelProto, np.ndarray]:
    rng = np.random.default_rng(5)
    w = (rng.standard_normal(SHAPE) * 0.05).astype(np.float32)
    if zeros:
        w[rng.random(SHAPE) < zeros] = 0.0
    proto = model_from_text(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[1,64,6,6] X) => (float[1,128,4,4] Y) { Y = Conv <kernel_shape = [3, 3]> (X, W) }""",
        {"W": w},
    )
    proto.graph.node[0].name = "conv"
    return proto, w


def _weight_of(proto: onnx.ModelProto, name: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Tensor ``name`` as onnxruntime computes it (a graph output added for the purpose)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return run(probe, feeds)[-1]


def _weight(proto: onnx.ModelProto) -> np.ndarray:
    """The weight the test conv reads, as its decoder gives it."""
    return _weight_of(proto, proto.graph.node[-1].input[1], {"X": np.zeros((1, 64, 6, 6), np.float32)})


def _stored_bytes(proto: onnx.ModelProto, suffix: str) -> int:
    return sum(len(t.raw_data) for t in proto.graph.initializer if t.name.endswith(suffix))


def test_codes_of_a_known_vector():
    values = np.array([-2.0, -0.5, 0.0, 0.3, 1.2], np.float32)  # mean |W| = 0.8
    codebook, codes = _ternary.binary_codes(values)
    assert codebook.tolist() == pytest.approx([-0.8, 0.8]) and codes.tolist() == [0, 0, 1, 1, 1]  # sign(0) = +1
    # Δ = 0.7 · 0.8 = 0.56: only -2 and 1.2 are above it, α = (2 + 1.2) / 2.
    codebook, codes = _ternary.ternary_codes(values, 0.7)
    assert codebook.tolist() == pytest.approx([0.0, -1.6, 1.6]) and codes.tolist() == [1, 0, 0, 0, 2]
    codebook, codes = _ternary.ternary_codes(values, 0.0)  # every nonzero kept: α = mean of the nonzeros
    assert codebook.tolist() == pytest.approx([0.0, -1.0, 1.0]) and codes.tolist() == [1, 1, 0, 2, 2]
    for found in (_ternary.binary_codes(np.zeros(4)), _ternary.ternary_codes(np.ones(4), 2.0)):
        assert found[0].tolist() == [0.0] and found[1].tolist() == [0, 0, 0, 0]


def test_binary_per_channel_is_sign_times_mean_magnitude_in_one_bit_per_weight():
    proto, w = _conv()
    out, result = apply_pass(_kmeans(mode="binary", per_channel=True), proto)
    onnx.checker.check_model(out, full_check=True)
    alpha = np.abs(w.astype(np.float64)).reshape(SHAPE[0], -1).mean(axis=1)[:, None, None, None].astype(np.float32)
    expected = np.where(w >= 0, alpha, -alpha)
    assert np.array_equal(_weight(out), expected)
    # Bit-packed: 8 indices per byte; the 128 codebooks of two float32 and 128 int32 channel offsets.
    assert _stored_bytes(out, "/indices") == N // 8
    assert _stored_bytes(out, "/codebook") == 128 * 2 * 4 and _stored_bytes(out, "/channel_offsets") == 128 * 4
    layer = result.layers[0]
    assert (layer.figures["mode"], layer.figures["bits"], layer.figures["k"]) == ("binary", 1, 2)
    assert layer.figures["bytes_after"] == N // 8 + 128 * 12 + 8 + 1 + 4 * 8  # + shift tables (uint8), shape
    # For normal weights ‖W − α·sign(W)‖ / ‖W‖ = sqrt(1 − 2/π) = 0.603.
    assert layer.figures["rel_error"] == pytest.approx(math.sqrt(1 - 2 / math.pi), abs=0.01)
    y0, y1 = run(proto, {"X": np.ones((1, 64, 6, 6), np.float32)})[0], run(out, {"X": np.ones((1, 64, 6, 6), np.float32)})[0]
    assert y1.shape == y0.shape and np.corrcoef(y0.ravel(), y1.ravel())[0, 1] > 0.7


def test_ternary_per_channel_thresholds_each_channel_and_keeps_pruned_zeros():
    proto, w = _conv(zeros=0.2)
    out, result = apply_pass(_kmeans(mode="ternary", per_channel=True), proto)
    got = _weight(out)
    rows, decoded = w.reshape(SHAPE[0], -1), got.reshape(SHAPE[0], -1)
    for c in (0, 77):  # an independent computation of two channels
        magnitude = np.abs(rows[c].astype(np.float64))
        kept = magnitude > 0.7 * magnitude.mean()
        alpha = np.float32(magnitude[kept].mean())
        assert np.array_equal(decoded[c], np.where(kept, np.sign(rows[c]) * alpha, 0).astype(np.float32))
    assert np.all(got[w == 0] == 0)  # pruned weights stay pruned
    assert set(np.unique(np.abs(decoded[5]))) == {0.0, float(np.abs(decoded[5]).max())}
    assert _stored_bytes(out, "/indices") == N // 4  # 2-bit fields, 4 per byte
    figures = result.layers[0].figures
    assert (figures["mode"], figures["bits"], figures["k"]) == ("ternary", 2, 3)
    assert figures["zeros_after"] == int(np.count_nonzero(got == 0))
    # 20 % pruned, and of the rest TWN's Δ zeroes about 38 %: 0.2 + 0.8 · 0.38 ≈ 0.5 of the weights.
    assert figures["zeros_after"] / N == pytest.approx(0.5, abs=0.03)
    assert figures["rel_error"] == pytest.approx(np.linalg.norm(got - w) / np.linalg.norm(w), rel=1e-5)


def test_ternary_threshold_and_per_tensor_scale():
    proto, w = _conv()
    errors = {}
    for t in (0.3, 0.7, 1.5):
        out, result = apply_pass(_kmeans(mode="ternary", threshold=t), proto)
        got = _weight(out)
        assert np.unique(np.abs(got)).size == 2  # one α for the whole tensor, and 0
        assert result.layers[0].figures["zeros_after"] / N == pytest.approx(
            np.mean(np.abs(w) <= t * np.abs(w).mean()), abs=1e-6)
        errors[t] = result.layers[0].figures["rel_error"]
    # TWN's 0.7 sits near the optimum for normal weights (error 0.44); 0.3 and 1.5 are both worse.
    assert errors[0.7] == pytest.approx(0.44, abs=0.01)
    assert errors[0.7] < errors[0.3] and errors[0.7] < errors[1.5]


def test_options_resolve_the_index_width_and_reject_mismatches():
    assert [KMeansOptions(mode=m).index_bits for m in ("kmeans", "binary", "ternary")] == [8, 1, 2]
    assert KMeansOptions(bits=3).index_bits == 3 and KMeansOptions(mode="ternary", bits=2).index_bits == 2
    opts = KMeansOptions.from_strings({"mode": "ternary", "threshold": "0.5", "per-channel": "true"}, "kmeans")
    assert (opts.mode, opts.threshold, opts.per_channel) == ("ternary", 0.5, True)
    bad = [{"mode": "binary", "bits": 2}, {"mode": "ternary", "bits": 1}, {"threshold": 0.7},
           {"mode": "binary", "threshold": 0.7}, {"mode": "ternary", "threshold": -0.1},
           {"mode": "ternary", "threshold": math.inf}]
    for options in bad:
        with pytest.raises(OptionError, match="^kmeans: "):
            KMeansOptions(**options)  # type: ignore[arg-type]
    with pytest.raises(OptionError):
        KMeansOptions.from_strings({"mode": "quaternary"}, "kmeans")


def test_same_seed_gives_identical_bytes():
    proto, _ = _conv(zeros=0.1)
    for mode in ("binary", "ternary"):
        first, _ = apply_pass(_kmeans(mode=mode, per_channel=True), proto)
        again, _ = apply_pass(_kmeans(mode=mode, per_channel=True), proto)
        assert first.SerializeToString() == again.SerializeToString()


# ---------------------------------------------------------------------------------------------- digits accuracy
@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The compression benchmark's digits setting: 512 training images as --data, the 450 test images scored."""
    pytest.importorskip("sklearn")
    import compression

    with np.load(DIGITS / "digits_test.npz") as npz:
        x = npz["x"]
    calib = compression.digits_calibration(x, tmp_path_factory.mktemp("digits") / "calib.npz")
    return {"data": str(calib), "x": x, "labels": np.load(DIGITS / "digits_test_labels.npy")}


def _accuracy(spec: str, digits: dict[str, object]) -> float:
    model, report = optimize(str(DIGITS / "digits_cnn.onnx"), ["constants-to-initializers", spec],
                             data=str(digits["data"]), seed=0)
    assert report.passes[-1].status == "applied", report.passes[-1].reason
    assert isinstance(model, Model)
    logits = make_session(model.to_proto()).run(None, {"x": digits["x"]})[0]
    return float(np.mean(logits.argmax(axis=1) == digits["labels"]))


@pytest.mark.parametrize(("spec", "accuracy"), [
    # Measured on the 450 test images (the float model: 99.11 %). Without the refit, binary and 1-bit
    # k-means weights destroy the net; the data-aware refit of the scales (and a bias correction per
    # channel) on 512 training images brings most of it back, without any training.
    ("kmeans:bits=1,refit=off", 0.1978),
    ("kmeans:bits=1", 0.9244),
    ("kmeans:mode=binary,per_channel=true,refit=off", 0.1289),
    ("kmeans:mode=binary,per_channel=true", 0.9578),
    ("kmeans:mode=ternary,per_channel=true,refit=off", 0.7822),
    ("kmeans:mode=ternary,per_channel=true", 0.9844),
    # One α per tensor: ternary with the refit keeps all 446 correct answers of the float model.
    ("kmeans:mode=binary,refit=off", 0.1511),
    ("kmeans:mode=binary", 0.9311),
    ("kmeans:mode=ternary,refit=off", 0.8222),
    ("kmeans:mode=ternary", 0.9911),
])
def test_digits_test_accuracy(spec: str, accuracy: float, digits: dict[str, object]) -> None:
    assert _accuracy(spec, digits) == pytest.approx(accuracy, abs=1e-3)


@pytest.mark.parametrize("mode", ["binary", "ternary"])
def test_zero_channel_stays_zero_through_the_refit(mode: str, digits: dict[str, object], tmp_path: Path) -> None:
    proto = onnx.load(DIGITS / "digits_cnn.onnx")
    found = [t for t in proto.graph.initializer if t.name == "3.weight"]
    assert len(found) == 1
    w = onnx.numpy_helper.to_array(found[0]).copy()
    w[0] = 0.0  # a pruned output channel: its codebook is [0], no scale for the refit to fit
    found[0].CopyFrom(onnx.numpy_helper.from_array(w, "3.weight"))
    path = tmp_path / "pruned.onnx"
    onnx.save(proto, path)
    model, report = optimize(str(path), [f"kmeans:mode={mode},per_channel=true"], data=str(digits["data"]), seed=0)
    record = report.passes[-1]
    assert record.status == "applied" and record.stats["layers_refit"] == 4
    conv = next(n for n in model.graph.nodes if n.op == "Conv" and n.inputs[1].name.startswith("kmeans/3.weight"))
    decoded = _weight_of(model.to_proto(), conv.inputs[1].name, {"x": np.zeros((1, 1, 8, 8), np.float32)})
    assert np.all(decoded[0] == 0) and np.count_nonzero(decoded[1:]) > 0.3 * decoded[1:].size
