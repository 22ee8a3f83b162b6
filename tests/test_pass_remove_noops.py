"""remove-noops: provable no-ops go, the rest stays, graph and subgraph outputs keep their names."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from nnopt.passes.remove_noops import RemoveNoops
from nnopt.testing import apply_pass, assert_lossless, model_from_text, op_types, run

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'

#: (name, graph body over X: float[2,3,4] → Y) of nodes that are no-ops, with the op that must go.
NOOPS = [
    ("identity", "Y = Identity(r)", "Identity"),
    ("cast_same_type", "Y = Cast <to = 1> (r)", "Cast"),
    ("reshape_same_shape", "s = Constant <value = int64[3] {2, 3, 4}> ()\n Y = Reshape(r, s)", "Reshape"),
    ("reshape_zero_copies", "s = Constant <value = int64[3] {0, 0, -1}> ()\n Y = Reshape(r, s)", "Reshape"),
    ("transpose_identity", "Y = Transpose <perm = [0, 1, 2]> (r)", "Transpose"),
    ("squeeze_nothing", "Y = Squeeze(r)", "Squeeze"),
    ("pad_zero", "p = Constant <value = int64[6] {0, 0, 0, 0, 0, 0}> ()\n Y = Pad(r, p)", "Pad"),
    (
        "slice_whole",
        (
            "st = Constant <value = int64[2] {0, 0}> ()\n"
            " en = Constant <value = int64[2] {9223372036854775807, 4}> ()\n"
            " ax = Constant <value = int64[2] {0, 2}> ()\n Y = Slice(r, st, en, ax)"
        ),
        "Slice",
    ),
    ("expand_ones", "s = Constant <value = int64[2] {1, 4}> ()\n Y = Expand(r, s)", "Expand"),
    ("tile_ones", "s = Constant <value = int64[3] {1, 1, 1}> ()\n Y = Tile(r, s)", "Tile"),
    ("concat_single", "Y = Concat <axis = 1> (r)", "Concat"),
    ("mul_one", "one = Constant <value = float[4] {1.0, 1.0, 1.0, 1.0}> ()\n Y = Mul(one, r)", "Mul"),
    ("add_zero", "z = Constant <value = float[1,1,1] {0.0}> ()\n Y = Add(r, z)", "Add"),
    ("div_one", "one = Constant <value_float = 1.0> ()\n Y = Div(r, one)", "Div"),
    ("dropout_inference", "Y = Dropout(r)", "Dropout"),
]

#: Look-alikes that are not no-ops.
NOT_NOOPS = [
    ("cast_other_type", "c = Cast <to = 10> (r)\n Y = Cast <to = 1> (c)", "Cast"),
    ("reshape_other_shape", "s = Constant <value = int64[3] {3, 2, 4}> ()\n Y = Reshape(r, s)", "Reshape"),
    (
        "transpose_real",
        "t = Transpose <perm = [1, 0, 2]> (r)\n Y = Transpose <perm = [1, 0, 2]> (t)",
        "Transpose",
    ),
    (
        "mul_broadcasts_up",
        (
            f"one = Constant <value = float[2,2,3,4] {{{', '.join(['1.0'] * 48)}}}> ()\n m = Mul(r, one)\n"
            " Y = ReduceMax <axes = [0], keepdims = 0> (m)"
        ),
        "Mul",
    ),
    ("mul_not_one", "k = Constant <value_float = 1.5> ()\n Y = Mul(r, k)", "Mul"),
    ("sub_zero_first", "z = Constant <value_float = 0.0> ()\n Y = Sub(z, r)", "Sub"),
    (
        "slice_part",
        (
            "st = Constant <value = int64[1] {1}> ()\n en = Constant <value = int64[1] {4}> ()\n"
            " ax = Constant <value = int64[1] {2}> ()\n s = Slice(r, st, en, ax)\n"
            " p = Constant <value = int64[6] {0, 0, 1, 0, 0, 0}> ()\n Y = Pad(s, p)"
        ),
        "Slice",
    ),
    (
        "dropout_training",
        "t = Constant <value = bool {1}> ()\n r0 = Constant <value_float = 0.0> ()\n Y = Dropout(r, r0, t)",
        "Dropout",
    ),
]


def _model(body: str) -> onnx.ModelProto:
    return model_from_text(f"{HEADER}\ng (float[2,3,4] X) => (float[2,3,4] Y) {{\n r = Relu(X)\n {body}\n}}")


@pytest.mark.parametrize("name,body,op", NOOPS, ids=[n for n, _, _ in NOOPS])
def test_noop_is_removed(name: str, body: str, op: str):
    proto = _model(body)
    out, result = assert_lossless(RemoveNoops(), proto)
    assert result.modified, result.layers
    assert op not in op_types(out)
    assert result.stats[f"{op}_removed"] == 1
    # Y is the graph output: Relu now writes it directly, under the same name.
    assert [o.name for o in out.graph.output] == ["Y"]
    relu = next(n for n in out.graph.node if n.op_type == "Relu")
    assert list(relu.output) == ["Y"]


@pytest.mark.parametrize("name,body,op", NOT_NOOPS, ids=[n for n, _, _ in NOT_NOOPS])
def test_lookalike_stays(name: str, body: str, op: str):
    proto = _model(body)
    out, result = assert_lossless(RemoveNoops(), proto)
    assert not result.modified, result.layers
    assert op_types(out) == op_types(proto)


def test_dynamic_dims_are_not_assumed():
    # N may be 1 at run time: Squeeze without axes would drop it; Expand to [N?] is unknown.
    proto = model_from_text(
        f"""{HEADER}
        g (float[N,3] X) => (float[M,3] Y, float[N,3] Z) {{
          Y = Squeeze(X)
          s = Constant <value = int64[2] {{0, 3}}> ()
          Z = Reshape(X, s)
        }}
        """
    )
    out, result = apply_pass(RemoveNoops(), proto)
    assert "Squeeze" in op_types(out)
    # Reshape with 0 copies the dynamic dim: provably the same shape, but X is a graph input and Z an
    # output, so the node must stay to keep both names.
    assert "Reshape" in op_types(out)
    assert any(layer.action == "declined" for layer in result.layers)


def test_chain_of_noops_in_the_middle():
    proto = model_from_text(
        f"""{HEADER}
        g (float[2,3] X) => (float[2,3] Y) {{
          a = Relu(X)
          b = Identity(a)
          c = Cast <to = 1> (b)
          d = Identity(c)
          Y = Sigmoid(d)
        }}
        """
    )
    out, result = assert_lossless(RemoveNoops(), proto)
    assert op_types(out) == ["Relu", "Sigmoid"]
    assert result.stats["nodes_removed"] == 3


def test_dropout_mask_in_use_stays():
    proto = model_from_text(
        f"""{HEADER}
        g (float[2,3] X) => (float[2,3] Y, bool[2,3] M) {{
          a = Relu(X)
          Y, M = Dropout(a)
        }}
        """
    )
    out, result = assert_lossless(RemoveNoops(), proto)
    assert "Dropout" in op_types(out)
    assert not result.modified


def test_identity_between_graph_input_and_output_stays():
    proto = model_from_text(
        f"""{HEADER}
        g (float[2,3] X) => (float[2,3] Y, float[2,3] Z) {{
          Y = Identity(X)
          a = Relu(X)
          Z = Identity(a)
        }}
        """
    )
    out, _ = assert_lossless(RemoveNoops(), proto)
    assert op_types(out) == ["Identity", "Relu"]
    assert [o.name for o in out.graph.output] == ["Y", "Z"]


def test_identity_between_two_outputs_stays():
    proto = model_from_text(
        f"""{HEADER}
        g (float[2,3] X) => (float[2,3] A, float[2,3] B) {{
          A = Relu(X)
          B = Identity(A)
        }}
        """
    )
    out, result = assert_lossless(RemoveNoops(), proto)
    assert op_types(out) == ["Relu", "Identity"]
    assert not result.modified


IF_MODEL = f"""{HEADER}
g (float[2,3] X, bool c) => (float[2,3] Y) {{
  r = Relu(X)
  Y = If (c) <
    then_branch = t () => (float[2,3] a) {{
      p = Neg(r)
      q = Identity(p)
      a = Identity(q)
    }},
    else_branch = e () => (float[2,3] b) {{
      b = Identity(r)
    }}
  >
}}
"""


def test_if_branches_recurse_and_keep_their_interface():
    proto = model_from_text(IF_MODEL)
    out, _ = apply_pass(RemoveNoops(), proto)
    onnx.checker.check_model(out)
    branches = {a.name: a.g for a in out.graph.node[1].attribute}
    # then: both Identities go, Neg writes the branch output under its own name.
    assert [n.op_type for n in branches["then_branch"].node] == ["Neg"]
    assert [o.name for o in branches["then_branch"].output] == ["a"]
    assert list(branches["then_branch"].node[0].output) == ["a"]
    # else: the output is an outer-scope value, so the Identity stays.
    assert [n.op_type for n in branches["else_branch"].node] == ["Identity"]
    x = np.arange(-3, 3, dtype=np.float32).reshape(2, 3)
    for cond in (True, False):
        feeds = {"X": x, "c": np.array(cond)}
        for a, b in zip(run(proto, feeds), run(out, feeds)):
            np.testing.assert_array_equal(b, a)


def test_deterministic():
    proto = model_from_text(IF_MODEL)
    first, _ = apply_pass(RemoveNoops(), proto)
    second, _ = apply_pass(RemoveNoops(), proto)
    assert first.SerializeToString() == second.SerializeToString()


def test_dropout_before_opset_7_needs_is_test():
    # NOTE: Dropout-6 trains unless is_test=1; only the checker and the pass are exercised here.
    for is_test, expect in ((1, []), (0, ["Dropout"])):
        proto = model_from_text(
            f"""<ir_version: 3, opset_import: ["" : 6]>
            g (float[2,3] X) => (float[2,3] Y) {{
              a = Relu(X)
              d = Dropout <is_test = {is_test}> (a)
              Y = Sigmoid(d)
            }}
            """
        )
        out, _ = apply_pass(RemoveNoops(), proto)
        assert [op for op in op_types(out) if op == "Dropout"] == expect
