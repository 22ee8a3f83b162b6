"""Tests of calibrated hardware profiles: profile files, `nnopt calibrate`, the estimate's runtime terms, Spearman."""

from __future__ import annotations

import json
import math
import platform
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from cost_profiles import MEASURED, MEASURED_GRID

import nnopt
import nnopt.cost.calibrate
import nnopt.cost.timing
from nnopt.cli import main
from nnopt.cost import BUILTIN_PROFILES, DEFAULT_PROFILE, HardwareProfile, analyze
from nnopt.cost.calibrate import (
    CALIBRATED_KERNELS,
    GRID_KERNELS,
    QUICK_SIZES,
    calibrate,
    profile_from_probes,
    rank_average,
    spearman,
)
from nnopt.cost.hardware import (
    EPILOGUE_KERNEL,
    KernelFigures,
    RatePoint,
    interpolate_bandwidth,
    interpolate_rate,
    load_profile,
    parse_hardware,
    profile_from_dict,
    write_profile,
)
from nnopt.cost.rules import kernel_classes
from nnopt.errors import InputError
from nnopt.testing import model_from_text

DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits" / "digits_cnn.onnx"
HEADER = '<ir_version: 8, opset_import: ["" : 17]>'

#: A profile with every optional figure set, each a round number so that expected latencies are exact.
FULL = HardwareProfile(
    name="board",
    peak_flops=1e12,
    bandwidth=48e9,
    description="test board",
    node_overhead_s=1e-6,
    run_overhead_s=5e-6,
    kernels={
        "conv": KernelFigures(flops=1e10, overhead_s=3e-6),
        "depthwise": KernelFigures(flops=1e9, overhead_s=2e-6),
        "unblocked_conv": KernelFigures(flops=2e9, overhead_s=2.5e-6),
        "dynamic_weight": KernelFigures(flops=5e9, overhead_s=1.5e-6),
        "int8": KernelFigures(flops=4e10, overhead_s=0.5e-6),
        "pointwise": KernelFigures(flops=8e9, overhead_s=1e-6),
    },
    runtime="onnxruntime",
)


def kernels_of(proto: onnx.ModelProto, profile: HardwareProfile = FULL) -> list[str]:
    return [node["kernel"] for node in analyze(proto, hardware=profile).nodes]


# ---------------------------------------------------------------------------------------------- models
def add_chain() -> onnx.ModelProto:
    """a ─Add(b)─ t0 ─Add(b)─ t1 ─Add(b)─ y, on [1, 4] floats (b is an input: nothing folds)."""
    return model_from_text(
        f"""{HEADER}
        g (float[1,4] a, float[1,4] b) => (float[1,4] y) {{
            t0 = Add(a, b)
            t1 = Add(t0, b)
            y = Add(t1, b)
        }}"""
    )


def separable() -> onnx.ModelProto:
    """x[1,8,10,10] ─depthwise 3×3 Conv (group 8)─ d ─pointwise 1×1 Conv─ y."""
    return model_from_text(
        f"""{HEADER}
        g (float[1,8,10,10] x) => (float[1,8,10,10] y) {{
            d = Conv<group: int = 8, pads: ints = [1, 1, 1, 1]>(x, wd)
            y = Conv(d, wp)
        }}""",
        {"wd": np.ones((8, 1, 3, 3), np.float32), "wp": np.ones((8, 8, 1, 1), np.float32)},
    )


def conv_bn_relu(weight_only: bool = False, shared: bool = False) -> onnx.ModelProto:
    """x ─Conv(w)─ c ─BatchNormalization─ n ─Relu─ y  (``weight_only``: w = DequantizeLinear(int8);
    ``shared``: c is also a graph output)."""
    weight = "w = DequantizeLinear(wq, ws)\n" if weight_only else ""
    extra_output = ", float[1,4,6,6] c" if shared else ""
    inits = {"s": np.ones(4, np.float32), "b": np.zeros(4, np.float32), "m": np.zeros(4, np.float32),
             "v": np.ones(4, np.float32)}
    if weight_only:
        inits.update(wq=np.ones((4, 4, 3, 3), np.int8), ws=np.array(0.1, np.float32))
    else:
        inits.update(w=np.ones((4, 4, 3, 3), np.float32))
    return model_from_text(
        f"""{HEADER}
        g (float[1,4,8,8] x) => (float[1,4,6,6] y{extra_output}) {{
            {weight}c = Conv(x, w)
            n = BatchNormalization(c, s, b, m, v)
            y = Relu(n)
        }}""",
        inits,
    )


def qdq_conv(kernel: int = 3) -> onnx.ModelProto:
    """x ─Q─ DQ ─┐
    wq ─DQ ──────Conv─ Q ─ DQ─ y     (what the quantize pass writes; onnxruntime runs it as QLinearConv)."""
    out = 9 - kernel
    return model_from_text(
        f"""{HEADER}
        g (float[1,4,8,8] x) => (float[1,4,{out},{out}] y) {{
            xq = QuantizeLinear(x, s, z)
            xd = DequantizeLinear(xq, s, z)
            w = DequantizeLinear(wq, ws)
            c = Conv(xd, w)
            cq = QuantizeLinear(c, s, z)
            y = DequantizeLinear(cq, s, z)
        }}""",
        {"s": np.array(0.1, np.float32), "z": np.array(128, np.uint8), "wq": np.ones((4, 4, kernel, kernel), np.int8),
         "ws": np.array(0.01, np.float32)},
    )


def decoded_weight() -> onnx.ModelProto:
    """idx ─Cast─ i ─Gather(codebook)─ flat ─Reshape─ w ─┐
                                                   x ─Conv─ y      (a kmeans-style decoded weight)."""
    return model_from_text(
        f"""{HEADER}
        g (float[1,2,4,4] x) => (float[1,2,4,4] y) {{
            i = Cast<to: int = 7>(idx)
            flat = Gather(codebook, i)
            w = Reshape(flat, shape)
            y = Conv(x, w)
        }}""",
        {"idx": np.zeros(4, np.uint8), "codebook": np.ones(2, np.float32), "shape": np.array([2, 2, 1, 1])},
    )


def identity_and_silu() -> onnx.ModelProto:
    """x ─Conv─ c ─Identity─ i ─Relu─ r ─Sigmoid─ s ─┐
                                         r ─────────Mul─ y      (Identity removed; Relu fused; SiLU)."""
    return model_from_text(
        f"""{HEADER}
        g (float[1,2,4,4] x) => (float[1,2,4,4] y) {{
            c = Conv(x, w)
            i = Identity(c)
            r = Relu(i)
            s = Sigmoid(r)
            y = Mul(r, s)
        }}""",
        {"w": np.ones((2, 2, 1, 1), np.float32)},
    )


# ---------------------------------------------------------------------------------------------- estimate terms
def test_builtin_profiles_keep_the_plain_roofline():
    for profile in BUILTIN_PROFILES.values():
        assert profile.node_overhead_s == profile.run_overhead_s == 0
        assert set(profile.kernels) <= {"int8", "int8_matmul"} and profile.runtime in (None, "generic")
        report = analyze(DIGITS, hardware=profile)
        for node in report.nodes:
            roofline = max(node["flops"] / profile.peak_flops, node["bytes_moved"] / profile.bandwidth)
            assert node["latency_s"] == roofline and node["kernel"] in ("other", "conv", "depthwise")
        assert report.totals["latency_s"] == pytest.approx(sum(n["latency_s"] for n in report.nodes), rel=1e-12)


