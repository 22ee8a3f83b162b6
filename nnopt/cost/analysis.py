"""Static cost analysis of an ONNX model: params, MACs, FLOPs, bytes and a roofline latency estimate.

Conventions (the figures ``analyze`` reports follow these exactly):

* **MACs and FLOPs.** One MAC is one multiply-accumulate. Conv, ConvTranspose, Gemm, MatMul (and their
  integer/QLinear and com.microsoft Fused* forms, Einsum, LSTM/GRU/RNN) report MACs and FLOPs = 2 × MACs;
  bias adds are not counted.

  - Conv: MACs = N × C_out × out_spatial × (C_in/group) × kernel_area, so grouped and depthwise convs
    count only the connections that exist.
  - ConvTranspose: MACs = N × C_in × in_spatial × (C_out/group) × kernel_area.
  - Gemm: M × K × N MACs. MatMul: batch × M × K × N MACs (broadcast batch dims included).
  - Einsum: the product of all index sizes × (operands − 1) MACs; a one-operand Einsum costs its input
    elements when it reduces and 0 when it only transposes.
  - LSTM/GRU/RNN: the gate matmuls, seq × batch × directions × gates × hidden × (input + hidden) MACs;
    gate activations and the cell update are not counted.
  - Attention (opset 23): B × H × S_q × S_kv × (D_qk + D_v) MACs for Q·Kᵀ and scores·V; FLOPs are
    2 × MACs plus 5 per score for the softmax.

  Other ops report FLOPs only (MACs 0):

  - AveragePool/MaxPool/LpPool: output elements × kernel area; GlobalAveragePool/GlobalMaxPool/
    GlobalLpPool: input elements.
  - Elementwise ops (arithmetic, activations, comparisons, logic, Clip, Where, Cast, Quantize/
    DequantizeLinear...): 1 FLOP per output element, transcendental or not. Variadic Sum/Max/Min/Mean:
    (inputs − 1) × output elements. Resize/Upsample/GridSample: 1 per output element.
  - BatchNormalization: 2 per element (a folded per-channel scale and shift). LayerNormalization,
    InstanceNormalization, GroupNormalization, MeanVarianceNormalization: 5 per element (mean, variance,
    normalise, scale, shift). RMSNormalization, LpNormalization: 3 per element.
  - Softmax, LogSoftmax: 5 per element (max, subtract, exp, sum, divide). LRN: size + 3 per element.
    DynamicQuantizeLinear: 3 per element (range scan, scale, round-and-clip).
  - Reduce*, ArgMax/ArgMin, CumSum, TopK: input elements.
  - Data movement (Reshape, Transpose, Concat, Slice, Gather, Squeeze, Unsqueeze, Flatten, Shape,
    Identity, Constant, ConstantOfShape, Split, Pad, Expand, Tile, Dropout, ...): 0 FLOPs.
  - Ops without a cost rule (custom domains, rare ops): 0 FLOPs, bytes from shapes, and a note.

* **Params and weight bytes.** The constants of a model are its initializers, the outputs of Constant
  nodes, and the outputs of ConstantOfShape nodes whose shape input is itself constant (the tensor the
  node materialises is counted as weights, since that is what the model computes with). A node's
  ``params`` are the elements of the constants it reads, excluding int32/int64 tensors (shape and index
  metadata; this also leaves out the int32 biases of quantized ops); ``weight_bytes`` are the bytes of all
  the constants it reads as stored: itemsize × elements, sub-byte types (INT4/UINT4/FLOAT4, INT2/UINT2)
  packed and rounded up per tensor. A constant read by several nodes counts for each of them, but once
  (for its first consumer in topological order) in ``totals``. Nodes that produce constants (Constant,
  constant-shape ConstantOfShape) report ``output_bytes`` 0: their outputs are weights, not activations.
  Initializers no node reads are not counted (a note says how many there are).

  **Decoded weights** (what the ``kmeans`` pass writes) are counted once, at their logical size: a Gather
  whose data is a floating-point constant (a codebook) and whose indices are computed from constants only
  (stored indices through Cast, BitShift, Reshape, Slice, Add...) makes a weight at run time. That Gather's
  ``params`` are the elements of its output, the weight the model computes with; the constants read only
  by such decoders (codebook, stored indices, shift tables, channel offsets) count 0 params, so neither the
  codebook nor the index tensor is counted on top. Their ``weight_bytes`` stay the bytes as stored (uint8
  1 byte, UINT4 half a byte per index, bit-packed words their packed size) on the nodes that read them. The
  decoded weight itself is an activation of the decoder (``output_bytes``), as it is when onnxruntime runs
  the graph without constant folding. A decoder whose output shape is unknown is counted like any node.

* **Bytes.** A node's ``output_bytes`` are the elements × itemsize of its outputs; ``input_bytes`` those of
  its non-constant inputs; ``bytes_moved`` = input_bytes + weight_bytes + output_bytes.
  ``totals.activation_bytes`` is the sum of ``output_bytes`` over nodes. Tensors of unknown shape count 0.

* **Arithmetic intensity** = FLOPs ÷ bytes_moved (per node, and totals.flops ÷ totals.bytes_moved).

* **Latency estimate** (roofline, no overlap between nodes): per node max(FLOPs ÷ peak FLOP/s,
  bytes_moved ÷ bandwidth), summed over nodes. A profile without bandwidth gives FLOPs ÷ peak FLOP/s.
  A profile may add (``nnopt calibrate`` measures them; see ``nnopt.cost.hardware.HardwareProfile``): a
  fixed cost per node and per inference, and per kernel class (dense conv, depthwise conv, conv outside
  onnxruntime's blocked layout, conv with a weight computed at run time, int8) its own FLOP/s and fixed
  cost per node; with ``runtime="onnxruntime"`` nodes that onnxruntime folds into
  constants or fuses into another kernel cost 0 and QDQ-wrapped Conv/MatMul/Gemm run as int8 kernels
  (``nnopt.cost.rules.kernel_classes``). Each node's ``kernel`` says which class it was estimated as.

* **Shapes.** ONNX shape inference (with data propagation) runs on a copy of the model whose dynamic
  graph-input dims are made concrete: from ``input_shapes`` when given, otherwise every unknown dim is
  counted as 1 (the batch dim and any other), each assumption recorded in ``notes``. Main-graph tensors
  whose shapes inference leaves unknown are read by running the model once in onnxruntime (random
  inputs of those shapes) with the tensors added as graph outputs; a failure there is a note. Node
  outputs that nothing reads (an inference Dropout's mask) do not trigger that run and count 0 bytes
  when their shape is unknown.

* **Subgraphs.** An If node is costed as its costlier branch (by estimated latency): which branch runs
  is data-dependent, and the worst case is the honest bound. Models such as silero_vad keep their whole
  network inside an If, and counting 0 FLOPs there ranked them below far smaller models. The If's
  ``flops``/``macs``/``bytes_moved``/``latency_s`` include that branch's, and ``extra["branch_nodes"]``
  says how many nodes it has. Loop and Scan bodies are not costed (their trip counts are data-dependent;
  a note says how many nodes were skipped). Every subgraph node's ``params``/``weight_bytes`` are on its
  owner in the main graph, which includes the constants its bodies read, so the totals cover every weight
  once.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from nnopt.cost.hardware import DEFAULT_PROFILE, HardwareProfile
from nnopt.cost.rules import (
    Cost,
    CostContext,
    CostRuleRegistry,
    TensorInfo,
    UnknownShapeError,
    default_registry,
    kernel_classes,
    tensor_nbytes,
)
from nnopt.errors import InputError
from nnopt.ir.graphview import stable_topological_order, subgraph_reads
from nnopt.ir.model import Model, load_model

#: Data types that are shape/index metadata rather than weights: not counted as params.
_METADATA_DTYPES = frozenset({onnx.TensorProto.INT32, onnx.TensorProto.INT64})
#: Data types of codebooks: a Gather from one of these, with indices computed from constants, decodes a weight.
_FLOAT_DTYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                           onnx.TensorProto.BFLOAT16})
#: Initializers up to this many elements keep their values in the shape-inference copy (data propagation
#: needs shape vectors, Resize scales and the like); larger ones are stripped to name, type and dims.
_KEEP_DATA_ELEMENTS = 4096
#: How many example names a note lists before "...".
_NOTE_EXAMPLES = 3


# ---------------------------------------------------------------------------------------------- report
@dataclass
class CostReport:
    """The result of :func:`analyze`.

    Attributes:
        totals: Model-wide figures: ``params, macs, flops, weight_bytes, activation_bytes, bytes_moved,
            latency_s, arithmetic_intensity, nodes, uncosted_nodes``.
        nodes: One dict per main-graph node in topological order, with ``name, op_type, domain, params,
            macs, flops, weight_bytes, input_bytes, output_bytes, bytes_moved, arithmetic_intensity,
            latency_s, bound ("compute"/"memory"/""), kernel (see ``nnopt.cost.rules.kernel_classes``),
            output_shapes, costed, extra``.
        notes: Assumptions made and things not counted, one sentence each.
        hardware: The profile the latency estimate used.
        input_shapes: The concrete graph-input shapes the analysis used.
    """

    totals: dict[str, float | int]
    nodes: list[dict[str, Any]]
    notes: list[str]
    hardware: HardwareProfile
    input_shapes: dict[str, list[int]]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict: ``totals, nodes, notes, hardware, input_shapes``."""
        return {
            "totals": dict(self.totals),
            "nodes": [dict(node) for node in self.nodes],
            "notes": list(self.notes),
            "hardware": self.hardware.to_dict(),
            "input_shapes": {name: list(dims) for name, dims in self.input_shapes.items()},
        }

    def format_table(self, max_rows: int | None = None) -> str:
        """A per-node table, a totals line and the notes, as plain text.

        Args:
            max_rows: Show at most this many nodes: the most expensive by estimated latency (then FLOPs),
                still in graph order. None shows every node.
        """
        rows = list(enumerate(self.nodes))
        if max_rows is not None and len(rows) > max_rows:
            ranked = sorted(rows, key=lambda r: (-r[1]["latency_s"], -r[1]["flops"], r[0]))
            rows = sorted(ranked[: max(0, max_rows)], key=lambda r: r[0])
        total_latency = float(self.totals["latency_s"]) or 1.0
        header = ["#", "name", "op", "output shape", "params", "MACs", "FLOPs", "out bytes", "FLOP/B",
                  "latency", "%"]  # fmt: skip
        table = [header]
        for index, node in rows:
            op = f"{node['domain']}:{node['op_type']}" if node["domain"] else node["op_type"]
            table.append(
                [
                    str(index),
                    _truncate(node["name"], 36),
                    _truncate(op, 24),
                    _truncate(_format_shapes(node["output_shapes"]), 24),
                    _si(node["params"]),
                    _si(node["macs"]),
                    _si(node["flops"]) + ("" if node["costed"] else "?"),
                    _si(node["output_bytes"], "B"),
                    f"{node['arithmetic_intensity']:.1f}",
                    _format_seconds(node["latency_s"]),
                    f"{100 * node['latency_s'] / total_latency:.1f}",
                ]
            )
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        left = {1, 2, 3}
        lines = [
            "  ".join(
                cell.ljust(widths[i]) if i in left else cell.rjust(widths[i]) for i, cell in enumerate(row)
            )
            for row in table
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        hidden = len(self.nodes) - len(rows)
        if hidden > 0:
            shown = {i for i, _ in rows}
            rest = sum(n["latency_s"] for i, n in enumerate(self.nodes) if i not in shown)
            lines.append(
                f"... {hidden} more nodes not shown ({100 * rest / total_latency:.1f}% of estimated latency)"
            )
        t = self.totals
        hw = self.hardware
        bandwidth = f", {_si(hw.bandwidth, 'B/s')}" if hw.bandwidth is not None else ", bandwidth not given"
        lines.append("")
        lines.append(
            f"total: {t['nodes']} nodes, {_si(t['params'])} params ({_si(t['weight_bytes'], 'B')} weights), "
            f"{_si(t['macs'])} MACs, {_si(t['flops'])} FLOPs, {_si(t['activation_bytes'], 'B')} activations, "
            f"{t['arithmetic_intensity']:.1f} FLOP/B, estimated latency {_format_seconds(t['latency_s'])}"
        )
        lines.append(f"hardware: {hw.name} ({_si(hw.peak_flops, 'FLOP/s')}{bandwidth})")
        if self.input_shapes:
            shapes = ", ".join(
                f"{n}={'x'.join(map(str, d)) or 'scalar'}" for n, d in self.input_shapes.items()
            )
            lines.append(f"input shapes: {shapes}")
        if self.notes:
            lines.append("notes:")
            lines.extend(f"  - {note}" for note in self.notes)
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- input shapes
def parse_input_shapes(items: list[str]) -> dict[str, list[int]]:
    """Parse ``NAME=1,3,224,224`` strings (``x`` also separates dims: ``NAME=1x3x224x224``).

    The name is everything before the last ``=``, so names containing ``:`` or ``/`` work.

    Raises:
        InputError: an item without ``=``, an empty name, a dim that is not a positive integer, or a name
            given twice.
    """
    shapes: dict[str, list[int]] = {}
    for item in items:
        name, sep, dims_text = item.rpartition("=")
        name = name.strip()
        if not sep or not name:
            raise InputError(f"input shape '{item}': expected NAME=D1,D2,... such as x=1,3,224,224")
        parts = [p.strip() for p in dims_text.replace("x", ",").replace("X", ",").split(",")]
        if parts == [""]:
            raise InputError(f"input shape '{item}': no dims after '='; expected NAME=D1,D2,...")
        dims = []
        for part in parts:
            if not part.isdigit() or int(part) < 1:
                raise InputError(
                    f"input shape '{item}': dim '{part}' is not a positive integer; expected NAME=D1,D2,..."
                )
            dims.append(int(part))
        if name in shapes:
            raise InputError(f"input shape for '{name}' given twice")
        shapes[name] = dims
    return shapes


# ---------------------------------------------------------------------------------------------- analysis
@dataclass
class _Const:
    """A constant tensor: its size, and how to get its values if a rule asks."""

    dtype: int | None
    shape: tuple[int, ...] | None
    nbytes: int
    params: int
    load: Callable[[], np.ndarray | None]


@dataclass
class _Findings:
    """What the walk over the nodes found that deserves a note, aggregated per op."""

    no_rule: Counter[str] = field(default_factory=Counter)
    unknown_shape: dict[str, list[str]] = field(default_factory=dict)
    rule_failed: dict[str, tuple[int, str]] = field(default_factory=dict)
    subgraph_nodes: int = 0
    subgraph_ops: Counter[str] = field(default_factory=Counter)


def analyze(
    model: Model | onnx.ModelProto | str | os.PathLike[str],
    *,
    hardware: HardwareProfile | None = None,
    input_shapes: dict[str, list[int]] | None = None,
    rules: CostRuleRegistry | None = None,
    run_onnxruntime: bool = True,
) -> CostReport:
    """Estimate the cost of every main-graph node and the model's totals (see the module docstring).

    Args:
        model: A Model, a ModelProto (weights need not be loaded: only dims are read, except for the
            onnxruntime fallback), or a path to load.
        hardware: The profile for the latency estimate; :data:`~nnopt.cost.hardware.DEFAULT_PROFILE` if None.
        input_shapes: Concrete shapes for graph inputs, overriding dynamic (or fixed) dims.
        rules: The cost rules; :func:`~nnopt.cost.rules.default_registry` if None.
        run_onnxruntime: Whether shapes that inference leaves unknown may be read by running the model.

    Raises:
        InputError: ``input_shapes`` names an input the model does not have, gives the wrong rank, or a
            dim below 1.
    """
    if isinstance(model, (str, os.PathLike)):
        model = load_model(model)
    proto = model.to_proto() if isinstance(model, Model) else model
    hardware = DEFAULT_PROFILE if hardware is None else hardware
    rules = default_registry() if rules is None else rules
    graph = proto.graph
    notes: list[str] = []
    opsets = {_norm_domain(o.domain): o.version for o in proto.opset_import}

    init_names = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    fixed, overridden = _resolve_input_shapes(graph, init_names, input_shapes or {}, notes)
    order, cyclic = _topological_order(graph.node)
    if cyclic:
        notes.append("the graph has a cycle or reads undefined tensors; nodes were costed in file order")
    nodes = [graph.node[i] for i in order]

    infos = _infer_shapes(proto, nodes, fixed, overridden, notes)
    consts = _collect_constants(graph, nodes, infos)
    for name, const in consts.items():
        infos[name] = TensorInfo(name, const.dtype, const.shape, is_constant=True)

    # Outputs nothing reads (an inference Dropout's mask, say) cannot change any other figure: they are
    # not worth running the model for, and count 0 bytes when inference leaves them unknown.
    needed = {name for node in nodes for name in _read_names(node)} | {o.name for o in graph.output}
    unknown = [out for node in nodes for out in node.output if out in needed and _unknown(infos.get(out))]
    if unknown:
        _fill_unknown_shapes(proto, fixed, unknown, infos, consts, run_onnxruntime, notes)

    findings = _Findings()
    decoded, storage = _decoded_weights(nodes, consts, infos)
    records, totals = _cost_nodes(nodes, order, infos, consts, opsets, rules, hardware, findings, decoded, storage,
                                  graph_outputs=[o.name for o in graph.output])
    unused = [t.name for t in graph.initializer if t.name not in needed]
    notes.extend(_finding_notes(findings, unused))
    return CostReport(totals=totals, nodes=records, notes=notes, hardware=hardware, input_shapes=fixed)


def _cost_nodes(
    nodes: list[onnx.NodeProto],
    order: list[int],
    infos: dict[str, TensorInfo],
    consts: dict[str, _Const],
    opsets: dict[str, int],
    rules: CostRuleRegistry,
    hardware: HardwareProfile,
    findings: _Findings,
    decoded: dict[str, int],
    storage: set[str],
    graph_outputs: list[str] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, float | int]]:
    counted: set[str] = set()
    # Kernel class per node (in ``nodes`` order), for profiles that model a runtime or give per-class figures.
    kernels = (
        kernel_classes(nodes, infos, consts, hardware.runtime, graph_outputs or ())
        if hardware.models_runtime
        else None
    )
    records = []
    totals: dict[str, float | int] = dict.fromkeys(
        ("params", "macs", "flops", "weight_bytes", "activation_bytes", "bytes_moved", "uncosted_nodes"), 0
    )
    totals["latency_s"] = 0.0

    def load(name: str) -> np.ndarray | None:
        const = consts.get(name)
        return const.load() if const is not None else None

    for index, node in zip(order, nodes):
        domain = _norm_domain(node.domain)
        label = f"{domain}:{node.op_type}" if domain else node.op_type
        name = node.name or f"{node.op_type}_{index}"
        inputs = [_info(infos, n) if n else None for n in node.input]
        outputs = [_info(infos, n) if n else None for n in node.output]
        cost, costed = _run_rule(
            node, label, name, inputs, outputs, opsets.get(domain), rules, load, findings
        )

        read = {n: consts[n] for n in node.input if n in consts}
        branch = None
        if _has_subgraph(node):
            read.update(_subgraph_constants(node, consts, findings, infos))
            if node.op_type == "If" and domain == "":
                branch = _costliest_branch(node, infos, consts, opsets, rules, hardware, findings)
        # A decoder's stored constants count their bytes; the weight it makes counts as its params.
        logical = decoded.get(node.output[0], 0) if node.output else 0
        params = sum(c.params for n, c in read.items() if n not in storage) + logical
        weight_bytes = sum(c.nbytes for c in read.values())
        totals["params"] += logical
        for n, const in read.items():
            if n not in counted:
                counted.add(n)
                totals["params"] += 0 if n in storage else const.params
                totals["weight_bytes"] += const.nbytes
        input_bytes = sum(infos[n].nbytes or 0 for n in dict.fromkeys(node.input) if n and n not in consts)
        produces_constant = all(n in consts for n in node.output if n)
        output_bytes = 0 if produces_constant else sum(o.nbytes or 0 for o in outputs if o is not None)
        moved = input_bytes + weight_bytes + output_bytes
        kernel = kernels[len(records)] if kernels is not None else "other"  # len(records): this node's position
        if branch is None:
            latency, compute_s, memory_s = hardware.node_latency(kernel, cost.flops, moved)
        else:
            # The branch's nodes count the weights they read; the If itself only moves its inputs and outputs.
            latency, compute_s, memory_s = hardware.node_latency(kernel, cost.flops, input_bytes + output_bytes)
            cost = Cost(cost.macs + int(branch["macs"]), cost.flops + int(branch["flops"]),
                        {**cost.extra, "branch_nodes": float(branch["nodes"])})
            moved = input_bytes + output_bytes + int(branch["bytes_moved"])
            latency += branch["latency_s"]
            # Whether the branch as a whole is compute- or memory-bound, by the plain roofline.
            compute_s, memory_s = cost.flops / hardware.peak_flops, moved / hardware.bandwidth if hardware.bandwidth else 0.0
        bound = "" if latency == 0 else ("compute" if compute_s >= memory_s else "memory")
        records.append(
            {
                "name": name,
                "op_type": node.op_type,
                "domain": domain,
                "params": int(params),
                "macs": int(cost.macs),
                "flops": int(cost.flops),
                "weight_bytes": int(weight_bytes),
                "input_bytes": int(input_bytes),
                "output_bytes": int(output_bytes),
                "bytes_moved": int(moved),
                "arithmetic_intensity": cost.flops / moved if moved else 0.0,
                "latency_s": latency,
                "bound": bound,
                "kernel": kernel,
                "output_shapes": [
                    list(o.shape) if o is not None and o.shape is not None else None for o in outputs
                ],
                "costed": costed,
                "extra": cost.extra,
            }
        )
        totals["macs"] += int(cost.macs)
        totals["flops"] += int(cost.flops)
        totals["activation_bytes"] += int(output_bytes)
        totals["bytes_moved"] += int(moved)
        totals["latency_s"] += latency
        totals["uncosted_nodes"] += 0 if costed else 1
    totals["latency_s"] += hardware.run_overhead_s
    totals["nodes"] = len(records)
    totals["arithmetic_intensity"] = totals["flops"] / totals["bytes_moved"] if totals["bytes_moved"] else 0.0
    return records, totals


