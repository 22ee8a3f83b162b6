"""fuse-hardswish: a HardSwish written out as x · clip(x + 3, 0, 6) / 6 becomes HardSigmoid and Mul."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from nnopt.ir.constants import constant_values
from nnopt.ir.model import Model
from nnopt.ir.walk import is_onnx_op
from nnopt.pipeline.base import LayerDecision, Pass, PassContext, PassResult

#: HardSigmoid(x) = max(0, min(1, alpha · x + beta)) = clip(x + 3, 0, 6) / 6 with these.
ALPHA, BETA = 1.0 / 6.0, 0.5
_TOLERANCE = 1e-6


@dataclass(frozen=True)
class _Match:
    """One written-out HardSwish: its input ``x``, the nodes computing it, and the tensor it ends in."""

    x: gs.Tensor
    nodes: tuple[gs.Node, ...]
    output: gs.Tensor


class FuseHardSwish(Pass):
    """Rewrite a HardSwish written out in four elementwise ops as HardSigmoid and Mul.

    Matches: ``Div(Mul(x, Clip(Add(x, 3), 0, 6)), 6)`` and ``Mul(x, Div(Clip(Add(x, 3), 0, 6), 6))``, with
    any operand order of Add and Mul, a Mul by 1/6 for the Div by 6, and the Clip's bounds as inputs or (opset
    < 11) attributes: what Paddle's exporter writes for every HardSwish (PP-OCR's models: 18 to 28 of them)
    and PyTorch's for ``x * F.relu6(x + 3) / 6``. Every intermediate tensor must have that one reader and
    not be a graph output. Rewrites: ``Mul(x, HardSigmoid(x, alpha=1/6, beta=0.5))`` writing the same
    output tensor, in the main graph and in subgraphs. Two nodes instead of four, and onnxruntime keeps the
    convs before them in its blocked layout longer: PP-OCR's direction classifier ran in 0.78x the time
    (one thread, docs/quantize.md "Written-out HardSwish"). Lossless up to float rounding (x/6 + 0.5 instead of (x + 3)/6:
    3e-8 of outputs of magnitude 0.6 on that model). No opset change: HardSigmoid exists from opset 6.
    """

    name = "fuse-hardswish"
    lossy = False

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        layers: list[LayerDecision] = []
        for graph in model.all_graphs():
            pinned = {id(t) for t in graph.outputs}
            matches = [m for node in graph.nodes if (m := _match(node, pinned)) is not None]
            gone: set[int] = set()
            added: list[gs.Node] = []
            for match in matches:
                if any(id(n) in gone for n in match.nodes):
                    continue  # two candidate ends share nodes: the first match wins
                gone.update(id(n) for n in match.nodes)
                last = match.nodes[-1]
                base = last.name or match.output.name
                gate = gs.Variable(f"{base}/hardsigmoid_out", dtype=match.x.dtype, shape=match.x.shape)
                added.append(gs.Node("HardSigmoid", f"{base}/hardsigmoid", {"alpha": ALPHA, "beta": BETA},
                                     inputs=[match.x], outputs=[gate]))
                for node in match.nodes:  # detached: the output tensor gets the new Mul as its producer
                    node.outputs.clear()
                    node.inputs.clear()
                added.append(gs.Node("Mul", f"{base}/hardswish", inputs=[match.x, gate], outputs=[match.output]))
                layers.append(LayerDecision(base, last.op, "rewritten",
                                            figures={"nodes_before": len(match.nodes), "nodes_after": 2}))
            if gone:
                graph.nodes = [n for n in graph.nodes if id(n) not in gone] + added
                graph.toposort()
        return PassResult(modified=bool(layers), stats={"hardswish_fused": len(layers)}, layers=layers)


def _match(end: gs.Node, pinned: set[int]) -> _Match | None:
    """The written-out HardSwish ending at ``end`` (a Div by 6 or Mul by 1/6, or the Mul by x), or None."""
    if not is_onnx_op(end) or end.op not in ("Div", "Mul") or len(end.inputs) != 2 or len(end.outputs) != 1:
        return None
    scaled = _scaled_by_sixth(end)
    if scaled is not None:  # Div(Mul(x, clip), 6)
        product = _only_producer(scaled, pinned, "Mul")
        if product is None:
            return None
        for x, clipped in _orders(product.inputs):
            clip_nodes = _clip_of_x_plus_3(clipped, x, pinned)
            if clip_nodes is not None:
                return _Match(x, (*clip_nodes, product, end), end.outputs[0])
        return None
    if end.op != "Mul":
        return None
    for x, gate in _orders(end.inputs):  # Mul(x, Div(clip, 6))
        div = _only_producer(gate, pinned, "Div", "Mul")
        inner = _scaled_by_sixth(div) if div is not None else None
        clip_nodes = _clip_of_x_plus_3(inner, x, pinned) if inner is not None else None
        if div is not None and clip_nodes is not None:
            return _Match(x, (*clip_nodes, div, end), end.outputs[0])
    return None


def _scaled_by_sixth(node: gs.Node) -> gs.Tensor | None:
    """The operand ``node`` divides by 6 (Div) or multiplies by 1/6 (Mul, either side), or None."""
    if node.op == "Div" and _is_scalar(node.inputs[1], 6.0):
        return node.inputs[0]
    if node.op == "Mul":
        for value, scale in _orders(node.inputs):
            if _is_scalar(scale, 1.0 / 6.0):
                return value
    return None


def _clip_of_x_plus_3(tensor: gs.Tensor, x: gs.Tensor, pinned: set[int]) -> tuple[gs.Node, gs.Node] | None:
    """(the Add, the Clip) when ``tensor`` is ``Clip(Add(x, 3), 0, 6)`` and only the next op reads it."""
    clip = _only_producer(tensor, pinned, "Clip")
    if clip is None or not _clip_bounds_are_0_6(clip):
        return None
    add = _only_producer(clip.inputs[0], pinned, "Add")
    if add is None or len(add.inputs) != 2:
        return None
    if any(a is x and _is_scalar(b, 3.0) for a, b in _orders(add.inputs)):
        return add, clip
    return None


def _clip_bounds_are_0_6(clip: gs.Node) -> bool:
    if len(clip.inputs) >= 3 and not clip.inputs[1].is_empty() and not clip.inputs[2].is_empty():
        return _is_scalar(clip.inputs[1], 0.0) and _is_scalar(clip.inputs[2], 6.0)
    return len(clip.inputs) == 1 and clip.attrs.get("min") == 0.0 and clip.attrs.get("max") == 6.0


def _only_producer(tensor: gs.Tensor, pinned: set[int], *ops: str) -> gs.Node | None:
    """The node of op ``ops`` writing ``tensor`` as its only output, when exactly one node reads it and it
    is no graph output; else None."""
    if id(tensor) in pinned or len(tensor.inputs) != 1 or len(tensor.outputs) != 1:
        return None
    node = tensor.inputs[0]
    return node if is_onnx_op(node) and node.op in ops and len(node.outputs) == 1 else None


def _orders(pair: list[gs.Tensor]) -> list[tuple[gs.Tensor, gs.Tensor]]:
    return [(pair[0], pair[1]), (pair[1], pair[0])] if len(pair) == 2 else []


def _is_scalar(tensor: gs.Tensor, value: float) -> bool:
    """Whether ``tensor`` is a constant holding the one value ``value`` (any shape of one element)."""
    values = constant_values(tensor)
    if values is None or np.asarray(values).size != 1:
        return False
    return abs(float(np.asarray(values).reshape(-1)[0]) - value) <= _TOLERANCE
