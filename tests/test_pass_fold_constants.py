"""fold-constants: constant subexpressions and static shapes fold; large or random tensors never do."""

from __future__ import annotations

import numpy as np
import onnx

from nnopt.ir.model import Model
from nnopt.passes.fold_constants import FoldConstants
from nnopt.testing import apply_pass, assert_lossless, model_from_text, op_types, run

MATCHING = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,3] X) => (float[2,3] Y) {
  w = Constant <value = float[3] {1.0, 2.0, 3.0}> ()
  two = Constant <value_float = 2.0> ()
  w2 = Mul(w, two)
  w3 = Sqrt(w2)
  Y = Add(X, w3)
}
"""

STATIC_SHAPE = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,3,4] X) => (float[2,12] Y) {
  s = Shape(X)
  zero = Constant <value = int64[1] {0}> ()
  first = Gather(s, zero)
  minus = Constant <value = int64[1] {-1}> ()
  target = Concat <axis = 0> (first, minus)
  Y = Reshape(X, target)
}
"""

DYNAMIC_SHAPE = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,4] X) => (float[N,12] Y) {
  s = Shape(X)
  zero = Constant <value = int64[1] {0}> ()
  first = Gather(s, zero)
  minus = Constant <value = int64[1] {-1}> ()
  target = Concat <axis = 0> (first, minus)
  Y = Reshape(X, target)
}
"""

# The onnx corpus's light_* models build every weight like this: a tiny shape, a large tensor.
BIG_CONSTANT_OF_SHAPE = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,256] X) => (float[2,256] Y) {
  shape = Constant <value = int64[2] {256, 256}> ()
  W = ConstantOfShape <value = float[1] {0.01}> (shape)
  Y = MatMul(X, W)
}
"""

SHARED_WEIGHT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2,64] X, int64[2] I) => (float[2,64] Y, float[2,64] E) {
  Wt = Transpose <perm = [1, 0]> (W)
  Y = MatMul(X, Wt)
  E = Gather(W, I)
}
"""

CONSTANT_OUTPUTS = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[3] X) => (float[3] Y, float[3] K, float[3] F) {
  K = Constant <value = float[3] {1.0, 2.0, 3.0}> ()
  F = Neg(K)
  Y = Add(X, K)
}
"""

IF_MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[3] X, bool c) => (float[3] Y) {
  k = Constant <value = float[3] {1.0, 4.0, 9.0}> ()
  Y = If (c) <
    then_branch = t () => (float[3] a) {
      r = Sqrt(k)
      a = Add(X, r)
    },
    else_branch = e () => (float[3] b) {
      n = Neg(k)
      b = Mul(X, n)
    }
  >
}
"""


# Dim 0 is dynamic; the Slice picks dims 1..2, which are static; the Gather of dim 0 must stay.
PARTIAL_SHAPE = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,4] X) => (float[N,12] Y) {
  s = Shape(X)
  zero = Constant <value = int64[1] {0}> ()
  n = Gather(s, zero)
  st = Constant <value = int64[1] {1}> ()
  en = Constant <value = int64[1] {3}> ()
  hw = Slice(s, st, en)
  k = ReduceProd <keepdims = 1> (hw)
  target = Concat <axis = 0> (n, k)
  Y = Reshape(X, target)
}
"""

# An exporter's guard on a static dim: the condition folds, so the If always takes its then branch.
GUARDED_IF = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3] X) => (float[N,3] Y) {
  s = Shape(X)
  one = Constant <value_int = 1> ()
  c = Gather(s, one)
  three = Constant <value_int = 3> ()
  ok = Equal(c, three)
  Y = If (ok) <
    then_branch = t () => (float[N,3] a) {
      a = Add(X, X)
    },
    else_branch = e () => (float[N,3] b) {
      b = Neg(X)
    }
  >
}
"""


def _roundtrip_size(proto: onnx.ModelProto) -> int:
    """Serialized size after nnopt's load/save alone, the baseline a pass must not exceed."""
    return Model.from_proto(proto).to_proto().ByteSize()


def _both_branches_agree(proto: onnx.ModelProto, out: onnx.ModelProto) -> None:
    x = np.array([1.0, -2.0, 3.0], dtype=np.float32)
    for cond in (True, False):
        feeds = {"X": x, "c": np.array(cond)}
        for a, b in zip(run(proto, feeds), run(out, feeds)):
            np.testing.assert_allclose(b, a, rtol=1e-6)


def test_constant_expression_folds():
    proto = model_from_text(MATCHING)
    out, result = assert_lossless(FoldConstants(), proto)
    assert result.modified
    assert result.stats["nodes_folded"] == 2  # Mul and Sqrt; the Constants are lowered as well
    assert op_types(out) == ["Add"]
    assert [o.name for o in out.graph.output] == ["Y"]


def test_static_shape_arithmetic_folds():
    proto = model_from_text(STATIC_SHAPE)
    out, result = assert_lossless(FoldConstants(), proto)
    assert result.stats == {"nodes_folded": 3, "shape_ops_folded": 1, "constants_lowered": 2, "ifs_inlined": 0}
    assert op_types(out) == ["Reshape"]
    target = next(t for t in out.graph.initializer if t.name == out.graph.node[0].input[1])
    assert onnx.numpy_helper.to_array(target).tolist() == [2, -1]


