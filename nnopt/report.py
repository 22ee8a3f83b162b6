"""The JSON report of ``nnopt optimize``: the fields every report starts with, and the schema documenting them.

A build step reads the same fields whatever happened: the schema version, nnopt's version, the input and
output files, the hardware profile, the budget and whether it was met, where fidelity was measured, the
outcome and the exit code. The run's own figures follow (a pipeline's passes, or a search's candidates).
``nnopt/schemas/report.schema.json`` (shipped in the package) describes every field; docs/report.md's
field tables are generated from it (``python -m nnopt.report docs/report.md``), and the tests validate real
reports against it.

Compatibility: ``schema_version`` changes only when a field is removed, renamed or changes meaning. Fields
added to the report keep the version, so a reader should ignore fields it does not know.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nnopt.cost.hardware import HardwareProfile
    from nnopt.pipeline.manager import PipelineReport
    from nnopt.search.report import SearchReport

#: The report's schema version (see the module's docstring for when it changes).
SCHEMA_VERSION = 1

#: Each outcome and what it means; the schema's ``outcome`` enum holds exactly these (a test checks it).
OUTCOMES: dict[str, str] = {
    "ok": "the model was written; every pass was kept or changed nothing, and the budget, if set, is met",
    "rolled_back": "the model was written without the passes that were rolled back (passes[].reason says why)",
    "rolled_back_strict": "a pass was rolled back under --strict: exit 3, no model written",
    "budget_failed": "the final model misses the budget, or no search candidate stayed within --max-drop: the "
                     "model was written (exit 0), or under --strict nothing was (exit 3)",
}

#: Where the fidelity figures were measured: on the user's ``--data``, or on seeded generated inputs.
USER_DATA = "user data"
GENERATED = "generated inputs"


def schema() -> dict[str, Any]:
    """The report's JSON Schema, as shipped in the package."""
    text = resources.files("nnopt").joinpath("schemas", "report.schema.json").read_text(encoding="utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


def header(*, kind: str, outcome: str, exit_code: int, source: Path, output: Path, written: bool,
           profile: HardwareProfile, budget: dict[str, Any] | None, seed: int,
           warnings: Sequence[str]) -> dict[str, Any]:
    """The fields every report starts with (``kind``: ``pipeline`` or ``search``; ``written``: whether the
    output model is on disk; ``budget``: from ``pipeline_budget`` or ``search_budget``)."""
    from nnopt import __version__
    from nnopt.ir.model import bytes_on_disk

    if outcome not in OUTCOMES:
        raise ValueError(f"unknown report outcome {outcome!r}")
    return {
        "schema_version": SCHEMA_VERSION,
        "nnopt_version": __version__,
        "kind": kind,
        "outcome": outcome,
        "exit_code": exit_code,
        "input": {"path": str(source), "bytes": bytes_on_disk(source)},
        "output": {"path": str(output), "bytes": bytes_on_disk(output) if written else None, "written": written},
        "profile": {"name": profile.name, "calibrated": profile.runtime == "onnxruntime"},
        "budget": budget,
        "seed": seed,
        "warnings": list(warnings),
    }


def pipeline_budget(report: PipelineReport) -> dict[str, Any] | None:
    """``{"met", "limits": [{"metric", "limit", "value", "met"}]}`` for a pipeline with a budget, else None.

    ``met`` is False when a limit is missed, None when one could not be measured, True otherwise.
    """
    from nnopt.pipeline.table import budget_checks

    checks = budget_checks(report.budget, report.fidelity)
    if not checks:
        return None
    return {"met": _all_met([c["met"] for c in checks]), "limits": checks}


def search_budget(report: SearchReport) -> dict[str, Any]:
    """The search's constraint in the same shape: its chosen (or closest) candidate's drop against --max-drop."""
    chosen = report.candidate(report.chosen)
    drop = chosen.drop if chosen is not None else None
    met = report.meets_constraint
    return {"met": met, "limits": [{"metric": "max_drop", "limit": report.max_drop, "value": drop, "met": met}]}


def pipeline_outcome(report: PipelineReport, *, strict_failed: bool) -> str:
    """The outcome of a pipeline run (see ``OUTCOMES``)."""
    if strict_failed:
        return "rolled_back_strict"
    budget = pipeline_budget(report)
    if budget is not None and budget["met"] is False:
        return "budget_failed"
    return "rolled_back" if report.rolled_back else "ok"


def search_outcome(report: SearchReport) -> str:
    """The outcome of a search (see ``OUTCOMES``)."""
    return "ok" if report.meets_constraint else "budget_failed"


def _all_met(flags: list[bool | None]) -> bool | None:
    if any(flag is False for flag in flags):
        return False
    return None if any(flag is None for flag in flags) else True


# ---------------------------------------------------------------------------------------------- documentation
#: The marks around docs/report.md's generated field tables.
DOC_BEGIN = "<!-- fields: generated from nnopt/schemas/report.schema.json by python -m nnopt.report docs/report.md -->"
DOC_END = "<!-- end of generated fields -->"


def fields_markdown(data: Mapping[str, Any] | None = None) -> str:
    """docs/report.md's field tables: the fields of every report, then a pipeline's, then a search's."""
    data = data or schema()
    sections = [("Every report", data)] + [
        (f"`kind` = `{name}`", data["$defs"][name]) for name in ("pipeline", "search")
    ]
    lines: list[str] = []
    for title, part in sections:
        lines += [f"### {title}", "", "| field | type | meaning |", "|---|---|---|"]
        lines += [_row(name, spec) for name, spec in _walk(part)]
        lines.append("")
    lines.append(f"Cost totals (`original`, `final`, `passes[].before`, ...) hold {data['$defs']['totals']['description']}.")
    return "\n".join(lines) + "\n"


def _walk(spec: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Mapping[str, Any]]]:
    """Every property of an object schema and of the objects (and arrays of objects) nested in it."""
    rows: list[tuple[str, Mapping[str, Any]]] = []
    for name, child in spec.get("properties", {}).items():
        path = f"{prefix}{name}"
        rows.append((path, child))
        items = child.get("items", {})
        if "properties" in child:
            rows += _walk(child, path + ".")
        elif "properties" in items:
            rows += _walk(items, path + "[].")
    return rows


def _row(name: str, spec: Mapping[str, Any]) -> str:
    kind = spec.get("type", "object (cost totals)" if "$ref" in spec else "any")
    kinds = " or ".join(kind) if isinstance(kind, list) else kind
    if "enum" in spec:
        kinds = " \\| ".join(f"`{json.dumps(v)}`" for v in spec["enum"])
    return f"| `{name}` | {kinds} | {spec['description']} |"


def write_docs(path: Path) -> None:
    """Replace the generated section of ``path`` (between ``DOC_BEGIN`` and ``DOC_END``) with ``fields_markdown``."""
    text = path.read_text(encoding="utf-8")
    head, _, rest = text.partition(DOC_BEGIN + "\n")
    _, _, tail = rest.partition(DOC_END)
    path.write_text(f"{head}{DOC_BEGIN}\n\n{fields_markdown()}\n{DOC_END}{tail}", encoding="utf-8")


if __name__ == "__main__":  # pragma: no cover
    write_docs(Path(sys.argv[1]))
