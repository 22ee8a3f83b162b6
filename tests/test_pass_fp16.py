"""fp16: float32 weights and compute to float16/bfloat16, float32 kept where it must be, fewest Casts."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from realmodels import REAL_MODELS, write_data

from nnopt import Budget
from nnopt.cost import analyze
from nnopt.errors import OptionError
from nnopt.passes.fp16 import Fp16, Fp16Options
from nnopt.pipeline.base import PassResult
from nnopt.testing import apply_pass, model_from_text, op_types, run, run_checked

F16, BF16, F32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT
RNG = np.random.default_rng(0)


def _w(*shape: int, scale: float = 0.1) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


MLP = """<ir_version: 8, opset_import: ["" : 17]>
g (float[4,64] x) => (float[4,10] y) {
  h = MatMul(x, W1)  hb = Add(h, b1)  r = Relu(hb)  y = MatMul(r, W2)
}"""
MLP_WEIGHTS = {"W1": _w(64, 64), "b1": _w(64), "W2": _w(64, 10)}
MLP_WEIGHT_COUNT = 64 * 64 + 64 + 64 * 10


def _fp16(**options: object) -> Fp16:
    return Fp16(Fp16Options(**options))  # type: ignore[arg-type]


def _types(values: list[onnx.ValueInfoProto]) -> list[int]:
    return [v.type.tensor_type.elem_type for v in values]


def _feeds(n: int = 4) -> list[dict[str, np.ndarray]]:
    return [{"x": RNG.standard_normal((4, 64)).astype(np.float32)} for _ in range(n)]


def test_mlp_weights_halve_and_io_stays_float32():
    proto = model_from_text(MLP, MLP_WEIGHTS)
    out, record = run_checked(_fp16(), proto, data=_feeds(), budget=Budget(min_cosine=0.999))
    assert _types(list(out.graph.input)) == [F32] and _types(list(out.graph.output)) == [F32]
    assert {t.name: t.data_type for t in out.graph.initializer} == {"W1": F16, "b1": F16, "W2": F16}
    # One Cast in, one out, nothing else: every compute node runs float16.
    assert op_types(out).count("Cast") == 2
    assert record.stats["casts_inserted"] == 2 and record.stats["nodes_converted"] == 4
    assert record.stats["constant_bytes_before"] == 4 * MLP_WEIGHT_COUNT
    assert record.stats["constant_bytes_after"] == 2 * MLP_WEIGHT_COUNT
    assert record.before["weight_bytes"] == 4 * MLP_WEIGHT_COUNT
    assert record.after["weight_bytes"] == 2 * MLP_WEIGHT_COUNT
    assert record.fidelity is not None and record.fidelity["cosine_similarity"] >= 0.9999
    x = _feeds(1)[0]
    [want], [got] = run(proto, x), run(out, x)
    assert got.dtype == np.float32
    assert np.abs(got - want).max() <= 2e-3 * np.abs(want).max()
    assert record.layers[0]["converted_by_op"] == {"Add": 1, "MatMul": 2, "Relu": 1}


def test_keep_io_types_false_makes_the_interface_float16():
    proto, _ = _apply(_fp16(keep_io_types=False), model_from_text(MLP, MLP_WEIGHTS))
    assert _types(list(proto.graph.input)) == [F16] and _types(list(proto.graph.output)) == [F16]
    assert "Cast" not in op_types(proto)
    x = _feeds(1)[0]["x"]
    [got] = run(proto, {"x": x.astype(np.float16)})
    [want] = run(model_from_text(MLP, MLP_WEIGHTS), {"x": x})
    assert got.dtype == np.float16 and np.abs(got - want).max() <= 5e-3 * np.abs(want).max()


def _apply(pass_: Fp16, proto: onnx.ModelProto) -> tuple[onnx.ModelProto, PassResult]:
    out, result = apply_pass(pass_, proto)
    onnx.checker.check_model(out, full_check=True)
    return out, result


ATTENTION = """<ir_version: 8, opset_import: ["" : 17]>
g (float[8,8] x) => (float[8,8] y) {
  a = MatMul(x, W1)  s = Softmax<axis = 1>(a)  t = Transpose(s)  u = Softmax<axis = 1>(t)  y = MatMul(u, W2)
}"""


def test_fragile_ops_stay_float32_and_data_movement_between_them_too():
    proto = model_from_text(ATTENTION, {"W1": _w(8, 8, scale=1.0), "W2": _w(8, 8)})
    feeds = [{"x": RNG.standard_normal((8, 8)).astype(np.float32)} for _ in range(4)]
    out, record = run_checked(_fp16(fragile=True), proto, data=feeds, budget=Budget(min_cosine=0.999))
    # x -> f16 for MatMul, MatMul -> f32 for Softmax, Softmax -> f16 for MatMul, y -> f32: the Transpose
    # between the Softmaxes stays float32 (converting it would add two Casts).
    assert record.stats["casts_inserted"] == 4
    reasons = {layer["op_type"]: layer["reason"] for layer in record.layers[1:]}
    assert reasons["Softmax"].startswith("kept float32: fragile: exponentials")
    assert "converting it would add Casts" in reasons["Transpose"]
    assert record.layers[0]["converted_by_op"] == {"MatMul": 2}
    # Without fragile, everything is float16: two Casts at the interface only.
    _, plain = run_checked(_fp16(), proto, data=feeds)
    assert plain.stats["casts_inserted"] == 2 and plain.stats["nodes_kept_float32"] == 0


def test_a_constant_beyond_float16_keeps_its_reader_float32():
    # ppocr_det's BatchNorm variances reach 1e8: clipped to 65504 they turned its output into noise.
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[4,8] x) => (float[4,8] y) { d = Div(x, var)  y = Mul(d, s) }"""
    proto = model_from_text(text, {"var": np.full(8, 1e6, np.float32) * np.linspace(1, 2, 8, dtype=np.float32),
                                   "s": np.full(8, 1e4, np.float32)})
    feeds = [{"x": RNG.standard_normal((4, 8)).astype(np.float32)} for _ in range(4)]
    out, record = run_checked(_fp16(), proto, data=feeds, budget=Budget(min_cosine=0.999))
    types = {t.name: t.data_type for t in out.graph.initializer}
    assert types == {"var": F32, "s": F16}
    assert record.stats["values_clipped"] == 0
    [reason] = [layer["reason"] for layer in record.layers[1:] if layer["op_type"] == "Div"]
    assert reason == "kept float32: its constant var reaches 2e+06, beyond the narrow range"


