"""fp16's plan for one graph: which float32 tensors each node ties to its own precision, and which nodes
compute in the narrow type, chosen by a minimum cut so that the fewest Casts are needed.

The ONNX schema says which inputs and outputs of an op share a type variable (``T`` of Add is every input
and the output; Resize's ``scales`` is always ``tensor(float)``; Shape's ``T`` is its input alone). A node
"binds" the float32 tensors of every type variable it shares between several of them: they all take the
node's precision. An input whose type variable is its own (Shape, Cast's source, Resize's roi) reads
either precision and costs no Cast; an input of a fixed ``tensor(float)`` type needs float32.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import networkx as nx
import onnx

FLOAT = onnx.TensorProto.FLOAT

#: How a node's use of one float32 input follows precision: ``mode`` (the node's own), ``any`` (either
#: precision, no Cast), ``float32`` (always float32, whatever the node's).
Use = Literal["mode", "any", "float32"]
#: What a node is to the plan: ``compute`` (wants the narrow type), ``neutral`` (moves data only: takes
#: whichever precision needs fewer Casts), ``blocked`` (stays float32; ``Node.reason`` says why).
Role = Literal["compute", "neutral", "blocked"]

#: Ops that only move, select or reshape values: they compute the same in either precision, so the cut
#: puts them wherever fewer Casts result (a Reshape between two float32 ops stays float32).
NEUTRAL_OPS = frozenset({
    "Identity", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Concat", "Split", "Slice",
    "Gather", "GatherElements", "GatherND", "Expand", "Tile", "DepthToSpace", "SpaceToDepth", "Where",
    "Constant", "ConstantOfShape", "Cast", "Pad", "ReverseSequence", "Compress", "ScatterND", "ScatterElements",
})

#: Ops whose float32 output type is an attribute: the rewrite knows how to retarget these (``Cast``'s
#: ``to``, the value tensor of ``Constant`` and ``ConstantOfShape``); any other op with a ``dtype``
#: attribute (EyeLike, Random*, Bernoulli, Multinomial) stays float32.
ATTRIBUTE_TYPED = frozenset({"Cast", "Constant", "ConstantOfShape"})
DTYPE_ATTRIBUTE_OPS = frozenset({
    "EyeLike", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Bernoulli", "Multinomial",
})

#: Always float32: float inputs that are coordinates, counts or running sums, where float16's 11-bit
#: significand changes the result's meaning rather than its precision (a Range of 3000 steps; boxes).
DEFAULT_BLOCK = {
    "Range": "its length and values are computed from the float start/limit/delta",
    "CumSum": "a running sum loses float16 precision with every element",
    "NonMaxSuppression": "box coordinates and IoU thresholds",
    "RoiAlign": "box coordinates",
}

#: Added by ``fragile=true``: ops whose float16 results overflow or lose their meaning on real ranges.
FRAGILE = {
    "Softmax": "exponentials and their sum overflow or underflow float16",
    "LogSoftmax": "exponentials and their sum overflow or underflow float16",
    "LayerNormalization": "the mean and variance sums lose float16 precision",
    "GroupNormalization": "the mean and variance sums lose float16 precision",
    "InstanceNormalization": "the mean and variance sums lose float16 precision",
    "Exp": "overflows float16 above 11.1",
    "Pow": "overflows float16 easily",
    "Log": "inputs below float16's smallest value become -inf",
    "ReduceSum": "a long sum loses float16 precision",
    "ReduceSumSquare": "squares overflow float16 above 256",
    "ReduceLogSumExp": "exponentials overflow float16",
    "ReduceMean": "a long sum loses float16 precision",
    "ReduceL2": "squares overflow float16 above 256",
}

#: Control-flow ops: kept float32 at their boundary; their bodies are planned on their own.
CONTROL_FLOW = frozenset({"If", "Loop", "Scan", "SequenceMap"})


@dataclass
class Node:
    """One node of the graph as the plan sees it.

    Attributes:
        index: its position in the graph's node list; name, op_type: the node's.
        role: see ``Role``; ``reason`` says why a node is blocked.
        inputs: per float32 input position, how its precision follows the node.
        outputs: positions of float32 outputs (always the node's precision).
    """

    index: int
    name: str
    op_type: str
    role: Role
    reason: str = ""
    inputs: dict[int, Use] = field(default_factory=dict)
    outputs: list[int] = field(default_factory=list)


def _formal(params: Sequence[onnx.defs.OpSchema.FormalParameter], i: int) -> onnx.defs.OpSchema.FormalParameter | None:
    """The schema parameter that actual position ``i`` belongs to (a variadic last one covers the rest)."""
    if i < len(params):
        return params[i]
    if params and params[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic:
        return params[-1]
    return None


def _type_name(dtype: int) -> str:
    return f"tensor({onnx.helper.tensor_dtype_to_string(dtype).removeprefix('TensorProto.').lower()})"


def classify(node: onnx.NodeProto, index: int, opset: int, floats: set[str], target: int,
             blocked: Mapping[str, str]) -> Node | None:
    """The plan's view of ``node``, or None when it reads and writes no float32 tensor.

    ``floats`` holds the names known to be float32; ``blocked`` maps op types to the reason they stay float32.
    """
    f_in = [i for i, name in enumerate(node.input) if name in floats]
    f_out = [i for i, name in enumerate(node.output) if name in floats]
    if not f_in and not f_out:
        return None

    def fixed(reason: str) -> Node:
        return Node(index, node.name, node.op_type, "blocked", reason, {i: "float32" for i in f_in}, f_out)

    if node.domain not in ("", "ai.onnx"):
        return fixed(f"custom domain {node.domain!r}")
    if node.op_type in CONTROL_FLOW:
        return fixed("control flow: its boundary stays float32, its body is converted on its own")
    if node.op_type in DTYPE_ATTRIBUTE_OPS:
        return fixed("its output type is a dtype attribute")
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "")
    except onnx.defs.SchemaError:
        return fixed(f"no ONNX schema at opset {opset}")
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    target_type = _type_name(target)
    in_vars = {i: _formal(schema.inputs, i) for i in range(len(node.input))}
    out_vars = {i: _formal(schema.outputs, i) for i in range(len(node.output))}
    uses: dict[str, int] = {}
    for param in [*in_vars.values(), *out_vars.values()]:
        if param is not None and param.type_str in allowed:
            uses[param.type_str] = uses.get(param.type_str, 0) + 1
    out_typevars = {p.type_str for p in out_vars.values() if p is not None}
    inputs: dict[int, Use] = {}
    for i in f_in:
        param = in_vars[i]
        var = param.type_str if param is not None else ""
        if var not in allowed:
            inputs[i] = "float32"  # a fixed type (Resize's scales) or a parameter the schema does not list
        elif uses[var] == 1 and var not in out_typevars:
            inputs[i] = "any" if target_type in allowed[var] else "float32"
        else:
            inputs[i] = "mode"
    bound = {p.type_str for i, u in inputs.items() if u == "mode" and (p := in_vars[i]) is not None}
    bound |= {p.type_str for i in f_out if (p := out_vars[i]) is not None}
    if not bound:
        return Node(index, node.name, node.op_type, "neutral", "", inputs, f_out)  # only flexible inputs: any precision, no Cast
    if node.op_type in blocked:
        return fixed(blocked[node.op_type])
    if node.op_type in ("Constant", "ConstantOfShape") and not _value_is_float(node):
        return fixed("its value is not a float32 tensor")
    missing = sorted(v for v in bound if v not in allowed or target_type not in allowed[v])
    if missing:
        return fixed(f"the ONNX schema of {node.op_type} at opset {opset} has no {target_type} for {missing[0]}")
    role: Role = "neutral" if node.op_type in NEUTRAL_OPS else "compute"
    return Node(index, node.name, node.op_type, role, "", inputs, f_out)


def block_wide_constants(view: Node, node: onnx.NodeProto, too_wide: Mapping[str, float]) -> Node:
    """``view`` blocked when it computes with a constant beyond the narrow type's range (``too_wide``: name
    -> largest magnitude). Clipping such a weight changes the model, not its precision: ppocr_det's
    BatchNorm variances of 1e7-1e8 clipped to 65504 turned its output into noise (cosine 0.03).
    """
    if view.role == "blocked":
        return view
    for i, use in view.inputs.items():
        if use == "mode" and node.input[i] in too_wide:
            reason = f"its constant {node.input[i]} reaches {too_wide[node.input[i]]:.3g}, beyond the narrow range"
            return Node(view.index, view.name, view.op_type, "blocked", reason,
                        {k: "float32" for k in view.inputs}, view.outputs)
    return view


def cast_allows(opset: int, target: int) -> bool:
    """Whether ONNX's Cast at ``opset`` converts float32 to and from ``target`` (bfloat16: opset >= 13)."""
    schema = onnx.defs.get_schema("Cast", opset, "")
    return all(_type_name(target) in c.allowed_type_strs for c in schema.type_constraints)


