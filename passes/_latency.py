"""Estimated latency of a low-rank rewrite: one layer against the nodes that replace it, as onnxruntime runs them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import onnx
from onnx import helper

from nnopt.cost.hardware import DEFAULT_PROFILE, HardwareProfile, KernelFigures
from nnopt.cost.layout import padded_work
from nnopt.cost.runtime_kernels import kernel_classes
from nnopt.cost.tensors import TensorInfo
from nnopt.errors import OptionError
from nnopt.ir.model import Model
from nnopt.pipeline.base import Figure, PassContext

#: How onnxruntime's CPU kernels run, for the kernel classes a profile gives no figures of (a plain roofline
#: gives none; the built-in profiles only int8 ones): per class its FLOP rate as a fraction of the profile's
#: dense conv rate (``conv``, else ``peak_flops``), and fixed costs as FLOPs at that rate (so they scale with
#: the target's speed). From ``nnopt calibrate`` on the machine of docs/lowrank.md; ``grouped_conv`` (a
#: depthwise conv with depth multiplier > 1, one im2col + GEMM per group) from the multiplier convs measured
#: there at 1/7 to 1/16 of the dense rate, below the calibration probe's 1/4.5. A profile's own figures win.
ONNXRUNTIME_RATES: dict[str, float] = {"conv": 1.0, "pointwise": 1.0, "depthwise": 0.35, "grouped_conv": 1 / 12,
                                       "unblocked_conv": 0.5, "dynamic_weight": 0.6}  # fmt: skip
ONNXRUNTIME_KERNEL_OVERHEAD_FLOPS: dict[str, float] = {"conv": 6.0e5, "pointwise": 4.0e5, "depthwise": 2.5e5,
                                                       "grouped_conv": 5.0e5, "unblocked_conv": 9.0e5,
                                                       "dynamic_weight": 8.0e5}  # fmt: skip
ONNXRUNTIME_NODE_OVERHEAD_FLOPS = 7.0e4
ONNXRUNTIME_RUN_OVERHEAD_FLOPS = 1.5e6


def check_min_latency_saving(value: float | None) -> None:
    """None switches the check off; otherwise a fraction below 1 (negative values allow an estimated slowdown)."""
    if value is not None and not (math.isfinite(value) and value < 1.0):
        raise OptionError(f"min_latency_saving must be a finite fraction below 1 or none (got {value})")


def onnxruntime_view(profile: HardwareProfile) -> HardwareProfile:
    """``profile`` as onnxruntime runs it: its own figures, plus ``ONNXRUNTIME_RATES`` for the float conv
    classes it gives none for, and onnxruntime's graph rewrites. A profile ``nnopt calibrate`` wrote (runtime
    onnxruntime, every class measured) comes back as it is."""
    missing = [kernel for kernel in ONNXRUNTIME_RATES if kernel not in profile.kernels]
    calibrated = profile.runtime == "onnxruntime"
    if calibrated and not missing:
        return profile
    conv = profile.kernels.get("conv")
    rate = conv.flops if conv is not None and conv.flops is not None else profile.peak_flops
    kernels = dict(profile.kernels)
    for kernel in missing:
        kernels[kernel] = KernelFigures(ONNXRUNTIME_RATES[kernel] * rate, ONNXRUNTIME_KERNEL_OVERHEAD_FLOPS[kernel] / rate)
    return replace(
        profile,
        name=f"{profile.name}+onnxruntime",
        description=f"{profile.description}; onnxruntime's float conv classes and overheads added (passes/_latency.py)",
        # A profile for onnxruntime says what its fixed costs are (0 included); others have none to say.
        node_overhead_s=profile.node_overhead_s if calibrated else ONNXRUNTIME_NODE_OVERHEAD_FLOPS / rate,
        run_overhead_s=profile.run_overhead_s if calibrated else ONNXRUNTIME_RUN_OVERHEAD_FLOPS / rate,
        kernels=kernels,
        runtime="onnxruntime",
    )


def run_profile(model: Model, ctx: PassContext) -> HardwareProfile:
    """The profile the estimate uses: the run's (``--hardware``), seen as onnxruntime runs it."""
    hardware = ctx.analyses_for(model).settings.hardware
    return onnxruntime_view(DEFAULT_PROFILE if hardware is None else hardware)


# ---------------------------------------------------------------------------------------------- nodes
@dataclass(frozen=True)
class Step:
    """One node of a layer or of its rewrite, as the estimate sees it.

    Attributes:
        op: ``Conv``, ``Gemm`` or ``MatMul``.
        weight: The weight's shape as ONNX stores it (Conv: [C_out, C_in/group, *kernel]; Gemm/MatMul
            read as [K, N]).
        group: Conv groups.
        macs: Multiply-accumulates per output position (Conv) or output row (Gemm/MatMul).
        out_channels: Output channels (Conv) or columns (Gemm/MatMul): the size of the tensor it writes.
    """

    op: str
    weight: tuple[int, ...]
    group: int
    macs: int
    out_channels: int

    def proto(self) -> onnx.NodeProto:
        node = helper.make_node(self.op, ["x", "w"], ["y"])
        if self.op == "Conv":
            node.attribute.append(helper.make_attribute("group", self.group))
        return node

    def kernel(self) -> str:
        """The cost model's kernel class of this node (``nnopt.cost.runtime_kernels``): e.g. ``pointwise`` for
        a 1×1 conv, ``grouped_conv`` for a depthwise conv with depth multiplier > 1."""
        return kernel_classes([self.proto()], self._infos(), {"w"})[0]

    def padding(self, kernel: str, block: int) -> float:
        """The work onnxruntime's blocked layout does over this node's (``nnopt.cost.layout.padded_work``): a
        rank-5 factor's output runs as 16 channels where the block is 16."""
        return padded_work(self.proto(), kernel, self._infos(), block)

    def _infos(self) -> dict[str, TensorInfo]:
        return {"w": TensorInfo("w", onnx.TensorProto.FLOAT, self.weight, is_constant=True)}


