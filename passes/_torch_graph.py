"""TorchGraph: an onnx-graphsurgeon graph run by PyTorch ops, its float weights trainable and written back by name."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
import torch

from nnopt.ir.constants import constant_node_payload
from nnopt.ir.walk import is_onnx_op
from nnopt.passes._torch_ops import OPS, OpFunction, UnsupportedOp

#: Ops whose output a constant added next (``MatMul → Add(bias)``) is the bias of: that constant trains too.
_BIASED = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose"})


@dataclass(frozen=True)
class _Step:
    node: gs.Node
    run: OpFunction
    inputs: tuple[str, ...]  # "" for an omitted optional input
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class Weight:
    """A trainable float constant: where its values live in the graph, and what reads it."""

    name: str
    holder: gs.Constant | gs.Node  # the initializer, or the Constant node whose ``value`` holds it
    values: np.ndarray
    readers: tuple[gs.Node, ...]

    def write(self, values: np.ndarray) -> None:
        """Give the graph new values (a new array, the old one untouched), in the initializer's own dtype."""
        new = np.ascontiguousarray(values.astype(self.values.dtype))
        if isinstance(self.holder, gs.Constant):
            self.holder.values = new
        else:
            self.holder.attrs["value"] = gs.Constant(self.holder.attrs["value"].name, new)


