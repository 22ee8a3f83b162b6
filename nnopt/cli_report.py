"""``nnopt optimize``'s report and provenance as the command line assembles them, and the run's warnings.

The report's fields are described by ``nnopt.report`` and its schema; this module fills them from what the
command knows (the paths, the settings, whether the model was written) and routes warnings: printed on
stderr as they come, and kept for the report's ``warnings`` (``--json -q`` prints none of them).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nnopt.report import USER_DATA, header, pipeline_budget, pipeline_outcome, search_budget, search_outcome


class Warnings:
    """The run's warnings: each printed on stderr as it comes (unless ``silent``) and kept in ``lines``."""

    def __init__(self, silent: bool) -> None:
        self.silent = silent
        self.lines: list[str] = []

    def __call__(self, text: str) -> None:
        self.lines.append(text)
        if not self.silent:
            print(f"nnopt: warning: {text}", file=sys.stderr)


class _Kept(logging.Handler):
    """Keeps the text of every warning logged during the run (the root logger's own handler prints it)."""

    def __init__(self, sink: Warnings) -> None:
        super().__init__(level=logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno == logging.WARNING:
            self.sink.lines.append(record.getMessage())


@contextlib.contextmanager
def collect_warnings(silent: bool) -> Iterator[Warnings]:
    """A ``Warnings`` for the run, which also keeps logged warnings; ``silent`` (``--json -q``): nothing of
    them reaches stderr (logged warnings and Python's warnings included), errors still do."""
    sink = Warnings(silent)
    root = logging.getLogger()
    kept = _Kept(sink)
    # basicConfig's own handler (nnopt.cli.main's): a test harness's capturing handlers keep their level.
    printers = [h for h in root.handlers if type(h) is logging.StreamHandler] if silent else []
    levels = [h.level for h in printers]
    root.addHandler(kept)
    for handler in printers:
        handler.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            if silent:
                warnings.simplefilter("ignore")
            yield sink
    finally:
        root.removeHandler(kept)
        for handler, level in zip(printers, levels):
            handler.setLevel(level)


def pipeline_report(report: Any, pipeline: Any, *, source: Path, output: Path, written: bool,
                    strict_failed: bool, warned: Warnings, extra: dict[str, Any]) -> dict[str, Any]:
    """The whole report of a pipeline run: the common fields, the pipeline's own, then ``extra``
    (``op_types``, ``measured``)."""
    outcome = pipeline_outcome(report, strict_failed=strict_failed)
    head = header(kind="pipeline", outcome=outcome, exit_code=3 if strict_failed else 0, source=source,
                  output=output, written=written, profile=pipeline.hardware, budget=finite(pipeline_budget(report)),
                  seed=pipeline.seed, warnings=warned.lines)
    return head | finite(report.to_dict()) | extra


def search_report(report: Any, settings: Any, *, source: Path, output: Path, written: bool, exit_code: int,
                  warned: Warnings) -> dict[str, Any]:
    """The whole report of a search: the common fields, then the search's own (``SearchReport.to_dict``)."""
    head = header(kind="search", outcome=search_outcome(report), exit_code=exit_code, source=source, output=output,
                  written=written, profile=settings.hardware, budget=search_budget(report), seed=settings.seed,
                  warnings=warned.lines)
    return head | {"fidelity": {"source": USER_DATA, "samples": report.eval_samples}} | report.to_dict()


def report_text(data: dict[str, Any]) -> str:
    """The report as written to ``--report`` and printed by ``--json``."""
    return json.dumps(data, indent=2, allow_nan=False) + "\n"


def pipeline_provenance(pipeline: Any) -> list[tuple[str, str]]:
    """The provenance entries of a pipeline run: its passes as run and the settings that shape the output."""
    from nnopt.provenance import entries, pass_spec

    options = {
        "budget": {k: v for k, v in pipeline.budget.to_dict().items() if v is not None},
        "data": bool(pipeline.data),  # whether --data was given; never its path
        "fixed_point": pipeline.fixed_point,
        "hardware": pipeline.hardware.name,
        "input_shapes": pipeline.input_shapes,
        "strict": pipeline.strict,
        "verify": pipeline.verify,
    }
    return entries([pass_spec(p) for p in pipeline.passes], options, pipeline.seed)


def search_provenance(report: Any, settings: Any) -> list[tuple[str, str]]:
    """The provenance entries of a search: the chosen per-layer choices and the search's settings."""
    from nnopt.provenance import entries

    choices = [f"{d['layer']}/{d['technique']}={d['choice']}" if d["technique"] else f"{d['layer']}={d['choice']}"
               for d in report.decisions]
    options = {"level": settings.level, "max_drop": settings.max_drop, "metric": settings.metric,
               "drop_type": settings.drop_type, "objective": settings.objective, "time_budget": settings.time_budget,
               "hardware": settings.hardware.name, "input_shapes": settings.input_shapes}
    return entries([f"search:level={settings.level}", *choices], options, settings.seed)


def finite(value: Any) -> Any:
    """JSON has no Infinity/NaN: write them as strings."""
    import math

    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value
