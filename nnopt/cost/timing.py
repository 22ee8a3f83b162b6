"""Measured latency in onnxruntime (CPU), plus the session and input-feed helpers the analysis shares."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from nnopt.errors import InputError
from nnopt.ir.model import EXTERNAL_DATA_THRESHOLD, Model, tensor_bytes, write_proto_atomically

_PROVIDERS = ["CPUExecutionProvider"]

#: onnxruntime input type strings to the numpy dtypes used to feed them.
_ORT_DTYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
    "tensor(string)": np.object_,
}

#: Symbolic dims other than the first (batch) axis get this size when generating feeds.
DEFAULT_DYNAMIC_DIM = 64


def open_session(
    model: Model | onnx.ModelProto | str | os.PathLike[str], *, optimize: bool = True
) -> ort.InferenceSession:
    """An onnxruntime CPU session for ``model``.

    Models whose tensors exceed :data:`~nnopt.ir.model.EXTERNAL_DATA_THRESHOLD` cannot be serialised in
    memory; they are written with external data to a temporary folder and opened by path.

    Args:
        model: A Model, a ModelProto with its weights loaded, or a path to an ONNX file.
        optimize: Keep onnxruntime's default graph optimizations (True), or disable them (False: faster
            to create, and every tensor stays as the model names it).

    Raises:
        onnxruntime exceptions when the session cannot be created; callers decide what that means.
    """
    options = ort.SessionOptions()
    # Fatal only: failures reach the caller as exceptions, so onnxruntime's own log would say it twice.
    options.log_severity_level = 4
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if isinstance(model, (str, os.PathLike)):
        return ort.InferenceSession(str(model), options, providers=_PROVIDERS)
    proto = model.to_proto() if isinstance(model, Model) else model
    if tensor_bytes(proto) <= EXTERNAL_DATA_THRESHOLD:
        return ort.InferenceSession(proto.SerializeToString(), options, providers=_PROVIDERS)
    # onnxruntime has read the weights once the session exists, so the folder can go right after.
    with tempfile.TemporaryDirectory(prefix="nnopt-ort-", ignore_cleanup_errors=True) as tmp:
        path = Path(tmp) / "model.onnx"
        write_proto_atomically(proto, path, external_data=True)
        return ort.InferenceSession(str(path), options, providers=_PROVIDERS)


def make_feeds(
    session: ort.InferenceSession,
    input_shapes: dict[str, list[int]] | None = None,
    seed: int = 0,
    given: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Inputs for every input of ``session``: the ``given`` values, and synthetic ones for the rest.

    Floats are seeded standard-normal; integers are zeros (valid as indices and lengths); bools False;
    strings empty. Shapes come from ``input_shapes``, else from the model, where a named symbolic dim
    takes the size it has in a shape that fixes it (a given value or ``input_shapes``), else 1 if it
    appears on axis 0 of some input (a batch dim), else :data:`DEFAULT_DYNAMIC_DIM`; unnamed dims are 1
    on axis 0 and :data:`DEFAULT_DYNAMIC_DIM` elsewhere.

    Raises:
        InputError: ``input_shapes`` or ``given`` names an unknown input, or an input has a type that
            cannot be generated (give its value then).
    """
    shapes = input_shapes or {}
    given = given or {}
    inputs = session.get_inputs()
    names = [i.name for i in inputs]
    unknown = [n for n in [*shapes, *given] if n not in names]
    if unknown:
        raise InputError(
            f"input '{unknown[0]}' is not a model input; inputs are: {', '.join(names) or 'none'}"
        )
    # The same symbol is the same size in every input.
    sizes: dict[str, int] = {}
    for inp in inputs:
        fixed = given[inp.name].shape if inp.name in given else shapes.get(inp.name)
        if fixed is not None and len(fixed) == len(inp.shape or []):
            for d, size in zip(inp.shape, fixed):
                if isinstance(d, str) and d:
                    sizes.setdefault(d, int(size))
    for inp in inputs:
        if inp.shape and isinstance(inp.shape[0], str) and inp.shape[0]:
            sizes.setdefault(inp.shape[0], 1)
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for inp in inputs:
        if inp.name in given:
            feeds[inp.name] = given[inp.name]
            continue
        dtype = _ORT_DTYPES.get(inp.type)
        if dtype is None:
            raise InputError(f"cannot generate a value for input '{inp.name}' of type {inp.type}; give one")
        if inp.name in shapes:
            shape = [int(d) for d in shapes[inp.name]]
        else:
            shape = [_dim_size(d, axis, sizes) for axis, d in enumerate(inp.shape or [])]
        if np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.object_:
            feeds[inp.name] = np.full(shape, "", dtype=object)
        else:
            feeds[inp.name] = np.zeros(shape, dtype=dtype)
    return feeds


def _dim_size(dim: int | str | None, axis: int, sizes: dict[str, int]) -> int:
    if isinstance(dim, int) and dim >= 0:
        return dim
    if isinstance(dim, str) and dim:
        return sizes.setdefault(dim, 1 if axis == 0 else DEFAULT_DYNAMIC_DIM)
    return 1 if axis == 0 else DEFAULT_DYNAMIC_DIM


def measure_latency(
    model_or_proto: Model | onnx.ModelProto | str | os.PathLike[str],
    feeds: dict[str, np.ndarray] | None = None,
    *,
    warmup: int = 3,
    runs: int = 20,
    input_shapes: dict[str, list[int]] | None = None,
) -> dict[str, float | int]:
    """Time the model in onnxruntime on CPU, with onnxruntime's default graph optimizations.

    Args:
        model_or_proto: The model (a Model, a ModelProto with weights loaded, or a path).
        feeds: Values for some or all inputs; :func:`make_feeds` generates the others (using
            ``input_shapes``).
        warmup: Untimed runs first (allocations, caches, thread-pool start-up).
        runs: Timed runs.
        input_shapes: Shapes for generated inputs.

    Returns:
        ``{"median_s", "min_s", "mean_s", "runs"}``, wall-clock seconds per run.

    Raises:
        InputError: bad ``warmup``/``runs``, feeds that cannot be generated, or onnxruntime rejecting the
            model or the feeds.
    """
    if runs < 1 or warmup < 0:
        raise InputError(
            f"latency measurement needs runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}"
        )
    try:
        session = open_session(model_or_proto)
    except Exception as exc:  # boundary: onnxruntime raises its own exception types
        raise InputError(f"onnxruntime cannot load the model: {_first_line(exc)}") from exc
    feeds = make_feeds(session, input_shapes, given=feeds)
    try:
        for _ in range(warmup):
            session.run(None, feeds)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            session.run(None, feeds)
            times.append(time.perf_counter() - start)
    except Exception as exc:  # boundary: onnxruntime raises its own exception types
        raise InputError(f"onnxruntime cannot run the model: {_first_line(exc)}") from exc
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "mean_s": statistics.fmean(times),
        "runs": runs,
    }


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