class TorchGraph(torch.nn.Module):
    """A main graph executed node by node with the ops of ``OPS``, in topological order.

    Float constants read as weights (an op's ``weight_slots``, or a bias added after MatMul/Gemm/Conv) are
    ``nn.Parameter``s, one per ONNX tensor name however many nodes read it, so training keeps tied weights
    tied and the write-back is exact by construction. Every other constant is a fixed tensor.
    BatchNormalization runs in inference form (running statistics fixed).

    Raises:
        UnsupportedOp: a node the interpreter cannot run (message: op type and node name).
    """

    def __init__(self, graph: gs.Graph, opset: int) -> None:
        super().__init__()
        self.opset = opset
        self.input_names = [t.name for t in graph.inputs]
        self.output_names = [t.name for t in graph.outputs]
        constants = _constants(graph)
        self.steps = _plan(graph, set(constants) | set(self.input_names))
        self.weights = [w for w in _weights(graph, constants) if w.values.dtype.kind == "f"]
        trained = {w.name for w in self.weights}
        self.params = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.from_numpy(w.values.astype(np.float32))) for w in self.weights]
        )
        self.fixed = {name: _tensor(values) for name, (_, values) in constants.items() if name not in trained}

    def forward(self, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        env: dict[str, torch.Tensor] = dict(self.fixed)
        env.update((w.name, p) for w, p in zip(self.weights, self.params))
        env.update(feeds)
        for step in self.steps:
            args = [env[name] if name else None for name in step.inputs]
            try:
                outs = step.run(args, step.node.attrs, self.opset)
            except UnsupportedOp as exc:
                raise UnsupportedOp(f"{step.node.op} node '{step.node.name}': {exc}") from None
            env.update(zip(step.outputs, outs))
        return [env[name] for name in self.output_names]

    def snapshot(self) -> list[torch.Tensor]:
        """A copy of the current parameter values."""
        return [p.detach().clone() for p in self.params]

    def restore(self, values: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, v in zip(self.params, values):
                p.copy_(v)

    def write_back(self) -> None:
        """Write every parameter's current value into its initializer (or Constant node), dtype kept."""
        for weight, param in zip(self.weights, self.params):
            weight.write(param.detach().numpy())


def _tensor(values: np.ndarray) -> torch.Tensor:
    array = np.asarray(values)
    if array.dtype.kind == "f":
        array = array.astype(np.float32)
    elif array.dtype.kind == "u" and array.dtype != np.uint8:
        array = array.astype(np.int64)  # torch has no uint16/32/64 arithmetic worth relying on
    return torch.from_numpy(np.ascontiguousarray(array))


def _constants(graph: gs.Graph) -> dict[str, tuple[gs.Constant | gs.Node, np.ndarray]]:
    """Every constant the graph's nodes read: initializers and Constant-node outputs, by tensor name."""
    found: dict[str, tuple[gs.Constant | gs.Node, np.ndarray]] = {}
    for node in graph.nodes:
        for tensor in node.inputs:
            if isinstance(tensor, gs.Constant):
                found[tensor.name] = (tensor, np.asarray(tensor.values))
        if node.op == "Constant" and is_onnx_op(node):
            payload = constant_node_payload(node)
            if payload is None:
                raise UnsupportedOp(f"Constant node '{node.name}' holds a value the interpreter cannot read")
            values = payload.values if isinstance(payload, gs.Constant) else payload
            found[node.outputs[0].name] = (node, np.asarray(values))
    return found


def _plan(graph: gs.Graph, known: set[str]) -> list[_Step]:
    """The non-Constant nodes as steps, in a topological order (Kahn's, stable in the graph's own order)."""
    nodes = [n for n in graph.nodes if not (n.op == "Constant" and is_onnx_op(n))]
    for node in nodes:
        if not is_onnx_op(node) or node.op not in OPS:
            domain = f" (domain {node.domain})" if not is_onnx_op(node) else ""
            raise UnsupportedOp(f"op {node.op}{domain} (node '{node.name}') is not supported by the interpreter")
    available = set(known)
    waiting: dict[str, list[int]] = {}
    missing = []
    for i, node in enumerate(nodes):
        needs = {t.name for t in node.inputs if t.name and t.name not in available}
        missing.append(len(needs))
        for name in needs:
            waiting.setdefault(name, []).append(i)
    ready = deque(i for i, m in enumerate(missing) if m == 0)
    order: list[_Step] = []
    while ready:
        node = nodes[ready.popleft()]
        order.append(_Step(node, OPS[node.op].run, tuple(t.name for t in node.inputs),
                           tuple(t.name for t in node.outputs)))
        for out in node.outputs:
            for j in waiting.pop(out.name, []):
                missing[j] -= 1
                if missing[j] == 0:
                    ready.append(j)
    if len(order) != len(nodes):
        raise UnsupportedOp("the graph has a cycle or reads a value nothing produces")
    return order


def _weights(graph: gs.Graph, constants: dict[str, tuple[gs.Constant | gs.Node, np.ndarray]]) -> list[Weight]:
    """The constants read in a weight slot, in the order of their first reader."""
    readers: dict[str, list[gs.Node]] = {}
    for node in graph.nodes:
        if node.op == "Constant" or not is_onnx_op(node) or node.op not in OPS:
            continue
        for slot in _weight_slots(node):
            name = node.inputs[slot].name
            if name in constants and node not in readers.setdefault(name, []):
                readers[name].append(node)
    out = []
    for name, nodes in readers.items():
        holder, values = constants[name]
        if isinstance(holder, gs.Node) and "value" not in holder.attrs:
            continue  # value_float(s): a scalar hyper-parameter, not a weight
        out.append(Weight(name, holder, values, tuple(nodes)))
    return out


def _weight_slots(node: gs.Node) -> list[int]:
    slots = [i for i in OPS[node.op].weight_slots if i < len(node.inputs) and node.inputs[i].name]
    if node.op in ("Add", "Sub"):
        # A bias: the constant beside the output of a MatMul/Gemm/Conv.
        for i, other in ((0, 1), (1, 0)):
            producers = node.inputs[other].inputs if len(node.inputs) == 2 else []
            if producers and producers[0].op in _BIASED:
                slots.append(i)
    return slots


def describe(weights: list[Weight]) -> list[dict[str, Any]]:
    """Name, shape and readers of each trainable weight (for reports and tests)."""
    return [
        {"tensor": w.name, "shape": list(w.values.shape), "readers": [n.name for n in w.readers]}
        for w in weights
    ]
