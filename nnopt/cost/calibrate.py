"""Calibrate a hardware profile with onnxruntime micro-benchmarks; rank-correlate estimates with measurements.

``calibrate()`` measures what the latency estimate needs (see ``HardwareProfile``) on this machine, in
onnxruntime with exactly the session settings ``nnopt.cost.timing.measure_latency`` uses (default graph
optimisations and threads, or the ``threads`` asked for, recorded in the profile). Every figure comes from a small model built in memory, never from the
models it will be used to estimate:

* a probe is a chain of N identical nodes; the time of one node is the slope between two chain lengths,
  so the cost of entering the runtime and of the chain's ends cancels out;
* ``node_overhead_s``: per node of a chain of tiny Adds (64 bytes each: nothing but dispatch);
  ``run_overhead_s``: what the short chain takes beyond its nodes;
* ``bandwidth``: bytes moved by one of a chain of large Adds (two inputs read, one output written) ÷ its time;
* per kernel class (``conv``: a dense 3×3 Conv, ``depthwise``: a 3×3 Conv with one channel per group,
  ``unblocked_conv``: a dense 3×3 Conv with 62 (18 for the tiny one) input channels, ``conv1d``: a 1-D
  3-tap Conv,
  ``dynamic_weight``: a dense 3×3 Conv whose weight is dequantized from int8 at every inference,
  ``int8``: a DequantizeLinear → Conv → QuantizeLinear group onnxruntime fuses into QLinearConv), a large
  and a tiny node: the difference of their times over the difference of their FLOPs is the class's
  FLOP/s, and what the tiny node takes beyond node overhead and its roofline time is the class's fixed
  overhead (a helper node beside each conv, the weight's DequantizeLinear, is costed as the estimate
  costs it and taken off first). ``peak_flops`` is the dense conv rate.

* grids (``derive_figures``' ``_rate_grid``/``_bandwidth_grid``): the same chains at several shapes per
  class of ``GRID_KERNELS`` (dense 3×3, 1×1, and conv-to-separable's grouped convs: channels × map size
  spanning real models' layers), each giving the rate at its shape once the node and class overheads are
  taken off; and chains of Adds of several sizes, each giving the bandwidth at its bytes moved.

FLOPs and bytes of each probe come from ``nnopt.cost.analyze``, so they follow the estimate's own
conventions. Each probe is timed in ``rounds`` interleaved rounds of ``runs`` runs; the fastest run is
kept, since other load on the machine only ever adds time (``_STATISTIC``).
"""

from __future__ import annotations

import datetime
import math
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from nnopt.cost.energy import DEFAULT_ENERGY, EnergyFigures, machine_cache_bytes
from nnopt.cost.hardware import (
    CHANNEL_GRID_KERNELS,
    EPILOGUE_KERNEL,
    HardwareProfile,
    KernelFigures,
    RatePoint,
    interpolate_bandwidth,
)
from nnopt.cost.layout import channel_padding, step_padding
from nnopt.errors import InputError

#: IR version and opset of the probe models: ones every supported onnxruntime release loads.
_IR_VERSION = 8
_OPSET = 17


