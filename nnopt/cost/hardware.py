"""Hardware profiles for the latency estimate: named built-ins, a KEY=VALUE parser, and profile files."""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nnopt.atomic import write_atomic
from nnopt.cost.energy import DEFAULT_ENERGY, EnergyFigures, energy_from_dict
from nnopt.errors import InputError

#: Kernel classes a profile may give their own figures for (see ``nnopt.cost.runtime_kernels.kernel_classes``), and what
#: each covers. Nodes of other classes run at the profile's ``peak_flops``.
KERNEL_CLASSES: dict[str, str] = {
    "conv": "dense float Conv, ConvTranspose, Gemm and MatMul with a constant weight",
    "depthwise": "float Conv with one input and one output channel per group (group = channels > 1), constant "
    "weight",
    "grouped_conv": "float Conv with group > 1 that is not a plain depthwise conv (a channel multiplier, as "
    "conv-to-separable writes, or several channels per group): onnxruntime's generic path, an im2col and a "
    "small GEMM per group",
    "unblocked_conv": "dense float Conv with a constant weight and at least 16 input channels, not a multiple of "
    "4, or a 3-D kernel: onnxruntime cannot run it in its blocked (NCHWc) layout and falls back to "
    "im2col + GEMM",
    "conv1d": "dense float 1-D Conv with a constant weight and a kernel longer than 1: an im2col and one GEMM "
    "over a few time steps, with a fixed cost far below a 2-D unblocked conv's; a profile without it uses its "
    "unblocked_conv figures",
    "dynamic_weight": "float Conv, ConvTranspose, Gemm and MatMul whose weight is computed at run time (e.g. "
    "dequantized from int8 at every inference, or a MatMul of two activations): no pre-packed weight",
    "int8": "int8 dense Conv: QLinearConv, ConvInteger, and the DequantizeLinear → Conv groups a runtime fuses "
    "into them",
    "pointwise": "dense float 1×1 Conv (group 1) with a constant weight: a plain GEMM with a short reduction, "
    "what SVD's second factor and a separable conv's second half are",
    "unblocked_pointwise": "dense float 1×1 Conv with at least 16 input channels, not a multiple of 4: one GEMM "
    "at the pointwise rate (a profile without it uses its pointwise figures), but outside onnxruntime's blocked "
    "layout, so the tensors around it are reordered and a HardSwish after it runs on its own",
    "int8_depthwise": "int8 depthwise Conv: a QDQ group around a depthwise Conv (onnxruntime: QLinearConv with "
    "one channel per group)",
    "int8_pointwise": "int8 1×1 Conv (group 1): a QDQ group around a pointwise Conv (onnxruntime: QLinearConv, "
    "a plain int8 GEMM without im2col); a profile without it uses its int8 figures",
    "int8_matmul": "int8 MatMul and Gemm: QLinearMatMul, MatMulInteger, and the QDQ groups around MatMul/Gemm "
    "(onnxruntime: QLinearMatMul, QGemm)",
    "int8_elementwise": "Add and Mul on int8 data: a QDQ group around Add/Mul (onnxruntime: QLinearAdd, "
    "QLinearMul)",
    "divide": "Div: onnxruntime divides element by element at about a third of an Add's speed per byte",
    "activation": "Sigmoid, Tanh, HardSwish, and x·sigmoid(x) (SiLU, one node in onnxruntime): a function of "
    "each element several times slower than moving it",
    "recurrent": "LSTM, GRU and RNN: one small GEMM per time step, the steps one after another, so their rate "
    "is a fraction of a dense conv's (and depends on the hidden size)",
    "fused_activation": "a Sigmoid, Tanh, HardSigmoid or HardSwish onnxruntime fuses into the float conv before "
    "it: no node of its own, but its function of every output element (per element, from a conv chain with "
    "and without it); a profile without it charges nothing, as before",
    "quantize": "QuantizeLinear and DequantizeLinear a runtime runs as nodes (not fused into an int8 kernel): "
    "activation boundaries of float islands, weights dequantized at every inference",
}
#: Kernel classes a profile that has no figures of its own for them takes from another class (profiles
#: written before the class existed keep estimating as they did).
KERNEL_FALLBACK: dict[str, str] = {"int8_pointwise": "int8", "unblocked_pointwise": "pointwise",
                                   "conv1d": "unblocked_conv"}
