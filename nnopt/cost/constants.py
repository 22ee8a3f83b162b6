"""The constants of a graph as the cost model counts them: what each stores (bytes) and holds (params)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import numpy_helper

from nnopt.cost.decoded import DecodePatternRegistry, decoded_weights
from nnopt.cost.notes import Findings
from nnopt.cost.tensors import ELEMENT_BITS, TensorInfo, tensor_nbytes
from nnopt.cost.walk import NodeView, node_views, subgraphs

#: Ops whose outputs can be constants.
_CONSTANT_OPS = frozenset({"Constant", "ConstantOfShape"})
#: Data types that are shape/index metadata rather than weights: not counted as params.
_METADATA_DTYPES = frozenset({onnx.TensorProto.INT32, onnx.TensorProto.INT64})


@dataclass(slots=True)
class Const:
    """A constant tensor: its size, and how to get its values if a rule asks."""

    dtype: int | None
    shape: tuple[int, ...] | None
    nbytes: int
    params: int
    load: Callable[[], np.ndarray | None]



def collect_constants(
    graph: onnx.GraphProto, nodes: list[NodeView], infos: dict[str, TensorInfo]
) -> dict[str, Const]:
    """Initializers, Constant outputs and constant-shape ConstantOfShape outputs of the main graph
    (``nodes`` in topological order: a ConstantOfShape may read a Constant's output)."""
    consts: dict[str, Const] = {t.name: _const_from_tensor(t) for t in graph.initializer}
    for sparse in graph.sparse_initializer:
        consts[sparse.values.name] = _const_from_sparse(sparse)
    for node in nodes:
        if node.op_type not in _CONSTANT_OPS or node.domain != "" or not node.outputs or not node.outputs[0]:
            continue
        output = node.outputs[0]
        if node.op_type == "Constant":
            const = _const_from_constant_node(node.proto)
            if const is not None:
                consts[output] = const
        elif node.op_type == "ConstantOfShape" and node.inputs and node.inputs[0] in consts:
            const = _const_from_constant_of_shape(node.proto, consts[node.inputs[0]], infos.get(output))
            if const is not None:
                consts[output] = const
    return consts


def _make_const(
    dtype: int | None, shape: tuple[int, ...] | None, load: Callable[[], np.ndarray | None]
) -> Const:
    numel = math.prod(shape) if shape is not None else 0
    nbytes = tensor_nbytes(dtype, numel) or 0
    params = 0 if dtype in _METADATA_DTYPES else numel
    return Const(dtype, shape, nbytes, params, load)


def _tensor_loader(tensor: onnx.TensorProto) -> Callable[[], np.ndarray | None]:
    def load() -> np.ndarray | None:
        try:
            return numpy_helper.to_array(tensor)
        except Exception:  # noqa: BLE001 - boundary: data not loaded, or an exotic type
            return None

    return load


def _const_from_tensor(tensor: onnx.TensorProto) -> Const:
    # ``_make_const`` inlined: a large model has tens of thousands of initializers.
    dtype, shape = tensor.data_type, tuple(tensor.dims)
    numel = math.prod(shape)
    bits = ELEMENT_BITS.get(dtype)
    nbytes = (numel * bits + 7) // 8 if bits is not None else 0
    return Const(dtype, shape, nbytes, 0 if dtype in _METADATA_DTYPES else numel, _tensor_loader(tensor))


def _const_from_sparse(sparse: onnx.SparseTensorProto) -> Const:
    # Stored as values plus indices: that is what is on disk and what the node reads.
    values, indices = sparse.values, sparse.indices
    nbytes = (tensor_nbytes(values.data_type, math.prod(values.dims)) or 0) + (
        tensor_nbytes(indices.data_type, math.prod(indices.dims)) or 0
    )
    params = 0 if values.data_type in _METADATA_DTYPES else math.prod(values.dims)

    def load() -> np.ndarray | None:
        try:
            values_array = numpy_helper.to_array(values)
            index_array = numpy_helper.to_array(indices)
        except Exception:  # noqa: BLE001 - boundary: data not loaded, or an exotic type
            return None
        dense = np.zeros(math.prod(sparse.dims), dtype=values_array.dtype)
        # Indices are either flat positions [NNZ] or coordinates [NNZ, rank].
        flat = (
            index_array if index_array.ndim == 1 else np.ravel_multi_index(index_array.T, tuple(sparse.dims))
        )
        dense[flat] = values_array
        return dense.reshape(tuple(sparse.dims))

    return Const(values.data_type, tuple(sparse.dims), nbytes, params, load)


def _const_from_constant_node(node: onnx.NodeProto) -> Const | None:
    for attr in node.attribute:
        if attr.name == "value" and attr.HasField("t"):
            return _const_from_tensor(attr.t)
        if attr.name == "sparse_value" and attr.HasField("sparse_tensor"):
            return _const_from_sparse(attr.sparse_tensor)
        value = onnx.helper.get_attribute_value(attr)
        if attr.name in ("value_float", "value_int"):
            dtype = onnx.TensorProto.FLOAT if attr.name == "value_float" else onnx.TensorProto.INT64
            array = np.array(value, dtype=np.float32 if dtype == onnx.TensorProto.FLOAT else np.int64)
            return _make_const(dtype, (), functools.partial(_identity, array))
        if attr.name in ("value_floats", "value_ints"):
            dtype = onnx.TensorProto.FLOAT if attr.name == "value_floats" else onnx.TensorProto.INT64
            array = np.array(list(value), dtype=np.float32 if dtype == onnx.TensorProto.FLOAT else np.int64)
            return _make_const(dtype, (len(array),), functools.partial(_identity, array))
        if attr.name in ("value_string", "value_strings"):
            array = np.array(value if attr.name == "value_strings" else [value], dtype=object)
            shape = (len(array),) if attr.name == "value_strings" else ()
            return _make_const(onnx.TensorProto.STRING, shape, functools.partial(_identity, array))
    return None



def _identity(array: np.ndarray) -> np.ndarray:
    return array


def _const_from_constant_of_shape(
    node: onnx.NodeProto, shape_const: Const, inferred: TensorInfo | None
) -> Const | None:
    value = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "value"), None)
    dtype = value.data_type if value is not None else onnx.TensorProto.FLOAT
    shape: tuple[int, ...] | None = inferred.shape if inferred is not None else None
    if shape is None:
        dims = shape_const.load()
        if dims is None:
            return None
        shape = tuple(int(d) for d in np.asarray(dims).reshape(-1))

    def load() -> np.ndarray | None:
        fill = numpy_helper.to_array(value).reshape(-1)[0] if value is not None else np.float32(0)
        return np.full(shape, fill)

    return _make_const(dtype, shape, load)


