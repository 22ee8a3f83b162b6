"""The Python API for pipeline scripts: Pipeline, optimize, progress, and the public import surface."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import nnopt
from nnopt.runtime import make_session

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits" / "digits_cnn.onnx"
DIGITS_DATA = ROOT / "examples" / "digits" / "digits_test.npz"


class _Recorder(nnopt.Progress):
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def pass_started(self, name, position, count, iteration):
        self.events.append(("start", name, position, count))

    def layer(self, done, total, item):
        self.events.append(("layer", done, total, item))

    def pass_finished(self, record):
        self.events.append(("end", record.name, record.status))


def test_a_pipeline_script_in_a_few_lines(tmp_path):
    before = DIGITS.read_bytes()
    pipeline = nnopt.Pipeline(["default", ("prune", {"ratio": 0.25, "round_to": 4})], data=DIGITS_DATA,
                              budget=nnopt.Budget(min_top1=0.5))
    model, report = pipeline.run(DIGITS)
    nnopt.save_model(model, tmp_path / "out.onnx")

    assert DIGITS.read_bytes() == before  # a path is loaded, never modified
    statuses = {r.name: r.status for r in report.passes}
    assert statuses["fold-batchnorm"] == "applied" and statuses["prune"] == "applied"
    original = nnopt.analyze(nnopt.load_model(DIGITS)).totals
    pruned = nnopt.analyze(nnopt.load_model(tmp_path / "out.onnx")).totals
    assert pruned["params"] < 0.8 * original["params"] and pruned["flops"] < 0.8 * original["flops"]
    assert report.final["params"] == pruned["params"]
    x = np.load(DIGITS_DATA)["x"][:8]
    assert make_session(tmp_path / "out.onnx").run(None, {"x": x})[0].shape == (8, 10)


def test_optimize_is_the_one_call_form_of_pipeline_run():
    proto = onnx.load(str(DIGITS))
    a, report_a = nnopt.optimize(proto, ["fold-batchnorm"], seed=3)
    b, report_b = nnopt.Pipeline(["fold-batchnorm"], seed=3).run(proto)
    assert a.to_proto().SerializeToString() == b.to_proto().SerializeToString()
    assert [r.status for r in report_a.passes] == [r.status for r in report_b.passes] == ["applied"]


def test_progress_reports_passes_and_layers():
    recorder = _Recorder()
    nnopt.Pipeline(["fold-batchnorm", "kmeans:bits=4"]).run(DIGITS, progress=recorder)
    starts = [e for e in recorder.events if e[0] == "start"]
    assert starts == [("start", "fold-batchnorm", 1, 2), ("start", "kmeans", 2, 2)]
    # k-means reports each candidate weight as it goes: the digits CNN has 2 convs and 2 Gemms.
    layers = [e for e in recorder.events if e[0] == "layer"]
    assert [e[1:3] for e in layers] == [(i, len(layers)) for i in range(len(layers))] and len(layers) >= 4
    assert recorder.events[-1] == ("end", "kmeans", "applied")


def test_build_validates_without_a_model():
    assert [p.name for p in nnopt.Pipeline(["dce", ("svd", {"energy": 0.9})]).build()] == ["dce", "svd"]
    with pytest.raises(nnopt.PassNotFoundError, match="prnue"):
        nnopt.Pipeline(["prnue"]).build()
    with pytest.raises(nnopt.OptionError, match="bits"):
        nnopt.Pipeline([("svd", {"bits": 4})]).build()


def test_hardware_by_name():
    _, report = nnopt.Pipeline(["dce"], hardware="cortex-m7", verify=False).run(DIGITS)
    _, default_report = nnopt.Pipeline(["dce"], verify=False).run(DIGITS)
    # The same FLOPs, estimated on a far slower profile.
    assert report.original["flops"] == default_report.original["flops"]
    assert report.original["latency_s"] > 10 * default_report.original["latency_s"]
    with pytest.raises(nnopt.InputError, match="no-such-chip"):
        nnopt.Pipeline(["dce"], hardware="no-such-chip").run(DIGITS)


def test_the_plugin_author_surface_is_importable_from_nnopt():
    for name in ("hookimpl", "Pass", "PassOptions", "PassContext", "PassResult", "Model", "CostRule", "Cost",
                 "CostContext", "HardwareProfile", "consumers", "producer", "replace_tensor", "constant_values",
                 "topological_nodes", "dataflow", "Pipeline", "Progress", "StreamProgress",
                 # nnopt.ir's shared helpers (issue #12): what the built-in passes use, for plugins too
                 "all_graphs", "graph_outputs", "is_onnx_op", "remove_dead_nodes", "taken_names", "unique_name",
                 # the analysis cache (issue #12): ctx.analyses_for(model) returns an AnalysisManager
                 "Analysis", "AnalysisManager", "AnalysisSettings"):
        assert hasattr(nnopt, name) and name in nnopt.__all__, name


def test_the_entry_points_have_real_signatures_not_wrappers():
    """help(), IDEs and inspect see the parameters: no ``*args, **kwargs`` forwarding in the way."""
    import dataclasses
    import inspect

    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    signatures = {f: inspect.signature(f) for f in (nnopt.optimize, nnopt.Pipeline, nnopt.build_plugins, nnopt.analyze)}
    for function, signature in signatures.items():
        assert not [p for p in signature.parameters.values() if p.kind in variadic], function
    assert nnopt.optimize is nnopt.api.optimize and nnopt.Pipeline is nnopt.api.Pipeline
    # The one-call form takes every Pipeline setting by name, and the run's plugins and progress.
    params = list(signatures[nnopt.optimize].parameters)
    assert params[:2] == ["model", "passes"] and params[-2:] == ["plugins", "progress"]
    assert set(params[1:-2]) == {f.name for f in dataclasses.fields(nnopt.Pipeline)}
    assert list(signatures[nnopt.build_plugins].parameters) == ["load_entry_points", "extra"]
    assert list(signatures[nnopt.analyze].parameters) == [
        "model", "hardware", "rules", "plugins", "input_shapes", "run_onnxruntime", "decode_patterns", "counter",
        "batch"]


# ---------------------------------------------------------------------------------------------- data=
def _figures(report: nnopt.PipelineReport) -> list[tuple]:
    """Everything a report says about each pass, but its timings."""
    def untimed(stats: dict) -> dict:
        return {k: v for k, v in stats.items() if not k.endswith("seconds")}

    return [(r.name, r.status, r.reason, r.after, r.fidelity, untimed(r.stats), r.layers) for r in report.passes]


def test_data_in_memory_gives_the_same_report_figures_as_the_npz(tmp_path):
    """An .npz path, the dict it holds, its one array, and a list of feeds: the same samples, the same run."""
    x = np.load(DIGITS_DATA)["x"][:48]
    path = tmp_path / "calib.npz"
    np.savez(path, x=x)
    passes, budget = ["fold-batchnorm", "quantize"], nnopt.Budget(min_top1=0.9)
    model, report = nnopt.optimize(DIGITS, passes, data=path, budget=budget)
    figures = _figures(report)
    assert [r.status for r in report.passes] == ["applied", "applied"] and report.passes[1].fidelity["top1_agreement"] > 0.9
    feeds = [{"x": sample[None]} for sample in x]  # each feed in the input's own shape [N, 1, 8, 8], N = 1
    for data in ({"x": x}, x, feeds, iter(feeds)):
        other, other_report = nnopt.optimize(DIGITS, passes, data=data, budget=budget)
        assert _figures(other_report) == figures, type(data)
        assert other.to_proto().SerializeToString() == model.to_proto().SerializeToString()


def test_an_iterable_of_feeds_is_read_once_so_the_pipeline_runs_twice_alike():
    x = np.load(DIGITS_DATA)["x"][:16]
    pipeline = nnopt.Pipeline(["quantize"], data=({"x": s[None]} for s in x))
    first, second = pipeline.run(DIGITS)[1], pipeline.run(DIGITS)[1]
    assert len(pipeline.data) == 16 and _figures(first) == _figures(second)
    assert first.passes[0].fidelity["samples"] == 16


@pytest.mark.parametrize(("data", "message"), [
    ({"y": np.zeros((2, 1, 8, 8), np.float32)}, "data: missing input(s) x; unknown array(s) y (model inputs: x)"),
    ([{"x": np.zeros((1, 1, 8, 8), np.float32)}, {"z": 1}], "data: feed 1 must map each model input (x) to an array, got z"),
    ([{"x": np.zeros((1, 8, 8), np.float32)}], "data: 'x' gives samples of shape [1, 8, 8], model input has rank 4"),
    (np.full((2, 1, 8, 8), np.nan, np.float32), "data: array 'x' holds NaN values (sample 0); give finite data"),
    ([], "data: holds no samples (every array is empty on its first axis)"),
    (42, "data: expected an .npz path, an array, a dict of arrays or a list of feeds, got int"),
])
def test_bad_data_in_memory_is_a_data_error_naming_the_problem(data, message):
    with pytest.raises(nnopt.DataError) as raised:
        nnopt.optimize(DIGITS, ["dce"], data=data)
    assert str(raised.value) == message


def test_labels_come_from_a_dict_of_arrays_as_from_an_npz(tmp_path):
    from nnopt.runtime import load_labels

    x, labels = np.load(DIGITS_DATA)["x"][:8], np.arange(8) % 10
    np.savez(tmp_path / "d.npz", x=x, labels=labels)
    session = make_session(DIGITS)
    from_file = load_labels(tmp_path / "d.npz", session, 8)
    assert from_file.tolist() == load_labels({"x": x, "labels": labels}, session, 8).tolist() == labels.tolist()
    assert load_labels(x, session, 8) is None and load_labels([{"x": x[:1]}], session, 8) is None
