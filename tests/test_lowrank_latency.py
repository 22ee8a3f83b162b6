"""svd and conv-to-separable decline rewrites the onnxruntime-aware estimate says are slower (min_latency_saving)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from nnopt.api import optimize
from nnopt.cost.hardware import DEFAULT_PROFILE, HardwareProfile, KernelFigures
from nnopt.errors import OptionError
from nnopt.passes._latency import Step, onnxruntime_view
from nnopt.passes.conv_to_separable import ConvToSeparable, ConvToSeparableOptions
from nnopt.passes.svd import Svd, SvdOptions
from nnopt.testing import apply_pass, random_feeds, run


def _conv_model(weight: np.ndarray, size: int, name: str = "conv") -> onnx.ModelProto:
    """X [1, C_in, size, size] ─ Conv(W, B; pads 1 for 3×3) ─ Relu ─ Y."""
    c_out, c_in, k = weight.shape[0], weight.shape[1], weight.shape[2]
    bias = np.linspace(-0.1, 0.1, c_out, dtype=np.float32)
    nodes = [
        helper.make_node("Conv", ["X", "W", "B"], ["h"], name=name, kernel_shape=[k, k], pads=[k // 2] * 4),
        helper.make_node("Relu", ["h"], ["Y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [1, c_in, size, size])],
        [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [1, c_out, size, size])],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "B")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _rank_weight(c_out: int, c_in: int, k: int, rank: int, seed: int = 0) -> np.ndarray:
    """A conv weight whose C_out × C_in·K² matrix has exactly ``rank``."""
    rng = np.random.default_rng(seed)
    matrix = rng.standard_normal((c_out, rank)) @ rng.standard_normal((rank, c_in * k * k)) / np.sqrt(rank * c_in)
    return matrix.reshape(c_out, c_in, k, k).astype(np.float32)


def _separable_weight(c_out: int, c_in: int, m: int, seed: int = 0) -> np.ndarray:
    """A 3×3 conv weight each of whose input channels' C_out × 9 slices has exactly rank ``m``."""
    rng = np.random.default_rng(seed)
    w = np.einsum("ocm,cmk->ock", rng.standard_normal((c_out, c_in, m)), rng.standard_normal((c_in, m, 9)))
    return (w / np.sqrt(9 * c_in * m)).reshape(c_out, c_in, 3, 3).astype(np.float32)


def _close(a: onnx.ModelProto, b: onnx.ModelProto) -> float:
    feeds = random_feeds(a)
    x, y = run(a, feeds)[0], run(b, feeds)[0]
    return float(np.max(np.abs(x - y)) / np.max(np.abs(x)))


# ---------------------------------------------------------------------------------------------- svd
def test_unaligned_pointwise_factor_is_estimated_at_the_dense_rate():
    # 64 → 256 3×3 on 32×32 at rank 150: the 1×1 factor reads 150 channels, not a multiple of 4, but
    # onnxruntime runs a 1×1 conv as one GEMM whatever its channels (measured as fast per FLOP as an aligned
    # one): the cost model's unblocked_pointwise class, at the pointwise rate, so the estimate follows the
    # FLOPs and the layer is rewritten.
    proto = _conv_model(_rank_weight(256, 64, 3, 150), 32)
    out, result = apply_pass(Svd(SvdOptions(rank=150)), proto)
    (layer,) = result.layers
    assert layer.action == "rewritten" and layer.figures["param_saving"] == pytest.approx(0.153646, abs=1e-6)
    assert layer.figures["kernels_before"] == ["conv"] and layer.figures["kernels_after"] == ["conv", "unblocked_pointwise"]
    # The first factor's 150 output channels run as 152 in AVX2's blocks of 8: 0.8482 without that padding.
    assert layer.figures["latency_ratio"] == pytest.approx(0.856, abs=1e-4)
    assert _close(proto, out) < 1e-4