# ---------------------------------------------------------------------------------------------- statistics
def rank_average(values: Sequence[float]) -> np.ndarray:
    """1-based ranks of ``values``, tied values sharing the mean of the ranks they span."""
    array = np.asarray(values, dtype=np.float64)
    order = np.argsort(array, kind="stable")
    ranks = np.empty(len(array), dtype=np.float64)
    ranks[order] = np.arange(1, len(array) + 1, dtype=np.float64)
    _, group, counts = np.unique(array, return_inverse=True, return_counts=True)
    return np.bincount(group, weights=ranks)[group] / counts[group]


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation: the Pearson correlation of the average ranks (ties handled).

    Returns NaN when fewer than two points are given or either side is constant.
    """
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} x values but {len(y)} y values")
    if len(x) < 2:
        return math.nan
    rx, ry = rank_average(x), rank_average(y)
    rx -= rx.mean()
    ry -= ry.mean()
    denominator = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return float(rx @ ry) / denominator if denominator else math.nan


# ---------------------------------------------------------------------------------------------- probes
@dataclass(frozen=True)
class ProbeSizes:
    """Sizes of the probe models. :data:`FULL_SIZES` is what ``nnopt calibrate`` uses; the tests use
    :data:`QUICK_SIZES` (figures from them are positive and finite, but not representative).

    Attributes:
        tiny_elements: Elements of each tiny Add (the node-overhead chain).
        short_chain, long_chain: Lengths of the two chains of tiny Adds.
        large_elements: Elements of each input of the bandwidth Adds (a chain of them, like the activations
            of a network: a single Add of large tensors runs nearly twice as fast per byte as one in a chain).
        conv_channels, conv_size: Channels and spatial size of the large dense and int8 convs.
        depthwise_channels, depthwise_size: Likewise for the large depthwise conv.
        unblocked_channels, unblocked_tiny_channels: Channels of the large and tiny ``unblocked_conv``
            probes (at least 16, not multiples of 4; at ``conv_size`` and ``tiny_size``).
        conv1d_channels, conv1d_steps, conv1d_tiny_steps: The large ``conv1d`` probe, a 1-D 3-tap conv, and
            the tiny one's steps (it takes ``tiny_channels``); steps in whole GEMM column strips
            (``nnopt.cost.layout.GEMM_COLUMNS``), so that neither computes padding.
        tiny_channels, tiny_size: Channels and spatial size of every other tiny conv.
        tiny_convs: How many nodes longer the long chain of tiny convs is than the short one (1 node).
        pointwise_channels, pointwise_size: Channels and spatial size of the large 1×1 conv.
        matmul_features, matmul_tokens: The large int8 MatMul: [1, tokens, features] × [features, features].
        tiny_features, tiny_tokens: Likewise for the tiny one.
        elementwise_shape: The tensor of the large int8 Add and of the large Quantize/DequantizeLinear
            (the tiny ones take [1, tiny_elements]).
        math_shape: Likewise for the large ``divide`` and ``activation`` probes.
        conv_grid, pointwise_grid, grouped_grid: (channels, size) of the grid probes of ``conv`` (3×3),
            ``pointwise`` and ``grouped_conv`` (pairs as ``_grouped_chain`` builds them); ``conv_grid``'s
            shapes are timed as ``int8`` (QDQ) convs too, for the int8 class's grid.
        narrow_grid: (input channels, output channels, size) of the 3×3 convs with few input channels (the
            stems of image models) timed in float and in int8, points of the ``conv`` and ``int8`` grids.
        bandwidth_elements: Elements per input of the Add chains of the bandwidth grid.
        grouped_channels, grouped_multiplier, grouped_size: The large ``grouped_conv`` probe (the tiny one
            takes ``tiny_channels``, multiplier 2, ``tiny_size``).
        recurrent_hidden, recurrent_steps, recurrent_grid: The ``recurrent`` probes (LSTMs, see ``_lstms``).
    """

    tiny_elements: int = 16
    short_chain: int = 8
    long_chain: int = 208
    large_elements: int = 1 << 18
    conv_channels: int = 64
    conv_size: int = 28
    depthwise_channels: int = 128
    depthwise_size: int = 56
    unblocked_channels: int = 62
    unblocked_tiny_channels: int = 18
    conv1d_channels: int = 128
    conv1d_steps: int = 64
    conv1d_tiny_steps: int = 16
    tiny_channels: int = 8
    tiny_size: int = 8
    tiny_convs: int = 32
    pointwise_channels: int = 64
    pointwise_size: int = 56
    matmul_features: int = 256
    matmul_tokens: int = 196
    tiny_features: int = 16
    tiny_tokens: int = 4
    elementwise_shape: tuple[int, ...] = (1, 64, 56, 56)
    #: The tensor of the large ``divide`` and ``activation`` probes: onnxruntime splits these across its threads
    #: only above some 100 K elements, and most such nodes of real models are smaller (a third of that here).
    math_shape: tuple[int, ...] = (1, 32, 32, 32)
    #: (channels, size) of the dense 3×3 and of the 1×1 convs whose rates make the classes' grids: from
    #: few channels on large maps to many on small ones, as the layers of real models run.
    conv_grid: tuple[tuple[int, int], ...] = ((8, 160), (16, 80), (32, 56), (48, 80), (128, 14))
    pointwise_grid: tuple[tuple[int, int], ...] = ((8, 160), (16, 112), (32, 56), (128, 28), (256, 14))
    #: Elements of each Add of the chains whose bandwidths make the bandwidth grid (besides ``large_elements``).
    bandwidth_elements: tuple[int, ...] = (1 << 10, 1 << 12, 1 << 14, 1 << 16)
    #: The grouped conv as conv-to-separable writes it: C → m·C channels with group C (m: the multiplier).
    grouped_channels: int = 64
    grouped_multiplier: int = 4
    grouped_size: int = 28
    #: (channels, size) of the ``grouped_conv`` grid probes (multiplier ``grouped_multiplier``): the generic
    #: path pays per group, so small maps (as 1-D audio convs have) run at a fraction of the large probe's rate.
    grouped_grid: tuple[tuple[int, int], ...] = ((64, 2), (128, 4), (64, 12), (32, 56))
    #: The large ``recurrent`` probe: an LSTM of this hidden size (input size the same) over this many steps
    #: (the tiny one: ``tiny_features`` hidden, one step).
    recurrent_hidden: int = 128
    recurrent_steps: int = 16
    #: (hidden size, steps) of the ``recurrent`` grid probes: each step is a GEMM of 4·hidden outputs, so the
    #: rate grows with the hidden size (speech models use 64-128, text recognisers 256-512).
    recurrent_grid: tuple[tuple[int, int], ...] = ((32, 16), (64, 16), (256, 8), (512, 4))
    #: (in, out channels, size) of the narrow convs: a greyscale stem (1 -> 24 on 64 x 64 output pixels, as
    #: a text recogniser's on 32 x 128), RGB stems (3 -> 16, 3 -> 32) and a space-to-depth stem (12 -> 24).
    #: onnxruntime's int8 conv with few input channels pays per output pixel (its NHWC reorder and im2col), so
    #: whether int8 pays for a stem is a matter of this machine (issue #16: a VNNI CPU runs the 1-channel stem
    #: faster in int8, an AVX2 one 4x slower).
    narrow_grid: tuple[tuple[int, int, int], ...] = ((1, 24, 64), (3, 16, 112), (3, 32, 56), (12, 24, 104))
    #: (channels, length) of the 1-D 3-tap convs of the ``conv1d`` grid: audio models convolve a few time steps at
    #: a time (Silero VAD: 64-128 channels over 1-4 steps), where a conv's rate is far from a long one's.
    conv1d_grid: tuple[tuple[int, int], ...] = ((64, 2), (128, 4), (128, 16), (64, 128))


FULL_SIZES = ProbeSizes()
QUICK_SIZES = ProbeSizes(
    long_chain=24,
    large_elements=1 << 14,
    conv_channels=8,
    conv_size=16,
    depthwise_channels=16,
    depthwise_size=16,
    unblocked_channels=18,
    tiny_channels=4,
    tiny_size=4,
    tiny_convs=4,
    pointwise_channels=32,
    pointwise_size=8,
    matmul_features=32,
    matmul_tokens=64,
    tiny_features=4,
    tiny_tokens=2,
    elementwise_shape=(1, 8, 16, 16),
    math_shape=(1, 8, 16, 16),
    conv_grid=((4, 16), (16, 8)),
    pointwise_grid=((16, 16), (64, 4)),
    bandwidth_elements=(1 << 8, 1 << 11),
    grouped_channels=8,
    grouped_multiplier=2,
    grouped_size=8,
    grouped_grid=((4, 12), (8, 6)),
    recurrent_hidden=16,
    recurrent_steps=4,
    recurrent_grid=((8, 4), (32, 2)),
    narrow_grid=((1, 8, 8), (3, 16, 6)),
    conv1d_grid=((8, 4), (16, 16)),
    conv1d_channels=16,
    conv1d_steps=32,
)


#: The kernel classes calibration measures: convs by chains of convs (``_conv_chain``), ``int8_matmul`` by a
#: chain of QDQ MatMuls, ``int8_elementwise`` by QDQ Adds, ``quantize`` by Quantize → Dequantize → Neg,
#: ``recurrent`` by LSTMs, ``divide`` and ``activation`` by chains of Div and Sigmoid.
CALIBRATED_KERNELS = ("conv", "pointwise", "depthwise", "grouped_conv", "unblocked_conv", "conv1d", "dynamic_weight",
                      "int8", "int8_depthwise", "int8_pointwise", "int8_matmul", "int8_elementwise", "quantize", "recurrent",
                      "divide", "activation")  # fmt: skip


@dataclass
class _Probe:
    """A chain of ``length`` identical elements; ``unit`` is a one-element version analysed for FLOPs and
    bytes: of its ``op_type`` node, and of its ``helper`` nodes (run beside each element, e.g. the
    DequantizeLinear of a weight computed at run time, or the Neg between a Dequantize and the next
    Quantize)."""

    name: str
    op_type: str
    model: onnx.ModelProto
    unit: onnx.ModelProto
    length: int
    helper: str | None = None
    seconds: float = math.inf
    #: Nodes of the probed class per element of the chain (a Quantize and a Dequantize: 2).
    per_element: int = 1
    #: The kernel class the helper is estimated as (None: ``_HELPER_KERNEL`` by its op type).
    helper_kernel: str | None = None


def calibrate(
    *,
    runs: int = 20,
    rounds: int = 5,
    sizes: ProbeSizes = FULL_SIZES,
    name: str = "calibrated",
    seed: int = 0,
    before_each: Callable[[], None] | None = None,
    threads: int | None = None,
) -> tuple[HardwareProfile, dict[str, Any]]:
    """Measure this machine in onnxruntime and return the profile and what was measured.

    Args:
        runs: Timed runs per probe and round (their median is taken).
        rounds: Interleaved rounds over all probes; the fastest run over all rounds is kept.
        sizes: Probe sizes.
        name: The profile's name.
        seed: Seed of the probes' weights.
        before_each: Called before each probe is timed (e.g. to wait until the CPU is idle).
        threads: onnxruntime intra-op threads of the probes' sessions (None: its default, one per core);
            recorded in the profile. Measure at the thread count the models will run with.

    Returns:
        The profile (``runtime="onnxruntime"``), and ``measurements``: per probe its chain length, FLOPs
        and bytes per node (from ``nnopt.cost.analyze``) and seconds, plus the onnxruntime version.

    Raises:
        InputError: ``runs`` or ``rounds`` below 1, ``threads`` below 1, or onnxruntime cannot run a probe.
    """
    # Imported here: onnxruntime is slow to import and only calibration needs it.
    import onnxruntime

    from nnopt.runtime import session_threads

    if runs < 1 or rounds < 1:
        raise InputError(f"calibration needs runs >= 1 and rounds >= 1, got runs={runs}, rounds={rounds}")
    if threads is not None and threads < 1:
        raise InputError(f"calibration needs threads >= 1 (or the default), got threads={threads}")
    probes = _probes(sizes, np.random.default_rng(seed))
    with session_threads(threads):
        spread = _time_probes(probes, runs, rounds, before_each)
    figures = _probe_figures(probes)
    cpu = _cpu_name()
    threads_text = f", {threads} intra-op thread{'s' if threads != 1 else ''}" if threads is not None else ""
    profile = profile_from_probes(figures, name, f"{cpu}, onnxruntime {onnxruntime.__version__} CPU{threads_text} "
                                  f"({datetime.date.today().isoformat()})", threads=threads,
                                  block=nchwc_block())  # fmt: skip
    measurements = {
        # Median ÷ fastest run of the kept round, worst probe: well above 1 means other load disturbed it.
        "max_median_to_min": max(spread.values()),
        # The same for the typical probe: a few short probes jitter by ×2 even on an idle machine.
        "median_median_to_min": float(np.median(list(spread.values()))),
        "onnxruntime": onnxruntime.__version__,
        "cpu": cpu,
        "runs": runs,
        "rounds": rounds,
        "threads": threads,
        "probes": figures,
    }
    return profile, measurements


#: Channel counts tried by :func:`nchwc_block`: the blocks MLAS's NCHWc kernels use (8 with AVX2, 16 with AVX-512).
_BLOCK_CANDIDATES = (4, 8, 16, 32, 64)


def nchwc_block() -> int:
    """The channel block of onnxruntime's blocked (NCHWc) conv layout on this machine, or 0 if it has none.

    A dense conv with fewer input channels than the block reads its NCHW input directly, so the block is the
    least channel count whose dense 3×3 conv onnxruntime precedes with a ReorderInput (read from the graph it
    writes with ``optimized_model_filepath``, under the session settings timings use): no timing involved.
    """
    import tempfile

    import onnxruntime

    for channels in _BLOCK_CANDIDATES:
        weight = numpy_helper.from_array(np.full((channels, channels, 3, 3), 0.1, np.float32), "w")
        conv = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1] * 4)
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 8, 8])
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 4  # the warning that the optimized graph is machine-specific is the point
        with tempfile.TemporaryDirectory(prefix="nnopt-nchwc-") as tmp:
            options.optimized_model_filepath = f"{tmp}/optimized.onnx"
            model = _model([conv], [x], "y", [weight])
            onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            written = onnx.load(options.optimized_model_filepath)
        if any(node.op_type == "ReorderInput" for node in written.graph.node):
            return channels
    return 0


def profile_from_probes(
    figures: dict[str, dict[str, Any]], name: str, where: str, threads: int | None = None, block: int = 0
) -> HardwareProfile:
    """The profile :func:`calibrate` derives from its probes' timings (``measurements["probes"]`` of a profile
    file: a profile can be derived again from what was measured, e.g. after the derivation changed).

    Args:
        figures: Per probe, what ``measurements["probes"]`` holds (``seconds_per_node`` is recomputed).
        name: The profile's name.
        where: The machine, runtime and date, for the description.
        threads: The intra-op threads the probes were timed with (None: onnxruntime's default).
        block: The channel block of onnxruntime's blocked conv layout on the machine (``nchwc_block``; 0:
            none): the float grids' rates are per FLOP of the channels padded to it, as the estimate counts.
    """
    derived = derive_figures(figures, block)
    kernels = derived["kernels"]
    bandwidth, node_overhead = derived["bandwidth"], derived["node_overhead_s"]
    description = (
        f"measured by nnopt calibrate on {where}: dense 3x3 conv {kernels['conv'].flops / 1e9:.1f} GFLOP/s, "
        f"Add {bandwidth / 1e9:.1f} GB/s, {node_overhead * 1e6:.2f} us per node"
    )  # fmt: skip
    cache = machine_cache_bytes()  # the energy estimate's on-chip size: this machine's last-level cache
    if cache is not None:
        description += f", {cache >> 10} KiB last-level cache"
    return HardwareProfile(
        name=name,
        peak_flops=kernels["conv"].flops,
        bandwidth=bandwidth,
        description=description,
        node_overhead_s=node_overhead,
        run_overhead_s=derived["run_overhead_s"],
        kernels=kernels,
        runtime="onnxruntime",
        bandwidth_grid=derived["bandwidth_grid"],
        energy=EnergyFigures(cache_bytes=cache) if cache is not None else DEFAULT_ENERGY,
        threads=threads,
        nchwc_block=block,
    )


#: Which run of a round a probe keeps: the fastest. Other jobs on shared cores only ever add time, and on a
#: busy machine the median of a round is half disturbed runs (it halved the dense conv rate here once, the
#: fastest run kept it within 10 %); on an idle one the two differ by a few percent.
_STATISTIC = "min_s"


def _time_probes(
    probes: dict[str, _Probe], runs: int, rounds: int, before_each: Callable[[], None] | None = None
) -> dict[str, float]:
    """Time every probe ``rounds`` times, interleaved, keeping each probe's fastest run over all rounds in
    its ``seconds``; returns per probe the median ÷ fastest run of the round kept."""
    from nnopt.cost.timing import measure_latency

    spread: dict[str, float] = {}
    for _ in range(rounds):
        for probe in probes.values():
            if before_each is not None:
                before_each()
            timing = measure_latency(probe.model, runs=runs, warmup=3)
            fastest, median = float(timing[_STATISTIC]), float(timing["median_s"])
            if fastest < probe.seconds:
                probe.seconds = fastest
                spread[probe.name] = median / max(float(timing["min_s"]), 1e-12)
    return spread


def _probe_figures(probes: dict[str, _Probe]) -> dict[str, dict[str, Any]]:
    """Per probe its chain length, FLOPs and bytes per node (from the cost analysis) and seconds."""
    from nnopt.cost.analysis import analyze

    figures: dict[str, dict[str, Any]] = {}
    for key, probe in probes.items():
        # The chained node itself (an int8 chain's unit also holds its boundary Quantize/DequantizeLinear).
        nodes = analyze(probe.unit, run_onnxruntime=False).nodes
        unit = next(n for n in nodes if n["op_type"] == probe.op_type)
        figures[key] = {
            "nodes": probe.length,
            "flops_per_node": unit["flops"],
            "bytes_per_node": unit["bytes_moved"],
            "seconds": probe.seconds,
            "output_shape": unit["output_shapes"][0],
        }
        if probe.per_element != 1:
            figures[key]["per_element"] = probe.per_element
        if probe.helper is not None:
            helper = next(n for n in nodes if n["op_type"] == probe.helper)
            figures[key].update(helper_flops_per_node=helper["flops"], helper_bytes_per_node=helper["bytes_moved"],
                                helper_kernel=probe.helper_kernel or _HELPER_KERNEL.get(probe.helper, "other"))  # fmt: skip
    return figures


def _roofline(probe: dict[str, Any], rate: float, bandwidth: float) -> float:
    return max(probe["flops_per_node"] / rate, probe["bytes_per_node"] / bandwidth)


#: The kernel class each probe's helper node is estimated as (others: ``other``, at the dense rate).
_HELPER_KERNEL = {"DequantizeLinear": "quantize"}


def _helper_time(
    probe: dict[str, Any], peak: float, bandwidth: float, node_overhead: float, kernels: dict[str, KernelFigures]
) -> float:
    """Seconds of the helper node beside each chained node (0 without one), at its class's figures as far
    as they are derived (``peak`` and no overhead before)."""
    if "helper_flops_per_node" not in probe:
        return 0.0
    figures = kernels.get(probe.get("helper_kernel", "other"), KernelFigures())
    rate = figures.flops or peak
    work = max(probe["helper_flops_per_node"] / rate, probe["helper_bytes_per_node"] / bandwidth)
    return node_overhead + figures.overhead_s + work


def _kernel_figures(
    large: dict[str, Any], tiny: dict[str, Any], bandwidth: float, node_overhead: float
) -> KernelFigures:
    """A kernel class's rate and overhead from its large and tiny probes' ``seconds_per_node``."""
    large_s, tiny_s = large["seconds_per_node"], tiny["seconds_per_node"]
    # large_s - tiny_s = F_large / rate - max(F_tiny / rate, bytes_tiny / bandwidth): solve with the tiny
    # node compute-bound, else memory-bound.
    gap = large_s - tiny_s
    rate = (large["flops_per_node"] - tiny["flops_per_node"]) / gap if gap > 0 else math.nan
    if not rate > 0 or tiny["flops_per_node"] / rate < tiny["bytes_per_node"] / bandwidth:
        memory = tiny["bytes_per_node"] / bandwidth
        rate = large["flops_per_node"] / (gap + memory if gap + memory > 0 else large_s)
    if not (math.isfinite(rate) and rate > 0):  # noise left nothing to solve: the large node's own rate
        rate = large["flops_per_node"] / max(large_s, 1e-9)
    overhead = max(0.0, tiny_s - node_overhead - _roofline(tiny, rate, bandwidth))
    return KernelFigures(flops=rate, overhead_s=overhead)


#: The least share of a large probe's per-node time bound its slope may be (see ``derive_figures``).
_PLAUSIBLE_SLOPE = 0.6
#: How often :func:`derive_figures` re-solves: the tiny probes' own roofline time depends on the figures
#: being derived; it is a small correction, so a few rounds settle it to machine precision.
_DERIVE_ROUNDS = 5


def _slope(figures: dict[str, dict[str, Any]], short: str, long: str) -> float:
    """Seconds per node: the slope between two chains (the long chain's time per node if noise made the
    slope useless)."""
    a, b = figures[short], figures[long]
    slope = (b["seconds"] - a["seconds"]) / (b["nodes"] - a["nodes"])
    return slope if slope > 0 else b["seconds"] / b["nodes"]


def _large_per_node(
    figures: dict[str, dict[str, Any]], short: str, long: str, run_overhead: float, tiny: float
) -> float:
    """Seconds per node of a large probe: the slope between its chains, unless noise made it implausible.

    Each chain's time per node (the run overhead taken off) is an upper bound, since the chain's ends
    and other load only add time. A slope below 60 % of the least bound would give the chain's ends
    more than 40 % of a long chain: the short chain was disturbed (on a busy machine that once put a
    dense conv at 2.4 × the FP32 peak), and the bound is kept instead. Never below the tiny node.
    """
    slope = _slope(figures, short, long)
    bound = min((figures[k]["seconds"] - run_overhead) / figures[k]["nodes"] for k in (short, long))
    return max(min(slope, bound) if slope >= _PLAUSIBLE_SLOPE * bound else bound, tiny * (1 + 1e-6))


def derive_figures(figures: dict[str, dict[str, Any]], block: int = 0) -> dict[str, Any]:
    """The profile's figures from the probes' timings (see the module docstring).

    Exact for a machine that behaves as the estimate models it: each chain takes ``run_overhead_s`` plus,
    per node, ``node_overhead_s`` + the kernel's overhead + max(FLOPs ÷ rate, bytes ÷ bandwidth) (and
    the same for a helper node beside it, which runs at ``peak_flops``), the large Add being memory-bound
    and the large convs compute-bound.

    Args:
        figures: Per probe name (see ``_probes``): ``nodes`` (chain length), ``flops_per_node``,
            ``bytes_per_node``, measured ``seconds``, and ``helper_flops_per_node``/``helper_bytes_per_node``
            when each element has a helper node. ``seconds_per_node`` is added to the conv probes: the
            time of one chained node, its helper's time taken off.
        block: The channel block of onnxruntime's blocked conv layout (0: none), for the float grids
            (``_rate_grid``).

    Returns:
        ``node_overhead_s``, ``run_overhead_s``, ``bandwidth``, and ``kernels`` (KernelFigures per class).
    """
    add_short, add_large = figures["add_short"], figures["add_large"]
    add_large_element = _slope(figures, "add_large_1", "add_large")
    add_slope = _slope(figures, "add_short", "add_long")
    tiny_slopes = {kernel: _slope(figures, f"{kernel}_tiny_1", f"{kernel}_tiny") for kernel in CALIBRATED_KERNELS}

    peak = bandwidth = math.inf
    kernels: dict[str, KernelFigures] = {}
    for _ in range(_DERIVE_ROUNDS):
        tiny_add = _roofline(add_short, peak, bandwidth)
        node_overhead = max(0.0, add_slope - tiny_add)
        run_overhead = max(0.0, add_short["seconds"] - add_short["nodes"] * (node_overhead + tiny_add))
        add_time = _large_per_node(figures, "add_large_1", "add_large", run_overhead, add_slope) - node_overhead
        bandwidth = add_large["bytes_per_node"] / (add_time if add_time > 0 else add_large_element)
        for kernel, tiny_element in tiny_slopes.items():
            large_element = _large_per_node(figures, f"{kernel}_large_1", f"{kernel}_large", run_overhead, tiny_element)
            large, tiny = figures[f"{kernel}_large"], figures[f"{kernel}_tiny"]
            for probe, element in ((large, large_element), (tiny, tiny_element)):
                helper = _helper_time(probe, peak, bandwidth, node_overhead, kernels)
                probe["seconds_per_node"] = (element - helper) / probe.get("per_element", 1)
            kernels[kernel] = _kernel_figures(large, tiny, bandwidth, node_overhead)
        peak = kernels["conv"].flops  # type: ignore[assignment]
    kernels[EPILOGUE_KERNEL] = _epilogue_figures(figures, run_overhead, tiny_slopes["pointwise"])
    bandwidth_grid = _bandwidth_grid(figures, node_overhead, add_large["bytes_per_node"], bandwidth)
    for kernel in GRID_KERNELS:
        grid = _rate_grid(figures, kernel, (node_overhead, run_overhead, bandwidth, peak), kernels, bandwidth_grid,
                          block)
        if grid:
            kernels[kernel] = replace(kernels[kernel], grid=grid)
    return {
        "node_overhead_s": node_overhead,
        "run_overhead_s": run_overhead,
        "bandwidth": bandwidth,
        "kernels": kernels,
        "bandwidth_grid": bandwidth_grid,
    }


def _epilogue_figures(figures: dict[str, dict[str, Any]], run_overhead: float, tiny: float) -> KernelFigures:
    """The rate of an activation fused into a conv: the large 1×1 conv's time per node with a Sigmoid fused
    in, less its time without, per element (one FLOP each). No rate (it costs nothing) if noise left the
    chain with the Sigmoid no slower."""
    fused = _large_per_node(figures, f"{EPILOGUE_KERNEL}_large_1", f"{EPILOGUE_KERNEL}_large", run_overhead, tiny)
    plain = _large_per_node(figures, "pointwise_large_1", "pointwise_large", run_overhead, tiny)
    extra = fused - plain
    return KernelFigures(flops=figures[f"{EPILOGUE_KERNEL}_large"]["flops_per_node"] / extra if extra > 0 else None)


#: The kernel classes whose rate is interpolated in a grid of probes (``ProbeSizes.conv_grid``...): dense
#: convs run at 40-250 GFLOP/s here depending on their GEMM's shape, int8 ones too, and both far slower with
#: few input channels (``narrow_grid``); LSTMs by their hidden size; 1-D convs by their length.
GRID_KERNELS = ("conv", "pointwise", "grouped_conv", "int8", "int8_pointwise", "recurrent", "unblocked_conv", "conv1d")


def _chain_pairs(figures: dict[str, dict[str, Any]], prefix: str) -> list[tuple[str, str]]:
    """The (one-node, chain) probe names that start with ``prefix`` (``<prefix><label>_1`` and ``<prefix><label>``)."""
    return [(f"{name}_1", name) for name in figures if name.startswith(prefix) and f"{name}_1" in figures]


def _rate_grid(
    figures: dict[str, dict[str, Any]],
    kernel: str,
    machine: tuple[float, float, float, float],
    kernels: dict[str, KernelFigures],
    bandwidth_grid: tuple[tuple[float, float], ...],
    block: int = 0,
) -> tuple[RatePoint, ...]:
    """The grid of ``kernel``: per grid probe, the rate its time per node (``_large_per_node``: the slope, unless
    noise made it implausible) gives once the node's and the class's fixed costs, and a helper node's time
    (``_helper_time``), are taken off. Points that ran memory-bound say nothing of the rate, and points whose
    noise leaves no time, are dropped.

    Args:
        machine: ``(node_overhead_s, run_overhead_s, bandwidth, peak_flops)`` as derived.
        kernels: The classes' figures as derived (``kernels[kernel]`` gives the class overhead).
        bandwidth_grid: As derived: a helper node's bytes move at the bandwidth interpolated at their size,
            as the estimate has them.
        block: onnxruntime's channel block (0: none). A float blocked conv computes its channels padded to
            it (``nnopt.cost.layout.padded_work``): an 8-channel probe does the work of 16, so its rate is
            per FLOP of the padded channels, which the estimate multiplies back in. ``conv1d``'s rates are
            likewise per FLOP of its steps padded to the GEMM's column strips (``step_padding``).
    """
    node_overhead, run_overhead, bandwidth, peak = machine
    base = kernels[kernel]
    points = []
    # "grid_int8_" also begins the names of int8_pointwise's probes: a longer class name's probes are its own.
    others = tuple(f"grid_{k}_" for k in GRID_KERNELS if k != kernel and k.startswith(kernel))
    for short, long in _chain_pairs(figures, f"grid_{kernel}_"):
        if others and long.startswith(others):
            continue
        probe = figures[long]
        element = _large_per_node(figures, short, long, run_overhead, 0.0)
        helper_bandwidth = interpolate_bandwidth(bandwidth_grid, probe.get("helper_bytes_per_node", 0.0))
        helper = _helper_time(probe, peak, helper_bandwidth, node_overhead, kernels)
        per_node = (element - helper) / probe.get("per_element", 1)
        compute = per_node - node_overhead - base.overhead_s
        shape = probe["output_shape"]
        if compute > probe["bytes_per_node"] / bandwidth * (1 + 1e-6) and shape:
            probe["seconds_per_node"] = compute + node_overhead + base.overhead_s
            outputs, spatial = math.prod(shape), math.prod(shape[2:])
            flops = probe["flops_per_node"]
            reduction = flops / (2 * outputs)
            taps = _BLOCKED_GRID_TAPS.get(kernel)
            if kernel == "conv1d":
                padded = step_padding(shape[-1])
            else:
                padded = channel_padding(shape[1], round(reduction / taps), block) if taps else 1.0
            channels = shape[1] if kernel in CHANNEL_GRID_KERNELS else 0.0
            points.append(RatePoint(reduction=reduction, spatial=spatial, flops=flops * padded / compute,
                                    channels=channels))
    return tuple(sorted(points, key=lambda p: (p.reduction, p.spatial, p.channels)))


#: The grid classes onnxruntime runs in its blocked layout, and their probes' kernel positions (input channels
#: = reduction ÷ taps).
_BLOCKED_GRID_TAPS = {"conv": 9, "pointwise": 1}


def _bandwidth_grid(
    figures: dict[str, dict[str, Any]], node_overhead: float, large_bytes: float, large_bandwidth: float
) -> tuple[tuple[float, float], ...]:
    """``(bytes, bytes/s)`` per Add chain of the bandwidth grid, and the large Add's: what one Add moves ÷ its
    time beyond node overhead."""
    points = {large_bytes: large_bandwidth}
    for short, long in _chain_pairs(figures, "grid_add_"):
        # The plain slope: these Adds take a fraction of a microsecond, so a one-node chain's time is mostly
        # run overhead and bounds nothing (``_large_per_node`` is for nodes far longer than that).
        moved = _slope(figures, short, long) - node_overhead
        if moved > 0:
            points[figures[long]["bytes_per_node"]] = figures[long]["bytes_per_node"] / moved
    return tuple(sorted(points.items()))


def _probes(sizes: ProbeSizes, rng: np.random.Generator) -> dict[str, _Probe]:
    """Every probe of :func:`calibrate`, by name."""
    probes: dict[str, _Probe] = {}
    tiny = [1, sizes.tiny_elements]
    for name, length in (("add_short", sizes.short_chain), ("add_long", sizes.long_chain)):
        probes[name] = _Probe(name, "Add", _add_chain(length, tiny), _add_chain(1, tiny), length)
    large = [sizes.large_elements]
    probes["add_large_1"] = _Probe("add_large_1", "Add", _add_chain(1, large), _add_chain(1, large), 1)
    probes["add_large"] = _Probe("add_large", "Add", _add_chain(3, large), _add_chain(1, large), 3)
    for kind in CALIBRATED_KERNELS:
        build, op_type, helper_op, per_element = _PROBE_BUILDERS.get(kind, (_conv_chain, "Conv", None, 1))
        if kind == "dynamic_weight":
            helper_op = "DequantizeLinear"
        for name, large_probe, length in (
            (f"{kind}_large_1", True, 1),
            (f"{kind}_large", True, 3),
            (f"{kind}_tiny_1", False, 1),
            (f"{kind}_tiny", False, 1 + sizes.tiny_convs),
        ):
            model = build(length, kind, sizes, large_probe, rng)
            unit = build(1, kind, sizes, large_probe, rng)
            probes[name] = _Probe(name, op_type, model, unit, length, helper_op, per_element=per_element)
    # The large 1×1 conv again, a Sigmoid fused into each: what the activation adds (``_epilogue_figures``).
    for name, length in ((f"{EPILOGUE_KERNEL}_large_1", 1), (f"{EPILOGUE_KERNEL}_large", 3)):
        model, unit = (_convs(n, sizes.pointwise_channels, sizes.pointwise_size, "pointwise", rng, "Sigmoid")
                       for n in (length, 1))
        probes[name] = _Probe(name, "Sigmoid", model, unit, length)
    probes.update(_grid_probes(sizes, rng))
    probes.update(_recurrent_grid_probes(sizes, rng))
    return probes


def _grid_probes(sizes: ProbeSizes, rng: np.random.Generator) -> dict[str, _Probe]:
    """The probes of the grids: per (channels, size) of ``conv_grid``/``pointwise_grid`` a chain of 1 and of 3
    convs; per ``bandwidth_elements`` a chain of 1 Add and a longer one (short Adds need more nodes for a
    slope above the timer's noise)."""
    probes: dict[str, _Probe] = {}
    unblocked = ((sizes.unblocked_channels, sizes.conv_size),)  # the large probe's shape: one more point
    for kind, grid in (("conv", sizes.conv_grid), ("pointwise", sizes.pointwise_grid), ("int8", sizes.conv_grid),
                       ("int8_pointwise", sizes.pointwise_grid), ("conv1d", sizes.conv1d_grid),
                       ("unblocked_conv", unblocked)):
        for channels, size in grid:
            for length, suffix in ((1, "_1"), (3, "")):
                name = f"grid_{kind}_{channels}x{size}{suffix}"
                model, unit = _convs(length, channels, size, kind, rng), _convs(1, channels, size, kind, rng)
                probes[name] = _Probe(name, "Conv", model, unit, length)
    for kind in ("conv", "int8"):
        for c_in, c_out, size in sizes.narrow_grid:
            for length, suffix in ((1, "_1"), (3, "")):
                name = f"grid_{kind}_{c_in}to{c_out}x{size}{suffix}"
                int8 = kind == "int8"
                model = _narrow_chain(length, c_in, c_out, size, int8, rng)
                unit = _narrow_chain(2, c_in, c_out, size, int8, rng)  # one conv's and one Add's figures
                # onnxruntime fuses a float Add into the Conv before it (its NCHWc kernel's sum input): only
                # the int8 chain has Adds of its own (QLinearAdd).
                probes[name] = _Probe(name, "Conv", model, unit, length, helper="Add" if int8 else None,
                                      helper_kernel="int8_elementwise" if int8 else None)
    for channels, size in sizes.grouped_grid:
        for length, suffix in ((1, "_1"), (3, "")):
            name = f"grid_grouped_conv_{channels}x{size}{suffix}"
            model = _grouped_pairs(length, channels, sizes.grouped_multiplier, size, rng)
            unit = _grouped_pairs(1, channels, sizes.grouped_multiplier, size, rng)
            probes[name] = _Probe(name, "Conv", model, unit, length, per_element=2)
    for elements in sizes.bandwidth_elements:
        long = min(max(3, sizes.large_elements // elements), 33)
        for length, suffix in ((1, "_1"), (long, "")):
            name = f"grid_add_{elements}{suffix}"
            probes[name] = _Probe(name, "Add", _add_chain(length, [1, elements]), _add_chain(1, [1, elements]), length)
    return probes


def _recurrent_grid_probes(sizes: ProbeSizes, rng: np.random.Generator) -> dict[str, _Probe]:
    """The ``recurrent`` grid: per (hidden, steps) of ``recurrent_grid`` a chain of 1 and of 3 LSTMs. An LSTM's
    output [steps, 1, 1, hidden] puts it in the grid at 4·(input + hidden) multiply-adds per output (the
    reduction) and ``hidden`` outputs per step (the spatial size), like any node the estimate looks up."""
    probes: dict[str, _Probe] = {}
    for hidden, steps in sizes.recurrent_grid:
        for length, suffix in ((1, "_1"), (3, "")):
            name = f"grid_recurrent_{hidden}x{steps}{suffix}"
            model, unit = _lstms(length, hidden, steps, rng), _lstms(1, hidden, steps, rng)
            probes[name] = _Probe(name, "LSTM", model, unit, length, helper="Squeeze")
    return probes


def _model(
    nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], output: str, initializers: list[onnx.TensorProto]
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "nnopt-calibration",
        inputs,
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)], ir_version=_IR_VERSION)


