"""Pass manager: verification, rollback, budgets, strict mode, options, specs, fixed point."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from nnopt.errors import OptionError, PassFailedError
from nnopt.ir.model import Model
from nnopt.passes.dce import DeadNodeElimination
from nnopt.pipeline.base import Pass, PassContext, PassOptions, PassResult
from nnopt.pipeline.manager import LOSSLESS_TOLERANCE, Budget, PassManager
from nnopt.pipeline.spec import parse_pass_spec
from nnopt.pipeline.verify import Verifier, compare_outputs
from nnopt.testing import model_from_text

TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 4] x) => (float[1, 4] y) {
  a = Relu(x)
  dead = Neg(x)
  y = Mul(a, w)
}
"""


def _proto() -> onnx.ModelProto:
    return model_from_text(TEXT, {"w": np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)})


def _count_nodes(proto: onnx.ModelProto) -> dict:
    return {"nodes": len(proto.graph.node), "params": 0, "flops": 0, "weight_bytes": 0, "latency_s": 0.0}


class ScaleWeights(Pass):
    """Test pass: multiplies the weight ``w`` by a factor (lossy unless the factor is 1)."""

    name = "scale-weights"
    lossy = True

    @dataclass(frozen=True)
    class Options(PassOptions):
        factor: float = field(default=1.0, metadata={"help": "multiplier"})

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        w = model.graph.tensors()["w"]
        w.values = w.values * np.float32(self.options.factor)  # a new array: never in place
        return PassResult(modified=True)


class LosslessLiar(ScaleWeights):
    """Test pass: claims to be lossless but changes outputs."""

    name = "lossless-liar"
    lossy = False


class Raises(Pass):
    """Test pass: breaks the graph, then raises."""

    name = "raises"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        model.graph.nodes.clear()
        raise RuntimeError("boom")


class BreaksGraph(Pass):
    """Test pass: makes a node read a tensor nobody produces."""

    name = "breaks-graph"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        model.graph.nodes[0].inputs[0] = gs.Variable("nowhere", dtype=np.float32, shape=[1, 4])
        return PassResult(modified=True)


def _manager(passes, **kwargs) -> tuple[PassManager, Model]:
    proto = _proto()
    return PassManager(passes, analyze=_count_nodes, verifier=Verifier(proto), **kwargs), Model.from_proto(proto)


def test_applied_pass_is_recorded_with_cost_delta():
    manager, model = _manager([DeadNodeElimination()])
    report = manager.run(model)
    [rec] = report.passes
    assert rec.status == "applied"
    assert (rec.before["nodes"], rec.after["nodes"]) == (3, 2)
    assert rec.to_dict()["delta"]["nodes"] == -1
    assert rec.fidelity["max_rel_error"] == 0.0


@pytest.mark.parametrize(
    "bad_pass, reason",
    [(Raises(), "raised RuntimeError: boom"), (BreaksGraph(), "invalid model"), (LosslessLiar(LosslessLiar.Options(2.0)), "lossless pass changed outputs")],
)
def test_failing_pass_is_rolled_back_to_the_exact_snapshot(bad_pass, reason):
    manager, model = _manager([bad_pass, DeadNodeElimination()])
    before = model.to_proto().SerializeToString()
    report = manager.run(model)
    assert report.passes[0].status == "rolled_back"
    assert reason in report.passes[0].reason
    assert report.passes[1].status == "applied"  # the pipeline goes on from the restored model
    manager2, model2 = _manager([bad_pass])
    manager2.run(model2)
    assert model2.to_proto().SerializeToString() == before


def test_strict_makes_a_rollback_an_error():
    manager, model = _manager([Raises()], strict=True)
    with pytest.raises(PassFailedError, match="raises"):
        manager.run(model)


def test_lossy_pass_held_to_the_budget():
    within, model = _manager([ScaleWeights(ScaleWeights.Options(1.001))], budget=Budget(max_rel_error=0.01))
    assert within.run(model).passes[0].status == "applied"
    beyond, model = _manager([ScaleWeights(ScaleWeights.Options(1.5))], budget=Budget(max_rel_error=0.01))
    rec = beyond.run(model).passes[0]
    assert rec.status == "rolled_back" and "exceeds the budget" in rec.reason
    assert rec.fidelity["max_rel_error"] == pytest.approx(0.5, rel=1e-6)


