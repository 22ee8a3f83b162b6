"""The analysis cache: computed once per model version, invalidated by changing passes, restored on
rollback; and the work it saves, pinned as counts of exports and cost analyses (never as timings)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

import nnopt
from nnopt.analysis.manager import COST, DATAFLOW, EXPORTED, SHAPES, Analysis, AnalysisManager, AnalysisSettings
from nnopt.cost.hardware import HardwareProfile
from nnopt.ir.model import Model, load_model
from nnopt.pipeline.base import Pass, PassContext, PassResult
from nnopt.pipeline.manager import PassManager
from nnopt.pipeline.verify import Verifier
from nnopt.testing import model_from_text

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "small_cnn.onnx"

TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 4] x) => (float[1, 4] y) {
  a = Relu(x)
  dead = Neg(x)
  y = Mul(a, w)
}
"""


def _model() -> Model:
    return Model.from_proto(model_from_text(TEXT, {"w": np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)}))


@pytest.fixture
def exports(monkeypatch) -> Counter:
    """Counts ``Model.to_proto`` calls (graphsurgeon exports) and ``Model.from_proto`` calls (imports)."""
    counts: Counter = Counter()
    to_proto, from_proto = Model.to_proto, Model.from_proto.__func__

    def counted_to_proto(self):
        counts["export"] += 1
        return to_proto(self)

    def counted_from_proto(cls, proto, **kwargs):
        counts["import"] += 1
        return from_proto(cls, proto, **kwargs)

    monkeypatch.setattr(Model, "to_proto", counted_to_proto)
    monkeypatch.setattr(Model, "from_proto", classmethod(counted_from_proto))
    return counts


class RemoveNeg(Pass):
    """Test pass: drops the dead Neg node (changes the model, lossless)."""

    name = "remove-neg"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        before = len(model.graph.nodes)
        model.graph.nodes = [n for n in model.graph.nodes if n.op != "Neg"]
        return PassResult(modified=len(model.graph.nodes) != before)


class ReadsCost(Pass):
    """Test pass: reads the cached cost report and export, changes nothing."""

    name = "reads-cost"
    seen: list[int] = []

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        analyses = ctx.analyses_for(model)
        ReadsCost.seen.append(int(analyses.cost().totals["nodes"]))
        assert len(analyses.proto().graph.node) == len(model.graph.nodes)
        return PassResult(modified=False)


class Breaks(Pass):
    """Test pass: makes the model invalid (a node reads a tensor nobody produces)."""

    name = "breaks"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        import onnx_graphsurgeon as gs

        model.graph.nodes[0].inputs[0] = gs.Variable("nowhere", dtype=np.float32, shape=[1, 4])
        return PassResult(modified=True)


# ---------------------------------------------------------------------------------------------- the cache
def test_an_analysis_is_computed_once_per_version_and_dropped_unless_preserved():
    calls = Counter()
    nodes = Analysis("nodes", lambda am: calls.update(["nodes"]) or len(am.model.graph.nodes))
    kept = Analysis("kept", lambda am: calls.update(["kept"]) or "k")
    am = AnalysisManager(_model())
    assert (am.get(nodes), am.get(nodes), am.get(kept)) == (3, 3, "k")
    assert calls == Counter(nodes=1, kept=1) and am.computed == Counter(nodes=1, kept=1)
    am.model.graph.nodes.pop(1)
    am.invalidate(preserved={"kept"})
    assert (am.get(nodes), am.get(kept), am.version) == (2, "k", 1)
    assert calls == Counter(nodes=2, kept=1)


def test_a_restored_checkpoint_brings_back_proto_results_but_not_graph_objects():
    am = AnalysisManager(_model())
    proto, view = am.proto(), am.get(DATAFLOW)
    checkpoint = am.checkpoint()
    am.invalidate()
    am.model.restore(proto)
    am.restore(checkpoint)
    assert am.cached(EXPORTED) is proto  # the snapshot is the export of the restored version
    assert am.cached(DATAFLOW) is None  # its gs.Node objects belong to the replaced graph
    assert am.get(DATAFLOW) is not view and am.get(DATAFLOW).number_of_nodes() == view.number_of_nodes()


def test_a_pass_run_on_its_own_never_sees_a_stale_cache():
    model = _model()
    ctx = PassContext()
    first = ctx.analyses_for(model).proto()
    model.graph.nodes.pop(1)  # no manager is there to invalidate anything
    assert len(ctx.analyses_for(model).proto().graph.node) == len(first.graph.node) - 1


def test_the_cost_analysis_uses_the_runs_hardware_and_rules():
    slow = HardwareProfile(name="slow", peak_flops=1e6)
    fast = HardwareProfile(name="fast", peak_flops=1e12)
    model = load_model(EXAMPLE)
    slow_s = AnalysisManager(model, AnalysisSettings(hardware=slow)).cost().totals["latency_s"]
    fast_s = AnalysisManager(model, AnalysisSettings(hardware=fast)).cost().totals["latency_s"]
    assert slow_s == pytest.approx(fast_s * 1e6, rel=1e-6)


