"""quantize's select=latency: which layers int8 makes faster in onnxruntime (CPU), from a measured kernel table."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper

from nnopt.cost.hardware import HardwareProfile, shipped_profile
from nnopt.cost.layout import step_padding
from nnopt.passes import _qdq
from nnopt.pipeline.base import LayerDecision
from nnopt.runtime import RunTimeLimitExceeded


@dataclass(frozen=True)
class Rate:
    """Time of one layer kind in onnxruntime, float and int8: a fixed µs plus ns per unit of work (MACs for
    Conv/Gemm/MatMul, output elements for elementwise ops), plus, int8 only, ns per output pixel (the
    NHWC reorder and im2col of a conv with few input channels, which its MACs do not track)."""

    float_fixed_us: float
    float_ns: float
    int8_fixed_us: float
    int8_ns: float
    int8_ns_per_pixel: float = 0.0

    def float_us(self, work: float) -> float:
        return self.float_fixed_us + self.float_ns * work * 1e-3

    def int8_us(self, work: float, pixels: float = 0.0) -> float:
        return self.int8_fixed_us + (self.int8_ns * work + self.int8_ns_per_pixel * pixels) * 1e-3


@dataclass(frozen=True)
class KernelTable:
    """select=latency's built-in times at one onnxruntime intra-op thread count: a ``Rate`` per kind of layer,
    and the cost of one tensor crossing a region's edge (a QuantizeLinear in or a DequantizeLinear out, with
    onnxruntime's NCHW <-> NHWC transposes around int8 convs; more when a float Conv is on the other side:
    onnxruntime's float convs run in its blocked NCHWc layout, and each int8 island adds a reorder out of and
    back into it), and of an activation that no longer fuses into the float Conv before it."""

    threads: int
    kernels: Mapping[str, Rate]
    boundary_fixed_us: float
    boundary_ns_per_element: float
    conv_edge_fixed_us: float
    conv_edge_ns_per_element: float
    unfused_ns_per_element: float

    def boundary_us(self, elements: float, conv_side: bool = False) -> float:
        """Predicted µs of one QuantizeLinear or DequantizeLinear at a region's edge over ``elements`` values
        (``conv_side``: a float Conv on the edge's other side)."""
        if conv_side:
            return self.conv_edge_fixed_us + self.conv_edge_ns_per_element * elements * 1e-3
        return self.boundary_fixed_us + self.boundary_ns_per_element * elements * 1e-3


# NOTE: measured by benchmarks/int8_kernels.py --threads 1 (onnxruntime 1.32, the project's 2-core x86
# benchmark machine, shared; one intra-op thread, timed in the calling thread's CPU time, keeps other
# processes' load out of the figures; output in docs/int8_kernels.md, summarised in docs/quantize.md
# "Latency-aware selection"): per kind, fits of the in-chain time of one layer ((t(3 chained layers) -
# t(1 layer)) / 2, interleaved medians) as fixed µs + ns per MAC (convs and Gemm on relative errors, Add and
# Mul by ordinary least squares; narrow convs' int8 time also per output pixel). Measured
# int8/float ratios: dense 3x3 conv 0.26-0.47, with 3-12 input channels ("dense_narrow", the stems) 0.33-0.66
# from 8 input and 16 output channels on, x1.40-x2.56 with 3 input channels, pointwise 0.30-0.73 (0.90 with 8),
# depthwise 1.15-3.56 (never faster), Gemm 0.30-0.69 (x1.89 at 64x64), Add 0.83-1.01, Mul 1.17-1.53.
# The pointwise rate and the region-edge constants below are the previous run's (same cases, wall time):
# this run's fits of them (pointwise 4.40 + 0.0171 / 3.76 + 0.0048; edge beside a float conv 0.347 ns per
# element) differ by fractions of a µs, which flipped small layers of ppocr_rec and ppocr_det whose
# measured times were better as they were (ppocr_rec x0.579 float instead of x0.564, interleaved).
# Region edges: fitted on the 1-layer int8 models' time beyond their layer and beyond the float model's
# fixed cost (dense conv 0.135, Add/Mul 0.11 ns per element); beside a float conv, on the sandwich cases
# (depthwise -> pointwise -> depthwise, float vs pointwise int8: x0.58-x1.38); the unfused activation on
# sandwiches with HardSwish vs without. 1-D 3-tap convs ("dense_1d", audio models' encoders) were measured
# on their own later (``--kinds dense_1d``, same method): float per MAC of the output steps padded to 16
# (onnxruntime's GEMM column strips: 2-16 steps take as long as 16), int8/float 0.09-0.55 on 1-128 steps,
# where the 2-D dense rates put the float side 1.6-16x too low (Silero VAD 16k's encoder was kept float:
# quantize's output x0.88 float; with it int8 x0.66, docs/quantize_vs_ort.md).
ONE_THREAD = KernelTable(
    threads=1,
    kernels={
        "dense": Rate(1.00, 0.0172, 3.67, 0.0049),
        "dense_narrow": Rate(0.0, 0.0230, 0.0, 0.0026, 18.87),
        "pointwise": Rate(3.70, 0.0178, 3.75, 0.0048),  # the previous run's (see the NOTE)
        "depthwise": Rate(0.70, 0.0311, 1.07, 0.0556),
        "dense_1d": Rate(0.53, 0.0065, 0.83, 0.0021),  # float per MAC of the padded steps (step_padding)
        "gemm": Rate(0.57, 0.0228, 1.33, 0.0066),
        "add": Rate(1.15, 0.1395, 0.39, 0.1385),
        "mul": Rate(1.10, 0.1393, 0.51, 0.2132),
    },
    boundary_fixed_us=1.5, boundary_ns_per_element=0.12,
    conv_edge_fixed_us=0.86, conv_edge_ns_per_element=0.292,
    unfused_ns_per_element=0.174,
)
#: The one-thread table's rates (the kinds of layer select=latency knows).
KERNELS = ONE_THREAD.kernels
#: The built-in rates for several intra-op threads: a profile ``nnopt calibrate --threads 2`` measured on the
#: machine the one-thread table comes from (its chained-layer micro-benchmark is too noisy in wall time with
#: a thread pool to fit a table: ``benchmarks/int8_kernels.py --threads 2`` gave layers faster than the
#: machine's peak). Shipped with the package (``nnopt/cost/profiles``).
THREADED_PROFILE = "onnxruntime-cpu-2-threads"


#: Activations onnxruntime fuses into the float Conv before them; after an int8 layer they run on their own
#: (``KernelTable.unfused_ns_per_element``).
FUSED_ACTIVATIONS = frozenset({"Relu", "Clip", "HardSwish", "HardSigmoid", "LeakyRelu", "Sigmoid", "Tanh"})
#: onnxruntime (WeightBiasQuantization, 1.20+) quantizes the float weight of any Conv, ConvTranspose or Gemm
#: whose input comes straight from a DequantizeLinear: per tensor, so a layer left float would become an int8
#: layer with per-tensor weights (or a float one dequantizing its weight at every run). A set of int8 layers
#: that would feed one of these ops, left float, through a DequantizeLinear is never chosen (this penalty).
AUTO_QUANTIZED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm"})
_FORBIDDEN_US = 1e6
#: Below this many input channels a pointwise Conv's int8 kernel is no faster than float (measured: 8
#: channels x0.85-x1.64 with 1 or 2 threads), and below this many output channels a dense one with few input
#: channels is not (8 -> 8 x1.23, 12 -> 12 x0.99), whatever their size. Dense convs with fewer input
#: channels and at least this many output channels are the "dense_narrow" kind, timed by the table.
MIN_INT8_CHANNELS = 16
#: Moves of the search must save more than this (µs): it ends, and ties never flip-flop.
_EPS_US = 1e-3
_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)
_MAX_SWEEPS = 20

