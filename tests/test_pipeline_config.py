"""Pipeline files (nnopt.pipeline.config): TOML/JSON parsing, typed pass options, one-line errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from nnopt.api import Pipeline
from nnopt.cost.hardware import HardwareProfile, parse_hardware, write_profile
from nnopt.errors import InputError, OptionError
from nnopt.pipeline.base import Pass
from nnopt.pipeline.config import PipelineFileError, load_pipeline_file, parse_pipeline
from nnopt.pipeline.manager import Budget
from nnopt.plugin_manager import build_plugins

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def plugins():
    return build_plugins(load_entry_points=False)


@pytest.fixture(scope="module")
def registry(plugins):
    return {name: entry.cls for name, entry in plugins.passes.items()}


@pytest.fixture(scope="module")
def hardware(plugins):
    return plugins.hardware_registry()


def _built(pipeline: Pipeline) -> tuple | None:
    """The pipeline's passes as (name, options), the default pipeline as ("default", None)."""
    if pipeline.passes is None:
        return None
    return tuple((p.name, p.options) if isinstance(p, Pass) else (p, None) for p in pipeline.passes)


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


FULL_TOML = """
seed = 7
hardware = "rpi4"
fixed_point = false
input_shapes = { x = [1, 3, 32, 32] }

[verify]
enabled = true
data = "calib.npz"
strict = true
max_rel_error = 0.05
min_cosine = 0.99
min_top1 = 1

[[passes]]
name = "default"

[[passes]]
name = "prune"
ratio = 0.3
round_to = 8
nodes = ["conv1", "conv2"]

[[passes]]
name = "svd"
rank = 4
data_aware = false
"""

FULL_JSON = {
    "seed": 7,
    "hardware": "rpi4",
    "fixed_point": False,
    "input_shapes": {"x": [1, 3, 32, 32]},
    "verify": {
        "enabled": True,
        "data": "calib.npz",
        "strict": True,
        "max_rel_error": 0.05,
        "min_cosine": 0.99,
        "min_top1": 1,
    },
    "passes": [
        {"name": "default"},
        {"name": "prune", "ratio": 0.3, "round_to": 8, "nodes": ["conv1", "conv2"]},
        {"name": "svd", "rank": 4, "data_aware": False},
    ],
}


# ---------------------------------------------------------------------------------------------- valid files
def test_toml_is_read_into_typed_validated_settings(tmp_path, registry, hardware):
    (tmp_path / "calib.npz").write_bytes(b"")
    config = load_pipeline_file(_write(tmp_path, "pipeline.toml", FULL_TOML), registry, hardware)
    assert _built(config) == (
        ("default", None),
        ("prune", registry["prune"].Options(ratio=0.3, round_to=8, nodes=("conv1", "conv2"))),
        ("svd", registry["svd"].Options(rank=4, data_aware=False)),
    )
    assert config.data == tmp_path / "calib.npz"
    assert (config.strict, config.verify, config.seed) == (True, True, 7)
    assert config.hardware == hardware["rpi4"]  # read once, here: running the pipeline does not parse it again
    assert config.fixed_point is False
    assert config.input_shapes == {"x": [1, 3, 32, 32]}
    assert config.budget == Budget(max_rel_error=0.05, min_cosine=0.99, min_top1=1.0)
    assert isinstance(config.budget.min_top1, float)


def test_json_and_toml_give_the_same_config(tmp_path, registry, hardware):
    (tmp_path / "calib.npz").write_bytes(b"")
    from_toml = load_pipeline_file(_write(tmp_path, "p.toml", FULL_TOML), registry, hardware)
    from_json = load_pipeline_file(_write(tmp_path, "p.json", json.dumps(FULL_JSON)), registry, hardware)
    assert _built(from_toml) == _built(from_json)
    assert dataclasses.replace(from_toml, passes=None) == dataclasses.replace(from_json, passes=None)


def test_an_empty_file_sets_nothing_and_means_the_default_pipeline(tmp_path, registry, hardware):
    config = load_pipeline_file(_write(tmp_path, "empty.toml", "# nothing\n"), registry, hardware)
    assert config == Pipeline()
    assert config.passes is None
    assert (config.data, config.hardware, config.fixed_point) == (None,) * 3


