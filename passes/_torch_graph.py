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
from nnopt.passes._torch_ops import OPS, OpFunction, UnsupportedOp, fake_quantize, integer_range, scale_shape

#: Ops whose output a constant added next (``MatMul → Add(bias)``) is the bias of: that constant trains too.
_BIASED = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose"})


@dataclass(frozen=True)
class _Step:
    node: gs.Node
    run: OpFunction
    inputs: tuple[str, ...]  # "" for an omitted optional input
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class Grid:
    """The fixed integer grid of a weight stored quantized (integers read by DequantizeLinear): its scale,
    zero point (shaped to broadcast against the weight) and saturation range."""

    scale: torch.Tensor
    zero: torch.Tensor | None
    shape: list[int]
    low: int
    high: int

    def integers(self, values: torch.Tensor) -> torch.Tensor:
        """Float weights on the grid, as a float tensor of integers (straight-through gradient)."""
        return fake_quantize(values, self.scale, self.zero, self.shape, self.low, self.high)

    def dequantize(self, integers: np.ndarray) -> np.ndarray:
        zero = 0.0 if self.zero is None else self.zero.to(torch.float32).reshape(self.shape).numpy()
        return ((integers.astype(np.float32) - zero) * self.scale.reshape(self.shape).numpy()).astype(np.float32)


@dataclass(frozen=True)
class Weight:
    """A trainable constant: where its values live in the graph, and what reads it.

    A float constant trains as itself. An integer constant read only by DequantizeLinear (a quantized
    weight, ``grid`` set) trains as a float shadow initialised from its dequantized values and
    fake-quantized on the fixed grid in the forward pass (quantization-aware training); it is written
    back as integers on the same grid, so the graph and onnxruntime's int8 kernels are unchanged.
    """

    name: str
    holder: gs.Constant | gs.Node  # the initializer, or the Constant node whose ``value`` holds it
    values: np.ndarray
    readers: tuple[gs.Node, ...]
    grid: Grid | None = None

    def initial(self) -> np.ndarray:
        """The float32 values training starts from (the dequantized ones for a quantized weight)."""
        return self.values.astype(np.float32) if self.grid is None else self.grid.dequantize(self.values)

    def feed(self, param: torch.Tensor) -> torch.Tensor:
        """What the graph's readers see: the parameter, or its integers on the grid."""
        return param if self.grid is None else self.grid.integers(param)

    def write(self, values: np.ndarray) -> None:
        """Give the graph new values (a new array, the old one untouched), in the initializer's own dtype."""
        if self.grid is not None:
            with torch.no_grad():
                values = self.grid.integers(torch.from_numpy(values.astype(np.float32))).numpy()
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
        self.weights += _quantized_weights(graph, constants)
        trained = {w.name for w in self.weights}
        self.params = torch.nn.ParameterList([torch.nn.Parameter(torch.from_numpy(w.initial())) for w in self.weights])
        self.fixed = {name: _tensor(values) for name, (_, values) in constants.items() if name not in trained}

    def forward(self, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        env: dict[str, torch.Tensor] = dict(self.fixed)
        env.update((w.name, w.feed(p)) for w, p in zip(self.weights, self.params))
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


def _quantized_weights(graph: gs.Graph, constants: dict[str, tuple[gs.Constant | gs.Node, np.ndarray]]) -> list[Weight]:
    """Integer constants that only DequantizeLinear nodes read, all with the same constant scale, zero
    point and axis: quantize's int8 weights (and int32 biases). Anything else integer (kmeans indices,
    shapes) stays fixed."""
    readers: dict[str, list[gs.Node]] = {}
    for node in graph.nodes:
        for tensor in node.inputs:
            if tensor.name in constants:
                readers.setdefault(tensor.name, []).append(node)
    out = []
    for name, nodes in readers.items():
        holder, values = constants[name]
        if values.dtype.kind not in "iu":
            continue
        grids = {_grid_key(node, name, constants) for node in nodes}
        if len(grids) != 1 or None in grids:
            continue
        grid = _grid(nodes[0], values, constants)
        if grid is not None:
            out.append(Weight(name, holder, values, tuple(nodes), grid))
    return out


def _grid_key(node: gs.Node, name: str, constants: dict[str, Any]) -> tuple[Any, ...] | None:
    """What makes two DequantizeLinear readers of ``name`` agree: the same scale, zero point and axis."""
    if node.op != "DequantizeLinear" or not is_onnx_op(node) or node.inputs[0].name != name:
        return None
    params = tuple(t.name for t in node.inputs[1:3] if t.name)
    if not all(p in constants for p in params) or int(node.attrs.get("block_size", 0)):
        return None
    return (*params, int(node.attrs.get("axis", 1)))


def _grid(node: gs.Node, values: np.ndarray, constants: dict[str, Any]) -> Grid | None:
    """The grid of a DequantizeLinear reading ``values`` (scale, zero point and range), or None if unfit."""
    scale = _tensor(constants[node.inputs[1].name][1])
    zero_name = node.inputs[2].name if len(node.inputs) > 2 else ""
    zero = _tensor(constants[zero_name][1]) if zero_name else None
    if not scale.is_floating_point() or zero is not None and zero.dtype != _tensor(values).dtype:
        return None
    shape = scale_shape(_tensor(values), scale, node.attrs)
    info = np.iinfo(values.dtype)
    low, high = integer_range(zero) if zero is not None else (int(info.min), int(info.max))
    return Grid(scale, zero, shape, low, high)


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
