"""Walking ONNX graphs as protos: node fields read once, subgraph bodies, what a node reads, order."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple

import onnx

# One implementation for the cost model and the shape-inference helper.
from nnopt.analysis.shapes import GRAPH_ATTRS, GRAPH_OPS, has_subgraph, order_of, read_names, topological_order
from nnopt.ir.graphview import subgraph_protos, subgraph_reads

__all__ = [
    "NodeView",
    "has_subgraph",
    "iter_bodies",
    "node_views",
    "order_of",
    "read_names",
    "subgraphs",
    "topological_order",
]


class NodeView(NamedTuple):
    """A node's fields, read once: protobuf builds (and decodes) every string again on each access, and
    the analysis walks the nodes several times.

    Attributes:
        proto: The node itself (for its attributes, and for cost rules).
        op_type, name: As in the proto.
        domain: Normalised: ``""`` for the default domain (``ai.onnx`` too).
        inputs, outputs: As in the proto ("" for an omitted optional one).
        reads: ``inputs`` plus what its subgraph bodies read from the outer scope (sorted).
        has_subgraph: Whether it holds subgraph bodies.
    """

    proto: onnx.NodeProto
    op_type: str
    domain: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    reads: tuple[str, ...]
    has_subgraph: bool


def node_views(nodes: Iterable[onnx.NodeProto]) -> list[NodeView]:
    """A :class:`NodeView` per node, in the order given."""
    views = []
    for node in nodes:
        op_type, domain = node.op_type, node.domain
        domain = "" if domain == "ai.onnx" else domain
        inputs = tuple(node.input)
        # has_subgraph, on the fields already read: this runs once per node of the largest models.
        nested = (domain != "" or op_type in GRAPH_OPS) and any(a.type in GRAPH_ATTRS for a in node.attribute)
        reads = (*inputs, *sorted(subgraph_reads(node))) if nested else inputs
        views.append(NodeView(node, op_type, domain, node.name, inputs, tuple(node.output), reads, nested))
    return views


#: The graphs held in a node's attributes, in attribute order.
subgraphs = subgraph_protos


def iter_bodies(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """Every subgraph body under ``graph``, depth-first in node order (``graph`` itself excluded)."""
    for node in graph.node:
        if has_subgraph(node):
            for body in subgraphs(node):
                yield body
                yield from iter_bodies(body)