def _add_chain(length: int, shape: list[int]) -> onnx.ModelProto:
    """``y = (((a + b) + b) + b)...``: ``length`` Adds; ``b`` is an input, so nothing is constant-folded."""
    nodes = [helper.make_node("Add", ["a" if i == 0 else f"t{i - 1}", "b"], [f"t{i}"]) for i in range(length)]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("a", "b")]
    return _model(nodes, inputs, f"t{length - 1}", [])


def _conv_chain(length: int, kind: str, sizes: ProbeSizes, large: bool, rng: np.random.Generator) -> onnx.ModelProto:
    """``length`` convs of the probe sizes of ``kind`` (large or tiny), one after the other (see ``_convs``)."""
    channels, size, tiny_channels = {
        "depthwise": (sizes.depthwise_channels, sizes.depthwise_size, sizes.tiny_channels),
        "int8_depthwise": (sizes.depthwise_channels, sizes.depthwise_size, sizes.tiny_channels),
        "unblocked_conv": (sizes.unblocked_channels, sizes.conv_size, sizes.unblocked_tiny_channels),
        "conv1d": (sizes.conv1d_channels, sizes.conv1d_steps, sizes.tiny_channels),
        "pointwise": (sizes.pointwise_channels, sizes.pointwise_size, sizes.tiny_channels),
        "int8_pointwise": (sizes.pointwise_channels, sizes.pointwise_size, sizes.tiny_channels),
    }.get(kind, (sizes.conv_channels, sizes.conv_size, sizes.tiny_channels))
    tiny_size = sizes.conv1d_tiny_steps if kind == "conv1d" else sizes.tiny_size
    return _convs(length, channels if large else tiny_channels, size if large else tiny_size, kind, rng)