def _costliest_branch(
    node: onnx.NodeProto,
    infos: dict[str, TensorInfo],
    outer: dict[str, _Const],
    opsets: dict[str, int],
    rules: CostRuleRegistry,
    hardware: HardwareProfile,
    findings: _Findings,
) -> dict[str, float | int]:
    """Totals of the If ``node``'s branch with the highest estimated latency (no per-run overhead).

    Each branch is costed like a graph of its own: its initializers and Constant nodes join the outer
    scope's constants, shapes come from the inference over the whole model, nested Ifs recurse.
    """
    best: dict[str, float | int] | None = None
    for body in _subgraphs(node):
        scope = {**outer, **_body_constants(body)}
        order, _ = _topological_order(body.node)
        nodes = [body.node[i] for i in order]
        decoded, storage = _decoded_weights(nodes, scope, infos)
        _, totals = _cost_nodes(nodes, order, infos, scope, opsets, rules, hardware, findings, decoded, storage,
                                graph_outputs=[o.name for o in body.output])
        totals["latency_s"] -= hardware.run_overhead_s
        if best is None or totals["latency_s"] > best["latency_s"]:
            best = totals
    assert best is not None  # an If has two branches
    return best


def _run_rule(
    node: onnx.NodeProto,
    label: str,
    name: str,
    inputs: list[TensorInfo | None],
    outputs: list[TensorInfo | None],
    opset: int | None,
    rules: CostRuleRegistry,
    load: Callable[[str], np.ndarray | None],
    findings: _Findings,
) -> tuple[Cost, bool]:
    """The node's cost and whether it was actually costed (a rule ran and succeeded)."""
    rule = rules.lookup(node.domain, node.op_type, opset)
    if rule is None:
        findings.no_rule[label] += 1
        return Cost(), False
    try:
        result = rule.fn(CostContext(node, inputs, outputs, opset, load))
        # Normalised inside the try: a plugin rule returning something odd is a note, not a crash.
        if isinstance(result, tuple):
            macs, flops = result
            result = Cost(macs=macs, flops=flops)
        cost = Cost(int(result.macs), int(result.flops), {str(k): float(v) for k, v in result.extra.items()})
    except UnknownShapeError:
        findings.unknown_shape.setdefault(label, []).append(name)
        return Cost(), False
    except Exception as exc:  # noqa: BLE001 - boundary: a plugin's rule must not abort analysis
        count, first = findings.rule_failed.get(label, (0, f"{type(exc).__name__}: {_first_line(exc)}"))
        findings.rule_failed[label] = (count + 1, first)
        return Cost(), False
    return cost, True