#: Ops onnxruntime's QDQ quantizer makes int8 only when their input already is (data movement, and the
#: activations it absorbs into the producer's QuantizeLinear): they never start a region.
FOLLOWERS = frozenset({"Relu", "Clip", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Resize",
                       "MaxPool", "AveragePool", "Slice", "Pad", "Split"})
#: Op type -> kind of ``KERNELS`` (Conv is dense, pointwise or depthwise by its attributes).
_KIND = {"Gemm": "gemm", "MatMul": "gemm", "ConvTranspose": "dense", "Add": "add", "Mul": "mul"}

#: Per kind of ``KERNELS``: the cost model's kernel class of its float and of its int8 form
#: (``nnopt.cost.hardware.KERNEL_CLASSES``; "other" runs at the profile's peak rate), and FLOPs per unit of work.
_PROFILE_CLASSES: dict[str, tuple[str, str, float]] = {
    "dense": ("conv", "int8", 2.0), "dense_narrow": ("conv", "int8", 2.0), "pointwise": ("pointwise", "int8_pointwise", 2.0),
    "depthwise": ("depthwise", "int8_depthwise", 2.0), "gemm": ("conv", "int8_matmul", 2.0),
    "dense_1d": ("conv1d", "int8", 2.0),
    "add": ("other", "int8_elementwise", 1.0), "mul": ("other", "int8_elementwise", 1.0),
}  # fmt: skip
#: The kernel classes a profile must measure for select=latency to take its times from it.
INT8_CLASSES = ("conv", "pointwise", "depthwise", "int8", "int8_depthwise", "int8_matmul", "int8_elementwise",
                "quantize")