def _convs(length: int, channels: int, size: int, kind: str, rng: np.random.Generator,
           activation: str | None = None) -> onnx.ModelProto:
    """``length`` convs (1×1 for ``pointwise``, else 3×3), channels → channels on size × size (padded), one
    after the other.

    ``kind``: ``conv`` and ``unblocked_conv`` (dense, constant weights; which one is the channel count's
    doing), ``conv1d`` (the same in 1-D: over ``size`` steps), ``depthwise`` (group = channels), ``dynamic_weight``
    (each weight a DequantizeLinear of an int8 constant, as the quantize pass's weight-only mode writes
    it: onnxruntime runs it at every inference) or ``int8`` (uint8 activations and per-channel int8
    weights in QDQ form, as the quantize pass's static mode writes it: onnxruntime fuses each conv into a
    QLinearConv). Weights are N(0, 1 / fan-in), so activations keep their scale along the chain: a
    shrinking chain would reach denormal floats, which are many times slower and would spoil the timing.
    ``activation``: an op after each float conv (onnxruntime fuses it into the conv).
    """
    group = {"depthwise": channels, "int8_depthwise": channels}.get(kind, 1)
    dims = 1 if kind == "conv1d" else 2
    k = 1 if kind in ("pointwise", "int8_pointwise") else 3
    fan_in = k**dims * (channels // group)
    int8 = kind in ("int8", "int8_depthwise", "int8_pointwise")
    quantized_weight = int8 or kind == "dynamic_weight"
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    current = "x"
    if int8:
        inits += _activation_qparams()
        nodes.append(helper.make_node("QuantizeLinear", ["x", "act_scale", "act_zero"], ["q_in"]))
        current = "q_in"
    for i in range(length):
        weight = (rng.standard_normal((channels, channels // group, *[k] * dims)) / math.sqrt(fan_in)).astype(np.float32)
        if quantized_weight:
            scale = np.maximum(np.abs(weight).reshape(channels, -1).max(axis=1), 1e-6) / 127
            inits += [
                numpy_helper.from_array(np.round(weight / scale[:, None, None, None]).astype(np.int8), f"wq{i}"),
                numpy_helper.from_array(scale.astype(np.float32), f"ws{i}"),
                numpy_helper.from_array(np.zeros(channels, np.int8), f"wz{i}"),
            ]
            nodes.append(helper.make_node("DequantizeLinear", [f"wq{i}", f"ws{i}", f"wz{i}"], [f"w{i}"], axis=0))
        else:
            inits.append(numpy_helper.from_array(weight, f"w{i}"))
        pads = [k // 2] * 2 * dims
        if int8:
            nodes += [
                helper.make_node("DequantizeLinear", [current, "act_scale", "act_zero"], [f"a{i}"]),
                helper.make_node("Conv", [f"a{i}", f"w{i}"], [f"c{i}"], pads=pads, group=group),
                helper.make_node("QuantizeLinear", [f"c{i}", "act_scale", "act_zero"], [f"q{i}"]),
            ]
            current = f"q{i}"
        else:
            nodes.append(helper.make_node("Conv", [current, f"w{i}"], [f"c{i}"], pads=pads, group=group))
            current = f"c{i}"
            if activation is not None:
                nodes.append(helper.make_node(activation, [current], [f"act{i}"]))
                current = f"act{i}"
    if int8:
        nodes.append(helper.make_node("DequantizeLinear", [current, "act_scale", "act_zero"], ["y"]))
        current = "y"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, *[size] * dims])
    return _model(nodes, [x], current, inits)


def _narrow_chain(length: int, c_in: int, c_out: int, size: int, int8: bool, rng: np.random.Generator) -> onnx.ModelProto:
    """``length`` 3×3 convs ``c_in`` → ``c_out`` on size × size (padded), all reading the input, their outputs
    summed by a chain of ``length - 1`` Adds. Convs with few input channels cannot follow one another, and
    parallel convs with an output each would each return it (a copy, and in int8 a reorder out of onnxruntime's
    NHWC layout, larger than the conv); summed, the layout stays onnxruntime's from input to output as in a
    network. In int8 each Add is the element's helper node (a QLinearAdd), costed as ``int8_elementwise`` and
    taken off; in float onnxruntime fuses it into the Conv before it (the NCHWc kernel's sum input), as it does
    a network's residual Adds. ``int8``: in QDQ form, as ``_convs`` writes it."""
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    source = "x"
    if int8:
        inits += _activation_qparams()
        nodes += [helper.make_node("QuantizeLinear", ["x", "act_scale", "act_zero"], ["q_in"]),
                  helper.make_node("DequantizeLinear", ["q_in", "act_scale", "act_zero"], ["a_in"])]  # fmt: skip
        source = "a_in"

    def requantized(name: str) -> str:  # an int8 tensor between two int8 kernels: Q → DQ
        if not int8:
            return name
        nodes.extend([helper.make_node("QuantizeLinear", [name, "act_scale", "act_zero"], [f"{name}_q"]),
                      helper.make_node("DequantizeLinear", [f"{name}_q", "act_scale", "act_zero"], [f"{name}_d"])])
        return f"{name}_d"

    total = ""
    for i in range(length):
        weight = (rng.standard_normal((c_out, c_in, 3, 3)) / math.sqrt(9 * c_in)).astype(np.float32)
        if int8:
            tensors, dequantize = _int8_weight(f"w{i}", weight, axis=0)
            inits += tensors
            nodes.append(dequantize)
        else:
            inits.append(numpy_helper.from_array(weight, f"w{i}"))
        nodes.append(helper.make_node("Conv", [source, f"w{i}"], [f"c{i}"], pads=[1] * 4))
        conv = requantized(f"c{i}")
        if i:
            nodes.append(helper.make_node("Add", [total, conv], [f"t{i}"]))
            conv = requantized(f"t{i}")
        total = conv
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, size, size])
    return _model(nodes, [x], total, inits)


def _activation_qparams() -> list[onnx.TensorProto]:
    """The uint8 activation scale and zero point every int8 probe uses (what the quantize pass writes)."""
    return [
        numpy_helper.from_array(np.array(0.05, np.float32), "act_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "act_zero"),
    ]


def _int8_weight(name: str, weight: np.ndarray, axis: int) -> tuple[list[onnx.TensorProto], onnx.NodeProto]:
    """A per-channel (along ``axis``) symmetric int8 weight and the DequantizeLinear that reads it."""
    moved = np.moveaxis(weight, axis, 0)
    scale = np.maximum(np.abs(moved).reshape(moved.shape[0], -1).max(axis=1), 1e-6) / 127
    shape = [1] * weight.ndim
    shape[axis] = -1
    quantized = np.round(weight / scale.reshape(shape)).astype(np.int8)
    inits = [
        numpy_helper.from_array(quantized, f"{name}_q"),
        numpy_helper.from_array(scale.astype(np.float32), f"{name}_s"),
        numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{name}_z"),
    ]
    return inits, helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [name], axis=axis)


def _qdq_chain(
    length: int, shape: list[int], element: Any, inits: list[onnx.TensorProto]
) -> onnx.ModelProto:
    """x ─Q─ (DQ ─ op ─ Q) × length ─ DQ ─ y: ``element(i, dq_output)`` returns the op's nodes and output."""
    inits = [*_activation_qparams(), *inits]
    nodes = [helper.make_node("QuantizeLinear", ["x", "act_scale", "act_zero"], ["q_in"])]
    current = "q_in"
    for i in range(length):
        nodes.append(helper.make_node("DequantizeLinear", [current, "act_scale", "act_zero"], [f"a{i}"]))
        body, out = element(i, f"a{i}")
        nodes += [*body, helper.make_node("QuantizeLinear", [out, "act_scale", "act_zero"], [f"q{i}"])]
        current = f"q{i}"
    nodes.append(helper.make_node("DequantizeLinear", [current, "act_scale", "act_zero"], ["y"]))
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)], "y", inits)


