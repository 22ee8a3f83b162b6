"""PassManager: run passes one by one, check, measure and verify each, and roll back the ones that fail."""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import onnx

from nnopt.analysis.manager import AnalysisManager, AnalysisSettings, Checkpoint
from nnopt.errors import OptionError, PassFailedError, first_line
from nnopt.ir.model import Model
from nnopt.pipeline.base import LayerDecision, Pass, PassContext, PassResult, PassStatus
from nnopt.pipeline.progress import Progress
from nnopt.pipeline.verify import (
    LOSSLESS_ATOL,
    LOSSLESS_TOLERANCE,
    Fidelity,
    Verifier,
    compare_outputs,
    lossless_excess,
    passes_strict_shape_inference,
    validity_problems,
)
from nnopt.runtime import RunTimeLimitExceeded

log = logging.getLogger(__name__)

#: The cost totals compared before/after each pass and shown in the table.
DELTA_KEYS = ("params", "macs", "flops", "weight_bytes", "activation_bytes", "latency_s", "nodes")


@dataclass(frozen=True)
class Budget:
    """How far a lossy pipeline may drift from the original model's outputs (None: unbounded).

    Each limit is a finite number within ``RANGES`` (checked here, so the command line, pipeline files and
    the Python API refuse the same values: ``nan``, a cosine of 2, a top-1 of 7).
    """

    #: The allowed range of each limit (None: unbounded on that side).
    RANGES: ClassVar[dict[str, tuple[float, float | None]]] = {
        "max_rel_error": (0.0, None),
        "min_cosine": (-1.0, 1.0),
        "min_top1": (0.0, 1.0),
    }

    max_rel_error: float | None = None
    min_cosine: float | None = None
    min_top1: float | None = None

    def __post_init__(self) -> None:
        for key in self.RANGES:
            value = getattr(self, key)
            if value is not None:
                try:
                    object.__setattr__(self, key, self.checked(key, value))
                except ValueError as exc:
                    raise OptionError(f"budget {key}: {exc}") from None

    @classmethod
    def wanted(cls, key: str) -> str:
        """What a value of the limit ``key`` must be, for messages: ``a number from 0 to 1``."""
        low, high = cls.RANGES[key]
        return f"a number from {low:g} to {high:g}" if high is not None else f"a number of at least {low:g}"

    @classmethod
    def checked(cls, key: str, value: Any) -> float:
        """``value`` as a float if it is a finite number within ``RANGES[key]``, else a ValueError saying why."""
        low, high = cls.RANGES[key]
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ValueError(f"expected {cls.wanted(key)}, got {value!r}")
        if not (value >= low and (high is None or value <= high)):  # also rejects nan
            raise ValueError(f"{value!r} is out of range: expected {cls.wanted(key)}")
        return float(value)

    def violation(self, fidelity: Fidelity) -> str | None:
        if self.max_rel_error is not None and not fidelity.max_rel_error <= self.max_rel_error:
            return f"relative error {fidelity.max_rel_error:.3g} exceeds the budget {self.max_rel_error:g}"
        if self.min_cosine is not None and not fidelity.cosine_similarity >= self.min_cosine:
            return f"cosine similarity {fidelity.cosine_similarity:.6f} is below the budget {self.min_cosine:g}"
        if self.min_top1 is not None and fidelity.top1_agreement is not None and fidelity.top1_agreement < self.min_top1:
            return f"top-1 agreement {fidelity.top1_agreement:.4f} is below the budget {self.min_top1:g}"
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"max_rel_error": self.max_rel_error, "min_cosine": self.min_cosine, "min_top1": self.min_top1}

    @property
    def is_set(self) -> bool:
        """Whether any limit is given."""
        return any(getattr(self, key) is not None for key in self.RANGES)