def test_no_passes_key_keeps_the_default_pipeline_with_other_settings(tmp_path, registry, hardware):
    config = load_pipeline_file(_write(tmp_path, "p.toml", 'seed = 3\nfixed_point = "auto"\n'), registry, hardware)
    assert config.passes is None
    assert config.seed == 3
    assert config.fixed_point is None  # "auto": the pipeline decides


def test_relative_data_path_is_read_from_the_pipeline_files_folder(tmp_path, registry, hardware, monkeypatch):
    _write(tmp_path, "data/calib.npz", "")
    pipeline = _write(tmp_path, "pipelines/p.toml", '[verify]\ndata = "../data/calib.npz"\n')
    monkeypatch.chdir(tmp_path / "data")  # the working directory plays no part
    config = load_pipeline_file(pipeline, registry, hardware)
    assert config.data.resolve() == (tmp_path / "data" / "calib.npz").resolve()


def test_relative_hardware_profile_file_is_read_from_the_pipeline_files_folder(
    tmp_path, registry, hardware, monkeypatch
):
    write_profile(HardwareProfile(name="my-board", peak_flops=3e9, bandwidth=2e9), tmp_path / "boards/b.json")
    pipeline = _write(tmp_path, "pipelines/p.toml", 'hardware = "../boards/b.json"\n')
    monkeypatch.chdir(tmp_path / "boards")  # from here "../boards/b.json" would not exist
    config = load_pipeline_file(pipeline, registry, hardware)
    profile = config.hardware
    assert (profile.name, profile.peak_flops, profile.bandwidth) == ("my-board", 3e9, 2e9)


def test_a_missing_hardware_profile_file_names_the_resolved_path(tmp_path, registry, hardware):
    pipeline = _write(tmp_path, "p.toml", 'hardware = "nowhere.json"\n')
    with pytest.raises(PipelineFileError, match=r"p.toml: hardware: .*nowhere.json"):
        load_pipeline_file(pipeline, registry, hardware)


def test_absolute_data_path_is_kept(tmp_path, registry, hardware):
    data = _write(tmp_path, "elsewhere/calib.npz", "")
    pipeline = _write(tmp_path, "p.json", json.dumps({"verify": {"data": str(data)}}))
    assert load_pipeline_file(pipeline, registry, hardware).data == data


def test_a_mapping_without_a_source_resolves_data_against_the_working_directory(
    tmp_path, registry, hardware, monkeypatch
):
    _write(tmp_path, "calib.npz", "")
    monkeypatch.chdir(tmp_path)
    config = parse_pipeline({"verify": {"data": "calib.npz"}}, registry, hardware)
    assert config.data == Path("calib.npz")


def test_typed_options_reach_the_pass(tmp_path, registry, hardware):
    text = '[[passes]]\nname = "prune"\nratio = 0.3\nround_to = 8\nexclude = ["head*"]\n'
    config = load_pipeline_file(_write(tmp_path, "p.toml", text), registry, hardware)
    [pass_] = config.passes
    assert pass_.name == "prune"
    assert pass_.options.ratio == 0.3
    assert pass_.options.round_to == 8
    assert pass_.options.exclude == ("head*",)
    assert pass_.options.mode == "structured"  # not in the file: the option's default


def test_strings_convert_like_the_command_line_and_ints_count_as_floats(tmp_path, registry, hardware):
    text = '[[passes]]\nname = "prune"\nratio = "0.25"\nround-to = "16"\nnodes = "a,b"\nmax_ratio = 0\n'
    config = load_pipeline_file(_write(tmp_path, "p.toml", text), registry, hardware)
    [(_, options)] = _built(config)
    assert options == registry["prune"].Options(ratio=0.25, round_to=16, nodes=("a", "b"), max_ratio=0.0)
    assert type(options.max_ratio) is float


def test_custom_hardware_specs_and_plugin_profiles_are_accepted(tmp_path, registry):
    board = HardwareProfile(name="my-board", peak_flops=1e9)
    path = _write(tmp_path, "p.toml", 'hardware = "my-board"\n')
    assert load_pipeline_file(path, registry, {"my-board": board}).hardware == board
    path = _write(tmp_path, "q.toml", 'hardware = "flops=4e12,bandwidth=25.6G"\n')
    assert load_pipeline_file(path, registry, {}).hardware == parse_hardware("flops=4e12,bandwidth=25.6G")