def test_node_and_run_overhead_add_n_times_overhead():
    # Each Add: 4 FLOPs; reads a and b (16 B each), writes 16 B: 48 B, 1 ns at 48 GB/s.
    plain = HardwareProfile("plain", 1e12, 48e9)
    with_overheads = HardwareProfile("o", 1e12, 48e9, node_overhead_s=1e-6, run_overhead_s=5e-6)
    assert analyze(add_chain(), hardware=plain).totals["latency_s"] == pytest.approx(3e-9, rel=1e-12)
    report = analyze(add_chain(), hardware=with_overheads)
    assert [n["latency_s"] for n in report.nodes] == pytest.approx([1e-6 + 1e-9] * 3, rel=1e-12)
    assert report.totals["latency_s"] == pytest.approx(5e-6 + 3 * (1e-6 + 1e-9), rel=1e-12)


def test_depthwise_and_dense_convs_run_at_their_class_rates():
    # Depthwise: 8 × 10 × 10 outputs × 9 taps = 7,200 MACs; pointwise (1×1): 800 outputs × 8 inputs = 6,400 MACs.
    compute_only = HardwareProfile("c", 1e12, None, kernels=FULL.kernels)
    depthwise, pointwise = analyze(separable(), hardware=compute_only).nodes
    assert (depthwise["kernel"], depthwise["flops"]) == ("depthwise", 14_400)
    assert depthwise["latency_s"] == pytest.approx(2e-6 + 14_400 / 1e9, rel=1e-12)
    assert (pointwise["kernel"], pointwise["flops"]) == ("pointwise", 12_800)
    assert pointwise["latency_s"] == pytest.approx(1e-6 + 12_800 / 8e9, rel=1e-12)
    # Without kernel figures both run at the peak rate: the depthwise conv is then estimated 10 × faster.
    plain = analyze(separable(), hardware=HardwareProfile("p", 1e10)).nodes
    assert [n["latency_s"] for n in plain] == pytest.approx([14_400 / 1e10, 12_800 / 1e10], rel=1e-12)


@pytest.mark.parametrize(("channels", "kernel"), [(8, "conv"), (16, "conv"), (18, "unblocked_conv"), (20, "conv")])
def test_convs_with_unaligned_input_channels_are_unblocked(channels: int, kernel: str):
    """x[1, C, 6, 6] ─3×3 Conv (C → 4, padded)─ y: onnxruntime blocks inputs below 16 channels or a multiple of 4."""
    proto = model_from_text(
        f"""{HEADER}
        g (float[1,{channels},6,6] x) => (float[1,4,6,6] y) {{
            y = Conv<pads: ints = [1, 1, 1, 1]>(x, w)
        }}""",
        {"w": np.ones((4, channels, 3, 3), np.float32)},
    )
    (node,) = analyze(proto, hardware=FULL).nodes
    assert node["kernel"] == kernel
    if kernel == "unblocked_conv":
        # 4 × 36 outputs × 18 × 9 taps = 23,328 MACs; 2,592 + 2,592 + 576 bytes: compute-bound at 2 GFLOP/s.
        assert (node["flops"], node["bytes_moved"]) == (46_656, 5_760)
        assert node["latency_s"] == pytest.approx(1e-6 + 2.5e-6 + 46_656 / 2e9, rel=1e-12)


def test_onnxruntime_folds_batchnorm_and_activation_into_the_conv():
    assert kernels_of(conv_bn_relu()) == ["conv", "fused", "fused"]
    # Another reader of the conv output: nothing can be fused into it.
    assert kernels_of(conv_bn_relu(shared=True)) == ["conv", "other", "other"]
    # A weight-only DequantizeLinear is never constant-folded: it runs at every inference, and the conv
    # reads a weight computed at run time. BatchNorm cannot be folded into a weight that is not constant, so
    # it stays a node, and the Relu after it with it.
    assert kernels_of(conv_bn_relu(weight_only=True)) == ["quantize", "dynamic_weight", "other", "other"]
    # The graph as written, without a runtime: every node runs.
    no_runtime = HardwareProfile("n", 1e12, 48e9, kernels=FULL.kernels)
    assert kernels_of(conv_bn_relu(), no_runtime) == ["conv", "other", "other"]


@pytest.mark.parametrize("activation", ["Sigmoid", "HardSwish", "Relu"])
def test_a_fused_sigmoid_costs_its_elements_at_the_epilogue_rate_and_a_fused_relu_nothing(activation: str):
    """x ─Conv (4 → 4, 3×3, 6 × 6 out)─ c ─ACT─ y: onnxruntime fuses the activation into the conv; a Sigmoid or
    HardSwish still computes its 144 elements there, a Relu is free."""
    proto = model_from_text(
        f"""{HEADER}
        g (float[1,4,8,8] x) => (float[1,4,6,6] y) {{
            c = Conv(x, w)
            y = {activation}(c)
        }}""",
        {"w": np.ones((4, 4, 3, 3), np.float32)},
    )
    profile = replace(FULL, kernels={**FULL.kernels, EPILOGUE_KERNEL: KernelFigures(flops=2e8)})
    conv, act = analyze(proto, hardware=profile).nodes
    assert conv["kernel"] == "conv"
    if activation == "Relu":
        assert (act["kernel"], act["latency_s"]) == ("fused", 0.0)
        return
    assert act["kernel"] == EPILOGUE_KERNEL and act["flops"] == 144
    assert act["latency_s"] == pytest.approx(144 / 2e8, rel=1e-12)  # no node overhead, no memory traffic
    # A profile measured before the class (no figures for it) charges nothing, as it did.
    assert analyze(proto, hardware=FULL).nodes[1]["latency_s"] == 0.0


