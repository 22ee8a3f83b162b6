"""onnxruntime at nnopt's boundary: sessions for any model size, reference inputs, data files."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import threading
import time
import zipfile
from collections.abc import Collection, Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort

from nnopt.analysis.shapes import ShapeResult, negative_dims_unknown
from nnopt.errors import DataError, InputError, first_line
from nnopt.ir.model import EXTERNAL_DATA_THRESHOLD, Model, tensor_bytes, write_proto_atomically

log = logging.getLogger(__name__)

#: Reference data files give at most this many samples: every changed model is run on all of them, and past
#: this a fidelity figure barely moves (a top-1 agreement of 0.98 has a standard error of 0.3 points).
MAX_DATA_SAMPLES = 2048
#: ...and at most this many bytes per array, whatever the archive's compressed size.
MAX_DATA_BYTES = 4 * 2**30
#: The data file's array of class labels (not a model input): ``load_labels`` reads it, for passes that train.
LABELS_ARRAY = "labels"

#: Axis-0 dims that are unknown become 1 (a batch of one); other unknown dims become this.
DEFAULT_DYNAMIC_DIM = 64

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


#: The longest one onnxruntime run may take before nnopt stops it. Valid models can run forever (a Loop with
#: neither a trip count nor a condition); a real model runs one sample in well under this.
DEFAULT_RUN_TIME_LIMIT_S = 60.0


#: nnopt does not run (to verify or time) a model that would build a tensor larger than this (a 195-byte model can ask
#: onnxruntime for a ConstantOfShape of 2^31 floats: 8 GiB, and twice that at peak).
MAX_RUN_TENSOR_BYTES = 4 * 2**30


class RuntimeUnavailable(InputError):
    """onnxruntime cannot create a session for, or run, this model (a property of the input: exit 2)."""


class RunTimeLimitExceeded(RuntimeUnavailable):
    """One onnxruntime run did not finish within its time limit and was stopped."""


def oversized_tensor(shapes: ShapeResult) -> str | None:
    """Why running the model would flood memory (its largest computed tensor, by shape inference, is over
    ``MAX_RUN_TENSOR_BYTES``), or None."""
    largest: tuple[int, str] | None = None
    for graph in shapes.graphs:
        for name, type_ in (*graph.value_info, *graph.outputs):
            size = type_.nbytes
            if size is not None and size > MAX_RUN_TENSOR_BYTES and (largest is None or size > largest[0]):
                largest = (size, name)
    if largest is None:
        return None
    return (
        f"running the model would build tensor '{largest[1]}' of "
        f"{largest[0] / 2**30:,.1f} GiB (limit {MAX_RUN_TENSOR_BYTES / 2**30:g} GiB)"
    )


@dataclass(eq=False)
class _Watch:
    deadline: float
    options: ort.RunOptions
    fired: threading.Event = field(default_factory=threading.Event)


class _Watchdog:
    """One daemon thread that stops onnxruntime runs past their deadline by setting ``RunOptions.terminate``.

    A ``threading.Timer`` per run started a thread each time: about 0.6 ms, a third of a small model's run,
    on every verification sample.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._watches: set[_Watch] = set()
        self._thread: threading.Thread | None = None

    def watch(self, options: ort.RunOptions, seconds: float) -> _Watch:
        watch = _Watch(time.monotonic() + seconds, options)
        with self._changed:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="nnopt-run-watchdog", daemon=True)
                self._thread.start()
            self._watches.add(watch)
            self._changed.notify()
        return watch

    def release(self, watch: _Watch) -> None:
        with self._changed:
            self._watches.discard(watch)

    def _loop(self) -> None:
        with self._changed:
            while True:
                now = time.monotonic()
                for watch in [w for w in self._watches if w.deadline <= now]:
                    watch.fired.set()
                    watch.options.terminate = True
                    self._watches.discard(watch)
                next_deadline = min((w.deadline for w in self._watches), default=None)
                self._changed.wait(None if next_deadline is None else next_deadline - now)


_WATCHDOG = _Watchdog()


def _new_watchdog_after_fork() -> None:
    # A forked child has no watchdog thread, and the parent's lock may have been held at the fork.
    global _WATCHDOG
    _WATCHDOG = _Watchdog()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_watchdog_after_fork)

