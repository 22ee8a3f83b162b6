"""kmeans' binary and ternary modes: codebooks of sign(W)·α (BinaryConnect/XNOR) and {-α, 0, +α} (TWN).

Each function takes one codebook's values (a whole tensor, or one output channel with ``per_channel``) and
returns the codebook (float64) and each value's index into it (uint8), the shape ``cluster_values`` gives
for k-means; kmeans stores and decodes both the same way, so the decoder folds at load as k-means' does.
"""

from __future__ import annotations

import numpy as np

#: TWN's threshold factor (Li & Liu, "Ternary Weight Networks", 2016): Δ = 0.7 · mean|W| approximates the
#: threshold minimising ‖W − α·T‖² for normally or uniformly distributed weights.
TWN_THRESHOLD = 0.7


def binary_codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codebook [-α, +α] with α = mean|W| and index 1 for W >= 0, else 0.

    α = mean|W| minimises ‖W − α·sign(W)‖² (XNOR-Net); sign(0) is taken as +1. A tensor of zeros gets the
    one-entry codebook [0] (indices all 0), so it decodes exactly.
    """
    magnitude = np.abs(values.astype(np.float64))
    alpha = float(magnitude.mean()) if values.size else 0.0
    codes = np.zeros(values.size, dtype=np.uint8)
    if alpha == 0.0:
        return np.zeros(1), codes
    codes[values.reshape(-1) >= 0] = 1
    return np.array([-alpha, alpha]), codes


def ternary_codes(values: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Codebook [0, -α, +α] and indices: 0 for |W| <= Δ = threshold · mean|W|, else 1 (W < 0) or 2 (W > 0).

    α is the mean of |W| over the values above Δ, the least-squares scale for those signs (TWN). Zero comes
    first, as k-means' reserved zero does, so exact zeros (pruned weights) stay exact zeros; values that are
    all below Δ (or all zero) give the one-entry codebook [0].
    """
    flat = values.reshape(-1).astype(np.float64)
    magnitude = np.abs(flat)
    delta = threshold * float(magnitude.mean()) if flat.size else 0.0
    kept = magnitude > delta
    codes = np.zeros(flat.size, dtype=np.uint8)
    if not kept.any():
        return np.zeros(1), codes
    alpha = float(magnitude[kept].mean())
    codes[kept & (flat < 0)] = 1
    codes[kept & (flat > 0)] = 2
    return np.array([0.0, -alpha, alpha]), codes