@pytest.mark.parametrize(("group", "kernel"), [(1, "dynamic_weight"), (4, "grouped_conv")])
def test_a_grouped_conv_with_a_weight_computed_at_run_time_takes_the_generic_path(group: int, kernel: str):
    """wq ─DequantizeLinear─ w; x ─Conv(w, group)─ y: weight-only's dense conv is ``dynamic_weight``, its
    depthwise conv the generic path's ``grouped_conv`` (onnxruntime ran such depthwise convs of a weight-only
    MobileNetV3 10-20 × slower than the dense rate said)."""
    proto = model_from_text(
        f"""{HEADER}
        g (float[1,4,8,8] x) => (float[1,4,6,6] y) {{
            w = DequantizeLinear(wq, ws)
            y = Conv<group: int = {group}>(x, w)
        }}""",
        {"wq": np.ones((4, 4 // group, 3, 3), np.int8), "ws": np.array(0.1, np.float32)},
    )
    assert kernels_of(proto) == ["quantize", kernel]


def test_fused_and_folded_nodes_cost_nothing_and_the_conv_keeps_its_cost():
    report = analyze(conv_bn_relu(), hardware=FULL)
    conv, bn, relu = report.nodes
    # 4 × 6 × 6 outputs × 36 taps = 5,184 MACs; compute 10,368 / 1e10 s beats memory (1,600 B: 1.024 + 0.576 kB).
    assert conv["flops"] == 10_368 and conv["bytes_moved"] == 1024 + 576 + 576
    assert conv["latency_s"] == pytest.approx(1e-6 + 3e-6 + 10_368 / 1e10, rel=1e-12)
    # With the machine's channel block known, the output goes back from the blocked layout to the caller: one
    # ReorderOutput of the 576-byte tensor, charged to the conv.
    blocked = analyze(conv_bn_relu(), hardware=replace(FULL, nchwc_block=16)).nodes[0]
    assert blocked["extra"]["reorders"] == 1
    assert blocked["extra"]["reorder_s"] == pytest.approx(1e-6 + 2 * 576 / 48e9, rel=1e-12)
    # The blocked conv computes its 4 output channels padded to the 16 of a block: 4 × the FLOPs' time.
    assert blocked["latency_s"] - blocked["extra"]["reorder_s"] == pytest.approx(1e-6 + 3e-6 + 4 * 10_368 / 1e10,
                                                                                  rel=1e-12)
    assert blocked["flops"] == conv["flops"]
    assert bn["latency_s"] == relu["latency_s"] == 0.0 and bn["bound"] == relu["bound"] == ""
    assert report.totals["latency_s"] == pytest.approx(5e-6 + conv["latency_s"], rel=1e-12)
    # FLOPs and bytes stay those of the graph as written; only the latency estimate changes.
    assert report.totals["flops"] == analyze(conv_bn_relu()).totals["flops"]


def test_qdq_group_runs_as_one_int8_kernel():
    report = analyze(qdq_conv(), hardware=FULL)
    assert [n["kernel"] for n in report.nodes] == ["quantize", "fused", "fused", "int8", "fused", "quantize"]
    conv = report.nodes[3]
    assert conv["latency_s"] == pytest.approx(1e-6 + 0.5e-6 + conv["flops"] / 4e10, rel=1e-12)
    # The built-in profile (runtime generic) fuses the same group and runs it at twice its FP32 peak.
    default = analyze(qdq_conv()).nodes
    assert [n["kernel"] for n in default] == ["quantize", "fused", "fused", "int8", "fused", "quantize"]
    assert default[3]["latency_s"] == pytest.approx(max(default[3]["flops"] / 384e9,
                                                        default[3]["bytes_moved"] / (2 * 8 * 2.666e9)), rel=1e-12)
    # Without a runtime, every Quantize/DequantizeLinear of the graph as written is costed.
    assert all(n["latency_s"] > 0 for n in analyze(qdq_conv(), hardware=HardwareProfile("p", 192e9, 42e9)).nodes)


def test_int8_pointwise_convs_are_their_own_class_or_int8s_in_older_profiles():
    pointwise = replace(FULL, kernels={**FULL.kernels, "int8_pointwise": KernelFigures(flops=2e11, overhead_s=0.2e-6)})
    conv = analyze(qdq_conv(1), hardware=pointwise).nodes[3]
    assert conv["kernel"] == "int8_pointwise"
    assert conv["latency_s"] == pytest.approx(1e-6 + 0.2e-6 + max(conv["flops"] / 2e11, conv["bytes_moved"] / 48e9),
                                              rel=1e-12)
    # FULL predates the class: its int8 figures cost the node, as they did before the class existed.
    older = analyze(qdq_conv(1), hardware=FULL).nodes[3]
    assert older["kernel"] == "int8_pointwise"
    assert older["latency_s"] == pytest.approx(1e-6 + 0.5e-6 + max(older["flops"] / 4e10, older["bytes_moved"] / 48e9),
                                               rel=1e-12)


def test_weights_decoded_from_constants_are_folded():
    assert kernels_of(decoded_weight()) == ["folded", "folded", "folded", "pointwise"]
    # The built-in profile folds the decoder too (any runtime computes it once at load): only the conv costs.
    assert kernels_of(decoded_weight(), DEFAULT_PROFILE) == ["folded", "folded", "folded", "pointwise"]
    plain = HardwareProfile("plain", 192e9, 2 * 8 * 2.666e9)
    assert kernels_of(decoded_weight(), plain) == ["other"] * 4  # the plain roofline: no kernel classes at all
    assert [n["latency_s"] > 0 for n in analyze(decoded_weight(), hardware=plain).nodes] == [True] * 4


def test_generic_runtime_folds_decoders_but_not_other_constant_subgraphs():
    proto = model_from_text(
        f"""{HEADER}
        g (float[1,2,4,4] x) => (float[1,2,4,4] y) {{
            s = Mul(scale, two)
            t = Mul(x, s)
            i = Cast<to: int = 7>(idx)
            flat = Gather(codebook, i)
            w = Reshape(flat, shape)
            y = Conv(t, w)
        }}""",
        {"scale": np.ones(1, np.float32), "two": np.full(1, 2, np.float32), "idx": np.zeros(4, np.uint8),
         "codebook": np.ones(2, np.float32), "shape": np.array([2, 2, 1, 1])},
    )
    assert kernels_of(proto, DEFAULT_PROFILE) == ["other", "other", "folded", "folded", "folded", "pointwise"]
    assert kernels_of(proto)[:1] == ["folded"]  # onnxruntime folds every constant subgraph


def test_identity_is_removed_and_silu_is_one_node():
    # The Mul of x·sigmoid(x) computes the sigmoid too: it runs at the activation rate.
    assert kernels_of(identity_and_silu()) == ["pointwise", "fused", "fused", "fused", "activation"]


def test_kernel_classes_without_a_runtime_follow_the_op_alone():
    proto = qdq_conv()
    names = {t.name for t in proto.graph.initializer}
    classes = kernel_classes(list(proto.graph.node), {}, names)
    assert classes == ["quantize"] * 3 + ["dynamic_weight"] + ["quantize"] * 2


# ---------------------------------------------------------------------------------------------- profile files
def test_profile_file_round_trips(tmp_path):
    path = tmp_path / "board.json"
    write_profile(FULL, path, measurements={"probes": {"add_large": {"seconds": 1.0}}})
    assert load_profile(path) == FULL
    assert parse_hardware(str(path)) == FULL
    assert json.loads(path.read_text())["measurements"]["probes"]["add_large"]["seconds"] == 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["board.json"]  # the temporary file was renamed
    for profile in BUILTIN_PROFILES.values():
        assert profile_from_dict(json.loads(json.dumps(profile.to_dict()))) == profile
    # Only the two figures of the plain roofline are required.
    minimal = tmp_path / "minimal.json"
    minimal.write_text('{"name": "m", "peak_flops_per_s": 2e9}')
    assert load_profile(minimal) == HardwareProfile("m", 2e9)


def test_pipeline_and_analyze_accept_a_profile_file(tmp_path, capsys):
    path = tmp_path / "board.json"
    write_profile(FULL, path)
    _, report = nnopt.Pipeline(["dce"], hardware=str(path), verify=False).run(DIGITS)
    expected = analyze(DIGITS, hardware=FULL).totals["latency_s"]
    assert report.passes[0].before["latency_s"] == pytest.approx(expected, rel=1e-12)
    assert main(["analyze", str(DIGITS), "--hardware", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["hardware"]["name"] == "board" and out["totals"]["latency_s"] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"name": "x"}', "missing key 'peak_flops_per_s'"),
        ('{"name": "x", "peak_flops_per_s": 1e9, "speed": 3}', "unknown key 'speed'"),
        ('{"name": "x", "peak_flops_per_s": "fast"}', "peak_flops_per_s: expected a number, got 'fast'"),
        ('{"name": "x", "peak_flops_per_s": -1}', "peak_flops_per_s: expected a positive number"),
        ('{"name": "x", "peak_flops_per_s": 1e9, "node_overhead_s": -1e-6}', "node_overhead_s: expected a number of at least 0"),
        ('{"name": "x", "peak_flops_per_s": 1e9, "kernels": {"gpu": {}}}', "unknown kernel class 'gpu'"),
        ('{"name": "x", "peak_flops_per_s": 1e9, "kernels": {"conv": {"flops": 1}}}', "unknown key 'kernels.conv.flops'"),
        ('{"name": "x", "peak_flops_per_s": 1e9, "kernels": {"conv": {"flops_per_s": 0}}}', "kernels.conv.flops_per_s: expected a positive number"),
        ('{"name": "x", "peak_flops_per_s": 1e9, "runtime": "tvm"}', "runtime: expected null or one of generic, onnxruntime"),
        ('{"name": "", "peak_flops_per_s": 1e9}', "name: expected a non-empty string"),
        ('{"name": "x", "peak_flops_per_s": 1e9, "threads": 0}', "threads: expected null or a whole number of at least 1"),
        ('{"name": "x", "peak_flops_per_s": 1e9, "threads": 1.5}', "threads: expected null or a whole number"),
    ],
)
def test_bad_profile_file_is_a_one_line_error_naming_file_and_key(tmp_path, capsys, content, message):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=message):
        load_profile(path)
    assert main(["analyze", str(DIGITS), "--hardware", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"hardware profile file {path}" in err and message.split("'")[0] in err


# ---------------------------------------------------------------------------------------------- calibrate
#: An int8 1×1 conv class of its own for the truths below (MEASURED predates it and falls back to int8's).
INT8_POINTWISE = KernelFigures(600e9, 1.2e-6)
#: Likewise a 1-D conv class (MEASURED falls back to unblocked_conv's): a fixed cost far below that one's.
CONV1D = KernelFigures(120e9, 0.9e-6)


def test_calibrate_recovers_the_profile_of_a_machine_that_follows_the_model(monkeypatch):
    """With every probe 'measured' as the estimate of a known profile, calibration gives that profile back."""
    # Without layout changes (nchwc_block 0): a one-node chain's time bounds a node's (``_large_per_node``), and
    # the reorders at a chain's ends would be part of it.
    # A Sigmoid fused into a conv at 5 G elements/s (0.2 ns each, as measured here at one thread).
    truth = replace(MEASURED, name="truth", kernels={**MEASURED.kernels, "int8_pointwise": INT8_POINTWISE,
                                                     "conv1d": CONV1D, EPILOGUE_KERNEL: KernelFigures(5e9)},
                    nchwc_block=0)

    def estimated(model, feeds=None, **_):
        seconds = analyze(model, hardware=truth, run_onnxruntime=False).totals["latency_s"]
        return {"median_s": seconds, "min_s": seconds}

    monkeypatch.setattr(nnopt.cost.timing, "measure_latency", estimated)
    monkeypatch.setattr(nnopt.cost.calibrate, "nchwc_block", lambda: truth.nchwc_block)
    profile, measurements = calibrate(sizes=QUICK_SIZES, runs=1, rounds=1, name="mine")
    assert (profile.name, profile.runtime) == ("mine", "onnxruntime")
    for key in ("peak_flops", "bandwidth", "node_overhead_s", "run_overhead_s"):
        assert getattr(profile, key) == pytest.approx(getattr(truth, key), rel=1e-9)
    for kernel, figures in truth.kernels.items():
        assert profile.kernels[kernel].flops == pytest.approx(figures.flops, rel=1e-9)
        assert profile.kernels[kernel].overhead_s == pytest.approx(figures.overhead_s, rel=1e-9)
    # Per-node FLOPs of the probes come from the analysis: a 3×3 conv of 8 → 8 channels on 16 × 16.
    assert measurements["probes"]["conv_large"]["flops_per_node"] == 2 * 8 * 8 * 9 * 16 * 16
    assert measurements["max_median_to_min"] == 1.0 and measurements["median_median_to_min"] == 1.0
    # A machine with one rate per class measures that rate at every grid point, and one bandwidth.
    for kernel in GRID_KERNELS:
        assert [p.flops for p in profile.kernels[kernel].grid] == pytest.approx(
            [truth.kernels[kernel].flops] * len(profile.kernels[kernel].grid), rel=1e-9)
    assert [b for _, b in profile.bandwidth_grid] == pytest.approx([truth.bandwidth] * 3, rel=1e-9)
    # On a machine with a channel block of 16, a blocked conv probe of 4 output channels computes 16: its rate is
    # per FLOP of the padded channels (4 ×), which the estimate multiplies back in; 16 channels need no padding.
    blocked = profile_from_probes(measurements["probes"], "blocked", "here", block=16)
    assert blocked.nchwc_block == 16
    for kernel, padded in (("conv", {36.0: 4.0, 144.0: 1.0}), ("pointwise", {16.0: 1.0, 64.0: 1.0})):
        plain = {p.reduction: p.flops for p in profile.kernels[kernel].grid}
        rates = {p.reduction: p.flops for p in blocked.kernels[kernel].grid}
        assert {r: rates[r] / plain[r] for r in padded} == pytest.approx(padded, rel=1e-12)


def test_calibrate_recovers_the_grids_of_a_machine_whose_rates_depend_on_shape(monkeypatch):
    """Each grid probe gives back the rate the (grid) truth has at its shape, and each Add chain its bandwidth."""
    # The QUICK_SIZES grid probes (conv: 4 channels on 16², 16 on 8²; 1×1: 16 on 16², 64 on 4²; grouped: 4 on
    # 12², 8 on 6²) at rates of their own, and the class's large and tiny probes at the class's single rate.
    measured = {**MEASURED.kernels, "int8_pointwise": INT8_POINTWISE, "conv1d": CONV1D}
    rate = {kernel: measured[kernel].flops for kernel in GRID_KERNELS}
    # The narrow probes (1 → 8 channels on 8², 3 → 16 on 6²: reductions 9 and 27) are points of conv and int8;
    # int8 also takes conv's (channels, size) grid.
    conv = (RatePoint(36, 16, rate["conv"]), RatePoint(36, 256, 20e9), RatePoint(72, 256, rate["conv"]),
            RatePoint(144, 64, 150e9), RatePoint(9, 64, 5e9), RatePoint(27, 36, 30e9))
    int8 = (RatePoint(36, 16, rate["int8"]), RatePoint(36, 256, 25e9), RatePoint(72, 256, rate["int8"]),
            RatePoint(144, 64, 300e9), RatePoint(9, 64, 2e9), RatePoint(27, 36, 45e9))
    pointwise = (RatePoint(4, 16, rate["pointwise"]), RatePoint(16, 256, 40e9), RatePoint(32, 64, rate["pointwise"]),
                 RatePoint(64, 16, 90e9))
    # Each grouped element is a pair, C → 2C (9 MACs per output) and back (18): both at the same rate.
    grouped = tuple(RatePoint(r, s, flops) for r in (9, 18) for s, flops in
                    ((16, rate["grouped_conv"]), (36, 10e9), (64, rate["grouped_conv"]), (144, 20e9)))
    # int8 1×1 convs (QUICK: 32 channels on 8², tiny 4 on 4², grid 16 on 16², 64 on 4²).
    int8_pointwise = (RatePoint(4, 16, rate["int8_pointwise"]), RatePoint(32, 64, rate["int8_pointwise"]),
                      RatePoint(16, 256, 80e9), RatePoint(64, 16, 200e9))
    # 1-D 3-tap convs (QUICK: 16 channels over 32 steps, tiny 4 over 16; grid 8 over 4, 16 over 16 steps). The
    # grid's rates are per FLOP of the steps padded to 16 (the 4-step point does 4 × the work it computes).
    conv1d = (RatePoint(12, 16, rate["conv1d"]), RatePoint(24, 4, 15e9), RatePoint(48, 16, 60e9),
              RatePoint(48, 32, rate["conv1d"]))
    kernels = dict(measured)
    grids = {"conv": conv, "pointwise": pointwise, "grouped_conv": grouped, "int8": int8,
             "int8_pointwise": int8_pointwise, "conv1d": conv1d}
    for kernel, grid in grids.items():
        kernels[kernel] = replace(kernels[kernel], grid=grid)
    # Small tensors move slower, though never so slowly that a conv probe turns memory-bound.
    truth = replace(MEASURED, kernels=kernels, bandwidth_grid=((3072.0, 100e9), (24576.0, 120e9), (196608.0, 134e9)),
                    nchwc_block=0)  # as above: no reorders at the chains' ends

    def estimated(model, feeds=None, **_):
        seconds = analyze(model, hardware=truth, run_onnxruntime=False).totals["latency_s"]
        return {"median_s": seconds, "min_s": seconds}

    monkeypatch.setattr(nnopt.cost.timing, "measure_latency", estimated)
    monkeypatch.setattr(nnopt.cost.calibrate, "nchwc_block", lambda: truth.nchwc_block)
    profile, _ = calibrate(sizes=QUICK_SIZES, runs=1, rounds=1)
    for kernel, grid in grids.items():
        measured = {(p.reduction, p.spatial): p.flops for p in profile.kernels[kernel].grid}
        # Within 0.2 %: the tiny 1×1 probe is memory-bound, and the class overhead under the grid rates is derived
        # with the large Add's bandwidth, not the grid's (1.5 ns of the tiny node); likewise the tiny int8 convs'
        # (its uint8 tensors). Within 0.01 % for conv's narrow probes: their Slices (helpers) are taken off at the
        # bandwidth interpolated in the derived grid.
        assert measured == pytest.approx({(p.reduction, p.spatial): p.flops for p in grid if (p.reduction, p.spatial)
                                          in measured}, rel={"pointwise": 2e-3, "conv": 1e-4, "int8": 5e-3, "int8_pointwise": 5e-3}.get(kernel, 1e-9))
        assert len(measured) == (4 if kernel in ("conv", "int8") else 2)
        # The int8 classes' points record their output channels (QUICK_SIZES: 4 and 16 channels square, and the
        # narrow 1 → 8 and 3 → 16 stems; 1×1: 16 and 64); the float classes' do not.
        channels = sorted(p.channels for p in profile.kernels[kernel].grid)
        assert channels == {"int8": [4, 8, 16, 16], "int8_pointwise": [16, 64]}.get(kernel, [0.0] * len(channels))
        assert set(measured.values()) & {20e9, 150e9, 40e9, 90e9, 10e9, 5e9, 30e9, 25e9, 300e9, 2e9, 45e9, 80e9,
                                         200e9} == set()
    # The 2^8 and 2^11-float Adds (3 KB, 24 KB moved) and the large one; the large one's rate is derived as before.
    assert [b for b, _ in profile.bandwidth_grid] == [3072.0, 24576.0, 196608.0]
    # Within 2 %: the node overhead is derived with the large Add's bandwidth for the tiny Adds, which the grid
    # truth moves at its smallest point's (0.5 ns of the 0.28 µs per node).
    assert [r for _, r in profile.bandwidth_grid] == pytest.approx([100e9, 120e9, 134e9], rel=2e-2)


def test_calibrate_warns_when_other_load_disturbs_the_probes(tmp_path, monkeypatch, capsys):
    def disturbed(model, feeds=None, **_):
        seconds = analyze(model, hardware=FULL, run_onnxruntime=False).totals["latency_s"]
        return {"median_s": 2 * seconds, "min_s": seconds}

    monkeypatch.setattr(nnopt.cost.timing, "measure_latency", disturbed)
    assert main(["calibrate", "--quick", "-o", str(tmp_path / "p.json")]) == 0
    err = capsys.readouterr().err
    assert "warning: the machine looks busy (a probe's median run took 2.0 x its fastest)" in err
    assert json.loads((tmp_path / "p.json").read_text())["measurements"]["max_median_to_min"] == 2.0


def test_calibrate_command_writes_a_profile_analyze_accepts(tmp_path, capsys):
    path = tmp_path / "me.json"
    assert main(["calibrate", "--quick", "--runs", "2", "--rounds", "1", "--name", "me", "-o", str(path)]) == 0
    summary = capsys.readouterr().out.strip()
    assert summary.count("\n") == 0 and summary.startswith("me: dense conv") and str(path) in summary
    profile = load_profile(path)
    # A fused activation may measure as free (no rate): a few probe elements on an 8 × 8 map.
    figures = [profile.peak_flops, profile.bandwidth,
               *(k.flops for name, k in profile.kernels.items() if name != EPILOGUE_KERNEL or k.flops is not None)]
    assert all(math.isfinite(f) and f > 0 for f in figures)
    overheads = [profile.node_overhead_s, profile.run_overhead_s, *(k.overhead_s for k in profile.kernels.values())]
    assert all(math.isfinite(o) and o >= 0 for o in overheads)
    assert sorted(profile.kernels) == sorted([*CALIBRATED_KERNELS, EPILOGUE_KERNEL])
    assert profile.runtime == "onnxruntime"
    # onnxruntime's NCHWc layout exists on x86 with AVX2 (block 8) or AVX-512 (16), not elsewhere.
    assert profile.nchwc_block in ((8, 16) if platform.machine() in ("x86_64", "AMD64") else (0, 4, 8, 16, 32, 64))
    assert set(json.loads(path.read_text())["measurements"]["probes"]) >= {"add_short", "add_long", "add_large"}
    assert main(["analyze", str(DIGITS), "--hardware", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["hardware"]["name"] == "me"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-o", "profile.txt"], "must end in .json"),
        (["--runs", "0", "-o", "p.json"], "runs >= 1"),
        (["--name", " ", "-o", "p.json"], "--name must not be empty"),
    ],
)
def test_calibrate_bad_arguments_write_nothing(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    assert main(["calibrate", "--quick", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err
    assert list(tmp_path.iterdir()) == []


def test_calibrate_measures_at_the_threads_asked_for_and_records_them(tmp_path, monkeypatch, capsys):
    import nnopt.runtime

    seen = []

    def estimated(model, feeds=None, **_):
        seen.append(nnopt.runtime._SESSION_THREADS)  # what make_session gives the probe's session
        seconds = analyze(model, hardware=MEASURED, run_onnxruntime=False).totals["latency_s"]
        return {"median_s": seconds, "min_s": seconds}

    monkeypatch.setattr(nnopt.cost.timing, "measure_latency", estimated)
    path = tmp_path / "one.json"
    assert main(["calibrate", "--quick", "--threads", "1", "--runs", "1", "--rounds", "1", "-o", str(path)]) == 0
    assert seen and set(seen) == {1} and nnopt.runtime._SESSION_THREADS is None  # restored after
    assert " us per run, 1 thread(s) (" in capsys.readouterr().out
    data = json.loads(path.read_text())
    assert data["threads"] == 1 and data["measurements"]["threads"] == 1 and "CPU, 1 intra-op thread (" in data["description"]
    assert load_profile(path).threads == 1
    # Without --threads: onnxruntime's default, and the file keeps the form it had before the key existed.
    seen.clear()
    profile, measurements = calibrate(sizes=QUICK_SIZES, runs=1, rounds=1)
    assert set(seen) == {None} and profile.threads is None and "threads" not in profile.to_dict()
    assert main(["calibrate", "--quick", "--threads", "0", "-o", str(tmp_path / "zero.json")]) == 2
    assert not (tmp_path / "zero.json").exists()


def test_calibrate_without_output_prints_the_profile(capsys):
    assert main(["calibrate", "--quick", "--runs", "1", "--rounds", "1"]) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert profile_from_dict(printed).runtime == "onnxruntime" and "measurements" in printed
    assert captured.err.strip().startswith("calibrated: dense conv")


# ---------------------------------------------------------------------------------------------- spearman
def test_rank_average_shares_tied_ranks():
    assert rank_average([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert rank_average([3, 3, 3]).tolist() == [2.0, 2.0, 2.0]


def test_spearman_exact_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0, abs=1e-15)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0, abs=1e-15)
    # Ties: ranks [1, 2.5, 2.5, 4] against [1, 2, 3, 4]: 4.5 / sqrt(4.5 × 5) = 3 / sqrt(10).
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(3 / math.sqrt(10), rel=1e-14)
    # Monotone transforms change nothing: ranks only.
    x = [0.3, 1e-5, 7.0, 2.5, 0.01]
    assert spearman(x, [v**3 for v in x]) == pytest.approx(1.0, abs=1e-15)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3])) and math.isnan(spearman([1], [2]))
    with pytest.raises(ValueError, match="3 x values but 2 y values"):
        spearman([1, 2, 3], [1, 2])


def test_default_profile_is_unchanged_but_for_int8_decoders_and_the_avx2_block():
    # nchwc_block 8 (AVX2) counts only where the estimate models onnxruntime (the low-rank passes' verdicts).
    assert DEFAULT_PROFILE == HardwareProfile("x86-avx2-2core", 192e9, 2 * 8 * 2.666e9, DEFAULT_PROFILE.description,
                                              kernels={k: KernelFigures(flops=384e9) for k in ("int8", "int8_matmul")},
                                              runtime="generic", nchwc_block=8)


# ---------------------------------------------------------------------------------------------- grids
def test_interpolated_rates_and_bandwidths_exact_values():
    grid = (RatePoint(8, 100, 10e9), RatePoint(32, 100, 40e9))
    assert interpolate_rate(grid, 8, 100) == 10e9 and interpolate_rate(grid, 32, 100) == 40e9
    # Equally far from both (in log space): the geometric mean of their rates.
    assert interpolate_rate(grid, 16, 100) == pytest.approx(20e9, rel=1e-12)
    # Nearer the first: 1/d³ weights 1 and 1/27 over ln 10e9 and ln 40e9.
    expected = math.exp((math.log(10e9) + math.log(40e9) / 27) / (1 + 1 / 27))
    assert interpolate_rate(grid, 8 * 2**0.5, 100) == pytest.approx(expected, rel=1e-12)
    bandwidth = ((1000.0, 10e9), (100000.0, 40e9))
    assert interpolate_bandwidth(bandwidth, 10000) == pytest.approx(20e9, rel=1e-12)  # log-log halfway
    assert interpolate_bandwidth(bandwidth, 10) == 10e9 and interpolate_bandwidth(bandwidth, 1e9) == 40e9


def test_int8_grids_are_read_by_output_channels_when_their_points_record_them(tmp_path):
    # The measured int8 grid around a 12 → 24 channel stem on 208 × 208 (ddddocr_det's Conv_41): an 8 → 8 probe on
    # 160², the 12 → 24 probe on 104², a 16 → 16 on 80² (GFLOP/s as measured here).
    def grid(channels):
        return tuple(RatePoint(r, s, f, channels=c if channels else 0.0) for r, s, f, c in
                     ((72, 25600, 69e9, 8), (108, 10816, 449e9, 24), (144, 6400, 426e9, 16)))

    flops = 2 * 108 * 24 * 208 * 208
    by_channels = KernelFigures(flops=1e12, grid=grid(True)).rate(flops, (1, 24, 208, 208))
    assert by_channels == 449e9  # its own point: same depth, same output channels, whatever the map size
    # Read by map size (a profile written before channels were recorded) the 8 → 8 probe is the nearest point.
    by_spatial = KernelFigures(flops=1e12, grid=grid(False)).rate(flops, (1, 24, 208, 208))
    assert 69e9 < by_spatial < 150e9
    # One point without channels (or a query without them): the grid is read by map size, as before.
    mixed = (*grid(True)[:2], replace(grid(True)[2], channels=0.0))
    assert interpolate_rate(mixed, 108, 43264, 24) == interpolate_rate(grid(False), 108, 43264)
    assert interpolate_rate(grid(True), 108, 43264) == by_spatial
    # The file form: "channels" only on the points that have it, and it survives the round trip.
    profile = replace(FULL, kernels={**FULL.kernels, "int8": KernelFigures(1e12, 1e-6, grid(True))})
    path = tmp_path / "int8.json"
    write_profile(profile, path)
    points = json.loads(path.read_text())["kernels"]["int8"]["grid"]
    assert [p["channels"] for p in points] == [8, 24, 16]
    assert load_profile(path) == profile
    for point, message in (({"reduction": 9, "spatial": 4, "flops_per_s": 1e9, "channels": 0}, "channels: expected a positive"),
                           ({"reduction": 9, "spatial": 4, "flops_per_s": 1e9, "width": 3}, "expected an object with")):
        path.write_text(json.dumps({"name": "x", "peak_flops_per_s": 1e9, "kernels": {"int8": {"grid": [point]}}}))
        with pytest.raises(InputError, match=message):
            load_profile(path)


def test_a_conv_takes_its_rate_from_the_grid_by_its_output_shape():
    conv = MEASURED_GRID.kernels["conv"]
    # 8 → 8 channels 3×3 on 160 × 160 is a grid point (72 MACs per output, 25,600 positions): 46 GFLOP/s.
    flops = 2 * 8 * 72 * 160 * 160
    latency, compute_s, _ = MEASURED_GRID.node_latency("conv", flops, 1e6, output_shape=(1, 8, 160, 160))
    assert compute_s == pytest.approx(flops / 46e9, rel=1e-12)
    assert latency == pytest.approx(0.28e-6 + 2.2e-6 + flops / 46e9, rel=1e-12)
    # Without a shape (how passes/_latency.py calls it) or with an unknown one: the class's single rate.
    for shape in (None, (1, 8)):
        assert MEASURED_GRID.node_latency("conv", flops, 1e6, output_shape=shape)[1] == flops / conv.flops
    assert MEASURED_GRID.node_latency("conv", flops, 1e6)[1] == flops / conv.flops
    # The bandwidth grid: a 49,152-byte Add moves at 77 GB/s where the large Add's scalar is 134.
    assert MEASURED_GRID.node_latency("other", 4096, 49152)[2] == pytest.approx(49152 / 77e9, rel=1e-12)
    assert MEASURED.node_latency("other", 4096, 49152)[2] == pytest.approx(49152 / 134e9, rel=1e-12)


def test_profile_files_without_grids_load_as_before_and_grids_round_trip(tmp_path):
    old = MEASURED.to_dict()
    # A profile without grids is written exactly as before the grids existed.
    assert "bandwidth_grid" not in old and all("grid" not in k for k in old["kernels"].values())
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    assert load_profile(path) == MEASURED
    assert analyze(DIGITS, hardware=load_profile(path)).totals == analyze(DIGITS, hardware=MEASURED).totals
    write_profile(MEASURED_GRID, tmp_path / "grid.json", {"probes": {}})
    again = load_profile(tmp_path / "grid.json")
    assert again == MEASURED_GRID and again.kernels["conv"].grid == MEASURED_GRID.kernels["conv"].grid
    assert again.bandwidth_grid == MEASURED_GRID.bandwidth_grid
    assert analyze(DIGITS, hardware=again).totals == analyze(DIGITS, hardware=MEASURED_GRID).totals


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["kernels"]["conv"].update(grid=[{"reduction": 8, "spatial": 1}]), r"kernels.conv.grid\[0\]"),
        (lambda d: d["kernels"]["conv"].update(grid=[{"reduction": 8, "spatial": 1, "flops_per_s": -1}]),
         "expected a positive number"),
        (lambda d: d.update(bandwidth_grid=[[10, 1e9], [5, 1e9]]), "sorted by bytes"),
        (lambda d: d.update(bandwidth_grid=[[10]]), "bandwidth_grid"),
    ],
)
def test_bad_grids_in_a_profile_file_are_one_line_errors(edit, message):
    data = MEASURED_GRID.to_dict()
    edit(data)
    with pytest.raises(InputError, match=message):
        profile_from_dict(data, "p.json")