# ---------------------------------------------------------------------------------------------- errors
#: (file name, contents, the whole expected message after "<path>: ").
ERRORS = [
    (
        "pipeline.toml",
        '[[passes]]\nname = "default"\n[[passes]]\nname = "prnue"\n',
        "passes[2].name: unknown pass 'prnue' (did you mean 'prune'?; see nnopt passes)",
    ),
    (
        "pipeline.toml",
        '[[passes]]\nname = "zzzz"\n',
        "passes[1].name: unknown pass 'zzzz' (known: constants-to-initializers, conv-to-separable, dce, "
        "default, distill, fix-input-shapes, fold-batchnorm, fold-constants, fp16, fuse-hardswish, hashed-sharing, kmeans, prune, quantize, remove-noops, "
        "strip-debug-info, svd; see nnopt passes)",
    ),
    (
        "pipeline.toml",
        '[[passes]]\nname = "default"\n[[passes]]\nname = "prune"\nratio = "abc"\n',
        "passes[2].ratio: expected a number, got the string 'abc'",
    ),
    (
        "pipeline.toml",
        '[[passes]]\nname = "default"\n[[passes]]\nname = "prune"\nratio = 1.5\n',
        "passes[2].ratio: 1.5 is out of range: prune:ratio must be in [0, 1), got 1.5",
    ),
    (
        "pipeline.toml",
        '[[passes]]\nname = "prune"\nratio = true\n',
        "passes[1].ratio: expected a number, got the boolean true",
    ),
    (
        "pipeline.toml",
        '[[passes]]\nname = "prune"\nround_to = 8.5\n',
        "passes[1].round_to: expected an integer, got the number 8.5",
    ),
    (
        "pipeline.toml",
        '[[passes]]\nname = "prune"\nmode = "channels"\n',
        "passes[1].mode: expected one of 'structured', 'unstructured', got the string 'channels'",
    ),
    (
        "pipeline.toml",
        '[[passes]]\nname = "prune"\nnodes = ["conv1", 2]\n',
        "passes[1].nodes[2]: expected a string, got the number 2",
    ),
    (
        "pipeline.toml",
        '[[passes]]\nname = "svd"\nbits = 4\n',
        "passes[1].bits: pass 'svd' has no option 'bits' "
        "(options: data_aware, energy, exclude, max_error, min_latency_saving, min_param_saving, nodes, rank)",
    ),
    (
        "pipeline.toml",
        '[[passes]]\nname = "prune"\nratoi = 0.2\n',
        "passes[1].ratoi: pass 'prune' has no option 'ratoi' "
        "(did you mean 'ratio'?; options: allocate, criterion, exclude, max_ratio, mode, nodes, norm, ratio, reconstruct, round_to, "
        "scope)",
    ),
    (
        "pipeline.toml",
        '[[passes]]\nname = "svd"\nrank = 4\nenergy = 0.9\n',
        "passes[1]: give at most one of rank, energy and max_error (got rank, energy)",
    ),
    (
        "pipeline.toml",
        '[[passes]]\nname = "svd"\nrank = "many"\n',
        "passes[1].rank: expected an integer or none, got the string 'many'",
    ),
    (
        "pipeline.toml",
        "[[passes]]\nratio = 0.3\n",
        'passes[1]: missing name; add name = "<pass>" (see nnopt passes)',
    ),
    (
        "pipeline.toml",
        '[[passes]]\nname = "default"\nratio = 0.3\n',
        "passes[1]: the default pipeline takes no options (got 'ratio'); list its passes one by one to configure them",
    ),
    (
        "pipeline.json",
        '{"passes": []}',
        "passes: expected a list of pass tables ([[passes]] with a name), got an empty list; "
        "leave 'passes' out for the default pipeline",
    ),
    (
        "pipeline.json",
        '{"passes": ["prune"]}',
        "passes[1]: expected a table with a name (name = \"prune\"), got the string 'prune'",
    ),
    (
        "pipeline.toml",
        '[verify]\nmin_cosine = "high"\n',
        "verify.min_cosine: expected a number from -1 to 1, got the string 'high'",
    ),
    (
        "pipeline.toml",
        "[verify]\nmin_top1 = 98\n",
        "verify.min_top1: 98 is out of range: expected a number from 0 to 1",
    ),
    (
        "pipeline.toml",
        "[verify]\nmax_rel_error = nan\n",
        "verify.max_rel_error: nan is out of range: expected a number of at least 0",
    ),
    (
        "pipeline.toml",
        '[verify]\nstrict = "maybe"\n',
        "verify.strict: expected true or false, got the string 'maybe'",
    ),
    (
        "pipeline.toml",
        "[verify]\nmin_top_1 = 0.9\n",
        "verify.min_top_1: unknown key (did you mean 'min_top1'?; "
        "valid keys: enabled, data, strict, max_rel_error, min_cosine, min_top1)",
    ),
    (
        "pipeline.toml",
        "[verify]\nenabled = false\nmin_cosine = 0.9\n",
        "verify.min_cosine: a budget needs verification; remove it or set verify.enabled = true",
    ),
    (
        "pipeline.toml",
        "sed = 1\n",
        "sed: unknown key (did you mean 'seed'?; valid keys: seed, hardware, fixed_point, input_shapes, verify, "
        "passes)",
    ),
    ("pipeline.toml", "seed = -1\n", "seed: expected a non-negative integer, got the number -1"),
    (
        "pipeline.toml",
        'fixed_point = "sometimes"\n',
        "fixed_point: expected \"auto\", true or false, got the string 'sometimes'",
    ),
    (
        "pipeline.toml",
        'hardware = "pi4"\n',
        "hardware: unknown hardware profile 'pi4'; known profiles: cortex-m7, jetson-nano, rpi4, x86-avx2-2core "
        "(or give flops=PEAK_FLOP_PER_S[,bandwidth=BYTES_PER_S])",
    ),
    (
        "pipeline.toml",
        "input_shapes = { x = [1, 0, 8] }\n",
        "input_shapes.x: expected a list of positive integers such as [1, 3, 224, 224], got a list",
    ),
    ("pipeline.toml", "verify = 1\n", "verify: expected a table ([verify] or verify = {...}), got the number 1"),
    (
        "pipeline.toml",
        'seed = 0\nhardware = "rpi4"\n\n[verify\n',
        "line 4, column 8: Expected ']' at the end of a table declaration (TOML syntax)",
    ),
    (
        "pipeline.json",
        '{\n  "seed": 0,\n  "verify": {"strict": tru}\n}',
        "line 3, column 24: Expecting value (JSON syntax)",
    ),
    ("pipeline.json", '{"seed": 0, "seed": 1}', "key 'seed' appears twice in one object; keep one"),
    ("pipeline.json", "[1, 2]", "expected a table of settings at the top level, got a list"),
    ("pipeline.yaml", "seed: 0\n", "YAML pipeline files are not supported; write it as .toml or .json"),
    ("pipeline.txt", "seed = 0\n", "unsupported pipeline file extension '.txt'; use .toml or .json"),
]


