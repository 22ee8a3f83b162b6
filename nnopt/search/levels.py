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

import numpy as np

from nnopt.search.candidate import CandidateResult, Configuration
from nnopt.search.report import choose
from nnopt.search.space import SearchSpace

Run = Callable[[list[Configuration]], list[CandidateResult]]
#: Candidates evaluated together in the threshold search: fixed, not the worker count, so that the
#: sequence of candidates is the same on one worker or many.
PROBES_PER_ROUND = 4
#: Single choices measured per round of level 2's sensitivity phase (the deadline is checked between rounds).
SINGLES_PER_ROUND = 8
#: Share of level 2's time left after the uniform candidates that measuring single choices may take.
SENSITIVITY_SHARE = 0.7


@dataclass
class Outcome:
    """A strategy's result: the best candidate within the drop (or the closest), and what it measured."""

    best: CandidateResult | None
    sensitivities: dict[str, dict[Any, CandidateResult]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def best_of(results: list[CandidateResult], max_drop: float, objective: str) -> CandidateResult | None:
    """The feasible result with the lowest objective (ties: the higher metric, then the key), or None
    (the report's ``choose``, which also names the closest when none is feasible)."""
    chosen, meets = choose(results, objective, max_drop)
    return chosen if meets else None


def _expired(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def level1(space: SearchSpace, run: Run, *, max_drop: float, objective: str,
           deadline: float | None = None) -> Outcome:
    """int8 everywhere; layers reverted to float, most harmful first, until the drop holds."""
    params = [name for name in space.params if name.endswith("/weights")]
    everything = {name: "int8" for name in params}
    base, whole = run([{}, everything])
    if whole.feasible(max_drop) or not params or whole.failed:
        return Outcome(whole if whole.feasible(max_drop) else base, {n: {"int8": whole} for n in params})
    order = harm_order(whole, params)
    # Reverting the k most harmful layers: the smallest k that holds the drop, found with batches of probes.
    low, high = 0, len(order)  # reverting `high` layers (all) is the float model: known to hold
    tried: list[CandidateResult] = [whole]
    while high - low > 1 and not _expired(deadline):
        probes = [k for k in _probe_points(low, high - 1) if k > low]
        results = run([{name: "int8" for name in order[k:]} for k in probes])
        tried += results
        for k, result in zip(probes, results):
            if result.feasible(max_drop):
                high = min(high, k)
                break
            low = max(low, k)
    best = best_of(tried, max_drop, objective)
    notes = [f"{high} of {len(order)} int8 layers reverted to float, most harmful first: {_names(order[:high])}"
             ] if best is not None and 0 < high < len(order) else []
    if best is None:
        notes.append("no int8 configuration stayed within the drop: the float model is kept")
    return Outcome(best or base, {n: {"int8": whole} for n in params}, notes)


def _names(params: list[str], shown: int = 8) -> str:
    names = [name.rsplit("/", 1)[0] for name in params]
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def harm_order(quantized: CandidateResult, params: list[str]) -> list[str]:
    """``LAYER/weights`` parameters, the most harmful int8 layer first: lowest own SQNR (the noise the layer
    adds itself), else the lowest SQNR of its output, as the quantize pass measured them on the data."""
    layers = quantized.extra.get("layers", {})

    def sqnr(name: str) -> float:
        figures = layers.get(name.rsplit("/", 1)[0], {})
        value = figures.get("own_sqnr_db", figures.get("sqnr_db"))
        return float(value) if value is not None else float("inf")

    return sorted(params, key=lambda name: (sqnr(name), name))


def level2(space: SearchSpace, run: Run, *, max_drop: float, objective: str,
           deadline: float | None = None) -> Outcome:
    """Uniform settings first, then per-layer sensitivity of every choice, then the largest damage threshold
    whose combination holds the drop."""
    base, *uniform = run([{}] + uniform_configs(space))
    tried = [base] + uniform
    sensitivities: dict[str, dict[Any, CandidateResult]] = {}
    singles = single_choices(space)
    notes: list[str] = []
    # The sensitivity phase may take most of the time, not all: the combinations are what is returned.
    measuring_until = None if deadline is None else time.monotonic() + SENSITIVITY_SHARE * max(
        0.0, deadline - time.monotonic())
    for start in range(0, len(singles), SINGLES_PER_ROUND):
        if _expired(measuring_until):
            notes.append(f"time budget reached: {start} of {len(singles)} single choices measured (the largest "
                         "layers first); the others were not tried")
            break
        chunk = singles[start:start + SINGLES_PER_ROUND]
        for (name, value), result in zip(chunk, run([{name: value} for name, value in chunk])):
            sensitivities.setdefault(name, {})[value] = result
            tried.append(result)
    options = _useful_choices(base, sensitivities, max_drop, objective)
    thresholds = sorted({damage for choices in options.values() for _, damage, _ in choices})
    low, high = -1, len(thresholds) - 1  # thresholds[low] is known feasible (-1: nothing changed)
    while low < high and not _expired(deadline):
        probes = _probe_points(low, high)
        results = run([_combine(options, thresholds[i]) for i in probes])
        tried += results
        for index, result in zip(probes, results):
            if result.feasible(max_drop):
                low = max(low, index)
            else:
                high = min(high, index - 1)
                break
    best = best_of(tried, max_drop, objective)
    return Outcome(best or base, sensitivities, notes)


def uniform_configs(space: SearchSpace) -> list[Configuration]:
    """One candidate per (technique, choice) applied to every layer that has the parameter: cheap, and a
    good answer on models with many similar layers."""
    by_technique: dict[str, list[str]] = {}
    for name in space.params:
        if "/" in name:
            by_technique.setdefault(name.rsplit("/", 1)[1], []).append(name)
    configs = []
    for names in by_technique.values():
        values = list(dict.fromkeys(v for name in names for v in space.params[name][1:]))
        configs += [{name: value for name in names if value in space.params[name]} for value in values]
    return configs


def single_choices(space: SearchSpace) -> list[tuple[str, Any]]:
    """Every (parameter, choice) other than "no change", the largest layers first (they save the most)."""
    size = {layer.name: int(np.prod(layer.weight_shape)) for layer in space.layers}
    names = [n for n in space.params if n != "distill"]
    names.sort(key=lambda n: (-size.get(n.rsplit("/", 1)[0], 0), n))
    return [(name, value) for name in names for value in space.params[name][1:]]


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
