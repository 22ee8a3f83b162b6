"""Fuzzing the CLI (issue #13): the mutator is deterministic and makes what it claims; a bounded sample breaks no promise.

The sample (``CI_MUTANTS`` mutants of the built-in and corpus seed models, every mutation kind and command) runs
on every CI; the full campaign is ``benchmarks/fuzz.py``. A failing sample test names the mutants: replay one with
``python benchmarks/fuzz.py --groups builtin corpus --replay s13-kK``.
"""

from __future__ import annotations

import io
import math
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import fuzzing
import numpy as np
import onnx
import pytest
from fuzzing import MUTATIONS, Mutant, Seed

CI_SEED = 13
CI_MUTANTS = 10 * len(MUTATIONS)  # ten of each kind
CI_TIMEOUT = 30.0
CI_RUN_TIME_LIMIT = 5.0


@pytest.fixture(scope="module")
def seeds() -> list[Seed]:
    found, _ = fuzzing.default_seeds(("builtin", "corpus"))
    return found


@pytest.fixture(scope="module")
def builtin() -> dict[str, Seed]:
    return {s.name: s for s in fuzzing.builtin_seeds()}


@pytest.fixture(scope="module")
def sample(seeds: list[Seed], tmp_path_factory: pytest.TempPathFactory) -> list[fuzzing.Verdict]:
    work = tmp_path_factory.mktemp("fuzz")
    return fuzzing.campaign(seeds, CI_SEED, range(CI_MUTANTS), jobs=2, timeout=CI_TIMEOUT, workdir=work,
                            run_time_limit=CI_RUN_TIME_LIMIT)


# ---------------------------------------------------------------------------------------------- the sample
@pytest.mark.parametrize("cls", list(fuzzing.FAILURE_CLASSES))
def test_the_sample_has_no_failure_of_class(sample: list[fuzzing.Verdict], cls: str) -> None:
    bad = [v for v in sample if cls in v.failures]
    detail = "; ".join(f"{v.id} {v.seed}/{v.kind} ({v.detail}) / {v.command}: exit {v.exit}, {v.stderr_first[:150]}"
                       for v in bad[:6])
    assert not bad, f"{len(bad)} of {len(sample)} runs: {fuzzing.FAILURE_CLASSES[cls]}: {detail}"


def test_the_sample_covers_every_kind_and_command_and_gets_past_loading(sample: list[fuzzing.Verdict]) -> None:
    assert len(sample) == CI_MUTANTS
    assert {v.kind for v in sample} == set(MUTATIONS)
    assert {v.command for v in sample} == set(fuzzing.COMMANDS)
    # Not every mutant is refused at load: a fuzzer whose every case dies in the parser tests only the parser.
    exits = [v.exit for v in sample]
    assert exits.count(0) + exits.count(3) >= CI_MUTANTS // 5, exits
    assert exits.count(2) >= CI_MUTANTS // 3, exits


# ---------------------------------------------------------------------------------------------- determinism
def test_mutant_k_of_seed_s_is_always_the_same_bytes(seeds: list[Seed]) -> None:
    first = [fuzzing.make_case(3, k, seeds) for k in range(2 * len(MUTATIONS))]
    again = [fuzzing.make_case(3, k, list(seeds)) for k in range(2 * len(MUTATIONS))]
    assert [fuzzing.mutant_digest(c.mutant) for c in first] == [fuzzing.mutant_digest(c.mutant) for c in again]
    assert [(c.mutant.kind, c.mutant.seed, c.command, c.mutant.detail) for c in first] == \
        [(c.mutant.kind, c.mutant.seed, c.command, c.mutant.detail) for c in again]
    other = [fuzzing.make_case(4, k, seeds) for k in range(2 * len(MUTATIONS))]
    differing = sum(fuzzing.mutant_digest(a.mutant) != fuzzing.mutant_digest(b.mutant) for a, b in zip(first, other))
    assert differing >= len(first) * 3 // 4  # another campaign seed gives other mutants (CLI ones may coincide)