@dataclass
class PassRecord:
    """What happened to one pass: its status and why, cost before/after, fidelity, time, its own report."""

    name: str
    options: dict[str, Any]
    lossy: bool
    iteration: int
    status: PassStatus = "applied"
    reason: str = ""
    seconds: float = 0.0
    verify_seconds: float = 0.0
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    fidelity: dict[str, Any] | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    layers: list[dict[str, Any]] = field(default_factory=list)
    #: A rolled-back pass's cost totals as it would have left the model (empty if it could not be costed);
    #: in ``to_dict`` only for rolled-back records.
    attempted: dict[str, Any] = field(default_factory=dict)

    @property
    def newly_uncosted(self) -> int:
        """How many more nodes the cost model could not cost after the pass than before: their FLOPs and
        latency count 0, so the pass's FLOPs and latency changes cannot be told (its ``delta`` says None)."""
        before, after = self.before.get("uncosted_nodes"), self.after.get("uncosted_nodes")
        return max(0, int(after) - int(before)) if isinstance(before, int) and isinstance(after, int) else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "options": self.options,
            "lossy": self.lossy,
            "iteration": self.iteration,
            "status": self.status,
            "reason": self.reason,
            "seconds": round(self.seconds, 6),
            "verify_seconds": round(self.verify_seconds, 6),
            "before": self.before,
            "after": self.after,
            "delta": {k: None if k in _UNCOSTED_HIDES and self.newly_uncosted else _delta(self.before.get(k),
                                                                                           self.after.get(k))
                      for k in DELTA_KEYS if k in self.before},
            "fidelity": self.fidelity,
            "stats": self.stats,
            "layers": self.layers,
            # Only where there was a rejected attempt: every other record reads as it always has.
            **({"attempted": self.attempted} if self.status == "rolled_back" else {}),
        }


@dataclass
class PipelineReport:
    passes: list[PassRecord] = field(default_factory=list)
    original: dict[str, Any] = field(default_factory=dict)
    final: dict[str, Any] = field(default_factory=dict)
    fidelity: dict[str, Any] | None = None
    verification: str = "onnxruntime"
    notes: list[str] = field(default_factory=list)
    #: The run's budget and hardware profile name, for the table (not part of ``to_dict``).
    budget: Budget | None = None
    hardware: str = ""
    #: The input and output models' per-node cost side by side (``nnopt.cost.per_node``); None when the
    #: manager was given its own ``analyze`` (no per-node figures).
    node_costs: dict[str, Any] | None = None

    @property
    def rolled_back(self) -> list[PassRecord]:
        return [r for r in self.passes if r.status == "rolled_back"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "passes": [r.to_dict() for r in self.passes],
            "original": self.original,
            "final": self.final,
            "fidelity": self.fidelity,
            "verification": self.verification,
            "notes": self.notes,
            **({"node_costs": self.node_costs} if self.node_costs is not None else {}),
        }

    def format_table(self, file_bytes: tuple[int, int] | None = None) -> str:
        """The table a person reads (``nnopt.pipeline.table``); ``file_bytes``: the input and output files'
        sizes on disk, for the summary line (known only once the model is written)."""
        from nnopt.pipeline.table import format_report

        return format_report(self, file_bytes)


#: Maps an exported model to its cost totals (for callers that cost models their own way, e.g. tests).
Analyzer = Callable[[onnx.ModelProto], dict[str, Any]]


@dataclass
class _Current:
    """The last verified state of the model: what a rollback restores and the next pass is compared with."""

    snapshot: onnx.ModelProto
    cost: dict[str, Any]
    checkpoint: Checkpoint
    outputs: list[list[Any]] | None
    fidelity: Fidelity | None = None


@dataclass
class _Verdict:
    """The checks of one changed model: ``problem`` None means keep it."""

    problem: str | None
    outputs: list[list[Any]] | None = None
    #: The outputs against the original model's, and against the model's before the pass.
    total: Fidelity | None = None
    step: Fidelity | None = None
    cost: dict[str, Any] = field(default_factory=dict)

    def fidelity_record(self) -> dict[str, Any] | None:
        """The report's fidelity of the pass: against the original model, plus the step's relative error."""
        if self.total is None or self.step is None:
            return None
        return {**self.total.to_dict(), "step_max_rel_error": self.step.max_rel_error}


