"""conv-to-separable: approximate a dense K×K Conv by a depthwise K×K Conv and a pointwise 1×1 Conv."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

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
    window_attrs,
)
from nnopt.pipeline.base import Figure, LayerDecision, Pass, PassContext, PassResult

_PREFIX = "conv_to_separable"


@dataclass(frozen=True)
class ConvToSeparableOptions(LowRankOptions):
    HELP: ClassVar[Mapping[str, str]] = {
        "rank": "depth multiplier m: rank kept per input channel (capped at min(C_out, K²))",
        "energy": "smallest m at which every input channel's C_out×K² slice keeps this fraction of its squared "
        "singular values (the default, 0.99, when rank, energy and max_error are unset)",
        "max_error": "smallest m at which the layer's relative weight error ‖W − Ŵ‖/‖W‖ is at most this",
        "data_aware": "with reference data (--data), refit the pointwise weights and bias by least squares on "
        "the layer's real inputs, minimising its output error",
        "nodes": "only these convs: shell patterns over node names (an unnamed node goes by its output's name); "
        "default all",
        "exclude": "never these convs (shell patterns)",
    }

    min_flops_saving: float = field(
        default=0.1,
        metadata={
            "help": "rewrite a conv only where its FLOPs drop by at least this fraction (negative values "
            "allow growth: -1 accepts up to twice the FLOPs, e.g. for exact full-rank rewrites)"
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_min_saving("min_flops_saving", self.min_flops_saving)


@dataclass
class _Plan:
    """One conv's rewrite: factors in float64 (refit in place by the data-aware step), and its report."""

    graph: gs.Graph
    node: gs.Node
    weight: np.ndarray
    bias: np.ndarray
    depthwise: np.ndarray  # (C_in·m, 1, *kernel): output channel c·m + j reads input channel c
    pointwise: np.ndarray  # (C_out, C_in·m)
    delta: np.ndarray | None
    report: LayerDecision

    @property
    def c_in(self) -> int:
        return int(self.weight.shape[1])

    @property
    def intercept(self) -> bool:
        return True  # the pointwise conv can always carry a bias, so a fitted correction has a place

    def probe(self, xs: list[np.ndarray], opset: int) -> list[tuple[np.ndarray, np.ndarray]]:
        attrs = window_attrs(self.node)
        outs = run_convs(
            xs, [(self.weight, {**attrs, "group": 1}), (self.depthwise, {**attrs, "group": self.c_in})], opset
        )
        return [(channel_rows(z), channel_rows(y)) for y, z in outs]

    def second_factor(self) -> np.ndarray:
        return self.pointwise.T

    def set_second_factor(self, p: np.ndarray, delta: np.ndarray | None) -> None:
        self.pointwise, self.delta = p.T, delta

    def weight_error(self) -> float:
        recon = np.einsum(
            "ocm,cmk->ock",
            self.pointwise.reshape(self.weight.shape[0], self.c_in, -1),
            self.depthwise.reshape(self.c_in, -1, math.prod(self.weight.shape[2:])),
        )
        dense = self.weight.astype(np.float64).reshape(recon.shape)
        return float(np.linalg.norm(recon - dense) / np.linalg.norm(dense))


def separable_factors(weight: np.ndarray, rule: RankRule) -> tuple[np.ndarray, np.ndarray, int, float]:
    """Factor each input channel's C_out × K² slice of a Conv weight by a truncated SVD.

    W[:, c] ≈ U_c S_c V_cᵀ at rank m; the depthwise filters are √S·Vᵀ, the pointwise weights U·√S (the
    square root splits the scale evenly, so neither factor's values get extreme).

    Returns:
        (depthwise weight (C_in·m, 1, *kernel), pointwise matrix (C_out, C_in·m), m, relative weight error),
        in float64.
    """
    c_out, c_in = weight.shape[:2]
    kernel = weight.shape[2:]
    area = math.prod(kernel)
    slices = weight.astype(np.float64).reshape(c_out, c_in, area).transpose(1, 0, 2)  # (C_in, C_out, K²)
    u, s, vt = np.linalg.svd(slices, full_matrices=False)
    full = min(c_out, area)
    m = rule.choose(s, full, numerical_tolerance(s, (c_out, area), weight.dtype))
    root = np.sqrt(s[:, :m])
    # NOTE: a Conv with group = C_in and C_in·m outputs gives output channel o the input channel o // m,
    # so rank j of channel c must be output channel c·m + j: C-order reshape of (C_in, m, ...).
    depthwise = (vt[:, :m, :] * root[:, :, None]).reshape(c_in * m, 1, *kernel)
    pointwise = (u[:, :, :m] * root[:, None, :]).transpose(1, 0, 2).reshape(c_out, c_in * m)
    return depthwise, pointwise, m, relative_error(s, m)