def test_npz_bytes_are_reproducible() -> None:
    arrays = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    blob = fuzzing.npz_bytes(arrays)
    assert blob == fuzzing.npz_bytes(arrays)
    with np.load(io.BytesIO(blob)) as z:
        np.testing.assert_array_equal(z["x"], arrays["x"])
    assert {i.date_time for i in zipfile.ZipFile(io.BytesIO(blob)).infolist()} == {(1980, 1, 1, 0, 0, 0)}


def test_same_campaign_seed_same_verdicts(seeds: list[Seed], tmp_path: Path) -> None:
    ks = range(0, len(MUTATIONS))
    runs = [fuzzing.campaign(seeds, 5, ks, jobs=2, timeout=CI_TIMEOUT, workdir=tmp_path,
                             kinds=[k for k in MUTATIONS if k not in ("infinite_loop", "data_many_tiny")],
                             run_time_limit=CI_RUN_TIME_LIMIT) for _ in range(2)]
    assert [(v.id, v.mutant_sha, v.exit, v.failures, v.stderr_first) for v in runs[0]] == \
        [(v.id, v.mutant_sha, v.exit, v.failures, v.stderr_first) for v in runs[1]]


# ---------------------------------------------------------------------------------------------- the runner
def test_the_runner_returns_main_s_exit_code_and_kills_at_the_time_limit(builtin: dict[str, Seed],
                                                                          tmp_path: Path) -> None:
    runner = fuzzing.Runner(timeout=60)
    try:
        ok = runner.run(["passes"], tmp_path)
        assert (ok.exit, ok.timed_out) == (0, False) and "prune" in ok.stdout and ok.max_rss_mb > 10
        usage = runner.run(["optimize"], tmp_path)
        assert usage.exit == 2 and usage.stderr.startswith("nnopt: error:")
        assert runner.run(["--help"], tmp_path).exit == 0  # argparse's sys.exit(0) is honoured
        case = fuzzing.Case(0, 0, MUTATIONS["infinite_loop"].fn(fuzzing.random.Random(0), builtin["conv_classifier"]),
                            "measure")
        fuzzing.write_case(case, tmp_path / "loop")
        hung = runner.run(fuzzing.argv_for("measure", case.mutant, tmp_path / "loop"), tmp_path / "loop", timeout=3)
        assert hung.timed_out and hung.exit is None and 2.9 < hung.seconds < 10
        assert runner.ort_loads(tmp_path / "loop" / "in" / fuzzing.MODEL)
        (tmp_path / "junk.onnx").write_bytes(b"junk")
        assert not runner.ort_loads(tmp_path / "junk.onnx")
    finally:
        runner.close()


def test_checks_flag_what_they_claim(builtin: dict[str, Seed], tmp_path: Path) -> None:
    # A hand-made result per class: the check sees it (the sample tests above rely on these checks).
    case = fuzzing.Case(0, 0, fuzzing._mutant(builtin["conv_classifier"], "bitflip", "none", builtin["conv_classifier"].model),
                        "optimize")
    folder = fuzzing.write_case(case, tmp_path / "c")
    before = fuzzing.snapshot(folder)

    def result(code: int | None, stderr: str = "", timed_out: bool = False, rss: float = 100) -> fuzzing.RunResult:
        return fuzzing.RunResult(code, None, timed_out, 1.0, rss, "", stderr)

    runner = fuzzing.Runner(timeout=60)
    try:
        def failures(r: fuzzing.RunResult) -> list[str]:
            return fuzzing.check(case, folder, r, before, runner, rss_limit_mb=3072)

        assert failures(result(1, "nnopt: internal error: KeyError: 3")) == ["internal_error"]
        assert failures(result(None, timed_out=True)) == ["hang"]
        assert failures(result(4, "nnopt: error: x")) == ["bad_exit"]
        assert failures(result(2, "nnopt: error: x", rss=5000)) == ["memory"]
        assert failures(result(2, "nnopt: warning: w\nnnopt: error: x")) == []
        assert failures(result(2, "nnopt: error: x\nmore")) == ["bad_error_message"]
        assert failures(result(2, "nnopt: error: p.toml: seed: x\nnnopt: error: p.toml: passes[1]: y")) == []
        assert failures(result(2, "nnopt: error: x\nnnopt: error: x")) == ["bad_error_message"]  # said twice
        assert failures(result(2, "")) == ["bad_error_message"]
        assert failures(result(2, "Traceback (most recent call last):\nnnopt: error: x")) == ["bad_error_message",
                                                                                            "traceback"]
        assert failures(result(0)) == ["missing_output"]
        (folder / "out" / "x.onnx").write_bytes(b"not onnx")
        assert failures(result(0)) == ["output_unloadable"]
        assert failures(result(2, "nnopt: error: x")) == ["leftover_output"]
        (folder / "out" / "x.onnx").unlink()
        (folder / "in" / fuzzing.MODEL).write_bytes(b"changed")
        assert failures(result(2, "nnopt: error: x")) == ["input_changed"]
    finally:
        runner.close()


