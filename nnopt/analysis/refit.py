"""Least-squares refits of a layer's weights on reference activations, validated on held-out samples.

Every data-aware reconstruction shares this: the low-rank passes refit their second factor, prune refits
the layers whose inputs lost channels. A layer's output Y (rows × channels) is fitted as Z·P + δ from what
it reads, Z; the ridge pulls P towards the weight-based solution, and a refit is used only where it lowers
the output error on samples it was not fitted on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Ridges tried by the data-aware refit, relative to each unknown's own energy (diag of ZᵀZ); the one with
#: the lowest error on held-out samples wins. A ridge pulls the refit towards the weight-fit solution along
#: directions the data barely excite, which is what keeps few or noisy rows from overfitting.
REFIT_RIDGES = (1e-6, 1e-4, 1e-2, 1.0)

#: A refit on reference data (prune's reconstruction, kmeans's centroid refit, quantize's bias correction)
#: fits on half of the samples and is judged on the other half; below this many samples there is too little
#: to fit and check on (one sample each way made small_cnn's outputs worse on two generated inputs).
MIN_REFIT_SAMPLES = 4

#: At most this many activation rows (output positions × samples) per layer enter a refit; more are
#: subsampled (seeded). Forming ZᵀZ costs rows × k², which dominates the refit.
MAX_FIT_ROWS = 50_000

@dataclass
class NormalEquations:
    """Sufficient statistics of the least-squares problem min ‖Y − Z·P − 1·δᵀ‖ over some rows.

    ``gram`` = ZaᵀZa and ``cross`` = ZaᵀY with Za = [Z, 1] when ``intercept`` (the column of ones last).
    Additive, so splits of the rows can be fitted and validated separately and then combined.
    """

    gram: np.ndarray
    cross: np.ndarray
    yy: float
    y_sum: np.ndarray
    rows: int
    intercept: bool

    @classmethod
    def empty(cls, k: int, n: int, intercept: bool) -> NormalEquations:
        ka = k + int(intercept)
        return cls(np.zeros((ka, ka)), np.zeros((ka, n)), 0.0, np.zeros(n), 0, intercept)

    def add(self, z: np.ndarray, y: np.ndarray) -> None:
        if self.intercept:
            z = np.concatenate([z, np.ones((z.shape[0], 1))], axis=1)
        self.gram += z.T @ z
        self.cross += z.T @ y
        self.yy += float(np.einsum("ij,ij->", y, y))
        self.y_sum += y.sum(axis=0)
        self.rows += z.shape[0]

    def __add__(self, other: NormalEquations) -> NormalEquations:
        return NormalEquations(
            self.gram + other.gram,
            self.cross + other.cross,
            self.yy + other.yy,
            self.y_sum + other.y_sum,
            self.rows + other.rows,
            self.intercept,
        )

    def augmented(self, p: np.ndarray, delta: np.ndarray | None) -> np.ndarray:
        if not self.intercept:
            return p
        return np.concatenate([p, (np.zeros(p.shape[1]) if delta is None else delta)[None, :]], axis=0)

    def solve(self, p0: np.ndarray, ridges: Sequence[float]) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """Ridge solutions pulled towards ``p0`` (and δ towards 0), one per ridge: a list of (P, δ or None).

        The ridge is relative to each unknown's own energy (diag of ZaᵀZa). Directions the data never
        excite keep ``p0`` whatever the ridge; weakly excited ones move towards the data as it shrinks.
        One eigendecomposition serves every ridge.
        """
        start = self.augmented(p0, None)
        diag = np.diag(self.gram).copy()
        # Columns the data never excite get a floor, so the scaling stays finite and they keep p0.
        diag = np.maximum(diag, 1e-12 * max(float(diag.mean()), 1e-300))
        scale = 1.0 / np.sqrt(diag)
        eigvals, vectors = np.linalg.eigh(self.gram * scale[:, None] * scale[None, :])
        eigvals = np.clip(eigvals, 0.0, None)
        base = vectors.T @ (self.cross * scale[:, None])
        pull = vectors.T @ (start / scale[:, None])
        solutions = []
        for ridge in ridges:
            sol = scale[:, None] * (vectors @ ((base + ridge * pull) / (eigvals + ridge)[:, None]))
            solutions.append((sol[:-1], sol[-1]) if self.intercept else (sol, None))
        return solutions

    def sq_error(self, p: np.ndarray, delta: np.ndarray | None) -> float:
        """‖Y − Z·P − 1·δᵀ‖² over these rows, from the statistics alone."""
        pa = self.augmented(p, delta)
        value = (
            self.yy
            - 2.0 * float(np.einsum("ij,ij->", pa, self.cross))
            + float(np.einsum("ij,ij->", pa, self.gram @ pa))
        )
        return max(value, 0.0)

    def sq_norm(self, bias: np.ndarray) -> float:
        """‖Y + 1·biasᵀ‖²: the squared norm of the layer's real output (Y is the output before the bias)."""
        return self.yy + 2.0 * float(bias @ self.y_sum) + self.rows * float(bias @ bias)