@pytest.mark.parametrize(
    ("name", "text", "message"), ERRORS, ids=[f"{i}-{m.split(':')[0]}" for i, (*_, m) in enumerate(ERRORS, 1)]
)
def test_each_problem_is_one_line_naming_the_file_the_key_and_the_fix(
    tmp_path, registry, hardware, name, text, message
):
    path = _write(tmp_path, name, text)
    with pytest.raises(PipelineFileError) as raised:
        load_pipeline_file(path, registry, hardware)
    assert str(raised.value) == f"{path}: {message}"
    assert "\n" not in str(raised.value)
    assert isinstance(raised.value, InputError) and raised.value.exit_code == 2


def test_missing_file_and_missing_data_file(tmp_path, registry, hardware):
    missing = tmp_path / "nope.toml"
    with pytest.raises(PipelineFileError, match=r"nope\.toml: file not found$"):
        load_pipeline_file(missing, registry, hardware)
    path = _write(tmp_path, "p.toml", '[verify]\ndata = "calib.npz"\n')
    with pytest.raises(PipelineFileError) as raised:
        load_pipeline_file(path, registry, hardware)
    assert str(raised.value) == (
        f"{path}: verify.data: file not found: {tmp_path / 'calib.npz'} "
        "(relative paths are read from the pipeline file's folder)"
    )


def test_a_directory_is_not_a_pipeline_file(tmp_path, registry, hardware):
    (tmp_path / "dir.toml").mkdir()
    with pytest.raises(PipelineFileError, match=r"dir\.toml: not a file; --pipeline takes a \.toml or \.json file"):
        load_pipeline_file(tmp_path / "dir.toml", registry, hardware)


