"""quantize: weight-only on onnxruntime's fast kernels (kernel=...) and onnxruntime's preparation (prepare=ort)."""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from nnopt.errors import OptionError
from nnopt.passes import _qdq
from nnopt.passes.quantize import Quantize, QuantizeOptions
from nnopt.pipeline.base import PassContext
from nnopt.runtime import make_session
from nnopt.testing import apply_pass

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"


def _ops(proto: onnx.ModelProto) -> Counter[str]:
    return Counter(n.op_type for n in proto.graph.node)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def digits() -> dict:
    return {"proto": onnx.load(DIGITS / "digits_cnn.onnx"), "x": np.load(DIGITS / "digits_test.npz")["x"],
            "y": np.load(DIGITS / "digits_test_labels.npy")}


def _accuracy(proto: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    return float((make_session(proto).run(None, {"x": x})[0].argmax(1) == y).mean())


def _mlp_lstm() -> onnx.ModelProto:
    #   x[6, 1, 16] → LSTM(hidden 32) → Y[6, 1, 1, 32] → Reshape[6, 32] → MatMul(W1[32, 64]) → Relu
    #     → Gemm(W2[10, 64], transB) → y[6, 10];   a Conv beside it: c → Conv(Wc[4, 3, 3, 3]) → z
    rng = np.random.default_rng(0)
    inits = {
        "W": 0.3 * rng.standard_normal((1, 128, 16)), "R": 0.3 * rng.standard_normal((1, 128, 32)),
        "W1": 0.3 * rng.standard_normal((32, 64)), "W2": 0.3 * rng.standard_normal((10, 64)),
        "b2": 0.1 * rng.standard_normal(10), "Wc": 0.3 * rng.standard_normal((4, 3, 3, 3)),
        "shape": np.array([6, 32]),
    }
    nodes = [
        helper.make_node("LSTM", ["x", "W", "R"], ["Y"], name="lstm", hidden_size=32),
        helper.make_node("Reshape", ["Y", "shape"], ["h"], name="reshape"),
        helper.make_node("MatMul", ["h", "W1"], ["m"], name="matmul"),
        helper.make_node("Relu", ["m"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "W2", "b2"], ["y"], name="gemm", transB=1),
        helper.make_node("Conv", ["c", "Wc"], ["z"], name="conv"),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [6, 1, 16]),
         helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [6, 10]),
         helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [1, 4, 6, 6])],
        [numpy_helper.from_array(np.asarray(v, np.int64 if k == "shape" else np.float32), k)
         for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _feeds(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((6, 1, 16)).astype(np.float32),
            "c": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)}


def _weight_only(proto: onnx.ModelProto, **options: object) -> tuple[onnx.ModelProto, object]:
    return apply_pass(Quantize(QuantizeOptions.create("quantize", mode="weight_only", **options)), proto)


def test_dynamic_kernel_runs_matmul_gemm_lstm_on_int8_kernels_and_leaves_conv_float() -> None:
    proto = _mlp_lstm()
    out, result = _weight_only(proto, kernel="dynamic")
    onnx.checker.check_model(out)
    ops = _ops(out)
    # onnxruntime's dynamic quantizer: MatMulInteger (fused at load into DynamicQuantizeMatMul) for the
    # MatMul and the Gemm (rewritten as MatMul + Add), DynamicQuantizeLSTM for the LSTM; no DequantizeLinear.
    assert ops["MatMulInteger"] == 2 and ops["DynamicQuantizeLSTM"] == 1
    assert ops["DequantizeLinear"] == 0 and ops["Conv"] == 1 and ops["Gemm"] == 0
    by_node = {e.node: e for e in result.layers}
    assert {n: by_node[n].figures["runs_as"] for n in ("lstm", "matmul", "gemm")} == {
        "lstm": "DynamicQuantizeLSTM", "matmul": "DynamicQuantizeMatMul", "gemm": "DynamicQuantizeMatMul"}
    assert by_node["conv"].action == "declined" and "stays float" in by_node["conv"].reason
    assert result.stats["kernels"] == {"dynamic": 3}
    conv_w = next(t for t in out.graph.initializer if t.name == "Wc")
    assert conv_w.data_type == onnx.TensorProto.FLOAT  # the Conv's weight is untouched
    float_sess, quant_sess = make_session(proto), make_session(out)
    for seed in (11, 12, 13):  # inputs the pass never saw (it needs none)
        ref, got = float_sess.run(None, _feeds(seed)), quant_sess.run(None, _feeds(seed))
        assert _cosine(ref[0], got[0]) > 0.999
        assert np.array_equal(ref[1], got[1])  # the Conv stayed float: bit-identical


