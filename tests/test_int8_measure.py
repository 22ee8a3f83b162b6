"""Tests of the interleaved timing helper and of quantize's select=measured (candidates timed in onnxruntime)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from nnopt.cost import timing
from nnopt.cost.timing import AA_SUFFIX, Timing, aa_noise, measure_interleaved
from nnopt.errors import InputError
from nnopt.passes.quantize import Quantize, QuantizeOptions
from nnopt.pipeline.base import PassContext
from nnopt.runtime import make_session
from nnopt.testing import apply_pass


def _matmul_model(size: int) -> onnx.ModelProto:
    """y = x @ W with a square ``size`` weight: its time grows with ``size``."""
    w = numpy_helper.from_array(np.full((size, size), 0.01, np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [64, size])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [64, size])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=8)


def test_interleaved_rounds_rotate_the_order_and_time_an_aa_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[str] = []
    calls: list[str] = []

    def fake_session(model: str, threads: int | None) -> str:
        made.append(f"{model}{len(made)}")  # a distinct session per call, named by its model
        return made[-1]

    def fake_round(session: str, feeds: Any, runs: int, warmup: int, tick: Any) -> float:
        calls.append(session)
        return {"a": 1.0, "b": 2.0, "c": 3.0}[session[0]] + 0.1 * len(calls)

    monkeypatch.setattr(timing, "_timing_session", fake_session)
    monkeypatch.setattr(timing, "_round_median", fake_round)
    got = measure_interleaved({"a": "a", "b": "b", "c": "c"}, {}, rounds=4, aa=True)
    assert list(got) == ["a", "b", "c", "a" + AA_SUFFIX]
    # The A/A copy is a second session of the first model (a3); each round starts one model later.
    assert made == ["a0", "b1", "c2", "a3"]
    assert calls == ["a0", "b1", "c2", "a3", "b1", "c2", "a3", "a0", "c2", "a3", "a0", "b1", "a3", "a0", "b1", "c2"]
    # a's per-round figures are calls 1, 8, 11 and 14: 1.1, 1.8, 2.1, 2.4.
    assert got["a"].per_round == pytest.approx((1.1, 1.8, 2.1, 2.4))
    assert got["a"].median_s == pytest.approx(1.95)
    assert got["a"].min_s == pytest.approx(1.1)


def test_fresh_sessions_time_each_round_on_a_new_session(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[str] = []
    calls: list[str] = []

    def fake_session(model: str, threads: int | None) -> str:
        made.append(f"{model}{len(made)}")
        return made[-1]

    def fake_round(session: str, feeds: Any, runs: int, warmup: int, tick: Any) -> float:
        calls.append(session)
        return 1.0

    monkeypatch.setattr(timing, "_timing_session", fake_session)
    monkeypatch.setattr(timing, "_round_median", fake_round)
    got = measure_interleaved({"a": "a", "b": "b"}, {}, rounds=3, aa=False, fresh_sessions=True)
    assert list(got) == ["a", "b"] and all(len(t.per_round) == 3 for t in got.values())
    # Round 0 on the sessions made up front; each later round on a session made just before it runs.
    assert calls == ["a0", "b1", "b2", "a3", "a4", "b5"] and made == ["a0", "b1", "b2", "a3", "a4", "b5"]


def test_interleaved_thread_clock_orders_models_by_cost() -> None:
    small = {"x": np.ones((64, 32), np.float32)}
    large = {"x": np.ones((64, 256), np.float32)}
    t_small = measure_interleaved({"m": _matmul_model(32)}, small, rounds=3, runs=5)
    t_large = measure_interleaved({"m": _matmul_model(256)}, large, rounds=3, runs=5)
    # 64x256x256 MACs against 64x32x32: 64x the work, far more than timing noise even on a busy machine.
    assert t_large["m"].median_s > 5 * t_small["m"].median_s
    noise = aa_noise(t_small, "m")
    assert math.isfinite(noise) and noise >= 0.0
    assert math.isnan(aa_noise({"m": Timing((1.0,))}, "m"))
    wall = measure_interleaved({"m": _matmul_model(32)}, small, rounds=2, runs=3, threads=None, clock="wall",
                               aa=False)
    assert list(wall) == ["m"] and wall["m"].min_s > 0


def test_thread_clock_needs_one_thread() -> None:
    with pytest.raises(InputError, match="one intra-op thread"):
        measure_interleaved({"m": _matmul_model(8)}, {"x": np.ones((64, 8), np.float32)}, threads=2, clock="thread")
    with pytest.raises(InputError, match="rounds >= 1"):
        measure_interleaved({"m": _matmul_model(8)}, {"x": np.ones((64, 8), np.float32)}, rounds=0)


def _two_region_net() -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """pointwise -> Relu -> depthwise -> Relu -> pointwise: select=latency makes the two pointwise convs two
    int8 regions (the depthwise conv between them stays float)."""
    rng = np.random.default_rng(0)
    c, s = 64, 28
    nodes, inits, src = [], [], "x"
    for i, group in enumerate((1, c, 1)):
        k = 3 if group > 1 else 1
        w = rng.normal(0, 1.0 / np.sqrt(k * k * c // group), (c, c // group, k, k)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(c, np.float32), f"b{i}")]
        nodes.append(helper.make_node("Conv", [src, f"w{i}", f"b{i}"], [f"conv{i}"], name=f"conv{i}", group=group,
                                      pads=[k // 2] * 4))
        src = f"conv{i}"
        if i < 2:
            nodes.append(helper.make_node("Relu", [src], [f"relu{i}"], name=f"relu{i}"))
            src = f"relu{i}"
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, c, s, s])],
                              [helper.make_tensor_value_info(src, onnx.TensorProto.FLOAT, [1, c, s, s])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=8)
    samples = [{"x": rng.normal(0, 1, (1, c, s, s)).astype(np.float32)} for _ in range(24)]
    return proto, samples[:16], samples[16:]


def test_select_measured_keeps_a_timed_candidate_never_slower_than_float() -> None:
    proto, calib, held_out = _two_region_net()
    _, latency = apply_pass(Quantize(), proto, PassContext(samples=calib))
    assert latency.stats["select_regions"] == 2
    out, result = apply_pass(Quantize(QuantizeOptions(select="measured")), proto, PassContext(samples=calib))
    stats = result.stats
    measured, predicted = stats["measured_us"], stats["predicted_us"]
    # The two regions (conv0, conv2) left float one at a time, and the depthwise conv made int8.
    toggles = ["region 0 float", "region 1 float", "conv1 int8"]
    assert set(measured) == {"float", "latency", "all", *toggles}
    assert set(predicted) >= set(measured)
    assert stats["measured_aa_us"] > 0 and 0 <= stats["measured_aa_noise"] < 1
    choice = stats["measured_choice"]
    final = stats.get("measured_confirm_us", measured)  # a confirming run decides when there is one
    assert choice == "float" or final[choice] < final["float"]
    assert final[choice] <= min(final.values()) * (1 + max(0.02, stats["measured_aa_noise"])) + 1e-9 or \
        choice == "latency"
    # Each toggle: the time its layers' int8 form saves, predicted (table) and measured (against the choice).
    rows = {row["toggle"]: row for row in stats["measured_toggles"]}
    assert set(rows) == set(toggles)
    for label, sign in (("region 0 float", 1), ("region 1 float", 1), ("conv1 int8", -1)):
        row = rows[label]
        assert row["measured_gain_us"] == pytest.approx(sign * (measured[label] - measured["latency"]), abs=0.11)
        assert row["predicted_gain_us"] == pytest.approx(sign * (predicted[label] - predicted["latency"]), abs=0.11)
    assert rows["region 0 float"]["predicted_gain_us"] > 0 < rows["region 1 float"]["predicted_gain_us"]
    # The depthwise conv made int8 takes its Relus along (followers: int8 only beside an int8 layer), which
    # joins the two regions: every layer int8, the same model as select=all.
    assert rows["conv1 int8"]["layers"] == 3 and predicted["conv1 int8"] == predicted["all"]
    # Every conv's report line carries both figures, int8 or float.
    by_node = {e.node: e for e in result.layers}
    for name, label in (("conv0", "region 0 float"), ("conv2", "region 1 float"), ("conv1", "conv1 int8")):
        figures = by_node[name].figures
        assert figures["toggle"] == label
        assert figures["int8_predicted_gain_us"] == rows[label]["predicted_gain_us"]
        assert figures["int8_measured_gain_us"] == rows[label]["measured_gain_us"]
    if choice == "float":
        assert not result.modified
    else:
        # What was kept is a quantized model with float's accuracy on held-out inputs.
        ref, got = make_session(proto), make_session(out)
        a = np.concatenate([ref.run(None, s)[0].ravel() for s in held_out])
        b = np.concatenate([got.run(None, s)[0].ravel() for s in held_out])
        assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.995


@pytest.mark.parametrize(("measured", "noise", "expected"), [
    ({"float": 100.0, "latency": 80.0, "all": 70.0}, 0.01, "all"),      # faster beyond the margin
    ({"float": 100.0, "latency": 80.0, "all": 79.0}, 0.01, "latency"),  # within 2 %: the deterministic choice
    ({"float": 100.0, "latency": 80.0, "all": 70.0}, 0.20, "latency"),  # within the A/A noise
    ({"float": 100.0, "latency": 104.0, "all": 103.0}, 0.01, "float"),  # nothing beats float
    ({"float": 100.0, "latency": 110.0, "all": 90.0}, math.nan, "all"),
])
def test_pick_prefers_the_choice_within_the_noise_and_never_a_slower_than_float_one(
        measured: dict[str, float], noise: float, expected: str) -> None:
    from nnopt.passes import _int8_measure

    assert _int8_measure._pick(measured, noise) == expected
