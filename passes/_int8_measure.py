"""quantize's select=measured: select=latency's choice checked against a few alternatives timed in onnxruntime."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx

from nnopt.cost.timing import AA_SUFFIX, aa_noise, measure_interleaved
from nnopt.passes import _int8_select
from nnopt.pipeline.base import LayerDecision

#: Builds the model with QDQ on exactly the given layers (the float model for none).
Builder = Callable[[frozenset[str]], onnx.ModelProto]
#: At most this many toggles of the choice are timed (a region of it left float, or one layer it left float
#: made int8), those whose predicted gain is nearest zero first: where the kernel table is least sure.
MAX_TOGGLES = 8
#: Interleaved rounds, timed runs per round and untimed runs before them (one intra-op thread, thread CPU
#: time: on a shared machine other jobs' time is not counted).
ROUNDS = 5
RUNS = 10
WARMUP = 2
#: A candidate replaces select=latency's choice only when its median is faster by more than this fraction,
#: or by more than the A/A noise if that is larger: a tie keeps the deterministic choice.
MIN_MARGIN = 0.02
_FLOAT, _LATENCY, _ALL, _COMBINED = "float", "latency", "all", "combined"
_FORBIDDEN_US = _int8_select._FORBIDDEN_US / 2


@dataclass(frozen=True)
class _Toggle:
    """The choice with some layers switched: a region of it left float, or one float layer made int8."""

    label: str
    members: frozenset[str]
    variant: frozenset[str]
    adds: bool
    predicted_gain_us: float  # time the members' int8 form saves, predicted (negative: int8 costs)

    def measured_gain_us(self, measured: dict[str, float]) -> float:
        """The same, measured: the variant's time against the choice's."""
        delta = measured[self.label] - measured[_LATENCY]
        return -delta if self.adds else delta


def refine(proto: onnx.ModelProto, selected: Sequence[onnx.NodeProto], selection: _int8_select.Selection,
           build: Builder, feeds: dict[str, np.ndarray], *, max_toggles: int = MAX_TOGGLES, rounds: int = ROUNDS,
           runs: int = RUNS, rates: _int8_select.TableRates | None = None,
           threads: int = 1) -> _int8_select.Selection:
    """select=latency's ``selection`` replaced by the fastest of a few candidates timed in onnxruntime.

    Stage 1 times, interleaved, the choice (twice: an A/A copy), float, every layer of
    ``selected`` (select=all), and the choice toggled (``max_toggles``: one of its regions left float, or one
    layer it left float made int8). Stage 2 (when there is anything to confirm) times float, the choice,
    stage 1's fastest and the choice with every toggle that paid beyond the noise, in a fresh run (stage 1's
    winner is favoured by its own noise). The choice stays unless a candidate is faster beyond the noise;
    float is kept when nothing is faster than it. Each toggle's predicted gain (the kernel table's) and
    measured gain go into the report.

    Args:
        proto: The float model.
        selected: The layers select=latency chose among (recurrent ones excluded).
        selection: select=latency's result for them (its ``chosen`` may hold recurrent layers: kept).
        build: The model with QDQ on a set of layers.
        feeds: The input the models are timed on.
        max_toggles: Toggles timed (benchmarks time them all).
        rounds: Interleaved rounds of each stage (``measure_interleaved``).
        runs: Timed runs per model and round.
        rates: The kernel times select=latency used (its predicted gains are reported beside the measured).
        threads: onnxruntime intra-op threads of the timed sessions (one: timed in the calling thread's CPU
            time, which other processes' load does not inflate; more: wall time).
    """
    names = [n.name for n in selected]
    latency = frozenset(selection.chosen) & set(names)
    predict = _int8_select.predictor(proto, selected, feeds, rates)
    toggles = _toggles(proto, selection, latency, names, predict)
    toggles = sorted(toggles, key=lambda t: (abs(t.predicted_gain_us), t.label))[:max_toggles]
    # The choice first: every toggle's gain is against it, so it is timed twice (the A/A copy) and averaged.
    sets = {_LATENCY: latency, _FLOAT: frozenset(), _ALL: frozenset(names), **{t.label: t.variant for t in toggles}}
    measured, noise, aa_us = _time(sets, build, feeds, rounds, runs, threads)
    noise_us = (noise if math.isfinite(noise) else 0.0) * measured[_LATENCY]
    rows = [{"toggle": t.label, "layers": len(t.members), "predicted_gain_us": round(t.predicted_gain_us, 1),
             "measured_gain_us": round(t.measured_gain_us(measured), 1)} for t in toggles]
    paid = [t for t in toggles if t.measured_gain_us(measured) * (1 if t.adds else -1) > noise_us]
    combined = (latency | {n for t in paid if t.adds for n in t.members}) - {
        n for t in paid if not t.adds for n in t.members}
    best = _pick(measured, noise)
    finals = {_LATENCY: latency, _FLOAT: frozenset(), best: sets[best]}
    if combined not in finals.values():
        finals[_COMBINED] = combined
    stats: dict[str, Any] = {}
    if len(set(finals.values())) > 2:  # something besides float and the choice to confirm
        confirm, noise2, _ = _time(finals, build, feeds, rounds, runs, threads)
        stats["measured_confirm_us"] = {k: round(v, 1) for k, v in confirm.items()}
        best = _pick(confirm, noise2)
        sets.update(finals)
    stats = {**selection.stats, "select": "measured", "measured_choice": best,
             "measured_us": {k: round(v, 1) for k, v in measured.items()}, **stats,
             "measured_aa_us": round(aa_us, 1), "measured_aa_noise": round(noise, 4) if math.isfinite(noise)
             else None, "predicted_us": {k: round(predict(v), 1) for k, v in sets.items()}, "measured_toggles": rows}
    fixed = {n for n in selection.chosen if n not in set(names)}
    stats["select_int8_layers"] = len(sets[best] | fixed)
    return _report(selection, {n.name: n.op_type for n in selected}, sets[best] | fixed, best, toggles, rows, stats)


def _time(sets: dict[str, frozenset[str]], build: Builder, feeds: dict[str, np.ndarray], rounds: int,
          runs: int, threads: int) -> tuple[dict[str, float], float, float]:
    """(median µs per label, the A/A noise, the A/A copy's µs): each distinct model timed once, the first
    twice (two sessions; its figure is their mean)."""
    unique: dict[frozenset[str], str] = {}
    for label, members in sets.items():
        unique.setdefault(members, label)  # the same model is timed once, under its first label
    timings = measure_interleaved({label: build(members) for members, label in unique.items()}, feeds,
                                  rounds=rounds, runs=runs, warmup=WARMUP, threads=threads,
                                  clock="thread" if threads == 1 else "wall", aa=True)
    first = next(iter(unique.values()))
    copy_us = timings[first + AA_SUFFIX].median_s * 1e6
    us = {label: t.median_s * 1e6 for label, t in timings.items()}
    us[first] = (us[first] + copy_us) / 2
    return {label: us[unique[members]] for label, members in sets.items()}, aa_noise(timings, first), copy_us


def _toggles(proto: onnx.ModelProto, selection: _int8_select.Selection, latency: frozenset[str], names: list[str],
             predict: Callable[[frozenset[str]], float]) -> list[_Toggle]:
    """Each region of the choice left float, and each layer it left float with a kernel in the table made
    int8 (with the followers next to it: they are int8 only beside an int8 layer)."""
    regions: dict[int, set[str]] = {}
    for name in sorted(latency):
        region = selection.figures.get(name, {}).get("region")
        if region is not None:
            regions.setdefault(int(region), set()).add(name)
    base = predict(latency)
    toggles = [_Toggle(f"region {r} float", frozenset(m), latency - m, False, predict(latency - m) - base)
               for r, m in sorted(regions.items())]
    kinds = {e.node: e.figures.get("kind") for e in selection.declined}
    for name in names:
        if name not in latency and kinds.get(name) in _int8_select.KERNELS:
            members = frozenset({name, *_adjacent_followers(proto, name, set(names) - latency)})
            variant = latency | members
            gain = base - predict(variant)
            # Not timed: int8 there would feed a float Conv/Gemm through a DequantizeLinear, and onnxruntime
            # would quantize that layer's weights per tensor (the table's penalty; a fidelity matter).
            if gain > -_FORBIDDEN_US:
                toggles.append(_Toggle(f"{name} int8", members, variant, True, gain))
    return toggles


def _adjacent_followers(proto: onnx.ModelProto, name: str, candidates: set[str]) -> list[str]:
    """The follower ops among ``candidates`` (Relu, Clip, Reshape...) right before or after node ``name``:
    they switch with it, so a float activation between it and an int8 neighbour does not split the chain."""
    node = next(n for n in proto.graph.node if n.name == name)
    near = [n for n in proto.graph.node if n.name in candidates and n.op_type in _int8_select.FOLLOWERS
            and (set(n.output) & set(node.input) or set(n.input) & set(node.output))]
    return [n.name for n in near]


def _pick(measured: dict[str, float], noise: float) -> str:
    """The candidate kept: the fastest if it beats the choice beyond the noise, else the choice; float when
    that is not faster than float."""
    margin = max(MIN_MARGIN, noise if math.isfinite(noise) else 0.0)
    best = min(measured, key=lambda label: (measured[label], label))
    pick = best if measured[best] < measured[_LATENCY] * (1.0 - margin) else _LATENCY
    return pick if measured[pick] < measured[_FLOAT] else _FLOAT


def _report(selection: _int8_select.Selection, ops: dict[str, str], chosen: frozenset[str], pick: str,
            toggles: list[_Toggle], rows: list[dict[str, Any]], stats: dict[str, Any]) -> _int8_select.Selection:
    """The Selection of the kept candidate: report lines of the layers that changed side, and each timed
    toggle's predicted and measured gain on its layers' figures."""
    row_of = {name: row for t, row in zip(toggles, rows) for name in t.members}
    declined = []
    for e in selection.declined:  # select=latency's "(model)" verdict goes: the kept candidate has its own
        if e.node not in chosen and e.node != "(model)":
            declined.append(replace(e, figures={**e.figures, **_figures(row_of.get(e.node))}))
    if not chosen:
        declined.append(LayerDecision("(model)", "", "declined", (
            f"select=measured: no timed candidate ran faster than float here ({stats['measured_us']}): the model is "
            "left float")))
    before = {e.node: e.figures for e in selection.declined}
    figures: dict[str, dict[str, Any]] = {}
    for name in ops:
        row = row_of.get(name)
        base = {**(selection.figures.get(name) or before.get(name, {})), **_figures(row)}
        if name in chosen:
            figures[name] = {**base, "select": "int8"}
        elif name in selection.figures:  # chosen by select=latency, float in the kept candidate
            gain = "" if row is None else (f"; {row['toggle']}: int8 predicted to save {row['predicted_gain_us']:+.1f} "
                                           f"µs, measured {row['measured_gain_us']:+.1f} µs")
            declined.append(LayerDecision(name, ops[name], "declined", f"float (select=measured): the fastest timed "
                                          f"candidate ({pick}) leaves it float{gain}", {**base, "select": "float"}))
    order = {name: i for i, name in enumerate(ops)}
    kept = sorted(chosen, key=lambda n: (order.get(n, len(order)), n))
    return _int8_select.Selection(chosen=kept, declined=declined, figures=figures, stats=stats)


def _figures(row: dict[str, Any] | None) -> dict[str, Any]:
    """A layer's figures from its toggle's row: what its int8 form saves, predicted and measured (µs)."""
    if row is None:
        return {}
    return {"toggle": row["toggle"], "int8_predicted_gain_us": row["predicted_gain_us"],
            "int8_measured_gain_us": row["measured_gain_us"]}