#: The time limit ``run_model`` applies when its caller gives none: ``run_time_limit`` sets it for a block
#: (a pipeline run sets its own, so passes that run the model inherit it).
_CURRENT_TIME_LIMIT: ContextVar[float | None] = ContextVar("nnopt_run_time_limit", default=DEFAULT_RUN_TIME_LIMIT_S)


@contextlib.contextmanager
def run_time_limit(seconds: float | None) -> Iterator[None]:
    """Within the block, ``run_model`` calls without an explicit ``time_limit`` use ``seconds``."""
    token = _CURRENT_TIME_LIMIT.set(seconds)
    try:
        yield
    finally:
        _CURRENT_TIME_LIMIT.reset(token)


def run_model(
    session: ort.InferenceSession,
    feeds: dict[str, Any],
    outputs: list[str] | None = None,
    *,
    time_limit: float | None | Literal["current"] = "current",
) -> list[Any]:
    """``session.run(outputs, feeds)``, stopped after ``time_limit`` seconds (None: no limit; "current":
    the limit ``run_time_limit`` set, by default ``DEFAULT_RUN_TIME_LIMIT_S``).

    onnxruntime checks ``RunOptions.terminate`` between kernels, Loop iterations included, so a watchdog
    thread setting it ends a run that would never finish. onnxruntime's own exceptions propagate.

    Raises:
        RunTimeLimitExceeded: the run was stopped at its time limit.
    """
    if time_limit == "current":
        time_limit = _CURRENT_TIME_LIMIT.get()
    if time_limit is None:
        return session.run(outputs, feeds)
    options = ort.RunOptions()
    options.log_severity_level = 4  # the stopped run's error reaches the caller as RunTimeLimitExceeded
    watch = _WATCHDOG.watch(options, time_limit)
    try:
        return session.run(outputs, feeds, options)
    except Exception as exc:  # boundary: onnxruntime reports the stop as its own failure
        if watch.fired.is_set():
            raise RunTimeLimitExceeded(
                f"onnxruntime did not finish one run within {time_limit:g} s and was stopped"
            ) from exc
        raise
    finally:
        _WATCHDOG.release(watch)


#: Intra-op threads of the sessions ``make_session`` creates; None: onnxruntime's default (one per core).
_SESSION_THREADS: int | None = None


def set_session_threads(threads: int | None) -> None:
    """Make later ``make_session`` sessions use ``threads`` intra-op threads (None: onnxruntime's default).

    For processes that share the machine: a search's N worker processes on C cores each set about C // N,
    where onnxruntime's default (C threads in each) would oversubscribe the cores N times over.
    """
    global _SESSION_THREADS
    if threads is not None and threads < 1:
        raise ValueError(f"session threads must be at least 1, got {threads}")
    _SESSION_THREADS = threads


@contextlib.contextmanager
def session_threads(threads: int | None) -> Iterator[None]:
    """``set_session_threads(threads)`` for the ``with`` block, the previous count restored after it."""
    previous = _SESSION_THREADS
    set_session_threads(threads)
    try:
        yield
    finally:
        set_session_threads(previous)


#: onnxruntime's element type names of the float inputs a float value can be cast to (numpy has no bfloat16).
_FLOAT_INPUTS = {"tensor(float16)": np.float16, "tensor(float)": np.float32, "tensor(double)": np.float64}


