"""PassManager: run passes one by one, check, measure and verify each, and roll back the ones that fail."""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import onnx

from nnopt.errors import PassFailedError
from nnopt.ir.model import Model
from nnopt.pipeline.base import Pass, PassContext, PassResult
from nnopt.pipeline.progress import Progress
from nnopt.pipeline.verify import (
    Fidelity,
    Verifier,
    compare_outputs,
    lossless_excess,
    passes_strict_shape_inference,
    validity_problems,
)

log = logging.getLogger(__name__)

#: Lossless passes must keep every output within this error, relative to the output's largest magnitude,
LOSSLESS_TOLERANCE = 1e-5
#: ...or within this absolute error, for outputs whose largest magnitude is tiny.
LOSSLESS_ATOL = 1e-6

#: The cost totals compared before/after each pass and shown in the table.
DELTA_KEYS = ("params", "macs", "flops", "weight_bytes", "activation_bytes", "latency_s", "nodes")


@dataclass(frozen=True)
class Budget:
    """How far a lossy pipeline may drift from the original model's outputs (None: unbounded)."""

    max_rel_error: float | None = None
    min_cosine: float | None = None
    min_top1: float | None = None

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


@dataclass
class PassRecord:
    """What happened to one pass: its status and why, cost before/after, fidelity, time, its own report."""

    name: str
    options: dict[str, Any]
    lossy: bool
    iteration: int
    status: str = "applied"  # applied | unchanged | rolled_back
    reason: str = ""
    seconds: float = 0.0
    verify_seconds: float = 0.0
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    fidelity: dict[str, Any] | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    layers: list[dict[str, Any]] = field(default_factory=list)

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
            "delta": {k: _delta(self.before.get(k), self.after.get(k)) for k in DELTA_KEYS if k in self.before},
            "fidelity": self.fidelity,
            "stats": self.stats,
            "layers": self.layers,
        }


