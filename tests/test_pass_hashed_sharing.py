"""hashed-sharing: the graph's hash equals numpy's, the weight fit is the bucket mean, the file shrinks to K
values, onnxruntime and the cost model fold the decoder, data fits lower held-out layer errors, distill
recovers accuracy."""

from __future__ import annotations

import collections
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from nnopt.api import optimize
from nnopt.cost import analyze
from nnopt.errors import OptionError
from nnopt.passes.hashed_sharing import HashedOptions, HashedSharing, bucket_hash, sign_hash
from nnopt.pipeline.base import PassContext
from nnopt.testing import apply_pass, model_from_text, run, run_checked

DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits"
N_IN, N_OUT = 96, 64  # a 6,144-element MatMul weight


def _matmul(weight: np.ndarray, opset: int = 17) -> onnx.ModelProto:
    return model_from_text(
        f"""<ir_version: 8, opset_import: ["" : {opset}]>
        g (float[4, {N_IN}] x) => (float[4, {N_OUT}] y) {{ y = MatMul(x, w) }}""",
        {"w": weight.astype(np.float32)},
    )


def _hashed(**options: object) -> HashedSharing:
    return HashedSharing(HashedOptions(**options))  # type: ignore[arg-type]


def _decoded(layer: dict[str, object], values: np.ndarray, sign: bool,
             shape: tuple[int, int] = (N_IN, N_OUT)) -> np.ndarray:
    """The weight the graph should compute: stored values placed by numpy's own hash."""
    n, k, offset = math.prod(shape), int(layer["k"]), int(layer["seed"])  # type: ignore[call-overload]
    signs = sign_hash(n, layer["sign_seed"]) if sign else np.ones(n)  # type: ignore[arg-type]
    return (values.astype(np.float64)[bucket_hash(n, k, offset)] * signs).reshape(shape)


def _stored_values(proto: onnx.ModelProto) -> np.ndarray:
    [values] = [onnx.numpy_helper.to_array(t) for t in proto.graph.initializer if t.name.endswith("/values")]
    return values


@pytest.mark.parametrize("sign", [True, False])
def test_graph_hash_equals_numpy_hash_and_the_fit_is_the_bucket_mean(sign: bool) -> None:
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(N_IN, N_OUT))
    proto = _matmul(weight)
    out, result = apply_pass(_hashed(k=768, sign=sign, seed=3), proto)
    [layer] = result.layers
    assert layer.action == "rewritten"
    figures = layer.figures
    values = _stored_values(out)
    assert values.shape == (768,)
    expected = _decoded(figures, values, sign)
    x = rng.normal(size=(4, N_IN)).astype(np.float32)
    # Without graph optimisations onnxruntime runs the int64 decoder node by node: same weight as numpy's.
    [y] = run(out, {"x": x})
    np.testing.assert_allclose(y, x @ expected.astype(np.float32), rtol=1e-5, atol=1e-5)
    # The values are each bucket's mean of the signed weights: the least-squares fit.
    n = weight.size
    buckets = bucket_hash(n, 768, int(figures["seed"]))  # type: ignore[call-overload]
    signs = sign_hash(n, int(figures["sign_seed"])) if sign else np.ones(n)  # type: ignore[call-overload]
    flat = weight.reshape(-1)
    for b in (0, 1, 500):
        np.testing.assert_allclose(values[b], np.mean((signs * flat)[buckets == b]), rtol=1e-5)
    # Gaussian weights, K/n = 1/8: the bucket mean leaves 1 − K/n of the energy, error √(7/8) = 0.935.
    assert float(figures["rel_error"]) == pytest.approx(math.sqrt(1 - 768 / n), abs=0.02)  # type: ignore[arg-type]