def feeds_for(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``feeds`` with each float value cast to the float type ``session``'s input of that name takes (a model whose
    inputs a pass made float16, or double); other values unchanged. Same feeds object when nothing changes."""
    types = {info.name: _FLOAT_INPUTS.get(info.type) for info in session.get_inputs()}
    casts = {name: types[name] for name, value in feeds.items() if isinstance(value, np.ndarray)
             and value.dtype.kind == "f" and types.get(name) is not None and value.dtype != types[name]}
    if not casts:
        return feeds
    return {name: value.astype(casts[name]) if name in casts else value for name, value in feeds.items()}


def make_session(
    model: Model | onnx.ModelProto | str | os.PathLike[str], *, optimize: bool = False
) -> ort.InferenceSession:
    """An onnxruntime CPU session for a Model, a ModelProto with its weights loaded, or a path.

    ``optimize=False`` disables onnxruntime's graph optimisations so that verification runs the graph as
    nnopt wrote it; timing uses ``optimize=True``, as a deployment would. Models whose tensors exceed
    ``EXTERNAL_DATA_THRESHOLD`` cannot be serialised in memory: they are written with external data to a
    temporary folder and opened by path. Sessions use ``set_session_threads``'s intra-op thread count.

    Raises:
        RuntimeUnavailable: onnxruntime cannot load the model.
    """
    options = ort.SessionOptions()
    # Fatal only: failures reach the caller as exceptions, so onnxruntime's own log would say it twice.
    options.log_severity_level = 4
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if _SESSION_THREADS is not None:
        options.intra_op_num_threads = _SESSION_THREADS
    try:
        if isinstance(model, (str, os.PathLike)):
            return ort.InferenceSession(str(model), options, providers=_PROVIDERS)
        proto = model.to_proto() if isinstance(model, Model) else model
        with negative_dims_unknown(proto):
            if tensor_bytes(proto) <= EXTERNAL_DATA_THRESHOLD:
                return ort.InferenceSession(proto.SerializeToString(), options, providers=_PROVIDERS)
            # onnxruntime has read (or mapped) the weights once the session exists, so the folder can go.
            with tempfile.TemporaryDirectory(prefix="nnopt-ort-", ignore_cleanup_errors=True) as tmp:
                path = Path(tmp) / "model.onnx"
                write_proto_atomically(proto, path, external_data=True)
                return ort.InferenceSession(str(path), options, providers=_PROVIDERS)
    except Exception as exc:  # boundary: onnxruntime raises its own exception types
        raise RuntimeUnavailable(f"onnxruntime cannot load the model: {first_line(exc, 300)}") from exc


def input_specs(sess: ort.InferenceSession) -> list[tuple[str, Any, list[Any]]]:
    """(name, numpy dtype or None, shape with None/str for unknown dims) of each model input."""
    return [(i.name, _ORT_DTYPES.get(i.type), list(i.shape or [])) for i in sess.get_inputs()]


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
        InputError: ``input_shapes`` or ``given`` names an unknown input.
        RuntimeUnavailable: an input has a type that cannot be generated (a map, a sequence).
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
            raise RuntimeUnavailable(f"cannot generate a value for input '{inp.name}' of type {inp.type}")
        if inp.name in shapes:
            shape = [int(d) for d in shapes[inp.name]]
        else:
            shape = [_dim_size(d, axis, sizes) for axis, d in enumerate(inp.shape or [])]
        _check_generated_size(inp.name, shape, dtype, given_by_user=inp.name in shapes)
        if np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.object_:
            feeds[inp.name] = np.full(shape, "", dtype=object)
        else:
            feeds[inp.name] = np.zeros(shape, dtype=dtype)
    return feeds


#: Generated values for one input of one sample may take at most this many bytes. A mistyped --input-shape
#: or a model with an absurd static dim (2^31 elements) would otherwise end in a MemoryError.
MAX_GENERATED_BYTES = 1 << 30


def _check_generated_size(name: str, shape: list[int], dtype: Any, *, given_by_user: bool) -> None:
    """Refuse to generate an input larger than ``MAX_GENERATED_BYTES``: an input error when the user gave
    the shape (``--input-shape``), otherwise the model cannot be run on generated inputs (``RuntimeUnavailable``:
    verification says so and goes on without numbers)."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    if nbytes <= MAX_GENERATED_BYTES:
        return
    size = f"{nbytes / 2**30:,.1f} GiB"
    if given_by_user:
        raise InputError(f"input shape for '{name}' {shape} would need {size} of generated values per sample "
                         f"(at most {MAX_GENERATED_BYTES >> 30} GiB); give a smaller shape")
    raise RuntimeUnavailable(f"input '{name}' of shape {shape} would need {size} of generated values per sample "
                             f"(at most {MAX_GENERATED_BYTES >> 30} GiB); give --data or --input-shape")