def test_fixed_point_stops_when_nothing_changes():
    manager, model = _manager([DeadNodeElimination()], fixed_point=True, max_iterations=5)
    report = manager.run(model)
    assert [r.status for r in report.passes] == ["applied", "unchanged"]


def test_compare_outputs_metrics():
    ref = [[np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)]]
    cand = [[np.array([[1.0, 0.1], [0.5, 2.0]], np.float32)]]
    fid = compare_outputs(ref, cand)
    assert fid.max_abs_error == pytest.approx(0.5)
    assert fid.max_rel_error == pytest.approx(0.25)
    assert fid.top1_agreement == 1.0
    assert 0.9 < fid.cosine_similarity < 1.0
    assert LOSSLESS_TOLERANCE == 1e-5


@dataclass(frozen=True)
class _Opts(PassOptions):
    rank: int | None = field(default=None, metadata={"help": "rank"})
    energy: float = field(default=0.9, metadata={"help": "energy"})
    per_channel: bool = False
    norm: Literal["l1", "l2"] = "l2"
    nodes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0 < self.energy <= 1:
            raise OptionError(f"energy must be in (0, 1], got {self.energy}")


def test_options_convert_and_validate():
    opts = _Opts.from_strings({"rank": "4", "energy": "0.5", "per-channel": "true", "norm": "l1", "nodes": "a,b"}, "x")
    assert opts == _Opts(rank=4, energy=0.5, per_channel=True, norm="l1", nodes=("a", "b"))
    assert _Opts.from_strings({"rank": "none"}).rank is None
    with pytest.raises(OptionError, match="has no option 'rnak'"):
        _Opts.from_strings({"rnak": "4"}, "x")
    with pytest.raises(OptionError, match="not an integer"):
        _Opts.from_strings({"rank": "four"}, "x")
    with pytest.raises(OptionError, match="not one of"):
        _Opts.from_strings({"norm": "l3"}, "x")
    with pytest.raises(OptionError, match="energy must be"):
        _Opts.from_strings({"energy": "2"}, "x")
    described = {d["name"]: d for d in _Opts.describe()}
    assert described["rank"]["type"] == "int | none" and described["energy"]["default"] == 0.9


def test_pass_spec_parsing():
    assert parse_pass_spec("dce") == ("dce", {})
    assert parse_pass_spec("prune:nodes=c1,c2,ratio=0.3") == ("prune", {"nodes": "c1,c2", "ratio": "0.3"})
    with pytest.raises(OptionError):
        parse_pass_spec("prune:oops")


def test_context_rng_is_deterministic_per_stream():
    a, b = PassContext(seed=3), PassContext(seed=3)
    assert a.rng("kmeans").integers(0, 10**9) == b.rng("kmeans").integers(0, 10**9)
    assert a.seed_for("x") != a.seed_for("y")


def test_lossless_excess_has_an_absolute_floor_for_tiny_outputs():
    from nnopt.pipeline.verify import lossless_excess

    ref = [[np.array([6e-5, 1e-7], np.float32)]]
    rounding = [[np.array([6e-5 + 1.5e-7, 1e-7], np.float32)]]  # 2.5e-3 of the scale, but 1.5e-7 absolute
    assert lossless_excess(ref, rounding, rtol=1e-5, atol=1e-6) <= 1.0
    big = [[np.array([10.0, 1.0], np.float32)]]
    assert lossless_excess(big, [[np.array([10.001, 1.0], np.float32)]], rtol=1e-5, atol=1e-6) > 1.0
    assert lossless_excess([[np.array([1, 2])]], [[np.array([1, 3])]], rtol=1e-5, atol=1e-6) == float("inf")


def test_value_info_cannot_override_the_interface():
    proto = _proto()
    proto.graph.value_info.append(onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None))
    out = Model.from_proto(proto).to_proto()
    assert [d.dim_value for d in out.graph.output[0].type.tensor_type.shape.dim] == [1, 4]