@dataclass
class PipelineReport:
    passes: list[PassRecord] = field(default_factory=list)
    original: dict[str, Any] = field(default_factory=dict)
    final: dict[str, Any] = field(default_factory=dict)
    fidelity: dict[str, Any] | None = None
    verification: str = "onnxruntime"
    notes: list[str] = field(default_factory=list)

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
        }

    def format_table(self) -> str:
        header = ["pass", "status", "params", "flops", "weight_bytes", "latency_us", "max_rel_err", "cosine", "seconds"]
        rows = [["(input)", "", *_cost_cells(self.original), "", "", ""]]
        for r in self.passes:
            if r.iteration > 0 and r.status == "unchanged":
                continue  # repeats that found nothing more are summarised below
            fid = r.fidelity or {}
            rows.append(
                [
                    r.name if r.iteration == 0 else f"{r.name} (#{r.iteration + 1})",
                    r.status,
                    *_cost_cells(r.after or r.before),
                    _fmt_num(fid.get("max_rel_error")),
                    _fmt_num(fid.get("cosine_similarity"), digits=6),
                    f"{r.seconds + r.verify_seconds:.2f}",
                ]
            )
        widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                 for row in [header, *rows]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        iterations = max((r.iteration for r in self.passes), default=0) + 1
        if iterations > 1:
            lines.append(f"fixed point: {iterations} iteration(s) over the pipeline")
        for r in self.rolled_back:
            lines.append(f"rolled back: {r.name}: {r.reason}")
        if self.verification != "onnxruntime":
            lines.append(f"numerical verification skipped: {self.verification}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


Analyzer = Callable[[onnx.ModelProto], dict[str, Any]]


class PassManager:
    """Runs a list of passes with verification and rollback.

    For each pass: snapshot → run (through the ``nnopt_run_pass`` hook) → validate (onnx checker; strict
    shape inference when the input model passed it) → cost analysis → numerical check in onnxruntime
    against the model before the pass (lossless passes, ``LOSSLESS_TOLERANCE``) and against the original
    model (the lossy ``budget``) → keep, or restore the snapshot and record why.

    Args:
        passes: pass instances, in order.
        analyze: maps a ModelProto to the cost totals dict.
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
        analyze: Analyzer,
        verifier: Verifier | None = None,
        budget: Budget | None = None,
        strict: bool = False,
        fixed_point: bool = False,
        max_iterations: int = 4,
        hook: Any = None,
        progress: Progress | None = None,
    ) -> None:
        self.passes = passes
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
            return self._run(model, ctx)

    def _run(self, model: Model, ctx: PassContext | None) -> PipelineReport:
        ctx = ctx or PassContext()
        if ctx.hook is None:
            ctx.hook = self.hook
        if ctx.on_progress is None:
            ctx.on_progress = self.progress.layer
        report = PipelineReport()
        snapshot = model.to_proto()
        strict_shapes = passes_strict_shape_inference(snapshot)
        if not strict_shapes:
            report.notes.append("the input model fails strict ONNX shape inference; validity is checked with the checker only")
        current_cost = self.analyze(snapshot)
        report.original = current_cost
        verifier = self.verifier if self.verifier is not None and self.verifier.unavailable is None else None
        if self.verifier is None:
            report.verification = "disabled"
        elif self.verifier.unavailable is not None:
            report.verification = self.verifier.unavailable
        current_outputs = verifier.reference if verifier else None
        current_fidelity: Fidelity | None = None

        iterations = self.max_iterations if self.fixed_point else 1
        for iteration in range(iterations):
            applied_any = False
            for position, pass_ in enumerate(self.passes, start=1):
                record = PassRecord(pass_.name, pass_.options.to_dict(), pass_.lossy, iteration, before=current_cost)
                report.passes.append(record)
                self.progress.pass_started(pass_.name, position, len(self.passes), iteration)
                started = time.perf_counter()
                try:
                    result = self._run_one(pass_, model, ctx)
                except Exception as exc:  # boundary: pass code, built-in or third-party
                    record.seconds = time.perf_counter() - started
                    self._roll_back(model, snapshot, record, f"raised {type(exc).__name__}: {_first_line(exc)}")
                    log.debug("pass %s raised", pass_.name, exc_info=True)
                    self._after(record, model)
                    continue
                record.seconds = time.perf_counter() - started
                record.stats = dict(result.stats)
                record.layers = [layer.to_dict() for layer in result.layers]
                if not result.modified:
                    record.status = "unchanged"
                    record.after = current_cost
                    self._after(record, model)
                    continue
                check_started = time.perf_counter()
                self.progress.verifying()
                try:
                    proto = model.to_proto()
                except Exception as exc:  # boundary: graphsurgeon export of whatever the pass built
                    self._roll_back(model, snapshot, record, f"export failed: {_first_line(exc)}")
                    self._after(record, model)
                    continue
                problem = validity_problems(proto, strict_shapes=strict_shapes)
                outputs = None
                if problem is None and verifier is not None:
                    try:
                        outputs = verifier.run(proto)
                    except Exception as exc:  # boundary: onnxruntime on the rewritten model
                        problem = f"onnxruntime cannot run the result: {_first_line(exc)}"
                    if outputs is not None:
                        step = compare_outputs(current_outputs, outputs)
                        total = compare_outputs(verifier.reference, outputs)
                        record.fidelity = total.to_dict()
                        record.fidelity["step_max_rel_error"] = step.max_rel_error
                        excess = lossless_excess(
                            current_outputs, outputs, rtol=LOSSLESS_TOLERANCE, atol=LOSSLESS_ATOL
                        )
                        if not pass_.lossy and not excess <= 1.0:
                            problem = (
                                f"lossless pass changed outputs: relative error {step.max_rel_error:.3g} "
                                f"(max abs {step.max_abs_error:.3g}) > {LOSSLESS_TOLERANCE:g} of the output's "
                                f"scale and > {LOSSLESS_ATOL:g} absolute"
                            )
                        elif pass_.lossy:
                            problem = self.budget.violation(total)
                if problem is None:
                    try:
                        cost = self.analyze(proto)
                    except Exception as exc:  # boundary: shape inference inside the cost model
                        problem = f"cost analysis failed: {_first_line(exc)}"
                record.verify_seconds = time.perf_counter() - check_started
                if problem is not None:
                    self._roll_back(model, snapshot, record, problem)
                    self._after(record, model)
                    continue
                record.after = cost
                current_cost = cost
                snapshot = proto
                if outputs is not None:
                    current_outputs = outputs
                    current_fidelity = compare_outputs(verifier.reference, outputs)
                applied_any = True
                log.info("pass %s applied in %.2fs", pass_.name, record.seconds)
                self._after(record, model)
            if not applied_any:
                break
        report.final = current_cost
        if verifier is not None:
            report.fidelity = (current_fidelity or compare_outputs(verifier.reference, verifier.reference)).to_dict()
        return report

    def _run_one(self, pass_: Pass, model: Model, ctx: PassContext) -> PassResult:
        if self.hook is not None:
            result = self.hook.nnopt_run_pass(pass_=pass_, model=model, ctx=ctx)
        else:
            result = pass_.run(model, ctx)
        if not isinstance(result, PassResult):
            raise TypeError(f"pass {pass_.name} returned {type(result).__name__}, not a PassResult")
        return result

    def _roll_back(self, model: Model, snapshot: onnx.ModelProto, record: PassRecord, reason: str) -> None:
        model.restore(snapshot)
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


def _delta(before: Any, after: Any) -> Any:
    if isinstance(before, (int, float)) and isinstance(after, (int, float)):
        return after - before
    return None


def _cost_cells(totals: dict[str, Any]) -> list[str]:
    lat = totals.get("latency_s")
    return [
        f"{int(totals.get('params', 0)):,}",
        f"{int(totals.get('flops', 0)):,}",
        f"{int(totals.get('weight_bytes', 0)):,}",
        f"{lat * 1e6:,.1f}" if isinstance(lat, (int, float)) else "",
    ]


def _fmt_num(value: Any, digits: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:.{digits}g}" if digits == 3 else f"{value:.{digits}f}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
