"""Provenance of an output model: the nnopt, pipeline, options and seed that made it, in its ``metadata_props``.

The entries hold no time stamp and no path, so that the same input, options and seed still give a
byte-identical model. The input's own metadata is kept; ``nnopt.*`` keys an earlier nnopt run wrote are
replaced, so they always describe the run that wrote the file. ``--no-provenance`` leaves them out.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from nnopt.ir.model import Model
from nnopt.pipeline.base import Pass

#: The prefix of every key nnopt writes into a model's metadata_props.
PREFIX = "nnopt."


def entries(pipeline: Sequence[str], options: Mapping[str, Any], seed: int) -> list[tuple[str, str]]:
    """The metadata entries: ``nnopt.version``, ``nnopt.pipeline`` (a JSON list of pass specs as run),
    ``nnopt.options`` (JSON, keys sorted) and ``nnopt.seed``."""
    from nnopt import __version__

    return [
        (f"{PREFIX}version", __version__),
        (f"{PREFIX}pipeline", json.dumps(list(pipeline))),
        (f"{PREFIX}options", json.dumps(options, sort_keys=True)),
        (f"{PREFIX}seed", str(seed)),
    ]


def stamp(model: Model, provenance: list[tuple[str, str]]) -> None:
    """Write ``provenance`` into the model's metadata_props, after the input's own (earlier ``nnopt.*``
    entries are replaced)."""
    kept = [(key, value) for key, value in model.metadata_props if not key.startswith(PREFIX)]
    model.metadata_props = kept + provenance


def read(model: Model) -> dict[str, str]:
    """The ``nnopt.*`` entries of a model's metadata_props (empty for a model nnopt did not write)."""
    return {key: value for key, value in model.metadata_props if key.startswith(PREFIX)}


def pass_spec(pass_: Pass[Any]) -> str:
    """The pass as ``-p`` would give it: its name, then the options that differ from their defaults
    (``prune:ratio=0.25,round_to=4``), so that the spec reruns the same pass."""
    defaults = {o["name"]: o["default"] for o in pass_.Options.describe()}
    changed = {k: v for k, v in pass_.options.to_dict().items() if v != defaults.get(k)}
    if not changed:
        return pass_.name
    return pass_.name + ":" + ",".join(f"{key}={_text(value)}" for key, value in changed.items())


def _text(value: Any) -> str:
    """An option value as the ``-p`` syntax reads it back (booleans ``true``/``false``, lists comma-joined)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, list | tuple):
        return ",".join(_text(v) for v in value)
    return str(value)
