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


def _readme_python_snippet() -> str:
    """The README's Python API example, exactly as the README shows it."""
    readme = (EXAMPLES.parent / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Python API"):]
    return section[section.index("```python\n") + len("```python\n"):section.index("```\n", section.index("```python"))]


@pytest.mark.slow  # about 25 s: three pipelines on the digits CNN, in a fresh interpreter
def test_the_readme_python_snippet_runs_as_written_on_the_shipped_files(tmp_path):
    """Run from a folder laid out as the repository (its examples linked in), so what it writes lands in tmp."""
    import onnx

    import nnopt

    (tmp_path / "examples").symlink_to(EXAMPLES, target_is_directory=True)
    snippet = _readme_python_snippet()
    check = snippet + (
        "\nimport json\n"
        "print(json.dumps({'statuses': [r.status for r in report.passes], 'fidelity': report.passes[-1].fidelity,"
        " 'seed': pipeline.seed}))\n"
    )
    done = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    written = tmp_path / "out" / "digits.opt.onnx"
    # The flops printed are the saved model's, and the model is the prune + quantize result.
    assert int(float(lines[-2])) == int(nnopt.analyze(written).totals["flops"])
    ops = {n.op_type for n in onnx.load(str(written)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "BatchNormalization" not in ops
    assert "prune" in done.stdout and "quantize" in done.stdout  # the table
    import json

    last = json.loads(lines[-1])
    assert last["statuses"] == ["applied"] and last["fidelity"]["samples"] == 64 and last["seed"] == 1


def test_what_the_guide_says_about_graphsurgeon_links_holds():
    """docs/writing-a-pass.md: change node.inputs in place; an assignment rebuilt from the same list by a
    generator empties it (graphsurgeon clears, then reads). If graphsurgeon changes this, revisit the guide."""
    import numpy as np
    import onnx_graphsurgeon as gs

    guide = (EXAMPLES.parent / "docs" / "writing-a-pass.md").read_text(encoding="utf-8")
    assert "Change them in place: `node.inputs[1] = new_tensor`" in guide
    assert "assigning to them rewires the graph" not in guide

    def add() -> tuple:
        a, b = gs.Variable("a", np.float32, [1]), gs.Variable("b", np.float32, [1])
        return a, b, gs.Node("Add", inputs=[a, b], outputs=[gs.Variable("y", np.float32, [1])])

    a, b, node = add()
    node.inputs[1] = a  # in place: both sides of the link follow
    assert [t.name for t in node.inputs] == ["a", "a"] and a.outputs == [node, node] and b.outputs == []
    a, b, node = add()
    node.inputs = (a if t is b else t for t in node.inputs)  # the pitfall the guide warns about
    assert list(node.inputs) == [] and a.outputs == [] and b.outputs == []


def test_the_guide_says_to_install_nnopt_before_a_plugin_that_depends_on_it():
    guide = (EXAMPLES.parent / "docs" / "writing-a-pass.md").read_text(encoding="utf-8")
    section = guide[guide.index("## 5. Package it as a plugin"):guide.index("## 6. Use it")]
    assert section.index("Install nnopt first, then the plugin") < section.index("pip install .  ")
    assert section.index("pip install /path/to/nnopt") < section.index("pip install .  ")