#: Kernel classes of nodes that cost nothing per inference (only produced for profiles with a ``runtime``):
#: computed once when the session is created, or absorbed into another node's kernel.
FREE_KERNELS: frozenset[str] = frozenset({"folded", "fused"})
#: The kernel class of an activation fused into the conv before it that still costs time (see
#: ``nnopt.cost.runtime_kernels``): its FLOPs (one per element) at the class's rate, nothing else.
EPILOGUE_KERNEL = "fused_activation"
#: Kernel classes of nodes absorbed into the kernel before them (the layout follows that kernel's output).
FUSED_KERNELS: frozenset[str] = frozenset({"fused", EPILOGUE_KERNEL})
#: Runtimes whose graph rewrites the estimate can model (``HardwareProfile.runtime``).
RUNTIMES: dict[str, str] = {
    "generic": "what any deployment runtime does: subgraphs computed from constants only (kmeans decoders) run "
    "once at load, DequantizeLinear → Conv/MatMul/Gemm → QuantizeLinear groups run as int8 kernels",
    "onnxruntime": "constant folding (except DequantizeLinear), BatchNormalization and activations fused into "
    "the Conv/Gemm before them, QDQ groups fused into int8 kernels",
}


@dataclass(frozen=True)
class KernelFigures:
    """How one kernel class runs on a profile's target.

    Attributes:
        flops: Effective arithmetic rate of the class in FLOP/s; None uses the profile's ``peak_flops``.
        overhead_s: Fixed seconds per node of the class, on top of the profile's ``node_overhead_s``
            (e.g. a GEMM kernel's packing and thread-pool dispatch).
        grid: Rates measured at several shapes (see :class:`RatePoint`); a node whose output shape is known
            runs at the rate interpolated in them instead of ``flops``. Empty: ``flops`` for every node.
    """

    flops: float | None = None
    overhead_s: float = 0.0
    grid: tuple[RatePoint, ...] = ()

    def rate(self, flops: float, output_shape: Sequence[int] | None) -> float | None:
        """The class's FLOP/s for a node of ``flops`` whose (first) output has ``output_shape``: interpolated
        in ``grid`` when it has points and the shape is known, else ``flops`` (the single rate)."""
        if not self.grid or not output_shape or len(output_shape) < 3 or flops <= 0:
            return self.flops
        outputs, spatial = math.prod(output_shape), math.prod(output_shape[2:])
        if outputs <= 0 or spatial <= 0:
            return self.flops
        return interpolate_rate(self.grid, flops / (2 * outputs), spatial, output_shape[1])

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"flops_per_s": self.flops, "overhead_s": self.overhead_s}
        if self.grid:  # only then: a profile without a grid keeps the file form it always had
            data["grid"] = [point.to_dict() for point in self.grid]
        return data


@dataclass(frozen=True)
class RatePoint:
    """The rate one probe conv of a kernel class ran at, and where it lies in the space the rate is
    interpolated over (see :func:`interpolate_rate`).

    Attributes:
        reduction: Multiply-adds per output element (C_in ÷ group × kernel area): the GEMM's depth.
        spatial: Output positions per channel (H × W): the GEMM's width.
        flops: The measured FLOP/s.
        channels: Output channels, for the classes whose rate follows them rather than ``spatial``
            (:data:`CHANNEL_GRID_KERNELS`); 0 for the others, and in profiles written before it was recorded.
    """

    reduction: float
    spatial: float
    flops: float
    channels: float = 0.0

    def to_dict(self) -> dict[str, float]:
        data = {"reduction": self.reduction, "spatial": self.spatial, "flops_per_s": self.flops}
        if self.channels:  # only then: the other classes' points keep the file form they always had
            data["channels"] = self.channels
        return data


#: Kernel classes whose grid is read by (reduction, output channels) instead of (reduction, spatial).
#: onnxruntime's int8 conv is a GEMM in its NHWC layout: output pixels are its rows, output channels its
#: columns. Every layer has rows enough that their number hardly matters, while few columns starve the
#: kernel. Measured (one thread, AVX-512): 12 → 24 channels ran at 368, 368 and 365 GFLOP/s on 104², 160² and
#: 208² maps, 12 → 8 at 89 and 8 → 24 at 287 on 160²; 64 → 64 at 1029 on 56² and 974 on 14²; a 1×1 conv of 8
#: channels at 25 on 160² and 23 on 40². Interpolated by map size, a 12-channel stem on a large map took the
#: rate of the 8 → 8 probe on a large map (a fifth of its own).
CHANNEL_GRID_KERNELS: frozenset[str] = frozenset({"int8", "int8_pointwise"})


