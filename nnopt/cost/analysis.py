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
  Which tensors are decoded weights is decided by the patterns of ``nnopt.cost.decoded`` (the built-in
  ones are the kmeans Gather above and hashed-sharing's Mul of such a Gather by a ±1 computed from
  constants, which counts once, as the outer weight; passes and plugins may register theirs).

* **Bytes.** A node's ``output_bytes`` are the elements × itemsize of its outputs; ``input_bytes`` those of
  its non-constant inputs; ``bytes_moved`` = input_bytes + weight_bytes + output_bytes.
  ``totals.activation_bytes`` is the sum of ``output_bytes`` over nodes. Tensors of unknown shape count 0.

* **Arithmetic intensity** = FLOPs ÷ bytes_moved (per node, and totals.flops ÷ totals.bytes_moved).

* **Latency estimate** (roofline, no overlap between nodes): per node max(FLOPs ÷ peak FLOP/s,
  bytes_moved ÷ bandwidth), summed over nodes. A profile without bandwidth gives FLOPs ÷ peak FLOP/s.
  A profile may add (``nnopt calibrate`` measures them; see ``nnopt.cost.hardware.HardwareProfile``): a
  fixed cost per node and per inference, and per kernel class (``nnopt.cost.hardware.KERNEL_CLASSES``:
  dense, 1×1, depthwise and grouped convs, convs outside onnxruntime's blocked layout, convs with a weight
  computed at run time, int8 dense/depthwise/matmul/elementwise kernels, Quantize/DequantizeLinear nodes,
  LSTM/GRU/RNN, Div, Sigmoid/Tanh/HardSwish) its own FLOP/s and fixed cost per node; with ``runtime="onnxruntime"`` nodes that onnxruntime
  folds into constants or fuses into another kernel cost 0, QDQ groups run as int8 kernels and the layout
  changes around blocked convs cost a copy each (``nnopt.cost.layout``); ``runtime="generic"``
  (the built-in x86 profile) folds only decoded weights and fuses only QDQ groups
  (``nnopt.cost.runtime_kernels.kernel_classes``). Each node's ``kernel`` says which class it was estimated as.

