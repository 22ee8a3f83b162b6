"""The pipeline report as a person reads it: the per-pass table, the summary line, rollbacks and why."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nnopt.pipeline.manager import Budget, PassRecord, PipelineReport

#: The summary line's quantities: (totals key, label). File bytes come from the caller (they exist on disk only).
SUMMARY_KEYS = (("nodes", "nodes"), ("params", "params"), ("weight_bytes", "weight bytes"))
#: What a rolled-back pass would have saved, in this order: (totals key, label).
SAVING_KEYS = (("weight_bytes", "weight bytes"), ("params", "params"), ("latency_s", "est. latency"))

#: Budget limit → (fidelity key, label, whether the value must be at least the limit rather than at most).
BUDGET_METRICS: dict[str, tuple[str, str, bool]] = {
    "min_top1": ("top1_agreement", "top-1 agreement", True),
    "min_cosine": ("cosine_similarity", "cosine similarity", True),
    "max_rel_error": ("max_rel_error", "max relative error", False),
}


def format_report(report: PipelineReport, file_bytes: tuple[int, int] | None = None) -> str:
    """The table, then the summary line, the budget line, rollbacks, unchanged passes' reasons and notes."""
    lines = _table(report)
    iterations = max((r.iteration for r in report.passes), default=0) + 1
    if iterations > 1:
        lines.append(f"fixed point: {iterations} iteration(s) over the pipeline")
    lines.append(summary_line(report.original, report.final, file_bytes))
    budget = budget_line(report.budget, report.fidelity)
    lines.extend([budget] if budget else [])
    for r in report.rolled_back:
        saving = would_have_saved(r)
        lines.append(f"rolled back: {r.name}: {r.reason}" + (f" (it would have given {saving})" if saving else ""))
    for r in report.passes:
        if r.status == "unchanged" and r.reason and r.iteration == 0:
            lines.append(f"unchanged: {r.name}: {r.reason}")
    if report.verification != "onnxruntime":
        lines.append(f"numerical verification skipped: {report.verification}")
    lines.extend(f"note: {n}" for n in report.notes)
    return "\n".join(lines)


def _table(report: PipelineReport) -> list[str]:
    """The aligned per-pass rows: cost after each pass (one unit per column) and fidelity to the input."""
    profile = f" ({report.hardware})" if report.hardware else ""
    # A top-1 budget gets its own column: the one figure the budget is judged on (cosine may look alarming).
    top1 = report.budget is not None and report.budget.min_top1 is not None
    header = ["pass", "status", "params", "flops", "weight_bytes", f"est_us{profile}", "max_rel_err",
              "cosine", *(["top1_agree"] if top1 else []), "seconds"]
    shown = [r for r in report.passes if not (r.iteration > 0 and r.status == "unchanged")]
    latencies = [t.get("latency_s") for t in [report.original, *(r.after or r.before for r in shown)]]
    us = fixed_decimals([v * 1e6 for v in latencies if isinstance(v, int | float)])
    rows = [["(input)", "", *_cost_cells(report.original, us), *[""] * (len(header) - 6)]]
    for r in shown:  # repeats that found nothing more are summarised by the "fixed point" line
        fid = r.fidelity or {}
        rows.append([
            r.name if r.iteration == 0 else f"{r.name} (#{r.iteration + 1})",
            r.status.replace("_", " "),
            *_cost_cells(r.after or r.before, us),
            fmt_num(fid.get("max_rel_error")),
            fmt_num(fid.get("cosine_similarity"), digits=6),
            *([fmt_num(fid.get("top1_agreement"), digits=4)] if top1 else []),
            f"{r.seconds + r.verify_seconds:.2f}",
        ])
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def summary_line(before: dict[str, Any], after: dict[str, Any], file_bytes: tuple[int, int] | None) -> str:
    """``summary: nodes 15 -> 12 (-20.0 %), params ..., file bytes 447,101 -> 101,872 (-77.2 %)``."""
    pairs = [(label, before.get(key), after.get(key)) for key, label in SUMMARY_KEYS]
    if file_bytes is not None:
        pairs.append(("file bytes", *file_bytes))
    return "summary: " + ", ".join(change_parts(pairs))


