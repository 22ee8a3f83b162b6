"""AnalysisManager: what passes and the pass manager read about a model, computed once per model version.

In the spirit of LLVM's new pass manager and onnx-ir: an *analysis* is a named, pure function of the model
(and of the run's settings: input shapes, hardware profile, cost rules). The manager computes one the first
time someone asks for it and hands out the cached result until the model changes. The pass manager tells
it when that happens: after a pass that changed the model it drops every result the pass did not declare
preserved (``Pass.preserves``). It verifies the changed model through the cache too (its one export, its
cost report), so the next pass reads what the verification computed for free. On a rollback the restored
snapshot and its cost report become current again.

A pass that changes the model and then wants a fresh analysis of its own changes calls ``invalidate()``
first: results describe the model as it was when they were computed, and the manager cannot see a pass's
in-place edits of the graphsurgeon graph.

Cached ModelProtos are shared: treat them as read-only (copy before editing, as ``Model.from_proto`` does).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

import networkx as nx
import onnx

from nnopt.analysis.shapes import FRESH, ShapeResult, infer_shapes
from nnopt.ir.graphview import dataflow
from nnopt.ir.model import Model

if TYPE_CHECKING:
    from nnopt.cost.analysis import CostReport
    from nnopt.cost.hardware import HardwareProfile
    from nnopt.cost.rules import CostRuleRegistry

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Analysis(Generic[T]):
    """A named analysis: ``compute(manager)`` derives it from ``manager.model`` and the run's settings.

    ``name`` is what ``Pass.preserves`` lists. ``compute`` may ask the manager for other analyses (the cost
    report asks for the exported proto), so each is computed once per model version.
    """

    name: str
    compute: Callable[[AnalysisManager], T]
    doc: str = ""
    #: The result holds graphsurgeon objects of the model's graph (not only names and numbers): it cannot
    #: outlive a rollback, which rebuilds the graph from the snapshot.
    on_graph: bool = False


@dataclass(frozen=True)
class AnalysisSettings:
    """What analyses depend on besides the model: the user's input shapes, hardware profile and cost rules.

    ``rules`` and ``hardware`` None mean the built-in defaults; the pipeline passes the active plugins' rules
    and the user's ``--hardware`` so that every consumer (the report, svd's FLOPs figures, plugin passes)
    costs the model the same way.
    """

    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    hardware: HardwareProfile | None = None
    rules: CostRuleRegistry | None = None
    #: Whether the cost model may run the model in onnxruntime to read shapes inference leaves unknown
    #: (off once a run is known not to end: it would wait out the time limit on every model version).
    probe_shapes: bool = True


class AnalysisManager:
    """Caches analyses of one ``Model`` per version; see the module docstring.

    Attributes:
        model: the model analysed (edited in place by passes).
        settings: input shapes, hardware profile and cost rules.
        version: bumped each time the model is declared changed.
        computed: how many times each analysis was computed (the tests pin these counts).
    """

    def __init__(self, model: Model, settings: AnalysisSettings | None = None) -> None:
        self.model = model
        self.settings = settings or AnalysisSettings()
        self.version = 0
        self.computed: Counter[str] = Counter()
        self._cache: dict[str, tuple[Analysis[Any], Any]] = {}

    def get(self, analysis: Analysis[T]) -> T:
        """The analysis of the current model version, computed now if it is not cached."""
        entry = self._cache.get(analysis.name)
        if entry is None:
            self.computed[analysis.name] += 1
            log.debug("computing analysis %s (model version %d)", analysis.name, self.version)
            entry = self._cache[analysis.name] = (analysis, analysis.compute(self))
        return cast(T, entry[1])

    def cached(self, analysis: Analysis[T]) -> T | None:
        """The cached result, or None without computing anything."""
        entry = self._cache.get(analysis.name)
        return cast("T | None", entry[1] if entry is not None else None)

    def invalidate(self, preserved: Iterable[str] = ()) -> None:
        """The model changed: drop every result not named in ``preserved`` and start a new version.

        The export is never preserved: whatever a pass claims, the changed model needs a new one.
        """
        keep = set(preserved) - {EXPORTED.name}
        self._cache = {name: entry for name, entry in self._cache.items() if name in keep}
        self.version += 1

    def checkpoint(self) -> Checkpoint:
        """What is cached now, to bring back with ``restore`` if the model is rolled back to this version."""
        return Checkpoint(dict(self._cache))

    def restore(self, checkpoint: Checkpoint) -> None:
        """The model was restored to the version of ``checkpoint`` (rebuilt from its snapshot): its results
        are current again, except those that hold objects of the graph the rollback replaced."""
        self._cache = {name: entry for name, entry in checkpoint.entries.items() if not entry[0].on_graph}
        self.version += 1

    # ------------------------------------------------------------------ shortcuts for the common analyses
    def proto(self) -> onnx.ModelProto:
        """The model exported to a ModelProto (read-only: shared by every consumer of this version)."""
        return self.get(EXPORTED)

    def cost(self) -> CostReport:
        """The cost report with the run's input shapes, hardware profile and cost rules."""
        return self.get(COST)

    def shapes(self) -> ShapeResult:
        """Fresh shape inference of the model (``SHAPES``)."""
        return self.get(SHAPES)


@dataclass(frozen=True)
class Checkpoint:
    """The cached results of one model version (see ``AnalysisManager.checkpoint``)."""

    entries: dict[str, tuple[Analysis[Any], Any]]


def _export(am: AnalysisManager) -> onnx.ModelProto:
    return am.model.to_proto()


def _cost(am: AnalysisManager) -> CostReport:
    from nnopt.cost import analyze

    settings = am.settings
    return analyze(am.proto(), hardware=settings.hardware, input_shapes=settings.input_shapes or None,
                   rules=settings.rules, run_onnxruntime=settings.probe_shapes)


def _shapes(am: AnalysisManager) -> ShapeResult:
    return infer_shapes(am.proto(), FRESH)


def _dataflow(am: AnalysisManager) -> nx.DiGraph:
    return dataflow(am.model.graph)


#: The model as a ModelProto: what the checker, onnxruntime and proto-level analyses read.
EXPORTED: Analysis[onnx.ModelProto] = Analysis("exported", _export, "the model exported to a ModelProto")
#: nnopt's cost report (``nnopt.cost.analyze``) under the run's settings.
COST: Analysis[CostReport] = Analysis("cost", _cost, "per-node and total cost under the run's hardware and rules")
#: Fresh ONNX shape inference of the model as it is (``nnopt.analysis.shapes.FRESH``: the model's own
#: value_info ignored, dynamic dims kept symbolic): types and dims that rewrites can rely on.
SHAPES: Analysis[ShapeResult] = Analysis("shapes", _shapes, "fresh shape inference, dynamic dims kept")
#: The main graph's networkx dataflow view (``nnopt.ir.graphview.dataflow``): node indices, tensor edges.
DATAFLOW: Analysis[nx.DiGraph] = Analysis("dataflow", _dataflow, "the main graph's dataflow view", on_graph=True)
