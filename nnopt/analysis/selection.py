"""Layer selection shared by passes: ``nodes`` and ``exclude`` options with shell-style patterns."""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase


def is_selected(node_name: str, nodes: Sequence[str] = (), exclude: Sequence[str] = ()) -> bool:
    """Whether a node is selected: it matches ``nodes`` (all nodes when empty) and no ``exclude`` pattern.

    Patterns are shell-style (``conv*``, ``backbone/*/conv``) and match the whole node name.
    """
    if any(fnmatchcase(node_name, pattern) for pattern in exclude):
        return False
    return not nodes or any(fnmatchcase(node_name, pattern) for pattern in nodes)
