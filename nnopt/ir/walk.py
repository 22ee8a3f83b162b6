"""Walking a model's graphs: every graph including subgraphs, their outputs, default-domain ops, dead nodes."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from nnopt.ir.graphview import live_node_indices, subgraphs_of
from nnopt.ir.model import Model


def is_onnx_op(node: gs.Node) -> bool:
    """Whether ``node`` is in the default ONNX domain (graphsurgeon gives None, "" or "ai.onnx").

    A pass that matches on ``node.op`` checks this too: a custom domain may reuse a standard op name.
    """
    return (node.domain or "") in ("", "ai.onnx")


def all_graphs(graph: gs.Graph) -> list[gs.Graph]:
    """``graph`` followed by every graph nested in it (If branches, Loop/Scan bodies), recursively.

    Finding the subgraphs visits every node's attributes: a pass that needs the list for many rewrites
    (``replace_tensor(..., graphs=)``) takes it once per graph. ``Model.all_graphs()`` is this for the
    main graph.
    """
    return [graph, *graph.subgraphs(recursive=True)]


def graph_outputs(model: Model) -> set[int]:
    """ids of the tensors that are an output of the main graph or of any subgraph: the interfaces.

    A rewrite must keep these tensors (name and producer); ids, because graphsurgeon tensors are
    compared by identity and a name may be read from an outer scope.
    """
    return {id(t) for graph in model.all_graphs() for t in graph.outputs}


def remove_dead_nodes(graph: gs.Graph) -> int:
    """Remove the nodes of ``graph`` (and, recursively, of its live nodes' subgraphs) that no output needs.

    Returns the number of nodes removed. Graph inputs and outputs are the interface and stay; a tensor a
    subgraph reads from an outer scope counts as used.
    """
    live = live_node_indices(graph)
    removed = 0
    keep: list[gs.Node] = []
    for i, node in enumerate(graph.nodes):
        if i in live:
            keep.append(node)
        else:
            # Disconnect, so tensors no longer list the dead node as producer or consumer.
            node.inputs.clear()
            node.outputs.clear()
            removed += 1
    if removed:
        graph.nodes = keep
    for node in keep:
        for sub in subgraphs_of(node):
            removed += remove_dead_nodes(sub)
    return removed