# ---------------------------------------------------------------------------------------------- each mutation's claim
_KNOWN_TYPES = set(onnx.TensorProto.DataType.values())
_MAP_KEYS = {onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
             onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64,
             onnx.TensorProto.STRING}


def _proto(m: Mutant) -> onnx.ModelProto:
    p = onnx.ModelProto()
    p.ParseFromString(m.model)
    return p


def _graphs(m: Mutant) -> list[onnx.GraphProto]:
    return list(fuzzing._graphs(_proto(m).graph))


def _inits(m: Mutant) -> list[onnx.TensorProto]:
    return [t for g in _graphs(m) for t in g.initializer]


def _entries(m: Mutant) -> list[dict[str, str]]:
    return [{e.key: e.value for e in t.external_data} for t in _inits(m) if t.data_location == onnx.TensorProto.EXTERNAL]


def _infos(m: Mutant) -> list[onnx.ValueInfoProto]:
    return [v for g in _graphs(m) for v in [*g.input, *g.output, *g.value_info]]


def _arrays(m: Mutant) -> dict[str, np.ndarray]:
    assert m.data is not None
    with np.load(io.BytesIO(m.data), allow_pickle=True) as z:
        return {k: z[k] for k in z.files}


def _is_byte_count(text: str) -> bool:
    return text.isdigit() and text.isascii() and int(text) < 2**63


def _past_the_end(m: Mutant) -> bool:
    for e in _entries(m):
        size = len(m.files.get(e.get("location", ""), b""))
        offset, length = int(e.get("offset", "0")), e.get("length")
        if offset >= size or (length is not None and offset + int(length) > size):
            return True
    return False


def _map_types(t: onnx.TypeProto) -> list[onnx.TypeProto.Map]:
    if t.HasField("map_type"):
        return [t.map_type]
    if t.HasField("sequence_type"):
        return _map_types(t.sequence_type.elem_type)
    return []


def _referenced_but_undefined(m: Mutant) -> bool:
    defined = {v.name for v in _infos(m)} | {t.name for t in _inits(m)}
    defined |= {o for g in _graphs(m) for n in g.node for o in n.output}
    used = [i for g in _graphs(m) for n in g.node for i in n.input]
    return any(i and i not in defined for i in used) or used.count("") > 0


def _duplicated(m: Mutant) -> bool:
    g = _proto(m).graph
    for names in ([t.name for t in g.initializer], [o for n in g.node for o in n.output], [v.name for v in g.input],
                  [v.name for v in g.output]):
        if len(names) != len(set(names)):
            return True
    return bool({v.name for v in g.input} & {t.name for t in g.initializer}) and _proto(m).ir_version >= 4


def _attr_value_fields(a: onnx.AttributeProto) -> list[str]:
    return [f.name for f, _ in a.ListFields() if f.name not in ("name", "type", "doc_string", "ref_attr_name")]


def _valid(m: Mutant) -> bool:
    """The onnx checker accepts the mutant (on disk, so that external data is found)."""
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, fuzzing.MODEL).write_bytes(m.model)
        for name, blob in m.files.items():
            Path(tmp, name).write_bytes(blob)
        onnx.checker.check_model(str(Path(tmp, fuzzing.MODEL)))
    return True


def _loop_without_bounds(m: Mutant) -> bool:
    loops = [n for n in _proto(m).graph.node if n.op_type == "Loop" and list(n.input[:2]) == ["", ""]]
    body = loops[0].attribute[0].g if loops else None
    return body is not None and [n.op_type for n in body.node][0] == "Identity" and _valid(m)


