"""Optimize the example CNN with the Python API, then check what changed and that outputs did not.

    python examples/optimize_small_cnn.py [OUTPUT.onnx]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

import nnopt
from nnopt.runtime import make_session

HERE = Path(__file__).resolve().parent


def main(out: Path) -> None:
    model = nnopt.load_model(HERE / "small_cnn.onnx")
    before = nnopt.analyze(model).totals
    model, report = nnopt.optimize(model)  # the default, lossless pipeline
    print(report.format_table())
    nnopt.save_model(model, out)
    after = nnopt.analyze(model).totals

    # What the pipeline promises: fewer nodes (BatchNorms folded, Identity/Dropout/dead branch gone)...
    assert after["nodes"] < before["nodes"], (before["nodes"], after["nodes"])
    assert after["flops"] < before["flops"]
    # ...and the same outputs, checked here independently of the pipeline's own verification.
    x = np.random.default_rng(1).standard_normal((4, 3, 32, 32)).astype(np.float32)
    original = make_session(HERE / "small_cnn.onnx").run(None, {"x": x})[0]
    optimized = make_session(out).run(None, {"x": x})[0]
    np.testing.assert_allclose(optimized, original, rtol=1e-4, atol=1e-6)
    print(f"nodes {before['nodes']} -> {after['nodes']}, FLOPs {before['flops']:,} -> {after['flops']:,}; "
          f"outputs agree (max abs diff {np.max(np.abs(optimized - original)):.2e}); wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp) / "small_cnn.opt.onnx")