def test_auto_kernel_dequantizes_the_layers_without_a_fast_kernel() -> None:
    proto = _mlp_lstm()
    out, result = _weight_only(proto, kernel="auto")
    ops = _ops(out)
    assert ops["MatMulInteger"] == 2 and ops["DynamicQuantizeLSTM"] == 1 and ops["DequantizeLinear"] == 1
    assert result.stats["kernels"] == {"dequantize": 1, "dynamic": 3}
    conv = next(e for e in result.layers if e.node == "conv")
    assert conv.action == "rewritten" and conv.figures["kernel"] == "dequantize"
    assert "no fast kernel for Conv" in conv.figures["why"]
    # Every weight int8: the file is about a quarter of float's.
    assert out.ByteSize() < 0.4 * proto.ByteSize()


def test_fast_kernels_are_deterministic() -> None:
    proto = _mlp_lstm()
    for kernel in ("dynamic", "auto"):
        assert _weight_only(proto, kernel=kernel)[0].SerializeToString() == \
            _weight_only(proto, kernel=kernel)[0].SerializeToString()


def test_dynamic_kernel_keeps_digits_accuracy(digits: dict) -> None:
    out, result = _weight_only(digits["proto"], kernel="dynamic")
    assert result.stats["kernels"] == {"dynamic": 2}  # the two Gemms; the three Convs stay float
    assert _ops(out)["MatMulInteger"] == 2
    float_acc = _accuracy(digits["proto"], digits["x"], digits["y"])
    assert float_acc == pytest.approx(0.9911, abs=1e-4)
    assert _accuracy(out, digits["x"], digits["y"]) >= float_acc - 0.005  # 450 held-out test images


@pytest.mark.skipif(importlib.util.find_spec("onnx_ir") is None, reason="MatMulNBitsQuantizer needs onnx-ir")
@pytest.mark.parametrize("bits", [8, 4])
def test_matmul_nbits_kernel(bits: int) -> None:
    proto = _mlp_lstm()
    out, result = _weight_only(proto, kernel="matmul_nbits", nbits=bits)
    ops = _ops(out)
    assert ops["MatMulNBits"] == 2 and ops["LSTM"] == 1 and ops["DequantizeLinear"] == 0
    assert result.stats["kernels"] == {"matmul_nbits": 2}
    ref, got = make_session(proto).run(None, _feeds(21)), make_session(out).run(None, _feeds(21))
    # 4-bit blocks of 32 Gaussian weights: cosine 0.986 here; 8-bit: > 0.9999.
    assert _cosine(ref[0], got[0]) > (0.9999 if bits == 8 else 0.98)


def test_kernel_is_a_weight_only_option() -> None:
    with pytest.raises(OptionError, match="mode=weight_only"):
        QuantizeOptions.create("quantize", kernel="dynamic")
    # The default is today's weight-only: same bytes as without the option.
    proto = _mlp_lstm()
    assert _weight_only(proto)[0].SerializeToString() == _weight_only(proto, kernel="dequantize")[0].SerializeToString()


