"""example.cancel-transposes: merge and cancel the Transpose pairs that NHWC-converted models are full of.

Op-by-op conversion from NHWC frameworks (TensorFlow, TFLite) wraps every layout-sensitive op in a Transpose
to NCHW and one back, so between two Convs the data goes Transpose(NCHW→NHWC) → Relu → Add(bias) →
Transpose(NHWC→NCHW): two full copies of the activation that compute nothing. nnopt's built-in
``remove-noops`` only drops a single identity-perm Transpose; this pass moves a Transpose down through
per-element ops until it meets the next Transpose, then merges the two (or drops both when they cancel).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from nnopt import (
    LayerDecision,
    Model,
    Pass,
    PassContext,
    PassResult,
    constant_values,
    consumers,
    producer,
    replace_tensor,
    topological_nodes,
)


def _is_onnx(node: gs.Node, op: str) -> bool:
    return node.op == op and node.domain in (None, "", "ai.onnx")


def _perm(node: gs.Node) -> list[int] | str:
    """The Transpose's perm, or why this pass will not use it."""
    perm = node.attrs.get("perm")
    if not isinstance(perm, (list, tuple)):
        # NOTE: without perm a Transpose reverses the dims; that needs the rank, which this pass does not infer.
        return "no perm attribute"
    perm = [int(p) for p in perm]
    return perm if sorted(perm) == list(range(len(perm))) else f"perm {perm} is not a permutation"


def _compose(first: list[int], second: list[int]) -> list[int]:
    """The perm of Transpose(second) applied after Transpose(first): out dim i is input dim first[second[i]]."""
    return [first[k] for k in second]


def _inverse(perm: list[int]) -> list[int]:
    return [int(i) for i in np.argsort(perm)]


# ---------------------------------------------------------------------------------------------- push rules
# A rule is asked whether a Transpose(perm) feeding input ``data_index`` of ``node`` may move below the node,
# i.e. node(Transpose(x), c) == Transpose(node(x, c')). It returns the node's inputs after the move (the
# data input is rewired by the caller; constants may be replaced by re-laid-out copies) or why it may not.
PushRule = Callable[[gs.Node, int, list[int]], "list[gs.Tensor] | str"]


def _per_element(node: gs.Node, data_index: int, inverse: list[int]) -> list[gs.Tensor] | str:
    """A unary per-element op: any other input (Clip's min/max) must be a constant scalar, which has no layout."""
    for i, tensor in enumerate(node.inputs):
        if i == data_index or tensor.is_empty():
            continue
        values = constant_values(tensor)
        if values is None or np.asarray(values).size != 1 or np.ndim(values) > len(inverse):
            return f"its input '{tensor.name}' is not a constant scalar"
    return list(node.inputs)


def _broadcast_constant(node: gs.Node, data_index: int, inverse: list[int]) -> list[gs.Tensor] | str:
    """Add/Sub/Mul/Div with a constant other operand: the constant is re-laid-out like the data."""
    if len(node.inputs) != 2:
        return "it does not have two inputs"
    other = node.inputs[1 - data_index]
    values = constant_values(other)
    if values is None:
        return f"its other operand '{other.name}' is not a constant initializer"
    values = np.asarray(values)
    if values.ndim > len(inverse):
        return f"its constant '{other.name}' has more dims than the transposed tensor"
    if values.size == 1:
        return list(node.inputs)  # a scalar broadcasts the same way in every layout
    # Broadcasting aligns trailing dims: give the constant the full rank, then undo the Transpose on it,
    # so that Transpose(x op c') == Transpose(x) op c. A new Constant: the original array is never written.
    full = values.reshape((1,) * (len(inverse) - values.ndim) + values.shape)
    relaid = gs.Constant(f"{other.name}_relaid", np.ascontiguousarray(np.transpose(full, inverse)))
    inputs = list(node.inputs)
    inputs[1 - data_index] = relaid
    return inputs


_UNARY = (
    "Relu LeakyRelu Elu Selu Sigmoid HardSigmoid HardSwish Tanh Softplus Softsign Clip Cast Abs Neg Exp Log "
    "Sqrt Reciprocal Floor Ceil Round Sign Erf Identity"
).split()

#: op type → how a Transpose moves below it. Only default-domain ops; anything else stops the walk.
PUSH_RULES: dict[str, PushRule] = {
    **{op: _per_element for op in _UNARY},
    **{op: _broadcast_constant for op in ("Add", "Sub", "Mul", "Div")},
}


# ---------------------------------------------------------------------------------------------- planning
@dataclass
class _Plan:
    """Move ``head`` down through ``chain`` until it meets ``tail``, whose perm becomes ``perm``."""

    head: gs.Node
    chain: list[tuple[gs.Node, int, list[gs.Tensor]]]  # (op, index of its data input, its inputs after)
    tail: gs.Node
    perm: list[int]


