"""The search's report: every candidate, the Pareto front, the chosen model and why; as JSON, a PNG and text."""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nnopt.atomic import write_atomic
from nnopt.errors import InputError
from nnopt.search.candidate import CandidateResult, Configuration
from nnopt.search.objectives import OBJECTIVES


def _usable(result: CandidateResult, objective: str) -> bool:
    return not result.failed and result.metric is not None and math.isfinite(result.objective(objective))


def pareto_front(results: Iterable[CandidateResult], objective: str) -> list[CandidateResult]:
    """The candidates no other beats on both metric (higher is better) and ``objective`` (lower is better).

    Failed candidates and those without a measured objective are left out. Of candidates with equal metric
    and objective, only the one with the smallest key is kept, so the front is the same in any input order.

    Returns:
        The front from the smallest objective (and lowest metric) to the highest metric.
    """
    points = sorted((r for r in results if _usable(r, objective)),
                    key=lambda r: (r.objective(objective), -float(r.metric or 0.0), r.key))
    front: list[CandidateResult] = []
    for result in points:
        # Sorted by objective: a point is on the front when its metric beats every cheaper point's.
        if not front or float(result.metric or 0.0) > float(front[-1].metric or 0.0):
            front.append(result)
    return front


def choose(results: Iterable[CandidateResult], objective: str, max_drop: float) -> tuple[CandidateResult | None, bool]:
    """The search's answer: the smallest ``objective`` within ``max_drop``, else the closest to it.

    Ties: the higher metric, then the smaller key. Without a feasible candidate, the one of smallest drop
    (then smallest objective, then key), to report (``--strict`` exits 3 with it).

    Returns:
        (the candidate or None when every candidate failed, whether it meets the constraint).
    """
    results = list(results)
    feasible = [r for r in results if r.feasible(max_drop) and _usable(r, objective)]
    if feasible:
        return min(feasible, key=lambda r: (r.objective(objective), -float(r.metric or 0.0), r.key)), True
    measured = [r for r in results if not r.failed and r.drop is not None]
    if not measured:
        return None, False
    best = min(measured, key=lambda r: (float(r.drop or 0.0), r.objective(objective), r.key))
    return best, best.feasible(max_drop)


def decisions(config: Configuration, sensitivity: Mapping[str, float | None] | None = None) -> list[dict[str, Any]]:
    """The per-layer decisions of a configuration: one dict per parameter (layer, technique, choice, sensitivity).

    A parameter ``"LAYER/TECHNIQUE"`` is split at its last ``/`` (layer names such as ``/conv1/Conv`` hold
    slashes themselves). ``sensitivity``: parameter name -> the measured sensitivity of the choice made.
    """
    rows = []
    for name, choice in config.items():
        layer, _, technique = name.rpartition("/")
        rows.append({"layer": layer or name, "technique": technique if layer else "", "choice": choice,
                     "sensitivity": (sensitivity or {}).get(name)})
    return rows