def change_parts(pairs: list[tuple[str, Any, Any]]) -> list[str]:
    """``nodes 15 -> 12 (-20.0 %)`` for each (label, before, after) whose before is a number."""
    return [f"{label} {_int(b)} -> {_int(a)}{percent_change(b, a)}" for label, b, a in pairs if is_number(b)]


def budget_checks(budget: Budget | None, fidelity: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Each limit of the budget against the final model's figure: ``{"metric": "min_top1", "limit": 0.98,
    "value": 0.99, "met": True}``, in ``BUDGET_METRICS`` order; ``value`` and ``met`` are None where the
    figure was not measured. Empty without a budget."""
    checks: list[dict[str, Any]] = []
    for limit_key, (metric, _, at_least) in BUDGET_METRICS.items():
        limit = getattr(budget, limit_key) if budget is not None else None
        if limit is None:
            continue
        value = (fidelity or {}).get(metric)
        met = None if not is_number(value) else (value >= limit if at_least else value <= limit)
        checks.append({"metric": limit_key, "limit": limit, "value": value if is_number(value) else None,
                       "met": met})
    return checks


def budget_line(budget: Budget | None, fidelity: dict[str, Any] | None) -> str | None:
    """Each budgeted metric of the final model against its limit (None: no budget set)."""
    checks = budget_checks(budget, fidelity)
    if not checks:
        return None
    parts = []
    for check in checks:
        _, label, at_least = BUDGET_METRICS[check["metric"]]
        limit, value, met = check["limit"], check["value"], check["met"]
        if met is None:
            parts.append(f"{label} not measured (limit {limit:g})")
            continue
        sign = (">=" if met else "<") if at_least else ("<=" if met else ">")
        parts.append(f"{label} {fmt_num(value, digits=4)} {sign} {limit:g}: {'met' if met else 'NOT met'}")
    return "budget: " + "; ".join(parts)


def would_have_saved(record: PassRecord) -> str:
    """What the rejected attempt of a rolled-back pass would have left, against the model before it:
    ``weight bytes 445,480 -> 119,900 (-73.1 %), ...``; empty when the attempt was not costed."""
    parts = []
    for key, label in SAVING_KEYS:
        before, after = record.before.get(key), record.attempted.get(key)
        if not (is_number(before) and is_number(after)) or before == after:
            continue
        assert before is not None and after is not None  # _is_number said so; for the type checker
        if key == "latency_s":
            parts.append(f"{label} {before * 1e6:,.1f} -> {after * 1e6:,.1f} us{percent_change(before, after)}")
        else:
            parts.append(f"{label} {_int(before)} -> {_int(after)}{percent_change(before, after)}")
    return ", ".join(parts)


def fixed_decimals(values: list[float]) -> Callable[[float], str]:
    """A formatter with one number of decimals for a whole column: enough for its smallest non-zero value
    to show two significant digits (at most 3 decimals), so that 0.0 never stands for a real 40 ns."""
    smallest = min((abs(v) for v in values if v), default=1.0)
    decimals = min(3, max(1, 1 - math.floor(math.log10(smallest)))) if smallest < 10 else 1
    return lambda v: f"{v:,.{decimals}f}"


def _cost_cells(totals: dict[str, Any], us: Callable[[float], str]) -> list[str]:
    lat = totals.get("latency_s")
    return [
        f"{int(totals.get('params', 0)):,}",
        f"{int(totals.get('flops', 0)):,}",
        f"{int(totals.get('weight_bytes', 0)):,}",
        us(lat * 1e6) if isinstance(lat, int | float) else "",
    ]


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool): a figure that can be shown and compared."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _int(value: Any) -> str:
    return f"{int(value):,}" if is_number(value) else "?"


def percent_change(before: Any, after: Any) -> str:
    """`` (-20.0 %)``: the change relative to ``before``; empty when there is nothing to divide by."""
    if not (is_number(before) and is_number(after)) or before == 0:
        return ""
    return f" ({(after - before) / before * 100:+.1f} %)"


def fmt_num(value: Any, digits: int = 3) -> str:
    """A fidelity figure as the table shows it: 3 significant digits, or ``digits`` decimals; ``inf``; empty for None."""
    if value is None:
        return ""
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:.{digits}g}" if digits == 3 else f"{value:.{digits}f}"


#: Op types whose presence makes the latency estimate depend on how the profile models int8 kernels.
INT8_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
                      "MatMulInteger", "DynamicQuantizeLinear"})


def int8_estimate_note(profile: Any, op_types: set[str], output: str = "OUTPUT") -> str | None:
    """What the latency estimate of a model with int8 ops assumes about int8 kernels on ``profile``
    (None: no int8 op, or a profile measured on the target by ``nnopt calibrate``, whose figures are real)."""
    from nnopt.cost.hardware import BUILTIN_PROFILES

    if not op_types & INT8_OPS:
        return None
    rates = {k: f.flops for k, f in profile.kernels.items() if k.startswith("int8") and f.flops is not None}
    how = (f"for real figures, time the model (nnopt analyze {output} --measure) or calibrate a profile on the "
           "target (nnopt calibrate -o PROFILE.json, then --hardware PROFILE.json)")
    if not rates:
        counted = ("QDQ groups as int8 kernels at the FP32 rate" if profile.runtime is not None
                   else "int8 layers at the FP32 rate plus every QuantizeLinear/DequantizeLinear as a node")
        return (f"est_us: hardware profile {profile.name} has no int8 figures: the estimate counts {counted}, "
                f"so it ignores int8 kernels' speed-up; {how}")
    if BUILTIN_PROFILES.get(profile.name) != profile:
        return None
    ratios = sorted({rate / profile.peak_flops for rate in rates.values()})
    classes = ", ".join(sorted(rates))
    return (f"est_us: hardware profile {profile.name} assumes int8 kernels ({classes}) at "
            f"{'/'.join(f'{r:g}' for r in ratios)}x its FP32 rate, other int8 ops at the FP32 rate: datasheet "
            f"arithmetic, not measured on this machine; {how}")


def op_type_counts(graphs: list[Any]) -> dict[str, int]:
    """How many nodes of each op type the graphs hold (``domain:op`` outside the default domain), sorted
    by name; ``graphs`` are graphsurgeon graphs, subgraphs included (``Model.all_graphs()``)."""
    counts: dict[str, int] = {}
    for graph in graphs:
        for node in graph.nodes:
            op = f"{node.domain}:{node.op}" if node.domain not in ("", "ai.onnx", None) else node.op
            counts[op] = counts.get(op, 0) + 1
    return dict(sorted(counts.items()))


def op_type_table(before: dict[str, int], after: dict[str, int], labels: tuple[str, str] = ("before", "after")) -> str:
    """``--ops``: node counts per op type before and after (``labels``: the two columns' titles), with the
    change; a total row at the end."""
    ops = sorted(set(before) | set(after))
    rows = [[op, str(before.get(op, 0)), str(after.get(op, 0)), _count_change(before.get(op, 0), after.get(op, 0))]
            for op in ops]
    total_before, total_after = sum(before.values()), sum(after.values())
    rows.append(["total", str(total_before), str(total_after), _count_change(total_before, total_after)])
    header = ["op type", *labels, "change"]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.insert(len(lines) - 1, lines[1])
    return "\n".join(line.rstrip() for line in lines)


def _count_change(before: int, after: int) -> str:
    return "" if before == after else f"{after - before:+d}"
