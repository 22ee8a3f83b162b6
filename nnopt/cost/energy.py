"""Energy per inference: a node's multiply-accumulates, other operations and bytes moved, priced per data type.

The figures are the 45 nm CMOS energy table of M. Horowitz, "Computing's energy problem (and what we can do
about it)", ISSCC 2014 (0.9 V), used as published, not scaled to any newer process: an estimate of where the
energy of an inference goes (arithmetic against data movement, float against int8, on-chip against DRAM), not
a measurement of any device. ``docs/energy.md`` says what is and is not counted.

* Arithmetic: a node's MACs cost one multiply plus one add of the accumulator's type each, its other
  operations (FLOPs - 2 x MACs: activations, pooling, normalisations) one add each. int8 products accumulate
  in 32 bits (as every int8 GEMM kernel does), so an int8 MAC is an 8-bit multiply and a 32-bit add.
* Data movement: every byte a node reads or writes (``bytes_moved``) is read from or written to memory once
  per node, at the on-chip (cache/SRAM) price when it stays on the chip and the DRAM price when it does not.
  Which bytes stay on the chip is modelled simply: the weights stay resident across inferences only when all
  of them fit in the profile's ``cache_bytes``; an activation tensor stays on the chip when it alone fits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from nnopt.errors import InputError

#: The data-type classes energy is priced in, and the ONNX element types each covers.
DTYPE_CLASSES: dict[str, str] = {
    "fp32": "float32 and float64 (the table has no 64-bit figures)",
    "fp16": "float16 and bfloat16",
    "int8": "int8, uint8, bool and sub-byte integers; QLinear*/ *Integer ops and int8 kernels (fused QDQ groups)",
    "int32": "int16, int32, int64 and their unsigned forms (shape and index arithmetic)",
}

_T = onnx.TensorProto
#: ONNX element type -> data-type class; types not listed (strings, float8) count as fp32.
_ELEMENT_CLASS: dict[int, str] = {
    _T.FLOAT: "fp32", _T.DOUBLE: "fp32", _T.FLOAT16: "fp16", _T.BFLOAT16: "fp16",
    _T.INT8: "int8", _T.UINT8: "int8", _T.BOOL: "int8",
    _T.INT16: "int32", _T.UINT16: "int32", _T.INT32: "int32", _T.UINT32: "int32", _T.INT64: "int32",
    _T.UINT64: "int32",
    **{getattr(_T, name): "int8" for name in ("INT4", "UINT4", "INT2", "UINT2") if hasattr(_T, name)},
}
#: Ops whose arithmetic is int8 whatever their output type (a QLinearConv writes uint8; ConvInteger int32).
_INT8_OPS = frozenset({"ConvInteger", "MatMulInteger", "QGemm", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"})

# Horowitz, ISSCC 2014, energy table for 45 nm at 0.9 V, in pJ per operation.
_MULT_PJ = {"fp32": 3.7, "fp16": 1.1, "int8": 0.2, "int32": 3.1}
_ADD_PJ = {"fp32": 0.9, "fp16": 0.4, "int8": 0.03, "int32": 0.1}
#: The accumulator a MAC of each type adds in: int8 products are summed in int32.
_ACCUMULATOR = {"fp32": "fp32", "fp16": "fp16", "int8": "int32", "int32": "int32"}
#: pJ per MAC: a multiply of the type and an add of its accumulator (int8: 0.2 + 0.1 = 0.3 pJ).
MAC_PJ: dict[str, float] = {t: round(_MULT_PJ[t] + _ADD_PJ[_ACCUMULATOR[t]], 6) for t in _MULT_PJ}
#: pJ per other operation (an add of the type).
OP_PJ: dict[str, float] = dict(_ADD_PJ)
#: pJ per 64-bit cache access by cache size (8 KB, 32 KB, 1 MB in the table).
SRAM_64BIT_PJ: tuple[tuple[int, float], ...] = ((8 << 10, 10.0), (32 << 10, 20.0), (1 << 20, 100.0))
#: pJ per 64-bit DRAM access: the table gives 1.3-2.6 nJ; the low end is used (an estimate that does not overstate).
DRAM_64BIT_PJ = 1300.0


def sram_pj_per_byte(cache_bytes: int) -> float:
    """pJ per byte of an on-chip access to a cache of ``cache_bytes``: the table's figure for the smallest size
    it lists that holds the cache (its 1 MB figure for larger caches, which understates them)."""
    pj = next((pj for size, pj in SRAM_64BIT_PJ if cache_bytes <= size), SRAM_64BIT_PJ[-1][1])
    return pj / 8


@dataclass(frozen=True)
class EnergyFigures:
    """A profile's energy prices and the on-chip memory that decides which bytes go to DRAM.

    Attributes:
        cache_bytes: On-chip memory (last-level cache or SRAM) in bytes: weights stay on the chip when all of
            them fit in it, an activation tensor when it fits.
        mac_pj: pJ per multiply-accumulate, by data-type class (keys of :data:`DTYPE_CLASSES`).
        op_pj: pJ per other operation (an add), by data-type class.
        onchip_pj_per_byte: pJ per byte read or written on the chip.
        offchip_pj_per_byte: pJ per byte read or written in DRAM.
        source: Where the figures come from.
    """

    cache_bytes: int
    mac_pj: Mapping[str, float] = field(default_factory=lambda: dict(MAC_PJ), hash=False)
    op_pj: Mapping[str, float] = field(default_factory=lambda: dict(OP_PJ), hash=False)
    onchip_pj_per_byte: float | None = None
    offchip_pj_per_byte: float = DRAM_64BIT_PJ / 8
    source: str = ("Horowitz, 'Computing's energy problem', ISSCC 2014: 45 nm, 0.9 V, unscaled; on-chip bytes at "
                   "the table's cache figure for the cache size, DRAM at its low end (1.3 nJ per 64 bits)")

    def __post_init__(self) -> None:
        if self.onchip_pj_per_byte is None:  # the table's figure for this cache size
            object.__setattr__(self, "onchip_pj_per_byte", sram_pj_per_byte(self.cache_bytes))
        prices = [*self.mac_pj.values(), *self.op_pj.values(), self.onchip_pj_per_byte, self.offchip_pj_per_byte]
        if not self.cache_bytes > 0 or not all(isinstance(p, int | float) and p >= 0 for p in prices):
            raise ValueError("energy figures: cache_bytes must be positive and prices at least 0")
        for table in (self.mac_pj, self.op_pj):
            if set(table) != set(DTYPE_CLASSES):
                raise ValueError(f"energy figures: prices needed for exactly {', '.join(DTYPE_CLASSES)}")

    def node_energy_j(self, dtype: str, macs: int, flops: int, onchip_bytes: int, offchip_bytes: int) -> float:
        """Joules of one node: its MACs and other operations at ``dtype``'s prices, its bytes on and off chip."""
        others = max(flops - 2 * macs, 0)
        onchip = float(self.onchip_pj_per_byte or 0.0)
        pj = (macs * self.mac_pj[dtype] + others * self.op_pj[dtype] + onchip_bytes * onchip
              + offchip_bytes * self.offchip_pj_per_byte)
        return pj * 1e-12

    def to_dict(self) -> dict[str, Any]:
        return {"cache_bytes": self.cache_bytes, "mac_pj": dict(self.mac_pj), "op_pj": dict(self.op_pj),
                "onchip_pj_per_byte": self.onchip_pj_per_byte, "offchip_pj_per_byte": self.offchip_pj_per_byte,
                "source": self.source}