def _matmul_chain(length: int, kind: str, sizes: ProbeSizes, large: bool, rng: np.random.Generator) -> onnx.ModelProto:
    """``int8_matmul``: QDQ MatMuls [1, tokens, features] × [features, features] (onnxruntime: QLinearMatMul)."""
    features, tokens = (sizes.matmul_features, sizes.matmul_tokens) if large else (sizes.tiny_features, sizes.tiny_tokens)
    inits: list[onnx.TensorProto] = []
    dequantize: list[onnx.NodeProto] = []
    for i in range(length):
        weight = (rng.standard_normal((features, features)) / math.sqrt(features)).astype(np.float32)
        tensors, node = _int8_weight(f"w{i}", weight, axis=1)
        inits += tensors
        dequantize.append(node)

    def element(i: int, a: str) -> tuple[list[onnx.NodeProto], str]:
        return [dequantize[i], helper.make_node("MatMul", [a, f"w{i}"], [f"m{i}"])], f"m{i}"

    return _qdq_chain(length, [1, tokens, features], element, inits)


def _add_qdq_chain(length: int, kind: str, sizes: ProbeSizes, large: bool, rng: np.random.Generator) -> onnx.ModelProto:
    """``int8_elementwise``: QDQ Adds of the activation and a quantized constant (onnxruntime: QLinearAdd)."""
    shape = list(sizes.elementwise_shape) if large else [1, sizes.tiny_elements]
    # uint8 like the activation: onnxruntime fuses a QDQ Add only when both inputs have the same type.
    values = np.round(rng.uniform(108, 148, shape)).astype(np.uint8)
    inits = [numpy_helper.from_array(values, "b_q"), numpy_helper.from_array(np.array(0.01, np.float32), "b_s"),
             numpy_helper.from_array(np.array(128, np.uint8), "b_z")]  # fmt: skip
    inits_nodes = helper.make_node("DequantizeLinear", ["b_q", "b_s", "b_z"], ["b"])

    def element(i: int, a: str) -> tuple[list[onnx.NodeProto], str]:
        return ([inits_nodes] if i == 0 else []) + [helper.make_node("Add", [a, "b"], [f"s{i}"])], f"s{i}"

    return _qdq_chain(length, shape, element, inits)