def test_large_layer_where_low_rank_clearly_pays_is_rewritten():
    proto = _conv_model(_rank_weight(256, 256, 3, 32), 16)
    out, result = apply_pass(Svd(SvdOptions(energy=1.0)), proto)
    (layer,) = result.layers
    assert layer.action == "rewritten" and layer.figures["rank"] == 32 and "rank_rounded_from" not in layer.figures
    assert layer.figures["latency_ratio"] == pytest.approx(0.1423, abs=1e-4)
    assert layer.figures["flops_after"] / layer.figures["flops_before"] == pytest.approx(0.1389, abs=1e-4)
    assert _close(proto, out) < 1e-4


def _matmul_model() -> onnx.ModelProto:
    """A [4, 64] ─ MatMul(·, W) ─ Y [4, 48], W of rank 2."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((64, 2)) @ rng.standard_normal((2, 48))).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "W"], ["Y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("A", onnx.TensorProto.FLOAT, [4, 64])],
        [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [4, 48])],
        [numpy_helper.from_array(w, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_a_small_estimated_saving_is_declined_at_the_default_margin():
    # Rank 160 of 64 → 256 3×3: estimated 9.5% faster, below the default 10% the estimate's error calls for.
    proto = _conv_model(_rank_weight(256, 64, 3, 160), 32)
    _, result = apply_pass(Svd(SvdOptions(rank=160, min_param_saving=0.0)), proto)
    (layer,) = result.layers
    assert layer.action == "declined" and layer.figures["latency_ratio"] == pytest.approx(0.9045, abs=1e-4)
    assert layer.reason == (
        "estimated to save 9.5% of the layer's latency, below min_latency_saving=0.1 (x86-avx2-2core+onnxruntime)"
    )
    _, at_zero = apply_pass(Svd(SvdOptions(rank=160, min_param_saving=0.0, min_latency_saving=0.0)), proto)
    assert at_zero.layers[0].action == "rewritten"


def test_overhead_dominated_layer_is_declined():
    # A 64 × 48 MatMul on 4 rows: rank 2 cuts its FLOPs by 93%, but two nodes cost more fixed time than one.
    _, result = apply_pass(Svd(SvdOptions(energy=1.0)), _matmul_model())
    (layer,) = result.layers
    assert layer.action == "declined" and layer.figures["rank"] == 2
    assert layer.figures["latency_ratio"] == pytest.approx(1.8441, abs=1e-4)
    assert layer.reason == (
        "estimated 1.84× slower (overhead-dominated: 7.0 of 7.0 µs are fixed per-node costs), below "
        "min_latency_saving=0.1 (x86-avx2-2core+onnxruntime)"
    )


# ---------------------------------------------------------------------------------------------- conv-to-separable
def test_depthwise_multiplier_that_does_not_pay_is_declined():
    # 32 → 32 on 16×16 at m = 3: 57% fewer FLOPs, but a depthwise conv with 3 outputs per channel runs as
    # one small GEMM per group in onnxruntime.
    proto = _conv_model(_separable_weight(32, 32, 3), 16)
    _, result = apply_pass(ConvToSeparable(ConvToSeparableOptions(energy=1.0)), proto)
    (layer,) = result.layers
    assert layer.action == "declined" and layer.figures["m"] == 3
    assert layer.figures["flops_saving"] == pytest.approx(0.572917, abs=1e-6)
    assert layer.figures["kernels_after"] == ["grouped_conv", "pointwise"]
    assert layer.figures["latency_ratio"] == pytest.approx(1.47, abs=1e-4)
    assert "depthwise multiplier 3 runs as grouped GEMMs" in layer.reason


def test_separable_at_multiplier_1_is_rewritten_exactly():
    proto = _conv_model(_separable_weight(128, 128, 1), 32)
    out, result = apply_pass(ConvToSeparable(ConvToSeparableOptions(energy=1.0)), proto)
    (layer,) = result.layers
    assert layer.action == "rewritten" and layer.figures["m"] == 1
    assert layer.figures["kernels_after"] == ["depthwise", "pointwise"]
    assert layer.figures["latency_ratio"] == pytest.approx(0.1357, abs=1e-4)
    assert _close(proto, out) < 1e-4


# ---------------------------------------------------------------------------------------------- the option
@pytest.mark.parametrize(
    ("spec", "weight"),
    [("svd:energy=1", _rank_weight(256, 256, 3, 32)), ("conv-to-separable:energy=1", _separable_weight(128, 128, 1))],
)
def test_off_and_on_agree_where_every_rewrite_pays_and_runs_are_deterministic(spec, weight):
    # Layers where the check passes and no rank is rounded: the option changes nothing but the report.
    proto = _conv_model(weight, 16)
    on, report_on = optimize(proto, [spec])
    again, report_again = optimize(proto, [spec])
    off, report_off = optimize(proto, [spec + ",min_latency_saving=none"])
    assert on.to_proto().SerializeToString() == again.to_proto().SerializeToString()
    assert on.to_proto().SerializeToString() == off.to_proto().SerializeToString()
    layers_on = report_on.to_dict()["passes"][-1]["layers"]
    assert layers_on == report_again.to_dict()["passes"][-1]["layers"]
    assert [layer["action"] for layer in layers_on] == ["rewritten"]
    assert "latency_ratio" in layers_on[0]
    assert "latency_ratio" not in report_off.to_dict()["passes"][-1]["layers"][0]


def test_the_runs_profile_is_used_as_given():
    # A profile that models onnxruntime (what nnopt calibrate writes) is used as is: with no fixed costs
    # per node, the 64 × 48 MatMul's rank-2 factors pay and are kept; the default profile declines them.
    flat = HardwareProfile("flat", peak_flops=2e11, bandwidth=1e11, kernels={"conv": KernelFigures(2e11)},
                           runtime="onnxruntime")
    proto = _matmul_model()
    _, report = optimize(proto, ["svd:energy=1"], hardware=flat)
    (layer,) = report.to_dict()["passes"][-1]["layers"]
    assert layer["action"] == "rewritten" and layer["latency_ratio"] == pytest.approx(0.1955, abs=1e-4)
    _, default = optimize(proto, ["svd:energy=1"])
    (declined,) = default.to_dict()["passes"][-1]["layers"]
    assert declined["action"] == "declined" and declined["reason"].endswith("(x86-avx2-2core+onnxruntime)")


def test_onnxruntime_view_and_validation():
    view = onnxruntime_view(DEFAULT_PROFILE)
    assert view.runtime == "onnxruntime" and view.peak_flops == DEFAULT_PROFILE.peak_flops
    assert view.kernels["unblocked_conv"].flops == pytest.approx(0.5 * DEFAULT_PROFILE.peak_flops)
    assert onnxruntime_view(view) is view
    assert Step("Conv", (64, 62, 3, 3), 1, 62 * 9, 64).kernel() == "unblocked_conv"  # im2col + GEMM
    # One GEMM at the pointwise rate, but outside the blocked layout (reorders around it in a model).
    assert Step("Conv", (64, 62, 1, 1), 1, 62, 64).kernel() == "unblocked_pointwise"
    assert Step("Conv", (96, 1, 3, 3), 32, 27, 96).kernel() == "grouped_conv"
    assert Step("Conv", (32, 1, 3, 3), 32, 9, 32).kernel() == "depthwise"
    assert SvdOptions.from_strings({"min_latency_saving": "none"}).min_latency_saving is None
    assert SvdOptions().min_latency_saving == 0.1 and ConvToSeparableOptions().min_latency_saving == 0.1
    for bad in (1.0, float("nan")):
        with pytest.raises(OptionError):
            SvdOptions(min_latency_saving=bad)
