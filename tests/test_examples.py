"""Examples are executable documentation: each one runs and checks what it shows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_example_model_is_what_its_builder_builds():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import build_example_model
    finally:
        sys.path.remove(str(EXAMPLES))
    assert build_example_model.build().SerializeToString() == (EXAMPLES / "small_cnn.onnx").read_bytes()


@pytest.mark.parametrize(
    ("script", "says"),
    [("optimize_small_cnn.py", "outputs agree"), ("digits_pipeline.py", "test accuracy 99.11% -> ")],
)
def test_example_script_runs(script, says, tmp_path):
    done = subprocess.run([sys.executable, str(EXAMPLES / script), str(tmp_path / "out.onnx")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out.onnx").exists()
    assert says in done.stdout


def _import_example(name: str):
    sys.path.insert(0, str(EXAMPLES))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(EXAMPLES))


def test_writing_a_pass_guide_example_runs():
    done = subprocess.run([sys.executable, str(EXAMPLES / "my_first_pass.py")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "ops after the pass: ['Relu', 'Abs', 'Sigmoid']" in done.stdout


def test_writing_a_pass_guide_test_snippet():
    # The test shown in docs/writing-a-pass.md, step 4, run as written.
    from nnopt.testing import apply_pass, assert_lossless, model_from_text, op_types

    guide = _import_example("my_first_pass")
    proto = model_from_text("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 8] x) => (float[2, 8] y) { a = Relu(x)  b = Relu(a)  y = Sigmoid(b) }
    """)
    out, result = assert_lossless(guide.CollapseRepeatedOps(), proto)
    assert op_types(out) == ["Relu", "Sigmoid"] and result.stats["nodes_removed"] == 1
    # Declines: a repeated op whose output is a graph output, and different attributes.
    proto = model_from_text("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 8] x) => (float[2, 8] y) { a = Relu(x)  y = Relu(a) }
    """)
    out, result = apply_pass(guide.CollapseRepeatedOps(), proto)
    assert op_types(out) == ["Relu", "Relu"] and not result.modified
    assert [layer.to_dict() for layer in result.layers] == [{"node": out.graph.node[1].name, "op_type": "Relu", "action": "declined",
                              "reason": "its output is a graph output"}]
