"""Names for new tensors and nodes: unique across the whole model, subgraphs included (ONNX's SSA rule)."""

from __future__ import annotations

import onnx

from nnopt.ir.graphview import graph_protos
from nnopt.ir.model import Model


def taken_names(model: Model | onnx.ModelProto) -> set[str]:
    """Every tensor and node name used anywhere in ``model``, subgraphs included.

    Tensor and node names share the set: a new name then collides with neither. A subgraph's tensors
    count because ONNX requires a tensor name to be defined once in the whole model, and a subgraph may
    read any outer name. Works on the graphsurgeon IR and, for passes that rewrite protos, on a
    ModelProto.
    """
    if isinstance(model, onnx.ModelProto):
        return _proto_names(model.graph)
    names: set[str] = set()
    for graph in model.all_graphs():
        names.update(graph.tensors().keys())
        names.update(t.name for t in graph.inputs)
        names.update(t.name for t in graph.outputs)
        names.update(n.name for n in graph.nodes if n.name)
    return names


def _proto_names(graph: onnx.GraphProto) -> set[str]:
    names: set[str] = set()
    for g in graph_protos(graph):
        names.update(v.name for v in (*g.input, *g.output))
        names.update(t.name for t in g.initializer)
        names.update(t.values.name for t in g.sparse_initializer)
        for node in g.node:
            names.update((*node.input, *node.output))
            if node.name:
                names.add(node.name)
    names.discard("")  # an omitted optional input
    return names


def unique_name(base: str, taken: set[str], next_suffix: dict[str, int] | None = None) -> str:
    """``base``, or ``base_1``, ``base_2``… whichever is first free; the result is added to ``taken``.

    The one naming scheme of nnopt: ``taken`` comes from ``taken_names`` once per pass and is shared by
    every name the pass makes, so two new names never collide either. ``next_suffix`` (optional, one dict
    per ``taken``) remembers where each base's search stopped, so naming k things after one base probes k
    names rather than k²/2; the names are the same as without it, since ``taken`` only grows.
    """
    i = next_suffix.get(base, 0) if next_suffix is not None else 0
    name = f"{base}_{i}" if i else base
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    if next_suffix is not None:
        next_suffix[base] = i + 1
    return name