def _verdict(shape: tuple[int, ...], m: int, profile: HardwareProfile, cost: dict[str, Any] | None) -> Verdict | None:
    """The estimate of a dense conv of weight ``shape`` against its depthwise (multiplier ``m``) and pointwise
    convs (see ``nnopt.passes._latency``)."""
    c_out, c_in, *kernel = shape
    area = math.prod(kernel)
    original = Step("Conv", tuple(shape), 1, c_out * c_in * area, c_out)
    steps = [
        Step("Conv", (c_in * m, 1, *kernel), c_in, c_in * m * area, c_in * m),
        Step("Conv", (c_out, c_in * m, *[1] * len(kernel)), 1, c_out * c_in * m, c_out),
    ]
    return judge(profile, cost, original, steps)


class ConvToSeparable(Pass[ConvToSeparableOptions]):
    """Approximate dense K×K convolutions by a depthwise K×K conv and a pointwise 1×1 conv (per-channel SVD).

    Matches: ``Conv`` with group 1, a kernel larger than 1×1 and a constant floating-point weight read by
    no other node (1-D, 2-D and 3-D kernels), in the main graph and in subgraphs, selected by ``nodes`` /
    ``exclude``. Declined with a reason: grouped and depthwise convs, 1×1 convs, non-constant or shared
    weights, ConvTranspose, convs whose FLOPs would not drop by ``min_flops_saving``, and (by default) convs
    whose depthwise + pointwise pair onnxruntime is estimated to run slower (``min_latency_saving``; a
    depth multiplier m > 1 has no fast depthwise kernel there).

    Rewrites: for each input channel c the C_out × K² slice W[:, c] is replaced by its best rank-m
    factorisation, which gives m depthwise K×K filters and m pointwise weight columns::

        X ─ Conv(W [C_out, C_in, K, K], B) ─ Y
          →  X ─ Conv(group=C_in, W_dw [C_in·m, 1, K, K]) ─ Conv(1×1, W_pw [C_out, C_in·m, 1, 1], B) ─ Y

    Strides, pads / auto_pad and dilations go to the depthwise conv, the bias to the pointwise one. FLOPs go
    from C_out·C_in·K² to C_in·m·(K² + C_out) per output position. The depth multiplier m is one number per
    layer, from ``rank``, ``energy`` (every slice keeps that fraction of its squared singular values) or
    ``max_error`` (relative weight error of the layer); default energy 0.99.

    Lossy: exact only at full rank (m = min(C_out, K²), which never saves FLOPs) or for weights of
    separable structure. With reference data (``--data``) and ``data_aware``, the pointwise weights and
    bias are refit by least squares on the layer's real inputs to minimise its output error, and kept
    where that lowers the error on held-out samples.
    """

    name = "conv-to-separable"
    lossy = True

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        opts = self.options
        rule = opts.rank_rule()
        costs = main_graph_costs(model, ctx) if any(n.op == "Conv" for n in model.graph.nodes) else {}
        profile = run_profile(model, ctx) if opts.min_latency_saving is not None else None

        def plan(graph: gs.Graph, node: gs.Node) -> _Plan:
            # Only main-graph nodes are costed (If/Loop bodies run a data-dependent number of times).
            return self._plan(graph, node, rule, opts, costs if graph is model.graph else {}, profile)

        plans, layers = plan_layers(model, ctx, ("Conv", "ConvTranspose"), opts, plan)
        if opts.data_aware and ctx.samples:
            refit_plans(model, ctx, plans, self.name)
        splice_plans(model, plans, _PREFIX, self._apply)
        params_saved, flops_saved = savings(plans)
        return PassResult(
            modified=bool(plans),
            stats={
                "convs_rewritten": len(plans),
                "convs_declined": len(layers) - len(plans),
                "flops_saved": flops_saved,
                "params_saved": params_saved,
            },
            layers=layers,
        )

    # ------------------------------------------------------------------------------------------ planning
    def _plan(
        self,
        graph: gs.Graph,
        node: gs.Node,
        rule: RankRule,
        opts: ConvToSeparableOptions,
        costs: dict[str, dict[str, Any]],
        profile: HardwareProfile | None,
    ) -> _Plan:
        if node.op == "ConvTranspose":
            raise Decline("ConvTranspose is not handled")
        if len(node.inputs) < 2 or len(node.outputs) != 1:
            raise Decline("expected X, W inputs and one output")
        weight = constant_values(node.inputs[1])
        if weight is None:
            raise Decline("weight is not a constant")
        weight = np.asarray(weight)
        if weight.dtype.kind != "f" or weight.ndim < 3:
            raise Decline(
                f"weight is {weight.dtype} of rank {weight.ndim}, not a floating-point conv kernel"
            )
        if len({id(n) for n in node.inputs[1].outputs}) > 1:
            # The other readers keep the dense weight, so factorising this one would grow the model.
            raise Decline("weight is shared with other nodes")
        c_out, c_per_group = weight.shape[:2]
        group = int(node.attrs.get("group", 1))
        area = math.prod(weight.shape[2:])
        if group != 1:
            kind = "depthwise" if c_per_group == 1 else "grouped"
            raise Decline(f"{kind} conv (group={group}): only dense convs are separated")
        if area == 1:
            raise Decline("1×1 conv: there is no spatial kernel to separate")
        bias = conv_bias(node, c_out)

        depthwise, pointwise, m, error = separable_factors(weight, rule)
        c_in = c_per_group
        macs_before = c_out * c_in * area
        macs_after = c_in * m * area + c_out * c_in * m
        flops_before, flops_after = scaled_flops(costs.get(node.outputs[0].name), macs_before, macs_after)
        figures: dict[str, Figure] = {
            "m": m,
            "rule": rule.describe(),
            "c_in": c_in,
            "c_out": c_out,
            "kernel": list(weight.shape[2:]),
            "weight_error": round(error, 6),
            "macs_per_position_before": macs_before,
            "macs_per_position_after": macs_after,
            "flops_saving": round(saving(macs_before, macs_after), 6),
            "flops_before": flops_before,
            "flops_after": flops_after,
            "params_before": weight.size,
            "params_after": depthwise.size + pointwise.size,
        }
        if saving(macs_before, macs_after) < opts.min_flops_saving:
            raise Decline(
                f"m={m} ({rule.describe()}) saves {saving(macs_before, macs_after):.1%} of the FLOPs, "
                f"below min_flops_saving={opts.min_flops_saving:g}",
                figures,
            )
        if profile is not None:
            check_latency(_verdict(weight.shape, m, profile, costs.get(node.outputs[0].name)), opts.min_latency_saving,
                          figures)
        report = LayerDecision(node_label(node), "Conv", "rewritten", figures=figures)
        return _Plan(graph, node, weight, bias, depthwise, pointwise, None, report)

    # ------------------------------------------------------------------------------------------ rewriting
    @staticmethod
    def _apply(plan: _Plan, fresh: Callable[[str], str]) -> list[gs.Node]:
        """Build the depthwise and pointwise convs that replace ``plan.node`` (the caller splices them in)."""
        node = plan.node
        dtype = plan.weight.dtype
        x, y = node.inputs[0], node.outputs[0]
        old_bias = optional_input(node, 2)
        window = window_attrs(node)
        spatial = plan.weight.ndim - 2

        dw_weight = gs.Constant(fresh("depthwise_weight"), plan.depthwise.astype(dtype))
        pw_weight = gs.Constant(
            fresh("pointwise_weight"),
            plan.pointwise.reshape(*plan.pointwise.shape, *([1] * spatial)).astype(dtype),
        )
        if plan.delta is not None:
            bias: gs.Tensor | None = gs.Constant(
                fresh("pointwise_bias"), (plan.bias + plan.delta).astype(dtype)
            )
        else:
            bias = old_bias  # unchanged values: the same tensor, never a write into its array
        mid = gs.Variable(fresh("depthwise_out"), dtype=y.dtype)
        node.inputs.clear()
        node.outputs.clear()
        depthwise = gs.Node(
            "Conv",
            fresh("depthwise"),
            attrs={**window, "group": plan.c_in},
            inputs=[x, dw_weight],
            outputs=[mid],
        )
        pointwise = gs.Node(
            "Conv",
            fresh("pointwise"),
            attrs={"kernel_shape": [1] * spatial},
            inputs=[mid, pw_weight] + ([bias] if bias is not None else []),
            outputs=[y],
        )
        return [depthwise, pointwise]
