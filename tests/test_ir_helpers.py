"""The shared graph helpers of nnopt.ir: constants (Constant nodes too), naming across subgraphs, graph walking."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper
from realmodels import REAL_MODELS

import nnopt
from nnopt.ir.constants import lower_model_constants
from nnopt.ir.model import Model, load_model
from nnopt.ir.naming import taken_names, unique_name
from nnopt.ir.walk import all_graphs, graph_outputs, is_onnx_op, remove_dead_nodes

PASSES = Path(__file__).resolve().parents[1] / "passes"


def _constant_node_model() -> onnx.ModelProto:
    """y = x + t + f + fs + i + is (cast), every operand from a Constant node of another attribute form."""
    t = numpy_helper.from_array(np.array([[1.5, -2.0]], dtype=np.float32), "t_value")
    nodes = [
        helper.make_node("Constant", [], ["t"], value=t),
        helper.make_node("Constant", [], ["f"], value_float=0.25),
        helper.make_node("Constant", [], ["fs"], value_floats=[1.0, 2.0]),
        helper.make_node("Constant", [], ["i"], value_int=3),
        helper.make_node("Constant", [], ["is"], value_ints=[4, 5]),
        helper.make_node("Constant", [], ["s"], value_string="text"),
        helper.make_node("Cast", ["is"], ["isf"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["x", "t"], ["a"]),
        helper.make_node("Add", ["a", "f"], ["b"]),
        helper.make_node("Add", ["b", "fs"], ["c"]),
        helper.make_node("Add", ["c", "isf"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2]),
                               helper.make_tensor_value_info("s", TensorProto.STRING, [])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _tensors(model: Model) -> dict[str, gs.Tensor]:
    return {name: t for g in model.all_graphs() for name, t in g.tensors().items()}


# ---------------------------------------------------------------------------------------------- constants
def test_constant_values_reads_every_constant_node_form_with_its_onnx_dtype():
    model = Model.from_proto(_constant_node_model())
    tensors = _tensors(model)
    expected = {
        "t": np.array([[1.5, -2.0]], dtype=np.float32),
        "f": np.array(0.25, dtype=np.float32),  # value_float: a rank-0 float32 tensor
        "fs": np.array([1.0, 2.0], dtype=np.float32),
        "i": np.array(3, dtype=np.int64),  # value_int: a rank-0 int64 tensor
        "is": np.array([4, 5], dtype=np.int64),
    }
    for name, want in expected.items():
        got = nnopt.constant_values(tensors[name])
        assert got is not None, name
        assert got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want)
    # Computed tensors, graph inputs and string constants are not known values.
    for name in ("x", "a", "isf", "y", "s"):
        assert nnopt.constant_values(tensors[name]) is None, name


def test_constant_values_of_initializers_and_lowered_constants_agree():
    model = Model.from_proto(_constant_node_model())
    tensors = _tensors(model)
    before = {name: nnopt.constant_values(t) for name, t in tensors.items()}
    # The string Constant (also a graph output) stays a node; the five numeric ones become initializers.
    assert lower_model_constants(model) == 5
    for name in ("t", "f", "fs", "i", "is"):
        assert isinstance(tensors[name], gs.Constant), name  # graphsurgeon converts the tensor in place
        got = nnopt.constant_values(tensors[name])
        assert got.dtype == before[name].dtype
        np.testing.assert_array_equal(got, before[name])


def test_constant_values_sees_the_weights_of_a_model_that_keeps_them_in_constant_nodes():
    # PP-OCR's classifier holds all 308 tensors (every Conv weight among them) in Constant nodes.
    spec = next(m for m in REAL_MODELS if m.key == "ppocr_cls")
    path = spec.path()
    if path is None:
        pytest.skip(f"{spec.requirement} is not installed")
    proto = onnx.load(str(path))
    assert not proto.graph.initializer
    arrays = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in proto.graph.node if n.op_type == "Constant"}
    model = load_model(path)
    convs = [n for n in model.graph.nodes if n.op == "Conv"]
    assert len(convs) == 53
    for conv in convs:
        weight = nnopt.constant_values(conv.inputs[1])
        assert weight is not None and weight.ndim == 4, conv.name
        np.testing.assert_array_equal(weight, arrays[conv.inputs[1].name])
    assert sum(nnopt.constant_values(t) is not None for t in model.graph.tensors().values()) == 308


# ---------------------------------------------------------------------------------------------- naming
def _if_model() -> onnx.ModelProto:
    """cond ─ If ─ y; then: y = x + W (``then_sum``, node ``then_add``); else: y = x (Identity ``else_id``)."""
    then_g = helper.make_graph([helper.make_node("Add", ["x", "W"], ["then_sum"], name="then_add")], "then", [],
                               [helper.make_tensor_value_info("then_sum", TensorProto.FLOAT, [2])])
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["else_out"], name="else_id")], "else", [],
                               [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, [2])])
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g, name="branch")], "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.ones(2, np.float32), "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_taken_names_cover_subgraphs_on_the_ir_and_on_protos_alike():
    proto = _if_model()
    want = {"cond", "x", "W", "y", "branch", "then_sum", "then_add", "else_out", "else_id"}
    assert taken_names(Model.from_proto(proto)) == want
    assert taken_names(proto) == want


def test_a_new_name_never_repeats_one_defined_inside_a_subgraph():
    model = Model.from_proto(_if_model())
    taken = taken_names(model)
    # ``then_sum`` exists only inside the then-branch; a main-graph tensor of that name would break SSA.
    names = [unique_name(base, taken) for base in ("then_sum", "then_sum", "fresh", "else_id")]
    assert names == ["then_sum_1", "then_sum_2", "fresh", "else_id_1"]
    assert {"then_sum_1", "then_sum_2", "fresh", "else_id_1"} <= taken


def test_unique_name_skips_taken_suffixes_and_its_memo_gives_the_same_names():
    taken = {"w", "w_1", "w_3"}
    plain, memo_taken, memo = set(taken), set(taken), {}
    bases = ["w"] * 4 + ["v"] * 2 + ["w"]
    names = [unique_name(b, plain) for b in bases]
    assert names == ["w_2", "w_4", "w_5", "w_6", "v", "v_1", "w_7"]
    assert [unique_name(b, memo_taken, memo) for b in bases] == names
    assert plain == memo_taken == taken | set(names)


# ---------------------------------------------------------------------------------------------- walking
def test_all_graphs_and_graph_outputs_include_the_branches():
    model = Model.from_proto(_if_model())
    graphs = all_graphs(model.graph)
    assert [g.name for g in graphs] == ["g", "else", "then"]  # attributes in name order
    assert graphs == model.all_graphs()
    assert graph_outputs(model) == {id(g.outputs[0]) for g in graphs}
    assert sorted(t.name for g in graphs for t in g.outputs) == ["else_out", "then_sum", "y"]


def test_is_onnx_op_accepts_the_three_spellings_of_the_default_domain_only():
    for domain, expected in ((None, True), ("", True), ("ai.onnx", True), ("com.example", False),
                             ("com.microsoft", False)):
        assert is_onnx_op(gs.Node("Relu", domain=domain)) is expected, domain


def test_remove_dead_nodes_reaches_into_subgraphs_and_keeps_outer_reads():
    proto = _if_model()
    branches = {a.name: a.g for a in proto.graph.node[0].attribute}
    branches["then_branch"].node.append(helper.make_node("Neg", ["then_sum"], ["unused"], name="dead_in_branch"))
    # A main-graph node only the else-branch reads stays; one nobody reads goes.
    branches["else_branch"].node[0].input[0] = "x_abs"
    proto.graph.node.insert(0, helper.make_node("Abs", ["x"], ["x_abs"], name="read_by_branch"))
    proto.graph.node.insert(0, helper.make_node("Sigmoid", ["x"], ["x_sig"], name="dead_in_main"))
    model = Model.from_proto(proto)
    assert remove_dead_nodes(model.graph) == 2
    assert [n.name for g in model.all_graphs() for n in g.nodes] == ["read_by_branch", "branch", "else_id", "then_add"]


# ---------------------------------------------------------------------------------------------- layering
def test_passes_import_only_nnopt_and_their_own_private_modules():
    """``passes/X.py`` may import the core and ``nnopt.passes._private`` modules, not another public pass."""
    found = set()
    for path in sorted(PASSES.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("nnopt.passes"):
                continue
            if node.module == "nnopt.passes":  # from nnopt.passes import _qdq
                modules = [f"nnopt.passes.{alias.name}" for alias in node.names]
            else:
                modules = [node.module]
            found.update((path.stem, m) for m in modules if not m.split(".")[2].startswith("_"))
    found = {(stem, module) for stem, module in found if stem != "__init__"}  # the registry lists every pass
    assert not found, sorted(found)
