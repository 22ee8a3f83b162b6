"""networkx views of a graphsurgeon graph, derived on demand (never kept in parallel by hand)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

import networkx as nx
import onnx
import onnx_graphsurgeon as gs

#: The sink node of a dataflow view: every graph output feeds it.
OUTPUTS = "__graph_outputs__"


def subgraphs_of(node: gs.Node) -> list[gs.Graph]:
    """The graphs held in a node's attributes (If branches, Loop/Scan bodies)."""
    found: list[gs.Graph] = []
    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, gs.Graph))
    return found


def implicit_inputs(node: gs.Node) -> list[gs.Tensor]:
    """Outer-scope tensors a node's subgraphs read without listing them as inputs.

    # NOTE: ONNX subgraphs may use any name visible in an enclosing graph; graphsurgeon resolves those
    # to the outer tensor objects but does not add them to ``node.inputs``.
    """
    seen: dict[int, gs.Tensor] = {}
    for sub in subgraphs_of(node):
        for tensor in _free_tensors(sub):
            seen.setdefault(id(tensor), tensor)
    return list(seen.values())


def subgraph_protos(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The graphs held in a NodeProto's attributes (If branches, Loop/Scan bodies), in attribute order:
    ``subgraphs_of`` for a NodeProto."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def graph_protos(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every graph nested in it, depth-first in node and attribute order."""
    yield graph
    for node in graph.node:
        for sub in subgraph_protos(node):
            yield from graph_protos(sub)


def subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Names that ``node``'s subgraphs (If branches, Loop/Scan bodies, nested) read from outside themselves:
    ``implicit_inputs`` for a NodeProto."""
    reads: set[str] = set()
    for graph in subgraph_protos(node):
        reads |= outer_scope_reads(graph)
    return reads


def rename_outer_reads(body: onnx.GraphProto, renames: Mapping[str, str]) -> None:
    """Make ``body`` and the graphs nested in it read ``renames[old]`` wherever they read the outer name
    ``old`` (node inputs, and outputs that pass the outer value through). Names are unique in a model, so a
    body never defines an outer name itself."""
    for graph in graph_protos(body):
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name in renames:
                    node.input[i] = renames[name]
        for value in graph.output:
            if value.name in renames:
                value.name = renames[value.name]


def outer_scope_reads(graph: onnx.GraphProto) -> set[str]:
    """Names that the body ``graph`` (and bodies nested in it) read from enclosing scopes."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.values.name for t in graph.sparse_initializer} | {o for n in graph.node for o in n.output}
    read = {x for n in graph.node for x in (*n.input, *subgraph_reads(n))}
    return read - defined - {""}


def _free_tensors(graph: gs.Graph) -> Iterable[gs.Tensor]:
    defined = {id(t) for t in graph.inputs}
    for n in graph.nodes:
        defined.update(id(t) for t in n.outputs)
    used: dict[int, gs.Tensor] = {}
    for n in graph.nodes:
        for t in list(n.inputs) + implicit_inputs(n):
            used.setdefault(id(t), t)
    for t in graph.outputs:
        used.setdefault(id(t), t)
    return [t for key, t in used.items() if key not in defined]


def dataflow(graph: gs.Graph) -> nx.DiGraph:
    """One graph level as a DiGraph: nodes are indices into ``graph.nodes`` plus ``OUTPUTS``.

    An edge u → v means node v reads a tensor node u produces (implicit subgraph reads included); each
    edge carries the tensor names in ``tensors``. Node attribute ``node`` is the gs.Node.
    """
    view = nx.DiGraph()
    producer: dict[int, int] = {}
    for i, node in enumerate(graph.nodes):
        view.add_node(i, node=node)
        for t in node.outputs:
            producer[id(t)] = i
    view.add_node(OUTPUTS)
    for i, node in enumerate(graph.nodes):
        for t in list(node.inputs) + implicit_inputs(node):
            src = producer.get(id(t))
            if src is not None:
                _add_edge(view, src, i, t.name)
    for t in graph.outputs:
        src = producer.get(id(t))
        if src is not None:
            _add_edge(view, src, OUTPUTS, t.name)
    return view


def _add_edge(view: nx.DiGraph, src: int, dst: int | str, name: str) -> None:
    if view.has_edge(src, dst):
        view.edges[src, dst]["tensors"].append(name)
    else:
        view.add_edge(src, dst, tensors=[name])


def live_node_indices(graph: gs.Graph) -> set[int]:
    """Indices of the nodes some graph output depends on."""
    view = dataflow(graph)
    return {i for i in nx.ancestors(view, OUTPUTS) if i != OUTPUTS}


def topological_nodes(graph: gs.Graph) -> list[gs.Node]:
    """The graph's nodes in a deterministic topological order (ties broken by original position)."""
    view = dataflow(graph)
    view.remove_node(OUTPUTS)
    order = nx.lexicographical_topological_sort(view)
    return [graph.nodes[i] for i in order]


def stable_topological_order(deps: Sequence[Iterable[int]]) -> list[int] | None:
    """Indices 0..n-1 ordered so each comes after its ``deps[i]``, ties kept in index order; None on a cycle.

    For graphs held as protos (node lists with computed dependencies) rather than graphsurgeon graphs.
    """
    view = nx.DiGraph()
    view.add_nodes_from(range(len(deps)))
    view.add_edges_from((j, i) for i, d in enumerate(deps) for j in d)
    try:
        return list(nx.lexicographical_topological_sort(view))
    except nx.NetworkXUnfeasible:
        return None


def consumers(tensor: gs.Tensor) -> list[gs.Node]:
    return list(tensor.outputs)


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None