#: How fast a grid point's weight falls with its distance in :func:`interpolate_rate` (inverse distance to
#: this power): high enough that the nearest probes decide, low enough that the rate varies smoothly.
_GRID_POWER = 3.0


def interpolate_rate(grid: Sequence[RatePoint], reduction: float, spatial: float, channels: float = 0.0) -> float:
    """The rate at (``reduction``, ``spatial``) from measured points: inverse-distance weighting of the log
    rates in (log reduction, log spatial). A conv's speed in onnxruntime depends on its GEMM's shape far
    more than a single rate allows (a short reduction runs at a fraction of a long one's rate), and the
    measured points lie scattered rather than on a lattice; outside them the estimate tends to the nearest
    points' rates. When every point records its output channels (:data:`CHANNEL_GRID_KERNELS`) and
    ``channels`` is given, the second axis is log output channels instead of log spatial."""
    by_channels = channels > 0 and all(point.channels > 0 for point in grid)
    x, y = math.log(max(reduction, 1e-9)), math.log(max(channels if by_channels else spatial, 1e-9))
    total = weighted = 0.0
    for point in grid:
        second = point.channels if by_channels else point.spatial
        distance = math.hypot(math.log(point.reduction) - x, math.log(second) - y)
        if distance < 1e-9:
            return point.flops
        weight = distance**-_GRID_POWER
        total += weight
        weighted += weight * math.log(point.flops)
    return math.exp(weighted / total)


def interpolate_bandwidth(grid: Sequence[tuple[float, float]], nbytes: float) -> float:
    """The bandwidth for a node moving ``nbytes`` from ``(bytes, bytes/s)`` points sorted by bytes: linear in
    log-log between neighbours, the end points' bandwidth beyond them."""
    if nbytes <= grid[0][0]:
        return grid[0][1]
    for (b0, r0), (b1, r1) in zip(grid, grid[1:]):
        if nbytes <= b1:
            t = math.log(nbytes / b0) / math.log(b1 / b0)
            return math.exp(math.log(r0) + t * math.log(r1 / r0))
    return grid[-1][1]