# ---------------------------------------------------------------------------------------------- recurrent
def lstm_model(hidden: int = 16, steps: int = 4) -> onnx.ModelProto:
    """x[steps, 1, hidden] ─LSTM(hidden)─ y[steps, 1, 1, hidden]: 4 gates × hidden × (input + hidden) MACs a step."""
    return model_from_text(
        f"""{HEADER}
        g (float[{steps},1,{hidden}] x) => (float[{steps},1,1,{hidden}] y) {{
            y = LSTM<hidden_size: int = {hidden}>(x, w, r)
        }}""",
        {n: np.full((1, 4 * hidden, hidden), 0.01, np.float32) for n in ("w", "r")},
    )


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_recurrent_ops_are_their_own_kernel_class(op: str):
    node = onnx.helper.make_node(op, ["x", "w", "r"], ["y"], hidden_size=8)
    assert kernel_classes([node], {}, {"w", "r"}) == ["recurrent"]
    assert kernel_classes([node], {}, {"w", "r"}, runtime="onnxruntime") == ["recurrent"]


def test_an_lstm_runs_at_the_recurrent_rate_interpolated_by_its_hidden_size():
    # 4 steps × 4 gates × 16 hidden × (16 + 16) = 8,192 MACs; in the grid at 4 × 32 = 128 MACs per output, 16 wide.
    grid = (RatePoint(64, 8, 20e9), RatePoint(256, 32, 80e9))
    profile = replace(MEASURED, kernels={**MEASURED.kernels, "recurrent": KernelFigures(89e9, 1.6e-6, grid)})
    (node,) = analyze(lstm_model(), hardware=profile).nodes
    assert (node["kernel"], node["flops"]) == ("recurrent", 16_384)
    # Halfway between the two points in log space, equally weighted: the geometric mean of their rates, 40 GFLOP/s.
    assert node["latency_s"] == pytest.approx(0.28e-6 + 1.6e-6 + 16_384 / 40e9, rel=1e-9)
    # A profile from before the class existed runs it at the peak rate with no class overhead, as before.
    old = replace(MEASURED, kernels={k: v for k, v in MEASURED.kernels.items() if k != "recurrent"})
    (node,) = analyze(lstm_model(), hardware=old).nodes
    assert node["latency_s"] == pytest.approx(0.28e-6 + 16_384 / 237e9, rel=1e-9)


