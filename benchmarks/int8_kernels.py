"""Micro-benchmark: onnxruntime CPU single layers in float vs QDQ int8, the basis of quantize's select=latency table.

Each case is one layer in a model of its own, built with onnx's helper: a dense 3x3 Conv, a pointwise (1x1)
Conv, a depthwise 3x3 Conv, a Gemm (a MatMul with a constant weight), and the elementwise Add and Mul that
int8 regions carry (QLinearAdd, QLinearMul); plus a lone QuantizeLinear (float -> uint8) and a lone
DequantizeLinear (uint8 -> float), the costs of a region's boundaries. The int8 variant of a layer is the
float model quantized by nnopt's own ``quantize`` pass with ``select=all`` (uint8 activations, per-channel int8
weights; onnxruntime fuses it into QLinearConv / QGemm / QLinearAdd ...), so it is
``Q(input) -> int8 kernel -> DQ(output)``; the kernel's own time is that minus the separately timed Q of its
input and DQ of its output.

Dense convs with fewer than 16 input channels (the stems of image models) are their own kind, timed as
parallel layers on one input (``NARROW_CASES``): their int8 time is fitted per output pixel and per MAC.
1-D 3-tap convs (``CONV1D_CASES``, audio encoders) are the kind ``dense_1d``: float fitted per MAC of the
output steps padded to onnxruntime's GEMM strips, int8 per MAC.

Timing: one onnxruntime session per variant (default options, as the benchmarks use, one intra-op thread
unless ``--threads``), all variants of a case interleaved in rounds, the median per variant over all runs,
each run timed in the calling thread's CPU time (``time.thread_time``), which other processes' load on a
shared machine does not inflate. The fitted table (per kind: fixed µs +
ns per MAC, float and int8; per boundary op: fixed µs + ns per element) is written to
docs/int8_kernels.json and as a table to docs/int8_kernels.md; ``passes/_int8_select.py`` commits the
constants with a reference to this output.

    python benchmarks/int8_kernels.py                 # all cases -> docs/int8_kernels.{json,md}
    python benchmarks/int8_kernels.py --runs 30 --rounds 7
    python benchmarks/int8_kernels.py --kinds dense_1d --runs 300 --rounds 9   # one kind again, into the same json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from nnopt.cost.layout import step_padding

ROOT = Path(__file__).resolve().parents[1]
#: Channels below which select=latency keeps a conv float whatever its size (``MIN_INT8_CHANNELS``).
MIN_CHANNELS = 16
#: A DequantizeLinear's ns per element (passes/_int8_select.py's region edge, from an earlier run).
BOUNDARY_NS_PER_ELEMENT = 0.12

#: (kind, channels, spatial) per conv case (channels in = out, so layers chain); spatial is H = W.
CONV_CASES = [
    *[("dense", c, s) for c, s in ((16, 28), (16, 56), (16, 104), (32, 14), (32, 28), (32, 104), (64, 14), (64, 28),
                                   (64, 52), (128, 7), (128, 26), (256, 13))],
    *[("pointwise", c, s) for c, s in ((8, 28), (16, 28), (16, 56), (24, 56), (32, 14), (32, 28), (64, 14),
                                       (96, 28), (128, 14), (128, 7), (256, 7))],
    *[("depthwise", c, s) for c, s in ((16, 12), (16, 56), (32, 28), (64, 14), (64, 28), (72, 56), (128, 14),
                                       (256, 7))],
]
#: (in channels, out channels, spatial, stride) per narrow dense 3x3 conv case (fewer than 16 input channels:
#: the stems of image models, 3 channels, and a Focus/space-to-depth stem's 12, as in ddddocr's detector, at
#: the sizes the real models run them). In and out channels differ, so these layers cannot chain: the case
#: is CHAIN parallel layers reading one input (one QuantizeLinear shared, as in a stem), each int8 output
#: with its own DequantizeLinear, which is taken off (``BOUNDARY_NS_PER_ELEMENT``).
NARROW_CASES = [(3, 16, 112, 1), (3, 16, 224, 2), (3, 32, 224, 2), (3, 24, 416, 2), (8, 8, 28, 1), (8, 8, 112, 1),
                (8, 16, 112, 1), (8, 32, 56, 1), (12, 12, 104, 1), (12, 24, 104, 1), (12, 24, 208, 1),
                (12, 32, 208, 1), (12, 48, 104, 1), (12, 64, 52, 1)]
#: (M, K = N) per Gemm case.
GEMM_CASES = [(1, 64), (1, 256), (1, 512), (1, 1024), (16, 256), (64, 512)]
#: (channels, steps) per 1-D dense conv case (3 taps, stride 1, channels in = out so layers chain): audio
#: models (Silero VAD's encoder) convolve a few time steps. onnxruntime's float 1-D conv is one GEMM whose
#: columns are the output steps, in strips of ``nnopt.cost.layout.GEMM_COLUMNS``; the float fit is per MAC of
#: the padded steps (``step_padding``), the int8 one (an NHWC GEMM, output steps as rows) per MAC as written.
CONV1D_CASES = [(64, 1), (128, 1), (64, 2), (128, 4), (256, 4), (64, 16), (128, 16), (128, 64), (64, 128)]
#: (C, spatial) per elementwise case (activations of [1, C, s, s]).
ELTWISE_CASES = [(16, 14), (32, 28), (64, 28), (16, 56), (64, 56)]
#: (channels, spatial, activation) per sandwich case: depthwise -> [act] -> pointwise -> [act] -> depthwise,
#: float vs the pointwise layer alone int8 (the MobileNet block select=latency meets).
SANDWICH_CASES = [(c, s, act) for c, s in ((16, 56), (32, 28), (64, 28), (64, 14), (128, 14), (256, 7))
                  for act in ("", "HardSwish")]
#: Layers per chain: the in-chain cost of a layer is (t(3 layers) - t(1 layer)) / 2, its region's boundary
#: cost is what remains of the 1-layer model once the layer and the float model's fixed session cost are off.
CHAIN = 3


def _conv_model(kind: str, c: int, s: int, layers: int, rng: np.random.Generator) -> onnx.ModelProto:
    """A chain of ``layers`` identical convs of ``kind`` on [1, c, s, s]."""
    k, group = (1, 1) if kind == "pointwise" else (3, 1)
    if kind == "depthwise":
        group = c
    nodes, arrays, names = [], [], []
    for i in range(layers):
        arrays += [rng.normal(0, 1.5 / np.sqrt(k * k * c // group), (c, c // group, k, k)).astype(np.float32),
                   rng.normal(0, 0.1, c).astype(np.float32)]
        names += [f"w{i}", f"b{i}"]
        src, dst = ("x" if i == 0 else f"t{i}"), ("y" if i == layers - 1 else f"t{i + 1}")
        nodes.append(helper.make_node("Conv", [src, f"w{i}", f"b{i}"], [dst], name=f"layer{i}", pads=[k // 2] * 4,
                                      group=group))
    return _model(nodes, {"x": [1, c, s, s]}, {"y": [1, c, s, s]}, arrays, names)


def _conv1d_model(c: int, steps: int, layers: int, rng: np.random.Generator) -> onnx.ModelProto:
    """A chain of ``layers`` 1-D 3-tap convs c -> c on [1, c, steps]."""
    nodes, arrays, names = [], [], []
    for i in range(layers):
        arrays += [rng.normal(0, 1.5 / np.sqrt(3 * c), (c, c, 3)).astype(np.float32),
                   rng.normal(0, 0.1, c).astype(np.float32)]
        names += [f"w{i}", f"b{i}"]
        src, dst = ("x" if i == 0 else f"t{i}"), ("y" if i == layers - 1 else f"t{i + 1}")
        nodes.append(helper.make_node("Conv", [src, f"w{i}", f"b{i}"], [dst], name=f"layer{i}", pads=[1, 1]))
    return _model(nodes, {"x": [1, c, steps]}, {"y": [1, c, steps]}, arrays, names)


def _narrow_model(cin: int, cout: int, s: int, stride: int, layers: int, rng: np.random.Generator) -> onnx.ModelProto:
    """``layers`` parallel 3x3 convs cin -> cout reading one input [1, cin, s, s], one output each."""
    nodes, arrays, names, out = [], [], [], (s - 1) // stride + 1
    for i in range(layers):
        arrays += [rng.normal(0, 1.5 / np.sqrt(9 * cin), (cout, cin, 3, 3)).astype(np.float32),
                   rng.normal(0, 0.1, cout).astype(np.float32)]
        names += [f"w{i}", f"b{i}"]
        nodes.append(helper.make_node("Conv", ["x", f"w{i}", f"b{i}"], [f"y{i}"], name=f"layer{i}", pads=[1] * 4,
                                      strides=[stride] * 2))
    return _model(nodes, {"x": [1, cin, s, s]}, {f"y{i}": [1, cout, out, out] for i in range(layers)}, arrays, names)


def _gemm_model(m: int, k: int, layers: int, rng: np.random.Generator) -> onnx.ModelProto:
    nodes, arrays, names = [], [], []
    for i in range(layers):
        arrays += [rng.normal(0, 1 / np.sqrt(k), (k, k)).astype(np.float32), rng.normal(0, 0.1, k).astype(np.float32)]
        names += [f"w{i}", f"b{i}"]
        src, dst = ("x" if i == 0 else f"t{i}"), ("y" if i == layers - 1 else f"t{i + 1}")
        nodes.append(helper.make_node("Gemm", [src, f"w{i}", f"b{i}"], [dst], name=f"layer{i}"))
    return _model(nodes, {"x": [m, k]}, {"y": [m, k]}, arrays, names)


def _sandwich_model(c: int, s: int, act: str, rng: np.random.Generator) -> onnx.ModelProto:
    shapes = {"dw0": (c, 1, 3, 3), "pw": (c, c, 1, 1), "dw1": (c, 1, 3, 3)}
    arrays = [rng.normal(0, 0.5, shape).astype(np.float32) for shape in shapes.values()]
    nodes, src = [], "x"
    for i, name in enumerate(shapes):
        dst = "y" if i == 2 else f"{name}_out"
        kw = {"group": c, "pads": [1] * 4} if name.startswith("dw") else {}
        nodes.append(helper.make_node("Conv", [src, f"w_{name}"], [dst], name=name, **kw))
        src = dst
        if act and i < 2:
            nodes.append(helper.make_node(act, [src], [f"{name}_act"], name=f"{name}_{act}"))
            src = f"{name}_act"
    return _model(nodes, {"x": [1, c, s, s]}, {"y": [1, c, s, s]}, arrays, [f"w_{k}" for k in shapes], opset=14)


def _eltwise_model(op: str, c: int, s: int, layers: int) -> onnx.ModelProto:
    nodes = []
    for i in range(layers):
        src, dst = ("x" if i == 0 else f"t{i}"), ("y" if i == layers - 1 else f"t{i + 1}")
        nodes.append(helper.make_node(op, [src, "z"], [dst], name=f"layer{i}"))
    return _model(nodes, {"x": [1, c, s, s], "z": [1, c, s, s]}, {"y": [1, c, s, s]}, [], [])


def _model(nodes: list[onnx.NodeProto], inputs: dict[str, list[int]], outputs: dict[str, list[int]],
           arrays: list[np.ndarray], names: list[str], opset: int = 13) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "case", [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in inputs.items()],
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in outputs.items()],
        [numpy_helper.from_array(a, n) for a, n in zip(arrays, names)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _quantized(proto: onnx.ModelProto, rng: np.random.Generator) -> onnx.ModelProto:
    """``proto`` through nnopt's quantize pass (select=all: every layer int8), calibrated on random inputs."""
    from nnopt.ir.model import Model
    from nnopt.passes.quantize import Quantize, QuantizeOptions
    from nnopt.pipeline.base import PassContext

    samples = [_feeds(proto, rng) for _ in range(4)]
    model = Model.from_proto(proto)
    opts = QuantizeOptions.create("quantize", bias_correction="off", select="all")
    Quantize(opts).run(model, PassContext(samples=samples))
    return model.to_proto()


