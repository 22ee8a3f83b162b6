"""svd: factor the constant weight of a Gemm, MatMul or Conv into two thinner layers by a truncated SVD."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from nnopt.analysis.activations import channel_rows, run_convs
from nnopt.cost.hardware import HardwareProfile
from nnopt.ir.constants import constant_values
from nnopt.ir.model import Model
from nnopt.passes._latency import Step, Verdict, judge, run_profile
from nnopt.passes._lowrank import (
    Decline,
    LowRankOptions,
    RankRule,
    check_latency,
    check_min_saving,
    conv_bias,
    main_graph_costs,
    node_label,
    numerical_tolerance,
    optional_input,
    plan_layers,
    refit_plans,
    relative_error,
    saving,
    savings,
    scaled_flops,
    splice_plans,
    thin_svd,
    window_attrs,
)
from nnopt.pipeline.base import Figure, LayerDecision, Pass, PassContext, PassResult

_PREFIX = "svd"


@dataclass(frozen=True)
class SvdOptions(LowRankOptions):
    min_param_saving: float = field(
        default=0.1,
        metadata={
            "help": "rewrite a layer only where its weight params drop by at least this fraction "
            "(negative values allow growth)"
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_min_saving("min_param_saving", self.min_param_saving)


@dataclass
class _Layer:
    """A layer read as ``y = x · M + bias`` with a constant M (n × m), and its planned factors."""

    graph: gs.Graph
    node: gs.Node
    rule: _Rule
    matrix: np.ndarray  # n × m, float64
    dtype: np.dtype
    bias: np.ndarray  # (m,) float64, zeros if none; only scales the reported output errors
    intercept: bool  # whether a refit may add a bias correction the rewrite can carry
    kernel: tuple[int, ...] = ()  # Conv only: the spatial kernel shape
    left: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # n × r
    right: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # r × m
    delta: np.ndarray | None = None
    report: LayerDecision = field(init=False)  # "rewritten" once planned; the figures fill in as it goes

    def __post_init__(self) -> None:
        self.report = LayerDecision(node_label(self.node), self.node.op, "rewritten")

    def probe(self, xs: list[np.ndarray], opset: int) -> list[tuple[np.ndarray, np.ndarray]]:
        return self.rule.rows(self, xs, opset)

    def second_factor(self) -> np.ndarray:
        return self.right

    def set_second_factor(self, p: np.ndarray, delta: np.ndarray | None) -> None:
        self.right, self.delta = p, delta

    def weight_error(self) -> float:
        return float(np.linalg.norm(self.left @ self.right - self.matrix) / np.linalg.norm(self.matrix))


def _float_weight(node: gs.Node, index: int, what: str) -> np.ndarray:
    if index >= len(node.inputs) or node.inputs[index].is_empty():
        raise Decline(f"{what} is missing")
    values = constant_values(node.inputs[index])
    if values is None:
        raise Decline(f"{what} is not a constant")
    values = np.asarray(values)
    if values.dtype.kind != "f":
        raise Decline(f"{what} is {values.dtype}, not floating point")
    if len({id(n) for n in node.inputs[index].outputs}) > 1:
        # The other readers keep the full weight, so factorising it here would grow the model.
        raise Decline(f"{what} is shared with other nodes")
    return values


# ---------------------------------------------------------------------------------------------- op rules
@dataclass(frozen=True)
class _Rule:
    """How one op type reads as ``x · M``, yields (Z, Y) rows from its input, and is rewritten."""

    read: Callable[[gs.Graph, gs.Node, int], _Layer]
    rows: Callable[[_Layer, list[np.ndarray], int], list[tuple[np.ndarray, np.ndarray]]]
    emit: Callable[[_Layer, Callable[[str], str], int], list[gs.Node]]


def _read_gemm(graph: gs.Graph, node: gs.Node, opset: int) -> _Layer:
    # NOTE: before Gemm-7, C broadcasting needed the broadcast attribute; not worth supporting.
    if opset < 7:
        raise Decline(f"Gemm at opset {opset} (< 7) is not handled")
    b = _float_weight(node, 1, "B")
    if b.ndim != 2:
        raise Decline("B is not 2-D")
    matrix = (b.T if int(node.attrs.get("transB", 0)) else b).astype(np.float64)
    n_out = matrix.shape[1]
    beta = float(node.attrs.get("beta", 1.0))
    bias = np.zeros(n_out)
    intercept = True
    c_input = optional_input(node, 2)
    if c_input is not None:
        c = constant_values(c_input)
        if c is None:
            intercept = False  # a runtime C cannot absorb a fitted correction
        else:
            c = np.asarray(c, dtype=np.float64)
            # A correction δ (per output column) folds into C only if C + δ is no larger than C or (N,).
            intercept = c.size == 1 or np.broadcast_shapes(c.shape, (n_out,)) == c.shape
            if c.size in (1, n_out):
                bias = beta * np.broadcast_to(c.reshape(-1), (n_out,))
    return _Layer(graph, node, RULES["Gemm"], matrix, b.dtype, bias, intercept)


def _rows_gemm(layer: _Layer, xs: list[np.ndarray], opset: int) -> list[tuple[np.ndarray, np.ndarray]]:
    alpha = float(layer.node.attrs.get("alpha", 1.0))
    trans_a = int(layer.node.attrs.get("transA", 0))
    pairs = []
    for x in xs:
        a = np.asarray(x, dtype=np.float64)
        a = a.T if trans_a else a
        pairs.append((alpha * (a @ layer.left), alpha * (a @ layer.matrix)))
    return pairs


def _emit_gemm(layer: _Layer, fresh: Callable[[str], str], opset: int) -> list[gs.Node]:
    node = layer.node
    a, y = node.inputs[0], node.outputs[0]
    c = optional_input(node, 2)
    beta = float(node.attrs.get("beta", 1.0))
    first_attrs = {k: node.attrs[k] for k in ("alpha", "transA") if k in node.attrs}
    second_attrs = {"beta": beta} if c is not None else {}
    if layer.delta is not None:
        # beta·C + δ folds into a new C read with beta = 1 (C's own array is never written).
        base = (
            np.zeros(layer.delta.shape)
            if c is None
            else beta * np.asarray(constant_values(c), dtype=np.float64)
        )
        c = gs.Constant(fresh("second_bias"), (base + layer.delta).astype(layer.dtype))
        second_attrs = {"beta": 1.0}
    left = gs.Constant(fresh("first_weight"), layer.left.astype(layer.dtype))
    right = gs.Constant(fresh("second_weight"), layer.right.astype(layer.dtype))
    mid = gs.Variable(fresh("first_out"), dtype=y.dtype)
    first_inputs: list[gs.Tensor] = [a, left]
    second_inputs: list[gs.Tensor] = [mid, right] + ([c] if c is not None else [])
    if opset < 11:
        # NOTE: Gemm's C is optional only from opset 11; before, a broadcast zero stands in for it.
        first_inputs.append(gs.Constant(fresh("first_zero_c"), np.zeros(1, dtype=layer.dtype)))
        if c is None:
            second_inputs.append(gs.Constant(fresh("second_zero_c"), np.zeros(1, dtype=layer.dtype)))
    node.inputs.clear()
    node.outputs.clear()
    return [
        gs.Node("Gemm", fresh("first"), attrs=first_attrs, inputs=first_inputs, outputs=[mid]),
        gs.Node("Gemm", fresh("second"), attrs=second_attrs, inputs=second_inputs, outputs=[y]),
    ]


def _read_matmul(graph: gs.Graph, node: gs.Node, opset: int) -> _Layer:
    w = _float_weight(node, 1, "second input")
    if w.ndim != 2:
        raise Decline(f"second input is {w.ndim}-D, not a 2-D weight")
    # No bias to carry a correction: MatMul + Add would cost a node for a small gain.
    return _Layer(graph, node, RULES["MatMul"], w.astype(np.float64), w.dtype, np.zeros(w.shape[1]), False)


def _rows_matmul(layer: _Layer, xs: list[np.ndarray], opset: int) -> list[tuple[np.ndarray, np.ndarray]]:
    # NOTE: MatMul broadcasts like numpy: the weight multiplies the last axis of any batched left input.
    flat = [np.asarray(x, dtype=np.float64).reshape(-1, layer.matrix.shape[0]) for x in xs]
    return [(x @ layer.left, x @ layer.matrix) for x in flat]


def _emit_matmul(layer: _Layer, fresh: Callable[[str], str], opset: int) -> list[gs.Node]:
    node = layer.node
    a, y = node.inputs[0], node.outputs[0]
    left = gs.Constant(fresh("first_weight"), layer.left.astype(layer.dtype))
    right = gs.Constant(fresh("second_weight"), layer.right.astype(layer.dtype))
    mid = gs.Variable(fresh("first_out"), dtype=y.dtype)
    node.inputs.clear()
    node.outputs.clear()
    return [
        gs.Node("MatMul", fresh("first"), inputs=[a, left], outputs=[mid]),
        gs.Node("MatMul", fresh("second"), inputs=[mid, right], outputs=[y]),
    ]


def _read_conv(graph: gs.Graph, node: gs.Node, opset: int) -> _Layer:
    w = _float_weight(node, 1, "weight")
    if w.ndim < 3:
        raise Decline(f"weight is {w.ndim}-D, not a conv kernel")
    group = int(node.attrs.get("group", 1))
    if group != 1:
        kind = "depthwise" if w.shape[1] == 1 else "grouped"
        raise Decline(f"{kind} conv (group={group}): only dense convs are factorised")
    c_out = w.shape[0]
    bias = conv_bias(node, c_out)
    # Each output position computes W_mat · patch with W_mat = W reshaped to C_out × (C_in·K²): M = W_matᵀ.
    matrix = w.astype(np.float64).reshape(c_out, -1).T
    return _Layer(graph, node, RULES["Conv"], matrix, w.dtype, bias, True, kernel=tuple(w.shape[2:]))


def _conv_first_weight(layer: _Layer) -> np.ndarray:
    """L (C_in·K² × r) as the first conv's weight: r filters of shape C_in × K."""
    return layer.left.T.reshape(layer.left.shape[1], -1, *layer.kernel)


