"""Hardware profiles the cost-model tests share: what `nnopt calibrate` measured here, and its grids."""

from __future__ import annotations

from dataclasses import replace

from nnopt.cost import HardwareProfile
from nnopt.cost.hardware import KernelFigures, RatePoint

#: What ``nnopt calibrate`` measured on the development machine (2 cores, onnxruntime 1.32), rounded: every
#: kernel class it measures, single rates only (the profile files written before the grids).
MEASURED = HardwareProfile(
    "measured", 237e9, 134e9, node_overhead_s=0.28e-6, run_overhead_s=5.5e-6, runtime="onnxruntime",
    kernels={"conv": KernelFigures(237e9, 2.2e-6), "pointwise": KernelFigures(283e9, 1.5e-6),
             "depthwise": KernelFigures(149e9, 0.7e-6), "grouped_conv": KernelFigures(54e9, 2.9e-6),
             "unblocked_conv": KernelFigures(173e9, 7.6e-6), "dynamic_weight": KernelFigures(154e9, 3.0e-6),
             "int8": KernelFigures(749e9, 2.6e-6), "int8_depthwise": KernelFigures(68e9, 1.7e-6),
             "int8_matmul": KernelFigures(377e9, 0.6e-6), "int8_elementwise": KernelFigures(5.5e9, 0.07e-6),
             "quantize": KernelFigures(8.0e9, 0.0), "recurrent": KernelFigures(89e9, 1.6e-6),
             "divide": KernelFigures(6.4e9, 0.0), "activation": KernelFigures(4.5e9, 0.0)},
    nchwc_block=16,
)  # fmt: skip

#: The grids the same machine measured (rounded): dense 3×3 convs from 46 GFLOP/s (8 channels on 160 × 160)
#: to 245, 1×1 convs from 15 (8 channels) to 168, conv-to-separable's grouped convs 5-31, and mid-sized
#: elementwise tensors at 80 GB/s where the large Add reached 134.
CONV_GRID = (RatePoint(72, 25600, 46e9), RatePoint(144, 6400, 324e9), RatePoint(288, 3136, 245e9),
             RatePoint(432, 6400, 93e9), RatePoint(1152, 196, 225e9))  # fmt: skip
POINTWISE_GRID = (RatePoint(8, 25600, 15e9), RatePoint(16, 12544, 115e9), RatePoint(32, 3136, 132e9),
                  RatePoint(128, 784, 148e9), RatePoint(256, 196, 168e9))  # fmt: skip
GROUPED_GRID = (RatePoint(9, 16, 5e9), RatePoint(9, 144, 17e9), RatePoint(9, 3136, 31e9))
BANDWIDTH_GRID = ((12288.0, 79e9), (49152.0, 77e9), (196608.0, 82e9), (786432.0, 77e9), (3145728.0, 134e9))


def with_grids(profile: HardwareProfile = MEASURED) -> HardwareProfile:
    """``profile`` with the measured grids (conv, pointwise, grouped_conv and the bandwidth grid)."""
    kernels = dict(profile.kernels)
    for kernel, grid in (("conv", CONV_GRID), ("pointwise", POINTWISE_GRID), ("grouped_conv", GROUPED_GRID)):
        kernels[kernel] = replace(kernels[kernel], grid=grid)
    return replace(profile, name=f"{profile.name}-grid", kernels=kernels, bandwidth_grid=BANDWIDTH_GRID)


MEASURED_GRID = with_grids()
