"""Costing nodes: run each node's rule, count its weights and bytes, estimate its latency."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from nnopt.cost.constants import Const, body_constants, subgraph_constants
from nnopt.cost.decoded import DecodePatternRegistry, decoded_weights
from nnopt.cost.energy import dtype_class
from nnopt.cost.hardware import FREE_KERNELS, HardwareProfile
from nnopt.cost.layout import padded_work, reorders, step_padding
from nnopt.cost.notes import Findings
from nnopt.cost.report import first_line
from nnopt.cost.rules import Cost, CostContext, CostRuleRegistry, UnknownShapeError
from nnopt.cost.runtime_kernels import kernel_classes
from nnopt.cost.shapes import unknown
from nnopt.cost.tensors import TensorInfo
from nnopt.cost.walk import NodeView, node_views, order_of, subgraphs

#: The totals every graph's costing sums, besides ``latency_s`` and ``energy_j`` (floats) and the derived ``nodes``
#: and ``arithmetic_intensity``.
_SUMMED = ("params", "macs", "flops", "weight_bytes", "activation_bytes", "bytes_moved", "offchip_bytes",
           "uncosted_nodes")


@dataclass
class Scope:
    """What costing the nodes of one graph reads besides the nodes themselves.

    Attributes:
        infos: Tensor types and shapes by name (all scopes); unknown names are added as unknown.
        consts: The constants in scope (for a branch: the outer ones and its own).
        opsets: Opset version per (normalised) domain.
        rules, hardware, patterns: The cost rules, the latency profile and the decoded-weight patterns.
        findings: Where notes-worthy findings accumulate (shared by all scopes of one analysis).
        weights_offchip: Whether the model's weights are read from DRAM at every inference (they do not all
            fit in the profile's on-chip memory; see ``nnopt.cost.energy``).
    """

    infos: dict[str, TensorInfo]
    consts: Mapping[str, Const]
    opsets: dict[str, int]
    rules: CostRuleRegistry
    hardware: HardwareProfile
    patterns: DecodePatternRegistry
    findings: Findings
    weights_offchip: bool = False
    _nbytes: dict[str, int] = field(default_factory=dict, repr=False)

    def with_consts(self, consts: Mapping[str, Const]) -> Scope:
        """The same analysis over a graph whose constants are ``consts``."""
        return Scope(self.infos, consts, self.opsets, self.rules, self.hardware, self.patterns, self.findings,
                     self.weights_offchip, self._nbytes)  # fmt: skip

    def info(self, name: str) -> TensorInfo:
        """The tensor's info, recorded as unknown the first time an unknown name is asked for."""
        info = self.infos.get(name)
        if info is None:
            info = self.infos[name] = TensorInfo(name, None, None)
        return info

    def nbytes(self, info: TensorInfo) -> int:
        """The tensor's bytes (0 when unknown), computed once per tensor: most are read twice or more."""
        size = self._nbytes.get(info.name)
        if size is None:
            size = self._nbytes[info.name] = info.nbytes or 0
        return size

    def load(self, name: str) -> np.ndarray | None:
        """A constant's values (None if ``name`` is not a constant or its data is not loaded)."""
        const = self.consts.get(name)
        return const.load() if const is not None else None


@dataclass
class _Weights:
    """Which constants the graph has counted in its totals already, and how decoded weights count."""

    decoded: dict[str, int]
    storage: set[str]
    counted: set[str]


def cost_nodes(
    nodes: list[NodeView], order: list[int], scope: Scope, graph_outputs: list[str]
) -> tuple[list[dict[str, Any]], dict[str, float | int]]:
    """One record per node (``nodes`` topologically ordered; ``order``: their indices in the file, for
    default names), and the graph's totals including the profile's per-run overhead."""
    decoded, storage = decoded_weights(nodes, scope.consts, scope.infos, scope.patterns)
    weights = _Weights(decoded, storage, set())
    hardware = scope.hardware
    # Kernel class per node (in ``nodes`` order), for profiles that model a runtime or give per-class figures.
    kernels = (
        kernel_classes([n.proto for n in nodes], scope.infos, scope.consts, hardware.runtime, graph_outputs, decoded)
        if hardware.models_runtime
        else ["other"] * len(nodes)
    )
    totals: dict[str, float | int] = dict.fromkeys(_SUMMED, 0)
    totals["latency_s"] = totals["energy_j"] = 0.0
    records = [
        _cost_node(index, node, kernel, scope, weights, totals) for index, node, kernel in zip(order, nodes, kernels)
    ]
    if hardware.runtime == "onnxruntime" and hardware.nchwc_block:
        _add_reorders(records, totals, [n.proto for n in nodes], kernels, scope, graph_outputs)
    totals["latency_s"] += hardware.run_overhead_s
    totals["nodes"] = len(records)
    totals["arithmetic_intensity"] = totals["flops"] / totals["bytes_moved"] if totals["bytes_moved"] else 0.0
    return records, totals