def _value_is_float(node: onnx.NodeProto) -> bool:
    for attr in node.attribute:
        if attr.name == "value":
            return attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == FLOAT
    return node.op_type == "ConstantOfShape"  # its default value is a float32 zero


def float32_names(graph: onnx.GraphProto, known: Mapping[str, int], opset: int) -> set[str]:
    """Names of the float32 tensors of one graph scope: those typed float32 by shape inference, plus
    every tensor that shares a schema type variable with one of them (in case inference left it untyped).
    """
    floats = {name for name, t in known.items() if t == FLOAT}
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type in CONTROL_FLOW:
            continue
        try:
            schema = onnx.defs.get_schema(node.op_type, opset, "")
        except onnx.defs.SchemaError:
            continue
        groups: dict[str, list[str]] = {}
        for params, names in ((schema.inputs, node.input), (schema.outputs, node.output)):
            for i, name in enumerate(names):
                param = _formal(params, i)
                if name and param is not None:
                    groups.setdefault(param.type_str, []).append(name)
        for names in groups.values():
            if len(names) > 1 and any(n in floats for n in names):
                floats.update(names)
    return floats


# ---------------------------------------------------------------------------------------------- the cut
_SOURCE, _SINK = ("narrow",), ("float32",)
#: Cost of a Cast (one per tensor whose producer and readers disagree, shared by all readers).
_CAST = 2
#: Pull of an initializer (or Constant node) towards the narrow type: less than a Cast, so a weight that
#: only float32 nodes read stays float32 rather than being stored narrow and cast back at every run, and
#: a weight that only subgraphs read (silero_vad's LSTM weights, read inside nested Ifs) is stored narrow.
_INITIALIZER_PULL = 1


