"""quantize's select=measured: select=latency's choice checked against a few alternatives timed in onnxruntime."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx

from nnopt.cost.timing import AA_SUFFIX, aa_noise, measure_interleaved
from nnopt.passes import _int8_select
from nnopt.pipeline.base import LayerDecision

#: Builds the model with QDQ on exactly the given layers (the float model for none).
Builder = Callable[[frozenset[str]], onnx.ModelProto]
#: At most this many of the choice's regions are timed left float, those with the smallest predicted gain
#: first: where the table is least sure that int8 pays.
MAX_REGIONS = 8
#: Interleaved rounds, timed runs per round and untimed runs before them (one intra-op thread, thread CPU
#: time: on a shared machine other jobs' time is not counted).
ROUNDS = 5
RUNS = 10
WARMUP = 2
#: A candidate replaces select=latency's choice only when its median is faster by more than this fraction,
#: or by more than the A/A noise if that is larger: a tie keeps the deterministic choice.
MIN_MARGIN = 0.02
_FLOAT, _LATENCY, _ALL = "float", "latency", "all"


def refine(proto: onnx.ModelProto, selected: Sequence[onnx.NodeProto], selection: _int8_select.Selection,
           build: Builder, feeds: dict[str, np.ndarray], *, max_regions: int = MAX_REGIONS, rounds: int = ROUNDS,
           runs: int = RUNS) -> _int8_select.Selection:
    """select=latency's ``selection`` replaced by the fastest of a few candidates timed in onnxruntime.

    Candidates: float, the choice, every layer of ``selected`` (select=all), and the choice with one of its
    regions left float (at most ``MAX_REGIONS``). They are timed interleaved with an A/A copy of the float
    model; the choice stays unless a candidate is faster beyond the noise, and the float model is kept when
    no candidate is faster than it. Each region's predicted gain (the kernel table's) and measured gain
    (time without it minus time with it) go into the report.

    Args:
        proto: The float model.
        selected: The layers select=latency chose among (recurrent ones excluded).
        selection: select=latency's result for them (its ``chosen`` may hold recurrent layers: kept).
        build: The model with QDQ on a set of layers.
        feeds: The input the models are timed on.
        max_regions: Regions timed left float (benchmarks time them all).
        rounds: Interleaved rounds (``measure_interleaved``).
        runs: Timed runs per model and round.
    """
    names = [n.name for n in selected]
    latency = frozenset(selection.chosen) & set(names)
    fixed = [n for n in selection.chosen if n not in set(names)]
    predict = _predictor(proto, selected, feeds)
    regions = _regions(selection, latency)
    gains = {r: predict(latency - members) - predict(latency) for r, members in regions.items()}
    timed = sorted(regions, key=lambda r: (gains[r], r))[:max_regions]
    sets = {_FLOAT: frozenset(), _LATENCY: latency, _ALL: frozenset(names)}
    sets.update({f"region {r} float": latency - regions[r] for r in timed})
    unique: dict[frozenset[str], str] = {}
    for label, members in sets.items():
        unique.setdefault(members, label)  # the same model is timed once, under its first label
    timings = measure_interleaved({label: build(members) for members, label in unique.items()}, feeds,
                                  rounds=rounds, runs=runs, warmup=WARMUP, threads=1, clock="thread", aa=True)
    measured = {label: timings[unique[members]].median_s * 1e6 for label, members in sets.items()}
    noise = aa_noise(timings, _FLOAT)
    pick = _pick(measured, noise)
    regions_report = [{"region": r, "layers": len(regions[r]), "predicted_gain_us": round(gains[r], 1),
                       "measured_gain_us": round(measured[f"region {r} float"] - measured[_LATENCY], 1)}
                      for r in timed]
    stats = {**selection.stats, "select": "measured", "measured_choice": pick,
             "measured_us": {k: round(v, 1) for k, v in measured.items()},
             "measured_float_aa_us": round(timings[_FLOAT + AA_SUFFIX].median_s * 1e6, 1),
             "measured_aa_noise": round(noise, 4) if math.isfinite(noise) else None,
             "predicted_us": {k: round(predict(v), 1) for k, v in sets.items()},
             "measured_regions": regions_report}
    stats["select_int8_layers"] = len(sets[pick] | set(fixed))
    ops = {n.name: n.op_type for n in selected}
    return _report(selection, ops, sets[pick] | set(fixed), pick, regions, regions_report, stats)


def _predictor(proto: onnx.ModelProto, selected: Sequence[onnx.NodeProto],
               feeds: dict[str, np.ndarray]) -> Callable[[frozenset[str]], float]:
    """Predicted µs (select=latency's kernel table, region edges included) of the model with a set of layers
    int8."""
    # NOTE: the cost model is _int8_select's own (its internals: the Selection API has no per-set figure).
    shapes, floats = _int8_select._shapes(proto, feeds)
    layers = {n.name: _int8_select._describe(n, shapes) for n in selected}
    cost = _int8_select._CostModel(proto, layers, shapes, floats)
    return lambda chosen: cost.total(cost.effective(set(chosen)))


def _regions(selection: _int8_select.Selection, latency: frozenset[str]) -> dict[int, frozenset[str]]:
    """Region number -> its layers, as select=latency numbered them."""
    regions: dict[int, set[str]] = {}
    for name in latency:
        region = selection.figures.get(name, {}).get("region")
        if region is not None:
            regions.setdefault(int(region), set()).add(name)
    return {r: frozenset(members) for r, members in sorted(regions.items())}


def _pick(measured: dict[str, float], noise: float) -> str:
    """The candidate kept: the fastest if it beats the choice beyond the noise, else the choice; float when
    that is not faster than float."""
    margin = max(MIN_MARGIN, noise if math.isfinite(noise) else 0.0)
    best = min(measured, key=lambda label: (measured[label], label))
    pick = best if measured[best] < measured[_LATENCY] * (1.0 - margin) else _LATENCY
    return pick if measured[pick] < measured[_FLOAT] else _FLOAT


def _report(selection: _int8_select.Selection, ops: dict[str, str], chosen: set[str], pick: str,
            regions: dict[int, frozenset[str]], regions_report: list[dict[str, Any]],
            stats: dict[str, Any]) -> _int8_select.Selection:
    """The Selection of the kept candidate: the report lines of layers that changed side, and each latency
    region's predicted and measured gain on its layers."""
    by_region = {row["region"]: row for row in regions_report}
    region_of = {name: r for r, members in regions.items() for name in members}
    figures: dict[str, dict[str, Any]] = {}
    # select=latency's "(model)" line (nothing pays) goes: the kept candidate has its own verdict.
    declined = [e for e in selection.declined if e.node not in chosen and e.node != "(model)"]
    if not chosen:
        declined.append(LayerDecision("(model)", "", "declined", (
            f"select=measured: no timed candidate ran faster than float here ({stats['measured_us']}): the model is "
            "left float")))
    before = {e.node: e for e in selection.declined}
    for name in ops:
        base = dict(selection.figures.get(name) or (before[name].figures if name in before else {}))
        row = by_region.get(region_of.get(name, -1))
        if row is not None:
            base.update(region_predicted_gain_us=row["predicted_gain_us"], region_measured_gain_us=row["measured_gain_us"])
        if name in chosen:
            figures[name] = {**base, "select": "int8"}
        elif name in selection.figures:  # chosen by select=latency, float in the kept candidate
            base["select"] = "float"
            gain = "" if row is None else (f"; its region {row['region']}: predicted gain {row['predicted_gain_us']:+.1f} "
                                           f"µs, measured {row['measured_gain_us']:+.1f} µs")
            declined.append(LayerDecision(name, ops[name], "declined",
                                          f"float (select=measured): the fastest timed candidate ({pick}) leaves it "
                                          f"float{gain}", base))
    order = {name: i for i, name in enumerate(ops)}
    kept = sorted(chosen, key=lambda n: (order.get(n, len(order)), n))
    return _int8_select.Selection(chosen=kept, declined=declined, figures=figures, stats=stats)