def _finding_notes(findings: _Findings, unused: list[str]) -> Iterator[str]:
    for label, count in sorted(findings.no_rule.items()):
        nodes = f" ({count} nodes)" if count > 1 else ""
        yield f"op {label} has no cost rule: 0 FLOPs{nodes}"
    for label, names in sorted(findings.unknown_shape.items()):
        yield f"{len(names)} {label} node(s) have unknown shapes and count 0 FLOPs: {_examples(names)}"
    for label, (count, first) in sorted(findings.rule_failed.items()):
        yield f"the cost rule for {label} failed on {count} node(s) and they were counted as 0 FLOPs: {first}"
    if findings.subgraph_nodes:
        ops = ", ".join(sorted(findings.subgraph_ops))
        yield (
            f"Loop/Scan bodies are not costed: {findings.subgraph_nodes} nodes inside {ops} count 0 FLOPs "
            "(their constants are counted as params)"
        )
    if unused:
        yield f"{len(unused)} initializer(s) are not read by any node and not counted: {_examples(unused)}"


# ---------------------------------------------------------------------------------------------- shapes
def _resolve_input_shapes(
    graph: onnx.GraphProto, init_names: set[str], given: dict[str, list[int]], notes: list[str]
) -> tuple[dict[str, list[int]], bool]:
    """Concrete dims for every graph input, and whether ``given`` changed a dim the model fixed."""
    inputs = [vi for vi in graph.input if vi.name not in init_names]
    names = [vi.name for vi in inputs]
    unknown = [name for name in given if name not in names]
    if unknown:
        raise InputError(
            f"input shape given for '{unknown[0]}', which is not a graph input; inputs are: "
            f"{', '.join(names) or 'none'}"
        )
    fixed: dict[str, list[int]] = {}
    overridden = False
    for vi in inputs:
        declared = _declared_dims(vi)
        if vi.name in given:
            dims = [int(d) for d in given[vi.name]]
            if any(d < 1 for d in dims):
                raise InputError(f"input shape for '{vi.name}': dims must be at least 1, got {dims}")
            if declared is not None and len(declared) != len(dims):
                raise InputError(
                    f"input shape for '{vi.name}' has {len(dims)} dims but the input has rank {len(declared)}"
                )
            changed = [i for i, d in enumerate(declared or []) if isinstance(d, int) and d != dims[i]]
            if changed:
                overridden = True
                notes.append(
                    f"input '{vi.name}': fixed dim(s) {', '.join(map(str, changed))} overridden by the "
                    f"given shape {dims}"
                )
            fixed[vi.name] = dims
            continue
        if declared is None:
            if vi.type.HasField("tensor_type"):
                notes.append(f"input '{vi.name}' has no declared shape; give its shape to cost what reads it")
            continue
        dims = []
        for axis, dim in enumerate(declared):
            if isinstance(dim, int):
                dims.append(dim)
                continue
            dims.append(1)
            symbol = f" '{dim}'" if dim else ""
            if axis == 0:
                notes.append(f"input '{vi.name}': unknown batch dim{symbol} counted as 1")
            else:
                notes.append(
                    f"input '{vi.name}': unknown dim {axis}{symbol} counted as 1; pass input shapes to set it"
                )
        fixed[vi.name] = dims
    return fixed, overridden


