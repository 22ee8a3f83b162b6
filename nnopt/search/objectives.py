"""What the search may minimise (``--objective``): a registry of objectives, each a candidate's figure and its units."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nnopt.search.candidate import CandidateResult


@dataclass(frozen=True)
class Objective:
    """One objective the search can minimise.

    Attributes:
        label: What it is called in summaries and on plots (``file size``).
        value: The candidate's figure (None when it was not measured).
        steps: ``(scale, unit)`` from the largest unit to the smallest: a value is written in the first unit it
            reaches (``12.3 kB``), the smallest below that.
        plot: ``(scale, unit)`` of the plot's axis and the HTML report's table.
    """

    label: str
    value: Callable[[CandidateResult], float | None]
    steps: tuple[tuple[float, str], ...]
    plot: tuple[float, str]

    def format(self, value: float) -> str:
        """``value`` in the unit that reads best: ``30 B``, ``12.3 kB``, ``1.52 ms``, ``4 MFLOP``, ``21 uJ``."""
        scale, unit = next(((scale, unit) for scale, unit in self.steps if abs(value) >= scale), self.steps[-1])
        return f"{value / scale:.3g} {unit}"


#: ``--objective`` name -> objective. Latency is the measured one when the candidate was timed, else the estimate;
#: energy is the cost model's estimate (``nnopt.cost.energy``), never measured.
OBJECTIVES: dict[str, Objective] = {
    "size": Objective("file size", lambda r: r.size_bytes, ((1e6, "MB"), (1e3, "kB"), (1.0, "B")), (1e3, "kB")),
    "latency": Objective("latency", lambda r: r.measured_latency_s or r.latency_s,
                         ((1.0, "s"), (1e-3, "ms"), (1e-6, "us")), (1e-3, "ms")),
    "flops": Objective("FLOPs", lambda r: r.flops, ((1e9, "GFLOP"), (1e6, "MFLOP"), (1e3, "kFLOP"), (1.0, "FLOP")),
                       (1e6, "MFLOP")),
    "energy": Objective("energy (estimated)", lambda r: r.energy_j,
                        ((1.0, "J"), (1e-3, "mJ"), (1e-6, "uJ"), (1e-9, "nJ")), (1e-6, "uJ")),
}