@dataclass(frozen=True)
class TableRates:
    """select=latency's built-in rate set: the ``ONE_THREAD`` table measured on one machine by
    benchmarks/int8_kernels.py. Its ``name`` is what the pass's stats report as ``select_profile``.

    Every time is in µs: ``layer_us`` of one layer of a kind (``work``: MACs or elements; ``pixels``: output
    pixels of a conv; ``elements``: values its activations and weights hold; ``output_shape``: of its first
    output, for rates that depend on the shape), ``boundary_us`` of one region
    edge over ``elements`` values (``conv_side``: a float Conv beyond it), ``unfused_us`` of an activation that
    no longer fuses into the float Conv before it.
    """

    name: str = "int8-kernels-table"

    @property
    def threads(self) -> int | None:
        """The onnxruntime intra-op threads the times are for (None: onnxruntime's default)."""
        return ONE_THREAD.threads

    def layer_us(self, kind: str, work: float, pixels: float, elements: float,
                 output_shape: Sequence[int] | None = None) -> tuple[float, float]:
        rate = ONE_THREAD.kernels[kind]
        return rate.float_us(work * _float_padding(kind, output_shape)), rate.int8_us(work, pixels)

    def boundary_us(self, elements: float, conv_side: bool = False) -> float:
        return ONE_THREAD.boundary_us(elements, conv_side)

    def unfused_us(self, elements: float) -> float:
        return ONE_THREAD.unfused_ns_per_element * elements * 1e-3


@dataclass(frozen=True)
class ProfileRates(TableRates):
    """The same times from a calibrated hardware profile (``nnopt calibrate`` for onnxruntime: it measures
    ``INT8_CLASSES``), through ``HardwareProfile.node_latency`` as the latency estimate computes them, so the
    selection and the estimate tell the same story (rates interpolated in the classes' grids by the layer's
    output shape, as the estimate does). Convs with few input channels take their times from the profile
    only when it measured them (its ``int8`` grid, from ``nnopt calibrate``'s narrow probes), else from the
    table, as do 1-D convs when it has no ``conv1d`` class; onnxruntime's NCHWc reorder at a region edge
    beside a float Conv (beyond the edge's QuantizeLinear/DequantizeLinear) always comes from the table."""

    profile: HardwareProfile | None = None

    def layer_us(self, kind: str, work: float, pixels: float, elements: float,
                 output_shape: Sequence[int] | None = None) -> tuple[float, float]:
        if (kind not in _PROFILE_CLASSES or self.profile is None or (kind == "dense_narrow" and not self.narrow)
                or (kind == "dense_1d" and "conv1d" not in self.profile.kernels)):
            return super().layer_us(kind, work, pixels, elements, output_shape)
        float_class, int8_class, flops_per_unit = _PROFILE_CLASSES[kind]
        flops = flops_per_unit * work
        float_s = self.profile.node_latency(float_class, flops, 4.0 * elements, output_shape=output_shape,
                                            padding=_float_padding(kind, output_shape))[0]
        int8_s = self.profile.node_latency(int8_class, flops, elements, output_shape=output_shape)[0]
        return float_s * 1e6, int8_s * 1e6

    @property
    def threads(self) -> int | None:
        return self.profile.threads if self.profile is not None else 1

    @property
    def narrow(self) -> bool:
        """Whether the profile measured int8 convs with few input channels (grid points of a reduction below
        ``MIN_INT8_CHANNELS`` 3×3 taps): a profile from before the narrow probes has none."""
        int8 = self.profile.kernels.get("int8") if self.profile is not None else None
        return int8 is not None and any(p.reduction < MIN_INT8_CHANNELS * 9 for p in int8.grid)

    def boundary_us(self, elements: float, conv_side: bool = False) -> float:
        if self.profile is None:
            return super().boundary_us(elements, conv_side)
        # One float and one int8 value per element; a reorder when a float Conv is beyond (table).
        edge = self.profile.node_latency("quantize", elements, 5.0 * elements)[0] * 1e6
        reorder = ONE_THREAD.boundary_us(elements, True) - ONE_THREAD.boundary_us(elements) if conv_side else 0.0
        return edge + max(reorder, 0.0)

    def unfused_us(self, elements: float) -> float:
        if self.profile is None:
            return super().unfused_us(elements)
        return self.profile.node_latency("other", elements, 8.0 * elements)[0] * 1e6


