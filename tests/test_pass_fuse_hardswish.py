"""Tests of fuse-hardswish: a HardSwish written out in four elementwise ops becomes HardSigmoid and Mul."""

from __future__ import annotations

import numpy as np
import pytest

from nnopt.passes.fuse_hardswish import ALPHA, BETA, FuseHardSwish
from nnopt.testing import assert_lossless, model_from_text, op_types, run

#: The written-out HardSwish of ``r`` (= Relu(X) - 1, so both signs and the clip's ends occur), as bodies.
WRITTEN_OUT = [
    ("paddle", "a = Add(r, three)\n c = Clip(a, zero, six)\n m = Mul(r, c)\n Y = Div(m, six)"),
    ("operands_swapped", "a = Add(three, r)\n c = Clip(a, zero, six)\n m = Mul(c, r)\n Y = Div(m, six)"),
    ("times_a_sixth", "a = Add(r, three)\n c = Clip(a, zero, six)\n m = Mul(r, c)\n Y = Mul(m, sixth)"),
    ("gate_scaled_first", "a = Add(r, three)\n c = Clip(a, zero, six)\n g = Div(c, six)\n Y = Mul(r, g)"),
]
CONSTANTS = ("zero = Constant <value = float[1] {0.0}> ()\n three = Constant <value = float[1] {3.0}> ()\n"
             " six = Constant <value = float[1] {6.0}> ()\n sixth = Constant <value = float[1] {0.16666667}> ()\n")


def _model(body: str, opset: int = 13) -> str:
    return model_from_text(
        f'<ir_version: 8, opset_import: ["" : {opset}]>\n'
        f"g (float[2,8,5,5] X) => (float[2,8,5,5] Y) {{\n {CONSTANTS} one = Constant <value = float[1] {{1.0}}> ()\n"
        f" q = Relu(X)\n r = Sub(q, one)\n {body}\n}}")


@pytest.mark.parametrize("name,body", WRITTEN_OUT, ids=[n for n, _ in WRITTEN_OUT])
def test_written_out_hardswish_becomes_hardsigmoid_and_mul(name: str, body: str):
    proto = _model(body)
    out, result = assert_lossless(FuseHardSwish(), proto, rtol=1e-6)
    assert result.stats == {"hardswish_fused": 1}
    assert op_types(out).count("HardSigmoid") == 1 and not {"Add", "Clip", "Div"} & set(op_types(out))
    assert [e.action for e in result.layers] == ["rewritten"] and result.layers[0].figures["nodes_before"] == 4
    hardsigmoid = next(n for n in out.graph.node if n.op_type == "HardSigmoid")
    assert {a.name: a.f for a in hardsigmoid.attribute} == pytest.approx({"alpha": ALPHA, "beta": BETA})
    # The graph output keeps its name, now written by the Mul.
    assert next(n for n in out.graph.node if "Y" in n.output).op_type == "Mul"
    x = np.linspace(-8, 8, 400, dtype=np.float32).reshape(2, 8, 5, 5)
    r = np.maximum(x, 0) - 1
    assert run(out, {"X": x})[0] == pytest.approx(r * np.clip(r + 3, 0, 6) / 6, abs=1e-6)


def test_clip_bounds_as_attributes_before_opset_11():
    body = "a = Add(r, three)\n c = Clip <min = 0.0, max = 6.0> (a)\n m = Mul(r, c)\n Y = Div(m, six)"
    out, result = assert_lossless(FuseHardSwish(), _model(body, opset=10), rtol=1e-6)
    assert result.stats == {"hardswish_fused": 1} and "Clip" not in op_types(out)


@pytest.mark.parametrize("name,body", [
    ("other_constant", "a = Add(r, six)\n c = Clip(a, zero, six)\n m = Mul(r, c)\n Y = Div(m, six)"),
    ("other_bounds", "a = Add(r, three)\n c = Clip(a, zero, three)\n m = Mul(r, c)\n Y = Div(m, six)"),
    ("other_input", "a = Add(q, three)\n c = Clip(a, zero, six)\n m = Mul(r, c)\n Y = Div(m, six)"),
    # The clipped tensor is read twice: the four ops are not the HardSwish's alone.
    ("shared_gate", "a = Add(r, three)\n c = Clip(a, zero, six)\n m = Mul(r, c)\n d = Div(m, six)\n Y = Add(d, c)"),
], ids=lambda v: v if isinstance(v, str) and "=" not in v else "")
def test_lookalikes_stay(name: str, body: str):
    proto = _model(body)
    out, result = assert_lossless(FuseHardSwish(), proto)
    assert not result.modified and result.stats == {"hardswish_fused": 0}
    assert op_types(out) == op_types(proto)


def test_two_hardswishes_in_a_row_are_both_fused():
    body = ("a = Add(r, three)\n c = Clip(a, zero, six)\n m = Mul(r, c)\n h = Div(m, six)\n"
            " a2 = Add(h, three)\n c2 = Clip(a2, zero, six)\n m2 = Mul(h, c2)\n Y = Div(m2, six)")
    out, result = assert_lossless(FuseHardSwish(), _model(body), rtol=1e-6)
    assert result.stats == {"hardswish_fused": 2}
    assert op_types(out).count("HardSigmoid") == 2 and op_types(out).count("Mul") == 2


@pytest.mark.slow
def test_ppocr_direction_classifier():
    """PP-OCR's classifier (opset 11, Paddle export): all 18 of its HardSwishes, within 1e-7 of the outputs."""
    import onnx
    from realmodels import REAL_MODELS

    from nnopt.api import optimize

    spec = next(m for m in REAL_MODELS if m.key == "ppocr_cls")
    if spec.path() is None:
        pytest.skip("rapidocr-onnxruntime not installed (tests/real-models.txt)")
    model, report = optimize(onnx.load(str(spec.path())), ["constants-to-initializers", "fuse-hardswish"])
    (_, record) = report.passes
    assert record.status == "applied" and record.stats == {"hardswish_fused": 18}
    assert record.fidelity is not None and record.fidelity["step_max_rel_error"] < 1e-6
    proto = model.to_proto()
    assert op_types(proto).count("HardSigmoid") == 9 + 18 and "Div" not in op_types(proto)