def _dim_size(dim: int | str | None, axis: int, sizes: dict[str, int]) -> int:
    if isinstance(dim, int) and dim >= 0:
        return dim
    if isinstance(dim, str) and dim:
        return sizes.setdefault(dim, 1 if axis == 0 else DEFAULT_DYNAMIC_DIM)
    return 1 if axis == 0 else DEFAULT_DYNAMIC_DIM


def generate_samples(
    sess: ort.InferenceSession, *, count: int = 2, seed: int = 0, input_shapes: dict[str, list[int]] | None = None
) -> list[dict[str, np.ndarray]]:
    """``count`` sets of generated inputs (see ``make_feeds``), seeded ``seed``, ``seed + 1``, ..."""
    return [make_feeds(sess, input_shapes, seed=seed + i) for i in range(count)]


#: Reference data for ``load_samples`` and the ``data=`` of ``nnopt.Pipeline`` and ``nnopt.optimize``:
#: the path of an ``.npz``; what an ``.npz`` holds, as a dict of arrays (input name → samples on the first
#: axis, and an optional ``labels`` array); one such array alone, for a model with one input; or an
#: iterable of feeds, one dict of input name → array per sample, each array of the input's own shape.
DataSource = str | os.PathLike[str] | np.ndarray | Mapping[str, Any] | Iterable[Mapping[str, Any]]


def load_samples(
    source: DataSource,
    sess: ort.InferenceSession,
    *,
    limit: int | None = MAX_DATA_SAMPLES,
    notes: list[str] | None = None,
    ignore: Collection[str] = (),
) -> list[dict[str, np.ndarray]]:
    """Reference inputs, one feed per sample, from an ``.npz`` (one array per input name, samples on the
    first axis) or the same in memory (see ``DataSource``).

    An array named ``labels`` that is no input's name holds class labels (``load_labels``) and is skipped here,
    as are the arrays named in ``ignore`` that are no input's name (the search's ``--labels KEY``).

    An array of the input's rank + 1 is a stack of samples; one of the input's own rank is split along
    axis 0 into samples of batch 1. At most the first ``limit`` samples are read (a warning says when
    more were given, and ``notes`` gets the same line): an archive of two million tiny samples, or a small
    file that would decompress to gigabytes, costs no more than ``limit`` samples do.
    """
    specs = input_specs(sess)
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.is_file():
            raise DataError(f"data file {path}: no such file")
        where, short = f"data file {path}", f"data file {path.name}"  # messages; the report's note
        arrays, total = _read_npz(path, limit)
        per_input = _split_arrays(arrays, specs, where, ignore)
    else:
        where = short = "data"
        per_input, total = _in_memory_samples(source, specs, limit)
    if limit is not None and total > limit:
        note = f"{short} holds {total} samples; only the first {limit} are used"
        log.warning(note)
        if notes is not None:
            notes.append(note)
        per_input = {name: samples[:limit] for name, samples in per_input.items()}
    for name, dtype, shape in specs:
        samples = per_input[name]
        for s in samples:
            if s.ndim != len(shape):
                raise DataError(f"{where}: '{name}' gives samples of shape {list(s.shape)}, model input has rank {len(shape)}")
            for axis, (got, want) in enumerate(zip(s.shape, shape)):
                if isinstance(want, int) and want >= 0 and got != want:
                    raise DataError(
                        f"{where}: array '{name}' gives samples of shape {list(s.shape)}, "
                        f"model input expects {shape} (axis {axis})"
                    )
        if dtype is not None and any(s.dtype != dtype for s in samples):
            if all(np.can_cast(s.dtype, dtype, casting="same_kind") for s in samples):
                samples = [_cast_exactly(where, name, np.asarray(s), np.dtype(dtype)) for s in samples]
            else:
                raise DataError(f"{where}: array '{name}' is {samples[0].dtype}, model input is {np.dtype(dtype)}")
        per_input[name] = samples
    counts = {len(v) for v in per_input.values()}
    if len(counts) > 1:
        raise DataError(f"{where}: arrays hold different numbers of samples ({sorted(counts)})")
    n = counts.pop() if counts else 0
    names = [s[0] for s in specs]
    if names and n == 0:
        # Nothing to compare outputs on: a fidelity figure computed from no samples would read as perfect.
        raise DataError(f"{where}: holds no samples (every array is empty on its first axis)")
    for name, samples in per_input.items():
        _check_finite(where, name, samples)
    return [{name: per_input[name][i] for name in names} for i in range(n)]