@dataclass(frozen=True)
class NodeEstimate:
    """One node's estimate: its kernel class, latency and the share of it that is fixed overhead."""

    step: Step
    kernel: str
    latency_s: float
    overhead_s: float


def estimate_steps(
    profile: HardwareProfile, cost: dict[str, Any], original: Step, steps: Sequence[Step]
) -> tuple[NodeEstimate, list[NodeEstimate]]:
    """The original node's estimate and each replacement node's, from the original's cost record.

    The cost record (``nnopt analyze``'s node record, shapes of this run) gives the positions (FLOPs ÷ 2 ÷
    MACs per position), the bytes of the layer's input and output, and the weight itemsize; a rewrite's
    intermediate tensor has the output's positions and element size. An epilogue onnxruntime fuses into
    the original (BatchNormalization, Add, an activation) fuses into the last replacement node the same
    way, so it costs the same on both sides and is left out.
    """
    positions = cost["flops"] / (2 * original.macs)
    in_bytes, out_bytes = float(cost.get("input_bytes", 0)), float(cost.get("output_bytes", 0))
    per_element = out_bytes / (positions * original.out_channels) if positions else 4.0
    weight_elems = math.prod(original.weight)
    itemsize = cost["weight_bytes"] / cost["params"] if cost.get("params") else per_element
    bias_bytes = max(0.0, float(cost.get("weight_bytes", 0)) - weight_elems * itemsize)

    def node(step: Step, reads: float, writes: float, bias: float) -> NodeEstimate:
        kernel = step.kernel()
        flops = 2.0 * positions * step.macs
        moved = reads + writes + math.prod(step.weight) * itemsize + bias
        return _node_latency(profile, step, kernel, flops, moved, step.padding(kernel, profile.nchwc_block))

    before = node(original, in_bytes, out_bytes, bias_bytes)
    after = []
    for i, step in enumerate(steps):
        last = i == len(steps) - 1
        reads = in_bytes if i == 0 else positions * steps[i - 1].out_channels * per_element
        writes = out_bytes if last else positions * step.out_channels * per_element
        after.append(node(step, reads, writes, bias_bytes if last else 0.0))
    return before, after


def _node_latency(profile: HardwareProfile, step: Step, kernel: str, flops: float, moved: float,
                  padding: float = 1.0) -> NodeEstimate:
    latency, _, _ = profile.node_latency(kernel, flops, moved, padding=padding)
    figures = profile.kernels.get(kernel)
    overhead = profile.node_overhead_s + (figures.overhead_s if figures is not None else 0.0)
    return NodeEstimate(step, kernel, latency, overhead)


# ---------------------------------------------------------------------------------------------- verdicts
@dataclass(frozen=True)
class Verdict:
    """A rewrite's estimated latency against the layer's, and why it is slower where it is."""

    before: NodeEstimate
    after: list[NodeEstimate]
    profile: str

    @property
    def before_s(self) -> float:
        return self.before.latency_s

    @property
    def after_s(self) -> float:
        return sum(n.latency_s for n in self.after)

    @property
    def ratio(self) -> float:
        return self.after_s / self.before_s if self.before_s > 0 else 1.0

    @property
    def saving(self) -> float:
        return 1.0 - self.ratio

    def causes(self) -> list[str]:
        """What makes the rewrite slow: factors outside onnxruntime's fast kernels, and fixed per-node costs
        where they are most of the factors' time."""
        causes = []
        for n in self.after:
            if n.kernel == "unblocked_conv":
                causes.append(f"unblocked {n.step.weight[1]}-channel factor")
            elif n.kernel == "grouped_conv":
                causes.append(f"depthwise multiplier {n.step.weight[0] // n.step.group} runs as grouped GEMMs")
        fixed = sum(n.overhead_s for n in self.after)
        if fixed >= 0.5 * self.after_s:
            causes.append(f"overhead-dominated: {fixed * 1e6:.1f} of {self.after_s * 1e6:.1f} µs are fixed per-node costs")
        return causes

    def reason(self, threshold: float) -> str:
        """The decline reason: e.g. ``estimated 1.31× slower (unblocked 62-channel factor)``."""
        causes = self.causes()
        why = f" ({'; '.join(causes)})" if causes else ""
        if self.ratio > 1.0:
            told = f"estimated {self.ratio:.2f}× slower{why}"
        else:
            told = f"estimated to save {self.saving:.1%} of the layer's latency{why}"
        return f"{told}, below min_latency_saving={threshold:g} ({self.profile})"

    def figures(self) -> dict[str, Figure]:
        return {
            "latency_before_s": _round(self.before_s),
            "latency_after_s": _round(self.after_s),
            "latency_ratio": round(self.ratio, 4),
            "kernels_before": [self.before.kernel],
            "kernels_after": [n.kernel for n in self.after],
        }


def _round(seconds: float) -> float:
    return float(f"{seconds:.4g}")


def judge(profile: HardwareProfile, cost: dict[str, Any] | None, original: Step, steps: Sequence[Step]) -> Verdict | None:
    """The rewrite's verdict, or None where the cost analysis did not cost the layer (no FLOPs, no shapes)."""
    if not cost or not cost.get("costed", True) or not cost.get("flops") or original.macs <= 0:
        return None
    before, after = estimate_steps(profile, cost, original, steps)
    return Verdict(before, after, profile.name)

