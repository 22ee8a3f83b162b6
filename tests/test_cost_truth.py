"""Issue #16: the estimate tells the same story as onnxruntime (data shapes, uncosted nodes, kmeans, int8)."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from cost_profiles import MEASURED, MEASURED_GRID

from nnopt.api import optimize
from nnopt.cli import main
from nnopt.cost import DEFAULT_PROFILE, analyze
from nnopt.cost.hardware import KernelFigures
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
    for name, passes in (("float", None), ("kmeans", ["kmeans:bits=8"]), ("int8", ["quantize:mode=static,select=all"])):
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


# ---------------------------------------------------------------------------------------------- int8 and groups


def test_int8_is_faster_than_float_under_the_measured_profile(digits_variants):
    float_s = analyze(digits_variants["float"], hardware=MEASURED).totals["latency_s"]
    int8 = analyze(digits_variants["int8"], hardware=MEASURED)
    assert int8.totals["latency_s"] < 0.9 * float_s
    kernels = [n["kernel"] for n in int8.nodes]
    assert kernels.count("int8") == 3 and kernels.count("int8_matmul") == 2
    # onnxruntime measured it 35 % faster than float (issue #16); the estimate says 0.77 x.
    assert 0.55 < int8.totals["latency_s"] / float_s < 0.85


def qdq_depthwise(multiplier: int = 1) -> onnx.ModelProto:
    """x ─Q─DQ─ depthwise 3×3 Conv (4 channels, channel multiplier ``multiplier``) ─Q─DQ─ y."""
    c_out = 4 * multiplier
    return model_from_text(
        f"""{HEADER}
        g (float[1,4,8,8] x) => (float[1,{c_out},8,8] y) {{
            xq = QuantizeLinear(x, s, z)
            xd = DequantizeLinear(xq, s, z)
            w = DequantizeLinear(wq, ws)
            c = Conv<group: int = 4, pads: ints = [1, 1, 1, 1]>(xd, w)
            cq = QuantizeLinear(c, s, z)
            y = DequantizeLinear(cq, s, z)
        }}""",
        {"s": np.array(0.05, np.float32), "z": np.array(128, np.uint8),
         "wq": np.ones((c_out, 1, 3, 3), np.int8), "ws": np.array(0.01, np.float32)},
    )  # fmt: skip


def test_int8_depthwise_and_grouped_convs_have_their_own_classes():
    nodes = analyze(qdq_depthwise(), hardware=MEASURED).nodes
    assert [n["kernel"] for n in nodes] == ["quantize", "fused", "fused", "int8_depthwise", "fused", "quantize"]
    # 4 × 64 outputs × 9 taps = 2,304 MACs at the int8 depthwise rate (68 GFLOP/s: slower than float's 149).
    conv = nodes[3]
    assert conv["flops"] == 4_608
    assert conv["latency_s"] == pytest.approx(0.28e-6 + 1.7e-6 + max(4_608 / 68e9, conv["bytes_moved"] / 134e9))
    float_conv = onnx.load_from_string(qdq_depthwise(3).SerializeToString())
    float_conv.graph.node[3].input[1] = "wf"
    float_conv.graph.initializer.append(onnx.numpy_helper.from_array(np.ones((12, 1, 3, 3), np.float32), "wf"))
    kernels = [n["kernel"] for n in analyze(float_conv, hardware=MEASURED).nodes]
    assert kernels[3] == "grouped_conv"  # a channel multiplier of 3: onnxruntime's generic grouped path


def test_qdq_add_fuses_only_when_both_inputs_share_a_type():
    def qadd(b_type: str, b_zero: np.ndarray) -> onnx.ModelProto:
        return model_from_text(
            f"""{HEADER}
            g (float[1,16] x) => (float[1,16] y) {{
                xq = QuantizeLinear(x, s, z)
                xd = DequantizeLinear(xq, s, z)
                bd = DequantizeLinear(bq, s, bz)
                a = Add(xd, bd)
                aq = QuantizeLinear(a, s, z)
                y = DequantizeLinear(aq, s, z)
            }}""",
            {"s": np.array(0.05, np.float32), "z": np.array(128, np.uint8), "bz": b_zero,
             "bq": np.ones((1, 16), b_type)},
        )  # fmt: skip

    same = [n["kernel"] for n in analyze(qadd("uint8", np.array(128, np.uint8)), hardware=MEASURED).nodes]
    assert same == ["quantize", "fused", "fused", "int8_elementwise", "fused", "quantize"]
    mixed = [n["kernel"] for n in analyze(qadd("int8", np.array(0, np.int8)), hardware=MEASURED).nodes]
    assert mixed == ["quantize", "quantize", "quantize", "other", "quantize", "quantize"]


# ---------------------------------------------------------------------------------------------- conv shape
def conv_model(channels: int, size: int, dims: int = 2, kernel: int = 3) -> onnx.ModelProto:
    """One 3×3 (or, with ``dims`` 1, length-3; ``kernel`` for another size) conv, channels → channels, padded,
    on size (× size)."""
    spatial = [size] * dims
    shape = ",".join(str(d) for d in [1, channels, *spatial])
    weight = np.full((channels, channels, *[kernel] * dims), 0.01, np.float32)
    return model_from_text(
        f"""{HEADER}
        g (float[{shape}] x) => (float[{shape}] y) {{
            y = Conv<pads: ints = {[kernel // 2] * 2 * dims}>(x, w)
        }}""",
        {"w": weight},
    )


def test_few_channels_on_a_large_map_cost_more_per_flop_than_many_on_a_small_one():
    """Measured here: 8 → 8 channels on 160 × 160 at 46 GFLOP/s, 128 → 128 on 14 × 14 at 225 (issue #16)."""
    few, many = (analyze(conv_model(c, s), hardware=MEASURED_GRID).nodes[0] for c, s in ((8, 160), (128, 14)))
    assert few["flops"] == 2 * 8 * 72 * 160 * 160 and many["flops"] == 2 * 128 * 1152 * 14 * 14
    # The conv's own time: the layout changes at the model's ends (``extra["reorder_s"]``) taken off.
    per_flop = [(n["latency_s"] - n["extra"].get("reorder_s", 0.0) - 0.28e-6 - 2.2e-6) / n["flops"]
                for n in (few, many)]
    # The grid's rates are per FLOP of the blocked channels (8 padded to the 16 of a block): twice the work.
    assert MEASURED_GRID.nchwc_block == 16
    assert per_flop[0] / per_flop[1] == pytest.approx(2 * 225 / 46, rel=1e-9)
    # One rate per class, as before the grids: the same per FLOP the kernel computes, 8 channels padded to 16.
    single = [analyze(conv_model(c, s), hardware=MEASURED).nodes[0] for c, s in ((8, 160), (128, 14))]
    assert [(n["latency_s"] - n["extra"].get("reorder_s", 0.0) - 0.28e-6 - 2.2e-6) / n["flops"] for n in single] == \
        pytest.approx([2 / 237e9, 1 / 237e9])


def test_a_1d_conv_is_a_class_of_its_own_and_older_profiles_cost_it_as_unblocked():
    """onnxruntime's NCHWc layout takes 2-D convs only: a 1-D conv runs as im2col + GEMM (measured 2-3 × slower
    than the dense rate says on silero_vad's shapes), but with a fixed cost well below a 2-D unblocked conv's
    (Silero's 1-D convs over 1-3 steps took 1-9 µs, the 2-D unblocked probe's fixed cost is 3.5 µs)."""
    node = analyze(conv_model(64, 32, dims=1), hardware=MEASURED).nodes[0]
    assert node["kernel"] == "conv1d"
    # MEASURED predates the class: unblocked_conv's figures, as it estimated before.
    assert node["latency_s"] == pytest.approx(0.28e-6 + 7.6e-6 + node["flops"] / 173e9, rel=1e-12)
    own = replace(MEASURED, kernels={**MEASURED.kernels, "conv1d": KernelFigures(120e9, 0.9e-6)})
    node = analyze(conv_model(64, 32, dims=1), hardware=own).nodes[0]
    assert node["latency_s"] == pytest.approx(0.28e-6 + 0.9e-6 + node["flops"] / 120e9, rel=1e-12)
    # Over 4 steps its GEMM's columns are padded to a strip of 16: 4 × the work it computes (a profile with
    # figures of its own measured them so), the older profile's estimate as it was.
    short = analyze(conv_model(64, 4, dims=1), hardware=own).nodes[0]
    assert short["latency_s"] == pytest.approx(0.28e-6 + 0.9e-6 + 4 * short["flops"] / 120e9, rel=1e-12)
    short = analyze(conv_model(64, 4, dims=1), hardware=MEASURED).nodes[0]
    assert short["latency_s"] == pytest.approx(0.28e-6 + 7.6e-6 + short["flops"] / 173e9, rel=1e-12)
    assert analyze(conv_model(64, 32), hardware=MEASURED).nodes[0]["kernel"] == "conv"
    # A 1-D 1×1 conv is a GEMM as before (pointwise), a 1-D grouped one the generic path.
    assert analyze(conv_model(64, 32, dims=1, kernel=1), hardware=MEASURED).nodes[0]["kernel"] == "pointwise"
