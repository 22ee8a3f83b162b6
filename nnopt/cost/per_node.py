"""Per-node cost of two versions of one model side by side: the report's ``node_costs`` (and the HTML
report's bar chart of it).

Nodes are matched by name (or, for an unnamed node, its first output's name, which identifies it). A pass
keeps the names of the nodes it rewrites (prune, quantize, kmeans) and gives new nodes new names, so a
matched pair is one layer before and after, a node only before was removed (a folded BatchNorm) and a node
only after was added (a DequantizeLinear).

A model of 40,000 nodes would make the report megabytes long, so at most ``NODE_LIMIT`` rows are kept: the
nodes of highest estimated latency (then FLOPs), in graph order; ``omitted`` sums the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: The per-node figures compared (keys of ``CostReport.nodes``); every row has them for each side it is on.
NODE_FIGURES = ("latency_s", "flops", "weight_bytes")

#: Rows kept in the report; the others are summed into ``omitted``.
NODE_LIMIT = 100


def node_costs(before: Sequence[dict[str, Any]], after: Sequence[dict[str, Any]],
               limit: int = NODE_LIMIT) -> dict[str, Any]:
    """``{"nodes": [{"name", "op_type", "before", "after"}], "omitted": {"nodes", "before", "after"}}``.

    ``before``/``after``: ``CostReport.nodes`` of the two versions. A row's ``before`` or ``after`` is the
    node's figures (``NODE_FIGURES``) on that side, or None where the node does not exist. Rows come in the
    after-version's graph order, a removed node right after the kept node that preceded it. Nodes with no
    cost on either side (every figure 0) are left out and not counted; beyond ``limit`` rows, the rows of
    lowest latency (then FLOPs) are dropped and summed, per side, into ``omitted``.
    """
    rows = _aligned(before, after)
    rows = [row for row in rows if any(_cost_of(row[side]) for side in ("before", "after"))]
    keep = set(range(len(rows)))
    if len(rows) > limit:
        ranked = sorted(range(len(rows)), key=lambda i: (tuple(-v for v in _rank(rows[i])), i))
        keep = set(ranked[:limit])
    kept = [row for i, row in enumerate(rows) if i in keep]
    dropped = [row for i, row in enumerate(rows) if i not in keep]
    return {
        "nodes": kept,
        "omitted": {"nodes": len(dropped), **{side: _sums([row[side] for row in dropped]) for side in ("before", "after")}},
    }


def _aligned(before: Sequence[dict[str, Any]], after: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per node of either version, matched by key, in the after-version's order (see ``node_costs``)."""
    before_keys, after_keys = _keys(before), _keys(after)
    after_set = set(after_keys)
    # Removed nodes, each filed under the last node before it that the after-version kept (None: the start).
    removed: dict[str | None, list[dict[str, Any]]] = {}
    anchor: str | None = None
    for key, node in zip(before_keys, before):
        if key in after_set:
            anchor = key
        else:
            removed.setdefault(anchor, []).append(_row(key, node, None))
    by_key = dict(zip(before_keys, before))
    rows = list(removed.get(None, []))
    for key, node in zip(after_keys, after):
        rows.append(_row(key, by_key.get(key), node))
        rows.extend(removed.get(key, []) if key in by_key else [])
    return rows


def _keys(nodes: Sequence[dict[str, Any]]) -> list[str]:
    """Each node's name, or its first output's; a repeated key gets ``#2``, ``#3``... so every key is unique."""
    seen: dict[str, int] = {}
    keys = []
    for node in nodes:
        key = str(node.get("name") or (node.get("outputs") or [""])[0])
        seen[key] = seen.get(key, 0) + 1
        keys.append(key if seen[key] == 1 else f"{key}#{seen[key]}")
    return keys


def _row(key: str, before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any]:
    node = after if after is not None else before
    assert node is not None
    return {"name": key, "op_type": str(node.get("op_type", "")), "before": _figures(before), "after": _figures(after)}


def _figures(node: dict[str, Any] | None) -> dict[str, Any] | None:
    if node is None:
        return None
    # Six significant digits: a latency estimate is not more precise, and the report stays short.
    return {"latency_s": float(f"{float(node.get('latency_s') or 0.0):.6g}"), "flops": int(node.get("flops") or 0),
            "weight_bytes": int(node.get("weight_bytes") or 0)}


def _cost_of(figures: dict[str, Any] | None) -> bool:
    return figures is not None and any(figures[k] for k in NODE_FIGURES)


def _rank(row: dict[str, Any]) -> tuple[float, float, float]:
    sides = [row[s] for s in ("before", "after") if row[s] is not None]
    return (max(s["latency_s"] for s in sides), max(s["flops"] for s in sides), max(s["weight_bytes"] for s in sides))


def _sums(sides: list[dict[str, Any] | None]) -> dict[str, Any]:
    present = [s for s in sides if s is not None]
    return {"latency_s": float(f"{sum(s['latency_s'] for s in present):.6g}"),
            "flops": sum(s["flops"] for s in present), "weight_bytes": sum(s["weight_bytes"] for s in present)}