def test_calibrate_recovers_the_recurrent_grid(monkeypatch):
    """The QUICK_SIZES LSTM grid probes (8 hidden over 4 steps, 32 over 2) give back the truth's rates at their
    shapes, once the Squeeze beside each LSTM and the class overhead are taken off."""
    # The class's large and tiny probes (16 hidden over 4 steps, 4 over 1) at the class's single rate.
    rate = MEASURED.kernels["recurrent"].flops
    grid = (RatePoint(32, 4, rate), RatePoint(64, 8, 7e9), RatePoint(128, 16, rate), RatePoint(256, 32, 30e9))
    kernels = {**MEASURED.kernels, "recurrent": KernelFigures(rate, 1.6e-6, grid)}
    truth = replace(MEASURED, kernels=kernels)

    def estimated(model, feeds=None, **_):
        seconds = analyze(model, hardware=truth, run_onnxruntime=False).totals["latency_s"]
        return {"median_s": seconds, "min_s": seconds}

    monkeypatch.setattr(nnopt.cost.timing, "measure_latency", estimated)
    profile, measurements = calibrate(sizes=QUICK_SIZES, runs=1, rounds=1)
    assert {(p.reduction, p.spatial): p.flops for p in profile.kernels["recurrent"].grid} == pytest.approx(
        {(64.0, 8): 7e9, (256.0, 32): 30e9}, rel=1e-9)
    assert profile.kernels["recurrent"].flops == pytest.approx(rate, rel=1e-9)
    # The grid probes' FLOPs come from the analysis: 2 × 4 steps × 4 gates × 8 × 16 MACs.
    assert measurements["probes"]["grid_recurrent_8x4"]["flops_per_node"] == 2 * 4 * 4 * 8 * 16