def _declared_dims(vi: onnx.ValueInfoProto) -> list[int | str] | None:
    """Per dim its value, or its symbol ("" when anonymous); None when the rank is unknown."""
    if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return None
    return [
        d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else d.dim_param
        for d in vi.type.tensor_type.shape.dim
    ]


def _set_dims(vi: onnx.ValueInfoProto, dims: list[int]) -> None:
    if not vi.type.HasField("tensor_type"):
        return  # NOTE: touching tensor_type on a sequence/map input would switch its type oneof.
    shape = vi.type.tensor_type.shape
    del shape.dim[:]
    for d in dims:
        shape.dim.add().dim_value = d


def _infer_shapes(
    proto: onnx.ModelProto,
    nodes: list[onnx.NodeProto],
    fixed: dict[str, list[int]],
    overridden: bool,
    notes: list[str],
) -> dict[str, TensorInfo]:
    """Run ONNX shape inference on a weight-stripped copy with concrete input dims; read what it found."""
    light = onnx.ModelProto(ir_version=proto.ir_version)
    light.opset_import.extend(proto.opset_import)
    light.functions.extend(proto.functions)
    g = light.graph
    g.name = proto.graph.name
    g.input.extend(proto.graph.input)
    g.output.extend(proto.graph.output)
    g.value_info.extend(proto.graph.value_info)
    # NOTE: copying nodes copies Constant tensors too; big ones are stripped below like initializers.
    g.node.extend(nodes)
    g.initializer.extend(_stripped(t) for t in proto.graph.initializer)
    g.sparse_initializer.extend(proto.graph.sparse_initializer)
    for node in g.node:
        if node.op_type == "Constant" and _norm_domain(node.domain) == "":
            for attr in node.attribute:
                if attr.name == "value" and attr.HasField("t"):
                    attr.t.CopyFrom(_stripped(attr.t))
    for vi in g.input:
        if vi.name in fixed:
            _set_dims(vi, fixed[vi.name])
    for vi in [*g.value_info, *g.output]:
        # Symbolic dims would be kept over the inferred values; stale fixed dims (when the user changed a
        # fixed input dim) would silently win over the new ones in non-strict mode, so drop those too.
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            if overridden:
                vi.type.tensor_type.ClearField("shape")
            else:
                for d in vi.type.tensor_type.shape.dim:
                    if not d.HasField("dim_value"):
                        d.Clear()
    try:
        light = onnx.shape_inference.infer_shapes(light, check_type=False, strict_mode=False, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - boundary: onnx raises several types
        notes.append(f"onnx shape inference failed ({_first_line(exc)}); only declared shapes were used")
    infos: dict[str, TensorInfo] = {}
    for vi in [*light.graph.input, *light.graph.value_info, *light.graph.output]:
        info = _info_from_value_info(vi)
        if info is not None and (info.shape is not None or vi.name not in infos):
            infos[vi.name] = info
    # Subgraph bodies get value_info too; their names are distinct from the main graph's (ONNX is SSA
    # across scopes). The decoded-weight rule and the costing of If branches read them.
    for body in list(_iter_bodies(light.graph)):
        for vi in [*body.input, *body.value_info, *body.output]:
            info = _info_from_value_info(vi)
            if info is not None and vi.name not in infos:
                infos[vi.name] = info
    return infos


def _iter_bodies(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    for node in graph.node:
        for body in _subgraphs(node):
            yield body
            yield from _iter_bodies(body)


def _stripped(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """``tensor`` itself when small, else a copy with its name, type and dims but no data."""
    external = tensor.data_location == onnx.TensorProto.EXTERNAL
    if math.prod(tensor.dims) <= _KEEP_DATA_ELEMENTS and not external:
        return tensor
    return onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)


def _info_from_value_info(vi: onnx.ValueInfoProto) -> TensorInfo | None:
    if not vi.type.HasField("tensor_type"):
        return None
    tensor_type = vi.type.tensor_type
    dtype = tensor_type.elem_type or None
    shape = None
    if tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in tensor_type.shape.dim):
        shape = tuple(d.dim_value for d in tensor_type.shape.dim)
    return TensorInfo(vi.name, dtype, shape)


def _unknown(info: TensorInfo | None) -> bool:
    return info is None or info.shape is None or info.dtype is None


def _info(infos: dict[str, TensorInfo], name: str) -> TensorInfo:
    info = infos.get(name)
    if info is None:
        info = infos[name] = TensorInfo(name, None, None)
    return info


def _fill_unknown_shapes(
    proto: onnx.ModelProto,
    fixed: dict[str, list[int]],
    unknown: list[str],
    infos: dict[str, TensorInfo],
    consts: dict[str, _Const],
    run_onnxruntime: bool,
    notes: list[str],
) -> None:
    """Read the real shapes of ``unknown`` main-graph tensors by running the model once in onnxruntime."""
    if not run_onnxruntime:
        notes.append(
            f"{len(unknown)} tensor(s) have unknown shapes and count 0 bytes (onnxruntime fallback "
            f"disabled): {_examples(unknown)}"
        )
        return
    # Imported here: onnxruntime is slow to import and most analyses never need it.
    from nnopt.runtime import make_feeds, make_session

    run = onnx.ModelProto()
    run.CopyFrom(proto)
    for vi in run.graph.input:
        if vi.name in fixed:
            _set_dims(vi, fixed[vi.name])
    present = {o.name for o in run.graph.output}
    run.graph.output.extend(onnx.ValueInfoProto(name=n) for n in unknown if n not in present)
    try:
        session = make_session(run, optimize=False)
        values = session.run(unknown, make_feeds(session, fixed))
    except Exception as exc:  # noqa: BLE001 - boundary: a failure only costs those shapes
        notes.append(
            f"{len(unknown)} tensor(s) have unknown shapes after shape inference and running the model in "
            f"onnxruntime failed ({_first_line(exc)}); they count 0 bytes: {_examples(unknown)}"
        )
        return
    missing = []
    for name, value in zip(unknown, values):
        if isinstance(value, np.ndarray) and name not in consts:
            try:
                dtype: int | None = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
            except (KeyError, TypeError, ValueError):
                dtype = infos[name].dtype if name in infos else None
            infos[name] = TensorInfo(name, dtype, tuple(int(d) for d in value.shape))
        else:
            missing.append(name)
    notes.append(
        f"{len(unknown) - len(missing)} tensor shape(s) that shape inference left unknown were read by "
        "running the model once in onnxruntime with random inputs (data-dependent shapes may differ)"
    )
    if missing:
        notes.append(
            f"{len(missing)} non-tensor output(s) have no shape and count 0 bytes: {_examples(missing)}"
        )


# ---------------------------------------------------------------------------------------------- constants
def _collect_constants(
    graph: onnx.GraphProto, nodes: list[onnx.NodeProto], infos: dict[str, TensorInfo]
) -> dict[str, _Const]:
    """Initializers, Constant outputs and constant-shape ConstantOfShape outputs of the main graph."""
    consts: dict[str, _Const] = {t.name: _const_from_tensor(t) for t in graph.initializer}
    for sparse in graph.sparse_initializer:
        consts[sparse.values.name] = _const_from_sparse(sparse)
    for node in nodes:
        if _norm_domain(node.domain) != "" or not node.output or not node.output[0]:
            continue
        if node.op_type == "Constant":
            const = _const_from_constant_node(node)
            if const is not None:
                consts[node.output[0]] = const
        elif node.op_type == "ConstantOfShape" and node.input and node.input[0] in consts:
            const = _const_from_constant_of_shape(node, consts[node.input[0]], infos.get(node.output[0]))
            if const is not None:
                consts[node.output[0]] = const
    return consts


def _make_const(
    dtype: int | None, shape: tuple[int, ...] | None, load: Callable[[], np.ndarray | None]
) -> _Const:
    numel = math.prod(shape) if shape is not None else 0
    nbytes = tensor_nbytes(dtype, numel) or 0
    params = 0 if dtype in _METADATA_DTYPES else numel
    return _Const(dtype, shape, nbytes, params, load)


def _tensor_loader(tensor: onnx.TensorProto) -> Callable[[], np.ndarray | None]:
    def load() -> np.ndarray | None:
        try:
            return numpy_helper.to_array(tensor)
        except Exception:  # noqa: BLE001 - boundary: data not loaded, or an exotic type
            return None

    return load


def _const_from_tensor(tensor: onnx.TensorProto) -> _Const:
    return _make_const(tensor.data_type, tuple(tensor.dims), _tensor_loader(tensor))


def _const_from_sparse(sparse: onnx.SparseTensorProto) -> _Const:
    # Stored as values plus indices: that is what is on disk and what the node reads.
    values, indices = sparse.values, sparse.indices
    nbytes = (tensor_nbytes(values.data_type, math.prod(values.dims)) or 0) + (
        tensor_nbytes(indices.data_type, math.prod(indices.dims)) or 0
    )
    params = 0 if values.data_type in _METADATA_DTYPES else math.prod(values.dims)

    def load() -> np.ndarray | None:
        try:
            values_array = numpy_helper.to_array(values)
            index_array = numpy_helper.to_array(indices)
        except Exception:  # noqa: BLE001 - boundary: data not loaded, or an exotic type
            return None
        dense = np.zeros(math.prod(sparse.dims), dtype=values_array.dtype)
        # Indices are either flat positions [NNZ] or coordinates [NNZ, rank].
        flat = (
            index_array if index_array.ndim == 1 else np.ravel_multi_index(index_array.T, tuple(sparse.dims))
        )
        dense[flat] = values_array
        return dense.reshape(tuple(sparse.dims))

    return _Const(values.data_type, tuple(sparse.dims), nbytes, params, load)


def _const_from_constant_node(node: onnx.NodeProto) -> _Const | None:
    for attr in node.attribute:
        if attr.name == "value" and attr.HasField("t"):
            return _const_from_tensor(attr.t)
        if attr.name == "sparse_value" and attr.HasField("sparse_tensor"):
            return _const_from_sparse(attr.sparse_tensor)
        value = onnx.helper.get_attribute_value(attr)
        if attr.name in ("value_float", "value_int"):
            dtype = onnx.TensorProto.FLOAT if attr.name == "value_float" else onnx.TensorProto.INT64
            array = np.array(value, dtype=np.float32 if dtype == onnx.TensorProto.FLOAT else np.int64)
            return _make_const(dtype, (), lambda a=array: a)
        if attr.name in ("value_floats", "value_ints"):
            dtype = onnx.TensorProto.FLOAT if attr.name == "value_floats" else onnx.TensorProto.INT64
            array = np.array(list(value), dtype=np.float32 if dtype == onnx.TensorProto.FLOAT else np.int64)
            return _make_const(dtype, (len(array),), lambda a=array: a)
        if attr.name in ("value_string", "value_strings"):
            array = np.array(value if attr.name == "value_strings" else [value], dtype=object)
            shape = (len(array),) if attr.name == "value_strings" else ()
            return _make_const(onnx.TensorProto.STRING, shape, lambda a=array: a)
    return None


def _const_from_constant_of_shape(
    node: onnx.NodeProto, shape_const: _Const, inferred: TensorInfo | None
) -> _Const | None:
    value = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "value"), None)
    dtype = value.data_type if value is not None else onnx.TensorProto.FLOAT
    shape: tuple[int, ...] | None = inferred.shape if inferred is not None else None
    if shape is None:
        dims = shape_const.load()
        if dims is None:
            return None
        shape = tuple(int(d) for d in np.asarray(dims).reshape(-1))

    def load() -> np.ndarray | None:
        fill = numpy_helper.to_array(value).reshape(-1)[0] if value is not None else np.float32(0)
        return np.full(shape, fill)

    return _make_const(dtype, shape, load)