# ---------------------------------------------------------------------------------------------- work counts
def test_a_changing_pass_costs_one_export_and_an_unchanged_pass_none(exports):
    model = _model()
    exports.clear()
    ctx = PassContext(analyses=AnalysisManager(model))
    manager = PassManager([RemoveNeg(), RemoveNeg(), ReadsCost()], verifier=Verifier(ctx.analyses_for(model).proto()))
    assert exports["export"] == 1  # the input, for the verifier; the manager reuses it
    ReadsCost.seen = []
    report = manager.run(model, ctx)
    assert [r.status for r in report.passes] == ["applied", "unchanged", "unchanged"]
    assert exports["export"] == 2  # + one for the changing pass: checker, onnxruntime and cost share it
    assert exports["import"] == 0
    # The cost report of the changed model, computed while verifying it, is what the next pass reads.
    assert ctx.analyses.computed[COST.name] == 2 and ReadsCost.seen == [2]


def test_a_rollback_restores_the_snapshot_and_its_analyses_without_exporting_again(exports):
    model = _model()
    exports.clear()
    ctx = PassContext(analyses=AnalysisManager(model))
    manager = PassManager([Breaks(), ReadsCost()], verifier=Verifier(ctx.analyses_for(model).proto()))
    ReadsCost.seen = []
    report = manager.run(model, ctx)
    assert [r.status for r in report.passes] == ["rolled_back", "unchanged"]
    assert "invalid model" in report.passes[0].reason
    assert exports["export"] == 2  # the input, the broken model
    assert exports["import"] == 1  # the rollback rebuilds the graph from the snapshot
    assert ctx.analyses.computed[COST.name] == 1 and ReadsCost.seen == [3]


def test_pipeline_exports_the_input_once_and_each_changing_pass_once(exports):
    plugins = nnopt.build_plugins(load_entry_points=False)
    model = load_model(EXAMPLE)
    exports.clear()
    _, report = nnopt.Pipeline().run(model, plugins=plugins)
    applied = sum(r.status == "applied" for r in report.passes)
    assert applied >= 3  # small_cnn: constants, dead branch, identities, batch norms
    # The passes read the cached export: the only exports are the input's and one per applied pass.
    assert exports["export"] == 1 + applied


def test_fold_constants_and_remove_noops_share_one_shape_inference_per_model_version(monkeypatch):
    from nnopt.analysis import shapes

    plugins = nnopt.build_plugins(load_entry_points=False)
    model, _ = nnopt.Pipeline(verify=False).run(load_model(EXAMPLE), plugins=plugins)  # cleaned up already
    analyses = AnalysisManager(model)
    ctx = PassContext(analyses=analyses)
    passes = nnopt.Pipeline(["fold-constants", "remove-noops", "fold-constants"], verify=False).build(plugins)
    calls = shapes.COUNTERS["calls"]
    report = PassManager(passes).run(model, ctx)
    assert [r.status for r in report.passes] == ["unchanged"] * 3
    # Nothing changed the model, so all three read the same inference.
    assert analyses.computed[SHAPES.name] == 1
    analyses.invalidate()  # what the manager does after a changing pass
    PassManager(passes[:1]).run(model, ctx)
    assert analyses.computed[SHAPES.name] == 2
    # Besides those two: the cost report's concrete-dims inference (one per version) and each run's strict
    # check of its input model.
    assert shapes.COUNTERS["calls"] == calls + 2 + analyses.computed[COST.name] + 2


def test_passes_and_nnopt_analyze_cost_custom_ops_with_the_plugins_rules():
    """svd/conv-to-separable and the report read one cost analysis with the plugins' rules and hardware."""
    plugins = nnopt.build_plugins(load_entry_points=False)
    model = load_model(EXAMPLE)
    hw = HardwareProfile(name="tiny", peak_flops=1e6)
    _, report = nnopt.Pipeline(["dce"], hardware=hw).run(model, plugins=plugins)
    assert report.original["latency_s"] == pytest.approx(
        nnopt.analyze(onnx.load(str(EXAMPLE)), hardware=hw).totals["latency_s"]
    )


def test_a_pipeline_costs_a_plugins_custom_op_with_the_plugins_rule():
    """The example plugin (installed by the README's test command) costs com.example:FancyOp at 2 FLOPs per
    element; the pipeline's report and every pass's cost analysis use the run's rules, as the CLI does."""
    from onnx import helper

    plugins = nnopt.build_plugins()
    if "com.example" not in {r.domain for r in plugins.cost_rules.rules()}:
        pytest.fail("the example plugin is not installed: pip install ./plugins/nnopt-example-plugin (see README)")
    graph = helper.make_graph(
        [helper.make_node("FancyOp", ["x"], ["y"], domain="com.example", name="fancy")], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 96])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 96])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    _, report = nnopt.Pipeline(["dce"], hardware="example-npu").run(proto, plugins=plugins)
    assert report.original["flops"] == 2 * 4 * 96 == 768
    # The plugin's board (4 TFLOP/s, 25.6 GB/s): memory-bound, 2 × 384 float32 moved.
    assert report.original["latency_s"] == pytest.approx(max(768 / 4e12, 2 * 384 * 4 / 25.6e9))
    bare = nnopt.build_plugins(load_entry_points=False)
    assert nnopt.Pipeline(["dce"]).run(proto, plugins=bare)[1].original["flops"] == 0


def test_a_pass_cannot_preserve_the_export_of_a_model_it_changed():
    am = AnalysisManager(_model())
    before = am.proto()
    am.model.graph.nodes.pop(1)
    am.invalidate(preserved={EXPORTED.name, "cost"})
    assert len(am.proto().graph.node) == len(before.graph.node) - 1
