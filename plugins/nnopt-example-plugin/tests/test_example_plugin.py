"""The example plugin registers its pass, cost rule and hardware profile, and they work."""

from __future__ import annotations

import nnopt_example_plugin
import numpy as np
import onnx
from onnx import TensorProto, helper

from nnopt.api import optimize
from nnopt.cost import analyze
from nnopt.plugin_manager import build_plugins


def _model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu", doc_string="a documented relu")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        doc_string="graph doc",
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], doc_string="model doc")
    model.ir_version = 8
    return model


def test_registers_everything():
    plugins = build_plugins(load_entry_points=False, extra=[nnopt_example_plugin])
    assert "example.strip-doc-strings" in plugins.passes
    assert "example-npu" in plugins.hardware
    assert plugins.cost_rules.lookup("com.example", "FancyOp", 1) is not None


def test_strip_doc_strings_pass_through_the_pipeline():
    plugins = build_plugins(load_entry_points=False, extra=[nnopt_example_plugin])
    model, report = optimize(_model(), ["example.strip-doc-strings"], plugins=plugins)
    out = model.to_proto()
    assert (out.doc_string, out.graph.doc_string, out.graph.node[0].doc_string) == ("", "", "")
    assert report.passes[0].status == "applied" and report.passes[0].stats["doc_strings_removed"] == 3


def test_custom_op_gets_flops_from_the_rule():
    graph = helper.make_graph(
        [helper.make_node("FancyOp", ["x"], ["y"], domain="com.example", name="fancy")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    model.ir_version = 8
    plugins = build_plugins(load_entry_points=False, extra=[nnopt_example_plugin])
    report = analyze(model, rules=plugins.cost_rules, run_onnxruntime=False, input_shapes=None)
    [node] = report.nodes
    assert node["flops"] == 2 * 64 and node["macs"] == 64
    assert np.isclose(report.totals["flops"], 128)