# ---------------------------------------------------------------------------------------------- NCHWc reorders
def blocked_pair(between: str) -> onnx.ModelProto:
    """x[1,16,8,8] ─Conv 1×1 (16 → 16)─ ``between`` ─Conv 1×1─ y: onnxruntime runs both convs blocked (NCHWc)."""
    return model_from_text(
        f"""{HEADER}
        g (float[1,16,8,8] x) => (float[1,16,8,8] y) {{
            a = Conv(x, w1)
            b = {between}
            y = Conv(b, w2)
        }}""",
        {"w1": np.ones((16, 16, 1, 1), np.float32), "w2": np.ones((16, 16, 1, 1), np.float32),
         "c": np.ones((), np.float32)},
    )


def test_an_op_outside_the_blocked_layout_costs_a_reorder_on_each_side():
    # An Add of a scalar takes NCHW only: ReorderOutput after the first conv, ReorderInput before the second, each
    # copying the 4,096-byte tensor (read and write) at the node overhead and the bandwidth. The input x has 16
    # channels: it is reordered too, and the output y back to NCHW for the caller.
    convs = [n for n in analyze(blocked_pair("Add(a, c)"), hardware=MEASURED).nodes if n["op_type"] == "Conv"]
    assert [n["extra"].get("reorders") for n in convs] == [2, 2]
    copy = 0.28e-6 + 2 * 4096 / 134e9
    plain = analyze(blocked_pair("Add(a, c)"), hardware=replace(MEASURED, runtime=None)).nodes
    assert [n["latency_s"] for n in convs] == pytest.approx([plain[0]["latency_s"] + 2 * copy,
                                                             plain[2]["latency_s"] + 2 * copy], rel=1e-9)