@dataclass(frozen=True)
class HardwareProfile:
    """A target's arithmetic rate and memory bandwidth, and optionally what a runtime adds per node.

    The estimate of one node is ``node_overhead_s + kernel overhead + max(FLOPs ÷ rate, bytes ÷
    bandwidth)``, where the rate and kernel overhead are those of the node's kernel class in ``kernels``
    (``peak_flops`` and 0 for classes it does not list; the rate interpolated in the class's ``grid`` by the
    node's output shape when it has one) and the bandwidth is interpolated in ``bandwidth_grid`` when
    given; the model's estimate adds ``run_overhead_s`` once. With the defaults (no overheads, no kernels, no runtime) this is the plain roofline
    ``max(FLOPs ÷ peak_flops, bytes ÷ bandwidth)`` the built-in profiles give.

    Attributes:
        name: Short identifier, as accepted by :func:`parse_hardware`.
        peak_flops: Peak FP32 arithmetic rate in FLOP/s (a fused multiply-add counts as 2 FLOPs).
        bandwidth: Peak memory bandwidth in bytes/s, or None when unknown; the latency estimate is then
            compute-only (FLOPs ÷ peak).
        description: Where the figures come from.
        node_overhead_s: Fixed seconds per executed node (a runtime's dispatch cost).
        run_overhead_s: Fixed seconds per inference (entering and leaving the runtime).
        kernels: Figures per kernel class (keys of :data:`KERNEL_CLASSES`).
        runtime: A key of :data:`RUNTIMES`: estimate the graph that runtime executes (constants folded,
            nodes fused) rather than the graph as written. None for the graph as written.
        bandwidth_grid: ``(bytes moved per node, bytes/s)`` points, sorted by bytes: the bandwidth of a node
            is interpolated in them (:func:`interpolate_bandwidth`) instead of ``bandwidth`` when given.
            onnxruntime splits an elementwise op across its threads only above a size, so mid-sized
            tensors move at about half the rate of large ones.
        nchwc_block: The channel block of onnxruntime's blocked (NCHWc) conv layout on the target (16 with
            AVX-512, 8 with AVX2), as ``nnopt calibrate`` finds it; with ``runtime: onnxruntime`` the estimate
            then charges the layout changes around blocked convs (``nnopt.cost.layout``). 0: not modelled (no
            blocked layout, or a profile written before it was).
        energy: The energy prices (pJ per MAC and operation by data type, per byte on and off the chip) and
            the on-chip memory size the energy estimate uses (``nnopt.cost.energy``); the 45 nm figures with
            a 4 MiB cache (:data:`DEFAULT_ENERGY`) unless the profile gives its own.
        threads: The onnxruntime intra-op threads the figures were measured with (``nnopt calibrate
            --threads``); None: onnxruntime's default (one per core), or not a measured profile. int8 gains
            differ with the thread count (a MobileNet that int8 makes 0.74x float on one thread ran 1.25x
            float on two), so a profile is for the thread count it was measured at.
    """

    name: str
    peak_flops: float
    bandwidth: float | None = None
    description: str = ""
    node_overhead_s: float = 0.0
    run_overhead_s: float = 0.0
    kernels: Mapping[str, KernelFigures] = field(default_factory=dict, hash=False)
    runtime: str | None = None
    bandwidth_grid: tuple[tuple[float, float], ...] = ()
    energy: EnergyFigures = DEFAULT_ENERGY
    nchwc_block: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        if not self.peak_flops > 0 or (self.bandwidth is not None and not self.bandwidth > 0):
            raise ValueError(f"hardware profile '{self.name}': peak_flops and bandwidth must be positive")
        if not (self.node_overhead_s >= 0 and self.run_overhead_s >= 0):
            raise ValueError(f"hardware profile '{self.name}': overheads must be at least 0")
        unknown = sorted(set(self.kernels) - set(KERNEL_CLASSES))
        if unknown:
            raise ValueError(f"hardware profile '{self.name}': unknown kernel class '{unknown[0]}'")
        for kernel, figures in self.kernels.items():
            if (figures.flops is not None and not figures.flops > 0) or not figures.overhead_s >= 0:
                raise ValueError(f"hardware profile '{self.name}': kernels.{kernel} figures must be positive")
        if self.threads is not None and not self.threads >= 1:
            raise ValueError(f"hardware profile '{self.name}': threads must be at least 1")
        if self.runtime is not None and self.runtime not in RUNTIMES:
            raise ValueError(f"hardware profile '{self.name}': unknown runtime '{self.runtime}'")
        points = [p for figures in self.kernels.values() for p in figures.grid]
        if any(not (p.reduction > 0 and p.spatial > 0 and p.flops > 0 and p.channels >= 0) for p in points) or any(
            not (b > 0 and r > 0) for b, r in self.bandwidth_grid
        ):
            raise ValueError(f"hardware profile '{self.name}': grid points must be positive")
        if self.nchwc_block < 0:
            raise ValueError(f"hardware profile '{self.name}': nchwc_block must be at least 0")
        if list(self.bandwidth_grid) != sorted(self.bandwidth_grid):
            raise ValueError(f"hardware profile '{self.name}': bandwidth_grid must be sorted by bytes")

    def node_latency(
        self, kernel: str, flops: float, bytes_moved: float, *, output_shape: Sequence[int] | None = None,
        padding: float = 1.0,
    ) -> tuple[float, float, float]:
        """``(latency_s, compute_s, memory_s)`` of one node of kernel class ``kernel``.

        ``output_shape`` (of the node's first output) selects the rate in the class's grid, when the profile
        has one (see :meth:`KernelFigures.rate`); without it the class's single rate is used. ``padding``: the
        work the kernel does over ``flops`` (a blocked conv's channels padded to the block), at that rate.
        """
        if kernel in FREE_KERNELS:
            return 0.0, 0.0, 0.0
        if kernel == EPILOGUE_KERNEL:  # inside the conv's kernel: no node, no memory traffic of its own
            figures = self.kernels.get(kernel)
            compute_s = flops / figures.flops if figures is not None and figures.flops else 0.0
            return compute_s, compute_s, 0.0
        figures = self.kernels.get(kernel, self.kernels.get(KERNEL_FALLBACK.get(kernel, "")))
        rate = figures.rate(flops, output_shape) if figures is not None else None
        compute_s = flops * padding / (rate if rate is not None else self.peak_flops)
        if self.bandwidth_grid:
            memory_s = bytes_moved / interpolate_bandwidth(self.bandwidth_grid, bytes_moved)
        else:
            memory_s = bytes_moved / self.bandwidth if self.bandwidth else 0.0
        overhead_s = self.node_overhead_s + (figures.overhead_s if figures is not None else 0.0)
        return overhead_s + max(compute_s, memory_s), compute_s, memory_s

    @property
    def models_runtime(self) -> bool:
        """Whether estimates need each node's kernel class (a runtime or per-class figures are given)."""
        return self.runtime is not None or bool(self.kernels)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form with units in the keys (what a profile file holds)."""
        return {
            "name": self.name,
            "peak_flops_per_s": self.peak_flops,
            "bandwidth_bytes_per_s": self.bandwidth,
            "description": self.description,
            "node_overhead_s": self.node_overhead_s,
            "run_overhead_s": self.run_overhead_s,
            "kernels": {kernel: figures.to_dict() for kernel, figures in sorted(self.kernels.items())},
            "runtime": self.runtime,
            # Only when measured: a profile without it keeps the file form it always had.
            **({"bandwidth_grid": [list(point) for point in self.bandwidth_grid]} if self.bandwidth_grid else {}),
            **({"nchwc_block": self.nchwc_block} if self.nchwc_block else {}),
            "energy": self.energy.to_dict(),
            # Only when measured at a given count: a profile without it keeps its file form.
            **({"threads": self.threads} if self.threads is not None else {}),
        }


# NOTE: nominal peaks from vendor specifications (cores × clock × FLOPs/cycle), not measurements. Real
# kernels reach a fraction of these, so estimates are lower bounds useful for comparing model variants.
BUILTIN_PROFILES: dict[str, HardwareProfile] = {
    p.name: p
    for p in (
        HardwareProfile(
            name="x86-avx2-2core",
            peak_flops=2 * 3.0e9 * 32,
            bandwidth=2 * 8 * 2.666e9,
            description=(
                "generic 2-core x86 CPU with AVX2+FMA at 3.0 GHz: 2 cores × 3.0 GHz × 32 FP32 FLOPs/cycle "
                "(2 FMA units × 8 lanes × 2) = 192 GFLOP/s; dual-channel DDR4-2666 = 42.7 GB/s; int8 kernels "
                "(u8 × s8 through VPMADDUBSW + VPMADDWD: 32 multiply-adds per 2 instructions where FP32 FMA does "
                "8 per 1) twice the FP32 rate = 384 GOP/s for dense convs and matmuls; constants folded at "
                "load and QDQ groups fused (runtime generic); 4 MiB last-level cache (Intel's 2-core desktop parts, "
                "e.g. Core i3-7350K)"
            ),
            kernels={kind: KernelFigures(flops=2 * 2 * 3.0e9 * 32) for kind in ("int8", "int8_matmul")},
            runtime="generic",
            nchwc_block=8,  # MLAS's NCHWc block with AVX2 (used where the estimate models onnxruntime)
        ),
        HardwareProfile(
            name="rpi4",
            peak_flops=4 * 1.5e9 * 8,
            bandwidth=4 * 3.2e9,
            description=(
                "Raspberry Pi 4 (BCM2711, 4 × Cortex-A72 at 1.5 GHz): 4 cores × 1.5 GHz × 8 FP32 "
                "FLOPs/cycle (one 4-lane NEON FMA) = 48 GFLOP/s; 32-bit LPDDR4-3200 = 12.8 GB/s; 1 MiB shared L2 "
                "(Raspberry Pi documentation, BCM2711)"
            ),
            energy=EnergyFigures(cache_bytes=1 << 20),
        ),
        HardwareProfile(
            name="jetson-nano",
            peak_flops=128 * 0.9216e9 * 2,
            bandwidth=8 * 3.2e9,
            description=(
                "NVIDIA Jetson Nano GPU (128 Maxwell CUDA cores at 921.6 MHz): 128 × 0.9216 GHz × 2 "
                "(FMA) = 236 GFLOP/s FP32 (NVIDIA's 472 GFLOPS is FP16); 64-bit LPDDR4-3200 = 25.6 GB/s; 256 KiB "
                "GPU L2 (Tegra X1)"
            ),
            energy=EnergyFigures(cache_bytes=256 << 10),
        ),
        HardwareProfile(
            name="cortex-m7",
            peak_flops=480e6 * 2,
            bandwidth=480e6 * 8,
            description=(
                "Cortex-M7 MCU at 480 MHz (e.g. STM32H7) with single-precision FPU: 1 FMA/cycle × 2 = "
                "0.96 GFLOP/s; 64-bit TCM access at core clock = 3.84 GB/s; 1 MiB on-chip SRAM (STM32H743: 1 MB "
                "of RAM, TCM included)"
            ),
            energy=EnergyFigures(cache_bytes=1 << 20),
        ),
    )
}

#: The profile used when none is given.
DEFAULT_PROFILE: HardwareProfile = BUILTIN_PROFILES["x86-avx2-2core"]

_SUFFIXES = {"k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}
_KEYS = ("name", "flops", "bandwidth")
#: A ``--hardware`` value ending in this is a profile file.
PROFILE_SUFFIX = ".json"


def parse_hardware(spec: str, registry: dict[str, HardwareProfile] | None = None) -> HardwareProfile:
    """Parse a hardware profile: a known name, ``flops=4e12[,bandwidth=25.6G][,name=my-board]``, or a
    profile file ``PROFILE.json`` (what ``nnopt calibrate`` writes; see :func:`load_profile`).

    Numbers accept a k/K, M, G, T or P suffix (``4T`` is 4e12). Names are matched case-insensitively.
    ``flops`` is required in the KEY=VALUE form; without ``bandwidth`` the estimate is compute-only.

    Args:
        spec: The profile string.
        registry: Named profiles to look names up in; :data:`BUILTIN_PROFILES` when None.

    Raises:
        InputError: an unknown name, an unknown or repeated key, a missing ``flops``, a value that is
            not a positive number, or a profile file that is missing or malformed.
    """
    profiles = BUILTIN_PROFILES if registry is None else registry
    known = ", ".join(sorted(profiles)) or "none"
    text = spec.strip()
    if text.lower().endswith(PROFILE_SUFFIX):
        return load_profile(text)
    if "=" not in text:
        by_lower = {name.lower(): profile for name, profile in profiles.items()}
        profile = by_lower.get(text.lower())
        if profile is None:
            raise InputError(
                f"unknown hardware profile '{text}'; known profiles: {known} "
                "(or give flops=PEAK_FLOP_PER_S[,bandwidth=BYTES_PER_S])"
            )
        return profile
    values: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or not key or not value.strip():
            raise InputError(f"hardware profile '{spec}': expected KEY=VALUE, got '{item.strip()}'")
        if key not in _KEYS:
            raise InputError(
                f"hardware profile '{spec}': unknown key '{key}' (valid keys: {', '.join(_KEYS)}); "
                f"known profiles: {known}"
            )
        if key in values:
            raise InputError(f"hardware profile '{spec}': key '{key}' given twice")
        values[key] = value.strip()
    if "flops" not in values:
        raise InputError(f"hardware profile '{spec}': 'flops' is required, e.g. flops=4e12")
    flops = _parse_number(values["flops"], "flops", spec)
    bandwidth = _parse_number(values["bandwidth"], "bandwidth", spec) if "bandwidth" in values else None
    description = f"custom: peak {flops:.4g} FLOP/s" + (
        f", bandwidth {bandwidth:.4g} bytes/s" if bandwidth is not None else ", bandwidth not given"
    )
    return HardwareProfile(
        name=values.get("name", "custom"), peak_flops=flops, bandwidth=bandwidth, description=description
    )


def _parse_number(text: str, key: str, spec: str) -> float:
    scale, digits = 1.0, text
    if text and text[-1] in _SUFFIXES:
        scale, digits = _SUFFIXES[text[-1]], text[:-1]
    try:
        value = float(digits) * scale
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise InputError(
            f"hardware profile '{spec}': {key} must be a positive number such as 4e12 or 4T, got '{text}'"
        )
    return value



# ---------------------------------------------------------------------------------------------- profile files
#: Keys of a profile file: required, optional, and free-form (``measurements``: what calibration measured).
_FILE_REQUIRED = ("name", "peak_flops_per_s")
_FILE_OPTIONAL = ("bandwidth_bytes_per_s", "description", "node_overhead_s", "run_overhead_s", "kernels", "runtime",
                  "bandwidth_grid", "energy", "threads", "nchwc_block")
_FILE_FREE = ("measurements",)
_KERNEL_KEYS = ("flops_per_s", "overhead_s", "grid")
_POINT_KEYS = ("reduction", "spatial", "flops_per_s")
_POINT_OPTIONAL = ("channels",)


#: Where the package's measured profiles live (``shipped_profile``).
SHIPPED_PROFILES_DIR = Path(__file__).parent / "profiles"


@functools.cache
def shipped_profile(name: str) -> HardwareProfile:
    """A profile ``nnopt calibrate`` measured and the package ships (``SHIPPED_PROFILES_DIR``/NAME.json), read
    once per process."""
    return load_profile(SHIPPED_PROFILES_DIR / f"{name}{PROFILE_SUFFIX}")


def load_profile(path: str | os.PathLike[str]) -> HardwareProfile:
    """Read a profile file: a JSON object with the keys of :meth:`HardwareProfile.to_dict`.

    ``name`` and ``peak_flops_per_s`` are required; every other key is optional and defaults to what
    keeps the plain roofline (no overheads, no kernel classes, no runtime). A ``measurements`` object is
    kept by ``nnopt calibrate`` for the record and ignored here.

    Raises:
        InputError: the file is missing or not JSON, or a key is unknown, missing or has a bad value; the
            one-line message names the file and the key.
    """
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"hardware profile file {source}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"hardware profile file {source}: cannot be read ({exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"hardware profile file {source}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    return profile_from_dict(data, str(source))


def profile_from_dict(data: Any, source: str = "profile") -> HardwareProfile:
    """A profile from the dict form of :meth:`HardwareProfile.to_dict` (see :func:`load_profile`).

    Raises:
        InputError: a key is unknown, missing or has a bad value, named with ``source``.
    """
    where = f"hardware profile file {source}"
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(data).__name__}")
    valid = (*_FILE_REQUIRED, *_FILE_OPTIONAL, *_FILE_FREE)
    for key in data:
        if key not in valid:
            raise InputError(f"{where}: unknown key '{key}' (valid keys: {', '.join(valid)})")
    for key in _FILE_REQUIRED:
        if key not in data:
            raise InputError(f"{where}: missing key '{key}'")
    name = data["name"]
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"{where}: name: expected a non-empty string, got {name!r}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise InputError(f"{where}: description: expected a string, got {description!r}")
    runtime = data.get("runtime")
    if runtime is not None and runtime not in RUNTIMES:
        raise InputError(f"{where}: runtime: expected null or one of {', '.join(RUNTIMES)}, got {runtime!r}")
    kernels_data = data.get("kernels", {})
    if not isinstance(kernels_data, dict):
        raise InputError(f"{where}: kernels: expected an object keyed by kernel class, got {kernels_data!r}")
    kernels: dict[str, KernelFigures] = {}
    for kernel, figures in kernels_data.items():
        label = f"kernels.{kernel}"
        if kernel not in KERNEL_CLASSES:
            raise InputError(f"{where}: unknown kernel class '{kernel}' (valid: {', '.join(KERNEL_CLASSES)})")
        if not isinstance(figures, dict):
            raise InputError(f"{where}: {label}: expected an object with {', '.join(_KERNEL_KEYS)}")
        for key in figures:
            if key not in _KERNEL_KEYS:
                raise InputError(f"{where}: unknown key '{label}.{key}' (valid keys: {', '.join(_KERNEL_KEYS)})")
        kernels[kernel] = KernelFigures(
            flops=_file_number(figures, "flops_per_s", where, label, positive=True, optional=True),
            overhead_s=_file_number(figures, "overhead_s", where, label) or 0.0,
            grid=_file_grid(figures.get("grid", []), where, f"{label}.grid"),
        )
    return HardwareProfile(
        name=name.strip(),
        peak_flops=_file_number(data, "peak_flops_per_s", where, positive=True),  # type: ignore[arg-type]
        bandwidth=_file_number(data, "bandwidth_bytes_per_s", where, positive=True, optional=True),
        description=description,
        node_overhead_s=_file_number(data, "node_overhead_s", where) or 0.0,
        run_overhead_s=_file_number(data, "run_overhead_s", where) or 0.0,
        kernels=kernels,
        runtime=runtime,
        bandwidth_grid=_file_bandwidth_grid(data.get("bandwidth_grid", []), where),
        nchwc_block=_file_block(data.get("nchwc_block", 0), where),
        energy=energy_from_dict(data["energy"], where) if data.get("energy") is not None else DEFAULT_ENERGY,
        threads=_file_threads(data.get("threads"), where),
    )


def _file_threads(value: Any, where: str) -> int | None:
    """``threads``: null or a whole number of at least 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{where}: threads: expected null or a whole number of at least 1, got {value!r}")
    return value


