"""The example plugin registers its pass, cost rule and hardware profile, and they work."""

from __future__ import annotations

import nnopt_example_plugin
import onnx
from nnopt_example_plugin import StripDocStrings
from onnx import TensorProto, helper

from nnopt.testing import assert_plugin_discovered, node_cost, run_checked


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


def test_the_installed_distribution_registers_everything_through_its_entry_point():
    info = assert_plugin_discovered(
        "nnopt-example-plugin",
        passes=["example.cancel-transposes", "example.strip-doc-strings"],
        cost_rules=["com.example:FancyOp"],
        hardware=["example-npu"],
    )
    assert info.name == "example"


def test_strip_doc_strings_pass_through_the_pipeline():
    out, record = run_checked(StripDocStrings(), _model())
    assert (out.doc_string, out.graph.doc_string, out.graph.node[0].doc_string) == ("", "", "")
    assert record.status == "applied" and record.stats["doc_strings_removed"] == 3


def test_custom_op_gets_flops_from_the_rule():
    graph = helper.make_graph(
        [helper.make_node("FancyOp", ["x"], ["y"], domain="com.example", name="fancy")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    model.ir_version = 8
    cost = node_cost(model, nnopt_example_plugin.nnopt_register_cost_rules(), node="fancy")
    assert (cost["macs"], cost["flops"], cost["costed"]) == (64, 128, True)
