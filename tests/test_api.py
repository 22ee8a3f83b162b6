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
