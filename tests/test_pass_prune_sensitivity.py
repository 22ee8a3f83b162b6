"""prune allocate=sensitivity: ratio is a weight budget split across groups by measured output error on --data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from nnopt.api import optimize
from nnopt.cost import analyze
from nnopt.errors import OptionError
from nnopt.passes._depgraph import Tracer, infer_shapes
from nnopt.passes._sensitivity import GroupPlan, Trials, output_error
from nnopt.passes.prune import Prune, PruneOptions, _classes, _groups, _removal_order
from nnopt.pipeline.base import PassContext
from nnopt.testing import apply_pass, model_from_text, run

DIGITS = Path(__file__).resolve().parents[1] / "examples" / "digits"
HEADER = '<ir_version: 8, opset_import: ["" : 17]>'


def _prune(**options: object) -> Prune:
    return Prune(PruneOptions.create("prune", **options))


def _digits() -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]], np.ndarray, np.ndarray]:
    """The digits CNN with BNs folded; even test images calibrate (--data), odd ones evaluate."""
    folded, _ = optimize(str(DIGITS / "digits_cnn.onnx"), ["fold-batchnorm"], verify=False)
    x = np.load(DIGITS / "digits_test.npz")["x"]
    labels = np.load(DIGITS / "digits_test_labels.npy")
    calib = [{"x": x[i : i + 1]} for i in range(0, len(x), 2)]
    return folded.to_proto(), calib, x[1::2], labels[1::2]


def _accuracy(proto: onnx.ModelProto, x: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(run(proto, {"x": x})[0].argmax(1) == labels))


def test_digits_sensitivity_keeps_far_more_accuracy_than_uniform_for_no_more_weights() -> None:
    proto, calib, x, labels = _digits()
    ctx = PassContext(samples=calib)
    uniform, _ = apply_pass(_prune(ratio=0.3, reconstruct="off"), proto, ctx)
    chosen, result = apply_pass(_prune(ratio=0.3, allocate="sensitivity", reconstruct="off"), proto, ctx)
    # Held-out (odd) images: 98.7 % unpruned; 56.9 % uniform; 93.8 % by sensitivity.
    assert _accuracy(uniform, x, labels) < 0.6
    assert _accuracy(chosen, x, labels) > 0.92
    assert analyze(chosen).totals["params"] <= analyze(uniform).totals["params"]  # 54,045 vs 55,230
    assert result.stats["allocation"] == "sensitivity"
    first, second, third, fourth, logits = result.layers
    # The first conv (32 filters of 9 weights) is the most sensitive per weight: it keeps every channel.
    assert first.figures["allocated_ratio"] == 0.0 and first.figures["channels_after"] == 32
    assert third.figures["allocated_ratio"] > 0.4
    # Removing 22 % of the first conv costs more output error than 22 % of any later layer (0.13 vs ≤ 0.06).
    assert [row[0] for row in first.figures["sensitivity"]][:3] == [0.0, 0.125, 0.2188]
    errors = [layer.figures["sensitivity"][2][1] for layer in (first, second, third, fourth)]
    assert errors[0] == max(errors) > 0.1
    assert "sensitivity" not in logits.figures and logits.action == "declined"
    again, _ = apply_pass(_prune(ratio=0.3, allocate="sensitivity", reconstruct="off"), proto, ctx)
    assert again.SerializeToString() == chosen.SerializeToString()


def test_digits_half_the_weights() -> None:
    proto, calib, x, labels = _digits()
    ctx = PassContext(samples=calib)
    uniform, _ = apply_pass(_prune(ratio=0.5, reconstruct="off"), proto, ctx)
    chosen, _ = apply_pass(_prune(ratio=0.5, allocate="sensitivity", reconstruct="off"), proto, ctx)
    # 16.4 % (uniform) vs 64.4 % held-out, with fewer params left (24,461 vs 28,106).
    assert _accuracy(uniform, x, labels) < 0.2 and _accuracy(chosen, x, labels) > 0.55
    assert analyze(chosen).totals["params"] <= analyze(uniform).totals["params"]


def test_without_data_it_is_uniform_with_a_note() -> None:
    proto, _, _, _ = _digits()
    uniform, plain = apply_pass(_prune(ratio=0.3, round_to=8), proto)
    fallback, result = apply_pass(_prune(ratio=0.3, round_to=8, allocate="sensitivity"), proto)
    assert fallback.SerializeToString() == uniform.SerializeToString()
    assert result.stats.pop("allocation") == "uniform: sensitivity needs calibration samples (--data)"
    assert result.stats == plain.stats


def test_measured_error_is_the_pruned_models_error() -> None:
    """The curve is measured by zeroing the consumers' input columns: at each count it equals the error
    of the model that prune writes with that many channels gone (one group: a, ranked by L1 norm)."""
    rng = np.random.default_rng(0)
    proto = model_from_text(
        f"""{HEADER}
        g (float[1,3,6,6] X) => (float[1,4] Y) {{
          c = Conv <pads = [1, 1, 1, 1]> (X, Wa, Ba)
          r = Relu (c)
          p = GlobalAveragePool (r)
          f = Flatten (p)
          Y = Gemm <transB = 1> (f, Wf, Bf)
        }}
        """,
        {"Wa": rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "Ba": rng.standard_normal(8).astype(np.float32),
         "Wf": rng.standard_normal((4, 8)).astype(np.float32), "Bf": rng.standard_normal(4).astype(np.float32)},
    )
    samples = [{"X": rng.standard_normal((1, 3, 6, 6)).astype(np.float32)} for _ in range(8)]
    from nnopt.ir.model import Model

    model = Model.from_proto(proto)
    a = Tracer(model.graph, infer_shapes(proto, {}), "l1", lambda n: True, lambda s: s, 17).trace()
    class_of = _classes(a)
    (group, _logits) = _groups(a, class_of, False)
    order = _removal_order(group)
    curve = Trials(proto, a, class_of, [GroupPlan(group.classes, order, 0, 7)], samples).curves([0])
    counts, errors = curve[0].counts, curve[0].errors
    assert counts == [0, 1, 2, 3, 4, 5, 6, 7]
    reference = [run(proto, s) for s in samples]
    for count, error in zip(counts, errors):
        pruned, _ = apply_pass(_prune(ratio=count / 8), proto)
        assert error == pytest.approx(output_error(reference, [run(pruned, s) for s in samples], [None]), rel=1e-5, abs=1e-12)
    assert 0 < errors[1] < errors[-1]


def test_bad_combinations() -> None:
    with pytest.raises(OptionError):
        PruneOptions.create("prune", allocate="sensitivity", scope="global")
    with pytest.raises(OptionError):
        PruneOptions.create("prune", allocate="sensitivity", mode="unstructured")
    assert PruneOptions.create("prune").allocate == "uniform"


def test_class_scores_behind_a_softmax_are_compared_by_kl_divergence() -> None:
    """A Softmax output is judged on its logits: KL(softmax(reference) || softmax(candidate)), so a
    saturated probability vector still shows the damage; other outputs by normalised MSE."""
    from nnopt.passes._sensitivity import _with_logits

    proto = model_from_text(
        f"""{HEADER}
        g (float[1,4] X) => (float[1,3] P, float[1,3] L) {{
          L = MatMul (X, W)
          P = Softmax <axis = -1> (L)
        }}
        """,
        {"W": np.eye(4, 3, dtype=np.float32)},
    )
    probe, targets, axes = _with_logits(proto)
    assert targets == ["L", "L"] and axes == [-1, None]
    assert [o.name for o in probe.graph.output] == ["P", "L"]  # L is an output already: nothing added
    ref, new = np.array([[8.0, 0.0, 0.0]]), np.array([[6.0, 1.0, 0.0]])
    p, q = np.exp(ref) / np.exp(ref).sum(), np.exp(new) / np.exp(new).sum()
    kl = float(np.sum(p * np.log(p / q)))
    assert output_error([[ref]], [[new]], [-1]) == pytest.approx(kl, rel=1e-9)
    assert kl > 50 * float(np.sum((p - q) ** 2) / np.sum(p**2))  # the probabilities barely move
    assert output_error([[ref]], [[new]], [None]) == pytest.approx(np.sum((new - ref) ** 2) / np.sum(ref**2))
