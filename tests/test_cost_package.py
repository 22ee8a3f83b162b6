"""Tests of the cost package's seams: plugins in ``nnopt.analyze``, node output names, decoded-weight patterns."""

from __future__ import annotations

import importlib.metadata
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import nnopt
from nnopt.analysis import shapes
from nnopt.cost import (
    DecodePattern,
    DecodeSite,
    analyze,
    default_decode_patterns,
    default_registry,
)
from nnopt.errors import PluginError

F = TensorProto.FLOAT


def _model(nodes, inputs, outputs, inits=(), opsets=(("", 17),)) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets], ir_version=8)


def _fancy_model() -> onnx.ModelProto:
    """x [4, 96] ─ com.example:FancyOp ─ y: 384 elements, 2 FLOPs each by the example plugin's rule."""
    return _model(
        [helper.make_node("FancyOp", ["x"], ["y"], domain="com.example", name="fancy")],
        [helper.make_tensor_value_info("x", F, [4, 96])],
        [helper.make_tensor_value_info("y", F, [4, 96])],
        opsets=(("", 17), ("com.example", 1)),
    )


def _example_plugin_installed() -> None:
    try:
        importlib.metadata.distribution("nnopt-example-plugin")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("the example plugin is not installed: pip install ./plugins/nnopt-example-plugin (see README)")


# ---------------------------------------------------------------------------------------------- plugins
def test_nnopt_analyze_uses_the_installed_plugins_cost_rules_and_hardware(monkeypatch):
    _example_plugin_installed()
    monkeypatch.delenv("NNOPT_NO_PLUGINS", raising=False)
    report = nnopt.analyze(_fancy_model(), run_onnxruntime=False)
    [node] = report.nodes
    assert (node["macs"], node["flops"], node["costed"]) == (384, 768, True)
    assert report.totals["flops"] == 768
    # A plugin's profile by name, as with --hardware.
    npu = nnopt.analyze(_fancy_model(), hardware="example-npu", run_onnxruntime=False)
    assert npu.hardware.name == "example-npu" and npu.hardware.peak_flops == 4e12
    # The low-level function keeps the built-in rules: 0 FLOPs and a note.
    plain = analyze(_fancy_model(), run_onnxruntime=False)
    assert plain.nodes[0]["flops"] == 0 and "op com.example:FancyOp has no cost rule: 0 FLOPs" in plain.notes


def test_nnopt_analyze_without_plugins_or_with_given_rules(monkeypatch):
    _example_plugin_installed()
    assert nnopt.analyze(_fancy_model(), plugins=False, run_onnxruntime=False).totals["flops"] == 0
    assert nnopt.analyze(_fancy_model(), rules=default_registry(), run_onnxruntime=False).totals["flops"] == 0
    monkeypatch.setenv("NNOPT_NO_PLUGINS", "1")
    assert nnopt.analyze(_fancy_model(), run_onnxruntime=False).totals["flops"] == 0


# ---------------------------------------------------------------------------------------------- records
def test_node_records_carry_their_output_names_when_names_are_empty_or_repeated():
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Relu", ["a"], ["b"], name="r"),
        helper.make_node("Relu", ["b"], ["c"], name="r"),
        helper.make_node("Split", ["c"], ["c0", "c1"], axis=1, num_outputs=2),
    ]
    outputs = [helper.make_tensor_value_info(n, F, None) for n in ("c0", "c1")]
    report = analyze(_model(nodes, [helper.make_tensor_value_info("x", F, [1, 4])], outputs, opsets=(("", 18),)))
    assert [n["outputs"] for n in report.nodes] == [["a"], ["b"], ["c"], ["c0", "c1"]]
    assert [n["name"] for n in report.nodes] == ["Relu_0", "r", "r", "Split_3"]
    assert report.to_dict()["nodes"][3]["outputs"] == ["c0", "c1"]


# ---------------------------------------------------------------------------------------------- decoded weights
def _dequantized_weight_model() -> onnx.ModelProto:
    """x [2, 6] ─ MatMul(DequantizeLinear(int8 [6, 5], scale)) ─ y: a weight decoded another way."""
    inits = [
        numpy_helper.from_array(np.ones((6, 5), np.int8), "q"),
        numpy_helper.from_array(np.array(0.5, np.float32), "s"),
    ]
    nodes = [helper.make_node("DequantizeLinear", ["q", "s"], ["w"]), helper.make_node("MatMul", ["x", "w"], ["y"])]
    return _model(nodes, [helper.make_tensor_value_info("x", F, [2, 6])], [helper.make_tensor_value_info("y", F, None)],
                  inits)  # fmt: skip


