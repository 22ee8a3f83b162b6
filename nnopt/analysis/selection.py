"""Layer selection shared by passes: ``nodes`` and ``exclude`` options with shell-style patterns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import ClassVar

from nnopt.pipeline.base import PassOptions


def is_selected(node_name: str, nodes: Sequence[str] = (), exclude: Sequence[str] = ()) -> bool:
    """Whether a node is selected: it matches ``nodes`` (all nodes when empty) and no ``exclude`` pattern.

    Patterns are shell-style (``conv*``, ``backbone/*/conv``) and match the whole node name.
    """
    if any(fnmatchcase(node_name, pattern) for pattern in exclude):
        return False
    return not nodes or any(fnmatchcase(node_name, pattern) for pattern in nodes)


@dataclass(frozen=True)
class NodeSelection(PassOptions):
    """Options base of passes that act on chosen nodes: ``nodes`` and ``exclude``, listed after the pass's own.

    A pass whose patterns match something other than node names (kmeans: a weight's readers; svd: an
    unnamed node's output) says so by rewording the help in its ``HELP``.
    """

    TRAILING: ClassVar[tuple[str, ...]] = ("nodes", "exclude")

    nodes: tuple[str, ...] = field(
        default=(), metadata={"help": "only nodes matching these (shell patterns over node names); all if empty"}
    )
    exclude: tuple[str, ...] = field(
        default=(), metadata={"help": "never nodes matching these (shell patterns)"}
    )

    def selects(self, node_name: str) -> bool:
        """``is_selected`` with these options' patterns."""
        return is_selected(node_name, self.nodes, self.exclude)