def rates_for(hardware: HardwareProfile | None, threads: int = 1) -> TableRates:
    """The rate set select=latency decides with: the run's hardware profile (``--hardware``) when it is a
    calibrated one for onnxruntime (runtime "onnxruntime", every class of ``INT8_CLASSES`` measured; its own
    thread count wins), else the built-in rates for ``threads`` intra-op threads: the one-thread table, or
    for more threads the shipped ``THREADED_PROFILE``."""
    if hardware is not None and hardware.runtime == "onnxruntime" and set(INT8_CLASSES) <= set(hardware.kernels):
        return ProfileRates(name=hardware.name, profile=hardware)
    if threads > 1:
        profile = shipped_profile(THREADED_PROFILE)
        return ProfileRates(name=profile.name, profile=profile)
    return TableRates()


@dataclass
class _Layer:
    """A candidate node as the cost model sees it."""

    node: onnx.NodeProto
    kind: str  # a key of KERNELS, or "other" (timed the same in float and int8)
    work: float  # MACs or elements; nan when a shape is unknown
    float_us: float
    int8_us: float
    gate: str = ""  # why it is float whatever its neighbours do ("" when the search decides)


@dataclass
class Selection:
    """What ``select`` decided: the nodes to quantize, the report lines of the others, figures, stats."""

    chosen: list[str]
    declined: list[LayerDecision]
    figures: dict[str, dict[str, Any]] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)


def select(proto: onnx.ModelProto, selected: Sequence[onnx.NodeProto], feeds: dict[str, np.ndarray],
           rates: TableRates | None = None) -> Selection:
    """The subset of ``selected`` whose int8 form is predicted to make ``proto`` faster in onnxruntime.

    Tensor shapes come from one float run on ``feeds``; each layer's float and int8 time and each region
    edge's from ``rates`` (``rates_for``: a calibrated profile, or a built-in ``KernelTable``; the one-thread
    table when None). A greedy search (drop whole regions, then toggle single layers, while the
    predicted total time falls) picks the set, from two starts (``_best_search``); deterministic for a
    model, feeds and rates.
    """
    rates = TableRates() if rates is None else rates
    shapes, floats = _shapes(proto, feeds)
    inits = {t.name: t for t in proto.graph.initializer}
    layers = {n.name: _describe(n, shapes, rates) for n in selected}
    cost = _CostModel(proto, layers, shapes, floats, rates)
    for layer in layers.values():
        if not any(x in floats for x in (*layer.node.input, *layer.node.output) if x not in inits):
            layer.gate = "integer tensors only (shapes, indices): nothing to quantize"
    start = {name for name, layer in layers.items() if not layer.gate}
    effective = _best_search(cost, start)
    float_total, total = cost.total(set()), cost.total(effective)
    if not total < float_total - _EPS_US:
        effective, total = set(), float_total
    sel = _result(cost, effective, float_total, total)
    sel.stats["select_profile"] = rates.name
    sel.stats["select_threads"] = rates.threads
    return sel


def predictor(proto: onnx.ModelProto, selected: Sequence[onnx.NodeProto], feeds: dict[str, np.ndarray],
              rates: TableRates | None = None) -> Callable[[frozenset[str]], float]:
    """The predicted µs (layers and region edges, as ``select`` sees them) of ``proto`` with a set of
    ``selected`` layers int8: select=measured compares its timings with it."""
    rates = TableRates() if rates is None else rates
    shapes, floats = _shapes(proto, feeds)
    cost = _CostModel(proto, {n.name: _describe(n, shapes, rates) for n in selected}, shapes, floats, rates)
    return lambda chosen: cost.total(cost.effective(set(chosen)))