def _quantize_chain(length: int, kind: str, sizes: ProbeSizes, large: bool, rng: np.random.Generator) -> onnx.ModelProto:
    """``quantize``: (QuantizeLinear → DequantizeLinear → Neg) × length: a float op without an int8 kernel between
    quantized boundaries, so onnxruntime runs every Quantize/DequantizeLinear as a node."""
    shape = list(sizes.elementwise_shape) if large else [1, sizes.tiny_elements]
    nodes: list[onnx.NodeProto] = []
    current = "x"
    for i in range(length):
        nodes += [
            helper.make_node("QuantizeLinear", [current, "act_scale", "act_zero"], [f"q{i}"]),
            helper.make_node("DequantizeLinear", [f"q{i}", "act_scale", "act_zero"], [f"d{i}"]),
            helper.make_node("Neg", [f"d{i}"], [f"n{i}"]),
        ]
        current = f"n{i}"
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)], current, _activation_qparams())


def _grouped_chain(length: int, kind: str, sizes: ProbeSizes, large: bool, rng: np.random.Generator) -> onnx.ModelProto:
    """``grouped_conv``: ``length`` pairs of 3×3 grouped convs shaped like conv-to-separable's first half: C → m·C
    channels with group C (one input channel and m outputs per group), then back m·C → C with group C (m
    inputs and one output per group, the same FLOPs) so that the chain can go on."""
    channels, multiplier, size = ((sizes.grouped_channels, sizes.grouped_multiplier, sizes.grouped_size) if large
                                  else (sizes.tiny_channels, 2, sizes.tiny_size))  # fmt: skip
    return _grouped_pairs(length, channels, multiplier, size, rng)