def test_a_weight_that_is_already_hashed_is_recovered_exactly() -> None:
    rng = np.random.default_rng(1)
    probe, result = apply_pass(_hashed(k=100, seed=9), _matmul(rng.normal(size=(N_IN, N_OUT))))
    hashed = _decoded(result.layers[0].figures, rng.normal(size=100), sign=True)
    out, result = apply_pass(_hashed(k=100, seed=9), _matmul(hashed))
    assert float(result.layers[0].figures["rel_error"]) < 1e-6  # type: ignore[arg-type]
    x = rng.normal(size=(4, N_IN)).astype(np.float32)
    np.testing.assert_allclose(run(out, {"x": x})[0], x @ hashed.astype(np.float32), rtol=1e-5, atol=1e-5)


def test_file_shrinks_to_k_values_and_onnxruntime_folds_the_decoder(tmp_path: Path) -> None:
    proto = _matmul(np.random.default_rng(2).normal(size=(N_IN, N_OUT)))
    out, record = run_checked(_hashed(k=64), proto)
    assert record.status == "applied"
    [layer] = record.layers
    assert layer["bytes_before"] == N_IN * N_OUT * 4
    # 64 float32 values, the two int8 signs, 10 int64 scalars (Range, P, two A, B and moduli) and the shape.
    assert layer["bytes_after"] == 64 * 4 + 2 + 10 * 8 + 2 * 8
    # The file: 1,853 bytes instead of 24,671 (the decoder's node and tensor names are most of what is left).
    assert len(out.SerializeToString()) < len(proto.SerializeToString()) / 10
    # The session's optimised graph is the original's: Range, Mod, Gather, Cast and Mul became one constant.
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(out.SerializeToString(), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    assert collections.Counter(n.op_type for n in optimized.graph.node) == {"MatMul": 1}


def test_cost_model_counts_the_weight_once_and_folds_the_decoder() -> None:
    proto = _matmul(np.random.default_rng(3).normal(size=(N_IN, N_OUT)))
    out, _ = apply_pass(_hashed(k=64), proto)
    before, after = analyze(proto), analyze(out)
    assert after.totals["params"] == before.totals["params"] == N_IN * N_OUT
    assert after.totals["weight_bytes"] == 64 * 4 + 2 + 10 * 8 + 2 * 8
    decoder = [n for n in after.nodes if n["op_type"] != "MatMul"]
    assert len(decoder) == 14  # Range, Reshape, 2 × (Mul, Add, Mod, Mod), 2 Gathers, Cast, Mul
    assert all(n["kernel"] == "folded" and n["latency_s"] == 0 for n in decoder)
    assert [n["params"] for n in decoder if n["params"]] == [N_IN * N_OUT]  # the signed weight, once
    assert after.totals["latency_s"] == pytest.approx(before.totals["latency_s"])
    assert after.totals["energy_j"] == pytest.approx(before.totals["energy_j"])  # folded nodes cost no energy


def test_declines_with_reasons() -> None:
    weight = np.random.default_rng(4).normal(size=(N_IN, N_OUT))
    _, result = apply_pass(_hashed(k=N_IN * N_OUT), _matmul(weight))
    assert result.layers[0].reason == f"k={N_IN * N_OUT} is not below the weight's {N_IN * N_OUT} elements"
    _, result = apply_pass(_hashed(min_size=10_000), _matmul(weight))
    assert result.layers[0].reason == f"{N_IN * N_OUT} elements, below min_size=10000"
    overridable = _matmul(weight)
    overridable.graph.input.append(onnx.helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [N_IN, N_OUT]))
    _, result = apply_pass(_hashed(), overridable)
    assert result.layers[0].reason == "weight is not a constant (a graph input, or computed)"
    _, result = apply_pass(_hashed(), _matmul(weight, opset=10))
    assert result.layers[0].reason == "the hash needs Range (opset >= 11); the model has opset 10"
    assert not result.modified


@pytest.mark.parametrize("options, message", [
    ({"ratio": 0.0}, "ratio must be between 0 and 1"),
    ({"ratio": 1.5}, "ratio must be between 0 and 1"),
    ({"k": -1}, "k must be a non-negative integer"),
    ({"min_size": 0}, "min_size must be a positive integer"),
])
def test_bad_options(options: dict[str, object], message: str) -> None:
    with pytest.raises(OptionError, match=message):
        HashedOptions(**options)  # type: ignore[arg-type]