# ---------------------------------------------------------------------------------------------- PassOptions.from_values
def test_from_values_without_a_location_names_pass_and_option(registry):
    prune = registry["prune"].Options
    with pytest.raises(OptionError, match=r"^prune:ratio: expected a number, got the boolean false$"):
        prune.from_values({"ratio": False}, "prune")
    with pytest.raises(OptionError, match=r"^prune:round_to: option 'round_to' is given twice"):
        prune.from_values({"round-to": 8, "round_to": 8}, "prune")
    svd = registry["svd"].Options
    assert svd.from_values({"rank": None}, "svd").rank is None
    assert svd.from_values({"rank": "none"}, "svd").rank is None  # as on the command line
    assert svd.from_values({"energy": 1}, "svd").energy == 1.0
    with pytest.raises(OptionError, match=r"^svd:nodes: expected a list of strings, got none$"):
        svd.from_values({"nodes": None}, "svd")


# ---------------------------------------------------------------------------------------------- the examples
def test_digits_example_pipeline_validates_against_the_builtin_passes(registry, hardware, plugins):
    path = EXAMPLES / "pipelines" / "digits_prune_quantize.toml"
    config = load_pipeline_file(path, registry, hardware)
    assert _built(config) == (
        ("default", None),
        ("prune", registry["prune"].Options(ratio=0.1, round_to=4)),
        ("quantize", registry["quantize"].Options(mode="static", select="all")),
    )
    assert config.data.resolve() == (EXAMPLES / "digits" / "digits_test.npz").resolve()
    assert config.budget == Budget(min_top1=0.98)


def test_lossless_example_pipeline_is_the_default_pipeline_verified_strictly(registry, hardware):
    config = load_pipeline_file(EXAMPLES / "pipelines" / "lossless.json", registry, hardware)
    assert config.passes == ["default"]
    assert (config.verify, config.strict, config.data, config.budget) == (True, True, None, Budget())


@pytest.mark.parametrize(("name", "text"), [
    ("deep.json", '{"passes": ' + "[" * 100_000 + "]" * 100_000 + "}"),
    ("deep.toml", "x = " + "[" * 100_000 + "]" * 100_000 + "\n"),
])
def test_a_file_nested_too_deeply_is_a_one_line_error(tmp_path, registry, hardware, name, text):
    with pytest.raises(PipelineFileError, match=r"nested too deeply to read"):
        load_pipeline_file(_write(tmp_path, name, text), registry, hardware)


# ---------------------------------------------------------------------------------------------- all problems at once
FOUR_PROBLEMS = """
seed = -1

[verify]
strict = "maybe"

[[passes]]
name = "prnue"

[[passes]]
name = "prune"
ratio = "abc"
round_to = 2.5
"""


def test_every_problem_of_a_file_is_reported_at_once_in_key_order(tmp_path, registry, hardware):
    path = _write(tmp_path, "p.toml", FOUR_PROBLEMS)
    with pytest.raises(PipelineFileError) as raised:
        load_pipeline_file(path, registry, hardware)
    assert raised.value.lines() == [
        f"{path}: seed: expected a non-negative integer, got the number -1",
        f"{path}: verify.strict: expected true or false, got the string 'maybe'",
        f"{path}: passes[1].name: unknown pass 'prnue' (did you mean 'prune'?; see nnopt passes)",
        f"{path}: passes[2].ratio: expected a number, got the string 'abc'",
        f"{path}: passes[2].round_to: expected an integer, got the number 2.5",
    ]
    assert str(raised.value) == "\n".join(raised.value.lines()) and raised.value.exit_code == 2


