"""Tests of select=latency's rate sources: the built-in table (narrow-input stems) and a calibrated profile."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from nnopt.analysis.manager import AnalysisManager, AnalysisSettings
from nnopt.cost.hardware import DEFAULT_PROFILE, HardwareProfile, KernelFigures, RatePoint, shipped_profile
from nnopt.errors import OptionError
from nnopt.ir.model import Model
from nnopt.passes import _int8_select
from nnopt.passes._latency import onnxruntime_view
from nnopt.passes.quantize import DEFAULT_OP_TYPES, Quantize, QuantizeOptions
from nnopt.pipeline.base import PassContext


def _net(layers: list[tuple[int, int, int]], cin: int, spatial: int, seed: int = 0, dims: int = 2,
         ) -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]:
    """Convs (out channels, kernel, group) with a Relu after each but the last, on [1, cin, s, s] (``dims``
    spatial axes of size s: 1 for audio-style 1-D convs), and 8 calibration samples."""
    rng = np.random.default_rng(seed)
    nodes, inits, src, c = [], [], "x", cin
    for i, (out, k, group) in enumerate(layers):
        w = rng.normal(0, 1.0 / np.sqrt(k**dims * c // group), (out, c // group, *[k] * dims)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"),
                  numpy_helper.from_array(rng.normal(0, 0.1, out).astype(np.float32), f"b{i}")]
        nodes.append(helper.make_node("Conv", [src, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", group=group,
                                      pads=[k // 2] * 2 * dims))
        src, c = f"c{i}", out
        if i < len(layers) - 1:
            nodes.append(helper.make_node("Relu", [src], [f"r{i}"], name=f"relu{i}"))
            src = f"r{i}"
    shape = [spatial] * dims
    graph = helper.make_graph(
        nodes, "net", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, cin, *shape])],
        [helper.make_tensor_value_info(src, onnx.TensorProto.FLOAT, [1, c, *shape])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=8)
    return proto, [{"x": rng.normal(0, 1, (1, cin, *shape)).astype(np.float32)} for _ in range(8)]


def _select(proto: onnx.ModelProto, feeds: dict[str, np.ndarray],
            rates: _int8_select.TableRates | None = None) -> _int8_select.Selection:
    return _int8_select.select(proto, [n for n in proto.graph.node if n.op_type in DEFAULT_OP_TYPES], feeds, rates)


def _figures(sel: _int8_select.Selection, name: str) -> dict:
    return sel.figures.get(name) or next(d.figures for d in sel.declined if d.node == name)


def test_a_space_to_depth_stem_of_12_channels_runs_int8() -> None:
    # ddddocr's detector: a 12-channel Focus stem conv (12 -> 24, 3x3). Measured in the model: float 25.26 ms,
    # with that conv int8 22.76 ms; the table gives 644.8 µs float vs 277.0 µs int8 at 104 x 104.
    proto, calib = _net([(24, 3, 1), (24, 3, 1)], 12, 104)
    sel = _select(proto, calib[0])
    assert sel.chosen == ["conv0", "relu0", "conv1"]
    stem = _figures(sel, "conv0")
    macs = 24 * 12 * 9 * 104 * 104
    rate = _int8_select.KERNELS["dense_narrow"]
    assert stem["kind"] == "dense_narrow" and stem["work"] == macs
    assert stem["predicted_float_us"] == pytest.approx(rate.float_us(macs), abs=0.01) == pytest.approx(644.8, abs=0.1)
    assert stem["predicted_int8_us"] == pytest.approx(rate.int8_us(macs, 104 * 104), abs=0.01)
    assert stem["predicted_int8_us"] == pytest.approx(277.0, abs=0.1)
    assert sel.stats["select_profile"] == "int8-kernels-table" and sel.stats["select_threads"] == 1


@pytest.mark.parametrize(("cin", "out", "why"), [
    (3, 24, "too small (few input channels: int8 pays per output pixel)"),  # measured x1.40-x2.56
    (12, 12, "12 input and 12 output channels (< 16)"),  # measured x0.99 (8 -> 8: x1.23)
])
def test_narrow_stems_where_int8_does_not_pay_stay_float(cin: int, out: int, why: str) -> None:
    proto, calib = _net([(out, 3, 1), (32, 3, 1)], cin, 104)
    sel = _select(proto, calib[0])
    assert "conv0" not in sel.chosen and "conv1" in sel.chosen
    reason = next(d.reason for d in sel.declined if d.node == "conv0")
    assert why in reason


def _calibrated(depthwise_int8_flops: float) -> HardwareProfile:
    """A profile as ``nnopt calibrate`` writes one for onnxruntime (every int8 class measured)."""
    kernels = {"conv": KernelFigures(5e10, 2e-6), "pointwise": KernelFigures(5e10, 1e-6),
               "depthwise": KernelFigures(1e10, 1e-6), "grouped_conv": KernelFigures(4e9, 1e-6),
               "unblocked_conv": KernelFigures(2.5e10, 2e-6), "dynamic_weight": KernelFigures(3e10, 2e-6),
               "int8": KernelFigures(2e11, 3e-6), "int8_depthwise": KernelFigures(depthwise_int8_flops, 1e-6),
               "int8_matmul": KernelFigures(2e11, 2e-6), "int8_elementwise": KernelFigures(5e9, 1e-6),
               "quantize": KernelFigures(4e9, 0.5e-6)}
    return HardwareProfile("calibrated-test", peak_flops=1e11, bandwidth=2e10, node_overhead_s=1e-6,
                           kernels=kernels, runtime="onnxruntime")


def test_a_calibrated_profile_gives_the_times_its_estimate_gives() -> None:
    # Pointwise 64 -> 128 -> depthwise 128 -> pointwise 64 at 28 x 28.
    proto, calib = _net([(128, 1, 1), (128, 3, 128), (64, 1, 1)], 64, 28)
    profile = _calibrated(4e10)  # int8 depthwise 4x the float rate: this profile says it pays
    rates = _int8_select.rates_for(profile)
    assert isinstance(rates, _int8_select.ProfileRates) and rates.name == "calibrated-test"
    sel = _select(proto, calib[0], rates)
    assert sel.stats["select_profile"] == "calibrated-test" and sel.stats["select_threads"] is None
    assert _select(proto, calib[0], _int8_select.rates_for(replace(profile, threads=2))).stats["select_threads"] == 2
    assert sel.chosen == ["conv0", "relu0", "conv1", "relu1", "conv2"]
    dw = _figures(sel, "conv1")
    macs, elements = 128 * 9 * 28 * 28, 2 * 128 * 28 * 28 + 128 * 9 + 128
    assert dw["predicted_float_us"] == round(profile.node_latency("depthwise", 2 * macs, 4 * elements)[0] * 1e6, 2)
    assert dw["predicted_int8_us"] == round(profile.node_latency("int8_depthwise", 2 * macs, elements)[0] * 1e6, 2)
    # 1 µs node overhead + 1 µs class overhead + max(1.81 MFLOP / 1e10 = 180.6 µs, 0.81 MB / 2e10 = 40.4 µs)
    # = 182.6 µs float; int8: 2 µs + max(1.81 MFLOP / 4e10 = 45.2 µs, 0.20 MB / 2e10 = 10.1 µs) = 47.2 µs.
    assert dw["predicted_float_us"] == pytest.approx(182.6, abs=0.1)
    assert dw["predicted_int8_us"] == pytest.approx(47.2, abs=0.1)
    # The same profile with int8 depthwise slower than float: the depthwise layer stays float, and the
    # pointwise ones are decided by its edges.
    slow = _select(proto, calib[0], _int8_select.rates_for(_calibrated(5e9)))
    assert "conv1" not in slow.chosen
    assert next(d.reason for d in slow.declined if d.node == "conv1").startswith(
        "float (select=latency): depthwise: onnxruntime's int8 kernel is no faster (calibrated-test:")


def _with_narrow_points(profile: HardwareProfile, int8_narrow_flops: float) -> HardwareProfile:
    """``profile`` with conv and int8 grids as ``nnopt calibrate`` measures them: a 1-channel stem point
    (1 -> 24 channels, 64 x 64: 9 MACs per output) and a dense point (64 -> 64, 28 x 28: 576)."""
    kernels = dict(profile.kernels)
    kernels["conv"] = replace(kernels["conv"], grid=(RatePoint(9, 4096, 1e10), RatePoint(576, 784, 5e10)))
    kernels["int8"] = replace(kernels["int8"], grid=(RatePoint(9, 4096, int8_narrow_flops), RatePoint(576, 784, 2e11)))
    return replace(profile, kernels=kernels)


@pytest.mark.parametrize(("int8_narrow_flops", "stem_int8"), [(3e10, True), (3e9, False)])
def test_a_profile_that_measured_narrow_stems_decides_them(int8_narrow_flops: float, stem_int8: bool) -> None:
    # A greyscale stem, 1 -> 24 channels on 64 x 64, then a dense 24 -> 32 conv. On a VNNI machine int8 runs
    # such a stem faster, on an AVX2 one 4x slower: the profile's narrow grid point says which this is.
    proto, calib = _net([(24, 3, 1), (32, 3, 1)], 1, 64)
    profile = _with_narrow_points(_calibrated(4e10), int8_narrow_flops)
    rates = _int8_select.rates_for(profile)
    assert isinstance(rates, _int8_select.ProfileRates) and rates.narrow
    sel = _select(proto, calib[0], rates)
    assert ("conv0" in sel.chosen) is stem_int8
    stem = _figures(sel, "conv0")
    macs, out = 24 * 9 * 64 * 64, (1, 24, 64, 64)
    elements = 64 * 64 + 24 * 64 * 64 + 24 * 9 + 24
    assert stem["kind"] == "dense_narrow"
    # The rates at the stem's own grid point: float 3 µs + 1.77 MFLOP / 1e10 = 180.0 µs; int8 4 µs + 1.77 MFLOP
    # / 3e10 (63.0 µs) or / 3e9 (593.8 µs).
    assert stem["predicted_float_us"] == round(profile.node_latency("conv", 2 * macs, 4 * elements,
                                                                   output_shape=out)[0] * 1e6, 2)
    assert stem["predicted_float_us"] == pytest.approx(179.95, abs=0.01)
    assert stem["predicted_int8_us"] == pytest.approx(4 + 2 * macs / int8_narrow_flops * 1e6, abs=0.01)
    # A profile from before the narrow probes (no int8 grid) leaves stems to the table.
    old = _int8_select.rates_for(_calibrated(4e10))
    assert not old.narrow and _figures(_select(proto, calib[0], old), "conv0")["predicted_int8_us"] == pytest.approx(
        _int8_select.KERNELS["dense_narrow"].int8_us(macs, 64 * 64), abs=0.01)


def test_profiles_without_int8_classes_use_the_table() -> None:
    assert type(_int8_select.rates_for(None)) is _int8_select.TableRates
    # The default profile as onnxruntime runs it has int8 and int8_matmul figures only (no quantize class).
    assert type(_int8_select.rates_for(onnxruntime_view(DEFAULT_PROFILE))) is _int8_select.TableRates
    uncalibrated = HardwareProfile("plain", peak_flops=1e11, kernels=_calibrated(4e10).kernels)
    assert type(_int8_select.rates_for(uncalibrated)) is _int8_select.TableRates


def test_the_pass_decides_with_the_runs_hardware_profile() -> None:
    proto, calib = _net([(128, 1, 1), (128, 3, 128), (64, 1, 1)], 64, 28)
    decided = {}
    for hardware in (None, _calibrated(4e10)):
        model = Model.from_proto(proto)
        ctx = PassContext(samples=calib, analyses=AnalysisManager(model, AnalysisSettings(hardware=hardware)))
        result = Quantize().run(model, ctx)
        decided[result.stats["select_profile"]] = {e.node for e in result.layers if e.action == "rewritten"}
    # The table keeps the depthwise conv float (measured x1.15-x3.56); the profile says it pays.
    assert decided == {"int8-kernels-table": {"conv0", "conv2"}, "calibrated-test": {"conv0", "conv1", "conv2"}}


def test_threads_option_decides_with_the_shipped_multi_thread_profile() -> None:
    # quantize:threads=2 takes its times from the profile `nnopt calibrate --threads 2` measured (shipped with
    # the package), read through the same node_latency the estimate uses; one thread keeps the table.
    shipped = shipped_profile(_int8_select.THREADED_PROFILE)
    assert shipped.threads == 2 and set(_int8_select.INT8_CLASSES) <= set(shipped.kernels)
    proto, calib = _net([(128, 1, 1), (128, 3, 128), (64, 1, 1)], 64, 28)
    stats, figures = {}, {}
    for threads in (1, 2):
        model = Model.from_proto(proto)
        result = Quantize(QuantizeOptions(threads=threads)).run(model, PassContext(samples=calib))
        stats[threads] = result.stats
        figures[threads] = {e.node: e.figures for e in result.layers}
    assert (stats[1]["select_profile"], stats[1]["select_threads"]) == ("int8-kernels-table", 1)
    assert (stats[2]["select_profile"], stats[2]["select_threads"]) == ("onnxruntime-cpu-2-threads", 2)
    macs = 64 * 128 * 28 * 28
    elements = 64 * 28 * 28 + 128 * 64 + 128 + 128 * 28 * 28  # input, weight, bias, output
    float_s = shipped.node_latency("pointwise", 2.0 * macs, 4.0 * elements, output_shape=(1, 128, 28, 28))[0]
    assert figures[2]["conv0"]["predicted_float_us"] == pytest.approx(float_s * 1e6, rel=1e-3)
    assert figures[1]["conv0"]["predicted_float_us"] == pytest.approx(
        _int8_select.KERNELS["pointwise"].float_us(macs), abs=0.01)


def test_a_calibrated_hardware_profile_wins_over_the_threads_option() -> None:
    proto, calib = _net([(64, 3, 1), (64, 3, 1)], 32, 28)
    model = Model.from_proto(proto)
    ctx = PassContext(samples=calib, analyses=AnalysisManager(model, AnalysisSettings(hardware=_calibrated(4e10))))
    result = Quantize(QuantizeOptions(threads=2)).run(model, ctx)
    assert result.stats["select_profile"] == "calibrated-test" and result.stats["select_threads"] is None


def test_threads_below_one_is_an_option_error() -> None:
    with pytest.raises(OptionError, match="quantize: threads must be >= 1, got 0"):
        QuantizeOptions(threads=0)


@dataclass(frozen=True)
class _FixedRates(_int8_select.TableRates):
    """Every conv 30 µs float and ``conv_int8_us`` int8 (depthwise 10 and 12), every region edge 8 µs, an unfused
    activation 0.5 µs: with 15, one conv alone does not pay for its two edges (15 < 16) while two joined do
    (30 > 16)."""

    conv_int8_us: float = 15.0

    def layer_us(self, kind, work, pixels, elements, output_shape=None):
        return (10.0, 12.0) if kind == "depthwise" else (30.0, self.conv_int8_us)

    def boundary_us(self, elements, conv_side=False):
        return 8.0

    def unfused_us(self, elements):
        return 0.5


@pytest.mark.parametrize(("conv_int8_us", "chosen", "predicted_us"), [
    (15.0, ["conv0", "relu0", "conv1"], 56.5),  # 19 % below float: the second start's set is taken
    (20.0, [], 70.0),  # 66.5, 5 % below float, is within the second start's margin: the first start's (float) stays
])
def test_a_region_feeding_a_float_conv_keeps_its_layers_that_pay(conv_int8_us, chosen, predicted_us) -> None:
    # conv0 → relu0 → conv1 → relu1 → depthwise conv2 (kept float: its int8 kernel is slower). With every other
    # layer int8, relu1's int8 output would reach the float conv2 through a DequantizeLinear, which onnxruntime
    # turns into a per-tensor int8 conv: never chosen. Dropping that whole region first leaves the model float,
    # since no single conv pays for its own two edges; starting with relu1 float keeps conv0 → conv1 int8.
    proto, calib = _net([(16, 3, 1), (16, 3, 1), (16, 3, 16)], 16, 8)
    sel = _select(proto, calib[0], _FixedRates(conv_int8_us=conv_int8_us))
    assert sel.chosen == chosen
    # Float 30 + 30 + 10; int8 2 × conv_int8_us + 10, a QuantizeLinear before conv0 and a DequantizeLinear after
    # conv1 (8 each), and relu1 no longer fused into conv1 (0.5).
    assert sel.stats["select_predicted_float_us"] == 70.0 and sel.stats["select_predicted_us"] == predicted_us
    assert "depthwise" in next(d.reason for d in sel.declined if d.node == "conv2")


def test_1d_convs_over_few_steps_are_costed_on_padded_steps_and_run_int8() -> None:
    # Silero VAD's encoder: 1-D 3-tap convs over 1-4 steps. onnxruntime's float GEMM computes 16 steps for 2-16
    # (int8_kernels.py, 128 channels: 8.9 µs float over 4 steps, 9.2 over 16; int8 1.3 µs): at the 2-D dense
    # rate the table put 128 -> 128 over 4 steps at 4.4 µs float, 4.6 µs int8, and kept the encoder float.
    proto, calib = _net([(128, 3, 1), (128, 3, 1)], 128, 4, dims=1)
    sel = _select(proto, calib[0])
    macs = 128 * 128 * 3 * 4
    figures = _figures(sel, "conv0")
    rate = _int8_select.KERNELS["dense_1d"]
    assert figures["kind"] == "dense_1d" and figures["work"] == macs
    assert figures["predicted_float_us"] == pytest.approx(rate.float_us(macs * 16 / 4), abs=0.01)
    assert figures["predicted_float_us"] == pytest.approx(5.6, abs=0.1)
    assert figures["predicted_int8_us"] == pytest.approx(rate.int8_us(macs), abs=0.01) == pytest.approx(1.2, abs=0.1)
    dense = _int8_select.KERNELS["dense"]
    assert dense.float_us(macs) < dense.int8_us(macs)  # what the 2-D rate said
    assert sel.chosen == ["conv0", "relu0", "conv1"]


def test_a_calibrated_profile_times_1d_convs_by_its_conv1d_class_and_adds_by_its_own_rates() -> None:
    # conv0 -> relu0 -> conv1 (1-D, 64 channels over 4 steps), then Add with the input: the float conv on the
    # profile's conv1d class over steps padded to 16 (the table's times when the profile has no conv1d class),
    # the Add at the profile's rates whatever classes the profile lacks (a first version of the fallback
    # sent Adds to the table: ppocr_cls with a profile went from 15 to 46 int8 layers).
    proto, calib = _net([(64, 3, 1), (64, 3, 1)], 64, 4, dims=1)
    proto.graph.node.append(helper.make_node("Add", ["c1", "x"], ["y"], name="add"))
    proto.graph.output[0].name = "y"
    macs, elements = 64 * 64 * 3 * 4, 2 * 64 * 4 + 64 * 64 * 3 + 64  # input, output, weight, bias
    without = _calibrated(4e10)
    with_1d = replace(without, kernels={**without.kernels, "conv1d": KernelFigures(1e11, 1e-6)})
    for profile in (without, with_1d):
        sel = _select(proto, calib[0], _int8_select.rates_for(profile))
        conv, add = _figures(sel, "conv0"), _figures(sel, "add")
        if profile is with_1d:
            expected = (profile.node_latency("conv1d", 2 * macs, 4 * elements, padding=4.0)[0] * 1e6,
                        profile.node_latency("int8", 2 * macs, elements)[0] * 1e6)
        else:  # the layer's two times from one source: the table
            expected = (_int8_select.KERNELS["dense_1d"].float_us(macs * 4), _int8_select.KERNELS["dense_1d"].int8_us(macs))
        assert (conv["predicted_float_us"], conv["predicted_int8_us"]) == (round(expected[0], 2), round(expected[1], 2))
        assert add["predicted_float_us"] == round(profile.node_latency("other", 256, 4 * 3 * 256)[0] * 1e6, 2)
        assert add["predicted_int8_us"] == round(profile.node_latency("int8_elementwise", 256, 3 * 256)[0] * 1e6, 2)
