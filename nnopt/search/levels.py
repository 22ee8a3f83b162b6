"""The strategies of optimisation levels 1 and 2: which candidates to evaluate, and which one to keep.

Both work through ``run(configs) -> results`` (the search's evaluations: cached, possibly parallel) and
ask for whole batches at a time, in an order that depends only on earlier results, so any executor gives
the same sequence of candidates.

- Level 1: int8 for every layer; if that loses more than allowed, each layer's harm alone is measured and
  layers go back to float, most harmful first, until the drop holds.
- Level 2: every single choice of the space (one layer, one technique) is measured alone: its saving in the
  objective and its damage (the outputs' distortion against the original). A threshold on damage picks,
  for every parameter, its largest saving within the threshold; a search over the thresholds finds the
  largest one whose combination stays within the drop, measured on the evaluation data.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nnopt.search.candidate import CandidateResult, Configuration
from nnopt.search.space import SearchSpace

Run = Callable[[list[Configuration]], list[CandidateResult]]
#: Candidates evaluated together in the threshold search: fixed, not the worker count, so that the
#: sequence of candidates is the same on one worker or many.
PROBES_PER_ROUND = 4


@dataclass
class Outcome:
    """A strategy's result: the best candidate within the drop (or the closest), and what it measured."""

    best: CandidateResult | None
    sensitivities: dict[str, dict[Any, CandidateResult]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def best_of(results: list[CandidateResult], max_drop: float, objective: str) -> CandidateResult | None:
    """The feasible result with the lowest objective (ties: the higher metric, then the key)."""
    feasible = [r for r in results if r.feasible(max_drop)]
    if not feasible:
        return None
    return min(feasible, key=lambda r: (r.objective(objective), -(r.metric or 0.0), r.key))


def closest_of(results: list[CandidateResult]) -> CandidateResult | None:
    """The result with the smallest drop (when none is feasible: the one reported under --strict)."""
    ok = [r for r in results if not r.failed and r.drop is not None]
    return min(ok, key=lambda r: (r.drop, r.key)) if ok else None


def _expired(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def level1(space: SearchSpace, run: Run, *, max_drop: float, objective: str,
           deadline: float | None = None) -> Outcome:
    """int8 everywhere; layers reverted to float, most harmful first, until the drop holds."""
    params = [name for name in space.params if name.endswith("/weights")]
    everything = {name: "int8" for name in params}
    base, whole = run([{}, everything])
    if whole.feasible(max_drop) or not params:
        return Outcome(whole if whole.feasible(max_drop) else base)
    singles = dict(zip(params, run([{name: "int8"} for name in params])))
    harm = {name: (r.distortion if not r.failed and r.distortion is not None else float("inf"))
            for name, r in singles.items()}
    order = sorted(params, key=lambda name: (-harm[name], name))
    current = dict(everything)
    tried: list[CandidateResult] = [whole]
    for name in order[:-1]:
        if _expired(deadline):
            break
        del current[name]
        (result,) = run([dict(current)])
        tried.append(result)
        if result.feasible(max_drop):
            break
    best = best_of(tried, max_drop, objective)
    notes = [] if best is not None else ["no int8 configuration stayed within the drop: the float model is kept"]
    return Outcome(best or base, {name: {"int8": r} for name, r in singles.items()}, notes)


def level2(space: SearchSpace, run: Run, *, max_drop: float, objective: str,
           deadline: float | None = None) -> Outcome:
    """Per-layer sensitivity of every choice, then the largest damage threshold whose combination holds."""
    singles = [(name, value) for name, choices in space.params.items() if name != "distill"
               for value in choices[1:]]
    base, *measured = run([{}] + [{name: value} for name, value in singles])
    sensitivities: dict[str, dict[Any, CandidateResult]] = {}
    for (name, value), result in zip(singles, measured):
        sensitivities.setdefault(name, {})[value] = result
    options = _useful_choices(base, sensitivities, max_drop, objective)
    thresholds = sorted({damage for choices in options.values() for _, damage, _ in choices})
    tried = [base] + [r for r in measured if r.feasible(max_drop)]
    low, high = -1, len(thresholds) - 1  # thresholds[low] is known feasible (-1: nothing changed)
    while low < high and not _expired(deadline):
        probes = _probe_points(low, high)
        configs = [_combine(options, thresholds[i]) for i in probes]
        results = run(configs)
        tried += results
        for index, result in zip(probes, results):
            if result.feasible(max_drop):
                low = max(low, index)
            else:
                high = min(high, index - 1)
                break
    best = best_of(tried, max_drop, objective)
    return Outcome(best or base, sensitivities)


def _useful_choices(base: CandidateResult, sensitivities: dict[str, dict[Any, CandidateResult]],
                    max_drop: float, objective: str) -> dict[str, list[tuple[Any, float, float]]]:
    """Per parameter, the choices that save something alone and keep the drop alone: (value, damage, saving)."""
    reference = base.objective(objective)
    options: dict[str, list[tuple[Any, float, float]]] = {}
    for name, by_value in sensitivities.items():
        for value, result in by_value.items():
            if not result.feasible(max_drop) or result.distortion is None:
                continue
            saving = reference - result.objective(objective)
            if saving > 0:
                options.setdefault(name, []).append((value, max(result.distortion, 0.0), saving))
    return options


def _combine(options: dict[str, list[tuple[Any, float, float]]], threshold: float) -> Configuration:
    """For every parameter, its choice with the largest saving among those whose damage is within ``threshold``."""
    config: Configuration = {}
    for name, choices in sorted(options.items()):
        within = [c for c in choices if c[1] <= threshold]
        if within:
            config[name] = max(within, key=lambda c: (c[2], -c[1], str(c[0])))[0]
    return config


def _probe_points(low: int, high: int) -> list[int]:
    """Up to ``PROBES_PER_ROUND`` indices evenly inside (low, high], ascending."""
    count = min(PROBES_PER_ROUND, high - low)
    step = (high - low) / (count + 1) if count < high - low else 1
    points = sorted({min(high, low + max(1, round(step * (i + 1)))) for i in range(count)})
    return points