def _only_int8(proto: onnx.ModelProto, nodes: list[str], rng: np.random.Generator) -> onnx.ModelProto:
    """``proto`` with only ``nodes`` int8 (QDQ placed as select=latency places it: the others read the
    DequantizeLinear of an int8 neighbour, as ops without an int8 kernel do)."""
    from nnopt.passes import _qdq

    samples = [_feeds(proto, rng) for _ in range(4)]
    ranges = _qdq.calibrate(proto, samples, "minmax", ("Conv",))
    return _qdq.place_qdq(proto, ranges, per_channel=True, activation_type="uint8", nodes_to_quantize=nodes,
                          nodes_to_exclude=[], op_types=("Conv",))


def _feeds(proto: onnx.ModelProto, rng: np.random.Generator) -> dict[str, np.ndarray]:
    feeds = {}
    for i in proto.graph.input:
        shape = [d.dim_value for d in i.type.tensor_type.shape.dim]
        if i.type.tensor_type.elem_type == TensorProto.UINT8:
            feeds[i.name] = rng.integers(0, 256, shape).astype(np.uint8)
        else:
            feeds[i.name] = rng.normal(0, 1, shape).astype(np.float32)
    return feeds


#: onnxruntime intra-op threads (0: its default, one per core); set by --threads. With one thread the
#: runs are timed in the calling thread's CPU time, which other processes' load does not inflate.
THREADS = [1]


