"""Validation of real reports against the JSON Schema shipped in the package (nnopt/schemas/report.schema.json)."""

from __future__ import annotations

from typing import Any

import jsonschema

from nnopt.report import schema


def validate(report: dict[str, Any]) -> dict[str, Any]:
    """Raise jsonschema's ValidationError unless ``report`` follows the schema; return it for chaining."""
    jsonschema.Draft202012Validator.check_schema(schema())
    jsonschema.Draft202012Validator(schema()).validate(report)
    return report