def _file_grid(points: Any, where: str, label: str) -> tuple[RatePoint, ...]:
    """A kernel class's ``grid``: a list of objects with the keys of :class:`RatePoint`'s ``to_dict``."""
    if not isinstance(points, list):
        raise InputError(f"{where}: {label}: expected a list of points")
    grid = []
    for i, point in enumerate(points):
        if not isinstance(point, dict) or not set(_POINT_KEYS) <= set(point) <= {*_POINT_KEYS, *_POINT_OPTIONAL}:
            raise InputError(f"{where}: {label}[{i}]: expected an object with {', '.join(_POINT_KEYS)} "
                             f"(and optionally {', '.join(_POINT_OPTIONAL)})")
        reduction, spatial, flops = (_file_number(point, key, where, f"{label}[{i}]", positive=True) or 0.0
                                     for key in _POINT_KEYS)
        channels = _file_number(point, "channels", where, f"{label}[{i}]", positive=True, optional=True) or 0.0
        grid.append(RatePoint(reduction, spatial, flops, channels))
    return tuple(grid)


def _file_block(value: Any, where: str) -> int:
    """``nchwc_block``: a whole number of channels, at least 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InputError(f"{where}: nchwc_block: expected a whole number of channels of at least 0, got {value!r}")
    return value


def _file_bandwidth_grid(points: Any, where: str) -> tuple[tuple[float, float], ...]:
    """``bandwidth_grid``: [bytes, bytes/s] pairs of positive numbers, sorted by bytes."""
    pairs = []
    ok = isinstance(points, list)
    for pair in points if ok else []:
        ok = ok and isinstance(pair, list) and len(pair) == 2
        ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in pair)
        pairs.append(tuple(float(v) for v in pair) if ok else (0.0, 0.0))
    if not ok or pairs != sorted(pairs):
        raise InputError(f"{where}: bandwidth_grid: expected [bytes, bytes_per_s] pairs of positive numbers, "
                         "sorted by bytes")
    return tuple(pairs)  # type: ignore[arg-type]


def _file_number(
    data: dict[str, Any], key: str, where: str, label: str = "", *, positive: bool = False, optional: bool = False
) -> float | None:
    """``data[key]`` as a finite number: positive (or null if ``optional``), else at least 0; absent: None."""
    path = f"{label}.{key}" if label else key
    value = data.get(key)
    if value is None:
        if positive and not optional and key in data:
            raise InputError(f"{where}: {path}: expected a positive number, got null")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{where}: {path}: expected a number, got {value!r}")
    if positive and value <= 0:
        raise InputError(f"{where}: {path}: expected a positive number, got {value!r}")
    if value < 0:
        raise InputError(f"{where}: {path}: expected a number of at least 0, got {value!r}")
    return float(value)


def write_profile(
    profile: HardwareProfile, path: str | os.PathLike[str], measurements: dict[str, Any] | None = None
) -> None:
    """Write ``profile`` as a profile file atomically (a temporary file beside it, then renamed).

    ``measurements`` (what calibration measured, for the record) is stored under that key.
    """
    data = profile.to_dict()
    if measurements is not None:
        data["measurements"] = measurements
    write_atomic(path, (json.dumps(data, indent=2) + "\n").encode())
