"""Graph-input shapes: parsed from the command line, and made concrete for the analysis."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx

from nnopt.errors import InputError


def parse_input_shapes(items: list[str]) -> dict[str, list[int]]:
    """Parse ``NAME=1,3,224,224`` strings (``x`` also separates dims: ``NAME=1x3x224x224``).

    The name is everything before the last ``=``, so names containing ``:`` or ``/`` work.

    Raises:
        InputError: an item without ``=``, an empty name, a dim that is not a positive integer, or a name
            given twice.
    """
    shapes: dict[str, list[int]] = {}
    for item in items:
        name, sep, dims_text = item.rpartition("=")
        name = name.strip()
        if not sep or not name:
            raise InputError(f"input shape '{item}': expected NAME=D1,D2,... such as x=1,3,224,224")
        parts = [p.strip() for p in dims_text.replace("x", ",").replace("X", ",").split(",")]
        if parts == [""]:
            raise InputError(f"input shape '{item}': no dims after '='; expected NAME=D1,D2,...")
        dims = []
        for part in parts:
            if not part.isdigit() or int(part) < 1:
                raise InputError(
                    f"input shape '{item}': dim '{part}' is not a positive integer; expected NAME=D1,D2,..."
                )
            dims.append(int(part))
        if name in shapes:
            raise InputError(f"input shape for '{name}' given twice")
        shapes[name] = dims
    return shapes


def resolve_input_shapes(
    graph: onnx.GraphProto, init_names: set[str], given: dict[str, list[int]], notes: list[str]
) -> tuple[dict[str, list[int]], bool]:
    """Concrete dims for every graph input, and whether ``given`` changed a dim the model fixed.

    Dims the model leaves unknown count as 1; each assumption and override is added to ``notes``.

    Raises:
        InputError: ``given`` names an input the model does not have, gives the wrong rank, or a dim below 1.
    """
    inputs = [vi for vi in graph.input if vi.name not in init_names]
    names = [vi.name for vi in inputs]
    unknown = [name for name in given if name not in names]
    if unknown:
        raise InputError(
            f"input shape given for '{unknown[0]}', which is not a graph input; inputs are: "
            f"{', '.join(names) or 'none'}"
        )
    fixed: dict[str, list[int]] = {}
    overridden = False
    for vi in inputs:
        declared = _declared_dims(vi)
        if vi.name in given:
            dims = [int(d) for d in given[vi.name]]
            if any(d < 1 for d in dims):
                raise InputError(f"input shape for '{vi.name}': dims must be at least 1, got {dims}")
            if declared is not None and len(declared) != len(dims):
                raise InputError(
                    f"input shape for '{vi.name}' has {len(dims)} dims but the input has rank {len(declared)}"
                )
            changed = [i for i, d in enumerate(declared or []) if isinstance(d, int) and d != dims[i]]
            if changed:
                overridden = True
                notes.append(
                    f"input '{vi.name}': fixed dim(s) {', '.join(map(str, changed))} overridden by the "
                    f"given shape {dims}"
                )
            fixed[vi.name] = dims
            continue
        if declared is None:
            if vi.type.HasField("tensor_type"):
                notes.append(f"input '{vi.name}' has no declared shape; give its shape to cost what reads it")
            continue
        dims = []
        for axis, dim in enumerate(declared):
            if isinstance(dim, int):
                dims.append(dim)
                continue
            dims.append(1)
            symbol = f" '{dim}'" if dim else ""
            if axis == 0:
                notes.append(f"input '{vi.name}': unknown batch dim{symbol} counted as 1")
            else:
                notes.append(
                    f"input '{vi.name}': unknown dim {axis}{symbol} counted as 1; pass input shapes to set it"
                )
        fixed[vi.name] = dims
    return fixed, overridden


def batched_input_shapes(
    graph: onnx.GraphProto, init_names: set[str], given: Mapping[str, list[int]], batch: int, notes: list[str]
) -> dict[str, list[int]]:
    """Shapes for the graph inputs with their first (batch) dim set to ``batch``, for ``nnopt analyze --batch``.

    Which first dims are batch dims: those the model leaves dynamic; when it leaves none dynamic (a model exported
    at a fixed batch), those it fixes at 1. Inputs with a fixed first dim beside a dynamic one keep it: a
    recurrent state ``[layers, batch, hidden]`` or a side input is not batched on its first axis. The other dims
    are ``given``'s, else the declared ones (unknown ones counted as 1, each in ``notes``). Inputs of rank 0 or of
    unknown rank are left as they are.

    Raises:
        InputError: ``batch`` is below 1, or a batch dim is fixed at a value other than 1 and ``batch`` (by a
            model exported at that batch, or by ``given``): the model cannot run at another batch size.
    """
    if batch < 1:
        raise InputError(f"--batch: expected a positive integer, got {batch}")
    shapes = {name: list(dims) for name, dims in given.items()}
    declared = {vi.name: _declared_dims(vi) for vi in graph.input if vi.name not in init_names}
    ranked = {name: dims for name, dims in declared.items() if dims}
    dynamic = {name for name, dims in ranked.items() if not isinstance(dims[0], int)}
    for name, model_dims in ranked.items():
        if dynamic and name not in dynamic:
            continue  # a fixed first dim beside dynamic ones is not a batch dim
        dims: list[int | str] = list(given[name]) if name in given else list(model_dims)
        first = dims[0]
        if isinstance(first, int) and first not in (1, batch):
            where = "the given shape" if name in given else "the model"
            raise InputError(f"--batch {batch}: input '{name}' has its batch dim fixed at {first} by {where}; "
                             "only a dynamic batch dim or one of 1 can be set")
        concrete = [batch]
        for axis, dim in enumerate(dims[1:], start=1):
            if not isinstance(dim, int):
                notes.append(f"input '{name}': unknown dim {axis}{f' {dim!r}' if dim else ''} counted as 1; "
                             "pass input shapes to set it")
            concrete.append(dim if isinstance(dim, int) else 1)
        shapes[name] = concrete
    return shapes


def batched_feeds(sample: Mapping[str, Any] | None, shapes: Mapping[str, list[int]]) -> dict[str, Any] | None:
    """``sample`` with each input of batch 1 repeated along its first axis to the batch of ``shapes`` (what
    :func:`batched_input_shapes` gave), so that a model is timed at the batch it was costed at."""
    if sample is None:
        return None
    feeds = dict(sample)
    for name, dims in shapes.items():
        value = feeds.get(name)
        if value is not None and dims and np.ndim(value) == len(dims) and np.shape(value)[0] == 1 < dims[0]:
            feeds[name] = np.repeat(np.asarray(value), dims[0], axis=0)
    return feeds


def free_batch_dims(proto: onnx.ModelProto, shapes: Mapping[str, list[int]]) -> onnx.ModelProto:
    """``proto`` (copied when anything changes) with the batch dim of each input that declares it fixed at 1 while
    ``shapes`` gives it another size made dynamic, so that onnxruntime accepts the batch ``--batch`` costed. A
    graph that hard-codes its batch further in (a Reshape to ``[1, ...]``) still fails, and says so."""
    fixed_one = [i for i, vi in enumerate(proto.graph.input) if (_declared_dims(vi) or [0])[0] == 1
                 and (shapes.get(vi.name) or [1])[0] != 1]
    if not fixed_one:
        return proto
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for i in fixed_one:
        copy.graph.input[i].type.tensor_type.shape.dim[0].dim_param = "batch"  # clears dim_value (a oneof)
    return copy


def _declared_dims(vi: onnx.ValueInfoProto) -> list[int | str] | None:
    """Per dim its value, or its symbol ("" when anonymous); None when the rank is unknown."""
    if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return None
    return [
        d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else d.dim_param
        for d in vi.type.tensor_type.shape.dim
    ]



def sample_input_shapes(
    graph: onnx.GraphProto, sample: Mapping[str, Any], given: Mapping[str, list[int]] | None = None
) -> dict[str, list[int]]:
    """Concrete shapes for the graph inputs the model leaves dynamic, read from one data sample.

    ``given`` (the user's ``--input-shape``) wins over the sample; inputs whose declared shape is fully
    fixed are left out, so a model without dynamic inputs is costed exactly as without data.

    Args:
        graph: The model's main graph.
        sample: One sample of the data (input name to array), e.g. the first of ``load_samples``.
        given: Shapes the user gave; they are returned as they are.
    """
    shapes = {name: list(dims) for name, dims in (given or {}).items()}
    init_names = {t.name for t in graph.initializer}
    for vi in graph.input:
        if vi.name in init_names or vi.name in shapes or vi.name not in sample:
            continue
        declared = _declared_dims(vi)
        if declared is not None and all(isinstance(d, int) for d in declared):
            continue
        dims = [int(d) for d in np.shape(sample[vi.name])]
        if all(d >= 1 for d in dims) and (declared is None or len(declared) == len(dims)):
            shapes[vi.name] = dims
    return shapes


def data_shapes_note(
    graph: onnx.GraphProto, shapes: Mapping[str, list[int]], given: Mapping[str, list[int]]
) -> str | None:
    """A note naming the input shapes taken from the data, when they differ from the dims of 1 the cost
    model assumes without data (None when the data changed nothing)."""
    init_names = {t.name for t in graph.initializer}
    assumed, _ = resolve_input_shapes(graph, init_names, {}, [])
    from_data = {n: list(d) for n, d in shapes.items() if n not in given and assumed.get(n) != list(d)}
    if not from_data:
        return None
    return f"cost figures use the input shapes of the first data sample: {format_shapes(from_data)}"


def format_shapes(shapes: Mapping[str, list[int]]) -> str:
    """``x=1x3x320x320, y=scalar``, for messages."""
    return ", ".join(f"{n}={'x'.join(map(str, d)) or 'scalar'}" for n, d in shapes.items())