def _rows_conv(layer: _Layer, xs: list[np.ndarray], opset: int) -> list[tuple[np.ndarray, np.ndarray]]:
    attrs = window_attrs(layer.node)
    dense = layer.matrix.T.reshape(layer.matrix.shape[1], -1, *layer.kernel)
    outs = run_convs(xs, [(dense, attrs), (_conv_first_weight(layer), attrs)], opset)
    return [(channel_rows(z), channel_rows(y)) for y, z in outs]


def _emit_conv(layer: _Layer, fresh: Callable[[str], str], opset: int) -> list[gs.Node]:
    node = layer.node
    x, y = node.inputs[0], node.outputs[0]
    old_bias = optional_input(node, 2)
    window = window_attrs(node)
    kernel = layer.kernel
    first = gs.Constant(fresh("first_weight"), _conv_first_weight(layer).astype(layer.dtype))
    second_w = layer.right.T.reshape(layer.right.shape[1], layer.right.shape[0], *([1] * len(kernel)))
    second = gs.Constant(fresh("second_weight"), second_w.astype(layer.dtype))
    bias: gs.Tensor | None = old_bias  # unchanged values: the same tensor, never a write into its array
    if layer.delta is not None:
        bias = gs.Constant(fresh("second_bias"), (layer.bias + layer.delta).astype(layer.dtype))
    mid = gs.Variable(fresh("first_out"), dtype=y.dtype)
    node.inputs.clear()
    node.outputs.clear()
    return [
        gs.Node("Conv", fresh("first"), attrs={**window, "group": 1}, inputs=[x, first], outputs=[mid]),
        gs.Node(
            "Conv",
            fresh("second"),
            attrs={"kernel_shape": [1] * len(kernel)},
            inputs=[mid, second] + ([bias] if bias is not None else []),
            outputs=[y],
        ),
    ]