def test_the_cli_prints_each_problem_as_an_error_line_exits_2_and_writes_nothing(tmp_path, capsys):
    from nnopt.cli import main

    path = _write(tmp_path, "p.toml", FOUR_PROBLEMS + '\n[bogus]\n')
    out = tmp_path / "out" / "o.onnx"
    assert main(["optimize", str(EXAMPLES / "small_cnn.onnx"), "-o", str(out), "--pipeline", str(path)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert [line.split(": ")[3] for line in lines] == [
        "bogus", "seed", "verify.strict", "passes[1].name", "passes[2].ratio", "passes[2].round_to"
    ]
    assert all(line.startswith(f"nnopt: error: {path}: ") for line in lines)
    assert captured.out == "" and not out.parent.exists()


def test_unknown_keys_and_a_non_table_section_are_all_reported(tmp_path, registry, hardware):
    path = _write(tmp_path, "p.json", json.dumps({"sed": 1, "verify": 3, "input_shapes": {"x": [0], "y": [1, 2]}}))
    with pytest.raises(PipelineFileError) as raised:
        load_pipeline_file(path, registry, hardware)
    assert [line.removeprefix(f"{path}: ").split(":")[0] for line in raised.value.lines()] == [
        "sed", "verify", "input_shapes.x"
    ]


# ---------------------------------------------------------------------------------------------- strings as values
def test_numeric_and_boolean_strings_are_accepted_for_every_setting_as_for_pass_options(tmp_path, registry, hardware):
    """One rule for the whole file: a string converts as the command line would convert it."""
    (tmp_path / "calib.npz").write_bytes(b"")
    typed = load_pipeline_file(_write(tmp_path, "typed.toml", FULL_TOML), registry, hardware)
    as_strings = FULL_TOML.replace("seed = 7", 'seed = "7"').replace("fixed_point = false", 'fixed_point = "false"')
    as_strings = as_strings.replace("x = [1, 3, 32, 32]", 'x = "1,3,32,32"').replace("strict = true", 'strict = "true"')
    as_strings = as_strings.replace("max_rel_error = 0.05", 'max_rel_error = "0.05"').replace("min_top1 = 1", 'min_top1 = "1"')
    as_strings = as_strings.replace("ratio = 0.3", 'ratio = "0.3"').replace("rank = 4", 'rank = "4"')
    assert as_strings.count('"') - FULL_TOML.count('"') == 16  # eight values now strings
    strings = load_pipeline_file(_write(tmp_path, "strings.toml", as_strings), registry, hardware)
    assert _built(strings) == _built(typed)
    assert dataclasses.replace(strings, passes=None) == dataclasses.replace(typed, passes=None)
    assert (strings.seed, strings.input_shapes, strings.budget.min_top1) == (7, {"x": [1, 3, 32, 32]}, 1.0)
    listed = load_pipeline_file(_write(tmp_path, "l.json", '{"input_shapes": {"x": ["1", "3"]}}'), registry, hardware)
    assert listed.input_shapes == {"x": [1, 3]}


# ---------------------------------------------------------------------------------------------- the format's documentation
def test_every_key_the_loader_accepts_is_documented_in_docs_pipeline_files():
    """docs/pipeline-files.md has a table row for each key, with the key as the loader spells it."""
    import re

    from nnopt.pipeline.config import TOP_LEVEL_KEYS, VERIFY_KEYS

    doc = (EXAMPLES.parent / "docs" / "pipeline-files.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `([A-Za-z0-9_.\[\]]+)` \|", doc, flags=re.MULTILINE))
    accepted = {*TOP_LEVEL_KEYS, *(f"verify.{k}" for k in VERIFY_KEYS), "passes[].name"}
    assert accepted <= documented, sorted(accepted - documented)
    assert documented <= accepted | {"passes[].OPTION"}, sorted(documented - accepted)


def test_the_docs_examples_are_valid_and_the_toml_and_json_agree(tmp_path, registry, hardware):
    import re
    import shutil

    doc = (EXAMPLES.parent / "docs" / "pipeline-files.md").read_text(encoding="utf-8")
    example = doc[doc.index("## An example"):]
    toml_text = re.search(r"```toml\n(.*?)```", example, flags=re.DOTALL)[1]
    json_text = re.search(r"```json\n(.*?)```", example, flags=re.DOTALL)[1]
    (tmp_path / "digits").mkdir()
    shutil.copy(EXAMPLES / "digits" / "digits_test.npz", tmp_path / "digits" / "digits_test.npz")
    from_toml = load_pipeline_file(_write(tmp_path / "pipelines", "p.toml", toml_text), registry, hardware)
    from_json = load_pipeline_file(_write(tmp_path / "pipelines", "p.json", json_text), registry, hardware)
    assert _built(from_toml) == _built(from_json) and len(from_toml.passes) == 3
    assert dataclasses.replace(from_toml, passes=None) == dataclasses.replace(from_json, passes=None)
    assert from_toml.budget == Budget(min_top1=0.98) and from_toml.input_shapes == {"x": [1, 1, 28, 28]}