def _session(proto: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.intra_op_num_threads = THREADS[0]
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def time_interleaved(protos: dict[str, onnx.ModelProto], runs: int, rounds: int, seed: int = 0,
                     inputs: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """Median µs per variant, the variants' runs interleaved in ``rounds`` rounds of ``runs`` runs each
    (on ``inputs`` when given, else on seeded random inputs of each model's static shapes).

    With one intra-op thread (``THREADS``, the default) a run is timed in the calling thread's CPU time
    (``time.thread_time``: onnxruntime runs a one-thread session's kernels in it), else in wall time.
    """
    clock = time.thread_time if THREADS[0] == 1 else time.perf_counter
    rng = np.random.default_rng(seed)
    sessions = {k: _session(p) for k, p in protos.items()}
    feeds = {k: inputs if inputs is not None else _feeds(p, rng) for k, p in protos.items()}
    times: dict[str, list[float]] = {k: [] for k in protos}
    for k, sess in sessions.items():
        for _ in range(5):
            sess.run(None, feeds[k])
    for _ in range(rounds):
        for k, sess in sessions.items():
            for _ in range(runs):
                start = clock()
                sess.run(None, feeds[k])
                times[k].append(clock() - start)
    return {k: float(np.median(v)) * 1e6 for k, v in times.items()}


def _fit(xs: list[float], ys: list[float], relative: bool = False) -> tuple[float, float]:
    """(fixed µs, µs per unit) by least squares, the fixed part clamped at >= 0; ``relative`` minimises
    relative errors (so small layers, where the decisions are close, are fitted as well as large ones)."""
    x, y = np.asarray(xs, float), np.asarray(ys, float)
    w = 1.0 / np.maximum(np.abs(y), 0.5) if relative else np.ones_like(y)
    slope, fixed = np.polyfit(x, y, 1, w=w)
    if fixed < 0:  # refit through the origin: a negative fixed cost is noise
        slope, fixed = float(np.dot(w * w * x, y) / np.dot(w * w * x, x)), 0.0
    return float(fixed), float(slope)


def _fit2(x1: list[float], x2: list[float], ys: list[float]) -> tuple[float, float, float]:
    """(fixed µs, µs per unit of x1, µs per unit of x2) minimising relative errors, each clamped at >= 0
    (a negative term is refitted without it)."""
    y = np.asarray(ys, float)
    w = 1.0 / np.maximum(np.abs(y), 0.5)
    cols = [np.ones_like(y), np.asarray(x1, float), np.asarray(x2, float)]
    keep = [0, 1, 2]
    while True:
        a = np.stack([cols[i] for i in keep], axis=1) * w[:, None]
        coef = np.linalg.lstsq(a, y * w, rcond=None)[0]
        if (coef >= 0).all() or len(keep) == 1:
            break
        keep.pop(int(np.argmin(coef)))
    out = [0.0, 0.0, 0.0]
    for i, c in zip(keep, coef):
        out[i] = max(float(c), 0.0)
    return out[0], out[1], out[2]


def _cases(rng: np.random.Generator) -> list[tuple[str, dict[str, Any], Any, int]]:
    """(kind, shape figures, builder (layers -> float model), elements crossing a region boundary) per case."""
    specs: list[tuple[str, dict[str, Any], Any, int]] = []
    for kind, c, s in CONV_CASES:
        k = 1 if kind == "pointwise" else 3
        macs = c * s * s * k * k * (1 if kind == "depthwise" else c)
        specs.append((kind, {"channels": c, "spatial": s, "macs": macs},
                      lambda n, kind=kind, c=c, s=s: _conv_model(kind, c, s, n, rng), 2 * c * s * s))
    for cin, cout, s, stride in NARROW_CASES:
        out = (s - 1) // stride + 1
        specs.append(("dense_narrow", {"channels": cin, "out_channels": cout, "spatial": s, "stride": stride,
                                       "macs": cout * cin * 9 * out * out, "pixels": out * out},
                      lambda n, a=cin, b=cout, s=s, st=stride: _narrow_model(a, b, s, st, n, rng),
                      cin * s * s + cout * out * out))
    for c, steps in CONV1D_CASES:
        macs = c * c * 3 * steps
        specs.append(("dense_1d", {"channels": c, "steps": steps, "macs": macs,
                                   "padded_macs": round(macs * step_padding(steps))},
                      lambda n, c=c, steps=steps: _conv1d_model(c, steps, n, rng), 2 * c * steps))
    for m, k in GEMM_CASES:
        specs.append(("gemm", {"m": m, "k": k, "macs": m * k * k}, lambda n, m=m, k=k: _gemm_model(m, k, n, rng),
                      2 * m * k))
    for op in ("Add", "Mul"):
        for c, s in ELTWISE_CASES:
            specs.append((op.lower(), {"channels": c, "spatial": s, "macs": c * s * s},
                          lambda n, op=op, c=c, s=s: _eltwise_model(op, c, s, n), 3 * c * s * s))
    return specs


def run(runs: int, rounds: int, kinds: set[str] | None = None) -> dict[str, Any]:
    """Every case (of ``kinds`` only, when given; then without the sandwiches) timed, and the table fitted."""
    rng = np.random.default_rng(0)
    cases: list[dict[str, Any]] = []
    for kind, shape, build, crossing in _cases(rng):
        if kinds is not None and kind not in kinds:
            continue
        protos = {"float1": build(1), f"float{CHAIN}": build(CHAIN)}
        protos.update({"int8_1": _quantized(protos["float1"], rng), f"int8_{CHAIN}": _quantized(protos[f"float{CHAIN}"], rng)})
        t = time_interleaved(protos, runs, rounds)
        f_layer = (t[f"float{CHAIN}"] - t["float1"]) / (CHAIN - 1)
        i_layer = (t[f"int8_{CHAIN}"] - t["int8_1"]) / (CHAIN - 1)
        if kind == "dense_narrow":  # parallel layers: each added one brings its output's DequantizeLinear
            i_layer -= BOUNDARY_NS_PER_ELEMENT * shape["out_channels"] * shape["pixels"] * 1e-3
        boundary = (t["int8_1"] - i_layer) - (t["float1"] - f_layer)
        case = {"kind": kind, **shape, "float_us": f_layer, "int8_us": i_layer, "ratio": i_layer / f_layer,
                "boundary_us": boundary, "boundary_elements": crossing, "float1_us": t["float1"],
                "int8_1_us": t["int8_1"]}
        cases.append(case)
        print(f"{kind} {shape}: layer float {f_layer:.1f} µs, int8 {i_layer:.1f} µs (x{case['ratio']:.2f}); "
              f"1-layer models float {t['float1']:.1f} int8 {t['int8_1']:.1f}; boundary {boundary:.1f} µs", flush=True)
    if kinds is not None:  # the caller fits them with the other kinds' cases
        return {"cases": cases}
    sandwiches = _sandwiches(runs, rounds, rng)
    return {"onnxruntime": ort.__version__, "threads": THREADS[0], "runs": runs, "rounds": rounds, "chain": CHAIN,
            "cases": cases, "sandwiches": sandwiches, "fits": fit_all(cases, sandwiches)}


def fit_all(cases: list[dict[str, Any]], sandwiches: list[dict[str, Any]]) -> dict[str, Any]:
    """The table: per kind, float and int8 time as fixed µs + ns per MAC (least squares), the
    1-layer region edge, and the sandwiches' edge and unfused-activation costs."""
    fits: dict[str, Any] = {}
    for kind in dict.fromkeys(c["kind"] for c in cases):
        # Narrow convs with fewer than 16 output channels are kept float by select=latency's gate (measured
        # x0.99-x1.24): the fit is of the others.
        rows = [c for c in cases if c["kind"] == kind and c.get("out_channels", MIN_CHANNELS) >= MIN_CHANNELS]
        # NOTE: dense convs and Gemm are fitted on relative errors: their cases span 2-4 decades of MACs,
        # and ordinary least squares gives the large ones all the weight (dense int8 came out 11.3 µs fixed,
        # which kept every dense conv under ~0.7 MMAC float; Gemm a 15 µs fixed float cost where the
        # smallest measured 0.5 µs). Pointwise, Add and Mul keep ordinary least squares: on relative errors
        # their fixed costs move by fractions of a µs, which flipped ppocr_cls's small residual blocks to
        # float (29 layers fewer int8: measured x0.916 float instead of x0.889, interleaved).
        relative = kind not in ("pointwise", "add", "mul")
        # A 1-D conv's float GEMM computes its steps padded to whole column strips.
        f_work = "padded_macs" if kind == "dense_1d" else "macs"
        f_fit = _fit([c[f_work] for c in rows], [c["float_us"] for c in rows], relative)
        i_fit = _fit([c["macs"] for c in rows], [c["int8_us"] for c in rows], relative)
        b_fit = _fit([c["boundary_elements"] for c in rows], [c["boundary_us"] for c in rows])
        fits[kind] = {"float_fixed_us": f_fit[0], "float_ns_per_mac": f_fit[1] * 1e3,
                      "int8_fixed_us": i_fit[0], "int8_ns_per_mac": i_fit[1] * 1e3, "int8_ns_per_pixel": 0.0,
                      "boundary_fixed_us": b_fit[0], "boundary_ns_per_element": b_fit[1] * 1e3,
                      "median_ratio": float(np.median([c["ratio"] for c in rows]))}
        if kind == "dense_narrow":
            # NOTE: onnxruntime's int8 conv with few input channels pays per output pixel (its NHWC
            # reorder and im2col), whatever the output channels: 12 -> 12 channels at 208x208 measured x1.05,
            # 12 -> 24 x0.40. One rate per MAC cannot say both; a second term per output pixel can.
            fixed, per_pixel, per_mac = _fit2([c["pixels"] for c in rows], [c["macs"] for c in rows],
                                              [c["int8_us"] for c in rows])
            fits[kind].update(int8_fixed_us=fixed, int8_ns_per_pixel=per_pixel * 1e3, int8_ns_per_mac=per_mac * 1e3)
    fits.update(_edge_fits(sandwiches, fits["pointwise"]))
    return fits


def _sandwiches(runs: int, rounds: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Float vs pointwise-only-int8 times of each sandwich case."""
    rows = []
    for c, s, act in SANDWICH_CASES:
        proto = _sandwich_model(c, s, act, rng)
        t = time_interleaved({"float": proto, "mixed": _only_int8(proto, ["pw"], rng)}, runs, rounds)
        rows.append({"channels": c, "spatial": s, "activation": act, "elements": c * s * s, "macs": c * c * s * s,
                     "float_us": t["float"], "mixed_us": t["mixed"]})
        print(f"sandwich {c}x{s}x{s} {act or '-'}: float {t['float']:.1f} µs, pointwise int8 {t['mixed']:.1f} µs",
              flush=True)
    return rows


def _edge_fits(rows: list[dict[str, Any]], pointwise: dict[str, float]) -> dict[str, Any]:
    """Region edge cost per crossing tensor, and the cost of an activation left unfused, from the sandwiches.

    mixed - float = (int8 pointwise - float pointwise) + 2 edges (+ 1 activation that can no longer fuse
    into the float Conv producing it, when the block has them).
    """
    def kernel_gain(r: dict[str, Any]) -> float:
        f = pointwise["float_fixed_us"] + pointwise["float_ns_per_mac"] * r["macs"] * 1e-3
        i = pointwise["int8_fixed_us"] + pointwise["int8_ns_per_mac"] * r["macs"] * 1e-3
        return f - i

    plain = [r for r in rows if not r["activation"]]
    edge = _fit([r["elements"] for r in plain], [(r["mixed_us"] - r["float_us"] + kernel_gain(r)) / 2 for r in plain])
    acts = [r for r in rows if r["activation"]]
    extra = [r["mixed_us"] - r["float_us"] + kernel_gain(r) - 2 * (edge[0] + edge[1] * r["elements"]) for r in acts]
    act = _fit([r["elements"] for r in acts], extra)
    return {"edge": {"fixed_us": edge[0], "ns_per_element": edge[1] * 1e3},
            "unfused_activation": {"fixed_us": act[0], "ns_per_element": act[1] * 1e3}}


def render(result: dict[str, Any]) -> str:
    lines = [f"onnxruntime {result['onnxruntime']}, {result['threads'] or 'default'} intra-op thread(s), {result['runs']} runs x {result['rounds']} interleaved rounds, "
             f"medians. Layer = (t({result['chain']} chained layers) - t(1 layer)) / {result['chain'] - 1}; boundary = "
             "the int8 1-layer model's time beyond its layer and beyond the float model's fixed cost (the region's "
             "QuantizeLinear in, DequantizeLinear out, and onnxruntime's NCHW<->NHWC reorders for int8 convs).", "",
             "| kind | shape | MACs | float µs | int8 µs | int8 / float | boundary µs | boundary elements |",
             "|---" * 8 + "|"]
    for c in result["cases"]:
        shape = " ".join(f"{k}={v}" for k, v in c.items() if k in ("channels", "out_channels", "spatial", "steps",
                                                                   "stride", "m", "k"))
        lines.append(f"| {c['kind']} | {shape} | {c['macs']:,} | {c['float_us']:.1f} | {c['int8_us']:.1f} | "
                     f"{c['ratio']:.2f} | {c['boundary_us']:.1f} | {c['boundary_elements']:,} |")
    for kind, when in result.get("remeasured", {}).items():
        lines.append(f"\n{kind}: measured again on its own ({when}); the other kinds' figures as above.")
    lines += ["", "Sandwiches (depthwise -> [act] -> pointwise -> [act] -> depthwise; only the pointwise int8):", "",
              "| channels | spatial | activation | float µs | pointwise int8 µs | ratio |", "|---" * 6 + "|"]
    for r in result["sandwiches"]:
        lines.append(f"| {r['channels']} | {r['spatial']} | {r['activation'] or '-'} | {r['float_us']:.1f} | "
                     f"{r['mixed_us']:.1f} | {r['mixed_us'] / r['float_us']:.2f} |")
    for k in ("edge", "unfused_activation"):
        f = result["fits"][k]
        lines.append(f"\n{k}: {f['fixed_us']:.2f} µs + {f['ns_per_element']:.3f} ns per element")
    lines += ["", "| kind | float fixed µs | float ns/MAC | int8 fixed µs | int8 ns/MAC | int8 ns/output pixel | "
              "median int8/float | boundary fixed µs | boundary ns/element |", "|---" * 9 + "|"]
    for k, f in result["fits"].items():
        if "float_fixed_us" not in f:
            continue
        lines.append(f"| {k} | {f['float_fixed_us']:.2f} | {f['float_ns_per_mac']:.4f} | {f['int8_fixed_us']:.2f} | "
                     f"{f['int8_ns_per_mac']:.4f} | {f.get('int8_ns_per_pixel', 0.0):.2f} | {f['median_ratio']:.2f} | {f['boundary_fixed_us']:.2f} | "
                     f"{f['boundary_ns_per_element']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="onnxruntime intra-op threads (0: its default; 1 keeps a shared machine's load out)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "int8_kernels"))
    parser.add_argument("--kinds", nargs="+", default=None, metavar="KIND",
                        help="time only these kinds' cases (e.g. dense_1d) and put them into OUT.json's results in "
                             "place of that kind's old ones (the other kinds' measurements are kept), then refit")
    parser.add_argument("--refit", action="store_true",
                        help="fit the table again from the measurements in OUT.json (no timing)")
    args = parser.parse_args(argv)
    THREADS[0] = args.threads
    if args.refit:
        result = json.loads(Path(args.out + ".json").read_text())
        result["fits"] = fit_all(result["cases"], result["sandwiches"])
        args.threads, args.runs, args.rounds = result["threads"], result["runs"], result["rounds"]
    elif args.kinds:
        result = json.loads(Path(args.out + ".json").read_text())
        fresh = run(args.runs, args.rounds, set(args.kinds))
        result["cases"] = [c for c in result["cases"] if c["kind"] not in args.kinds] + fresh["cases"]
        result.setdefault("remeasured", {}).update(
            {k: f"{time.strftime('%Y-%m-%d')}, --runs {args.runs} --rounds {args.rounds}" for k in args.kinds})
        result["fits"] = fit_all(result["cases"], result["sandwiches"])
        args.threads, args.runs, args.rounds = result["threads"], result["runs"], result["rounds"]
    else:
        result = run(args.runs, args.rounds)
        result["date"] = time.strftime("%Y-%m-%d")
    result.setdefault("date", time.strftime("%Y-%m-%d"))  # of the run whose --runs/--rounds the header gives
    Path(args.out + ".json").write_text(json.dumps(result, indent=1))
    header = ("# int8 kernels vs float in onnxruntime (CPU)\n\nGenerated by `python benchmarks/int8_kernels.py "
              f"--threads {args.threads} --runs {args.runs} --rounds {args.rounds}` ({result['date']}); "
              "the constants of passes/_int8_select.py come from this output (docs/quantize.md, "
              "\"Latency-aware selection\").\n\n")
    Path(args.out + ".md").write_text(header + render(result))
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