def test_ratio_sets_k_and_output_is_deterministic() -> None:
    proto = _matmul(np.random.default_rng(5).normal(size=(N_IN, N_OUT)))
    first, result = apply_pass(_hashed(ratio=0.25), proto, PassContext(seed=7))
    again, _ = apply_pass(_hashed(ratio=0.25), proto, PassContext(seed=7))
    other, _ = apply_pass(_hashed(ratio=0.25), proto, PassContext(seed=8))
    assert result.layers[0].figures["k"] == N_IN * N_OUT // 4
    assert first.SerializeToString() == again.SerializeToString()
    assert first.SerializeToString() != other.SerializeToString()


def _digits_layers(spec: str, data: bool) -> dict[str, dict[str, object]]:
    _, report = optimize(str(DIGITS / "digits_cnn.onnx"), ["default", spec],
                         data=str(DIGITS / "digits_test.npz") if data else None, seed=0)
    record = report.passes[-1]
    assert record.name == "hashed-sharing" and record.status == "applied", record.reason
    return {entry["node"]: entry for entry in record.layers}


def test_data_fit_lowers_heldout_layer_errors_on_digits() -> None:
    layers = _digits_layers("hashed-sharing:k=256", data=True)
    for name in ("/3/Conv", "/7/Conv", "/12/Gemm"):
        fit = layers[name]["fit"]
        assert isinstance(fit, dict) and fit["fit"] == "data", fit
        # Measured: 0.983 → 0.912, 0.996 → 0.933, 0.988 → 0.927 on the odd samples the fit did not see.
        assert fit["heldout_error_refit"] < fit["heldout_error_weight_fit"] - 0.04, fit
    # The last Gemm has 10 outputs and 32 samples of batch 1: 320 rows for 256 values, too few to fit.
    assert layers["/14/Gemm"]["fit"] == "weights: 320 rows of data for 256 values (fewer than 4 per value)"
    assert "fit" not in _digits_layers("hashed-sharing:k=256", data=False)["/3/Conv"]


@pytest.mark.slow
def test_distill_trains_the_hashed_values_back_to_the_original_predictions() -> None:
    pytest.importorskip("torch")
    _, report = optimize(str(DIGITS / "digits_cnn.onnx"),
                         ["default", "hashed-sharing:ratio=0.5", "distill:max_seconds=30,epochs=30"],
                         data=str(DIGITS / "digits_test.npz"), seed=0)
    hashed, distill = report.passes[-2], report.passes[-1]
    assert hashed.status == distill.status == "applied", distill.reason
    # Post-training hashing at K = n/2 leaves 11 % of held-out predictions; training the values brings 99 %.
    assert distill.stats["metric_before"] < 0.3
    assert distill.stats["metric_after"] > 0.95


