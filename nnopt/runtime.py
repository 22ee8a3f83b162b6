"""onnxruntime at nnopt's boundary: sessions for any model size, reference inputs, data files."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from nnopt.errors import DataError, NnoptError
from nnopt.ir.model import EXTERNAL_DATA_THRESHOLD, tensor_bytes, write_proto_atomically

#: Axis-0 dims that are unknown become 1 (a batch of one); other unknown dims become this.
DEFAULT_DYNAMIC_DIM = 64

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
    "tensor(string)": np.str_,
}


class RuntimeUnavailable(NnoptError):
    """onnxruntime cannot create a session for, or run, this model."""


@dataclass
class Session:
    """An onnxruntime session plus the temporary folder it may need (for models over 2 GiB)."""

    ort: Any
    _tmp: Path | None = None

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def run(self, feeds: dict[str, np.ndarray]) -> list[Any]:
        return self.ort.run(None, feeds)


def make_session(proto: onnx.ModelProto, *, optimize: bool = False, threads: int = 0) -> Session:
    """Open ``proto`` in onnxruntime (CPU).

    ``optimize=False`` disables onnxruntime's graph optimisations so that verification runs the graph as
    nnopt wrote it; timing uses ``optimize=True``, as a deployment would.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if threads:
        options.intra_op_num_threads = threads
    tmp: Path | None = None
    try:
        if tensor_bytes(proto) > EXTERNAL_DATA_THRESHOLD:
            tmp = Path(tempfile.mkdtemp(prefix="nnopt-session-"))
            write_proto_atomically(proto, tmp / "model.onnx", external_data=True)
            sess = ort.InferenceSession(str(tmp / "model.onnx"), options, providers=["CPUExecutionProvider"])
        else:
            sess = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # boundary: onnxruntime
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeUnavailable(f"onnxruntime cannot load the model: {_first_line(exc)}") from exc
    return Session(sess, tmp)


def input_specs(sess: Session) -> list[tuple[str, Any, list[Any]]]:
    """(name, numpy dtype or None, shape with None/str for unknown dims) of each model input."""
    specs = []
    for inp in sess.ort.get_inputs():
        specs.append((inp.name, _ORT_TYPES.get(inp.type), list(inp.shape or [])))
    return specs


def concrete_shape(name: str, shape: list[Any], input_shapes: dict[str, list[int]]) -> list[int]:
    if name in input_shapes:
        return list(input_shapes[name])
    return [d if isinstance(d, int) and d >= 0 else (1 if axis == 0 else DEFAULT_DYNAMIC_DIM)
            for axis, d in enumerate(shape)]


def generate_samples(
    sess: Session, *, count: int = 2, seed: int = 0, input_shapes: dict[str, list[int]] | None = None
) -> list[dict[str, np.ndarray]]:
    """Seeded inputs for each model input: floats ~ N(0, 1), integers in [0, 4), random booleans."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        feeds: dict[str, np.ndarray] = {}
        for name, dtype, shape in input_specs(sess):
            if dtype is None:
                raise RuntimeUnavailable(f"input '{name}' is not a tensor; give reference data with --data")
            dims = concrete_shape(name, shape, input_shapes or {})
            if np.issubdtype(dtype, np.floating):
                feeds[name] = rng.standard_normal(dims).astype(dtype)
            elif dtype == np.bool_:
                feeds[name] = rng.integers(0, 2, dims).astype(np.bool_)
            elif np.issubdtype(dtype, np.integer):
                feeds[name] = rng.integers(0, 4, dims).astype(dtype)
            else:
                feeds[name] = np.full(dims, "a", dtype=object)
        samples.append(feeds)
    return samples


def load_samples(path: str | Path, sess: Session) -> list[dict[str, np.ndarray]]:
    """Read an ``.npz`` of reference inputs: one array per input name, samples on the first axis.

    An array of the input's rank + 1 is a stack of samples; one of the input's own rank is split along
    axis 0 into samples of batch 1.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as exc:  # boundary: numpy's reader
        raise DataError(f"data file {path}: not a readable .npz archive ({_first_line(exc)})") from exc
    specs = input_specs(sess)
    names = [s[0] for s in specs]
    missing = [n for n in names if n not in arrays]
    extra = [k for k in arrays if k not in names]
    if missing or extra:
        what = []
        if missing:
            what.append(f"missing input(s) {', '.join(missing)}")
        if extra:
            what.append(f"unknown array(s) {', '.join(extra)}")
        raise DataError(f"data file {path}: {'; '.join(what)} (model inputs: {', '.join(names)})")
    per_input: dict[str, list[np.ndarray]] = {}
    for name, dtype, shape in specs:
        arr = arrays[name]
        if len(shape) and arr.ndim == len(shape) + 1:
            samples = [arr[i] for i in range(arr.shape[0])]
        elif arr.ndim == len(shape) and arr.ndim > 0:
            samples = [arr[i : i + 1] for i in range(arr.shape[0])]
        elif not shape and arr.ndim in (0, 1):
            samples = [arr] if arr.ndim == 0 else [arr[i] for i in range(arr.shape[0])]
        else:
            raise DataError(
                f"data file {path}: array '{name}' has shape {list(arr.shape)}, model input has rank {len(shape)}"
            )
        for s in samples:
            for axis, (got, want) in enumerate(zip(s.shape, shape)):
                if isinstance(want, int) and want >= 0 and got != want:
                    raise DataError(
                        f"data file {path}: array '{name}' gives samples of shape {list(s.shape)}, "
                        f"model input expects {shape} (axis {axis})"
                    )
        if dtype is not None and arr.dtype != dtype:
            if np.can_cast(arr.dtype, dtype, casting="same_kind"):
                samples = [s.astype(dtype) for s in samples]
            else:
                raise DataError(f"data file {path}: array '{name}' is {arr.dtype}, model input is {np.dtype(dtype)}")
        per_input[name] = samples
    counts = {len(v) for v in per_input.values()}
    if len(counts) > 1:
        raise DataError(f"data file {path}: arrays hold different numbers of samples ({sorted(counts)})")
    n = counts.pop() if counts else 0
    return [{name: per_input[name][i] for name in names} for i in range(n)]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