def test_resize_scales_stay_float32():
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[1,2,4,4] x) => (float[1,2,8,8] y) { r = Resize<mode = "linear">(x, roi, scales)  y = Relu(r) }"""
    proto = model_from_text(text, {"roi": np.zeros(0, np.float32),
                                   "scales": np.array([1, 1, 2, 2], np.float32)})
    feeds = [{"x": RNG.standard_normal((1, 2, 4, 4)).astype(np.float32)}]
    out, record = run_checked(_fp16(), proto, data=feeds, budget=Budget(min_cosine=0.999))
    types = {t.name: t.data_type for t in out.graph.initializer}
    assert types["scales"] == F32  # Resize's scales is tensor(float) in every opset
    assert record.layers[0]["converted_by_op"] == {"Relu": 1, "Resize": 1}
    assert record.stats["casts_inserted"] == 2


IF_MODEL = """<ir_version: 8, opset_import: ["" : 17]>
g (float[2,16] x, bool c) => (float[2,16] y) {
  y = If (c) <
    then_branch = t () => (float[2,16] a) { m = MatMul(x, W)  a = Relu(m) },
    else_branch = e () => (float[2,16] b) { b = Sigmoid(x) }
  >
}"""


def test_if_bodies_convert_with_float32_boundaries():
    proto = model_from_text(IF_MODEL, {"W": _w(16, 16, scale=0.3)})
    feeds = [{"x": RNG.standard_normal((2, 16)).astype(np.float32), "c": np.array(flag)} for flag in (True, False)]
    out, record = run_checked(_fp16(), proto, data=feeds, budget=Budget(min_cosine=0.999))
    assert {t.name: t.data_type for t in out.graph.initializer} == {"W": F16}  # read only inside the body
    branches = {a.name: a.g for a in out.graph.node[0].attribute}
    # then: x -> f16 inside the body (it reads the outer x), Relu's result -> f32 for the body's output.
    assert [n.op_type for n in branches["then_branch"].node].count("Cast") == 2
    assert [n.op_type for n in branches["else_branch"].node].count("Cast") == 2
    assert record.layers[0]["converted_by_op"] == {"MatMul": 1, "Relu": 1, "Sigmoid": 1}
    assert record.layers[0]["kept_float32_by_op"] == {
        "If": {"control flow: its boundary stays float32, its body is converted on its own": 1}}


def test_bfloat16_weights_only_runs_on_the_cpu_provider():
    proto = model_from_text(MLP, MLP_WEIGHTS)
    out, record = run_checked(_fp16(dtype="bfloat16", compute="float32"), proto, data=_feeds(),
                              budget=Budget(min_cosine=0.999))
    assert {t.name: t.data_type for t in out.graph.initializer} == {"W1": BF16, "b1": BF16, "W2": BF16}
    assert record.stats["casts_inserted"] == 3 and record.stats["nodes_converted"] == 0
    assert record.after["weight_bytes"] == 2 * MLP_WEIGHT_COUNT
    # bfloat16 compute has no onnxruntime CPU kernels: the pass manager rolls it back and says why.
    _, narrow = run_checked(_fp16(dtype="bfloat16"), proto, data=_feeds(), strict=False)
    assert narrow.status == "rolled_back" and "NOT_IMPLEMENTED" in narrow.reason


def test_min_size_leaves_small_constants_float32():
    proto = model_from_text(MLP, MLP_WEIGHTS)
    out, record = run_checked(_fp16(compute="float32", min_size=100), proto, data=_feeds())
    assert {t.name: t.data_type for t in out.graph.initializer} == {"W1": F16, "b1": F32, "W2": F16}
    assert record.stats["casts_inserted"] == 2


def test_cost_model_counts_narrow_weights_at_two_bytes():
    for dtype, numpy_type in ((F16, np.float16), (BF16, None)):
        proto = model_from_text(MLP, MLP_WEIGHTS)
        for t in proto.graph.initializer:
            values = onnx.numpy_helper.to_array(t)
            if numpy_type is None:
                narrow = onnx.helper.make_tensor(t.name, dtype, values.shape,
                                                 values.astype(np.float32).view(np.uint32) >> 16, raw=False)
            else:
                narrow = onnx.numpy_helper.from_array(values.astype(numpy_type), t.name)
            t.CopyFrom(narrow)
        assert analyze(proto, run_onnxruntime=False).totals["weight_bytes"] == 2 * MLP_WEIGHT_COUNT


def test_output_is_deterministic():
    proto = model_from_text(ATTENTION, {"W1": _w(8, 8), "W2": _w(8, 8)})
    first, _ = _apply(_fp16(fragile=True), proto)
    second, _ = _apply(_fp16(fragile=True), proto)
    assert first.SerializeToString() == second.SerializeToString()


@pytest.mark.parametrize("options, message", [
    ({"block": ("Soft max",)}, "is not an op type"),
    ({"min_size": 0}, "min_size must be a positive integer"),
])
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(OptionError, match=message):
        Fp16Options(**options)  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.parametrize("key", ["ppocr_cls", "ppocr_det"])
def test_real_models_halve_at_cosine_0999(key, tmp_path):
    [spec] = [m for m in REAL_MODELS if m.key == key]
    path = spec.path()
    if path is None:
        pytest.skip(f"{spec.requirement} is not installed")
    data = write_data(spec, path, tmp_path / "data.npz")
    out, record = run_checked(_fp16(), onnx.load(path), data=str(data), budget=Budget(min_cosine=0.999))
    assert record.after["weight_bytes"] <= 0.5 * record.before["weight_bytes"] + 1024
    assert record.fidelity is not None and record.fidelity["cosine_similarity"] >= 0.999
    assert record.stats["values_clipped"] == 0


def test_weights_only_casts_cost_nothing_at_run_time():
    """The cost model's ``cast-narrow-constant`` pattern: a Cast of a float16 weight is a decoded weight,
    counted at its logical size in params and at its stored size in bytes, and folded at load."""
    proto = model_from_text(MLP, MLP_WEIGHTS)
    out, _ = run_checked(_fp16(compute="float32"), proto, data=_feeds())
    before, after = analyze(proto), analyze(out)
    assert after.totals["params"] == before.totals["params"] == MLP_WEIGHT_COUNT
    assert after.totals["weight_bytes"] == 2 * MLP_WEIGHT_COUNT
    assert after.totals["latency_s"] == pytest.approx(before.totals["latency_s"], rel=1e-9)


def test_weights_only_widens_a_weight_once_for_all_bodies():
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[2,16] x, bool c) => (float[2,16] y) {
      y = If (c) <
        then_branch = t () => (float[2,16] a) { a = MatMul(x, W) },
        else_branch = e () => (float[2,16] b) { m = MatMul(x, W)  b = Relu(m) }
      >
    }"""
    proto = model_from_text(text, {"W": _w(16, 16, scale=0.3)})
    feeds = [{"x": RNG.standard_normal((2, 16)).astype(np.float32), "c": np.array(flag)} for flag in (True, False)]
    out, record = run_checked(_fp16(compute="float32"), proto, data=feeds, budget=Budget(min_cosine=0.999))
    assert {t.name: t.data_type for t in out.graph.initializer} == {"W": F16}
    # One Cast in the main graph, read by both branches; none inside them.
    assert op_types(out) == ["Cast", "If"] and record.stats["casts_inserted"] == 1
    branches = [a.g for a in out.graph.node[1].attribute]
    assert all("Cast" not in [n.op_type for n in b.node] for b in branches)
    assert all(b.node[0].input[1] == out.graph.node[0].output[0] for b in branches)
    assert record.after["params"] == record.before["params"] == 16 * 16


