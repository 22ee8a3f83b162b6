"""hashed-sharing's value fits: the least-squares K shared values of a layer, on its weights or its outputs.

A hashed layer's weight is Ŵ[i] = s[i] · v[h(i)] (h: position → bucket, s: ±1), linear in the K values v.
Without data the fit minimises ‖W − Ŵ‖, whose solution is per bucket the mean of s[i]·W[i]. With data it
minimises the layer's output error ‖Y − X·Ŵ‖ on reference activations, through the same ridge least
squares and held-out check as prune's and kmeans' refits (``nnopt.analysis.refit.refit_linear``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nnopt.analysis.refit import MAX_FIT_ROWS, fit_figures, refit_linear
from nnopt.passes import _kmeans_refit

#: A data fit solves a dense K × K system per layer (its Gram matrix and eigendecompositions; at K = 1024
#: these took 9 s per layer on the 2-core benchmark machine, at 512 about 1 s): above this many values the
#: weight fit is kept, as the report says.
MAX_FIT_VALUES = 512
#: Rows (output position × channel pairs) of the data fit, spread over the samples: 32 per unknown at
#: MAX_FIT_VALUES, and the design matrix stays below 70 MB.
FIT_ROWS = 16_384
#: Fewer data rows than this many per value and the weight fit is kept: the digits CNN's last Gemm (10
#: outputs, 32 samples of batch 1: 320 rows) fitted 640 values to an output error of 7e-6 with a held-out
#: error of 0.11, an interpolation that generalises by luck.
MIN_ROWS_PER_VALUE = 4


def weight_fit(flat: np.ndarray, buckets: np.ndarray, signs: np.ndarray, k: int) -> np.ndarray:
    """The K values minimising ‖W − s·v[h]‖ (float64): per bucket the mean of s·W; 0 for an empty bucket."""
    sums = np.bincount(buckets, weights=signs * flat.astype(np.float64), minlength=k)
    counts = np.bincount(buckets, minlength=k)
    return np.divide(sums, counts, out=np.zeros(k), where=counts > 0)


def data_fit(layer: _kmeans_refit.Layer, buckets: np.ndarray, signs: np.ndarray, values: np.ndarray,
             xs: list[np.ndarray], ys: list[np.ndarray], seed: int) -> tuple[np.ndarray, dict[str, Any] | str]:
    """The K values fitted to the layer's outputs (or ``values`` when held-out samples say no, or when the
    data has too few rows), and the report's figures (a string: why there was no fit).

    ``buckets`` and ``signs`` are weight-shaped; ``xs``/``ys`` the layer's input rows [rows, groups, values
    per group] and output rows [rows, channels] per sample (``_kmeans_refit.collect``). Each fitted row is
    one (output position, channel) pair: its design row is the input patch summed into the K buckets with
    the signs of that channel's weights, so Z·v is the layer's output at that position and channel.
    """
    k = values.size
    available = sum(x.shape[0] for x in xs) * layer.channels
    if available < MIN_ROWS_PER_VALUE * k:
        return values, f"weights: {available} rows of data for {k} values (fewer than {MIN_ROWS_PER_VALUE} per value)"
    ch_buckets = _kmeans_refit.channel_weights(layer, buckets)
    ch_signs = _kmeans_refit.channel_weights(layer, signs.astype(np.float64))
    per_group = layer.channels // layer.groups
    rng = np.random.default_rng(seed)
    per_sample = max(1, min(FIT_ROWS, MAX_FIT_ROWS) // max(1, len(xs)))
    pairs = []
    for x, y in zip(xs, ys):
        total = x.shape[0] * layer.channels
        chosen = np.sort(rng.choice(total, size=min(total, per_sample), replace=False))
        rows, channels = np.divmod(chosen, layer.channels)
        z = np.empty((chosen.size, k))
        for o in np.unique(channels):
            at = np.flatnonzero(channels == o)
            # Each row's signed inputs summed into the K buckets of channel o: one bincount for all rows,
            # row r's buckets shifted to [r·K, (r+1)·K).
            signed = x[rows[at], o // per_group, :] * ch_signs[o]
            slots = (np.arange(at.size)[:, None] * k + ch_buckets[o][None, :]).reshape(-1)
            z[at] = layer.alpha * np.bincount(slots, weights=signed.reshape(-1), minlength=at.size * k).reshape(-1, k)
        pairs.append((z, (y[rows, channels] - layer.bias[channels])[:, None]))
    result = refit_linear(pairs, values[:, None], np.zeros(1), False, rng)
    return (result.p[:, 0] if result.used else values), fit_figures(result)