def test_ops_of_the_blocked_layout_and_fused_activations_need_no_reorder():
    for between in ("Relu(a)", "MaxPool<kernel_shape: ints = [1, 1]>(a)", "Add(a, a)"):
        nodes = analyze(blocked_pair(between), hardware=MEASURED).nodes
        # Only the network's own ends: x into the first conv, y out of the last.
        assert sum(n["extra"].get("reorders", 0) for n in nodes) == 2, between
    # Without the onnxruntime runtime (the built-in profile), or without the machine's channel block (a profile
    # file written before it was measured), no layout is modelled.
    for profile in (DEFAULT_PROFILE, replace(MEASURED, nchwc_block=0)):
        assert all("reorders" not in n["extra"] for n in analyze(blocked_pair("Add(a, c)"), hardware=profile).nodes)


def test_the_channel_block_round_trips_and_a_bad_one_is_a_one_line_error(tmp_path):
    path = tmp_path / "p.json"
    write_profile(MEASURED, path)
    assert json.loads(path.read_text())["nchwc_block"] == 16 and load_profile(path).nchwc_block == 16
    # Written before the block was measured: no key, 0.
    assert "nchwc_block" not in replace(MEASURED, nchwc_block=0).to_dict()
    for bad in (-8, 1.5, True, "16"):
        with pytest.raises(InputError, match=r"^hardware profile file p: nchwc_block: expected a whole number"):
            profile_from_dict({**MEASURED.to_dict(), "nchwc_block": bad}, "p")