def test_keep_io_types_false_is_verified_on_the_data_cast_to_float16(tmp_path, capsys):
    # Verification feeds the original's float32 data to the new model as a caller would: cast to float16.
    feeds = _feeds()
    proto, record = run_checked(_fp16(keep_io_types=False), model_from_text(MLP, MLP_WEIGHTS), data=feeds,
                                strict=False)
    assert record.status == "applied" and record.fidelity is not None
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    # The figures are those of the float16 model on the float16-rounded inputs against the original's.
    from nnopt.pipeline.verify import compare_outputs
    from nnopt.runtime import make_session

    original = make_session(model_from_text(MLP, MLP_WEIGHTS))
    narrow = make_session(proto)
    reference = [original.run(None, f) for f in feeds]
    outputs = [narrow.run(None, {k: v.astype(np.float16) for k, v in f.items()}) for f in feeds]
    expected = compare_outputs(reference, outputs)
    assert record.fidelity["cosine_similarity"] == pytest.approx(expected.cosine_similarity, abs=1e-12)
    assert 0.999 < expected.cosine_similarity < 1.0 and record.fidelity["samples"] == len(feeds)
    assert record.fidelity["max_rel_error"] == pytest.approx(expected.max_rel_error, rel=1e-9)
    assert expected.max_rel_error > 0
    # nnopt diff compares the two (float32 against float16 inputs) the same way.
    from nnopt.cli import main

    original_path, narrow_path, data = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "d.npz"
    onnx.save(model_from_text(MLP, MLP_WEIGHTS), original_path)
    onnx.save(proto, narrow_path)
    np.savez(data, x=np.stack([f["x"] for f in feeds]))  # one sample per leading index
    assert main(["diff", str(original_path), str(narrow_path), "--data", str(data), "--json"]) == 0
    diffed = json.loads(capsys.readouterr().out)["fidelity"]
    assert diffed["cosine_similarity"] == pytest.approx(expected.cosine_similarity, abs=1e-12)
