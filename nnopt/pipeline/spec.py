"""Pipeline specs: ``name:key=value,key=value`` strings to configured Pass instances."""

from __future__ import annotations

from typing import Any

from nnopt.errors import OptionError
from nnopt.pipeline.base import Pass

#: The default pipeline: lossless clean-ups only, iterated to a fixed point. Names missing from the
#: registry (e.g. with a trimmed plugin set) are skipped. strip-debug-info goes first, so every later
#: snapshot and verification handles the smaller model; no pass adds debug info, so on the fixed-point
#: repeats it finds nothing and never keeps the iteration going.
DEFAULT_PIPELINE = (
    "strip-debug-info",
    "constants-to-initializers",
    "dce",
    "fold-constants",
    "remove-noops",
    "fold-batchnorm",
    "fuse-hardswish",
    "dce",
)


def parse_pass_spec(spec: str) -> tuple[str, dict[str, str]]:
    """Split ``name:key=value,key=value``. A token without ``=`` continues the previous value's list.

    ``prune:nodes=conv1,conv2,ratio=0.3`` gives ``{"nodes": "conv1,conv2", "ratio": "0.3"}``.
    """
    name, colon, rest = spec.strip().partition(":")
    name = name.strip()
    if not name:
        raise OptionError(f"empty pass name in '{spec}'")
    if colon and not rest.strip():
        # Likely an option list that expanded to nothing (`-p prune:$OPTS`): say so rather than run defaults.
        raise OptionError(f"pass '{name}': nothing after ':' in '{spec}' (give key=value options or drop the ':')")
    values: dict[str, str] = {}
    last: str | None = None
    for token in rest.split(",") if rest.strip() else []:
        key, eq, value = token.partition("=")
        if eq:
            last = key.strip()
            if not last:
                raise OptionError(f"pass '{name}': option without a name in '{spec}'")
            if last in values:
                raise OptionError(f"pass '{name}': option '{last}' given twice in '{spec}'")
            values[last] = value.strip()
        elif last is not None:
            values[last] += "," + token.strip()
        else:
            raise OptionError(f"pass '{name}': expected key=value, got '{token}'")
    return name, values


def instantiate(cls: type[Pass], values: dict[str, Any]) -> Pass:
    """A configured instance of ``cls`` from typed option values or command-line strings (both checked)."""
    return cls(cls.Options.from_values(values, cls.name))
