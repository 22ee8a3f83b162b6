"""nnopt.testing, the helpers plugin authors test with: each one passes on a good pass and fails on a bad one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import nnopt
from nnopt.testing import (
    assert_plugin_discovered,
    assert_within_budget,
    model_from_text,
    node_cost,
    op_types,
    run,
    run_checked,
)

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits" / "digits_cnn.onnx"
DIGITS_DATA = ROOT / "examples" / "digits" / "digits_test.npz"

RELU_RELU = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 8] x) => (float[2, 8] y) { a = Relu(x)  b = Relu(a)  y = Sigmoid(b) }
"""


class _SigmoidForRelu(nnopt.Pass):
    """A wrong 'lossless' pass: turns every Relu into a Sigmoid."""

    name = "test.sigmoid-for-relu"

    def run(self, model: nnopt.Model, ctx: nnopt.PassContext) -> nnopt.PassResult:
        nodes = [node for node in model.graph.nodes if node.op == "Relu"]
        for node in nodes:
            node.op = "Sigmoid"
        return nnopt.PassResult(modified=bool(nodes))


def _guide_pass() -> nnopt.Pass:
    """The worked example of docs/writing-a-pass.md, examples/my_first_pass.py."""
    import sys

    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import my_first_pass
    finally:
        sys.path.remove(str(ROOT / "examples"))
    return my_first_pass.CollapseRepeatedOps()


def _dce() -> nnopt.Pass:
    return nnopt.Pipeline(["dce"]).build()[0]


# ---------------------------------------------------------------------------------------------- run_checked
def test_run_checked_verifies_and_costs_the_pass_like_the_cli():
    out, record = run_checked(_guide_pass(), model_from_text(RELU_RELU))
    assert op_types(out) == ["Relu", "Sigmoid"]
    assert record.status == "applied" and record.stats["nodes_removed"] == 1
    assert record.fidelity["max_rel_error"] == 0.0 and record.fidelity["samples"] == 2
    assert (record.before["flops"], record.after["flops"]) == (48, 32)  # a Relu is 16 FLOPs on 2 x 8


def test_run_checked_fails_with_the_rollback_reason_or_returns_the_rolled_back_record():
    proto = model_from_text(RELU_RELU)
    with pytest.raises(nnopt.PassFailedError, match=r"pass 'test.sigmoid-for-relu' failed and --strict is set: lossless pass changed outputs"):
        run_checked(_SigmoidForRelu(), proto)
    out, record = run_checked(_SigmoidForRelu(), proto, strict=False)
    assert record.status == "rolled_back" and record.reason.startswith("lossless pass changed outputs: relative error")
    assert op_types(out) == ["Relu", "Relu", "Sigmoid"]  # the model from before the pass


# ---------------------------------------------------------------------------------------------- assert_within_budget
def test_assert_within_budget_holds_a_lossy_pass_to_its_budget_on_the_data():
    kmeans = nnopt.Pipeline(["kmeans:bits=4"]).build()[0]
    data = {"x": np.load(DIGITS_DATA)["x"][:32]}
    proto = onnx.load(str(DIGITS))
    out, record = assert_within_budget(kmeans, proto, nnopt.Budget(min_cosine=0.99), data=data)
    assert record.status == "applied" and record.fidelity["samples"] == 32
    assert record.fidelity["cosine_similarity"] >= 0.99 and record.after["weight_bytes"] < record.before["weight_bytes"]
    with pytest.raises(AssertionError, match=r"pass kmeans was rolled_back, not applied: .*relative error"):
        assert_within_budget(kmeans, proto, nnopt.Budget(max_rel_error=1e-6), data=data)


def test_assert_within_budget_refuses_a_pass_that_changes_nothing():
    with pytest.raises(AssertionError, match="pass dce was unchanged, not applied"):
        assert_within_budget(_dce(), model_from_text(RELU_RELU), nnopt.Budget(min_cosine=0.9))


# ---------------------------------------------------------------------------------------------- node_cost
def _fancy() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("FancyOp", ["x"], ["y"], domain="com.example", name="fancy")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


def test_node_cost_applies_the_rules_given_as_a_plugin_would_register_them():
    rule = nnopt.CostRule("FancyOp", "com.example", fn=lambda ctx: nnopt.Cost(macs=ctx.output_numel(0),
                                                                               flops=3 * ctx.output_numel(0)))
    record = node_cost(_fancy(), [rule])
    assert (record["macs"], record["flops"], record["costed"]) == (64, 192, True)
    without = node_cost(_fancy(), node="fancy")
    assert (without["flops"], without["costed"]) == (0, False)
    with pytest.raises(ValueError, match="no node named 'other'"):
        node_cost(_fancy(), [rule], node="other")


# ---------------------------------------------------------------------------------------------- assert_plugin_discovered
def test_assert_plugin_discovered_finds_the_installed_example_plugin_through_its_entry_point(monkeypatch):
    import importlib.metadata

    monkeypatch.delenv("NNOPT_NO_PLUGINS", raising=False)
    info = assert_plugin_discovered("nnopt-example-plugin", passes=["example.cancel-transposes"],
                                    cost_rules=["com.example:FancyOp"], hardware=["example-npu"])
    assert info.name == "example" and info.version == importlib.metadata.version("nnopt-example-plugin")
    with pytest.raises(AssertionError, match=r"registers no passes \['example.nothing'\]"):
        assert_plugin_discovered("nnopt-example-plugin", passes=["example.nothing"])
    with pytest.raises(AssertionError, match="no nnopt.plugins entry point of a distribution named 'nnopt-missing'"):
        assert_plugin_discovered("nnopt-missing")
    monkeypatch.setenv("NNOPT_NO_PLUGINS", "1")
    with pytest.raises(AssertionError, match="NNOPT_NO_PLUGINS is set"):
        assert_plugin_discovered("nnopt-example-plugin")


def test_run_gives_onnxruntime_outputs():
    [y] = run(model_from_text(RELU_RELU), {"x": np.array([[-1.0, 2.0] * 4] * 2, np.float32)})
    np.testing.assert_allclose(y[0, :2], [0.5, 1 / (1 + np.exp(-2.0))], rtol=1e-6)
