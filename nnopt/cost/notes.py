"""What an analysis found worth telling: uncosted ops, unknown shapes, failing rules, skipped bodies."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from nnopt.cost.report import examples


@dataclass
class Findings:
    """What the walk over the nodes found that deserves a note, aggregated per op."""

    no_rule: Counter[str] = field(default_factory=Counter)
    unknown_shape: dict[str, list[str]] = field(default_factory=dict)
    rule_failed: dict[str, tuple[int, str]] = field(default_factory=dict)
    subgraph_nodes: int = 0
    subgraph_ops: Counter[str] = field(default_factory=Counter)


def finding_notes(findings: Findings, unused: list[str]) -> Iterator[str]:
    """One note per kind of finding, in a stable order; ``unused``: initializers no node reads."""
    for label, count in sorted(findings.no_rule.items()):
        nodes = f" ({count} nodes)" if count > 1 else ""
        yield f"op {label} has no cost rule: 0 FLOPs{nodes}"
    for label, names in sorted(findings.unknown_shape.items()):
        yield f"{len(names)} {label} node(s) have unknown shapes and count 0 FLOPs: {examples(names)}"
    for label, (count, first) in sorted(findings.rule_failed.items()):
        yield f"the cost rule for {label} failed on {count} node(s) and they were counted as 0 FLOPs: {first}"
    if findings.subgraph_nodes:
        ops = ", ".join(sorted(findings.subgraph_ops))
        yield (
            f"Loop/Scan bodies are not costed: {findings.subgraph_nodes} nodes inside {ops} count 0 FLOPs "
            "(their constants are counted as params)"
        )
    if unused:
        yield f"{len(unused)} initializer(s) are not read by any node and not counted: {examples(unused)}"