def _subgraph_constants(
    node: onnx.NodeProto, outer: dict[str, _Const], findings: _Findings, infos: dict[str, TensorInfo]
) -> dict[str, _Const]:
    """The constants an If/Loop/Scan node's bodies read: outer-scope ones and the bodies' own.

    Weights decoded inside a body appear as constants named after the decoder's output, with the decoded
    elements as params and 0 bytes; the constants only those decoders read count 0 params.
    """
    found: dict[str, _Const] = {}
    for graph in _subgraphs(node):
        _walk_subgraph(graph, node.op_type, outer, found, findings, infos)
    return found


def _walk_subgraph(
    graph: onnx.GraphProto,
    owner: str,
    outer: dict[str, _Const],
    found: dict[str, _Const],
    findings: _Findings,
    infos: dict[str, TensorInfo],
) -> None:
    local = _body_constants(graph)
    if owner != "If":  # If branches are costed (``_costliest_branch``); Loop/Scan bodies are not
        findings.subgraph_nodes += len(graph.node)
        findings.subgraph_ops[owner] += 1
    scope = {**outer, **local} if local else outer
    decoded, storage = _decoded_weights(list(graph.node), scope, infos)
    for sub in graph.node:
        for name in sub.input:
            if name in scope:
                found[name] = replace(scope[name], params=0) if name in storage else scope[name]
        for body in _subgraphs(sub):
            _walk_subgraph(body, owner, scope, found, findings, infos)
    for name, elements in decoded.items():
        info = infos[name]
        found[name] = _Const(info.dtype, info.shape, 0, elements, lambda: None)


