"""The search, end to end: ``search(model, data=..., level=..., max_drop=...) -> (model, report)``.

It loads the data and the metric, cleans the model losslessly (the base every candidate starts from),
builds the level's search space, evaluates candidates through an executor (with the study's cache in
front of it), picks the best candidate within the drop, rebuilds it through a verified pipeline, measures
the front's latency in onnxruntime, and writes the report.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from nnopt.errors import DataError, InputError, first_line
from nnopt.ir.model import Model, load_model
from nnopt.search.candidate import CandidateResult, Configuration, config_key
from nnopt.search.evaldata import load_search_data
from nnopt.search.evaluate import SharedInputs, build_bytes, cost_report, evaluate, run_outputs
from nnopt.search.levels import Outcome, best_of, level1, level2
from nnopt.search.metrics import DEFAULT_LABELS_KEY, resolve_metric
from nnopt.search.objectives import OBJECTIVES as OBJECTIVE_REGISTRY
from nnopt.search.report import SearchReport, choose, pareto_front
from nnopt.search.space import SearchSpace, build_space

LEVELS = (1, 2, 3)
OBJECTIVES = tuple(OBJECTIVE_REGISTRY)
DROP_TYPES = ("absolute", "relative")
#: Without --time-budget, level 3 searches this long and level 2 stops measuring and combining after this long
#: (the digits CNN needs 3 minutes; a 50-layer model would measure single choices for an hour). Level 1 has
#: no default budget: it evaluates a handful of candidates.
DEFAULT_TIME_BUDGET_S = {1: None, 2: 1800.0, 3: 600.0}
#: Share of the time budget kept for rebuilding the chosen model and measuring latencies at the end.
FINISH_RESERVE = 0.08
#: Timed runs per model per round, and rounds, when the front's latencies are measured (interleaved).
LATENCY_RUNS = 20
LATENCY_ROUNDS = 3
#: Candidates within the drop timed at the end when latency counts (the cost model's fastest few), and the
#: cost model's fastest few with int8 layers besides: it estimates int8 kernels slower than float, while
#: onnxruntime ran the orientation CNN's int8 model at 0.51x float at batch 32 (see issue #16).
LATENCY_FINALISTS = 4
INT8_FINALISTS = 2
#: Candidates evaluated together in level 3's joint search (fixed, so that any executor gives the same ones).
JOINT_BATCH = 4

Log = Callable[[str], None]


@dataclass(frozen=True)
class SearchSettings:
    """What the user asked for (the command line's flags; see ``search``)."""

    level: int
    max_drop: float
    metric: str | None = None
    labels_key: str = DEFAULT_LABELS_KEY
    drop_type: str = "absolute"
    objective: str = "size"
    time_budget: float | None = None
    workers: int | None = None
    ray_address: str | None = None
    study: str | None = None
    seed: int = 0
    strict: bool = False
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    hardware: Any = None
    load_plugins: bool = True

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise InputError(f"--level: expected 1, 2 or 3, got {self.level!r}")
        if isinstance(self.max_drop, bool) or not isinstance(self.max_drop, int | float) or not (
                0.0 <= self.max_drop <= 1.0):
            raise InputError(f"--max-drop: expected a number in [0, 1], got {self.max_drop!r}")
        if self.drop_type not in DROP_TYPES:
            raise InputError(f"--drop-type: expected absolute or relative, got {self.drop_type!r}")
        if self.objective not in OBJECTIVES:
            raise InputError(f"--objective: expected {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.time_budget is not None and not (0 < self.time_budget < math.inf):
            raise InputError(f"--time-budget: expected a positive number of seconds, got {self.time_budget!r}")
        if self.workers is not None and (isinstance(self.workers, bool) or self.workers < 1):
            raise InputError(f"--workers: expected a positive integer, got {self.workers!r}")
        if not self.labels_key.strip():
            raise InputError("--labels: expected the name of the labels array, got an empty string")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise InputError(f"--seed: expected a non-negative integer, got {self.seed!r}")


class Evaluations:
    """The search's evaluations: cached by configuration key (and in the study), run in batches by an executor."""

    def __init__(self, shared: SharedInputs, executor: Any, study: Any, log: Log | None, deadline: float | None,
                 max_drop: float, objective: str) -> None:
        self.shared, self.executor, self.study, self.log = shared, executor, study, log
        self.deadline, self.max_drop, self.objective = deadline, max_drop, objective
        self.results: dict[str, CandidateResult] = {}
        self.evaluated = 0  # evaluations run in this search (not found in the study)
        self.started = time.monotonic()

    def __call__(self, configs: list[Configuration]) -> list[CandidateResult]:
        configs = [self.shared.space.normalise(c) for c in configs]
        keys = [config_key(c) for c in configs]
        todo: dict[str, Configuration] = {}
        for key, config in zip(keys, configs):
            if key in self.results or key in todo:
                continue
            stored = self.study.get(key) if self.study is not None else None
            if stored is not None:
                self.results[key] = stored
            else:
                todo[key] = config
        if todo:
            for result in self.executor.map(evaluate, self.shared, list(todo.values())):
                self.results[result.key] = result
                self.evaluated += 1
                if self.study is not None:
                    self.study.add(result)
            self._progress()
        return [self.results[key] for key in keys]

    def _progress(self) -> None:
        if self.log is None:
            return
        best = best_of(list(self.results.values()), self.max_drop, self.objective)
        left = "" if self.deadline is None else f", {max(0.0, self.deadline - time.monotonic()):.0f} s left"
        what = ("none within the drop yet" if best is None else
                f"best {_objective_text(best, self.objective)} at drop {best.drop:+.4f}")
        self.log(f"search: {len(self.results)} candidates ({self.evaluated} evaluated), {what}{left}")


def _objective_text(result: CandidateResult, objective: str) -> str:
    return OBJECTIVE_REGISTRY[objective].format(result.objective(objective))


def search(model: Model | onnx.ModelProto | str | os.PathLike[str], *, data: str | os.PathLike[str],
           settings: SearchSettings, eval_data: str | os.PathLike[str] | None = None,
           log: Log | None = None, executor: Any = None) -> tuple[Model, SearchReport]:
    """Search for the smallest (or fastest) model whose metric drops at most ``settings.max_drop``.

    Returns the chosen model and the report. Under ``strict``, when no candidate stays
    within the drop, raises ``SearchFailed`` carrying the report with the closest candidate.
    """
    started = time.monotonic()
    budget = settings.time_budget or DEFAULT_TIME_BUDGET_S[settings.level]
    deadline = started + budget * (1 - FINISH_RESERVE) if budget is not None else None
    original = (model.to_proto() if isinstance(model, Model) else
                model if isinstance(model, onnx.ModelProto) else load_model(model).to_proto())
    if settings.level == 3:  # a missing extra fails before any work, not after level 2
        from nnopt.search.joint import import_optuna

        import_optuna()
    if executor is None:  # first: an unreachable cluster fails before any work
        executor = _make_executor(settings)
    try:
        shared, notes = _prepare(original, data, eval_data, settings, log)
    except BaseException:
        executor.close()
        raise
    study = _open_study(settings, shared, original)
    runs = Evaluations(shared, executor, study, log, deadline, settings.max_drop, settings.objective)
    try:
        outcome = _strategy(settings, shared.space, runs, deadline)
        chosen, model_out, finish_notes = _finish(shared, runs, outcome, settings, study)
    finally:
        executor.close()
    results = list(runs.results.values())
    report = SearchReport(
        level=settings.level, metric=shared.metric, drop_type=settings.drop_type, max_drop=settings.max_drop,
        objective=settings.objective, baseline_metric=shared.baseline, eval_data=notes[0], candidates=results,
        front=[r.key for r in pareto_front(results, settings.objective)],
        chosen=chosen.key if chosen is not None else _key(choose(results, settings.objective, settings.max_drop)[0]),
        meets_constraint=chosen is not None,
        decisions=_decisions(shared.space, chosen.config if chosen is not None else {}, outcome),
        seconds=time.monotonic() - started, evaluations=runs.evaluated,
        notes=[*notes[1:], *outcome.notes, *finish_notes, f"executor: {getattr(executor, 'name', 'serial')}"],
        original=_original_figures(model, original, runs), eval_samples=len(shared.eval_samples),
        node_costs=_node_costs(shared, original, model_out),
    )
    if chosen is None and settings.strict:
        closest = choose(results, settings.objective, settings.max_drop)[0]
        what = (f"the closest, {closest.key}, dropped {closest.drop:.4f} ({closest.size_bytes:,} bytes)"
                if closest is not None and closest.drop is not None else "every candidate failed")
        raise SearchFailed(f"no candidate stayed within --max-drop {settings.max_drop}: {what}", report)
    return model_out, report


def compress(model: Model | onnx.ModelProto | str | os.PathLike[str], *, data: str | os.PathLike[str],
             level: int = 2, max_drop: float = 0.01, eval_data: str | os.PathLike[str] | None = None,
             log: Log | None = None, **settings: Any) -> tuple[Model, SearchReport]:
    """The search in one call: ``nnopt.compress("m.onnx", data="calib.npz", eval_data="eval.npz", level=2,
    max_drop=0.01, metric="top1")`` returns the chosen model and the report (``SearchSettings`` names the
    other keyword arguments: objective, time_budget, workers, ray_address, study, seed, strict, ...)."""
    return search(model, data=data, eval_data=eval_data, log=log,
                  settings=SearchSettings(level=level, max_drop=max_drop, **settings))


def _key(result: CandidateResult | None) -> str | None:
    return result.key if result is not None else None


class SearchFailed(InputError):
    """Under --strict, no candidate met the constraint (exit 3); ``report`` names the closest one."""

    exit_code = 3

    def __init__(self, message: str, report: SearchReport) -> None:
        super().__init__(message)
        self.report = report


def _prepare(original: onnx.ModelProto, data: Any, eval_data: Any, settings: SearchSettings,
             log: Log | None) -> tuple[SharedInputs, list[str]]:
    """The data, the metric and its baseline, the lossless base model and the space: shared by every candidate."""
    from nnopt.api import Pipeline
    from nnopt.plugin_manager import build_plugins

    plugins = build_plugins(load_entry_points=settings.load_plugins)
    needs_labels = settings.metric == "top1"
    found = load_search_data(original, data, eval_data, seed=settings.seed, labels_key=settings.labels_key,
                             needs_labels=needs_labels)
    reference = run_outputs(original, found.eval_samples)
    metric = resolve_metric(settings.metric, plugin_metrics=plugins.metrics, labels_key=settings.labels_key,
                            reference=reference)
    try:
        baseline = metric.score(reference, found.eval_arrays, reference)
    except Exception as exc:  # boundary: a user's metric may fail in any way
        raise InputError(f"--metric {metric.name}: failed on the original model's outputs: "
                         f"{type(exc).__name__}: {first_line(exc)}") from None
    if log is not None:
        log(f"search: {found.description}; {metric.name} of the original model: {baseline:.4f}")
    base, _ = Pipeline(None, data=str(data), seed=settings.seed, input_shapes=dict(settings.input_shapes),
                       hardware=settings.hardware).run(original, plugins=plugins)
    base_proto = base.to_proto()
    techniques = ("int8",) if settings.level == 1 else ("prune", "rank", "weights")
    space = build_space(base_proto, techniques, distill=settings.level == 3 and _torch_available())
    shared = SharedInputs(base_proto.SerializeToString(), found.calibration, found.eval_samples, found.eval_arrays,
                          reference, space, metric.name, settings.labels_key, baseline, settings.drop_type,
                          settings.seed, dict(settings.input_shapes), settings.hardware, settings.load_plugins)
    return shared, [found.description, *found.notes]


def _torch_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def _strategy(settings: SearchSettings, space: SearchSpace, runs: Evaluations, deadline: float | None) -> Outcome:
    if settings.level == 1:
        return level1(space, runs, max_drop=settings.max_drop, objective=settings.objective, deadline=deadline)
    outcome = level2(space, runs, max_drop=settings.max_drop, objective=settings.objective, deadline=deadline)
    if settings.level == 3:
        outcome = _joint(settings, space, runs, deadline, outcome)
    return outcome


def _joint(settings: SearchSettings, space: SearchSpace, runs: Evaluations, deadline: float | None,
           start: Outcome) -> Outcome:
    """Level 3: Optuna's joint search over every parameter, started from level 2's best, until the deadline."""
    from nnopt.search.joint import joint_search

    seeds = [start.best.config] if start.best is not None else []
    if deadline is not None:  # leave the time the last round and the finish will take, as measured so far
        deadline -= _finish_estimate(settings, runs) + _round_estimate(runs, JOINT_BATCH)
    joint_search(space.params, runs, objective=settings.objective, max_drop=settings.max_drop, seed=settings.seed,
                 deadline=deadline if deadline is not None else math.inf, batch_size=JOINT_BATCH, start=seeds,
                 known=list(runs.results.values()))
    best = best_of(list(runs.results.values()), settings.max_drop, settings.objective)
    return dataclasses.replace(start, best=best or start.best)


def _median_seconds(runs: Evaluations) -> float:
    """The median wall time of one evaluation so far (0 before any)."""
    seconds = sorted(r.seconds for r in runs.results.values() if r.seconds > 0)
    return seconds[len(seconds) // 2] if seconds else 0.0


def _round_estimate(runs: Evaluations, batch: int) -> float:
    """How long a round of ``batch`` evaluations takes on this executor, from the evaluations so far."""
    workers = max(1, int(getattr(runs.executor, "workers", 1)))
    return math.ceil(batch / workers) * _median_seconds(runs)


def _finish_estimate(settings: SearchSettings, runs: Evaluations) -> float:
    """How long ``_finish`` will take: rebuilding its finalists (in parallel) and timing them."""
    timed = settings.objective == "latency" or settings.level == 1
    finalists = (LATENCY_FINALISTS + INT8_FINALISTS if timed else 1) + 1  # + the base model
    return _round_estimate(runs, finalists) + 2.0 * finalists  # timing: rounds of runs, sessions made


def _finish(shared: SharedInputs, runs: Evaluations, outcome: Outcome, settings: SearchSettings,
            study: Any) -> tuple[CandidateResult | None, Model, list[str]]:
    """Rebuild the finalists, measure their latency in onnxruntime against the base model, choose.

    The cost model ranks candidates during the search; the end is measured. With ``--objective latency``
    (and at level 1, which must never be slower than float) the fastest few candidates within the drop are
    timed, interleaved with the losslessly cleaned model, and the fastest measured one is kept; otherwise
    the best candidate is timed for the report. The base model is a finalist, so the result is never
    measured slower than it when latency is what counts.
    """
    feasible = sorted((r for r in runs.results.values() if r.feasible(settings.max_drop)),
                      key=lambda r: (r.objective(settings.objective), r.key))
    best = outcome.best if outcome.best is not None and outcome.best.feasible(settings.max_drop) else None
    timed = settings.objective == "latency" or settings.level == 1
    finalists = feasible[:LATENCY_FINALISTS] if timed else [best] if best is not None else []
    if timed:  # the cost model rates int8 slower than float on CPUs where it runs faster: time some anyway
        with_int8 = [r for r in feasible if "int8" in r.config.values() and r not in finalists]
        finalists += with_int8[:INT8_FINALISTS]
    base = runs([{}])[0]
    finalists = [r for r in finalists if r.key != base.key] + [base]
    built = runs.executor.map(build_bytes, shared, [r.config for r in finalists])  # in parallel, as evaluated
    protos = {r.key: onnx.load_from_string(data) for r, data in zip(finalists, built)}
    measured = _measure_latencies(protos, shared.eval_samples[0], settings.input_shapes)
    for key, seconds in measured.items():
        runs.results[key] = dataclasses.replace(runs.results[key], measured_latency_s=seconds)
        if study is not None:
            study.add(runs.results[key])  # replaces the stored result: a resumed run reports the timing too
    notes: list[str] = []
    if timed and best is not None:
        fastest = min(finalists, key=lambda r: (measured[r.key], r.key))
        if fastest.key != best.key:
            notes.append(f"measured in onnxruntime, {fastest.key} ({measured[fastest.key] * 1e6:.0f} us) beat the "
                         f"cost model's pick {best.key} ({measured.get(best.key, math.nan) * 1e6:.0f} us)"
                         if best.key in measured else f"measured fastest: {fastest.key}")
        if fastest.key == base.key and base.config != best.config:
            notes.append("no compressed candidate ran faster than the losslessly cleaned model: it is kept")
        best = fastest
    chosen = runs.results[best.key] if best is not None else None
    key = chosen.key if chosen is not None else base.key
    if study is not None:  # the models built here: the chosen one and the finalists timed
        for built, proto in protos.items():
            study.save_model(built, proto.SerializeToString())
    return chosen, Model.from_proto(protos[key], copy_proto=False), notes


def _measure_latencies(protos: dict[str, onnx.ModelProto], feeds: dict[str, Any],
                       input_shapes: dict[str, list[int]]) -> dict[str, float]:
    """Median latency of each model on one sample, over ``LATENCY_ROUNDS`` rounds that alternate the models
    (so that a burst of load on this machine hits them all alike)."""
    from nnopt.cost.timing import measure_latency

    rounds: dict[str, list[float]] = {key: [] for key in protos}
    for _ in range(LATENCY_ROUNDS):
        for key, proto in protos.items():
            timing = measure_latency(proto, feeds, runs=LATENCY_RUNS, input_shapes=input_shapes)
            rounds[key].append(float(timing["median_s"]))
    return {key: sorted(values)[len(values) // 2] for key, values in rounds.items()}


def _decisions(space: SearchSpace, config: Configuration, outcome: Outcome) -> list[dict[str, Any]]:
    """Per layer and technique: the choice made; ``sensitivity``, the outputs' distortion (1 - cosine) that
    choice caused alone; ``measured``, every choice's distortion, drop and size alone (why the others lost)."""
    rows = space.decisions(config)
    for row in rows:
        name = f"{row['layer']}/{row['technique']}"
        measured = outcome.sensitivities.get(name, {})
        row["changed"] = row["choice"] != space.params[name][0]
        made = measured.get(row["choice"])
        row["sensitivity"] = made.distortion if made is not None else None
        row["measured"] = {str(value): {"drop": r.drop, "distortion": r.distortion, "size_bytes": r.size_bytes,
                                        "error": r.error} for value, r in measured.items()}
    return rows


def _original_figures(source: Any, original: onnx.ModelProto, runs: Evaluations) -> dict[str, float | None]:
    """The original file's size, and the cleaned float model's FLOPs, latency (measured when it was timed) and
    estimated energy."""
    base = next((r for r in runs.results.values() if not r.config), None)
    on_disk = isinstance(source, str | os.PathLike) and Path(source).is_file()
    return {"size": float(Path(source).stat().st_size if on_disk else original.ByteSize()),
            "flops": base.flops if base is not None else None,
            "latency": (base.measured_latency_s or base.latency_s) if base is not None else None,
            "energy": base.energy_j if base is not None else None}


def _node_costs(shared: SharedInputs, original: onnx.ModelProto, model: Model) -> dict[str, Any]:
    """The input model's and the returned model's per-node cost side by side (``nnopt.cost.per_node``)."""
    from nnopt.cost.per_node import node_costs

    return node_costs(cost_report(shared, original).nodes, cost_report(shared, model.to_proto()).nodes)


def _make_executor(settings: SearchSettings) -> Any:
    from nnopt.search.executors import make_executor

    return make_executor(settings.workers, settings.ray_address)


def _open_study(settings: SearchSettings, shared: SharedInputs, original: onnx.ModelProto) -> Any:
    if settings.study is None:
        return None
    from nnopt.search.study import Study

    return Study.open(Path(settings.study), _fingerprint(settings, shared))


def _fingerprint(settings: SearchSettings, shared: SharedInputs) -> dict[str, Any]:
    """What makes an evaluation's result valid to reuse: the model, the data, the metric and the seed."""
    import hashlib

    def digest(*parts: bytes) -> str:
        h = hashlib.sha256()
        for p in parts:
            h.update(p)
        return h.hexdigest()[:16]

    eval_bytes = b"".join(a.tobytes() for _, a in sorted(shared.eval_arrays.items()))
    return {"model": digest(shared.base_model), "calibration": digest(shared.calibration),
            "evaluation": digest(eval_bytes), "metric": shared.metric, "labels": shared.labels_key,
            "drop_type": shared.drop_type, "seed": shared.seed, "input_shapes": shared.input_shapes,
            "hardware": getattr(shared.hardware, "name", None)}


__all__ = ["SearchFailed", "SearchSettings", "search", "DataError"]