def _plan(head: gs.Node, reader: gs.Node, local: set[int], pinned: set[int]) -> _Plan | str:
    """Walk from ``reader`` (a reader of ``head``'s output) through push-able ops to the next Transpose."""
    perm = _perm(head)
    assert isinstance(perm, list)
    tensor, node, chain = head.outputs[0], reader, []
    while not _is_onnx(node, "Transpose"):
        rule = PUSH_RULES.get(node.op) if _is_onnx(node, node.op) else None
        if rule is None:
            return f"{node.op} '{node.name}' is not a per-element op this pass moves Transposes through"
        reads = [i for i, t in enumerate(node.inputs) if t is tensor]
        inputs = rule(node, reads[0], _inverse(perm)) if len(reads) == 1 else "it reads the tensor twice"
        if isinstance(inputs, str):
            return f"{node.op} '{node.name}': {inputs}"
        chain.append((node, reads[0], inputs))
        tensor = node.outputs[0]
        readers = consumers(tensor)
        # Moving past an op whose output is read elsewhere would change what the other readers see.
        if len(node.outputs) != 1 or len(readers) != 1 or id(tensor) in pinned or id(readers[0]) not in local:
            return f"the output of {node.op} '{node.name}' has other readers or is a graph output"
        node = readers[0]
    tail_perm = _perm(node)
    if isinstance(tail_perm, str) or len(tail_perm) != len(perm):
        problem = tail_perm if isinstance(tail_perm, str) else "another rank"
        return f"the Transpose it meets, '{node.name}', has {problem}"
    return _Plan(head, chain, node, _compose(perm, tail_perm))


# ---------------------------------------------------------------------------------------------- rewriting
def _bypass(
    scope: list[gs.Graph], node: gs.Node, source: gs.Tensor, local: set[int], pinned: set[int]
) -> str:
    """Remove the node whose output equals ``source``; a graph output keeps its name (and a producer).

    ``scope`` is the node's graph followed by all its subgraphs (``_scope``): the graphs whose outputs may
    name the replaced tensor.
    """
    graph = scope[0]
    out = node.outputs[0]
    maker = producer(source)
    if id(out) in pinned and (maker is None or id(maker) not in local or id(source) in pinned):
        # Graph input → graph output, or an outer-scope value: some node must still write the output.
        node.op = "Identity"
        node.attrs.clear()
        node.inputs[0] = source
        return "replaced by an Identity: its output is a graph output and its input cannot be renamed"
    node.inputs.clear()
    node.outputs.clear()
    if id(out) not in pinned:
        replace_tensor(graph, out, source, graphs=scope)
    else:  # the source's producer writes the graph output instead (its readers follow the rename)
        replace_tensor(graph, source, out, graphs=scope)
        maker.outputs[[i for i, t in enumerate(maker.outputs) if t is source][0]] = out  # type: ignore[union-attr]
    return ""


class _NewConstants:
    """The re-laid-out constants of one graph: one copy per distinct array, under a name no tensor has."""

    def __init__(self, graph: gs.Graph) -> None:
        self.graph = graph
        self.made: dict[tuple[str, str, tuple[int, ...], bytes], gs.Constant] = {}
        self.taken: set[str] = set()

    def adopt(self, const: gs.Constant) -> gs.Constant:
        key = (const.name, const.values.dtype.str, const.values.shape, const.values.tobytes())
        if key not in self.made:  # a bias used by two Adds gets one copy, not two
            self.taken = self.taken or set(self.graph.tensors())
            base, n = const.name, 1
            while const.name in self.taken:
                const.name, n = f"{base}_{n}", n + 1
            self.taken.add(const.name)
            self.made[key] = const
        return self.made[key]


def _apply(
    plan: _Plan, scope: list[gs.Graph], new: _NewConstants, local: set[int], pinned: set[int]
) -> list[LayerDecision]:
    """Carry out ``plan``; return its per-layer report."""
    head, tail = plan.head, plan.tail
    inverse = _inverse(_perm(head))  # type: ignore[arg-type]
    layers: list[LayerDecision] = []
    current = head.inputs[0]
    for node, data_index, planned in plan.chain:
        inputs = [
            current if i == data_index else t if any(t is old for old in node.inputs) else new.adopt(t)
            for i, t in enumerate(planned)
        ]
        for i, tensor in enumerate(inputs):
            if node.inputs[i] is not tensor:
                node.inputs[i] = tensor
        current = node.outputs[0]
        if current.shape is not None and len(current.shape) == len(inverse):  # now in the head's input layout
            current.shape = [current.shape[i] for i in inverse]
    if plan.chain:
        crossed = ", ".join(f"{n.op} '{n.name}'" for n, _, _ in plan.chain)
        layers.append(LayerDecision(head.name, "Transpose", "moved", f"through {crossed} to meet '{tail.name}'"))
    if plan.perm == list(range(len(plan.perm))):
        why = _bypass(scope, tail, current, local, pinned)
        layers.append(LayerDecision(tail.name, "Transpose", "removed", why or f"cancels '{head.name}'"))
    else:
        tail.attrs["perm"] = plan.perm
        tail.inputs[0] = current
        layers.append(LayerDecision(tail.name, "Transpose", "rewritten", f"absorbs '{head.name}': perm {plan.perm}"))
    if not consumers(head.outputs[0]) and id(head.outputs[0]) not in pinned:
        head.inputs.clear()
        head.outputs.clear()
        layers.append(LayerDecision(head.name, "Transpose", "removed", f"moved into '{tail.name}'"))
    return layers


