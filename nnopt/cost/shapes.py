"""Tensor shapes for the cost model: ONNX inference with concrete input dims, then onnxruntime for the rest."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import numpy as np
import onnx

from nnopt.analysis.shapes import CONCRETE, ShapeOptions, infer_shapes, set_dims
from nnopt.cost.constants import Const
from nnopt.cost.report import cut, examples, first_line
from nnopt.cost.tensors import TensorInfo
from nnopt.cost.walk import iter_bodies

#: The cost model's flavour of inference: static annotations kept, weights stripped from the copy it runs on.
#: After the user overrode a dim the model fixed, the model's own shapes are stale: only types are kept.
_OPTIONS = {False: CONCRETE, True: ShapeOptions(declared="typed", strip_data_above=CONCRETE.strip_data_above)}


def infer_tensor_infos(
    proto: onnx.ModelProto,
    order: list[int] | None,
    fixed: dict[str, list[int]],
    overridden: bool,
    notes: list[str],
    counter: Counter[str] | None = None,
) -> dict[str, TensorInfo]:
    """What ONNX shape inference finds with the graph inputs set to ``fixed``: main-graph tensors (a known
    shape winning over an unknown one) and subgraph bodies' (names are unique across scopes; the
    decoded-weight patterns and the costing of If branches read them). ``order``: the main graph's
    topological order when its nodes are not in one (inference needs producers first)."""
    if order is not None:
        proto = _reordered(proto, order)
    result = infer_shapes(proto, _OPTIONS[overridden].with_inputs(fixed), counter=counter)
    if result.error is not None:
        notes.append(f"onnx shape inference failed ({cut(result.error)}); only declared shapes were used")
    graph = result.inferred.graph
    infos: dict[str, TensorInfo] = {}
    for vi in (*graph.input, *graph.value_info, *graph.output):
        info = _info_from_value_info(vi)
        if info is not None and (info.shape is not None or info.name not in infos):
            infos[info.name] = info
    for body in iter_bodies(graph):
        for vi in (*body.input, *body.value_info, *body.output):
            info = _info_from_value_info(vi)
            if info is not None and vi.name not in infos:
                infos[vi.name] = info
    return infos


def _reordered(proto: onnx.ModelProto, order: list[int]) -> onnx.ModelProto:
    """A copy of ``proto`` with its main-graph nodes in ``order``."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    nodes = onnx.GraphProto()
    nodes.node.extend(copy.graph.node[i] for i in order)
    del copy.graph.node[:]
    copy.graph.node.extend(nodes.node)
    return copy


def _info_from_value_info(vi: onnx.ValueInfoProto) -> TensorInfo | None:
    # Read from the proto rather than as ``TensorType``. A declared dim_value of -1 (PaddlePaddle's
    # "unknown") reaches here as unknown: inference runs under ``negative_dims_unknown`` (it once made
    # ppocr_cls report -8 output bytes for one Identity).
    if not vi.type.HasField("tensor_type"):
        return None
    tensor_type = vi.type.tensor_type
    shape = None
    if tensor_type.HasField("shape"):
        dims = tensor_type.shape.dim
        values = [d.dim_value for d in dims]
        # A positive dim_value is set (dim_value and dim_param are a oneof); 0 needs a look.
        if not values or min(values) > 0 or all(d.HasField("dim_value") for d in dims):
            shape = tuple(values)
    return TensorInfo(vi.name, tensor_type.elem_type or None, shape)


def unknown(info: TensorInfo | None) -> bool:
    """Whether a tensor's shape or type is not known."""
    return info is None or info.shape is None or info.dtype is None


def fill_unknown_shapes(
    proto: onnx.ModelProto,
    fixed: dict[str, list[int]],
    unknown: list[str],
    infos: dict[str, TensorInfo],
    consts: Mapping[str, Const],
    run_onnxruntime: bool,
    notes: list[str],
) -> None:
    """Read the real shapes of ``unknown`` main-graph tensors by running the model once in onnxruntime."""
    if not run_onnxruntime:
        notes.append(
            f"{len(unknown)} tensor(s) have unknown shapes and count 0 bytes (onnxruntime fallback "
            f"disabled): {examples(unknown)}"
        )
        return
    # Imported here: onnxruntime is slow to import and most analyses never need it.
    from nnopt.runtime import make_feeds, make_session, run_model

    run = onnx.ModelProto()
    run.CopyFrom(proto)
    for vi in run.graph.input:
        if vi.name in fixed:
            set_dims(vi, fixed[vi.name])
    present = {o.name for o in run.graph.output}
    run.graph.output.extend(onnx.ValueInfoProto(name=n) for n in unknown if n not in present)
    try:
        session = make_session(run, optimize=False)
        values = run_model(session, make_feeds(session, fixed), unknown)
    except Exception as exc:  # noqa: BLE001 - boundary: a failure only costs those shapes
        notes.append(
            f"{len(unknown)} tensor(s) have unknown shapes after shape inference and running the model in "
            f"onnxruntime failed ({first_line(exc)}); they count 0 bytes: {examples(unknown)}"
        )
        return
    missing = []
    for name, value in zip(unknown, values):
        if isinstance(value, np.ndarray) and name not in consts:
            try:
                dtype: int | None = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
            except (KeyError, TypeError, ValueError):
                dtype = infos[name].dtype if name in infos else None
            infos[name] = TensorInfo(name, dtype, tuple(int(d) for d in value.shape))
        else:
            missing.append(name)
    notes.append(
        f"{len(unknown) - len(missing)} tensor shape(s) that shape inference left unknown were read by "
        "running the model once in onnxruntime with random inputs (data-dependent shapes may differ)"
    )
    if missing:
        notes.append(
            f"{len(missing)} non-tensor output(s) have no shape and count 0 bytes: {examples(missing)}"
        )
