"""constants-to-initializers: Constant nodes become initializers; graph outputs and subgraphs stay valid."""

from __future__ import annotations

import numpy as np
import onnx

from nnopt.passes.constants_to_initializers import ConstantsToInitializers
from nnopt.testing import apply_pass, assert_lossless, model_from_text, op_types, run

MATCHING = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,3] X) => (float[2,3] Y, float[6] Z) {
  w = Constant <value = float[3] {1.0, 2.0, 3.0}> ()
  s = Constant <value_float = 0.5> ()
  shape = Constant <value_ints = [6]> ()
  a = Add(X, w)
  Y = Mul(a, s)
  Z = Reshape(Y, shape)
}
"""

NO_CONSTANTS = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,3] X, float[3] W) => (float[2,3] Y) {
  Y = Add(X, W)
}
"""

CONSTANT_IS_OUTPUT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,3] X) => (float[2,3] Y, float[3] K) {
  K = Constant <value = float[3] {1.0, 2.0, 3.0}> ()
  Y = Add(X, K)
}
"""

IF_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,3] X, bool c) => (float[2,3] Y) {
  k = Constant <value = float[3] {2.0, 3.0, 4.0}> ()
  Y = If (c) <
    then_branch = t () => (float[2,3] a) {
      one = Constant <value_float = 1.0> ()
      p = Add(X, one)
      a = Mul(p, k)
    },
    else_branch = e () => (float[2,3] b) {
      b = Constant <value = float[2,3] {7.0, 8.0, 9.0, 1.0, 2.0, 3.0}> ()
    }
  >
}
"""


def _initializer_names(graph: onnx.GraphProto) -> set[str]:
    return {t.name for t in graph.initializer}


def test_constants_become_initializers_losslessly():
    proto = model_from_text(MATCHING)
    out, result = assert_lossless(ConstantsToInitializers(), proto)
    assert result.modified
    assert result.stats["constants_converted"] == 3
    assert "Constant" not in op_types(out)
    assert op_types(out) == ["Add", "Mul", "Reshape"]
    assert _initializer_names(out.graph) == {"w", "s", "shape"}
    by_name = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    assert by_name["s"].shape == () and by_name["s"].dtype == np.float32
    assert by_name["shape"].dtype == np.int64 and by_name["shape"].tolist() == [6]
    assert [o.name for o in out.graph.output] == ["Y", "Z"]


def test_model_without_constants_is_untouched():
    proto = model_from_text(NO_CONSTANTS)
    out, result = apply_pass(ConstantsToInitializers(), proto)
    assert not result.modified
    assert out.graph.node[0].op_type == "Add"


def test_constant_that_is_a_graph_output_stays_a_node():
    proto = model_from_text(CONSTANT_IS_OUTPUT)
    out, result = assert_lossless(ConstantsToInitializers(), proto)
    assert not result.modified
    assert op_types(out) == ["Constant", "Add"]
    assert [o.name for o in out.graph.output] == ["Y", "K"]


def test_string_constant_is_left_alone():
    proto = model_from_text(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2] X) => (float[2] Y, string[1] S) {
          S = Constant <value_strings = ["a"]> ()
          Y = Identity(X)
        }
        """
    )
    out, result = apply_pass(ConstantsToInitializers(), proto)
    assert not result.modified
    assert "Constant" in op_types(out)


def test_subgraph_constants_convert_and_branch_outputs_stay():
    proto = model_from_text(IF_MODEL)
    out, result = apply_pass(ConstantsToInitializers(), proto)
    onnx.checker.check_model(out)
    assert result.stats["constants_converted"] == 2  # k (main graph) and one (then branch)
    then_branch = next(a.g for a in out.graph.node[0].attribute if a.name == "then_branch")
    else_branch = next(a.g for a in out.graph.node[0].attribute if a.name == "else_branch")
    assert [n.op_type for n in then_branch.node] == ["Add", "Mul"]
    # The else branch's output is its Constant: the interface keeps the node.
    assert [n.op_type for n in else_branch.node] == ["Constant"]
    # k is read only inside the branch but stays a top-level initializer where its node was.
    assert "k" in _initializer_names(out.graph)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    for cond in (True, False):
        feeds = {"X": x, "c": np.array(cond)}
        for a, b in zip(run(proto, feeds), run(out, feeds)):
            np.testing.assert_array_equal(b, a)


def test_deterministic():
    proto = model_from_text(IF_MODEL)
    first, _ = apply_pass(ConstantsToInitializers(), proto)
    second, _ = apply_pass(ConstantsToInitializers(), proto)
    assert first.SerializeToString() == second.SerializeToString()
