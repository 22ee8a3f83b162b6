"""Issue #16: the estimate tells the same story as onnxruntime (data shapes, uncosted nodes, kmeans, int8)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from nnopt.api import optimize
from nnopt.cli import main
from nnopt.cost import DEFAULT_PROFILE, analyze
from nnopt.cost.inputs import data_shapes_note, sample_input_shapes
from nnopt.pipeline.manager import PassRecord, PipelineReport, _uncosted_notes
from nnopt.testing import model_from_text

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"
HEADER = '<ir_version: 8, opset_import: ["" : 17, "custom.op" : 1]>'


def dynamic_conv() -> onnx.ModelProto:
    """A 3×3 conv, 3 → 8 channels, on an input of dynamic batch, height and width."""
    rng = np.random.default_rng(0)
    return model_from_text(
        f"""{HEADER}
        g (float[N, 3, H, W] x) => (float[N, 8, H, W] y) {{
            c = Conv<pads: ints = [1, 1, 1, 1]>(x, w)
            y = Relu(c)
        }}""",
        {"w": rng.standard_normal((8, 3, 3, 3)).astype(np.float32)},
    )


def with_custom_op() -> onnx.ModelProto:
    """A conv followed by an op of an unknown domain: no cost rule, so it cannot be costed."""
    proto = dynamic_conv()
    proto.graph.node.append(onnx.helper.make_node("Mystery", ["y"], ["z"], domain="custom.op"))
    proto.graph.output[0].name = "z"
    return proto


# ---------------------------------------------------------------------------------------------- data shapes
def test_sample_shapes_fill_only_dynamic_inputs_and_given_shapes_win():
    graph = dynamic_conv().graph
    sample = {"x": np.zeros((1, 3, 32, 40), np.float32)}
    assert sample_input_shapes(graph, sample) == {"x": [1, 3, 32, 40]}
    assert sample_input_shapes(graph, sample, {"x": [2, 3, 8, 8]}) == {"x": [2, 3, 8, 8]}
    fixed = onnx.load_from_string(dynamic_conv().SerializeToString())
    for dim, value in zip(fixed.graph.input[0].type.tensor_type.shape.dim, (1, 3, 32, 40)):
        dim.dim_value = value
    assert sample_input_shapes(fixed.graph, sample) == {}  # nothing dynamic: costed exactly as without data
    assert data_shapes_note(graph, {"x": [1, 3, 32, 40]}, {}) == (
        "cost figures use the input shapes of the first data sample: x=1x3x32x40"
    )
    assert data_shapes_note(graph, {"x": [1, 3, 1, 1]}, {}) is None  # the dims of 1 assumed anyway


def test_analyze_with_data_costs_the_data_shapes(tmp_path, capsys):
    path = tmp_path / "dyn.onnx"
    onnx.save_model(dynamic_conv(), str(path))
    data = tmp_path / "data.npz"
    np.savez(data, x=np.zeros((2, 3, 32, 40), np.float32))
    # 8 × 32 × 40 outputs × 27 taps = 276,480 MACs.
    assert main(["analyze", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["macs"] == 8 * 27  # dims of 1 without data
    assert main(["analyze", str(path), "--json", "--data", str(data)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["totals"]["macs"] == 276_480 and out["input_shapes"] == {"x": [1, 3, 32, 40]}
    assert out["notes"][0] == "input shapes from the first sample of data.npz: x=1x3x32x40"
    assert main(["analyze", str(path), "--json", "--data", str(data), "--input-shape", "x=1,3,8,8"]) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["macs"] == 8 * 64 * 27


def test_pipeline_costs_the_data_shapes(tmp_path):
    data = tmp_path / "data.npz"
    np.savez(data, x=np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32))
    _, report = optimize(dynamic_conv(), ["dce"], data=data)
    assert report.original["macs"] == 8 * 256 * 27 == report.final["macs"]
    assert report.notes[-1] == "cost figures use the input shapes of the first data sample: x=1x3x16x16"
    _, plain = optimize(dynamic_conv(), ["dce"])
    assert plain.original["macs"] == 8 * 27 and not any("data sample" in n for n in plain.notes)


# ---------------------------------------------------------------------------------------------- uncosted nodes
def test_uncosted_nodes_are_named_in_the_report_and_warned_about(tmp_path, capsys):
    report = analyze(with_custom_op(), input_shapes={"x": [1, 3, 8, 8]})
    assert report.uncosted == ["Mystery_2"] and report.totals["uncosted_nodes"] == 1
    assert report.to_dict()["uncosted"] == {"count": 1, "nodes": ["Mystery_2"]}
    path = tmp_path / "custom.onnx"
    onnx.save_model(with_custom_op(), str(path))
    assert main(["analyze", str(path), "--input-shape", "x=1,3,8,8"]) == 0
    captured = capsys.readouterr()
    assert captured.err == (
        "nnopt: warning: 1 of 3 node(s) could not be costed and count 0 FLOPs: the FLOPs and latency totals are a "
        "lower bound (give the input shapes with --input-shape or --data): Mystery_2\n"
    )
    assert "WARNING: 1 of 3 node(s) could not be costed" in captured.out
    assert analyze(dynamic_conv()).uncosted == [] and analyze(dynamic_conv()).uncosted_warning() is None


def test_a_pass_that_leaves_nodes_uncosted_gets_no_flops_ratio():
    before = {"flops": 2_030_000_000, "macs": 1_015_000_000, "latency_s": 0.02, "params": 10, "nodes": 672,
              "uncosted_nodes": 0}
    after = {**before, "flops": 812_000_000, "latency_s": 0.008, "params": 7, "uncosted_nodes": 115}
    record = PassRecord("prune", {}, True, 0, before=before, after=after)
    delta = record.to_dict()["delta"]
    assert delta["flops"] is None and delta["latency_s"] is None and delta["macs"] is None
    assert delta["params"] == -3 and delta["nodes"] == 0
    report = PipelineReport(passes=[record])
    assert _uncosted_notes(report) == [
        "after prune, 115 node(s) could not be costed (before: 0): its FLOPs and latency changes are not "
        "comparable and are not reported; give the input shapes (--input-shape or --data)"
    ]
    same = PassRecord("prune", {}, True, 0, before=before, after={**after, "uncosted_nodes": 0})
    assert same.to_dict()["delta"]["flops"] == 812_000_000 - 2_030_000_000
    assert _uncosted_notes(PipelineReport(passes=[same])) == []


@pytest.mark.slow
def test_ppocr_det_is_costed_at_the_data_shapes(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "tests"))
    from realmodels import REAL_MODELS, write_data

    spec = {m.key: m for m in REAL_MODELS}["ppocr_det"]
    path = spec.path()
    if path is None:
        pytest.skip(f"{spec.requirement} is not installed")
    data = write_data(spec, path, tmp_path / "det.npz")  # [1, 3, 320, 320] samples
    assert main(["analyze", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["flops"] == 8_741_520  # 1 × 1 pixels without data
    assert main(["analyze", str(path), "--json", "--data", str(data)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["totals"]["flops"] == 1_189_576_008 and out["uncosted"]["count"] == 0


# ---------------------------------------------------------------------------------------------- kmeans
@pytest.fixture(scope="module")
def digits_variants(tmp_path_factory):
    """The digits CNN after the default pipeline, after kmeans and after static int8 quantization."""
    tmp = tmp_path_factory.mktemp("digits")
    with np.load(DIGITS / "digits_test.npz") as npz:
        np.savez(tmp / "data.npz", x=npz["x"][:32])
    variants = {}
    for name, passes in (("float", None), ("kmeans", ["kmeans:bits=8"]), ("int8", ["quantize:mode=static"])):
        model, _ = optimize(DIGITS / "digits_cnn.onnx", passes, data=tmp / "data.npz", seed=0)
        variants[name] = model.to_proto()
    return variants


def test_kmeans_decode_is_free_in_the_default_estimate(digits_variants):
    # kmeans ran on the original model (no clean-ups first): compare with that.
    float_s = analyze(DIGITS / "digits_cnn.onnx").totals["latency_s"]
    kmeans = analyze(digits_variants["kmeans"])
    assert kmeans.totals["latency_s"] <= float_s
    assert round(float_s * 1e6, 2) == 30.40 and round(kmeans.totals["latency_s"] * 1e6, 2) == 30.40
    # The decoders are folded; the graph as written still counts their FLOPs.
    assert {n["op_type"] for n in kmeans.nodes if n["kernel"] == "folded"} >= {"Gather"}
    assert kmeans.totals["flops"] > analyze(digits_variants["float"]).totals["flops"]


def test_int8_is_faster_than_float_in_the_default_estimate(digits_variants):
    float_s = analyze(digits_variants["float"]).totals["latency_s"]
    int8 = analyze(digits_variants["int8"])
    assert int8.totals["latency_s"] < 0.8 * float_s
    assert DEFAULT_PROFILE.kernels["int8"].flops == 384e9
    assert sum(n["kernel"] == "int8" for n in int8.nodes) >= 2