* **Energy estimate** (``nnopt.cost.energy``; the 45 nm figures of Horowitz, ISSCC 2014, unscaled): per node,
  MACs × pJ per MAC of its data type (fp32 4.6, fp16 1.5, int8 0.3 with a 32-bit accumulator, int32 3.2) +
  (FLOPs − 2 × MACs) × pJ per add of the type (0.9, 0.4, 0.03, 0.1) + bytes_moved at the on-chip price
  (the table's cache figure for the profile's ``cache_bytes``, 12.5 pJ/B for 1 MB) or the DRAM price
  (162.5 pJ/B) for the bytes that go off the chip: all weights when they do not all fit in ``cache_bytes``,
  and each activation tensor larger than it (``offchip_bytes``). The data type (``dtype``) is int8 for int8
  kernels (QLinear*/*Integer ops, QDQ groups the profile's runtime fuses), else its first output's type.
  Nodes the runtime folds or fuses cost 0, as in the latency estimate. ``totals.energy_j`` sums the nodes.

* **Batch and throughput.** ``batch`` (``nnopt analyze --batch N``) sets every input's first dim to N where
  the model leaves it dynamic or at 1 (a batch dim fixed at another value is refused); the figures are then
  those of one run of N samples, and ``totals.throughput_per_s`` = N ÷ ``latency_s`` (inferences per
  second; 1 ÷ latency at batch 1; 0 when the estimate is 0).

* **Shapes.** ONNX shape inference (with data propagation) runs on a copy of the model whose dynamic
  graph-input dims are made concrete: from ``input_shapes`` when given (``nnopt analyze --data`` and a
  pipeline with data give the shapes of the data's first sample, ``nnopt.cost.inputs.sample_input_shapes``),
  otherwise every unknown dim is counted as 1 (the batch dim and any other), each assumption recorded in
  ``notes``. Nodes that still cannot be costed are listed by ``CostReport.uncosted``. Main-graph tensors
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

import contextlib
import gc
import os
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

import onnx

from nnopt.cost.constants import collect_constants
from nnopt.cost.decoded import DecodePatternRegistry, default_decode_patterns
from nnopt.cost.hardware import DEFAULT_PROFILE, HardwareProfile, parse_hardware
from nnopt.cost.inputs import batched_input_shapes, resolve_input_shapes
from nnopt.cost.nodes import Scope, cost_nodes
from nnopt.cost.notes import Findings, finding_notes
from nnopt.cost.report import CostReport
from nnopt.cost.rules import CostRuleRegistry, default_registry
from nnopt.cost.shapes import fill_unknown_shapes, infer_tensor_infos, unknown
from nnopt.cost.tensors import TensorInfo, norm_domain
from nnopt.cost.walk import node_views, order_of
from nnopt.ir.model import Model, load_model

if TYPE_CHECKING:
    from nnopt.plugin_manager import Plugins


def analyze(
    model: Model | onnx.ModelProto | str | os.PathLike[str],
    *,
    hardware: HardwareProfile | None = None,
    input_shapes: dict[str, list[int]] | None = None,
    rules: CostRuleRegistry | None = None,
    run_onnxruntime: bool = True,
    decode_patterns: DecodePatternRegistry | None = None,
    counter: Counter[str] | None = None,
    batch: int | None = None,
) -> CostReport:
    """Estimate the cost of every main-graph node and the model's totals (see the module docstring).

    Args:
        model: A Model, a ModelProto (weights need not be loaded: only dims are read, except for the
            onnxruntime fallback), or a path to load.
        hardware: The profile for the latency estimate; :data:`~nnopt.cost.hardware.DEFAULT_PROFILE` if None.
        input_shapes: Concrete shapes for graph inputs, overriding dynamic (or fixed) dims.
        rules: The cost rules; :func:`~nnopt.cost.rules.default_registry` (no plugins') if None.
        run_onnxruntime: Whether shapes that inference leaves unknown may be read by running the model.
        decode_patterns: How weights decoded at run time are recognised;
            :func:`~nnopt.cost.decoded.default_decode_patterns` if None.
        counter: Counts the work done (``nnopt.analysis.shapes`` keys: shape inference runs).
        batch: Cost one run of this many samples: every input's batch dim set to it (see
            :func:`~nnopt.cost.inputs.batched_input_shapes`); None costs the shapes as given (batch 1).

    Raises:
        InputError: ``input_shapes`` names an input the model does not have, gives the wrong rank, or a
            dim below 1; ``batch`` is below 1 or an input's batch dim is fixed at another value than 1.
    """
    if isinstance(model, (str, os.PathLike)):
        model = load_model(model)
    with _without_cycle_collection():
        proto = model.to_proto() if isinstance(model, Model) else model
        return _analyze(
            proto,
            DEFAULT_PROFILE if hardware is None else hardware,
            input_shapes or {},
            default_registry() if rules is None else rules,
            run_onnxruntime,
            default_decode_patterns() if decode_patterns is None else decode_patterns,
            counter,
            batch,
        )


@contextlib.contextmanager
def _without_cycle_collection() -> Iterator[None]:
    """No cyclic garbage collection while the analysis runs, and none owed for it after.

    The analysis allocates several objects per node and tensor and frees them by reference counting; the
    collections those allocations trigger only walk them (and the caller's model) again and again: at
    40,000 nodes, 1.1-1.5 s of an analysis of about 4 s. At the end, the objects allocated meanwhile would
    all be young, and the first allocations after would pay for walking them: ``gc.freeze`` then
    ``gc.unfreeze`` moves every object to the oldest generation without walking it (unreachable cycles
    among them are still collected by the next full collection). When the caller froze objects itself
    (the pass manager does), they stay frozen: only ``freeze`` runs, and the caller's ``unfreeze`` releases
    these objects with its own.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        caller_froze = gc.get_freeze_count() > 0
        gc.freeze()
        if not caller_froze:
            gc.unfreeze()
        if enabled:
            gc.enable()


def _analyze(
    proto: onnx.ModelProto,
    hardware: HardwareProfile,
    input_shapes: dict[str, list[int]],
    rules: CostRuleRegistry,
    run_onnxruntime: bool,
    decode_patterns: DecodePatternRegistry,
    counter: Counter[str] | None,
    batch: int | None,
) -> CostReport:
    graph = proto.graph
    notes: list[str] = []

    init_names = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    if batch is not None:
        input_shapes = batched_input_shapes(graph, init_names, input_shapes, batch, notes)
    fixed, overridden = resolve_input_shapes(graph, init_names, input_shapes, notes)
    views = node_views(graph.node)
    order, cyclic = order_of([v.reads for v in views], [v.outputs for v in views])
    if cyclic:
        notes.append("the graph has a cycle or reads undefined tensors; nodes were costed in file order")
    infos = infer_tensor_infos(proto, order, fixed, overridden, notes, counter)
    nodes = views if order is None else [views[i] for i in order]
    order = list(range(len(views))) if order is None else order
    consts = collect_constants(graph, nodes, infos)
    for name, const in consts.items():
        infos[name] = TensorInfo(name, const.dtype, const.shape, is_constant=True)

    # Outputs nothing reads (an inference Dropout's mask, say) cannot change any other figure: they are
    # not worth running the model for, and count 0 bytes when inference leaves them unknown.
    needed = {name for node in nodes for name in node.reads} | {o.name for o in graph.output}
    missing = [out for node in nodes for out in node.outputs if out in needed and unknown(infos.get(out))]
    if missing:
        fill_unknown_shapes(proto, fixed, missing, infos, consts, run_onnxruntime, notes)

    scope = Scope(
        infos=infos,
        consts=consts,
        opsets={norm_domain(o.domain): o.version for o in proto.opset_import},
        rules=rules,
        hardware=hardware,
        patterns=decode_patterns,
        findings=Findings(),
        # Weights stay on the chip between inferences only if all of them fit (nnopt.cost.energy).
        weights_offchip=sum(c.nbytes for n, c in consts.items() if n in needed) > hardware.energy.cache_bytes,
    )
    records, totals = cost_nodes(nodes, order, scope, [o.name for o in graph.output])
    unused = [t.name for t in graph.initializer if t.name not in needed]
    notes.extend(finding_notes(scope.findings, unused))
    samples = 1 if batch is None else batch
    totals["throughput_per_s"] = samples / totals["latency_s"] if totals["latency_s"] > 0 else 0.0
    return CostReport(totals=totals, nodes=records, notes=notes, hardware=hardware, input_shapes=fixed, batch=samples)


def analyze_with_plugins(
    model: Model | onnx.ModelProto | str | os.PathLike[str],
    *,
    hardware: HardwareProfile | str | None = None,
    rules: CostRuleRegistry | None = None,
    plugins: Plugins | bool = True,
    input_shapes: dict[str, list[int]] | None = None,
    run_onnxruntime: bool = True,
    decode_patterns: DecodePatternRegistry | None = None,
    counter: Counter[str] | None = None,
    batch: int | None = None,
) -> CostReport:
    """:func:`analyze` with what the installed plugins register, as ``nnopt analyze`` does (``nnopt.analyze``).

    Args:
        model: As for :func:`analyze`.
        hardware: A profile, or a name / spec / profile file for
            :func:`~nnopt.cost.hardware.parse_hardware`, looked up among the plugins' profiles too;
            the default profile if None.
        rules: The cost rules; the plugins' (built-in ones included) if None.
        plugins: The loaded plugins to use; True loads the installed ones (unless the environment
            disables plugins); False uses only what nnopt ships.
        input_shapes, run_onnxruntime, decode_patterns, counter, batch: As for :func:`analyze`.
    """
    if plugins is True and (rules is None or isinstance(hardware, str)):
        from nnopt.plugin_manager import build_plugins

        plugins = build_plugins()
    if isinstance(hardware, str):
        from nnopt.cost.hardware import BUILTIN_PROFILES

        hardware = parse_hardware(hardware, BUILTIN_PROFILES if isinstance(plugins, bool) else plugins.hardware_registry())
    if rules is None and not isinstance(plugins, bool):
        rules = plugins.cost_rules
    return analyze(model, hardware=hardware, input_shapes=input_shapes, rules=rules, run_onnxruntime=run_onnxruntime,
                   decode_patterns=decode_patterns, counter=counter, batch=batch)