@dataclass
class SearchReport:
    """What a search did and why it chose what it chose.

    Attributes:
        level: the search level (1, 2 or 3).
        metric: the metric's name (``top1``, ``agreement``, ``cosine``, ``module:function``).
        drop_type: ``absolute`` or ``relative``.
        max_drop: the drop allowed.
        objective: what was minimised (a key of ``nnopt.search.objectives.OBJECTIVES``).
        baseline_metric: the original model's metric on the evaluation data.
        eval_data: how the evaluation data was chosen, e.g. ``"--eval test.npz (450 samples)"`` or
            ``"a seeded 25 % split of --data (seed 0)"``.
        candidates: every candidate considered (from the study too), failed ones included.
        front: the keys of the Pareto front (metric against the objective), see ``pareto_front``.
        chosen: the key of the model returned, None when every candidate failed.
        meets_constraint: whether the chosen model's drop is within ``max_drop``.
        decisions: the chosen model's per-layer decisions, see ``decisions``.
        seconds: the search's wall time.
        evaluations: candidates evaluated by this run (not those the study already held).
        notes: anything the user should know (a stop at the time budget, a skipped technique, ...).
        original: the original model's ``size``, ``latency``, ``flops`` and ``energy`` (as ``CandidateResult.objective``),
            to show the candidates' ratios; optional.
        eval_samples: how many evaluation samples the drops are measured on (0: not recorded).
        node_costs: the input and the returned model's per-node cost side by side (``nnopt.cost.per_node``);
            None when not computed.
    """

    level: int
    metric: str
    drop_type: str
    max_drop: float
    objective: str
    baseline_metric: float
    eval_data: str
    candidates: list[CandidateResult]
    front: list[str]
    chosen: str | None
    meets_constraint: bool
    decisions: list[dict[str, Any]]
    seconds: float
    evaluations: int
    notes: list[str] = field(default_factory=list)
    original: dict[str, float | None] = field(default_factory=dict)
    eval_samples: int = 0
    node_costs: dict[str, Any] | None = None

    @classmethod
    def from_results(cls, results: Sequence[CandidateResult], *, level: int, metric: str, drop_type: str,
                     max_drop: float, objective: str, baseline_metric: float, eval_data: str, seconds: float,
                     evaluations: int, sensitivity: Mapping[str, float | None] | None = None,
                     notes: Sequence[str] = (), original: Mapping[str, float | None] | None = None) -> SearchReport:
        """A report whose front, choice and decisions are computed from ``results`` (``pareto_front``, ``choose``)."""
        chosen, meets = choose(results, objective, max_drop)
        return cls(level=level, metric=metric, drop_type=drop_type, max_drop=max_drop, objective=objective,
                   baseline_metric=baseline_metric, eval_data=eval_data, candidates=list(results),
                   front=[r.key for r in pareto_front(results, objective)],
                   chosen=chosen.key if chosen else None, meets_constraint=meets,
                   decisions=decisions(chosen.config, sensitivity) if chosen else [], seconds=seconds,
                   evaluations=evaluations, notes=list(notes), original=dict(original or {}))

    def candidate(self, key: str | None) -> CandidateResult | None:
        """The candidate of a key (e.g. ``report.candidate(report.chosen)``), or None."""
        return next((r for r in self.candidates if r.key == key), None) if key is not None else None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data: infinities and NaN become None (JSON has neither)."""
        data = {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "candidates"}
        data["candidates"] = [r.to_dict() for r in self.candidates]
        return json_safe(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchReport:
        """The report of ``to_dict`` (or of a report file read back: the fields ``nnopt.report`` adds around
        the search's own are left out)."""
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        fields["candidates"] = [CandidateResult.from_dict(c) for c in data["candidates"]]
        return cls(**fields)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    def write_json(self, path: str | os.PathLike[str]) -> None:
        """Write the report as JSON, atomically (OutputError when it cannot be written)."""
        write_atomic(path, self.to_json().encode())

    def plot_png(self) -> bytes:
        """The PNG plot: drop against the objective, every candidate grey, the front, the chosen, the max drop."""
        return _plot(self)

    def write_plot(self, path: str | os.PathLike[str]) -> None:
        """Write ``plot_png()`` to ``path``, atomically."""
        write_atomic(path, self.plot_png())

    def summary_lines(self) -> list[str]:
        """The report in a few lines for the terminal."""
        failed = sum(1 for r in self.candidates if r.failed)
        lines = [f"level {self.level}: {len(self.candidates)} candidates ({self.evaluations} evaluated by this run"
                 f"{f', {failed} failed' if failed else ''}) in {self.seconds:.1f} s; Pareto front of {len(self.front)}",
                 f"{self.metric} of the original {self.baseline_metric:.4f} on {self.eval_data}; "
                 f"max drop {self.max_drop:g} ({self.drop_type})"]
        chosen = self.candidate(self.chosen)
        if chosen is None:
            lines.append("no candidate could be evaluated")
        else:
            verdict = "chosen" if self.meets_constraint else f"no candidate within the drop of {self.max_drop:g}; the closest"
            measures = "".join(f", {part}" for part in self._measures(chosen))
            lines.append(f"{verdict}: {chosen.key}: {self.metric} {chosen.metric:.4f} (drop {chosen.drop:.4f}){measures}")
        for row in self.decisions:
            if not row.get("changed", True):  # the search's rows say which choices left the layer as it was
                continue
            sensitivity = f" (sensitivity {row['sensitivity']:.3g})" if row["sensitivity"] is not None else ""
            what = f"{row['technique']} {row['choice']}" if row["technique"] else f"{row['choice']}"
            lines.append(f"  {row['layer']}: {what}{sensitivity}")
        lines.extend(f"note: {note}" for note in self.notes)
        return lines

    def _measures(self, result: CandidateResult) -> list[str]:
        parts = []
        for name, objective in OBJECTIVES.items():
            value = result.objective(name)
            if not math.isfinite(value):
                continue
            base = self.original.get(name)
            ratio = f" ({value / base:.3f}x the original)" if base else ""
            parts.append(f"{objective.label} {objective.format(value)}{ratio}")
        return parts


def json_safe(value: Any) -> Any:
    """``value`` as plain JSON data: non-finite floats -> None, tuples -> lists, numpy scalars -> Python's."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, str | bytes):  # numpy scalars and arrays
        return json_safe(value.tolist())
    return value


def _import_matplotlib() -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise InputError("the search's plot needs matplotlib: pip install 'nnopt[search]'") from None
    return Figure, FigureCanvasAgg


def _plot(report: SearchReport) -> bytes:
    # The object-oriented API with the Agg canvas: no pyplot, no global backend switched, no display needed.
    figure_class, canvas_class = _import_matplotlib()
    figure = figure_class(figsize=(7.0, 4.5), dpi=100)
    canvas_class(figure)
    axes = figure.add_subplot()
    objective = OBJECTIVES[report.objective]
    label, (scale, unit) = objective.label, objective.plot
    base = report.original.get(report.objective)
    if base:
        label, scale, unit = f"{label} / the original's", float(base), "x"

    def xy(results: Iterable[CandidateResult]) -> tuple[list[float], list[float]]:
        kept = [r for r in results if _usable(r, report.objective) and r.drop is not None]
        return [r.objective(report.objective) / scale for r in kept], [float(r.drop or 0.0) for r in kept]

    by_key = {r.key: r for r in report.candidates}
    all_x, all_y = xy(report.candidates)
    axes.scatter(all_x, all_y, s=12, color="0.7", label=f"candidates ({len(report.candidates)})")
    front_x, front_y = xy(by_key[k] for k in report.front if k in by_key)
    axes.plot(front_x, front_y, "o-", color="tab:blue", markersize=5, drawstyle="steps-post",
              label=f"Pareto front ({len(front_x)})")
    chosen = report.candidate(report.chosen)
    if chosen is not None:
        axes.scatter(*xy([chosen]), s=160, marker="*", color="tab:red", zorder=3, label="chosen")
    axes.axhline(report.max_drop, color="tab:red", linestyle="--", linewidth=1, label=f"max drop {report.max_drop:g}")
    if all_x and min(all_x) > 0 and max(all_x) > 20 * min(all_x):  # candidates over orders of magnitude
        axes.set_xscale("log")
    axes.set_xlabel(f"{label} ({unit})" if unit != "x" else label)
    axes.set_ylabel(f"drop of {report.metric} ({report.drop_type}), lower is better")
    axes.set_title(f"level {report.level}: {report.metric} of the original {report.baseline_metric:.4f}")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="best", fontsize="small")
    figure.tight_layout()
    out = io.BytesIO()
    # No 'Software' stamp: the same report gives the same bytes whatever matplotlib's version string.
    figure.savefig(out, format="png", metadata={"Software": None})
    return out.getvalue()