def test_a_registered_decode_pattern_counts_its_weight_once_at_logical_size():
    model = _dequantized_weight_model()
    builtin = analyze(model)
    assert builtin.totals["params"] == 30 + 1  # int8 values and the scale, each counted as stored
    patterns = default_decode_patterns()
    assert [p.name for p in patterns.patterns()] == ["gather-codebook", "cast-narrow-constant", "signed-decoded"]

    def dequantize(site: DecodeSite) -> bool:
        return site.node.op_type == "DequantizeLinear" and site.node.input[0] in site.constants

    patterns.register(DecodePattern("dequantize-linear", dequantize))
    report = analyze(model, decode_patterns=patterns)
    dq = next(n for n in report.nodes if n["op_type"] == "DequantizeLinear")
    assert (dq["params"], dq["weight_bytes"]) == (30, 30 + 4)  # the decoded 6×5 weight; stored int8 + scale
    assert report.totals["params"] == 30 and report.totals["weight_bytes"] == 34
    with pytest.raises(PluginError, match="dequantize-linear"):
        patterns.register(DecodePattern("dequantize-linear", dequantize))
    # Without the pattern's registry the default one is untouched.
    assert analyze(model).totals["params"] == 31


# ---------------------------------------------------------------------------------------------- shapes
def _reshape_model() -> onnx.ModelProto:
    """x [N, 8] ─ Relu ─ r ─ Reshape(shape of x, [-1, 2, 4]) ─ y; value_info declares a stale r [7, 7]."""
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Reshape", ["r", "shape"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", F, ["N", 8])], [helper.make_tensor_value_info("y", F, None)],
        [numpy_helper.from_array(np.array([-1, 2, 4], np.int64), "shape")],
        value_info=[helper.make_tensor_value_info("r", F, [7, 7])],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_one_shape_helper_with_flavours_counts_its_runs_and_leaves_the_model_alone():
    model = _reshape_model()
    before = model.SerializeToString()
    counter: Counter[str] = Counter()
    calls_before = shapes.COUNTERS["infer"]

    fresh = shapes.infer_shapes(model, shapes.FRESH, counter=counter)
    assert fresh.error is None
    assert fresh.types["r"] == shapes.TensorType(F, ("N", 8))  # stale value_info dropped, symbolic dim kept
    assert fresh.types["y"].shape[1:] == (2, 4) and fresh.types["shape"] == shapes.TensorType(7, (3,))

    typed = shapes.ShapeOptions(declared="typed", strip_data_above=4096).with_inputs({"x": [3, 8]})
    concrete = shapes.infer_shapes(model, typed, counter=counter)
    assert concrete.types["y"].static_shape == (3, 2, 4)  # the declared dims of r dropped, x made concrete
    assert concrete.dims()["x"] == [3, 8]

    kept = shapes.infer_shapes(model, shapes.ShapeOptions(), counter=counter)
    assert kept.dims()["r"] == [7, 7]  # non-strict inference keeps what the model declares

    assert model.SerializeToString() == before  # a pure function of (model, options)
    assert counter == {"calls": 3, "infer": 3}
    assert shapes.COUNTERS["infer"] - calls_before == 3
    assert shapes.CONCRETE.with_inputs({"x": [3, 8]}) == shapes.CONCRETE.with_inputs({"x": (3, 8)})  # hashable key


def test_strict_flavour_reports_the_failure_and_a_retry_is_counted():
    model = _reshape_model()
    strict = shapes.infer_shapes(model, shapes.STRICT)
    assert strict.error is not None and "r" in strict.error  # [N, 8] cannot merge into the declared [7, 7]
    assert strict.types["r"].shape == (7, 7)  # after a failure: the declared types
    counter: Counter[str] = Counter()
    retried = shapes.infer_shapes(model, shapes.ShapeOptions(strict=True, retry_without_data_prop=True), counter=counter)
    assert retried.error is not None and counter["infer"] == 2


def test_analyze_runs_shape_inference_once():
    counter: Counter[str] = Counter()
    analyze(_dequantized_weight_model(), counter=counter)
    assert counter == {"calls": 1, "infer": 1}
