"""float32 arrays to float16 or bfloat16 values, with what the narrowing lost counted."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx

#: float16's largest finite value: larger float32 weights are clipped to it rather than becoming inf.
FLOAT16_MAX = float(np.finfo(np.float16).max)

#: numpy dtype of each narrow ONNX type (bfloat16 comes from ml_dtypes, which onnx itself depends on).
NUMPY_DTYPES: dict[int, np.dtype] = {onnx.TensorProto.FLOAT16: np.dtype(np.float16),
                onnx.TensorProto.BFLOAT16: np.dtype(ml_dtypes.bfloat16)}


def narrow_array(values: np.ndarray, target: int) -> tuple[np.ndarray, int, int]:
    """``values`` (float32) in the narrow type, rounded to nearest; finite values beyond float16's range
    are clipped to +-65504 (an inf weight would turn every output it touches into inf or NaN).

    Returns the array, how many values were clipped, and how many nonzero values became zero (below the
    narrow type's smallest subnormal).
    """
    dtype = NUMPY_DTYPES[target]
    clipped = 0
    if dtype == np.float16:
        finite = np.isfinite(values)
        over = finite & (np.abs(values) > FLOAT16_MAX)
        clipped = int(over.sum())
        if clipped:
            values = np.where(over, np.sign(values) * FLOAT16_MAX, values)
    narrow = values.astype(dtype)
    flushed = int(np.count_nonzero((values != 0) & (narrow == 0)))
    return narrow, clipped, flushed


def out_of_range(values: np.ndarray, target: int) -> float | None:
    """The largest finite magnitude in ``values`` if the narrow type cannot hold it, else None."""
    if NUMPY_DTYPES[target] != np.float16 or values.size == 0:
        return None
    finite = np.abs(values[np.isfinite(values)])
    peak = float(finite.max()) if finite.size else 0.0
    return peak if peak > FLOAT16_MAX else None