def _shapes(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """(shape of every main-graph tensor, the names of the float ones) in one float run on ``feeds``
    (initializers included); only float tensors get a QuantizeLinear/DequantizeLinear."""
    shapes = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    floats = {t.name for t in proto.graph.initializer if t.data_type in _FLOAT_TYPES}
    got: dict[str, Any] = dict(feeds)
    names = sorted({o for n in proto.graph.node for o in n.output if o} - shapes.keys() - got.keys())
    try:
        got.update(_qdq.run_probe(_qdq.probe_session(proto, names), names, feeds))
    except RunTimeLimitExceeded:
        raise  # the pipeline's run time limit: the pass stops, as its calibration would
    except Exception:  # noqa: BLE001 - a tensor onnxruntime cannot return: shapes stay unknown, layers float
        pass
    arrays = {k: v for k, v in got.items() if isinstance(v, np.ndarray)}
    shapes.update({k: tuple(v.shape) for k, v in arrays.items()})
    floats |= {k for k, v in arrays.items() if v.dtype.kind == "f"}
    return shapes, floats


def _describe(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]], rates: TableRates) -> _Layer:
    """``node``'s kind, work and predicted times, and the gate that keeps it float if one applies."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    out = shapes.get(node.output[0]) if node.output else None
    kind = _KIND.get(node.op_type, "other")
    work = math.nan
    if node.op_type == "Conv":
        kind, work = _conv_kind(node, attrs, shapes, out)
    elif kind == "gemm":
        a = shapes.get(node.input[0])
        work = float(np.prod(out)) * a[-1] if out is not None and a else math.nan
        if node.op_type == "Gemm" and attrs.get("transA", 0) and out is not None and a:
            work = float(np.prod(out)) * a[0]
    elif kind == "dense":  # ConvTranspose: every input element times a kernel of out-channels
        w = shapes.get(node.input[1])
        a = shapes.get(node.input[0])
        work = float(np.prod(a)) * float(np.prod(w[1:])) if a and w else math.nan
    elif out is not None:
        work = float(np.prod(out))
    if kind == "other":
        return _Layer(node, kind, work, 0.0, 0.0)
    if math.isnan(work):
        return _Layer(node, kind, work, 0.0, 0.0, gate="shape unknown (not seen in the float run): kept float")
    # Output pixels, the batch included (N x H x W): what a narrow conv's int8 kernel pays per.
    pixels = float(np.prod(out)) / out[1] if kind == "dense_narrow" and out is not None and out[1] else 0.0
    elements = sum(float(np.prod(shapes[x])) for x in (*node.input, *node.output) if x in shapes)
    layer = _Layer(node, kind, work, *rates.layer_us(kind, work, pixels, elements, out))
    layer.gate = _gate(node, layer, shapes, rates.name)
    return layer


def _float_padding(kind: str, output_shape: Sequence[int] | None) -> float:
    """The work a float layer of ``kind`` does over its MACs: a 1-D conv's GEMM computes its output steps padded
    to whole column strips (``nnopt.cost.layout.step_padding``), as the cost model has it."""
    if kind == "dense_1d" and output_shape is not None and len(output_shape) == 3:
        return step_padding(int(output_shape[-1]))
    return 1.0


def _conv_kind(node: onnx.NodeProto, attrs: dict[str, Any], shapes: dict[str, tuple[int, ...]],
               out: tuple[int, ...] | None) -> tuple[str, float]:
    """(dense | dense_narrow | dense_1d | pointwise | depthwise, MACs) of a Conv."""
    w = shapes.get(node.input[1]) if len(node.input) > 1 else None
    if w is None or out is None or len(w) < 3:
        return "dense", math.nan
    group = int(attrs.get("group", 1))
    cin_per_group = w[1]
    macs = float(np.prod(out)) * float(np.prod(w[1:]))
    if group > 1 and cin_per_group == 1:
        return "depthwise", macs
    if all(k == 1 for k in w[2:]) and group == 1:
        return "pointwise", macs
    if len(w) == 3 and group == 1:
        return "dense_1d", macs
    return ("dense_narrow" if group == 1 and cin_per_group < MIN_INT8_CHANNELS else "dense"), macs


def _gate(node: onnx.NodeProto, layer: _Layer, shapes: dict[str, tuple[int, ...]], source: str) -> str:
    """Why ``layer`` stays float whatever its neighbours do, or "" (its int8 kernel is faster); ``source``
    names the rates the times come from."""
    ratio = layer.int8_us / layer.float_us if layer.float_us > 0 else math.inf
    if layer.kind == "depthwise" and not layer.int8_us < layer.float_us:
        return (f"depthwise: onnxruntime's int8 kernel is no faster ({source}: {layer.int8_us:.1f} µs int8 vs "
                f"{layer.float_us:.1f} µs float, x{ratio:.2f}; measured x1.15-x3.56)")
    if layer.kind == "pointwise" and shapes[node.input[1]][1] < MIN_INT8_CHANNELS:
        return (f"{shapes[node.input[1]][1]} input channel(s) < {MIN_INT8_CHANNELS}: onnxruntime's int8 pointwise "
                "conv is no faster there (measured with 8: x0.85-x1.64)")
    if layer.kind == "dense_narrow" and shapes[node.input[1]][0] < MIN_INT8_CHANNELS:
        return (f"{shapes[node.input[1]][1]} input and {shapes[node.input[1]][0]} output channels (< "
                f"{MIN_INT8_CHANNELS}): onnxruntime's int8 conv is no faster there (measured 8 -> 8 x1.23, "
                "12 -> 12 x0.99)")
    if layer.kind in ("dense", "dense_narrow", "dense_1d", "pointwise", "gemm") and not layer.int8_us < layer.float_us:
        narrow = " (few input channels: int8 pays per output pixel)" if layer.kind == "dense_narrow" else ""
        return (f"too small{narrow}: {layer.work / 1e3:.1f} kMAC, int8 kernel {layer.int8_us:.1f} µs >= float "
                f"{layer.float_us:.1f} µs ({source})")
    return ""


class _CostModel:
    """Predicted time of the model's candidate layers and region edges for a set of int8 layers.

    A set is judged by its effect: ``effective`` is what onnxruntime's quantizer makes int8 of it, and
    ``delta`` the change in predicted time when layers are switched, computed locally (the switched
    layers, the followers that switch with them, and their tensors) so a search stays linear in the graph.
    """

    def __init__(self, proto: onnx.ModelProto, layers: dict[str, _Layer], shapes: dict[str, tuple[int, ...]],
                 floats: set[str], rates: TableRates):
        self.layers = layers
        self.rates = rates
        self.order = [n.name for n in proto.graph.node if n.name in layers]
        self.position = {name: i for i, name in enumerate(self.order)}
        inits = {t.name for t in proto.graph.initializer}
        self.outputs = {o.name for o in proto.graph.output}
        self.producer: dict[str, str] = {}
        self.readers: dict[str, list[str]] = {}
        self.nodes = {n.name: n for n in proto.graph.node}
        for n in proto.graph.node:
            for o in n.output:
                self.producer[o] = n.name
            for x in dict.fromkeys(n.input):
                if x and x not in inits:
                    self.readers.setdefault(x, []).append(n.name)
        # Only float activations are quantized (shape and index tensors stay as they are, and cost nothing).
        self.tensors_of = {name: sorted({x for x in (*layers[name].node.input, *layers[name].node.output)
                                         if x and x not in inits and x in floats}) for name in self.order}
        self.tensors = sorted({t for ts in self.tensors_of.values() for t in ts})
        self.elements = {t: float(np.prod(shapes[t])) if t in shapes else 0.0 for t in self.tensors}

    def _int8_given(self, name: str, chosen: set[str], e: set[str]) -> bool:
        node = self.layers[name].node
        return name in chosen and (node.op_type not in FOLLOWERS or self.producer.get(node.input[0]) in e)

    def effective(self, chosen: set[str]) -> set[str]:
        """The layers onnxruntime's quantizer makes int8 when ``chosen`` are asked for: a follower only
        when its input is int8."""
        done: set[str] = set()
        for name in self.order:
            if self._int8_given(name, chosen, done):
                done.add(name)
        return done

    def total(self, e: set[str]) -> float:
        """Predicted µs of the candidate layers and of the region edges with the layers ``e`` int8."""
        t = sum(layer.int8_us if name in e else layer.float_us for name, layer in self.layers.items())
        return t + sum(self.edge_us(x, e) for x in self.tensors)

    def edge_us(self, t: str, e: set[str]) -> float:
        """Predicted µs that ``t`` adds with the layers ``e`` int8: its QuantizeLinear (into a region) or
        DequantizeLinear (out of one), and activations after an int8 producer that no longer fuse."""
        producer = self.producer.get(t)
        p_in = producer in e
        readers = self.readers.get(t, [])
        cost = 0.0
        if not p_in and any(r in e for r in readers):
            cost = self.rates.boundary_us(self.elements[t], self._conv_side([producer] if producer else []))
        elif p_in and (t in self.outputs or any(r not in e for r in readers)):
            cost = self.rates.boundary_us(self.elements[t],
                                          self._conv_side([r for r in readers if r not in e], after=True))
        if p_in:
            unfused = sum(1 for r in readers if r not in e and self.nodes[r].op_type in FUSED_ACTIVATIONS)
            cost += unfused * self.rates.unfused_us(self.elements[t])
            if any(r not in e and self.nodes[r].op_type in AUTO_QUANTIZED_OPS and self.nodes[r].input[0] == t
                   for r in readers):
                cost += _FORBIDDEN_US
        return cost

    def _conv_side(self, names: list[str], after: bool = False) -> bool:
        """Whether a float Conv is among ``names`` or directly beyond an activation among them."""
        for name in names:
            node = self.nodes[name]
            if node.op_type == "Conv":
                return True
            if node.op_type in FUSED_ACTIVATIONS and node.output and node.input:
                beyond = self.readers.get(node.output[0], []) if after else [self.producer.get(node.input[0], "")]
                if any(b in self.nodes and self.nodes[b].op_type == "Conv" for b in beyond):
                    return True
        return False

    def switch(self, chosen: set[str], e: set[str], names: set[str]) -> tuple[set[str], set[str], float]:
        """(chosen with ``names`` toggled, its effective set, the change in predicted µs)."""
        new_chosen = chosen ^ names
        new_e = set(e)
        flipped: list[str] = []
        queue = sorted(names, key=self.position.__getitem__)
        while queue:
            name = queue.pop(0)
            now = self._int8_given(name, new_chosen, new_e)
            if now == (name in new_e):
                continue
            (new_e.add if now else new_e.discard)(name)
            flipped.append(name)
            # Followers reading this layer's output switch with it.
            queue += [r for o in self.layers[name].node.output for r in self.readers.get(o, ())
                      if r in self.layers and self.layers[r].node.op_type in FOLLOWERS]
        delta = sum((self.layers[n].int8_us - self.layers[n].float_us) * (1 if n in new_e else -1) for n in flipped)
        touched = sorted({t for n in flipped for t in self.tensors_of[n]})
        delta += sum(self.edge_us(t, new_e) - self.edge_us(t, e) for t in touched)
        return new_chosen, new_e, delta

    def regions(self, e: set[str]) -> list[list[str]]:
        """Connected groups of int8 layers (joined by float tensors between two of them), in graph order."""
        parent = {name: name for name in e}

        def find(x: str) -> str:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for t in self.tensors:
            p = self.producer.get(t)
            if p in e:
                for r in self.readers.get(t, []):
                    if r in e:
                        parent[find(r)] = find(p)
        groups: dict[str, list[str]] = {}
        for name in self.order:
            if name in e:
                groups.setdefault(find(name), []).append(name)
        return list(groups.values())


#: How much faster (a share of its predicted time) the second start's set must be predicted than the first's to
#: be taken (``_best_search``). The table and the calibrated estimate are off by ×1.2 on whole models in the
#: median (docs/cost_model.md), and a set predicted 2 % faster measured slower: ppocr_det's reference graph,
#: 111 layers int8 predicted 3,825 µs against the first start's 80 at 3,912, ran 0.75-0.78× float against
#: 0.69× and at cosine 0.725 against 0.745.
_SECOND_START_MARGIN = 0.10


def _best_search(cost: _CostModel, start: set[str]) -> set[str]:
    """The effective int8 set of a search from ``start`` (every layer int8 but the gated), unless a search
    from ``start`` without the layers that feed a conv which stays float (``_without_float_conv_feeders``)
    ends at a set predicted faster by ``_SECOND_START_MARGIN``. A greedy descent depends on where it starts:
    from the first start it may drop a whole region for one layer's sake (ddddocr_det with a calibrated
    profile: 71 layers int8 predicted at 9,547 µs; from the second, 262 at 7,805)."""
    first = cost.effective(_search(cost, start))
    reduced = _without_float_conv_feeders(cost, start)
    if reduced == start:
        return first
    second = cost.effective(_search(cost, reduced))
    return second if cost.total(second) < (1 - _SECOND_START_MARGIN) * cost.total(first) else first


def _without_float_conv_feeders(cost: _CostModel, start: set[str]) -> set[str]:
    """``start`` without the layers whose output a Conv, ConvTranspose or Gemm outside it (gated, or not a
    candidate: float whatever the search does) reads as its data input, and so on upstream while that makes a
    float conv of a layer in it. Int8 there is never chosen (``_FORBIDDEN_US``): a search that starts with
    them int8 drops the whole region holding them, on a detector most of the net (ddddocr_det's SiLU Muls
    before its 1 → 4-channel head convs, which a calibrated profile keeps float)."""
    start = set(start)
    while True:
        feeders = {cost.producer.get(node.input[0]) for node in cost.nodes.values()
                   if node.op_type in AUTO_QUANTIZED_OPS and node.name not in start and node.input}
        feeders &= start
        if not feeders:
            return start
        start -= feeders


def _search(cost: _CostModel, start: set[str]) -> set[str]:
    """Greedy descent on the predicted time: drop whole regions, then toggle single layers (graph order)."""
    chosen = set(start)
    e = cost.effective(chosen)
    for _ in range(_MAX_SWEEPS):
        changed = False
        for region in cost.regions(e):
            trial, trial_e, delta = cost.switch(chosen, e, set(region) & chosen)
            if delta < -_EPS_US:
                chosen, e, changed = trial, trial_e, True
        for name in cost.order:
            if cost.layers[name].gate:
                continue
            trial, trial_e, delta = cost.switch(chosen, e, {name})
            if delta < -_EPS_US:
                chosen, e, changed = trial, trial_e, True
        if not changed:
            break
    return chosen


def _result(cost: _CostModel, e: set[str], float_total: float, total: float) -> Selection:
    """The report of a selection: per layer why, and the predicted figures."""
    sel = Selection(chosen=[n for n in cost.order if n in e], declined=[])
    region_of = {name: i for i, region in enumerate(cost.regions(e)) for name in region}
    for name in cost.order:
        layer = cost.layers[name]
        figures: dict[str, Any] = {"kind": layer.kind, "predicted_float_us": round(layer.float_us, 2),
                                   "predicted_int8_us": round(layer.int8_us, 2)}
        if not math.isnan(layer.work):
            figures["work"] = int(layer.work)
        if name in e:
            sel.figures[name] = {**figures, "select": "int8", "region": region_of[name],
                                 "predicted_gain_us": round(layer.float_us - layer.int8_us, 2)}
            continue
        reason = layer.gate or _why_float(cost, e, name)
        sel.declined.append(LayerDecision(name, layer.node.op_type, "declined", f"float (select=latency): {reason}",
                                          {**figures, "select": "float"}))
    if not e:
        sel.declined.append(LayerDecision("(model)", "", "declined", (
            f"select=latency: no int8 layer pays (predicted {float_total:.1f} µs in float, no int8 set of layers "
            "predicted faster): the model is left float")))
    sel.stats = {"select": "latency", "select_int8_layers": len(e), "select_regions": len(cost.regions(e)),
                 "select_predicted_float_us": round(float_total, 1), "select_predicted_us": round(total, 1),
                 "select_predicted_ratio": round(total / float_total, 3) if float_total > 0 else 1.0}
    return sel


def _why_float(cost: _CostModel, e: set[str], name: str) -> str:
    """The reason a layer the search left float is float: what int8 would cost there."""
    layer = cost.layers[name]
    node = layer.node
    if node.op_type in FOLLOWERS and cost.producer.get(node.input[0]) not in e:
        return f"{node.op_type} runs int8 only on an int8 input, and its input is float here"
    _, with_it, delta = cost.switch(e, e, {name})
    if delta >= _FORBIDDEN_US / 2:
        return ("int8 here would feed a float Conv/Gemm through a DequantizeLinear, and onnxruntime would then "
                "quantize that layer's weights per tensor")
    kernel = sum(cost.layers[n].int8_us - cost.layers[n].float_us for n in with_it - e)
    slower = " (int8 Mul is slower than float Mul)" if layer.kind == "mul" and layer.int8_us > layer.float_us else ""
    return (f"int8 here would add {delta:+.1f} µs: kernel{slower} {kernel:+.1f} µs, QuantizeLinear/"
            f"DequantizeLinear at region edges {delta - kernel:+.1f} µs")


#: Ops that compute nothing on an activation's values (onnxruntime removes Identity, Dropout at inference):
#: not reported as islands.
_NO_COMPUTE = frozenset({"Identity", "Dropout", "Shape", "Size", "Cast", "ConstantOfShape"})


def float_islands(proto: onnx.ModelProto, candidates: Iterable[str], op_types: Iterable[str]) -> list[LayerDecision]:
    """Report lines for the ops outside ``op_types`` (no int8 kernel: HardSwish, HardSigmoid, Div...) that
    sit between candidate layers: beside an int8 layer each costs a DequantizeLinear before it and a
    QuantizeLinear after it, which the selection weighs."""
    near_set, kinds = set(candidates), set(op_types)
    producer = {o: n.name for n in proto.graph.node for o in n.output}
    readers: dict[str, set[str]] = {}
    for n in proto.graph.node:
        for x in n.input:
            readers.setdefault(x, set()).add(n.name)
    lines = []
    for n in proto.graph.node:
        if n.op_type in kinds or n.op_type in _NO_COMPUTE:
            continue
        before = {producer.get(x) for x in n.input}
        after = {r for o in n.output for r in readers.get(o, ())}
        if before & near_set and after & near_set:
            lines.append(LayerDecision(n.name, n.op_type, "declined", (
                f"{n.op_type} island: no int8 kernel (not in op_types), float; an int8 neighbour pays a "
                "DequantizeLinear before it and a QuantizeLinear after it (weighed by select=latency)")))
    return lines