class PassManager:
    """Runs a list of passes with verification and rollback.

    For each pass: run (through the ``nnopt_run_pass`` hook) → export once → validate (onnx checker; strict
    shape inference when the input model passed it) → numerical check in onnxruntime against the model
    before the pass (lossless passes, ``LOSSLESS_TOLERANCE``) and against the original model (the lossy
    ``budget``) → cost analysis → keep, or restore the last verified snapshot and record why.

    The model's analyses (``nnopt.analysis.manager``) live in ``ctx.analyses`` for the whole run: the
    export and cost report of each kept version are what the next pass reads, so a pass that changes the
    model costs one export and an unchanged pass none.

    Args:
        passes: pass instances, in order.
        settings: input shapes, hardware profile and cost rules the analyses (the cost report) use.
        analyze: maps a ModelProto to the cost totals dict, instead of the cost report's totals.
        verifier: reference inputs and outputs; None skips numerical checks.
        budget: the lossy budget, measured against the original model.
        strict: raise ``PassFailedError`` at the first rollback.
        fixed_point: repeat the whole list until an iteration applies nothing (at most ``max_iterations``).
        hook: the pluggy hook relay (``nnopt_run_pass``, ``nnopt_after_pass``); None calls ``run`` directly.
        progress: told when each pass starts and ends, and (through ``ctx.progress``) how far a slow pass
            has got; None shows nothing.
    """

    def __init__(
        self,
        passes: list[Pass],
        *,
        settings: AnalysisSettings | None = None,
        analyze: Analyzer | None = None,
        verifier: Verifier | None = None,
        budget: Budget | None = None,
        strict: bool = False,
        fixed_point: bool = False,
        max_iterations: int = 4,
        hook: Any = None,
        progress: Progress | None = None,
    ) -> None:
        self.passes = passes
        self.settings = settings or AnalysisSettings()
        self.analyze = analyze
        self.verifier = verifier
        self.budget = budget or Budget()
        self.strict = strict
        self.fixed_point = fixed_point
        self.max_iterations = max_iterations
        self.hook = hook
        self.progress = progress or Progress()

    def run(self, model: Model, ctx: PassContext | None = None) -> PipelineReport:
        """Run the pipeline on ``model`` in place and return the report."""
        with _outside_cycle_collection():
            return self._run(model, ctx or PassContext())

    def _run(self, model: Model, ctx: PassContext) -> PipelineReport:
        if ctx.hook is None:
            ctx.hook = self.hook
        if ctx.on_progress is None:
            ctx.on_progress = self.progress.layer
        if ctx.analyses is None or ctx.analyses.model is not model:
            ctx.analyses = AnalysisManager(model, self.settings)
        analyses = ctx.analyses
        report = PipelineReport(budget=self.budget, hardware=self._hardware_name())
        snapshot = analyses.proto()
        self._strict_shapes = passes_strict_shape_inference(snapshot)
        if not self._strict_shapes:
            report.notes.append("the input model fails strict ONNX shape inference; validity is checked with the checker only")
        self._active_verifier = self.verifier if self.verifier is not None and self.verifier.unavailable is None else None
        if self.verifier is None:
            report.verification = "disabled"
        elif self.verifier.unavailable is not None:
            report.verification = self.verifier.unavailable
        if self._active_verifier is not None:
            report.notes.extend(self._verification_notes(self._active_verifier))
        reference = self._active_verifier.reference if self._active_verifier else None
        current = _Current(snapshot, self._totals(analyses), analyses.checkpoint(), reference)
        report.original = current.cost
        # The cost report the totals came from: its per-node figures, for node_costs (no extra analysis).
        original_nodes = analyses.cost().nodes if self.analyze is None else None

        try:
            self._iterate(model, ctx, report, current)
        except PassFailedError as exc:  # --strict: the report so far (the model as last verified) goes with it
            self._finish(report, current, analyses, original_nodes)
            exc.report = report
            raise
        finally:
            self.progress.finished()
        self._finish(report, current, analyses, original_nodes)
        return report

    def _finish(self, report: PipelineReport, current: _Current, analyses: AnalysisManager,
                original_nodes: list[dict[str, Any]] | None) -> None:
        """The report's final figures: the last verified model's cost (totals and per node) and fidelity, and
        where it was measured."""
        from nnopt.cost.per_node import node_costs

        report.final = current.cost
        if original_nodes is not None:  # the model is the last verified version: its cost report is cached
            report.node_costs = node_costs(original_nodes, analyses.cost().nodes)
        report.notes.extend(_uncosted_notes(report))
        verifier = self._active_verifier
        if verifier is not None:
            reference = verifier.reference
            report.fidelity = {**(current.fidelity or compare_outputs(reference, reference)).to_dict(),
                               "source": "generated inputs" if verifier.generated else "user data"}

    def _iterate(self, model: Model, ctx: PassContext, report: PipelineReport, current: _Current) -> None:
        """Run the passes in order; in fixed-point mode again, until an iteration applies nothing."""
        for iteration in range(self.max_iterations if self.fixed_point else 1):
            applied_any = False
            for position, pass_ in enumerate(self.passes, start=1):
                record = PassRecord(pass_.name, pass_.options.to_dict(), pass_.lossy, iteration, before=current.cost)
                report.passes.append(record)
                self.progress.pass_started(pass_.name, position, len(self.passes), iteration)
                applied_any |= self._step(pass_, model, ctx, record, current)
                self._after(record, model)
            if not applied_any:
                break

    def _hardware_name(self) -> str:
        """The profile the latency estimates are for ("" when the caller costs models its own way)."""
        from nnopt.cost.hardware import DEFAULT_PROFILE

        if self.analyze is not None:
            return ""
        return (self.settings.hardware or DEFAULT_PROFILE).name

    def _verification_notes(self, verifier: Verifier) -> list[str]:
        """How the budget is judged, for the report; refuses a top-1 budget no output can be scored on."""
        notes = list(verifier.notes)
        scored = compare_outputs(verifier.reference, verifier.reference).top1_agreement is not None
        if self.budget.min_top1 is not None and not scored:
            raise OptionError(
                "budget min_top1: no output of the model looks like class scores (a float [batch, classes] "
                "tensor); use min_cosine or max_rel_error"
            )
        if self.budget.is_set and verifier.generated:
            notes.append(
                f"the budget is judged on {len(verifier.samples)} generated inputs (seeded noise), not on task "
                "data: give --data for figures that say something about accuracy"
            )
        return notes

    def _step(self, pass_: Pass, model: Model, ctx: PassContext, record: PassRecord, current: _Current) -> bool:
        """Run one pass and keep or roll back its change; True if the model changed and was kept."""
        started = time.perf_counter()
        try:
            result = self._run_one(pass_, model, ctx)
        except Exception as exc:  # boundary: pass code, built-in or third-party
            record.seconds = time.perf_counter() - started
            log.debug("pass %s raised", pass_.name, exc_info=True)
            self._roll_back(model, ctx, current, record, f"raised {type(exc).__name__}: {first_line(exc, 300)}")
            return False
        record.seconds = time.perf_counter() - started
        record.stats = dict(result.stats)
        record.layers = [layer.to_dict() for layer in result.layers]
        if not result.modified:
            record.status = "unchanged"
            record.reason = result.reason or declined_reason(result.layers)
            record.after = current.cost
            return False
        check_started = time.perf_counter()
        self.progress.verifying()
        verdict = self._check(pass_, model, ctx, current)
        record.verify_seconds = time.perf_counter() - check_started
        record.fidelity = verdict.fidelity_record()
        if verdict.problem is not None:
            record.attempted = verdict.cost
            self._roll_back(model, ctx, current, record, verdict.problem)
            return False
        if verdict.outputs is not None:
            current.outputs, current.fidelity = verdict.outputs, verdict.total
        assert ctx.analyses is not None
        record.after = current.cost = verdict.cost
        current.snapshot = ctx.analyses.proto()
        current.checkpoint = ctx.analyses.checkpoint()
        log.info("pass %s applied in %.2fs", pass_.name, record.seconds)
        return True

    def _check(self, pass_: Pass, model: Model, ctx: PassContext, current: _Current) -> _Verdict:
        """Export the changed model once and check it: validity, outputs, budget, cost."""
        analyses = ctx.analyses
        assert analyses is not None
        analyses.invalidate(pass_.preserves)
        try:
            proto = analyses.proto()
        except Exception as exc:  # boundary: graphsurgeon export of whatever the pass built
            return _Verdict(f"export failed: {first_line(exc, 300)}")
        problem = validity_problems(proto, strict_shapes=self._strict_shapes)
        if problem is not None:
            return _Verdict(problem)
        outputs = None
        total: Fidelity | None = None
        step: Fidelity | None = None
        verifier = self._active_verifier
        if verifier is None and pass_.lossy and self.budget.is_set:
            # A budget nothing can check is no budget: keeping the pass would report it as met.
            why = self.verifier.unavailable if self.verifier is not None else "verification is disabled"
            return _Verdict(f"the budget cannot be checked: {why}")
        if verifier is not None:
            try:
                outputs = verifier.run(proto)
            except RunTimeLimitExceeded as exc:
                return _Verdict(f"verification impossible: the rewritten model: {exc}")
            except Exception as exc:  # boundary: onnxruntime on the rewritten model
                return _Verdict(f"onnxruntime cannot run the result: {first_line(exc, 300)}")
            assert current.outputs is not None
            total = compare_outputs(verifier.reference, outputs)
            step = compare_outputs(current.outputs, outputs)
            problem = self._fidelity_problem(pass_, current.outputs, outputs, total, step)
            if problem is not None:  # costed all the same: the report says what the attempt would have saved
                return _Verdict(problem, outputs, total, step, self._attempted_cost(analyses))
        try:
            cost = self._totals(analyses)
        except Exception as exc:  # boundary: shape inference inside the cost model
            return _Verdict(f"cost analysis failed: {first_line(exc, 300)}", outputs, total, step)
        return _Verdict(None, outputs, total, step, cost)

    def _fidelity_problem(
        self, pass_: Pass, before: list[list[Any]], outputs: list[list[Any]], total: Fidelity, step: Fidelity
    ) -> str | None:
        """Why the outputs are not acceptable: a lossless pass moved them, or a lossy one broke the budget."""
        if pass_.lossy:
            return self.budget.violation(total)
        if lossless_excess(before, outputs, rtol=LOSSLESS_TOLERANCE, atol=LOSSLESS_ATOL) <= 1.0:
            return None
        return (
            f"lossless pass changed outputs: relative error {step.max_rel_error:.3g} "
            f"(max abs {step.max_abs_error:.3g}) > {LOSSLESS_TOLERANCE:g} of the output's "
            f"scale and > {LOSSLESS_ATOL:g} absolute"
        )

    def _attempted_cost(self, analyses: AnalysisManager) -> dict[str, Any]:
        """The cost totals of a version about to be rolled back; empty if the cost model fails on it."""
        try:
            return self._totals(analyses)
        except Exception:  # boundary: shape inference inside the cost model, on a rejected model
            log.debug("cost of a rejected version failed", exc_info=True)
            return {}

    def _totals(self, analyses: AnalysisManager) -> dict[str, Any]:
        if self.analyze is not None:
            return self.analyze(analyses.proto())
        return analyses.cost().totals

    def _run_one(self, pass_: Pass, model: Model, ctx: PassContext) -> PassResult:
        if self.hook is not None:
            result = self.hook.nnopt_run_pass(pass_=pass_, model=model, ctx=ctx)
        else:
            result = pass_.run(model, ctx)
        if not isinstance(result, PassResult):
            raise TypeError(f"pass {pass_.name} returned {type(result).__name__}, not a PassResult")
        return result

    def _roll_back(self, model: Model, ctx: PassContext, current: _Current, record: PassRecord, reason: str) -> None:
        model.restore(current.snapshot)
        assert ctx.analyses is not None
        ctx.analyses.restore(current.checkpoint)
        record.status = "rolled_back"
        record.reason = reason
        record.after = record.before
        log.info("pass %s rolled back: %s", record.name, reason)
        if self.strict:
            self.progress.pass_finished(record)
            raise PassFailedError(f"pass '{record.name}' failed and --strict is set: {reason}")

    def _after(self, record: PassRecord, model: Model) -> None:
        self.progress.pass_finished(record)
        if self.hook is not None:
            try:
                self.hook.nnopt_after_pass(record=record, model=model)
            except Exception as exc:  # boundary: third-party observers must not break the pipeline
                log.warning("an nnopt_after_pass hook raised %s: %s", type(exc).__name__, exc)