def _add_reorders(
    records: list[dict[str, Any]],
    totals: dict[str, float | int],
    protos: list[onnx.NodeProto],
    kernels: list[str],
    scope: Scope,
    graph_outputs: list[str],
) -> None:
    """Charge each layout change onnxruntime adds (``nnopt.cost.layout``) to the node it is next to: a node that
    copies the tensor (read and write) at the profile's per-node overhead and bandwidth. Only the latency
    changes: FLOPs and bytes stay those of the graph as written; ``extra["reorders"]`` counts them and
    ``extra["reorder_s"]`` is their share of the node's ``latency_s``."""
    for reorder in reorders(protos, kernels, scope.infos, scope.hardware.nchwc_block, graph_outputs):
        record = records[reorder.node]
        latency, _, _ = scope.hardware.node_latency("other", 0, 2 * scope.nbytes(scope.info(reorder.tensor)))
        record["latency_s"] += latency
        extra = record["extra"]
        record["extra"] = {**extra, "reorders": extra.get("reorders", 0.0) + 1,
                           "reorder_s": extra.get("reorder_s", 0.0) + latency}  # fmt: skip
        totals["latency_s"] += latency


def _padding(node: NodeView, kernel: str, scope: Scope) -> float:
    """The extra work of a conv onnxruntime runs in its blocked layout on channels padded to the block
    (``nnopt.cost.layout.padded_work``), or of a 1-D conv's GEMM on steps padded to its column strips
    (``step_padding``); 1.0 for other nodes and profiles that do not model them."""
    hardware = scope.hardware
    if kernel == "conv1d" and kernel in hardware.kernels and hardware.runtime == "onnxruntime":
        # A profile with 1-D figures of its own measured them per FLOP of the padded steps.
        output = scope.infos.get(node.proto.output[0]) if node.proto.output else None
        shape = output.shape if output is not None else None
        return step_padding(shape[-1]) if shape is not None and len(shape) == 3 else 1.0
    if hardware.runtime != "onnxruntime" or not hardware.nchwc_block or node.op_type != "Conv":
        return 1.0
    return padded_work(node.proto, kernel, scope.infos, hardware.nchwc_block)


def _cost_node(
    index: int, node: NodeView, kernel: str, scope: Scope, weights: _Weights, totals: dict[str, float | int]
) -> dict[str, Any]:
    """The record of one node; adds its figures to ``totals``."""
    domain, op_type = node.domain, node.op_type
    label = f"{domain}:{op_type}" if domain else op_type
    name = node.name or f"{op_type}_{index}"
    consts, known, info = scope.consts, scope.infos.get, scope.info
    inputs = [(known(n) or info(n)) if n else None for n in node.inputs]
    outputs = [(known(n) or info(n)) if n else None for n in node.outputs]
    cost, costed = _run_rule(node.proto, label, name, inputs, outputs, scope.opsets.get(domain), scope)

    read = {n: consts[n] for n in node.inputs if n in consts}
    branch = None
    if node.has_subgraph:
        read.update(subgraph_constants(node.proto, consts, scope.findings, scope.infos, scope.patterns))
        if op_type == "If" and domain == "":
            branch = costliest_branch(node.proto, scope)
    params, weight_bytes = _count_weights(node, read, weights, totals)
    nbytes = scope.nbytes
    read_bytes = [nbytes(scope.infos[n]) for n in dict.fromkeys(node.inputs) if n and n not in consts]
    produces_constant = all(n in consts for n in node.outputs if n)
    written_bytes = [] if produces_constant else [nbytes(o) for o in outputs if o is not None]
    input_bytes, output_bytes = sum(read_bytes), sum(written_bytes)
    # An If's branch nodes count the weights they read; the If itself only moves its inputs and outputs.
    own_weight_bytes = weight_bytes if branch is None else 0
    moved = input_bytes + own_weight_bytes + output_bytes
    # Off the chip: an activation that alone overflows the on-chip memory, and every weight when they all do.
    energy = scope.hardware.energy
    offchip = sum(b for b in (*read_bytes, *written_bytes) if b > energy.cache_bytes)
    offchip += own_weight_bytes if scope.weights_offchip else 0
    if branch is None:
        # The output's shape picks a conv's rate in a calibrated profile's grid (GEMM shape matters).
        first = outputs[0] if outputs else None
        shape = first.shape if first is not None and first.shape is not None else None
        latency, compute_s, memory_s = scope.hardware.node_latency(kernel, cost.flops, moved, output_shape=shape,
                                                                   padding=_padding(node, kernel, scope))
    dtype = dtype_class(op_type, kernel, outputs[0].dtype if outputs and outputs[0] is not None else None)
    # A node the runtime folds or fuses away costs no latency, and no energy either.
    joules = 0.0 if kernel in FREE_KERNELS else energy.node_energy_j(dtype, cost.macs, cost.flops,
                                                                       moved - offchip, offchip)
    if branch is not None:
        cost, moved, latency, compute_s, memory_s = _with_branch(cost, kernel, input_bytes + output_bytes, branch,
                                                                 scope.hardware)
        joules += branch["energy_j"]
        offchip += int(branch["offchip_bytes"])
    bound = "" if latency == 0 else ("compute" if compute_s >= memory_s else "memory")
    totals["macs"] += cost.macs
    totals["flops"] += cost.flops
    totals["activation_bytes"] += output_bytes
    totals["bytes_moved"] += moved
    totals["latency_s"] += latency
    totals["energy_j"] += joules
    totals["offchip_bytes"] += offchip
    totals["uncosted_nodes"] += 0 if costed else 1
    return {
        "name": name,
        "op_type": op_type,
        "domain": domain,
        "params": int(params),
        "macs": cost.macs,
        "flops": cost.flops,
        "weight_bytes": int(weight_bytes),
        "input_bytes": int(input_bytes),
        "output_bytes": int(output_bytes),
        "bytes_moved": int(moved),
        "arithmetic_intensity": cost.flops / moved if moved else 0.0,
        "latency_s": latency,
        "energy_j": joules,
        "offchip_bytes": int(offchip),
        "dtype": dtype,
        "bound": bound,
        "kernel": kernel,
        "output_shapes": [list(o.shape) if o is not None and o.shape is not None else None for o in outputs],
        "costed": costed,
        "extra": cost.extra,
        "outputs": list(node.outputs),
    }


