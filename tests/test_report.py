"""The optimize report (issue #17): its schema and documentation, its fields on every outcome, --json -q,
the permissions of reports and profiles, and the provenance recorded in the output model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from report_schema import validate

import nnopt
from nnopt.cli import main
from nnopt.pipeline.manager import Budget, PassRecord, PipelineReport
from nnopt.pipeline.spec import parse_pass_spec
from nnopt.plugin_manager import build_plugins, get_pass_class
from nnopt.provenance import pass_spec
from nnopt.report import DOC_BEGIN, DOC_END, OUTCOMES, fields_markdown, pipeline_budget, pipeline_outcome, schema

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "small_cnn.onnx"
DIGITS = ROOT / "examples" / "digits" / "digits_cnn.onnx"
DIGITS_DATA = ROOT / "examples" / "digits" / "digits_test.npz"
#: A lossy pass the example model cannot keep within a cosine of 0.99999 (the test of --strict in test_build_step).
BREAKS_BUDGET = ["-p", "kmeans:bits=1,min_size=1", "--min-cosine", "0.99999"]


def _optimize(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["optimize", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------------------------------------- schema and docs
def test_docs_field_tables_are_the_schemas():
    text = (ROOT / "docs" / "report.md").read_text()
    generated = text.split(DOC_BEGIN + "\n", 1)[1].split(DOC_END, 1)[0]
    assert generated.strip() == fields_markdown().strip(), "regenerate: python -m nnopt.report docs/report.md"
    # Every outcome is in the schema and documented with its meaning.
    assert schema()["properties"]["outcome"]["enum"] == list(OUTCOMES)
    for outcome, meaning in OUTCOMES.items():
        assert f"| `{outcome}` | {meaning} |" in text


def test_schema_ships_with_the_package():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"schemas/*.json"' in pyproject and '"jsonschema>=' in pyproject
    assert schema()["properties"]["schema_version"]["const"] == 1


# ---------------------------------------------------------------------------------------------- fields
def test_success_report_carries_versions_files_profile_and_fidelity_source(tmp_path, capsys):
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    code, stdout, _ = _optimize(capsys, str(EXAMPLE), "-o", str(out), "--report", str(rep), "--json", "--ops")
    assert code == 0
    report = validate(json.loads(rep.read_text()))
    assert json.loads(stdout) == report  # --json prints what --report writes
    assert (report["schema_version"], report["nnopt_version"], report["kind"]) == (1, nnopt.__version__, "pipeline")
    assert (report["outcome"], report["exit_code"]) == ("ok", 0)
    assert report["input"] == {"path": str(EXAMPLE), "bytes": EXAMPLE.stat().st_size} and report["input"]["bytes"] == 27734
    assert report["output"] == {"path": str(out), "bytes": out.stat().st_size, "written": True}
    assert report["profile"] == {"name": "x86-avx2-2core", "calibrated": False}
    assert report["budget"] is None and report["seed"] == 0 and report["warnings"] == []
    # Without --data, a lossless pipeline is verified on 2 generated samples.
    assert report["fidelity"]["source"] == "generated inputs" and report["fidelity"]["samples"] == 2
    assert report["fidelity"]["max_rel_error"] < 1e-5
    assert report["op_types"]["after"]["Conv"] == 3


def test_budget_on_user_data_is_reported_met_with_its_value(tmp_path, capsys):
    rep = tmp_path / "r.json"
    code, _, err = _optimize(capsys, str(DIGITS), "-o", str(tmp_path / "o.onnx"), "-p", "default", "-p",
                             "kmeans:bits=4", "--data", str(DIGITS_DATA), "--min-top1", "0.98", "--min-cosine", "0.9",
                             "--seed", "3", "--report", str(rep), "-q")
    assert code == 0, err
    report = validate(json.loads(rep.read_text()))
    assert report["fidelity"]["source"] == "user data" and report["fidelity"]["samples"] == 450
    limits = {limit["metric"]: limit for limit in report["budget"]["limits"]}
    assert report["budget"]["met"] is True and sorted(limits) == ["min_cosine", "min_top1"]
    assert limits["min_top1"]["limit"] == 0.98 and limits["min_top1"]["value"] == report["fidelity"]["top1_agreement"]
    assert limits["min_top1"]["value"] >= 0.98 and limits["min_cosine"]["met"] is True
    assert report["seed"] == 3 and report["outcome"] == "ok"


def test_a_rolled_back_pass_is_the_rolled_back_outcome(tmp_path, capsys):
    code, stdout, _ = _optimize(capsys, str(EXAMPLE), "-o", str(tmp_path / "o.onnx"), *BREAKS_BUDGET, "--json")
    report = validate(json.loads(stdout))
    assert code == 0 and (report["outcome"], report["exit_code"]) == ("rolled_back", 0)
    assert report["passes"][0]["status"] == "rolled_back" and report["budget"]["met"] is True
    # Judged on generated inputs: 16 samples, and the report says so.
    assert report["fidelity"]["source"] == "generated inputs" and report["fidelity"]["samples"] == 16


def test_strict_rollback_writes_the_report_and_no_model(tmp_path, capsys):
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    code, stdout, err = _optimize(capsys, str(EXAMPLE), "-o", str(out), *BREAKS_BUDGET, "--strict", "--report",
                                  str(rep), "--json")
    assert code == 3 and err.count("\n") == 1 and "kmeans" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    report = validate(json.loads(rep.read_text()))
    assert json.loads(stdout) == report
    assert (report["outcome"], report["exit_code"]) == ("rolled_back_strict", 3)
    assert report["output"] == {"path": str(out), "bytes": None, "written": False}
    assert report["passes"][0]["name"] == "kmeans" and report["passes"][0]["status"] == "rolled_back"
    assert "cosine similarity" in report["passes"][0]["reason"]
    assert report["final"] == report["original"]  # the last verified model is the input


def test_a_missed_budget_is_the_budget_failed_outcome():
    # The final model misses a limit that was set (a pipeline's lossless pass after a lossy one can do it).
    report = PipelineReport(budget=Budget(min_cosine=0.99, max_rel_error=0.1),
                            fidelity={"cosine_similarity": 0.95, "max_rel_error": 0.05, "samples": 4})
    report.passes.append(PassRecord("svd", {}, True, 0, status="applied"))
    budget = pipeline_budget(report)
    assert budget == {"met": False, "limits": [
        {"metric": "min_cosine", "limit": 0.99, "value": 0.95, "met": False},
        {"metric": "max_rel_error", "limit": 0.1, "value": 0.05, "met": True},
    ]}
    assert pipeline_outcome(report, strict_failed=False) == "budget_failed"
    assert pipeline_outcome(report, strict_failed=True) == "rolled_back_strict"
    # A limit nothing could measure: met is unknown (None), which is not a failure.
    unmeasured = PipelineReport(budget=Budget(min_cosine=0.99), fidelity=None)
    assert pipeline_budget(unmeasured) == {"met": None, "limits": [
        {"metric": "min_cosine", "limit": 0.99, "value": None, "met": None}]}
    assert pipeline_outcome(unmeasured, strict_failed=False) == "ok"


def test_bad_input_writes_no_report(tmp_path, capsys):
    rep = tmp_path / "r.json"
    code, stdout, err = _optimize(capsys, str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "o.onnx"),
                                  "--report", str(rep), "--json")
    assert (code, stdout) == (2, "") and err.count("\n") == 1
    code, _, _ = _optimize(capsys, str(EXAMPLE), "-o", str(tmp_path / "o.onnx"), "-p", "nope", "--report", str(rep))
    assert code == 2 and list(tmp_path.iterdir()) == []


def test_json_quiet_prints_json_on_stdout_and_nothing_on_stderr(tmp_path):
    # A subprocess: nothing the interpreter, onnxruntime or a library might print to stderr is missed.
    # `-p dce` on an already-clean model changes nothing: a warning, which goes into the report instead.
    clean = tmp_path / "clean.onnx"
    assert main(["optimize", str(EXAMPLE), "-o", str(clean), "-q"]) == 0
    cmd = [sys.executable, "-m", "nnopt", "optimize", str(clean), "-o", str(tmp_path / "o.onnx"), "-p", "dce",
           "--json", "-q"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert (done.returncode, done.stderr) == (0, "")
    report = validate(json.loads(done.stdout))
    assert report["warnings"] == ["dce changed nothing: it found nothing to change in this model"]
    # Without -q the same warning is on stderr, and in the report too.
    done = subprocess.run(cmd[:-1], capture_output=True, text=True, timeout=120, check=False)
    assert done.stderr.startswith("nnopt: warning: dce changed nothing")
    assert json.loads(done.stdout)["warnings"] == report["warnings"]


# ---------------------------------------------------------------------------------------------- permissions
def test_report_and_profile_get_the_models_permissions(tmp_path, capsys):
    previous = os.umask(0o022)
    try:
        assert main(["optimize", str(EXAMPLE), "-o", str(tmp_path / "o.onnx"), "--report", str(tmp_path / "r.json"),
                     "-q"]) == 0
        assert main(["calibrate", "--quick", "--runs", "2", "--rounds", "1", "-o", str(tmp_path / "p.json")]) == 0
        os.umask(0o077)
        assert main(["optimize", str(EXAMPLE), "-o", str(tmp_path / "private.onnx"), "--report",
                     str(tmp_path / "private.json"), "-q"]) == 0
    finally:
        os.umask(previous)
    capsys.readouterr()
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"o.onnx": 0o644, "r.json": 0o644, "p.json": 0o644, "private.onnx": 0o600, "private.json": 0o600}


# ---------------------------------------------------------------------------------------------- provenance
def _metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_provenance_is_recorded_deterministically_and_keeps_the_inputs_metadata(tmp_path, capsys):
    argv = ["-p", "default", "-p", "prune:ratio=0.25,round_to=4", "--data", str(DIGITS_DATA), "--seed", "7",
            "--min-cosine", "0.9", "-q"]
    outs = [tmp_path / "a.onnx", tmp_path / "b.onnx"]
    for out in outs:
        assert _optimize(capsys, str(DIGITS), "-o", str(out), *argv)[0] == 0
    assert outs[0].read_bytes() == outs[1].read_bytes()  # no time stamp, no path
    meta = _metadata(outs[0])
    assert meta["nnopt.version"] == nnopt.__version__ and meta["nnopt.seed"] == "7"
    assert json.loads(meta["nnopt.pipeline"]) == [
        "strip-debug-info", "constants-to-initializers", "dce", "fold-constants", "remove-noops", "fold-batchnorm",
        "fuse-hardswish", "dce", "prune:ratio=0.25,round_to=4"]
    assert json.loads(meta["nnopt.options"]) == {
        "budget": {"min_cosine": 0.9}, "data": True, "fixed_point": False, "hardware": "x86-avx2-2core",
        "input_shapes": {}, "strict": False, "verify": True}
    assert str(tmp_path) not in outs[0].read_bytes().decode("latin-1")

    # The input's own metadata stays, first; an earlier run's nnopt.* entries are replaced, not repeated.
    assert _metadata(EXAMPLE) == {"description": "nnopt example model: a small CNN with unfused BN"}
    once, twice = tmp_path / "once.onnx", tmp_path / "twice.onnx"
    assert _optimize(capsys, str(EXAMPLE), "-o", str(once), "-q")[0] == 0
    assert _optimize(capsys, str(once), "-o", str(twice), "-p", "dce", "--seed", "2", "-q")[0] == 0
    keys = [p.key for p in onnx.load(str(twice)).metadata_props]
    assert keys == ["description", "nnopt.version", "nnopt.pipeline", "nnopt.options", "nnopt.seed"]
    assert _metadata(twice)["nnopt.pipeline"] == '["dce"]' and _metadata(twice)["nnopt.seed"] == "2"


def test_no_provenance_leaves_the_metadata_as_it_was(tmp_path, capsys):
    with_, without = tmp_path / "with.onnx", tmp_path / "without.onnx"
    assert _optimize(capsys, str(EXAMPLE), "-o", str(with_), "-q")[0] == 0
    assert _optimize(capsys, str(EXAMPLE), "-o", str(without), "-q", "--no-provenance")[0] == 0
    assert _metadata(without) == _metadata(EXAMPLE)
    assert len(with_.read_bytes()) > len(without.read_bytes())


@pytest.mark.parametrize("spec", ["prune:ratio=0.25,round_to=4", "kmeans:bits=3,per_channel=true",
                                  "strip-debug-info:keep=a*,b", "quantize:mode=weight_only"])
def test_pass_spec_runs_the_same_pass_again(spec):
    plugins = build_plugins(load_entry_points=False)
    name, values = parse_pass_spec(spec)
    cls = get_pass_class(plugins, name)
    built = cls(cls.Options.from_strings(values, name))
    assert pass_spec(built) == spec
    again_name, again_values = parse_pass_spec(pass_spec(built))
    assert cls.Options.from_strings(again_values, again_name) == built.options
