"""constants-to-initializers: turn Constant nodes into initializers, so later passes see weights alike."""

from __future__ import annotations

from nnopt.ir.constants import lower_model_constants
from nnopt.ir.model import Model
from nnopt.pipeline.base import Pass, PassContext, PassResult


class ConstantsToInitializers(Pass):
    """Turn Constant nodes into initializers (graphsurgeon Constants), in the main graph and in subgraphs.

    Matches: Constant nodes whose attribute is ``value``, ``value_float(s)`` or ``value_int(s)``.
    Rewrites: the node's output tensor becomes an initializer of the same name and values, in the graph
    that held the node (a Constant inside an If/Loop body becomes that body's initializer; one in the main
    graph that only subgraphs read is still written at the top level). Lossless.
    Preconditions: none. Left alone: Constants that are an output of any graph (the interface keeps a
    producer node), string and sparse values, and attribute references inside functions.
    """

    name = "constants-to-initializers"
    lossy = False

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        total = lower_model_constants(model)
        return PassResult(modified=total > 0, stats={"constants_converted": total})
