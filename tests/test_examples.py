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


@pytest.mark.parametrize("script", ["optimize_small_cnn.py"])
def test_example_script_runs(script, tmp_path):
    done = subprocess.run([sys.executable, str(EXAMPLES / script), str(tmp_path / "out.onnx")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out.onnx").exists()
    assert "outputs agree" in done.stdout