#: Op type → how svd reads, refits and rewrites it.
RULES: dict[str, _Rule] = {
    "Gemm": _Rule(_read_gemm, _rows_gemm, _emit_gemm),
    "MatMul": _Rule(_read_matmul, _rows_matmul, _emit_matmul),
    "Conv": _Rule(_read_conv, _rows_conv, _emit_conv),
}


# ---------------------------------------------------------------------------------------------- the pass
class Svd(Pass[SvdOptions]):
    """Factor the constant weight of Gemm, MatMul and Conv layers through a truncated SVD.

    Matches: ``Gemm`` with a constant 2-D B (any transA/transB, alpha, beta, C); ``MatMul`` whose second
    input is a constant 2-D weight (the left input may be batched or 1-D); dense ``Conv`` (group 1) with a
    constant weight, including 1×1. Weights must be floating point and read by no other node. Main graph
    and subgraphs; ``nodes`` / ``exclude`` select layers. Declined with a reason: grouped and depthwise
    convs, ConvTranspose, non-constant or shared weights, layers whose weight params would not drop by
    ``min_param_saving``, and (by default) layers whose two factors onnxruntime is estimated to run slower
    than the layer (``min_latency_saving``; the estimate is ``nnopt.passes._latency``'s).

    Rewrites the n × m weight W ≈ L·R with L = U_r·√S_r (n × r) and R = √S_r·V_rᵀ (r × m), worth it where
    r(n + m) < nm::

        Gemm(A, B, C; transA, transB, alpha, beta)  →  Gemm(A, L; transA, alpha) ─ Gemm(·, R, C; beta)
        MatMul(A, W)                                →  MatMul(A, L) ─ MatMul(·, R)
        Conv K×K (C_in → C_out, B)                  →  Conv K×K (C_in → r) ─ Conv 1×1 (r → C_out, B)

    transA, alpha, beta and C are carried unchanged; the first conv keeps strides, pads / auto_pad and
    dilations. r comes from ``rank``, ``energy`` or ``max_error`` (default energy 0.99).

    Lossy: exact only where W has rank ≤ r. With reference data (``--data``) and ``data_aware``, R (and a
    bias correction for Gemm and Conv, folded into C / B) is refit by least squares on the layer's real
    inputs to minimise its output error, and kept where that lowers the error on held-out samples.
    """

    name = "svd"
    lossy = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        opts = self.options
        rule = opts.rank_rule()
        costs = main_graph_costs(model, ctx) if any(n.op in RULES for n in model.graph.nodes) else {}
        profile = run_profile(model, ctx) if opts.min_latency_saving is not None else None

        def plan(graph: gs.Graph, node: gs.Node) -> _Layer:
            if node.op == "ConvTranspose":
                raise Decline("ConvTranspose is not handled")
            if len(node.inputs) < 2 or len(node.outputs) != 1:
                raise Decline("expected two inputs and one output")
            layer = RULES[node.op].read(graph, node, model.opset)
            # Only main-graph nodes are costed (If/Loop bodies run a data-dependent number of times).
            self._factor(layer, rule, opts, costs if graph is model.graph else {}, profile)
            return layer

        planned, layers = plan_layers(model, ctx, (*RULES, "ConvTranspose"), opts, plan)
        if opts.data_aware and ctx.samples:
            refit_plans(model, ctx, planned, self.name)
        splice_plans(model, planned, _PREFIX, lambda layer, fresh: layer.rule.emit(layer, fresh, model.opset))
        params_saved, flops_saved = savings(planned)
        return PassResult(
            modified=bool(planned),
            stats={
                "layers_rewritten": len(planned),
                "layers_declined": len(layers) - len(planned),
                "params_saved": params_saved,
                "flops_saved": flops_saved,
            },
            layers=layers,
        )

    def _factor(
        self,
        layer: _Layer,
        rule: RankRule,
        opts: SvdOptions,
        costs: dict[str, dict[str, Any]],
        profile: HardwareProfile | None,
    ) -> None:
        """Choose the rank, compute L and R, and fill the layer's report; raise Decline if not worth it."""
        n, m = layer.matrix.shape
        u, s, vt = thin_svd(layer.matrix)
        spectra = s[None, :]
        r = rule.choose(spectra, min(n, m), numerical_tolerance(spectra, (n, m), layer.dtype))
        cost = costs.get(layer.node.outputs[0].name)
        before, after = n * m, r * (n + m)
        flops_before, flops_after = scaled_flops(cost, before, after)
        figures: dict[str, Figure] = {
            "rank": r,
            "rule": rule.describe(),
            "shape": [n, m],
            "weight_error": round(relative_error(spectra, r), 6),
            "params_before": before,
            "params_after": after,
            "param_saving": round(saving(before, after), 6),
            "flops_before": flops_before,
            "flops_after": flops_after,
        }
        if saving(before, after) < opts.min_param_saving:
            raise Decline(
                f"rank {r} ({rule.describe()}) saves {saving(before, after):.1%} of the weight params, "
                f"below min_param_saving={opts.min_param_saving:g}",
                figures,
            )
        if profile is not None:
            check_latency(_verdict(layer, r, profile, cost), opts.min_latency_saving, figures)
        root = np.sqrt(s[:r])
        layer.left = u[:, :r] * root[None, :]
        layer.right = root[:, None] * vt[:r]
        layer.report.figures.update(figures)


def _verdict(layer: _Layer, r: int, profile: HardwareProfile, cost: dict[str, Any] | None) -> Verdict | None:
    """The estimate of ``layer`` against its two rank-``r`` factors (see ``nnopt.passes._latency``)."""
    n, m = layer.matrix.shape
    op = layer.node.op
    if op == "Conv":
        c_in, ones = n // math.prod(layer.kernel), [1] * len(layer.kernel)
        original = Step(op, (m, c_in, *layer.kernel), 1, n * m, m)
        steps = [Step(op, (r, c_in, *layer.kernel), 1, n * r, r), Step(op, (m, r, *ones), 1, r * m, m)]
    else:
        original = Step(op, (n, m), 1, n * m, m)
        steps = [Step(op, (n, r), 1, n * r, r), Step(op, (r, m), 1, r * m, m)]
    return judge(profile, cost, original, steps)
