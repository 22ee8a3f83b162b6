"""example.cancel-transposes: Transpose pairs merge or cancel, bit-exactly in onnxruntime, and it declines the rest."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from nnopt_example_plugin.cancel_transposes import CancelTransposes
from onnx import TensorProto, helper, numpy_helper

import nnopt
from nnopt import Model, PassContext
from nnopt.testing import apply_pass, assert_plugin_discovered, run_checked

TO_NHWC, TO_NCHW = [0, 2, 3, 1], [0, 3, 1, 2]
NCHW = [2, 3, 5, 7]  # odd sizes, so no vectorised kernel sees a whole number of blocks
NHWC = [2, 5, 7, 3]


def _info(name: str, shape: list[int] | None, elem: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _model(nodes, inputs, outputs, initializers=(), opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _transpose(src: str, dst: str, perm: list[int] | None, name: str) -> onnx.NodeProto:
    if perm is None:
        return helper.make_node("Transpose", [src], [dst], name=name)
    return helper.make_node("Transpose", [src], [dst], perm=perm, name=name)


def _run_pass(proto: onnx.ModelProto):
    out, result = apply_pass(CancelTransposes(), proto)
    onnx.checker.check_model(out, full_check=True)
    return out, result


def _ops(proto: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in proto.graph.node]


def _outputs(proto: onnx.ModelProto, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) else 1 for d in i.shape]
        feeds[i.name] = rng.standard_normal(shape).astype(np.float32) * 3
    return session.run(None, feeds)


def _assert_bit_exact(original: onnx.ModelProto, optimized: onnx.ModelProto) -> None:
    before, after = _outputs(original), _outputs(optimized)
    assert len(before) == len(after)
    for a, b in zip(before, after):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f")


def test_registered_by_the_plugin_through_its_entry_point():
    assert_plugin_discovered("nnopt-example-plugin", passes=["example.cancel-transposes"])


def test_nchw_to_nhwc_relu_and_back_becomes_the_relu_alone():
    proto = _model(
        [
            _transpose("x", "t", TO_NHWC, "to_nhwc"),
            helper.make_node("Relu", ["t"], ["r"], name="relu"),
            _transpose("r", "y", TO_NCHW, "to_nchw"),
        ],
        [_info("x", NCHW)],
        [_info("y", NCHW)],
    )
    out, result = _run_pass(proto)
    assert _ops(out) == ["Relu"]
    assert [o.name for o in out.graph.output] == ["y"] and list(out.graph.node[0].output) == ["y"]
    assert result.modified and result.stats["transposes_removed"] == 2
    actions = {(e.node, e.action) for e in result.layers}
    assert actions == {("to_nhwc", "moved"), ("to_nhwc", "removed"), ("to_nchw", "removed")}
    _assert_bit_exact(proto, out)


@pytest.mark.parametrize(
    ("op", "attrs", "out_elem"),
    [
        ("Relu", {}, TensorProto.FLOAT),
        ("LeakyRelu", {"alpha": 0.1}, TensorProto.FLOAT),
        ("Elu", {}, TensorProto.FLOAT),
        ("Selu", {}, TensorProto.FLOAT),
        ("Sigmoid", {}, TensorProto.FLOAT),
        ("HardSigmoid", {}, TensorProto.FLOAT),
        ("HardSwish", {}, TensorProto.FLOAT),
        ("Tanh", {}, TensorProto.FLOAT),
        ("Softplus", {}, TensorProto.FLOAT),
        ("Softsign", {}, TensorProto.FLOAT),
        ("Abs", {}, TensorProto.FLOAT),
        ("Neg", {}, TensorProto.FLOAT),
        ("Exp", {}, TensorProto.FLOAT),
        ("Log", {}, TensorProto.FLOAT),
        ("Sqrt", {}, TensorProto.FLOAT),
        ("Reciprocal", {}, TensorProto.FLOAT),
        ("Floor", {}, TensorProto.FLOAT),
        ("Ceil", {}, TensorProto.FLOAT),
        ("Round", {}, TensorProto.FLOAT),
        ("Sign", {}, TensorProto.FLOAT),
        ("Erf", {}, TensorProto.FLOAT),
        ("Identity", {}, TensorProto.FLOAT),
        ("Cast", {"to": TensorProto.INT32}, TensorProto.INT32),
    ],
)
def test_every_unary_op_in_the_registry_is_bit_exact(op, attrs, out_elem):
    shape = [2, 16, 33, 17]  # big enough for onnxruntime to split the work between threads
    proto = _model(
        [
            _transpose("x", "t", TO_NHWC, "to_nhwc"),
            helper.make_node(op, ["t"], ["u"], name="op", **attrs),
            _transpose("u", "y", TO_NCHW, "to_nchw"),
        ],
        [_info("x", shape)],
        [_info("y", shape, out_elem)],
    )
    out, _ = _run_pass(proto)
    assert _ops(out) == [op]
    _assert_bit_exact(proto, out)


def test_chain_of_three_transposes_becomes_one_with_the_composed_perm():
    perms = [[0, 2, 3, 1], [1, 0, 2, 3], [0, 1, 3, 2]]
    proto = _model(
        [_transpose(src, dst, p, f"t{i}") for i, (src, dst, p) in enumerate(zip("xab", "aby", perms))],
        [_info("x", NCHW)],
        [_info("y", [5, 2, 3, 7])],
    )
    out, result = _run_pass(proto)
    assert _ops(out) == ["Transpose"]
    expected = np.transpose(np.transpose(np.transpose(np.zeros(NCHW), perms[0]), perms[1]), perms[2]).shape
    assert list(out.graph.node[0].attribute[0].ints) == [2, 0, 1, 3]
    assert tuple(_outputs(out)[0].shape) == expected == (5, 2, 3, 7)
    assert result.stats["transposes_removed"] == 2
    _assert_bit_exact(proto, out)


def test_three_transposes_that_cancel_leave_nothing_but_the_graph_output():
    proto = _model(
        [
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            # Rotating the last three dims three times is the identity, though no two neighbours cancel.
            _transpose("r", "a", TO_NHWC, "t0"),
            _transpose("a", "b", TO_NHWC, "t1"),
            _transpose("b", "y", TO_NHWC, "t2"),
        ],
        [_info("x", NCHW)],
        [_info("y", NCHW)],
    )
    out, result = _run_pass(proto)
    assert _ops(out) == ["Relu"] and list(out.graph.node[0].output) == ["y"]
    assert result.stats["transposes_removed"] == 3
    _assert_bit_exact(proto, out)


def test_per_channel_constants_are_relaid_out_and_the_original_stays_for_its_other_reader():
    bias = np.arange(3, dtype=np.float32) - 1.5
    scale = np.array([[[0.5, -2.0, 3.0]]], dtype=np.float32)  # rank 3 against rank 4: broadcasts from the right
    inits = [
        numpy_helper.from_array(bias, "bias"),
        numpy_helper.from_array(scale, "scale"),
        numpy_helper.from_array(np.array(0.25, dtype=np.float32), "quarter"),
        numpy_helper.from_array(np.array(-1.0, dtype=np.float32), "lo"),
        numpy_helper.from_array(np.array(2.0, dtype=np.float32), "hi"),
    ]
    proto = _model(
        [
            _transpose("x", "t", TO_NHWC, "to_nhwc"),
            helper.make_node("Add", ["t", "bias"], ["a"], name="add"),
            helper.make_node("Sub", ["bias", "a"], ["s"], name="sub"),  # the constant first: order matters
            helper.make_node("Mul", ["s", "scale"], ["m"], name="mul"),
            helper.make_node("Div", ["m", "quarter"], ["d"], name="div"),
            helper.make_node("Clip", ["d", "lo", "hi"], ["c"], name="clip"),
            _transpose("c", "y", TO_NCHW, "to_nchw"),
            helper.make_node("Mul", ["other", "bias"], ["z"], name="other_reader"),  # still wants NHWC
        ],
        [_info("x", NCHW), _info("other", NHWC)],
        [_info("y", NCHW), _info("z", NHWC)],
        inits,
    )
    out, result = _run_pass(proto)
    assert _ops(out) == ["Add", "Sub", "Mul", "Div", "Clip", "Mul"]
    shapes = {t.name: list(t.dims) for t in out.graph.initializer}
    # One re-laid-out copy of bias for both its readers in the chain; the original stays for the other one.
    relaid = {"bias": [3], "bias_relaid": [1, 3, 1, 1], "scale_relaid": [1, 3, 1, 1]}
    assert shapes == {**relaid, "quarter": [], "lo": [], "hi": []}
    original = next(t for t in out.graph.initializer if t.name == "bias")
    np.testing.assert_array_equal(numpy_helper.to_array(original), bias)
    assert result.stats["transposes_removed"] == 2
    _assert_bit_exact(proto, out)


def test_a_graph_output_between_two_transposes_keeps_its_name_and_shape():
    proto = _model(
        [
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            _transpose("r", "nhwc", TO_NHWC, "to_nhwc"),
            _transpose("nhwc", "y", TO_NCHW, "to_nchw"),
        ],
        [_info("x", NCHW)],
        [_info("nhwc", NHWC), _info("y", NCHW)],
    )
    out, result = _run_pass(proto)
    # to_nhwc stays (it writes a graph output); to_nchw goes and the Relu writes "y" itself.
    assert [(n.op_type, list(n.output)) for n in out.graph.node] == [("Relu", ["y"]), ("Transpose", ["nhwc"])]
    assert [(o.name, [d.dim_value for d in o.type.tensor_type.shape.dim]) for o in out.graph.output] == [
        ("nhwc", NHWC),
        ("y", NCHW),
    ]
    assert result.stats["transposes_removed"] == 1
    _assert_bit_exact(proto, out)


def test_a_pair_from_graph_input_to_graph_output_becomes_an_identity():
    proto = _model(
        [_transpose("x", "t", TO_NHWC, "to_nhwc"), _transpose("t", "y", TO_NCHW, "to_nchw")],
        [_info("x", NCHW)],
        [_info("y", NCHW)],
    )
    out, result = _run_pass(proto)
    assert [(n.op_type, list(n.input), list(n.output)) for n in out.graph.node] == [("Identity", ["x"], ["y"])]
    assert result.stats["transposes_removed"] == 2
    _assert_bit_exact(proto, out)


def test_a_transpose_with_two_readers_stays_for_the_other_one():
    proto = _model(
        [
            _transpose("x", "t", TO_NHWC, "to_nhwc"),
            helper.make_node("Relu", ["t"], ["r"], name="relu"),
            _transpose("r", "y", TO_NCHW, "to_nchw"),
            helper.make_node("Softmax", ["t"], ["z"], axis=-1, name="softmax"),
        ],
        [_info("x", NCHW)],
        [_info("y", NCHW), _info("z", NHWC)],
    )
    out, result = _run_pass(proto)
    assert sorted(_ops(out)) == ["Relu", "Softmax", "Transpose"]
    relu = next(n for n in out.graph.node if n.op_type == "Relu")
    assert list(relu.input) == ["x"] and list(relu.output) == ["y"]
    assert result.stats["transposes_removed"] == 1
    declined = [e.to_dict() for e in result.layers if e.action == "declined"]
    assert declined == [
        {
            "node": "to_nhwc",
            "op_type": "Transpose",
            "action": "declined",
            "reason": "Softmax 'softmax' is not a per-element op this pass moves Transposes through",
        }
    ]
    _assert_bit_exact(proto, out)


def test_a_shared_transpose_goes_once_every_branch_cancels():
    proto = _model(
        [
            _transpose("x", "t", TO_NHWC, "to_nhwc"),
            helper.make_node("Relu", ["t"], ["r"], name="relu"),
            _transpose("r", "y", TO_NCHW, "back_1"),
            helper.make_node("Sigmoid", ["t"], ["s"], name="sigmoid"),
            _transpose("s", "z", TO_NCHW, "back_2"),
        ],
        [_info("x", NCHW)],
        [_info("y", NCHW), _info("z", NCHW)],
    )
    out, result = _run_pass(proto)
    assert sorted(_ops(out)) == ["Relu", "Sigmoid"]
    assert result.stats["transposes_removed"] == 3
    _assert_bit_exact(proto, out)


def test_a_shared_transpose_is_not_duplicated_when_the_pair_does_not_cancel():
    proto = _model(
        [
            _transpose("x", "t", TO_NHWC, "to_nhwc"),
            helper.make_node("Relu", ["t"], ["r"], name="relu"),
            _transpose("r", "y", [1, 0, 2, 3], "swap"),  # composed with to_nhwc: not the identity
            helper.make_node("Softmax", ["t"], ["z"], axis=-1, name="softmax"),
        ],
        [_info("x", NCHW)],
        [_info("y", [5, 2, 7, 3]), _info("z", NHWC)],
    )
    out, result = _run_pass(proto)
    assert not result.modified and _ops(out) == _ops(proto)
    assert "would add a Transpose" in result.layers[0].reason


@pytest.mark.parametrize(
    ("middle", "extra_inputs", "why"),
    [
        (helper.make_node("Add", ["t", "w"], ["u"], name="add"), [_info("w", NHWC)], "is not a constant"),
        (helper.make_node("Softmax", ["t"], ["u"], axis=1, name="sm"), [], "not a per-element op"),
        (helper.make_node("Mul", ["t", "t"], ["u"], name="square"), [], "reads the tensor twice"),
    ],
)
def test_declines_what_it_cannot_move_through(middle, extra_inputs, why):
    proto = _model(
        [_transpose("x", "t", TO_NHWC, "to_nhwc"), middle, _transpose("u", "y", TO_NCHW, "to_nchw")],
        [_info("x", NCHW), *extra_inputs],
        [_info("y", NCHW)],
    )
    out, result = _run_pass(proto)
    assert not result.modified and out.graph.node == proto.graph.node
    assert result.layers[0].node == "to_nhwc" and why in result.layers[0].reason


def test_declines_a_transpose_without_perm_and_an_intermediate_that_is_a_graph_output():
    proto = _model(
        [
            _transpose("x", "t", None, "reverse"),  # the default perm reverses the dims
            _transpose("t", "v", [3, 2, 1, 0], "back"),
            _transpose("v", "w", TO_NHWC, "to_nhwc"),
            helper.make_node("Relu", ["w"], ["r"], name="relu"),
            _transpose("r", "y", TO_NCHW, "to_nchw"),
        ],
        [_info("x", NCHW)],
        [_info("r", NHWC), _info("y", NCHW)],
    )
    out, result = _run_pass(proto)
    reasons = {e.node: e.reason for e in result.layers if e.action == "declined"}
    assert reasons["reverse"] == "no perm attribute"
    assert "'relu' has other readers or is a graph output" in reasons["to_nhwc"]
    # "back" then "to_nhwc" merge (that needs nothing from "reverse"), the rest stays.
    assert _ops(out) == ["Transpose", "Transpose", "Relu", "Transpose"]
    _assert_bit_exact(proto, out)


def test_a_transpose_read_inside_a_subgraph_stays_for_it():
    branch = helper.make_graph([helper.make_node("Neg", ["t"], ["n"], name="neg")], "branch", [], [_info("n", NHWC)])
    proto = _model(
        [
            _transpose("x", "t", TO_NHWC, "to_nhwc"),
            helper.make_node("Relu", ["t"], ["r"], name="relu"),
            _transpose("r", "y", TO_NCHW, "to_nchw"),
            helper.make_node("If", ["flag"], ["z"], then_branch=branch, else_branch=branch, name="if"),
        ],
        [_info("x", NCHW), _info("flag", [], TensorProto.BOOL)],
        [_info("y", NCHW), _info("z", NHWC)],
    )
    out, result = _run_pass(proto)
    assert _ops(out) == ["Transpose", "Relu", "If"] and list(out.graph.node[1].input) == ["x"]
    assert result.stats["transposes_removed"] == 1
    assert [e.reason for e in result.layers if e.action == "declined"] == ["read inside a subgraph"]
    session = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(3).standard_normal(NCHW).astype(np.float32)
    y, z = session.run(None, {"x": x, "flag": np.array(True)})
    assert np.array_equal(y, np.maximum(x, 0)) and np.array_equal(z, -x.transpose(TO_NHWC))


def _bias_between_transposes(bias: np.ndarray, *, as_constant_node: bool, extra=(), inputs=(), outputs=()):
    """x ─ Transpose(NHWC) ─ Add(bias) ─ Transpose(NCHW) ─ y, bias an initializer or a Constant node."""
    nodes = [
        _transpose("x", "t", TO_NHWC, "to_nhwc"),
        helper.make_node("Add", ["t", "bias"], ["a"], name="add"),
        _transpose("a", "y", TO_NCHW, "to_nchw"),
        *extra,
    ]
    inits = [numpy_helper.from_array(bias, "bias")]
    if as_constant_node:  # what Paddle exports: every weight in a Constant node
        nodes.insert(0, helper.make_node("Constant", [], ["bias"], value=inits.pop(), name="bias_const"))
    return _model(nodes, [_info("x", NCHW), *inputs], [_info("y", NCHW), *outputs], inits)


def test_a_constant_node_operand_counts_as_a_constant():
    bias = np.arange(3, dtype=np.float32) - 1.5
    proto = _bias_between_transposes(bias, as_constant_node=True)
    out, result = _run_pass(proto)
    assert _ops(out) == ["Constant", "Add"] and result.stats["transposes_removed"] == 2
    relaid = next(t for t in out.graph.initializer if t.name == "bias_relaid")
    np.testing.assert_array_equal(numpy_helper.to_array(relaid), bias.reshape(1, 3, 1, 1))
    _assert_bit_exact(proto, out)


def test_a_relaid_constant_takes_no_name_a_subgraph_already_defines():
    # The then-branch defines "bias_relaid": a main-graph initializer of that name would break SSA.
    then_g = helper.make_graph([helper.make_node("Neg", ["x"], ["bias_relaid"], name="neg")], "then", [],
                               [_info("bias_relaid", NCHW)])
    else_g = helper.make_graph([helper.make_node("Abs", ["x"], ["e"], name="abs")], "else", [], [_info("e", NCHW)])
    branch = helper.make_node("If", ["flag"], ["z"], then_branch=then_g, else_branch=else_g, name="if")
    bias = np.arange(3, dtype=np.float32) - 1.5
    proto = _bias_between_transposes(bias, as_constant_node=False, extra=[branch],
                                     inputs=[_info("flag", [], TensorProto.BOOL)], outputs=[_info("z", NCHW)])
    out, result = _run_pass(proto)
    assert result.stats["transposes_removed"] == 2
    assert sorted(t.name for t in out.graph.initializer) == ["bias_relaid_1"]  # bias itself has no reader left
    session = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(5).standard_normal(NCHW).astype(np.float32)
    y, z = session.run(None, {"x": x, "flag": np.array(True)})
    assert np.array_equal(y, x + bias.reshape(1, 3, 1, 1)) and np.array_equal(z, -x)


def _tf2onnx_style_model() -> onnx.ModelProto:
    """What tf2onnx writes for an NHWC Keras model Conv → ReLU → BiasAdd → Conv: a Transpose around each Conv."""
    rng = np.random.default_rng(7)
    w1 = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    w2 = rng.standard_normal((2, 4, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(4).astype(np.float32)  # NHWC per-channel: shape (C,)
    nodes = [
        _transpose("input", "c1_in", TO_NCHW, "conv1__6"),
        helper.make_node("Conv", ["c1_in", "w1"], ["c1_out"], pads=[1, 1, 1, 1], name="conv1"),
        _transpose("c1_out", "c1_nhwc", TO_NHWC, "conv1__7"),
        helper.make_node("Relu", ["c1_nhwc"], ["relu"], name="relu1"),
        helper.make_node("Add", ["relu", "bias"], ["biased"], name="bias_add"),
        _transpose("biased", "c2_in", TO_NCHW, "conv2__8"),
        helper.make_node("Conv", ["c2_in", "w2"], ["c2_out"], pads=[1, 1, 1, 1], name="conv2"),
        _transpose("c2_out", "output", TO_NHWC, "conv2__9"),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (w2, "w2"), (bias, "bias"))]
    return _model(nodes, [_info("input", [1, 9, 11, 3])], [_info("output", [1, 9, 11, 2])], inits, opset=13)


def test_through_the_pass_manager_on_a_tf2onnx_style_model():
    proto = _tf2onnx_style_model()
    out, record = run_checked(CancelTransposes(), proto)  # checked and verified as `nnopt optimize -p` does
    assert record.status == "applied" and record.stats["transposes_removed"] == 2
    assert record.fidelity["max_abs_error"] == 0.0
    assert len(out.graph.node) == len(proto.graph.node) - 2
    assert _ops(out) == ["Transpose", "Conv", "Relu", "Add", "Conv", "Transpose"]
    _assert_bit_exact(proto, out)


def test_after_the_default_pipeline_as_the_cli_runs_it():
    model, report = nnopt.optimize(_tf2onnx_style_model(), ["default", CancelTransposes()])
    record = next(r for r in report.passes if r.name == "example.cancel-transposes")
    assert record.status == "applied" and record.stats["transposes_removed"] == 2
    assert _ops(model.to_proto()).count("Transpose") == 2


def test_deterministic():
    first, _ = _run_pass(_tf2onnx_style_model())
    second, _ = _run_pass(_tf2onnx_style_model())
    assert first.SerializeToString() == second.SerializeToString()


def test_subgraphs_are_listed_once_per_graph_not_once_per_rewrite(monkeypatch):
    """Finding subgraphs walks every node, so doing it per rewritten node would make the pass quadratic."""

    def chain(pairs: int) -> onnx.ModelProto:
        nodes, src = [], "x"
        for i in range(pairs):
            nodes += [_transpose(src, f"t{i}", TO_NHWC, f"to_nhwc{i}"),
                      helper.make_node("Relu", [f"t{i}"], [f"r{i}"], name=f"relu{i}"),
                      _transpose(f"r{i}", f"n{i}", TO_NCHW, f"to_nchw{i}")]
            src = f"n{i}"
        nodes.append(helper.make_node("Neg", [src], ["y"], name="neg"))
        return _model(nodes, [_info("x", NCHW)], [_info("y", NCHW)])

    calls = []
    original = gs.Graph.subgraphs

    def counted(self, *args, **kwargs):
        calls.append(self.name)
        return original(self, *args, **kwargs)

    walks = {}
    for pairs in (2, 40):
        model = Model.from_proto(chain(pairs))
        calls.clear()
        monkeypatch.setattr(gs.Graph, "subgraphs", counted)
        result = CancelTransposes().run(model, PassContext())
        monkeypatch.setattr(gs.Graph, "subgraphs", original)
        assert result.stats["transposes_removed"] == 2 * pairs
        walks[pairs] = len(calls)
    assert walks[40] == walks[2], walks