def _grouped_pairs(length: int, channels: int, multiplier: int, size: int, rng: np.random.Generator) -> onnx.ModelProto:
    """See ``_grouped_chain``: ``length`` pairs, C = ``channels``, m = ``multiplier``, on ``size`` × ``size``."""
    wide = channels * multiplier
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    current = "x"
    for i in range(length):
        for j, (c_out, c_per_group) in enumerate(((wide, 1), (channels, multiplier))):
            weight = rng.standard_normal((c_out, c_per_group, 3, 3)) / math.sqrt(9 * c_per_group)
            inits.append(numpy_helper.from_array(weight.astype(np.float32), f"w{i}_{j}"))
            nodes.append(helper.make_node("Conv", [current, f"w{i}_{j}"], [f"c{i}_{j}"], pads=[1] * 4, group=channels))
            current = f"c{i}_{j}"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, size, size])
    return _model(nodes, [x], current, inits)


def _recurrent_chain(length: int, kind: str, sizes: ProbeSizes, large: bool, rng: np.random.Generator) -> onnx.ModelProto:
    """``recurrent``: LSTMs of the probe sizes (large, or ``tiny_features`` hidden over one step), see ``_lstms``."""
    hidden, steps = (sizes.recurrent_hidden, sizes.recurrent_steps) if large else (sizes.tiny_features, 1)
    return _lstms(length, hidden, steps, rng)