def _body_constants(graph: onnx.GraphProto) -> dict[str, _Const]:
    """A subgraph body's own constants: its initializers and Constant node outputs."""
    local = {t.name: _const_from_tensor(t) for t in graph.initializer}
    for sub in graph.node:
        if sub.op_type == "Constant" and sub.output:
            const = _const_from_constant_node(sub)
            if const is not None:
                local[sub.output[0]] = const
    return local


def _decoded_weights(
    nodes: list[onnx.NodeProto], consts: dict[str, _Const], infos: dict[str, TensorInfo]
) -> tuple[dict[str, int], set[str]]:
    """Weights decoded at run time (see the module docstring): output name → elements, and the constants
    that only those decoders read (counted 0 params)."""
    # Tensors computed from constants only, each with the constants and nodes (indices) it comes from.
    derived: dict[str, tuple[frozenset[str], frozenset[int]]] = {}
    readers: dict[str, set[int]] = {}
    for i, node in enumerate(nodes):
        for name in _read_names(node):
            readers.setdefault(name, set()).add(i)
        ins = [n for n in node.input if n]
        if _norm_domain(node.domain) != "" or _has_subgraph(node) or not ins:
            continue
        if not all(n in consts or n in derived for n in ins):
            continue
        sources = frozenset(n for n in ins if n in consts).union(*(derived[n][0] for n in ins if n in derived))
        chain = frozenset({i}).union(*(derived[n][1] for n in ins if n in derived))
        for out in node.output:
            if out and out not in consts:
                derived[out] = (sources, chain)
    decoded: dict[str, int] = {}
    candidates: set[str] = set()
    decoder_nodes: set[int] = set()
    for name, (sources, chain) in derived.items():
        node = nodes[max(chain)]  # the node that produced ``name``: the last of its chain
        if node.op_type != "Gather" or len(node.input) != 2 or node.output[0] != name:
            continue
        data, indices = node.input
        info = infos.get(name)
        if (data not in consts or indices not in derived or info is None or info.shape is None
                or consts[data].dtype not in _FLOAT_DTYPES):
            continue
        decoded[name] = math.prod(info.shape)
        candidates |= sources
        decoder_nodes |= chain
    storage = {n for n in candidates if readers.get(n, set()) <= decoder_nodes}
    return decoded, storage