@dataclass
class Refit:
    """The outcome of a data-aware refit of a layer's linear map."""

    p: np.ndarray
    delta: np.ndarray | None
    used: bool
    figures: dict[str, Any]


def refit_linear(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    p0: np.ndarray,
    bias: np.ndarray,
    intercept: bool,
    rng: np.random.Generator,
) -> Refit:
    """Refit P (and a bias correction δ) so that Z·P + δ matches the layer's real output Y.

    Args:
        pairs: per sample, (Z, Y): what the rewritten layer's map reads (a low-rank pass's first factor
            output, a pruned layer's input patches) and the original layer's output before its bias, both
            (rows × channels) in float64.
        p0: the weight-based P (k × n), the starting point and the fallback.
        bias: the layer's original bias (n,), zeros if it has none; errors are relative to ‖Y + bias‖.
        intercept: whether a bias correction may be fitted (the rewritten layer can carry a bias).
        rng: seeded stream for subsampling rows.

    The refit is validated before it is used: fitted on half of the samples (alternate rows when there is
    one sample) with each ridge of ``REFIT_RIDGES``, and kept only if the best of them lowers the output
    error on the other half; the final refit then uses all rows with that ridge. Errors are relative
    Frobenius norms of the layer output (bias included).
    """
    k, n = p0.shape
    cap = max(1, MAX_FIT_ROWS // max(1, len(pairs)))
    halves = (NormalEquations.empty(k, n, intercept), NormalEquations.empty(k, n, intercept))
    for index, (z, y) in enumerate(pairs):
        if z.shape[0] > cap:
            keep = np.sort(rng.choice(z.shape[0], size=cap, replace=False))
            z, y = z[keep], y[keep]
        if len(pairs) >= 2:
            halves[index % 2].add(z, y)
        else:
            halves[0].add(z[0::2], y[0::2])
            halves[1].add(z[1::2], y[1::2])
    fit, held = halves
    total = fit + held
    norm_all = math.sqrt(max(total.sq_norm(bias), 1e-300))
    norm_held = math.sqrt(max(held.sq_norm(bias), 1e-300))

    held_before = math.sqrt(held.sq_error(p0, None)) / norm_held
    trials = [math.sqrt(held.sq_error(p, d)) / norm_held for p, d in fit.solve(p0, REFIT_RIDGES)]
    best = int(np.argmin(trials))
    held_after = trials[best]
    used = held.rows > 0 and held_after < held_before
    p, delta = total.solve(p0, [REFIT_RIDGES[best]])[0] if used else (p0, None)
    figures = {
        "fit_rows": total.rows,
        "ridge": REFIT_RIDGES[best],
        "output_error_weight_fit": math.sqrt(total.sq_error(p0, None)) / norm_all,
        "output_error": math.sqrt(total.sq_error(p, delta)) / norm_all,
        "heldout_error_weight_fit": held_before,
        "heldout_error_refit": held_after,
    }
    return Refit(p, delta, used, figures)


def fit_figures(refit: Refit) -> dict[str, Any]:
    """The per-layer report entries of a refit, floats rounded for reading."""
    out: dict[str, Any] = {"fit": "data" if refit.used else "weights"}
    for key, value in refit.figures.items():
        out[key] = round(value, 6) if isinstance(value, float) else value
    return out