def _huge_constant(m: Mutant) -> bool:
    p = _proto(m)
    shapes = {t.name: onnx.numpy_helper.to_array(t) for t in p.graph.initializer if t.name == "fz_shape"}
    big = [n for n in p.graph.node if n.op_type == "ConstantOfShape" and n.input[0] in shapes and math.prod(shapes[n.input[0]].tolist()) >= 2**31]
    return bool(big) and any(n.op_type == "ReduceMax" and n.input[0] == big[0].output[0] for n in p.graph.node) and _valid(m)


#: kind → a predicate on (mutant, its seed): the mutation made what its name says.
CLAIMS: dict[str, Callable[[Mutant, Seed], bool]] = {
    "bitflip": lambda m, s: len(m.model) == len(s.model) and m.model != s.model,
    "truncate": lambda m, s: len(m.model) < len(s.model) and s.model.startswith(m.model),
    "insert_bytes": lambda m, s: len(m.model) - len(s.model) in (1, 2, 7, 64),
    "delete_bytes": lambda m, s: 0 < len(s.model) - len(m.model) <= 256,
    "duplicate_chunk": lambda m, s: 0 < len(m.model) - len(s.model) <= 512,
    "splice": lambda m, s: len(m.model) == len(s.model),
    "boundary_bytes": lambda m, s: len(m.model) == len(s.model) and m.model != s.model,
    "data_file_bytes": lambda m, s: bool(m.files) and m.files != (s.files or (fuzzing.with_external_data(s.model) or
                                                                                (b"", {}))[1]),
    "dtype_initializer": lambda m, s: any(t.data_type not in _KNOWN_TYPES for t in _inits(m)),
    "dtype_value_info": lambda m, s: any(v.type.tensor_type.elem_type not in _KNOWN_TYPES for v in _infos(m)
                                         if v.type.HasField("tensor_type")),
    "ext_offset_bad": lambda m, s: any(not _is_byte_count(e[k]) for e in _entries(m) for k in ("offset", "length")
                                       if k in e),
    "ext_past_eof": lambda m, s: _past_the_end(m),
    "ext_short_file": lambda m, s: _past_the_end(m),
    "nul_location": lambda m, s: any("\0" in e.get("location", "") for e in _entries(m)),
    "path_traversal": lambda m, s: m.expect_exit == 2 and bool(m.outside) and all(
        e["location"].startswith("/") or ".." in e["location"].split("/") for e in _entries(m)),
    "invalid_utf8": lambda m, s: any((bad * 10)[:10] in m.model for bad in
                                     (b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80")),
    "huge_dims": lambda m, s: any(d.dim_value >= 100_000 for v in _proto(m).graph.input
                                  for d in v.type.tensor_type.shape.dim),
    "empty_attribute": lambda m, s: any(not _attr_value_fields(a) for g in _graphs(m) for n in g.node
                                        for a in n.attribute),
    "float4_initializer": lambda m, s: any(t.data_type == onnx.TensorProto.FLOAT4E2M1 == 23 for t in _inits(m)),
    "no_outputs": lambda m, s: len(_proto(m).graph.output) == 0,
    "infinite_loop": lambda m, s: _loop_without_bounds(m),
    "constant_of_shape_huge": lambda m, s: _huge_constant(m),
    "subgraph_empty_type": lambda m, s: any(not o.HasField("type") for g in _graphs(m)[1:] for o in g.output),
    "map_bad_key": lambda m, s: any(mt.key_type not in _MAP_KEYS for v in _infos(m) for mt in _map_types(v.type)),
    "dangling_input": lambda m, s: _referenced_but_undefined(m),
    "shuffle_nodes": lambda m, s: sorted(n.SerializeToString() for n in _proto(m).graph.node)
    == sorted(n.SerializeToString() for n in s.proto().graph.node),
    "duplicate_names": lambda m, s: _duplicated(m),
    "wrong_opset": lambda m, s: (list(_proto(m).opset_import) != list(s.proto().opset_import)
                                 or _proto(m).ir_version != s.proto().ir_version),
    "bad_dims": lambda m, s: any(d in (0, -1, -5, 2**40) for t in _inits(m) for d in t.dims)
    or any(d.dim_value in (0, -1, -5, 2**40) and d.HasField("dim_value") for v in _infos(m)
           for d in v.type.tensor_type.shape.dim),
    "wrong_attr_type": lambda m, s: [a.type for g in _graphs(m) for n in g.node for a in n.attribute]
    != [a.type for g in fuzzing._graphs(s.proto().graph) for n in g.node for a in n.attribute],
    "data_nonfinite": lambda m, s: m.expect_exit == 2 and any(
        not np.isfinite(a).all() for a in _arrays(m).values() if a.dtype.kind == "f"),
    "data_zero_samples": lambda m, s: m.expect_exit == 2 and all(len(a) == 0 for a in _arrays(m).values()),
    "data_wrong_dtype": lambda m, s: any(a.dtype != b.dtype for a, b in zip(_arrays(m).values(),
                                                                             _arrays(_seed_mutant(s)).values())),
    "data_wrong_shape": lambda m, s: any(a.shape != b.shape for a, b in zip(_arrays(m).values(),
                                                                             _arrays(_seed_mutant(s)).values())),
    "data_pickled": lambda m, s: m.expect_exit == 2 and any(a.dtype == object for a in _arrays(m).values()),
    "data_many_tiny": lambda m, s: min(len(a) for a in _arrays(m).values()) > 2,
    "data_keys": lambda m, s: _keys_or_unreadable(m) != set(_arrays(_seed_mutant(s))),
    "cli_budget_range": lambda m, s: m.expect_exit == 2 and m.args[0] in ("--min-cosine", "--max-rel-error",
                                                                        "--min-top1") and not _in_range(m.args),
    "cli_top1": lambda m, s: m.args[0] == "--min-top1" and (m.expect_exit == 2) == ("data-prune" not in m.commands),
    "cli_bad_pass": lambda m, s: m.expect_exit == 2 and m.args[0] == "-p" and m.args[1] in fuzzing._BAD_PASSES,
    "cli_misc": lambda m, s: m.args in fuzzing._BAD_MISC,
}


def _seed_mutant(s: Seed) -> Mutant:
    return Mutant(s.name, "seed", "", s.model, dict(s.files), s.data)


def _keys_or_unreadable(m: Mutant) -> set[str]:
    try:
        return set(_arrays(m))
    except Exception:  # not an .npz at all: that is the claim too
        return {"<unreadable>"}


def _in_range(args: list[str]) -> bool:
    try:
        value = float(args[1])
    except ValueError:
        return False
    low = -1.0 if args[0] == "--min-cosine" else 0.0
    high = math.inf if args[0] == "--max-rel-error" else 1.0
    return low <= value <= high and math.isfinite(value)


def test_every_mutation_kind_has_a_claim() -> None:
    assert set(CLAIMS) == set(MUTATIONS)
    assert {m.family for m in MUTATIONS.values()} == {"byte", "structure", "data", "cli"}


@pytest.mark.parametrize("kind", list(MUTATIONS))
def test_each_mutation_makes_what_it_claims(kind: str, builtin: dict[str, Seed]) -> None:
    made = 0
    for seed in builtin.values():
        for k in range(4):
            mutant = MUTATIONS[kind].fn(fuzzing.random.Random(f"claim:{kind}:{seed.name}:{k}"), seed)
            if mutant is None:
                continue
            assert mutant.kind == kind and mutant.seed == seed.name
            assert CLAIMS[kind](mutant, seed), f"{kind} on {seed.name}: {mutant.detail}"
            made += 1
    assert made >= 4, f"{kind} applies to almost none of the built-in seed models"


def test_the_seed_models_are_valid_and_cover_subgraphs_external_data_and_dtypes(builtin: dict[str, Seed]) -> None:
    for seed in builtin.values():
        assert _valid(_seed_mutant(seed))
        assert seed.data is not None, seed.name
    ops = {n.op_type for s in builtin.values() for g in fuzzing._graphs(s.proto().graph) for n in g.node}
    assert {"If", "Loop", "Conv", "BatchNormalization", "Gemm", "Relu"} <= ops
    assert builtin["external_data"].files and _entries(_seed_mutant(builtin["external_data"]))
    types = {t.data_type for s in builtin.values() for t in s.proto().graph.initializer}
    assert {onnx.TensorProto.FLOAT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64, onnx.TensorProto.FLOAT} <= types