def test_dynamic_shape_is_not_folded():
    proto = model_from_text(DYNAMIC_SHAPE)
    out, result = assert_lossless(FoldConstants(), proto)
    assert "Shape" in op_types(out) and "Gather" in op_types(out)
    assert result.stats["shape_ops_folded"] == 0 and result.stats["nodes_folded"] == 0


def test_stale_value_info_is_not_trusted():
    # value_info claims a static shape for an intermediate that the graph does not guarantee; folding the
    # Shape from it would bake in the wrong batch size.
    proto = model_from_text(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,3,4] X) => (float[N,12] Y) {
          r = Relu(X)
          s = Shape(r)
          zero = Constant <value = int64[1] {0}> ()
          first = Gather(s, zero)
          minus = Constant <value = int64[1] {-1}> ()
          target = Concat <axis = 0> (first, minus)
          Y = Reshape(r, target)
        }
        """
    )
    proto.graph.value_info.append(onnx.helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, [1, 3, 4]))
    out, _ = apply_pass(FoldConstants(), proto)
    assert "Shape" in op_types(out)


def test_constant_of_shape_building_a_large_tensor_is_not_folded():
    proto = model_from_text(BIG_CONSTANT_OF_SHAPE)
    out, result = assert_lossless(FoldConstants(), proto)
    assert "ConstantOfShape" in op_types(out)
    assert result.stats["nodes_folded"] == 0
    assert out.ByteSize() <= _roundtrip_size(proto)


def test_shared_weight_is_not_copied():
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    proto = model_from_text(SHARED_WEIGHT, {"W": w})
    out, result = apply_pass(FoldConstants(), proto)
    assert "Transpose" in op_types(out)
    assert not result.modified
    assert out.ByteSize() <= _roundtrip_size(proto)


def test_weight_used_once_folds_in_place():
    proto = model_from_text(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,64] X) => (float[2,64] Y) {
          Wt = Transpose <perm = [1, 0]> (W)
          Y = MatMul(X, Wt)
        }
        """,
        {"W": np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)},
    )
    out, _ = assert_lossless(FoldConstants(), proto)
    assert op_types(out) == ["MatMul"]
    assert out.ByteSize() <= _roundtrip_size(proto)


def test_random_ops_are_not_folded():
    proto = model_from_text(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3] X) => (float[2,3] Y) {
          r = RandomUniform <shape = [2, 3], seed = 1.0> ()
          Y = Add(X, r)
        }
        """
    )
    out, result = apply_pass(FoldConstants(), proto)
    assert op_types(out) == ["RandomUniform", "Add"]
    assert not result.modified


def test_graph_outputs_keep_their_names_and_producers():
    proto = model_from_text(CONSTANT_OUTPUTS)
    out, result = assert_lossless(FoldConstants(), proto)
    assert [o.name for o in out.graph.output] == ["Y", "K", "F"]
    produced = {o for n in out.graph.node for o in n.output}
    assert {"K", "F"} <= produced
    assert not result.modified


def test_folds_inside_if_branches():
    proto = model_from_text(IF_MODEL)
    out, result = apply_pass(FoldConstants(), proto)
    onnx.checker.check_model(out)
    assert result.stats["nodes_folded"] == 2  # Sqrt in then, Neg in else
    branches = {a.name: a.g for a in out.graph.node[0].attribute}
    assert [n.op_type for n in branches["then_branch"].node] == ["Add"]
    assert [n.op_type for n in branches["else_branch"].node] == ["Mul"]
    _both_branches_agree(proto, out)


def test_nothing_to_fold_is_untouched():
    proto = model_from_text(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3] X, float[3] W) => (float[2,3] Y) {
          Y = Add(X, W)
        }
        """
    )
    out, result = apply_pass(FoldConstants(), proto)
    assert not result.modified
    assert out.SerializeToString() == apply_pass(FoldConstants(), proto)[0].SerializeToString()


def test_static_dims_of_a_partly_dynamic_shape_fold():
    proto = model_from_text(PARTIAL_SHAPE)
    out, result = assert_lossless(FoldConstants(), proto)
    assert result.stats["shape_ops_folded"] == 1  # the Slice of dims 1..2; the Gather of dim 0 stays
    assert op_types(out) == ["Shape", "Gather", "Concat", "Reshape"]
    values = [onnx.numpy_helper.to_array(t).tolist() for t in out.graph.initializer]
    assert [12] in values  # ReduceProd([3, 4]) folded after the Slice
    x = np.ones([5, 3, 4], dtype=np.float32)
    assert run(out, {"X": x})[0].shape == (5, 12)


def test_if_with_a_constant_condition_is_inlined():
    proto = model_from_text(GUARDED_IF)
    out, result = assert_lossless(FoldConstants(), proto)
    assert result.stats["ifs_inlined"] == 1 and result.stats["shape_ops_folded"] == 1
    assert op_types(out) == ["Add", "Identity"]  # the branch, then the If's output name kept
    assert [o.name for o in out.graph.output] == ["Y"]
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(run(out, {"X": x})[0], x + x)