def _split_arrays(
    arrays: Mapping[str, np.ndarray], specs: list[tuple[str, Any, list[Any]]], where: str, ignore: Collection[str]
) -> dict[str, list[np.ndarray]]:
    """Each input's samples from its array (see ``load_samples``), after checking the arrays' names."""
    names = [s[0] for s in specs]
    missing = [n for n in names if n not in arrays]
    extra = [k for k in arrays if k not in names and k != LABELS_ARRAY and k not in ignore]
    if missing or extra:
        what = []
        if missing:
            what.append(f"missing input(s) {', '.join(missing)}")
        if extra:
            what.append(f"unknown array(s) {', '.join(extra)}")
        raise DataError(f"{where}: {'; '.join(what)} (model inputs: {', '.join(names)})")
    per_input: dict[str, list[np.ndarray]] = {}
    for name, _, shape in specs:
        arr = arrays[name]
        if len(shape) and arr.ndim == len(shape) + 1:
            per_input[name] = [np.asarray(arr[i]) for i in range(arr.shape[0])]
        elif arr.ndim == len(shape) and arr.ndim > 0:
            per_input[name] = [arr[i : i + 1] for i in range(arr.shape[0])]
        elif not shape and arr.ndim in (0, 1):
            per_input[name] = [arr] if arr.ndim == 0 else [np.asarray(arr[i]) for i in range(arr.shape[0])]
        else:
            raise DataError(f"{where}: array '{name}' has shape {list(arr.shape)}, model input has rank {len(shape)}")
    return per_input


def _in_memory_samples(
    source: Any, specs: list[tuple[str, Any, list[Any]]], limit: int | None
) -> tuple[dict[str, list[np.ndarray]], int]:
    """``load_samples`` for data given in Python: each input's samples, and how many were given."""
    names = [s[0] for s in specs]
    if isinstance(source, np.ndarray):
        if len(names) != 1:
            raise DataError(f"data: one array was given, but the model has {len(names)} inputs ({', '.join(names)}); "
                            "give a dict of arrays by input name")
        source = {names[0]: source}
    if isinstance(source, Mapping):
        arrays = {str(k): _plain_array(v, f"data: array '{k}'") for k, v in source.items()}
        per_input = _split_arrays(arrays, specs, "data", ())
        return per_input, max((len(v) for v in per_input.values()), default=0)
    if not isinstance(source, Iterable):
        raise DataError(f"data: expected an .npz path, an array, a dict of arrays or a list of feeds, got "
                        f"{type(source).__name__}")
    per_input = {name: [] for name in names}
    total = 0
    for index, feed in enumerate(source):
        total += 1
        if limit is not None and total > limit:
            continue  # counted, for the note, but not kept
        if not isinstance(feed, Mapping) or sorted(map(str, feed)) != sorted(names):
            got = ", ".join(sorted(map(str, feed))) if isinstance(feed, Mapping) else type(feed).__name__
            raise DataError(f"data: feed {index} must map each model input ({', '.join(names)}) to an array, got {got}")
        for name in names:
            per_input[name].append(_plain_array(feed[name], f"data: feed {index}, '{name}'"))
    return per_input, total


def _plain_array(value: Any, where: str) -> np.ndarray:
    """``value`` as a numpy array of numbers (object arrays are refused, as pickled ones in files are)."""
    array = np.asarray(value)
    if array.dtype.hasobject:
        raise DataError(f"{where} holds Python objects; give numeric arrays")
    return array