@dataclass(frozen=True)
class Tensor:
    """One float32 tensor of the graph scope, for the cut.

    Attributes:
        producer: the node index writing it, or None for an initializer or a boundary value.
        fixed: for a boundary value (graph or body input, outer-scope name, a fixed-type output of a
            node), whether it is narrow (True) or float32 (False); None for a node output or initializer.
        readers: (node index, input position, use) of every reader in this scope.
        output_narrow: for a graph or body output, whether it must be narrow; None otherwise.
    """

    producer: int | None
    fixed: bool | None
    readers: tuple[tuple[int, int, Use], ...]
    output_narrow: bool | None


def narrow_nodes(nodes: Mapping[int, Node], tensors: Mapping[str, Tensor]) -> tuple[set[int], set[str]]:
    """Which nodes compute narrow, and which initializers are stored narrow: a minimum cut in which
    compute nodes are the narrow side, blocked nodes and float32 boundaries the float32 side, and each
    tensor whose members (producer and the readers that follow their node's precision) are split costs one
    Cast (a hyperedge, in Lawler's construction: members -> in -> out -> members).

    Compute and blocked nodes are merged into the two terminals, so the free choices (data-movement
    nodes, initializers) fall apart into small independent pieces, each cut on its own: networkx's
    preflow-push on the whole graph took 53 s for 15,000 nodes, the pieces take well under a second.
    """
    def key(index: int) -> tuple[str, ...] | tuple[str, int]:
        role = nodes[index].role
        return _SOURCE if role == "compute" else _SINK if role == "blocked" else ("n", index)

    g = nx.DiGraph()
    for index, node in nodes.items():
        if node.role == "neutral" and node.op_type == "Constant":
            g.add_edge(_SOURCE, ("n", index), capacity=_INITIALIZER_PULL)  # a weight, like an initializer
    for name, t in tensors.items():
        members: list[tuple[str, ...] | tuple[str, int]] = []
        if t.producer is not None:
            members.append(key(t.producer))
        elif t.fixed is not None:
            members.append(_SOURCE if t.fixed else _SINK)
        else:
            members.append(("i", name))
            g.add_edge(_SOURCE, ("i", name), capacity=_INITIALIZER_PULL)
        for index, _, use in t.readers:
            if use == "mode":
                members.append(key(index))
            elif use == "float32":
                members.append(_SINK)
        if t.output_narrow is not None:
            members.append(_SOURCE if t.output_narrow else _SINK)
        unique = list(dict.fromkeys(members))
        if len(unique) < 2 or all(m in (_SOURCE, _SINK) for m in unique):
            continue  # nothing to decide: every member is fixed (a forced Cast, or none)
        e_in, e_out = ("e", name, "in"), ("e", name, "out")
        g.add_edge(e_in, e_out, capacity=_CAST)
        for m in unique:
            g.add_edge(m, e_in)
            g.add_edge(e_out, m)
    narrow_side: set[object] = set()
    free = g.subgraph([n for n in g if n not in (_SOURCE, _SINK)])
    for piece in nx.weakly_connected_components(free):
        # Built from the piece's own edges: a subgraph view would walk the terminals' whole adjacency.
        part = nx.DiGraph()
        part.add_nodes_from([_SOURCE, _SINK])
        for n in piece:
            part.add_edges_from(g.out_edges(n, data=True))
            part.add_edges_from(g.in_edges(n, data=True))
        _, (side, _) = nx.minimum_cut(part, _SOURCE, _SINK)
        narrow_side |= side
    chosen = {i for i, node in nodes.items() if node.role == "compute"}
    chosen |= {k[1] for k in narrow_side if isinstance(k, tuple) and k[0] == "n"}
    inits = {k[1] for k in narrow_side if isinstance(k, tuple) and k[0] == "i"}
    return chosen, inits


def readers_of(nodes: Iterable[Node], graph: onnx.GraphProto) -> dict[str, list[tuple[int, int, Use]]]:
    """Per float32 name, its readers in this scope (node index, input position, use)."""
    readers: dict[str, list[tuple[int, int, Use]]] = {}
    for node in nodes:
        for i, use in node.inputs.items():
            readers.setdefault(graph.node[node.index].input[i], []).append((node.index, i, use))
    return readers
