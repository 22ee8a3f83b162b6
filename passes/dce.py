"""dce: dead-node elimination, in the main graph and in every subgraph."""

from __future__ import annotations

from nnopt.ir.model import Model
from nnopt.ir.walk import remove_dead_nodes
from nnopt.pipeline.base import Pass, PassContext, PassResult


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