# ---------------------------------------------------------------------------------------------- graph walks
def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _read_names(node: onnx.NodeProto) -> list[str]:
    """Tensor names ``node`` reads, including those its subgraph bodies read from the outer scope."""
    return [*node.input, *sorted(subgraph_reads(node))]


def _topological_order(nodes: Any) -> tuple[list[int], bool]:
    """Node indices in topological order (file order when already sorted), and whether it failed."""
    producer: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for out in node.output:
            if out:
                producer[out] = i
    deps: list[set[int]] = []
    in_order = True
    for i, node in enumerate(nodes):
        names = _read_names(node) if _has_subgraph(node) else node.input
        d = {producer[n] for n in names if n in producer and producer[n] != i}
        in_order = in_order and all(j < i for j in d)
        deps.append(d)
    if in_order:
        return list(range(len(nodes))), False
    order = stable_topological_order(deps)
    if order is None:
        return list(range(len(nodes))), True
    return order, False


# ---------------------------------------------------------------------------------------------- formatting
def _norm_domain(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain


def _examples(names: list[str]) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:_NOTE_EXAMPLES])
    return shown + (", ..." if len(names) > _NOTE_EXAMPLES else "")


def _first_line(exc: BaseException, width: int = 200) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= width else line[: width - 3] + "..."


def _si(value: float | None, unit: str = "") -> str:
    """A number with an SI prefix: 10188864 -> '10.19M', (6750000, "B") -> '6.75 MB'."""
    if value is None:
        return "-"
    space = " " if unit else ""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{space}{prefix}{unit}"
    return f"{value:g}{space}{unit}" if isinstance(value, float) else f"{value}{space}{unit}"


def _format_seconds(seconds: float) -> str:
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "us")):
        if seconds >= scale:
            return f"{seconds / scale:.3f} {unit}"
    return f"{seconds / 1e-9:.3f} ns" if seconds else "0"


def _format_shapes(shapes: list[list[int] | None]) -> str:
    return " ".join("?" if s is None else "x".join(map(str, s)) or "scalar" for s in shapes)


def _truncate(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 2] + ".."
