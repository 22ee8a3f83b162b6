"""Hardware profiles for the roofline latency estimate: named built-ins and a KEY=VALUE parser."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from nnopt.errors import InputError


@dataclass(frozen=True)
class HardwareProfile:
    """A target's nominal peak arithmetic rate and memory bandwidth.

    Attributes:
        name: Short identifier, as accepted by :func:`parse_hardware`.
        peak_flops: Peak FP32 arithmetic rate in FLOP/s (a fused multiply-add counts as 2 FLOPs).
        bandwidth: Peak memory bandwidth in bytes/s, or None when unknown; the latency estimate is then
            compute-only (FLOPs ÷ peak).
        description: Where the figures come from.
    """

    name: str
    peak_flops: float
    bandwidth: float | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if not self.peak_flops > 0 or (self.bandwidth is not None and not self.bandwidth > 0):
            raise ValueError(f"hardware profile '{self.name}': peak_flops and bandwidth must be positive")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form with units in the keys."""
        return {
            "name": self.name,
            "peak_flops_per_s": self.peak_flops,
            "bandwidth_bytes_per_s": self.bandwidth,
            "description": self.description,
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
                "(2 FMA units × 8 lanes × 2) = 192 GFLOP/s; dual-channel DDR4-2666 = 42.7 GB/s"
            ),
        ),
        HardwareProfile(
            name="rpi4",
            peak_flops=4 * 1.5e9 * 8,
            bandwidth=4 * 3.2e9,
            description=(
                "Raspberry Pi 4 (BCM2711, 4 × Cortex-A72 at 1.5 GHz): 4 cores × 1.5 GHz × 8 FP32 "
                "FLOPs/cycle (one 4-lane NEON FMA) = 48 GFLOP/s; 32-bit LPDDR4-3200 = 12.8 GB/s"
            ),
        ),
        HardwareProfile(
            name="jetson-nano",
            peak_flops=128 * 0.9216e9 * 2,
            bandwidth=8 * 3.2e9,
            description=(
                "NVIDIA Jetson Nano GPU (128 Maxwell CUDA cores at 921.6 MHz): 128 × 0.9216 GHz × 2 "
                "(FMA) = 236 GFLOP/s FP32 (NVIDIA's 472 GFLOPS is FP16); 64-bit LPDDR4-3200 = 25.6 GB/s"
            ),
        ),
        HardwareProfile(
            name="cortex-m7",
            peak_flops=480e6 * 2,
            bandwidth=480e6 * 8,
            description=(
                "Cortex-M7 MCU at 480 MHz (e.g. STM32H7) with single-precision FPU: 1 FMA/cycle × 2 = "
                "0.96 GFLOP/s; 64-bit TCM access at core clock = 3.84 GB/s"
            ),
        ),
    )
}

#: The profile used when none is given.
DEFAULT_PROFILE: HardwareProfile = BUILTIN_PROFILES["x86-avx2-2core"]

_SUFFIXES = {"k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}
_KEYS = ("name", "flops", "bandwidth")


def parse_hardware(spec: str, registry: dict[str, HardwareProfile] | None = None) -> HardwareProfile:
    """Parse a hardware profile: a known name, or ``flops=4e12[,bandwidth=25.6G][,name=my-board]``.

    Numbers accept a k/K, M, G, T or P suffix (``4T`` is 4e12). Names are matched case-insensitively.
    ``flops`` is required in the KEY=VALUE form; without ``bandwidth`` the estimate is compute-only.

    Args:
        spec: The profile string.
        registry: Named profiles to look names up in; :data:`BUILTIN_PROFILES` when None.

    Raises:
        InputError: an unknown name, an unknown or repeated key, a missing ``flops``, or a value that is
            not a positive number.
    """
    profiles = BUILTIN_PROFILES if registry is None else registry
    known = ", ".join(sorted(profiles)) or "none"
    text = spec.strip()
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
