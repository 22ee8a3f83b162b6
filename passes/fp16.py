"""fp16: float32 weights and compute to float16 (or bfloat16), float32 kept where it must be, fewest Casts."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

from nnopt.analysis.shapes import topological_order
from nnopt.errors import OptionError
from nnopt.ir.graphview import rename_outer_reads, subgraph_protos, subgraph_reads
from nnopt.ir.model import Model
from nnopt.ir.naming import taken_names, unique_name
from nnopt.passes import _fp16_plan as plan
from nnopt.passes._fp16_values import narrow_array, out_of_range
from nnopt.pipeline.base import Figure, LayerDecision, Pass, PassContext, PassOptions, PassResult

#: ONNX element type of each ``dtype`` option.
TARGETS = {"float16": onnx.TensorProto.FLOAT16, "bfloat16": onnx.TensorProto.BFLOAT16}
FLOAT = onnx.TensorProto.FLOAT


@dataclass(frozen=True)
class Fp16Options(PassOptions):
    dtype: Literal["float16", "bfloat16"] = field(
        default="float16",
        metadata={"help": "the narrow type: float16 (10-bit significand, range +-65504: a node reading a weight "
                          "beyond it stays float32) or bfloat16 (float32's range, 7-bit significand; needs opset "
                          ">= 13, and onnxruntime's CPU provider runs it only with compute=float32)"},
    )
    keep_io_types: bool = field(
        default=True,
        metadata={"help": "keep the model's float32 inputs and outputs float32 (a Cast at each); false: they "
                          "become the narrow type too and callers must feed it (verification casts the reference "
                          "data to float16 as they would; bfloat16 inputs need --no-verify)"},
    )
    block: tuple[str, ...] = field(
        default=(),
        metadata={"help": "op types that stay float32, besides Range, CumSum, NonMaxSuppression and RoiAlign "
                          "(coordinates and running sums) and ops whose schema has no narrow type"},
    )
    compute: Literal["narrow", "float32"] = field(
        default="narrow",
        metadata={"help": "narrow: nodes compute in the narrow type; float32: only weights (initializers and "
                          "Constant values of at least min_size elements) are stored narrow, each read through "
                          "a Cast that onnxruntime folds at load: half the size, float32 speed, the only way "
                          "to run bfloat16 on onnxruntime's CPU provider"},
    )
    min_size: int = field(
        default=16, metadata={"help": "compute=float32: leave constants of fewer elements than this float32"}
    )
    fragile: bool = field(
        default=False,
        metadata={"help": "also keep float32 the numerically fragile ops: Softmax, LogSoftmax, Layer/Group/"
                          "InstanceNormalization, Exp, Log, Pow, ReduceSum/Mean/SumSquare/LogSumExp/L2"},
    )

    def __post_init__(self) -> None:
        if isinstance(self.min_size, bool) or not isinstance(self.min_size, int) or self.min_size < 1:
            raise OptionError(f"fp16: min_size must be a positive integer, got {self.min_size!r}")
        for op in self.block:
            if not op or not op.isidentifier():
                raise OptionError(f"fp16:block: {op!r} is not an op type")

    def blocked(self) -> dict[str, str]:
        """Op type -> why it stays float32, for every op type these options block."""
        reasons = dict(plan.DEFAULT_BLOCK)
        if self.fragile:
            reasons.update({op: f"fragile: {why}" for op, why in plan.FRAGILE.items()})
        reasons.update({op: "in the block list" for op in self.block})
        return reasons


@dataclass
class _Tally:
    """What the pass did, over every graph scope."""

    converted: Counter[str] = field(default_factory=Counter)
    kept: dict[str, Counter[str]] = field(default_factory=dict)
    casts: int = 0
    constants: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    clipped: int = 0
    flushed: int = 0
    layers: list[LayerDecision] = field(default_factory=list)


class Fp16(Pass[Fp16Options]):
    """Convert float32 weights and compute to float16 (or bfloat16), keeping float32 where it must stay.

    Matches: every default-domain node whose float32 inputs and outputs share a type variable that the
    ONNX schema (at the model's opset) allows in the narrow type. Rewrites: those nodes compute in the
    narrow type, and the float32 initializers and Constant values they read are stored in it. Stays
    float32: ops in the block list (``block``, the default coordinates/running-sum ops, with ``fragile``
    the exponentials and normalisations), ops whose schema has no narrow type, custom domains, nodes that
    read a constant beyond float16's range (clipping it would change the model), the boundary of
    If/Loop/Scan (their bodies are converted on their own, float32 at the body's inputs and outputs), and
    with ``keep_io_types`` the model's inputs and outputs. Casts: data-movement ops (Reshape, Transpose,
    Concat, Gather, ...) take whichever precision needs fewer Casts, chosen by a minimum cut over the graph;
    one Cast per tensor and target type, shared by all its readers. ``compute=float32`` stores only the
    weights narrow. Lossy: float16 keeps about 3 significant decimal digits. onnxruntime's CPU provider has
    float16 kernels for few ops and widens the rest back to float32 at load, so on CPU a float16 model is
    half the size at float32's speed, slower where Casts stay inside If/Loop bodies (docs/fp16.md).
    """

    name = "fp16"
    lossy = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        opts = self.options
        target = TARGETS[opts.dtype]
        proto = model.to_proto()
        types = ctx.analyses_for(model).shapes().types
        known = {name: t.elem_type for name, t in types.items()}
        opset = model.opset
        if not plan.cast_allows(opset, target):
            reason = f"{opts.dtype} needs a Cast to and from it, which ONNX has from opset 13; the model is opset {opset}"
            return PassResult(modified=False, reason=reason,
                              layers=[LayerDecision("(model)", "", "declined", reason)])
        tally = _Tally()
        taken = taken_names(proto)
        converter = _GraphConverter(opts, target, opset, known, taken, tally)
        converter.convert(proto.graph, {}, narrow_io=not opts.keep_io_types)
        modified = tally.casts > 0 or tally.constants > 0 or sum(tally.converted.values()) > 0
        stats: dict[str, object] = {
            "nodes_converted": sum(tally.converted.values()),
            "nodes_kept_float32": sum(sum(c.values()) for c in tally.kept.values()),
            "casts_inserted": tally.casts,
            "constants_converted": tally.constants,
            "constant_bytes_before": tally.bytes_before,
            "constant_bytes_after": tally.bytes_after,
            "values_clipped": tally.clipped,
            "values_flushed_to_zero": tally.flushed,
        }
        summary: dict[str, Figure] = {
            "dtype": opts.dtype,
            "converted_by_op": dict(sorted(tally.converted.items())),
            "kept_float32_by_op": {op: dict(sorted(c.items())) for op, c in sorted(tally.kept.items())},
        }
        layers = [LayerDecision("(model)", "", "rewritten" if modified else "declined",
                                "" if modified else "no float32 node to convert", figures=summary), *tally.layers]
        if not modified:
            return PassResult(modified=False, stats=stats, layers=layers, reason="no float32 node to convert")
        model.restore(proto)
        return PassResult(modified=True, stats=stats, layers=layers)


class _GraphConverter:
    """Plans and rewrites one graph scope at a time, then the bodies of its control-flow nodes."""

    def __init__(self, opts: Fp16Options, target: int, opset: int, known: Mapping[str, int], taken: set[str],
                 tally: _Tally) -> None:
        self.opts, self.target, self.opset, self.known = opts, target, opset, known
        self.blocked = opts.blocked()
        self.taken, self.tally = taken, tally
        self.suffix: dict[str, int] = {}
        #: Narrow tensor -> the output of the Cast that widens it back to float32, where one exists.
        self.widened: dict[str, str] = {}

    def convert(self, graph: onnx.GraphProto, outer: Mapping[str, int], *, narrow_io: bool) -> None:
        """Convert ``graph``; ``outer`` maps outer-scope float32 names to the type they now have."""
        known = dict(self.known)
        known.update({name: FLOAT for name in outer})  # originally float32, whatever they are now
        floats = plan.float32_names(graph, known, self.opset)
        too_wide = self._too_wide(graph)
        nodes: dict[int, plan.Node] = {}
        for i, node in enumerate(graph.node):
            view = plan.classify(node, i, self.opset, floats, self.target, self.blocked)
            if view is not None:
                nodes[i] = plan.block_wide_constants(view, node, too_wide)
        if self.opts.compute == "float32":
            nodes = {i: self._weights_only(view, graph.node[i], too_wide) for i, view in nodes.items()}
        tensors = self._tensors(graph, nodes, floats, outer, narrow_io, too_wide)
        narrow, narrow_inits = plan.narrow_nodes(nodes, tensors)
        final = self._rewrite(graph, nodes, tensors, narrow, narrow_inits, narrow_io)
        self._count(nodes, narrow)
        if self.opts.compute == "float32":
            self._widen_for_bodies(graph, final)
        scope = {**outer, **final}
        for node in list(graph.node):
            for body in subgraph_protos(node):
                self.convert(body, scope, narrow_io=False)

    # ------------------------------------------------------------------------------------------ planning
    def _too_wide(self, graph: onnx.GraphProto) -> dict[str, float]:
        """float32 constants of this scope (initializers, Constant values) with finite values beyond the
        narrow type's range, with their largest magnitude."""
        found: dict[str, float] = {}
        tensors = [*graph.initializer, *(a.t for n in graph.node if n.op_type == "Constant" and n.output
                                         for a in n.attribute if a.name == "value")]
        names = [*(t.name for t in graph.initializer),
                 *(n.output[0] for n in graph.node if n.op_type == "Constant" and n.output
                   for a in n.attribute if a.name == "value")]
        for name, tensor in zip(names, tensors):
            if tensor.data_type == FLOAT:
                peak = out_of_range(numpy_helper.to_array(tensor), self.target)
                if peak is not None:
                    found[name] = peak
        return found

    def _weights_only(self, view: plan.Node, node: onnx.NodeProto, too_wide: Mapping[str, float]) -> plan.Node:
        """With ``compute=float32``: a Constant node holding a weight is stored narrow (tied to the narrow
        side, read through a Cast); every other node computes in float32."""
        if view.role != "blocked" and node.op_type == "Constant" and node.output[0] not in too_wide:
            size = next((math.prod(a.t.dims) for a in node.attribute if a.name == "value"), 0)
            if size >= self.opts.min_size:
                return plan.Node(view.index, view.name, view.op_type, "compute", "", view.inputs, view.outputs)
        if view.role == "blocked":
            return view
        return plan.Node(view.index, view.name, view.op_type, "blocked", "compute=float32: only weights are narrow",
                         {k: "float32" for k in view.inputs}, view.outputs)

    def _tensors(self, graph: onnx.GraphProto, nodes: Mapping[int, plan.Node], floats: set[str],
                 outer: Mapping[str, int], narrow_io: bool, too_wide: Mapping[str, float]) -> dict[str, plan.Tensor]:
        producers: dict[str, int] = {}
        binds: set[str] = set()
        for i, node in enumerate(graph.node):
            for k, name in enumerate(node.output):
                if name:
                    producers[name] = i
                    if i in nodes and k in nodes[i].outputs:
                        binds.add(name)
        readers = plan.readers_of(nodes.values(), graph)
        inputs = {v.name for v in graph.input}
        outputs = {v.name for v in graph.output}
        inits = {t.name: math.prod(t.dims) for t in graph.initializer}
        weights_only = self.opts.compute == "float32"
        names = [*(t.name for t in graph.initializer), *(v.name for v in graph.input), *producers,
                 *readers, *(v.name for v in graph.output)]
        tensors: dict[str, plan.Tensor] = {}
        for name in dict.fromkeys(names):
            if name not in floats:
                continue
            producer: int | None = None
            fixed: bool | None = None
            if name in inputs:
                fixed = narrow_io
            elif name in binds:
                producer = producers[name]
            elif name in producers:
                fixed = False  # a fixed-type output (DequantizeLinear's at old opsets) or a blocked node's
            elif name in inits:
                if name in outputs:
                    fixed = False
                elif weights_only:  # stored narrow, read through one Cast, unless too small or too wide
                    fixed = inits[name] >= self.opts.min_size and name not in too_wide
                else:
                    fixed = None  # the cut decides
            else:
                fixed = outer.get(name, FLOAT) == self.target
            tensors[name] = plan.Tensor(producer, fixed, tuple(readers.get(name, ())),
                                        narrow_io if name in outputs else None)
        return tensors

    # ------------------------------------------------------------------------------------------ rewriting
    def _rewrite(self, graph: onnx.GraphProto, nodes: Mapping[int, plan.Node], tensors: Mapping[str, plan.Tensor],
                 narrow: set[int], narrow_inits: set[str], narrow_io: bool) -> dict[str, int]:
        """Apply the plan to ``graph``; returns the names whose type changed, with their new type."""
        target = self.target
        inits = {t.name for t in graph.initializer}
        final: dict[str, int] = {}
        casts: list[onnx.NodeProto] = []
        for name, t in tensors.items():
            if t.producer is not None:
                dtype = target if t.producer in narrow else FLOAT
            elif t.fixed is not None:
                dtype = target if t.fixed else FLOAT
                if t.fixed and name in inits:
                    narrow_inits.add(name)
            else:
                dtype = target if name in narrow_inits else FLOAT
            wants: dict[int, list[tuple[int, int]]] = {}
            for index, pos, use in t.readers:
                need = {"mode": target if index in narrow else FLOAT, "float32": FLOAT, "any": dtype}[use]
                wants.setdefault(need, []).append((index, pos))
            other = FLOAT if dtype == target else target
            out_needs = None if t.output_narrow is None else (target if t.output_narrow else FLOAT)
            if out_needs is not None and out_needs != dtype and t.producer is not None:
                # A graph output keeps its name: the producer writes a new name, a Cast writes the old one.
                inner = unique_name(f"{name}/{_label(dtype)}", self.taken, self.suffix)
                producer = graph.node[t.producer]
                producer.output[list(producer.output).index(name)] = inner
                for index, pos in wants.get(dtype, []):
                    graph.node[index].input[pos] = inner
                casts.append(self._cast(inner, name, other))
                final[name] = other
                continue
            if dtype == target:
                final[name] = target
            if wants.get(other):
                cast_out = unique_name(f"{name}/{_label(other)}", self.taken, self.suffix)
                casts.append(self._cast(name, cast_out, other))
                if other == FLOAT:
                    self.widened[name] = cast_out
                for index, pos in wants[other]:
                    graph.node[index].input[pos] = cast_out
        for i in sorted(narrow):
            _retarget_attributes(graph.node[i], target, self.tally)
        self._narrow_initializers(graph, narrow_inits)
        for vi in [*graph.value_info, *(graph.input if narrow_io else ()), *(graph.output if narrow_io else ())]:
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type == FLOAT and final.get(vi.name) == target:
                vi.type.tensor_type.elem_type = target
        self._insert(graph, casts)
        return final

    def _insert(self, graph: onnx.GraphProto, casts: list[onnx.NodeProto]) -> None:
        """Add ``casts`` to ``graph`` and restore a topological order (subgraph reads count)."""
        if not casts:
            return
        graph.node.extend(casts)
        order, _ = topological_order(graph.node)
        if order is not None:
            ordered = [graph.node[i] for i in order]
            del graph.node[:]
            graph.node.extend(ordered)
        self.tally.casts += len(casts)

    def _widen_for_bodies(self, graph: onnx.GraphProto, final: Mapping[str, int]) -> None:
        """``compute=float32``: a narrow weight that If/Loop bodies read is widened once, in this scope,
        and the bodies read the float32 copy: one Cast, not one per body (silero_vad reads its LSTM
        weights in both branches of nested Ifs), and one decoded weight for the cost model."""
        casts: list[onnx.NodeProto] = []
        for node in list(graph.node):
            reads = sorted(n for n in subgraph_reads(node) if final.get(n) == self.target)
            for name in reads:
                if name not in self.widened:
                    self.widened[name] = unique_name(f"{name}/{_label(FLOAT)}", self.taken, self.suffix)
                    casts.append(self._cast(name, self.widened[name], FLOAT))
                for body in subgraph_protos(node):
                    rename_outer_reads(body, {name: self.widened[name]})
        self._insert(graph, casts)

    def _cast(self, source: str, dest: str, to: int) -> onnx.NodeProto:
        name = unique_name(f"fp16/{dest}", self.taken, self.suffix)
        return helper.make_node("Cast", [source], [dest], name=name, to=to)

    def _narrow_initializers(self, graph: onnx.GraphProto, names: set[str]) -> None:
        for k, tensor in enumerate(graph.initializer):
            if tensor.name in names and tensor.data_type == FLOAT:
                graph.initializer[k].CopyFrom(_narrow_tensor(tensor, self.target, self.tally))

    def _count(self, nodes: Mapping[int, plan.Node], narrow: set[int]) -> None:
        for index, view in sorted(nodes.items()):
            op = view.op_type
            if index in narrow:
                if view.outputs or any(u == "mode" for u in view.inputs.values()):
                    self.tally.converted[op] += 1
                continue
            if view.role == "neutral" and not view.outputs and all(u != "mode" for u in view.inputs.values()):
                continue  # reads either precision: nothing to convert
            reason = view.reason or "moves data only, and its producer or readers stay float32: converting it would add Casts"
            self.tally.kept.setdefault(op, Counter())[reason] += 1
            self.tally.layers.append(LayerDecision(view.name, op, "declined", f"kept float32: {reason}"))


def _label(dtype: int) -> str:
    return onnx.helper.tensor_dtype_to_string(dtype).removeprefix("TensorProto.").lower()


def _narrow_tensor(tensor: onnx.TensorProto, target: int, tally: _Tally) -> onnx.TensorProto:
    values = numpy_helper.to_array(tensor)
    narrow, clipped, flushed = narrow_array(values, target)
    tally.clipped += clipped
    tally.flushed += flushed
    out = numpy_helper.from_array(narrow, tensor.name)
    tally.constants += 1
    tally.bytes_before += values.size * 4
    tally.bytes_after += values.size * 2
    return out


def _retarget_attributes(node: onnx.NodeProto, target: int, tally: _Tally) -> None:
    """Point the attribute that types a narrow node's float32 output (Cast's ``to``, a Constant's value)
    at the narrow type."""
    if node.op_type == "Cast":
        for attr in node.attribute:
            if attr.name == "to" and attr.i == FLOAT:
                attr.i = target
    elif node.op_type in ("Constant", "ConstantOfShape"):
        for attr in node.attribute:
            if attr.name == "value" and attr.t.data_type == FLOAT:
                attr.t.CopyFrom(_narrow_tensor(attr.t, target, tally))
                return
        if node.op_type == "ConstantOfShape":  # the default value is a float32 zero
            zero, _, _ = narrow_array(np.zeros(1, dtype=np.float32), target)
            node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(zero, "")))