# ---------------------------------------------------------------------------------------------- prepare
def _conv_bias_add_matmul_add() -> onnx.ModelProto:
    #   x → Conv(w, no bias) → Add(bias [1, 4, 1, 1]) → Relu → Flatten → MatMul(W[144, 5]) → Add(b) → y
    # onnxruntime's basic optimizer folds the Add into the Conv's bias and fuses MatMul + Add into a Gemm.
    rng = np.random.default_rng(3)
    inits = {"w": 0.3 * rng.standard_normal((4, 2, 3, 3)), "bias": 0.2 * rng.standard_normal((1, 4, 1, 1)),
             "W": 0.1 * rng.standard_normal((144, 5)), "b": 0.1 * rng.standard_normal(5)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c", "bias"], ["a"], name="bias_add"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
             helper.make_node("MatMul", ["f", "W"], ["m"], name="matmul"),
             helper.make_node("Add", ["m", "b"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 6, 6])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 5])],
                              [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_prepare_ort_folds_the_bias_add_and_fuses_matmul_add_before_placement() -> None:
    proto = _conv_bias_add_matmul_add()
    rng = np.random.default_rng(7)
    calib = [{"x": rng.standard_normal((1, 2, 6, 6)).astype(np.float32)} for _ in range(8)]
    held_out = [{"x": rng.standard_normal((1, 2, 6, 6)).astype(np.float32)} for _ in range(8)]
    # select=all: a net this small gains nothing from int8, and select=latency would leave it float.
    plain, plain_result = apply_pass(Quantize(QuantizeOptions.create("quantize", select="all")), proto,
                                     PassContext(samples=calib))
    opts = QuantizeOptions.create("quantize", prepare="ort", select="all")
    prepared, result = apply_pass(Quantize(opts), proto, PassContext(samples=calib))
    onnx.checker.check_model(prepared)
    assert result.stats["prepared"] == "Add 2 -> 0, Gemm 0 -> 1, MatMul 1 -> 0"
    assert "prepared" not in plain_result.stats
    # Two quantized Adds fewer (each a QLinearAdd and a QuantizeLinear/DequantizeLinear pair).
    assert _ops(plain)["Add"] == 2 and _ops(prepared)["Add"] == 0 and _ops(prepared)["Gemm"] == 1
    assert _ops(prepared)["QuantizeLinear"] < _ops(plain)["QuantizeLinear"]
    ref = [make_session(proto).run(None, f)[0] for f in held_out]
    for model in (plain, prepared):
        got = [make_session(model).run(None, f)[0] for f in held_out]
        assert min(_cosine(a, b) for a, b in zip(ref, got)) > 0.995
    again, _ = apply_pass(Quantize(opts), proto, PassContext(samples=calib))
    assert again.SerializeToString() == prepared.SerializeToString()


def test_prepare_keeps_a_model_it_cannot_improve(digits: dict) -> None:
    # The digits CNN as exported has its BatchNormalizations: onnxruntime folds them. After nnopt's own
    # fold-batchnorm, onnxruntime's optimizer has nothing left to change (why quant_pre_process does not
    # make this model faster: docs/quantize_vs_ort.md), and the model is returned as it was.
    from nnopt.api import optimize

    feeds = [{"x": digits["x"][:8]}]
    out, what = _qdq.ort_prepared(digits["proto"], feeds)
    assert what == "BatchNormalization 3 -> 0"
    folded = optimize(digits["proto"], ["constants-to-initializers", "fold-batchnorm"], verify=False)[0].to_proto()
    out, what = _qdq.ort_prepared(folded, feeds)
    assert out is folded and what == "nothing to change"


# ---------------------------------------------------------------------------------------------- benchmark
def test_benchmark_fidelity_and_verdict() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from quantize_vs_ort import _verdict, fidelity

    ref = [[np.array([[1.0, 2.0, 0.5]], np.float32)], [np.array([[3.0, 0.0, 1.0]], np.float32)]]
    out = [[np.array([[1.0, 2.0, 0.5]], np.float32)], [np.array([[0.0, 3.0, 1.0]], np.float32)]]
    fid = fidelity(ref, out, classes=True)
    assert fid["top1"] == 0.5 and fid["cosine_min"] == pytest.approx(0.1, abs=1e-9)
    assert fid["cosine"] == pytest.approx(0.55, abs=1e-9)
    assert fidelity(ref, out, classes=False)["top1"] is None
    rows = [{"variant": "float", "latency_ms": 10.0, "latency_ratio": 1.0, "cosine": 1.0, "top1": 1.0},
            {"variant": "float-AA", "latency_ms": 10.2, "latency_ratio": 1.02, "cosine": 1.0, "top1": 1.0},
            {"variant": "nnopt", "latency_ms": 8.1, "latency_ratio": 0.81, "cosine": 0.999, "top1": 1.0},
            {"variant": "ort-u8s8", "latency_ms": 8.0, "latency_ratio": 0.80, "cosine": 0.998, "top1": 1.0},
            {"variant": "ort-u8s8+pre", "latency_ms": 9.0, "latency_ratio": 0.90, "cosine": 0.999, "top1": 1.0}]
    res = _verdict({"rows": rows})
    assert res["aa_noise"] == pytest.approx(0.02)
    assert [r["variant"] for r in res["rows"] if r["fastest_ort"]] == ["ort-u8s8"]
    # 8.1 / 8.0 = 1.0125: within the 2 % A/A noise of the fastest onnxruntime variant.
    assert all(res["checks"].values())