@contextlib.contextmanager
def _outside_cycle_collection() -> Iterator[None]:
    """Keep the objects that exist when the pipeline starts out of the cycle collector until it ends.

    They include the model's graphsurgeon graph, about 25 Python objects per node. Every pass allocates
    in proportion to the model, which triggers CPython's full collections, and each of those walks every
    tracked object: at 40,000 nodes collection took 30 % of the default pipeline's time and grew faster
    than the model. Frozen objects are still freed by reference counting; only cycles among them (nodes
    and tensors a pass dropped) wait for the end of the run. A caller that froze objects itself keeps
    its own arrangement: ``gc.unfreeze`` would release its objects too.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


#: Figures an uncosted node understates: a pass after which more nodes are uncosted gets no delta for these.
_UNCOSTED_HIDES = frozenset({"macs", "flops", "latency_s", "activation_bytes"})


def _uncosted_notes(report: PipelineReport) -> list[str]:
    """A note per pass after which the cost model could not cost more nodes than before (a lower FLOPs or
    latency figure would be an artefact of the nodes it no longer counts, not a saving)."""
    notes = []
    for r in report.passes:
        if r.newly_uncosted:
            notes.append(
                f"after {r.name}, {r.after['uncosted_nodes']} node(s) could not be costed (before: "
                f"{r.before['uncosted_nodes']}): its FLOPs and latency changes are not comparable and are not "
                "reported; give the input shapes (--input-shape or --data)"
            )
    return notes


def declined_reason(layers: list[LayerDecision]) -> str:
    """Why a pass that changed nothing did so, from its declined layers: the commonest reasons first.

    One reason is stated as it is (``static quantization needs --data``); several as
    ``5 layers declined: nothing to remove at this ratio (4); ...``. No declined layer: ``""``.
    """
    reasons = Counter(layer.reason for layer in layers if layer.action == "declined")
    if not reasons:
        return ""
    if len(reasons) == 1:
        reason, count = reasons.most_common(1)[0]
        return reason if count == 1 else f"{reason} ({count} layers)"
    total = sum(reasons.values())
    if reasons.most_common(1)[0][1] == 1:  # every layer its own reason (figures in each): one example
        return f"{total} layers declined, e.g. {next(iter(reasons))}"
    shown = "; ".join(f"{reason} ({count})" for reason, count in reasons.most_common(_REASONS_SHOWN))
    more = "; ..." if len(reasons) > _REASONS_SHOWN else ""
    return f"{total} layers declined: {shown}{more}"


#: How many distinct reasons ``declined_reason`` names before it elides the rest.
_REASONS_SHOWN = 2


def _delta(before: Any, after: Any) -> Any:
    if isinstance(before, (int, float)) and isinstance(after, (int, float)):
        return after - before
    return None