def test_reorders_match_the_graph_onnxruntime_writes(tmp_path):
    """A MobileNetV3 block (1×1 conv, HardSwish as Add/Clip/Mul/Div, depthwise conv, squeeze-excitation, 1×1
    conv): as many layout changes as onnxruntime's optimized graph has Reorder nodes (7 with onnxruntime 1.32;
    channels multiples of 16, so AVX2's block of 8 and AVX-512's of 16 give the same graph)."""
    import onnxruntime as ort

    proto = model_from_text(
        f"""{HEADER}
        g (float[1,16,16,16] x) => (float[1,16,16,16] y) {{
            a = Conv(x, w1)
            a3 = Add(a, three)
            ac = Clip(a3, zero, six)
            am = Mul(a, ac)
            h = Div(am, six)
            d = Conv<group: int = 32, pads: ints = [1, 1, 1, 1]>(h, wd)
            r = Relu(d)
            p = GlobalAveragePool(r)
            s1 = Conv(p, ws1)
            s1r = Relu(s1)
            s2 = Conv(s1r, ws2)
            s2h = HardSigmoid(s2)
            e = Mul(r, s2h)
            y = Conv(e, w2)
        }}""",
        {"w1": np.full((32, 16, 1, 1), 0.1, np.float32), "wd": np.full((32, 1, 3, 3), 0.1, np.float32),
         "ws1": np.full((16, 32, 1, 1), 0.1, np.float32), "ws2": np.full((32, 16, 1, 1), 0.1, np.float32),
         "w2": np.full((16, 32, 1, 1), 0.1, np.float32), "three": np.array(3, np.float32),
         "zero": np.array(0, np.float32), "six": np.array(6, np.float32)},
    )
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    written = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    expected = written.count("ReorderInput") + written.count("ReorderOutput")
    found = sum(n["extra"].get("reorders", 0) for n in analyze(proto, hardware=MEASURED).nodes)
    assert found == expected and expected >= 4, written


# ---------------------------------------------------------------------------------------------- divide, activation
@pytest.mark.parametrize(("op", "kernel"), [("Div", "divide"), ("Sigmoid", "activation"), ("Tanh", "activation"),
                                            ("HardSwish", "activation"), ("Relu", "other"), ("Add", "other")])
def test_elementwise_ops_slower_than_moving_their_data_have_their_own_classes(op: str, kernel: str):
    inputs = ["x", "c"] if op in ("Div", "Add") else ["x"]
    node = onnx.helper.make_node(op, inputs, ["y"])
    assert kernel_classes([node], {}, {"c"}) == [kernel]


def test_a_div_and_a_sigmoid_run_at_their_measured_element_rates():
    proto = model_from_text(
        f"""{HEADER}
        g (float[1,16,8,8] x) => (float[1,16,8,8] y) {{
            d = Div(x, c)
            y = Sigmoid(d)
        }}""",
        {"c": np.array(6, np.float32)},
    )
    div, sigmoid = analyze(proto, hardware=MEASURED).nodes
    # 1,024 elements, one FLOP each: at 6.4 and 4.5 G elements/s both are compute-bound (8 kB moved at 134 GB/s).
    assert (div["kernel"], sigmoid["kernel"], div["flops"]) == ("divide", "activation", 1024)
    assert div["latency_s"] == pytest.approx(0.28e-6 + 1024 / 6.4e9, rel=1e-9)
    assert sigmoid["latency_s"] == pytest.approx(0.28e-6 + 1024 / 4.5e9, rel=1e-9)
    # A profile written before the classes: the peak rate, so both memory-bound, as they were.
    old = replace(MEASURED, kernels={k: v for k, v in MEASURED.kernels.items() if k not in ("divide", "activation")})
    assert [n["latency_s"] for n in analyze(proto, hardware=old).nodes] == pytest.approx(
        [0.28e-6 + n["bytes_moved"] / 134e9 for n in (div, sigmoid)], rel=1e-9)