def load_labels(
    source: DataSource, sess: ort.InferenceSession, count: int, *, limit: int | None = MAX_DATA_SAMPLES
) -> np.ndarray | None:
    """The ``labels`` array of a data file, or of a dict of arrays given in Python: one integer class per
    sample (int64, shape ``(count,)``).

    None when there is no such array (an array or a list of feeds never has one), or when ``labels`` is the
    name of a model input (then it is data). Only the first ``limit`` labels are read, as ``load_samples``
    reads only that many samples.

    Raises:
        DataError: the labels are not a 1-D integer array of one label per sample.
    """
    if any(s[0] == LABELS_ARRAY for s in input_specs(sess)):
        return None
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        where = f"data file {path}"
        try:
            with zipfile.ZipFile(path) as archive:
                member = f"{LABELS_ARRAY}.npy"
                if member not in archive.namelist():
                    return None
                with archive.open(member) as stream:
                    labels, _ = _read_leading_rows(path, LABELS_ARRAY, stream, limit)
        except DataError:
            raise
        except Exception as exc:  # boundary: the zip and .npy readers
            raise DataError(f"{where}: not a readable .npz archive ({first_line(exc, 300)})") from exc
    elif isinstance(source, Mapping) and LABELS_ARRAY in source:
        where = "data"
        labels = _plain_array(source[LABELS_ARRAY], f"data: array '{LABELS_ARRAY}'")[:limit]
    else:
        return None
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or labels.shape[0] != count:
        raise DataError(
            f"{where}: array '{LABELS_ARRAY}' must hold one integer class per sample ({count}), "
            f"got {labels.dtype} of shape {list(labels.shape)}"
        )
    return labels.astype(np.int64)


def _cast_exactly(where: str, name: str, sample: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
    """``sample`` as ``dtype``; an integer that does not fit is refused (a cast would wrap it around)."""
    if sample.dtype.kind in "iub" and dtype.kind in "iu":
        info = np.iinfo(dtype)
        if sample.size and (sample.min() < info.min or sample.max() > info.max):
            raise DataError(f"{where}: array '{name}' holds values outside the range of {dtype}")
    with np.errstate(over="ignore"):  # float64 to float32 may overflow to inf: _check_finite refuses that
        return sample.astype(dtype)


def _read_npz(path: Path, limit: int | None) -> tuple[dict[str, np.ndarray], int]:
    """Each array of the archive cut to its first ``limit`` rows (read no further), and the most rows any had."""
    try:
        with zipfile.ZipFile(path) as archive:
            arrays: dict[str, np.ndarray] = {}
            total = 0
            for member in archive.namelist():
                name = member[: -len(".npy")] if member.endswith(".npy") else member
                with archive.open(member) as stream:
                    arrays[name], rows = _read_leading_rows(path, name, stream, limit)
                total = max(total, rows)
    except DataError:
        raise
    except Exception as exc:  # boundary: the zip and .npy readers
        raise DataError(f"data file {path}: not a readable .npz archive ({first_line(exc, 300)})") from exc
    return arrays, total


def _read_leading_rows(path: Path, name: str, stream: Any, limit: int | None) -> tuple[np.ndarray, int]:
    """The first ``limit`` entries along axis 0 of one ``.npy`` stream, and how many it holds."""
    version = np.lib.format.read_magic(stream)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(stream)
    if dtype.hasobject:
        raise DataError(f"data file {path}: array '{name}' holds Python objects (pickled data is refused)")
    rows = shape[0] if shape else 1
    kept = shape if not shape or limit is None or fortran_order else (min(rows, limit), *shape[1:])
    count = math.prod(kept)
    if count * dtype.itemsize > MAX_DATA_BYTES:
        raise DataError(
            f"data file {path}: array '{name}' would take {count * dtype.itemsize / 2**30:.1f} GiB in memory "
            f"(limit {MAX_DATA_BYTES / 2**30:g} GiB); give fewer or smaller samples"
        )
    data = stream.read(count * dtype.itemsize)
    if len(data) != count * dtype.itemsize:
        raise DataError(f"data file {path}: array '{name}' is truncated")
    array = np.frombuffer(data, dtype=dtype, count=count).reshape(kept, order="F" if fortran_order else "C")
    if fortran_order and limit is not None and shape:
        array = array[:limit]
    return array.copy(), rows


def _check_finite(where: str, name: str, samples: list[np.ndarray]) -> None:
    """Refuse NaN or infinite input values: outputs computed from them compare as equal or as nothing, so
    verification on such data would say a lossy pass changed nothing."""
    for i, sample in enumerate(samples):
        if sample.dtype.kind in "fc" and not np.isfinite(sample).all():
            bad = "NaN" if np.isnan(sample).any() else "infinite"
            raise DataError(f"{where}: array '{name}' holds {bad} values (sample {i}); give finite data")