class CancelTransposes(Pass):
    """Merge consecutive Transposes and cancel inverse pairs, moving them through per-element ops to meet.

    Matches: a Transpose (with a perm attribute) whose output reaches another Transpose directly or
    through a chain of per-element ops (registry ``PUSH_RULES``: Relu, Sigmoid, Tanh, Clip with constant
    min/max, Cast, ...; Add/Sub/Mul/Div whose other operand is a constant initializer), each op's output
    read only by the next. Rewrites: the ops read the untransposed tensor (constants get a re-laid-out
    copy), and the second Transpose takes the composed perm, or goes when that is the identity; a graph
    output keeps its name. A first Transpose read elsewhere too (or a graph output) stays for those
    readers and is moved onto the path only when the pair cancels there, so every rewrite removes at least
    one Transpose and none adds work. Lossless (the same per-element arithmetic on the same values).
    Declines: no perm attribute (the default reverse), a non-per-element op, non-constant operands,
    intermediates read elsewhere, reads from inside subgraphs. Run ``constants-to-initializers`` first
    so that Constant-node operands count as constants.
    """

    name = "example.cancel-transposes"
    lossy = False

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        pinned = {id(t) for g in model.all_graphs() for t in g.outputs}
        before = _count_transposes(model)
        layers: list[LayerDecision] = []
        crossed = 0
        for graph in model.all_graphs():
            new = _NewConstants(graph)
            # Listed once per graph, not per rewrite: finding the subgraphs walks every node. The rewrites
            # only remove Transposes and move per-element ops, so the list stays valid across sweeps.
            scope = _scope(graph)
            while True:  # each rewrite removes a Transpose, so this ends; a later sweep sees merged perms
                done, declined = _sweep(scope, new, pinned)
                layers += done
                crossed += sum(entry.action == "moved" for entry in done)
                if not done:
                    break
            layers += declined  # from the sweep that changed nothing: they describe what remains
        removed = before - _count_transposes(model)
        stats = {"transposes_removed": removed, "transposes_pushed": crossed}
        return PassResult(modified=removed > 0, stats=stats, layers=layers)


def _scope(graph: gs.Graph) -> list[gs.Graph]:
    """``graph`` followed by all its subgraphs: what ``replace_tensor(..., graphs=)`` needs."""
    return [graph, *graph.subgraphs(recursive=True)]


def _sweep(
    scope: list[gs.Graph], new: _NewConstants, pinned: set[int]
) -> tuple[list[LayerDecision], list[LayerDecision]]:
    """One pass over the Transposes of ``scope[0]`` in topological order: (rewritten, declined)."""
    graph = scope[0]
    local = {id(n) for n in graph.nodes}
    done: list[LayerDecision] = []
    declined: dict[int, LayerDecision] = {}
    gone: set[int] = set()
    for head in topological_nodes(graph):
        if not _is_onnx(head, "Transpose") or id(head) in gone:
            continue
        perm = _perm(head)
        if isinstance(perm, str):
            declined[id(head)] = LayerDecision(head.name, "Transpose", "declined", perm)
            continue
        # Each reader of the head's output starts its own walk; the head goes once no reader is left.
        for reader in consumers(head.outputs[0]):
            plan = _plan(head, reader, local, pinned) if id(reader) in local else "read inside a subgraph"
            shared = len(consumers(head.outputs[0])) > 1 or id(head.outputs[0]) in pinned
            if not isinstance(plan, str) and shared and plan.perm != list(range(len(plan.perm))):
                plan = "its output has other readers and the pair does not cancel: moving it would add a Transpose"
            if isinstance(plan, str):
                declined.setdefault(id(head), LayerDecision(head.name, "Transpose", "declined", plan))
                continue
            done += _apply(plan, scope, new, local, pinned)
            gone.update(id(n) for n in (plan.head, plan.tail) if not n.outputs)
            if id(head) in gone:
                break
    if gone:
        graph.nodes = [n for n in graph.nodes if id(n) not in gone]
    return done, [entry for key, entry in declined.items() if key not in gone]


def _count_transposes(model: Model) -> int:
    return sum(_is_onnx(n, "Transpose") for g in model.all_graphs() for n in g.nodes)
