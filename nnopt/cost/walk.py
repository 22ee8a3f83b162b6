"""Walking ONNX graphs as protos: subgraph bodies, what a node reads, topological order."""

from __future__ import annotations

from collections.abc import Iterator

import onnx

# One implementation for the cost model and the shape-inference helper.
from nnopt.analysis.shapes import has_subgraph, read_names, topological_order

__all__ = ["has_subgraph", "iter_bodies", "read_names", "subgraphs", "topological_order"]


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The graphs held in ``node``'s attributes (If branches, Loop/Scan bodies), in attribute order."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def iter_bodies(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """Every subgraph body under ``graph``, depth-first in node order (``graph`` itself excluded)."""
    for node in graph.node:
        for body in subgraphs(node):
            yield body
            yield from iter_bodies(body)
