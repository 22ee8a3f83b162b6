"""dce: dead-node elimination, in the main graph and in every subgraph."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from nnopt.ir.graphview import live_node_indices, subgraphs_of
from nnopt.ir.model import Model
from nnopt.pipeline.base import Pass, PassContext, PassResult


def remove_dead_nodes(graph: gs.Graph) -> int:
    """Remove the nodes of ``graph`` (and, recursively, of its live nodes' subgraphs) that no output needs.

    Returns the number of nodes removed. Graph inputs and outputs are the interface and stay.
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


class DeadNodeElimination(Pass):
    """Remove nodes, initializers and value_info that no graph output depends on.

    Matches: nodes from which no graph output is reachable (in the main graph and inside If/Loop/Scan
    bodies, whose own outputs are their interface). Outer-scope reads from subgraphs count as uses, so
    an initializer used only inside an If branch stays. Graph inputs and outputs are never removed.
    Lossless.
    """

    name = "dce"
    lossy = False

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        removed = remove_dead_nodes(model.graph)
        return PassResult(modified=removed > 0, stats={"nodes_removed": removed})