#: Energy figures of profiles that give none (a calibrated or ``flops=`` profile, the x86 one): the 45 nm
#: figures with a 4 MiB last-level cache, the L3 of Intel's 2-core desktop parts (e.g. Core i3-7350K: 4 MB).
DEFAULT_ENERGY = EnergyFigures(cache_bytes=4 << 20)

_ENERGY_KEYS = ("cache_bytes", "mac_pj", "op_pj", "onchip_pj_per_byte", "offchip_pj_per_byte", "source")


def energy_from_dict(data: Any, where: str) -> EnergyFigures:
    """Energy figures from a profile file's ``energy`` object (the form of :meth:`EnergyFigures.to_dict`; every key
    but ``cache_bytes`` optional, defaulting to the 45 nm figures).

    Raises:
        InputError: not an object, an unknown key, or a value that is not a positive size or a price >= 0.
    """
    if not isinstance(data, dict):
        raise InputError(f"{where}: energy: expected an object with {', '.join(_ENERGY_KEYS)}")
    unknown = [key for key in data if key not in _ENERGY_KEYS]
    if unknown:
        raise InputError(f"{where}: unknown key 'energy.{unknown[0]}' (valid keys: {', '.join(_ENERGY_KEYS)})")
    if "cache_bytes" not in data:
        raise InputError(f"{where}: missing key 'energy.cache_bytes'")
    defaults = EnergyFigures(cache_bytes=1)
    keyword = {key: data[key] for key in _ENERGY_KEYS if key in data and data[key] is not None}
    try:
        for key in ("mac_pj", "op_pj"):
            keyword[key] = {**getattr(defaults, key), **keyword.get(key, {})}
        if not isinstance(keyword["cache_bytes"], int) or isinstance(keyword["cache_bytes"], bool):
            raise ValueError("energy figures: cache_bytes must be a positive integer")
        return EnergyFigures(**keyword)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{where}: energy: {exc}") from None


#: Where Linux describes the first CPU's caches (``indexN/level`` and ``indexN/size``, e.g. ``32768K``).
_CACHE_DIR = "/sys/devices/system/cpu/cpu0/cache"
_SIZE_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def machine_cache_bytes(cache_dir: str = _CACHE_DIR) -> int | None:
    """This machine's last-level cache in bytes, as Linux reports it; None where it does not (other systems)."""
    best: tuple[int, int] | None = None
    for index in sorted(Path(cache_dir).glob("index*")):
        try:
            level = int((index / "level").read_text().strip())
            text = (index / "size").read_text().strip()
            size = int(text[:-1]) * _SIZE_UNITS[text[-1]] if text[-1] in _SIZE_UNITS else int(text)
        except (OSError, ValueError, IndexError):
            continue
        if size > 0 and (best is None or (level, size) > best):
            best = (level, size)
    return best[1] if best is not None else None


def dtype_class(op_type: str, kernel: str, element_type: int | None) -> str:
    """The data-type class a node computes in: int8 for int8 kernels (QLinear* ops, *Integer ops, QDQ groups a
    runtime fuses), else the class of its first output's element type (fp32 when unknown)."""
    if kernel.startswith("int8") or op_type.startswith("QLinear") or op_type in _INT8_OPS:
        return "int8"
    return _ELEMENT_CLASS.get(element_type, "fp32") if element_type is not None else "fp32"