def _lstms(length: int, hidden: int, steps: int, rng: np.random.Generator) -> onnx.ModelProto:
    """``length`` forward LSTMs of ``hidden`` units (input size the same) over ``steps`` steps, each output
    [steps, 1, 1, hidden] squeezed to the next one's input [steps, 1, hidden] (the Squeeze is the probe's
    helper node). Weights N(0, 1 / hidden) keep the gates away from saturation and the states from denormals."""
    nodes: list[onnx.NodeProto] = []
    inits = [numpy_helper.from_array(np.array([1], np.int64), "axes")]
    current = "x"
    for i in range(length):
        for kind in ("w", "r"):
            weight = rng.standard_normal((1, 4 * hidden, hidden)) / math.sqrt(hidden)
            inits.append(numpy_helper.from_array(weight.astype(np.float32), f"{kind}{i}"))
        nodes += [
            helper.make_node("LSTM", [current, f"w{i}", f"r{i}"], [f"y{i}"], hidden_size=hidden),
            helper.make_node("Squeeze", [f"y{i}", "axes"], [f"s{i}"]),
        ]
        current = f"s{i}"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [steps, 1, hidden])
    return _model(nodes, [x], current, inits)


def _elementwise_chain(length: int, kind: str, sizes: ProbeSizes, large: bool, rng: np.random.Generator) -> onnx.ModelProto:
    """``divide``: Divs by a scalar constant (as a decomposed HardSwish divides by 6; by 1.25 here, so that 33 of
    them keep the values normal floats); ``activation``: Sigmoids. On ``math_shape`` or [1, tiny_elements]."""
    shape = list(sizes.math_shape) if large else [1, sizes.tiny_elements]
    inits = [numpy_helper.from_array(np.array(1.25, np.float32), "d")]
    nodes: list[onnx.NodeProto] = []
    current = "x"
    for i in range(length):
        inputs = [current, "d"] if kind == "divide" else [current]
        nodes.append(helper.make_node("Div" if kind == "divide" else "Sigmoid", inputs, [f"e{i}"]))
        current = f"e{i}"
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)], current, inits)


#: Per kernel class whose probe is not a conv chain: its builder, the probed op, the helper op beside each
#: element (None: none) and how many probed nodes each element has.
_PROBE_BUILDERS: dict[str, tuple[Any, str, str | None, int]] = {
    "grouped_conv": (_grouped_chain, "Conv", None, 2),
    "int8_matmul": (_matmul_chain, "MatMul", None, 1),
    "int8_elementwise": (_add_qdq_chain, "Add", None, 1),
    "quantize": (_quantize_chain, "QuantizeLinear", "Neg", 2),
    "recurrent": (_recurrent_chain, "LSTM", "Squeeze", 1),
    "divide": (_elementwise_chain, "Div", None, 1),
    "activation": (_elementwise_chain, "Sigmoid", None, 1),
}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"
