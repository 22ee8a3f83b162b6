"""fold-batchnorm: BN after Conv/ConvTranspose/Gemm folds into weights; everything else is declined."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from nnopt.passes.fold_batchnorm import FoldBatchNorm
from nnopt.testing import apply_pass, assert_lossless, model_from_text, op_types, run

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
RNG = np.random.default_rng(0)


def _bn_params(channels: int, suffix: str = "") -> dict[str, np.ndarray]:
    """BN scale s, bias b, mean m and var v (names + ``suffix``) for ``channels`` channels."""
    rng = np.random.default_rng(channels + len(suffix))
    return {
        f"s{suffix}": rng.uniform(0.5, 2.0, channels).astype(np.float32),
        f"b{suffix}": rng.standard_normal(channels).astype(np.float32),
        f"m{suffix}": rng.standard_normal(channels).astype(np.float32),
        f"v{suffix}": rng.uniform(0.1, 3.0, channels).astype(np.float32),
    }


def _weights(**shapes: tuple[int, ...]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(len(shapes))
    return {name: (rng.standard_normal(shape) * 0.3).astype(np.float32) for name, shape in shapes.items()}


def _assert_folded(proto: onnx.ModelProto, expected: int = 1) -> tuple[onnx.ModelProto, object]:
    out, result = assert_lossless(FoldBatchNorm(), proto, rtol=1e-5, atol=1e-5)
    assert "BatchNormalization" not in op_types(out)
    assert result.stats["batchnorms_folded"] == expected
    assert result.stats["declined"] == 0
    assert [o.name for o in out.graph.output] == [o.name for o in proto.graph.output]
    return out, result


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_conv_batchnorm_folds(bias: bool, group: int):
    conv_inputs = "X, W, B" if bias else "X, W"
    proto = model_from_text(
        f"""{HEADER}
        g (float[1,4,6,6] X) => (float[1,8,6,6] Y) {{
          c = Conv <group = {group}, pads = [1, 1, 1, 1]> ({conv_inputs})
          Y = BatchNormalization <epsilon = 0.001> (c, s, b, m, v)
        }}
        """,
        {**_weights(W=(8, 4 // group, 3, 3), B=(8,)), **_bn_params(8)} if bias
        else {**_weights(W=(8, 4 // group, 3, 3)), **_bn_params(8)},
    )
    proto.graph.node[0].name, proto.graph.node[1].name = "conv", "bn"
    out, result = _assert_folded(proto)
    assert op_types(out) == ["Conv"]
    assert len(out.graph.node[0].input) == 3  # a bias was created where there was none
    assert [layer.to_dict() for layer in result.layers] == [
        {"node": "bn", "op_type": "BatchNormalization", "action": "folded", "into": "conv"}
    ]


@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose_batchnorm_folds(group: int):
    # ConvTranspose weight is [C_in, C_out/group, k, k]: the channel axis is 1, per group.
    proto = model_from_text(
        f"""{HEADER}
        g (float[1,4,5,5] X) => (float[1,6,10,10] Y) {{
          c = ConvTranspose <group = {group}, strides = [2, 2], kernel_shape = [2, 2]> (X, W, B)
          Y = BatchNormalization(c, s, b, m, v)
        }}
        """,
        {**_weights(W=(4, 6 // group, 2, 2), B=(6,)), **_bn_params(6)},
    )
    out, _ = _assert_folded(proto)
    assert op_types(out) == ["ConvTranspose"]


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("with_c", [True, False], ids=["C", "no_C"])
def test_gemm_batchnorm_folds(trans_b: int, with_c: bool):
    b_shape = (5, 7) if trans_b else (7, 5)
    inputs = "X, Wg, Cg" if with_c else "X, Wg"
    weights = _weights(Wg=b_shape, Cg=(5,)) if with_c else _weights(Wg=b_shape)
    proto = model_from_text(
        f"""{HEADER}
        g (float[3,7] X) => (float[3,5] Y) {{
          h = Gemm <transB = {trans_b}, alpha = 0.5, beta = 2.0> ({inputs})
          Y = BatchNormalization(h, s, b, m, v)
        }}
        """,
        {**weights, **_bn_params(5)},
    )
    out, _ = _assert_folded(proto)
    assert op_types(out) == ["Gemm"]


def _declined_reason(proto: onnx.ModelProto) -> str:
    out, result = assert_lossless(FoldBatchNorm(), proto)
    assert not result.modified
    assert "BatchNormalization" in op_types(out)
    (layer,) = result.layers
    assert layer.action == "declined"
    return layer.reason


def test_bn_after_relu_is_declined():
    proto = model_from_text(
        f"""{HEADER}
        g (float[1,4,6,6] X) => (float[1,4,6,6] Y) {{
          r = Relu(X)
          Y = BatchNormalization(r, s, b, m, v)
        }}
        """,
        _bn_params(4),
    )
    assert "Relu" in _declined_reason(proto)


def test_conv_output_used_elsewhere_is_declined():
    proto = model_from_text(
        f"""{HEADER}
        g (float[1,4,6,6] X) => (float[1,8,6,6] Y, float[1,8,6,6] Z) {{
          c = Conv <pads = [1, 1, 1, 1]> (X, W, B)
          Y = BatchNormalization(c, s, b, m, v)
          Z = Relu(c)
        }}
        """,
        {**_weights(W=(8, 4, 3, 3), B=(8,)), **_bn_params(8)},
    )
    assert "used elsewhere" in _declined_reason(proto)


def test_non_constant_weight_is_declined():
    proto = model_from_text(
        f"""{HEADER}
        g (float[1,4,6,6] X, float[8,4,3,3] W) => (float[1,8,6,6] Y) {{
          c = Conv <pads = [1, 1, 1, 1]> (X, W)
          Y = BatchNormalization(c, s, b, m, v)
        }}
        """,
        _bn_params(8),
    )
    assert "not a constant" in _declined_reason(proto)


def test_shared_weight_is_declined():
    proto = model_from_text(
        f"""{HEADER}
        g (float[1,4,6,6] X) => (float[1,4,6,6] Y, float[1,4,6,6] Z) {{
          c = Conv <pads = [1, 1, 1, 1]> (X, W)
          Y = BatchNormalization(c, s, b, m, v)
          Z = Conv <pads = [1, 1, 1, 1]> (X, W)
        }}
        """,
        {**_weights(W=(4, 4, 3, 3)), **_bn_params(4)},
    )
    assert "shared" in _declined_reason(proto)


def test_chained_and_untouched_models():
    # Conv → BN → BN: both fold; a model without BN is left as it is.
    proto = model_from_text(
        f"""{HEADER}
        g (float[1,4,6,6] X) => (float[1,8,6,6] Y) {{
          c = Conv <pads = [1, 1, 1, 1]> (X, W, B)
          d = BatchNormalization(c, s, b, m, v)
          Y = BatchNormalization(d, s2, b2, m2, v2)
        }}
        """,
        {**_weights(W=(8, 4, 3, 3), B=(8,)), **_bn_params(8), **_bn_params(8, "2")},
    )
    _assert_folded(proto, expected=2)
    plain = model_from_text(f"{HEADER}\ng (float[2] X) => (float[2] Y) {{ Y = Relu(X) }}")
    out, result = apply_pass(FoldBatchNorm(), plain)
    assert not result.modified and op_types(out) == ["Relu"]


@pytest.mark.parametrize(
    "ops",
    [
        "d = Mul(c, S)\n Y = Add(d, T)",  # BN written out: [C,1,1] scale and shift
        "d = Mul(S, c)\n Y = Sub(d, T)",
        "Y = Div(c, K)",  # a scalar divisor
        "Y = Add(T4, c)",  # [1,C,1,1]
    ],
    ids=["mul_add", "mul_sub", "div_scalar", "add_4d"],
)
def test_per_channel_arithmetic_folds(ops: str):
    rng = np.random.default_rng(3)
    proto = model_from_text(
        f"""{HEADER}
        g (float[1,4,6,6] X) => (float[1,8,6,6] Y) {{
          c = Conv <pads = [1, 1, 1, 1]> (X, W, B)
          {ops}
        }}
        """,
        {
            **_weights(W=(8, 4, 3, 3), B=(8,)),
            "S": rng.uniform(0.5, 2, (8, 1, 1)).astype(np.float32),
            "T": rng.standard_normal((8, 1, 1)).astype(np.float32),
            "T4": rng.standard_normal((1, 8, 1, 1)).astype(np.float32),
            "K": np.array([1.7], dtype=np.float32),
        },
    )
    out, result = assert_lossless(FoldBatchNorm(), proto, rtol=1e-5, atol=1e-5)
    assert op_types(out) == ["Conv"]
    assert result.stats["affine_ops_folded"] == len(proto.graph.node) - 1


@pytest.mark.parametrize(
    "ops,reason",
    [
        ("Y = Add(c, P)", "not per-channel"),  # a per-position constant
        ("Y = Add(c, c)", None),  # no constant operand: not a candidate, not reported
        ("Y = Sub(T, c)", None),  # T - conv would flip the weights' sign: not handled, not reported
    ],
    ids=["per_position", "residual", "reversed_sub"],
)
def test_other_arithmetic_stays(ops: str, reason: str | None):
    rng = np.random.default_rng(4)
    proto = model_from_text(
        f"""{HEADER}
        g (float[1,4,6,6] X) => (float[1,8,6,6] Y) {{
          c = Conv <pads = [1, 1, 1, 1]> (X, W, B)
          {ops}
        }}
        """,
        {
            **_weights(W=(8, 4, 3, 3), B=(8,)),
            "P": rng.standard_normal((1, 1, 6, 6)).astype(np.float32),
            "T": rng.standard_normal((8, 1, 1)).astype(np.float32),
        },
    )
    out, result = assert_lossless(FoldBatchNorm(), proto)
    assert not result.modified
    assert op_types(out) == op_types(proto)
    if reason is None:
        assert result.layers == []
    else:
        assert reason in result.layers[0].reason


IF_MODEL = f"""{HEADER}
g (float[1,4,6,6] X, bool cond) => (float[1,8,6,6] Y) {{
  Y = If (cond) <
    then_branch = t () => (float[1,8,6,6] a) {{
      c = Conv <pads = [1, 1, 1, 1]> (X, W, B)
      a = BatchNormalization(c, s, b, m, v)
    }},
    else_branch = e () => (float[1,8,6,6] o) {{
      k = Conv <pads = [1, 1, 1, 1]> (X, W2)
      o = Relu(k)
    }}
  >
}}
"""


def test_folds_inside_if_branch():
    proto = model_from_text(IF_MODEL, {**_weights(W=(8, 4, 3, 3), B=(8,), W2=(8, 4, 3, 3)), **_bn_params(8)})
    out, result = apply_pass(FoldBatchNorm(), proto)
    onnx.checker.check_model(out)
    assert result.stats["batchnorms_folded"] == 1
    branches = {a.name: a.g for a in out.graph.node[0].attribute}
    assert [n.op_type for n in branches["then_branch"].node] == ["Conv"]
    assert [o.name for o in branches["then_branch"].output] == ["a"]
    x = RNG.standard_normal((1, 4, 6, 6)).astype(np.float32)
    for cond in (True, False):
        feeds = {"X": x, "cond": np.array(cond)}
        for a, b in zip(run(proto, feeds), run(out, feeds)):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_deterministic_and_weights_not_shared_with_input():
    weights = {**_weights(W=(8, 4, 3, 3), B=(8,)), **_bn_params(8)}
    proto = model_from_text(
        f"""{HEADER}
        g (float[1,4,6,6] X) => (float[1,8,6,6] Y) {{
          c = Conv <pads = [1, 1, 1, 1]> (X, W, B)
          Y = BatchNormalization(c, s, b, m, v)
        }}
        """,
        weights,
    )
    before = proto.SerializeToString()
    first, _ = apply_pass(FoldBatchNorm(), proto)
    second, _ = apply_pass(FoldBatchNorm(), proto)
    assert first.SerializeToString() == second.SerializeToString()
    assert proto.SerializeToString() == before
    names = {t.name for t in first.graph.initializer}
    assert not names & {"W", "B"}, "folded weights must be new tensors with new names"