def _count_weights(
    node: NodeView, read: dict[str, Const], weights: _Weights, totals: dict[str, float | int]
) -> tuple[int, int]:
    """The node's params and weight bytes; adds each constant to ``totals`` the first time it is read.

    A decoder's stored constants count their bytes; the weight it makes counts as its params.
    """
    logical = weights.decoded.get(node.outputs[0], 0) if node.outputs and weights.decoded else 0
    totals["params"] += logical
    if not read:  # most nodes read activations only
        return logical, 0
    storage = weights.storage
    params = sum(c.params for n, c in read.items() if n not in storage) + logical
    weight_bytes = sum(c.nbytes for c in read.values())
    for n, const in read.items():
        if n not in weights.counted:
            weights.counted.add(n)
            totals["params"] += 0 if n in storage else const.params
            totals["weight_bytes"] += const.nbytes
    return params, weight_bytes


def _with_branch(
    cost: Cost, kernel: str, io_bytes: int, branch: dict[str, float | int], hardware: HardwareProfile
) -> tuple[Cost, int, float, float, float]:
    """An If's cost, bytes moved, latency and compute/memory seconds, its costliest branch included."""
    # The branch's nodes count the weights they read; the If itself only moves its inputs and outputs.
    latency, _, _ = hardware.node_latency(kernel, cost.flops, io_bytes)
    cost = Cost(cost.macs + int(branch["macs"]), cost.flops + int(branch["flops"]),
                {**cost.extra, "branch_nodes": float(branch["nodes"])})  # fmt: skip
    moved = io_bytes + int(branch["bytes_moved"])
    latency += branch["latency_s"]
    # Whether the branch as a whole is compute- or memory-bound, by the plain roofline.
    compute_s = cost.flops / hardware.peak_flops
    memory_s = moved / hardware.bandwidth if hardware.bandwidth else 0.0
    return cost, moved, latency, compute_s, memory_s


def costliest_branch(node: onnx.NodeProto, scope: Scope) -> dict[str, float | int]:
    """Totals of the If ``node``'s branch with the highest estimated latency (no per-run overhead).

    Each branch is costed like a graph of its own: its initializers and Constant nodes join the outer
    scope's constants, shapes come from the inference over the whole model, nested Ifs recurse.
    """
    best: dict[str, float | int] | None = None
    for body in subgraphs(node):
        views = node_views(body.node)
        order, _ = order_of([v.reads for v in views], [v.outputs for v in views])
        order = list(range(len(views))) if order is None else order
        nodes = [views[i] for i in order]
        local = body_constants(body)
        for name, const in local.items():
            # Shape inference gives a subgraph's Constant outputs a type, not its initializers (which
            # constants-to-initializers makes of them): without their shapes, weight shapes read as unknown.
            if unknown(scope.infos.get(name)):
                scope.infos[name] = TensorInfo(name, const.dtype, const.shape, is_constant=True)
        branch = scope.with_consts({**scope.consts, **local})
        _, totals = cost_nodes(nodes, order, branch, [o.name for o in body.output])
        totals["latency_s"] -= scope.hardware.run_overhead_s
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
    scope: Scope,
) -> tuple[Cost, bool]:
    """The node's cost (ints, a fresh ``extra``) and whether it was actually costed (a rule ran and
    succeeded)."""
    findings = scope.findings
    rule = scope.rules.lookup(node.domain, node.op_type, opset)
    if rule is None:
        findings.no_rule[label] += 1
        return Cost(), False
    load: Callable[[str], np.ndarray | None] = scope.load
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
        count, first = findings.rule_failed.get(label, (0, f"{type(exc).__name__}: {first_line(exc)}"))
        findings.rule_failed[label] = (count + 1, first)
        return Cost(), False
    return cost, True
