"""quantize's select=latency: which layers int8 makes faster in onnxruntime (CPU), from a measured kernel table."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper

from nnopt.passes import _qdq
from nnopt.pipeline.base import LayerDecision
from nnopt.runtime import RunTimeLimitExceeded


@dataclass(frozen=True)
class Rate:
    """Time of one layer kind in onnxruntime, float and int8: a fixed µs plus ns per unit of work (MACs for
    Conv/Gemm/MatMul, output elements for elementwise ops)."""

    float_fixed_us: float
    float_ns: float
    int8_fixed_us: float
    int8_ns: float

    def float_us(self, work: float) -> float:
        return self.float_fixed_us + self.float_ns * work * 1e-3

    def int8_us(self, work: float) -> float:
        return self.int8_fixed_us + self.int8_ns * work * 1e-3


# NOTE: measured by benchmarks/int8_kernels.py --threads 1 (onnxruntime 1.32, the project's 2-core x86
# benchmark machine, shared; one intra-op thread keeps other processes' load out of the figures; output in
# docs/int8_kernels.md, summarised in docs/quantize.md "Latency-aware selection"): per kind, least-squares
# fits of the in-chain time of one layer ((t(3 chained layers) - t(1 layer)) / 2, interleaved
# medians) as fixed µs + ns per MAC. Measured int8/float ratios: dense 3x3 conv 0.27-0.46 (x1.18 with 8
# channels), pointwise 0.29-0.74 (0.85 with 8), depthwise 1.18-3.59 (never faster), Gemm 0.26-0.62 (x2.16 at
# 64x64), Add 0.83-0.94, Mul 1.17-1.52 (QLinearMul is slower than float Mul).
KERNELS: dict[str, Rate] = {
    "dense": Rate(2.17, 0.0171, 11.29, 0.0043),
    "pointwise": Rate(3.70, 0.0178, 3.75, 0.0048),
    "depthwise": Rate(1.30, 0.0273, 0.0, 0.0967),
    "gemm": Rate(0.49, 0.0233, 1.43, 0.0065),  # fitted on relative errors (cases over 3.5 decades of MACs)
    "add": Rate(1.08, 0.1460, 0.52, 0.1371),
    "mul": Rate(1.19, 0.1390, 0.38, 0.2161),
}
#: One tensor crossing a region's edge: a QuantizeLinear in or a DequantizeLinear out, with onnxruntime's
#: NCHW <-> NHWC transposes around int8 convs; fitted on the 1-layer int8 models' time beyond their layer
#: and beyond the float model's fixed cost (dense conv 0.135, Add/Mul 0.11 ns per element).
BOUNDARY_FIXED_US = 1.5
BOUNDARY_NS_PER_ELEMENT = 0.12
#: The same edge with a float Conv on its other side: onnxruntime's float convs run in its blocked NCHWc
#: layout, and each int8 island adds a reorder out of and back into it. Fitted on the sandwich cases
#: (depthwise -> pointwise -> depthwise, float vs pointwise int8: x0.58-x1.38).
CONV_EDGE_FIXED_US = 0.86
CONV_EDGE_NS_PER_ELEMENT = 0.292
#: An activation onnxruntime fuses into the float Conv before it (Relu, Clip, HardSwish, HardSigmoid...)
#: runs on its own after an int8 layer: 0.174 ns per element (sandwiches with HardSwish vs without).
UNFUSED_ACTIVATION_NS_PER_ELEMENT = 0.174
FUSED_ACTIVATIONS = frozenset({"Relu", "Clip", "HardSwish", "HardSigmoid", "LeakyRelu", "Sigmoid", "Tanh"})
#: onnxruntime (WeightBiasQuantization, 1.20+) quantizes the float weight of any Conv, ConvTranspose or Gemm
#: whose input comes straight from a DequantizeLinear: per tensor, so a layer left float would become an int8
#: layer with per-tensor weights (or a float one dequantizing its weight at every run). A set of int8 layers
#: that would feed one of these ops, left float, through a DequantizeLinear is never chosen (this penalty).
AUTO_QUANTIZED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm"})
_FORBIDDEN_US = 1e6
#: Below this many input channels per group onnxruntime's int8 Conv is no faster than float (measured: 8
#: channels x1.18 dense, x0.85-x1.64 pointwise with 1 or 2 threads), whatever its size.
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


def select(proto: onnx.ModelProto, selected: Sequence[onnx.NodeProto], feeds: dict[str, np.ndarray]) -> Selection:
    """The subset of ``selected`` whose int8 form is predicted to make ``proto`` faster in onnxruntime.

    Tensor shapes come from one float run on ``feeds``; each layer's float and int8 time from ``KERNELS``
    and each region edge's from ``BOUNDARY_*``. A greedy search (drop whole regions, then toggle single
    layers, while the predicted total time falls) picks the set; deterministic for a model and feeds.
    """
    shapes, floats = _shapes(proto, feeds)
    inits = {t.name: t for t in proto.graph.initializer}
    layers = {n.name: _describe(n, shapes) for n in selected}
    cost = _CostModel(proto, layers, shapes, floats)
    for layer in layers.values():
        if not any(x in floats for x in (*layer.node.input, *layer.node.output) if x not in inits):
            layer.gate = "integer tensors only (shapes, indices): nothing to quantize"
    start = {name for name, layer in layers.items() if not layer.gate}
    effective = cost.effective(_search(cost, start))
    float_total, total = cost.total(set()), cost.total(effective)
    if not total < float_total - _EPS_US:
        effective, total = set(), float_total
    return _result(cost, effective, float_total, total)


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


def _describe(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]]) -> _Layer:
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
    rate = KERNELS[kind]
    layer = _Layer(node, kind, work, rate.float_us(work), rate.int8_us(work))
    layer.gate = _gate(node, layer, shapes)
    return layer


def _conv_kind(node: onnx.NodeProto, attrs: dict[str, Any], shapes: dict[str, tuple[int, ...]],
               out: tuple[int, ...] | None) -> tuple[str, float]:
    """(dense | pointwise | depthwise, MACs) of a Conv."""
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
    return "dense", macs


def _gate(node: onnx.NodeProto, layer: _Layer, shapes: dict[str, tuple[int, ...]]) -> str:
    """Why ``layer`` stays float whatever its neighbours do, or "" (its int8 kernel is faster)."""
    ratio = layer.int8_us / layer.float_us if layer.float_us > 0 else math.inf
    if layer.kind == "depthwise":
        return (f"depthwise: onnxruntime's int8 kernel is no faster (table: {layer.int8_us:.1f} µs int8 vs "
                f"{layer.float_us:.1f} µs float, x{ratio:.2f}; measured x1.18-x3.59)")
    if layer.kind in ("dense", "pointwise") and node.op_type == "Conv":
        cin = shapes[node.input[1]][1]
        if cin < MIN_INT8_CHANNELS:
            return (f"{cin} input channel(s) per group < {MIN_INT8_CHANNELS}: onnxruntime's int8 conv is no faster "
                    "there (measured with 8: x1.18 dense)")
    if layer.kind in ("dense", "pointwise", "gemm") and not layer.int8_us < layer.float_us:
        return (f"too small: {layer.work / 1e3:.1f} kMAC, int8 kernel {layer.int8_us:.1f} µs >= float "
                f"{layer.float_us:.1f} µs (table)")
    return ""


def boundary_us(elements: float, conv_side: bool = False) -> float:
    """Predicted µs of one QuantizeLinear or DequantizeLinear at a region's edge over ``elements`` values
    (``conv_side``: a float Conv on the edge's other side)."""
    if conv_side:
        return CONV_EDGE_FIXED_US + CONV_EDGE_NS_PER_ELEMENT * elements * 1e-3
    return BOUNDARY_FIXED_US + BOUNDARY_NS_PER_ELEMENT * elements * 1e-3


class _CostModel:
    """Predicted time of the model's candidate layers and region edges for a set of int8 layers.

    A set is judged by its effect: ``effective`` is what onnxruntime's quantizer makes int8 of it, and
    ``delta`` the change in predicted time when layers are switched, computed locally (the switched
    layers, the followers that switch with them, and their tensors) so a search stays linear in the graph.
    """

    def __init__(self, proto: onnx.ModelProto, layers: dict[str, _Layer], shapes: dict[str, tuple[int, ...]],
                 floats: set[str]):
        self.layers = layers
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
            cost = boundary_us(self.elements[t], self._conv_side([producer] if producer else []))
        elif p_in and (t in self.outputs or any(r not in e for r in readers)):
            cost = boundary_us(self.elements[t], self._conv_side([r for r in readers if r not in e], after=True))
        if p_in:
            unfused = sum(1 for r in readers if r not in e and self.nodes[r].op_type in FUSED_ACTIVATIONS)
            cost += unfused * UNFUSED_ACTIVATION_NS_PER_ELEMENT * self.elements[t] * 1e-3
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