def subgraph_constants(
    node: onnx.NodeProto,
    outer: Mapping[str, Const],
    findings: Findings,
    infos: dict[str, TensorInfo],
    patterns: DecodePatternRegistry,
) -> dict[str, Const]:
    """The constants an If/Loop/Scan node's bodies read: outer-scope ones and the bodies' own.

    Weights decoded inside a body appear as constants named after the decoder's output, with the decoded
    elements as params and 0 bytes; the constants only those decoders read count 0 params.
    """
    found: dict[str, Const] = {}
    for graph in subgraphs(node):
        _walk_subgraph(graph, node.op_type, outer, found, findings, infos, patterns)
    return found


def _walk_subgraph(
    graph: onnx.GraphProto,
    owner: str,
    outer: Mapping[str, Const],
    found: dict[str, Const],
    findings: Findings,
    infos: dict[str, TensorInfo],
    patterns: DecodePatternRegistry,
) -> None:
    local = body_constants(graph)
    if owner != "If":  # If branches are costed (``nodes.costliest_branch``); Loop/Scan bodies are not
        findings.subgraph_nodes += len(graph.node)
        findings.subgraph_ops[owner] += 1
    scope = {**outer, **local} if local else outer
    decoded, storage = decoded_weights(node_views(graph.node), scope, infos, patterns)
    for sub in graph.node:
        for name in sub.input:
            if name in scope:
                found[name] = replace(scope[name], params=0) if name in storage else scope[name]
        for body in subgraphs(sub):
            _walk_subgraph(body, owner, scope, found, findings, infos, patterns)
    for name, elements in decoded.items():
        info = infos[name]
        found[name] = Const(info.dtype, info.shape, 0, elements, lambda: None)


def body_constants(graph: onnx.GraphProto) -> dict[str, Const]:
    """A subgraph body's own constants: its initializers and Constant node outputs."""
    local = {t.name: _const_from_tensor(t) for t in graph.initializer}
    for sub in graph.node:
        if sub.op_type == "Constant" and sub.output:
            const = _const_from_constant_node(sub)
            if const is not None:
                local[sub.output[0]] = const
    return local
