"""Constant values: initializers and Constant nodes read alike, and Constant nodes lowered to initializers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from nnopt.ir.model import Model
from nnopt.ir.walk import graph_outputs, is_onnx_op

#: Ops whose outputs are random: folding would freeze one sample.
NONDETERMINISTIC_OPS = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli", "Dropout"}
)


# ---------------------------------------------------------------------------------------- Constant attrs
def _tensor_attr(value: Any) -> gs.Constant | None:
    return value if isinstance(value, gs.Constant) else None


def _float_attr(value: Any) -> np.ndarray | None:
    # NOTE: Constant's value_float is a rank-0 float32 tensor, value_floats a rank-1 float32 tensor.
    return np.array(value, dtype=np.float32) if isinstance(value, (int, float)) else None


def _floats_attr(value: Any) -> np.ndarray | None:
    return np.array(list(value), dtype=np.float32).reshape(-1) if isinstance(value, (list, tuple)) else None


def _int_attr(value: Any) -> np.ndarray | None:
    # NOTE: Constant's value_int is a rank-0 int64 tensor, value_ints a rank-1 int64 tensor.
    return np.array(value, dtype=np.int64) if isinstance(value, int) and not isinstance(value, bool) else None


def _ints_attr(value: Any) -> np.ndarray | None:
    return np.array(list(value), dtype=np.int64).reshape(-1) if isinstance(value, (list, tuple)) else None


#: Constant attribute name → converter from graphsurgeon's attribute value to an array or gs.Constant.
#: value_string(s) and sparse_value are left alone: numpy string tensors and sparse initializers do not
#: round-trip through graphsurgeon reliably, and they are never weights.
_CONSTANT_ATTRS: dict[str, Callable[[Any], gs.Constant | np.ndarray | None]] = {
    "value": _tensor_attr,
    "value_float": _float_attr,
    "value_floats": _floats_attr,
    "value_int": _int_attr,
    "value_ints": _ints_attr,
}


def constant_node_payload(node: gs.Node) -> gs.Constant | np.ndarray | None:
    """What a Constant node holds (a gs.Constant for ``value``, else an array), or None if unsupported.

    None for other op types, for string/sparse values and for attribute references inside functions.
    """
    if node.op != "Constant" or not is_onnx_op(node) or len(node.attrs) != 1:
        return None
    attr_name, attr_value = next(iter(node.attrs.items()))
    convert = _CONSTANT_ATTRS.get(attr_name)
    if convert is None or isinstance(attr_value, gs.Node.AttributeRef):
        return None
    return convert(attr_value)


def constant_values(tensor: gs.Tensor) -> np.ndarray | None:
    """The values of ``tensor`` if they are known without running the model, else None.

    Known: an initializer (gs.Constant), or the output of a Constant node whose attribute is ``value``,
    ``value_float(s)`` or ``value_int(s)`` (a float scalar comes back as a rank-0 float32 array, ints as
    int64). Models exported from Paddle and some TensorFlow converters keep every weight in Constant
    nodes, so a pass that asks here sees those weights too. The array is the model's own: copy it before
    changing it.
    """
    if isinstance(tensor, gs.Constant):
        return tensor.values
    if len(tensor.inputs) == 1:
        payload = constant_node_payload(tensor.inputs[0])
        if isinstance(payload, gs.Constant):
            return payload.values
        return payload
    return None


def detached_values(const: gs.Constant) -> np.ndarray | LazyValues:
    """``const``'s values for a new Constant, sharing nothing that graphsurgeon's export writes to.

    Unloaded values stay lazy, so dtypes numpy lacks (bfloat16, float8) pass through unchanged, but over a
    copy of the TensorProto: graphsurgeon's export renames the TensorProto behind LazyValues in place, which
    would rename a tensor inside the ModelProto the model was imported from.
    """
    values = const._values
    if isinstance(values, LazyValues) and not isinstance(values, SparseValues):
        tensor = onnx.TensorProto()
        tensor.CopyFrom(values.tensor)
        return LazyValues(tensor)
    return values


# ---------------------------------------------------------------------------------------------- lowering
def lower_constant_nodes(graph: gs.Graph, pinned: set[int]) -> int:
    """Turn ``graph``'s Constant nodes into gs.Constant tensors of the same name; return how many.

    Constants in ``pinned`` (graph outputs, also of subgraphs that return an outer value) stay nodes: an
    output that is an initializer is legal ONNX, but runtimes have handled it poorly (If branches in
    particular), so the interface keeps a producer node.
    """
    converted = 0
    keep: list[gs.Node] = []
    for node in graph.nodes:
        payload = constant_node_payload(node)
        if payload is None or len(node.outputs) != 1 or id(node.outputs[0]) in pinned:
            keep.append(node)
            continue
        out = node.outputs[0]
        node.outputs.clear()
        node.inputs.clear()
        if isinstance(payload, gs.Constant):
            out.to_constant(detached_values(payload), export_dtype=payload._export_dtype)
        else:
            out.to_constant(payload)
        converted += 1
    if converted:
        graph.nodes = keep
    return converted


def lower_model_constants(model: Model) -> int:
    """``lower_constant_nodes`` on every graph of ``model``; return how many Constant nodes were lowered.

    Graph outputs keep their Constant node. A main-graph constant stays a top-level initializer even
    when only subgraphs read it.
    """
    total = 0
    pinned = graph_outputs(model)
    for graph in model.all_graphs():
        outputs = [n.outputs[0] for n in graph.nodes if n.op == "Constant" and len(n.outputs) == 1]
        count = lower_constant_nodes(graph, pinned)
        total += count
        if graph is model.graph and count:
            # A main-graph constant that only a subgraph reads would otherwise be written into that
            # subgraph; keep it where the Constant node was.
            model.top_level_initializers.update(t.name for t in outputs if isinstance(t, gs.Constant))
    return total