def test_a_weight_two_nodes_read_is_decoded_once_before_the_first() -> None:
    weight = np.random.default_rng(6).normal(size=(N_IN, N_IN)).astype(np.float32)
    proto = model_from_text(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        g (float[4, {N_IN}] x) => (float[4, {N_IN}] z) {{ y = MatMul(x, w)  z = MatMul(y, w) }}""",
        {"w": weight},
    )
    out, record = run_checked(_hashed(k=128), proto)
    assert record.stats["weights_rewritten"] == 1
    assert [n.op_type for n in out.graph.node].count("Range") == 1
    assert [n.op_type for n in out.graph.node][-2:] == ["MatMul", "MatMul"]  # the decoder runs first
    [layer] = record.layers
    decoded = _decoded(layer, _stored_values(out), sign=True, shape=(N_IN, N_IN))
    x = np.random.default_rng(7).normal(size=(4, N_IN)).astype(np.float32)
    np.testing.assert_allclose(run(out, {"x": x})[0], x @ decoded @ decoded, rtol=1e-4, atol=1e-4)



def test_float16_weights_keep_their_dtype() -> None:
    rng = np.random.default_rng(8)
    weight = rng.normal(size=(N_IN, N_OUT)).astype(np.float16)
    proto = model_from_text(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        g (float16[4, {N_IN}] x) => (float16[4, {N_OUT}] y) {{ y = MatMul(x, w) }}""",
        {"w": weight},
    )
    out, record = run_checked(_hashed(k=256), proto)
    values = _stored_values(out)
    assert values.dtype == np.float16 and record.layers[0]["bytes_after"] == 256 * 2 + 2 + 10 * 8 + 2 * 8
    x = rng.normal(size=(4, N_IN)).astype(np.float16)
    expected = x.astype(np.float64) @ _decoded(record.layers[0], values, sign=True)
    np.testing.assert_allclose(run(out, {"x": x})[0].astype(np.float64), expected, rtol=2e-2, atol=5e-2)


def test_grouped_convs_are_fitted_to_their_outputs() -> None:
    rng = np.random.default_rng(9)
    proto = model_from_text(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 16, 12, 12] x) => (float[1, 32, 10, 10] z) {
            y = Conv<group=16, pads=[1, 1, 1, 1]>(x, w1, b)  z = Conv<group=2>(y, w2) }""",
        {name: rng.normal(size=shape).astype(np.float32)
         for name, shape in (("w1", (16, 1, 3, 3)), ("b", (16,)), ("w2", (32, 8, 3, 3)))},
    )
    # Spatially smooth inputs: a patch's values move together, so the output error weighs the weight error
    # unevenly and the data fit has something to gain over the bucket means (on white noise it has not).
    smooth = rng.normal(size=(8, 1, 16, 1, 1)) + 0.1 * rng.normal(size=(8, 1, 16, 12, 12))
    data = {"x": smooth.astype(np.float32)}
    _, record = run_checked(_hashed(k=64, min_size=100), proto, data=data)
    fits = [layer["fit"] for layer in record.layers]
    assert all(isinstance(f, dict) and f["fit"] == "data" for f in fits), fits
    # Held-out output errors (samples the fit did not see), measured: depthwise 0.933 → 0.303, grouped
    # 0.972 → 0.870.
    depthwise, grouped = fits
    assert depthwise["heldout_error_refit"] < 0.5 * depthwise["heldout_error_weight_fit"], depthwise
    assert grouped["heldout_error_refit"] < grouped["heldout_error_weight_fit"] - 0.05, grouped


def test_distills_interpreter_runs_range_and_mod_as_onnxruntime_does() -> None:
    torch = pytest.importorskip("torch")
    from nnopt.passes._torch_ops import OPS

    def one(op: str, inputs: list[object], **attrs: object) -> np.ndarray:
        [out] = OPS[op].run(inputs, attrs, 17)
        return np.asarray(out)

    start, limit, delta = (torch.tensor(v, dtype=torch.int64) for v in (3, 11, 2))
    np.testing.assert_array_equal(one("Range", [start, limit, delta]), [3, 5, 7, 9])
    a, b = torch.tensor([7, -7, 7, -7]), torch.tensor([3, 3, -3, -3])
    np.testing.assert_array_equal(one("Mod", [a, b]), [1, 2, -2, -1])  # fmod=0: the divisor's sign
    np.testing.assert_array_equal(one("Mod", [a, b], fmod=1), [1, -1, 1, -1])  # fmod=1: the dividend's
    proto = model_from_text(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (int64[4] a, int64[4] b) => (int64[4] r, int64[4] f) { r = Mod(a, b)  f = Mod<fmod=1>(a, b) }""")
    r, f = run(proto, {"a": a.numpy(), "b": b.numpy()})
    np.testing.assert_array_equal(r, [1, 2, -2, -1])
    np.testing.assert_array_equal(f, [1, -1, 1, -1])
