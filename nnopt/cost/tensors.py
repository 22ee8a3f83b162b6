"""What the cost model knows about tensors: element sizes as stored, and one tensor's type and shape."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx

# ---------------------------------------------------------------------------------------------- dtypes
_SUB_BYTE_BITS = {
    name: bits
    for name, bits in (
        ("INT4", 4),
        ("UINT4", 4),
        ("FLOAT4E2M1", 4),
        ("INT2", 2),
        ("UINT2", 2),
        ("FLOAT6E2M3", 6),
        ("FLOAT6E3M2", 6),
    )
    if hasattr(onnx.TensorProto, name)
}


def _build_element_bits() -> dict[int, int]:
    bits: dict[int, int] = {}
    for name, code in onnx.TensorProto.DataType.items():
        if name in ("UNDEFINED", "STRING"):
            continue  # NOTE: strings have no fixed size; their bytes are not counted.
        if name in _SUB_BYTE_BITS:
            bits[code] = _SUB_BYTE_BITS[name]
            continue
        try:
            bits[code] = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(code)).itemsize * 8
        except (KeyError, TypeError, ValueError):
            continue
    return bits


#: Bits per element of each ONNX tensor data type; sub-byte types are packed as stored on disk.
ELEMENT_BITS: dict[int, int] = _build_element_bits()


def tensor_nbytes(data_type: int | None, numel: int | None) -> int | None:
    """Bytes of ``numel`` elements of ``data_type`` as stored (sub-byte types packed, rounded up)."""
    if data_type is None or numel is None:
        return None
    bits = ELEMENT_BITS.get(data_type)
    if bits is None:
        return None
    return (numel * bits + 7) // 8


@dataclass(frozen=True)
class TensorInfo:
    """What the analysis knows about one tensor.

    Attributes:
        name: Tensor name.
        dtype: ONNX ``TensorProto.DataType`` code, or None when unknown.
        shape: The concrete shape, or None unless every dim is known.
        is_constant: True for initializers and outputs of Constant (and constant-shape ConstantOfShape)
            nodes.
    """

    name: str
    dtype: int | None
    shape: tuple[int, ...] | None
    is_constant: bool = False

    @property
    def numel(self) -> int | None:
        """Number of elements, or None when the shape is unknown."""
        return None if self.shape is None else math.prod(self.shape)

    @property
    def nbytes(self) -> int | None:
        """Bytes as stored, or None when the shape or the element size is unknown."""
        return tensor_nbytes(self.dtype, self.numel)

def norm_domain(domain: str) -> str:
    """The default domain as ``""`` (``ai.onnx`` is its other spelling)."""
    return "" if domain in ("", "ai.onnx") else domain
