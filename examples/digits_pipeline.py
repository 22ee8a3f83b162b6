"""A pipeline script: compress the digits CNN with a pipeline file, then check real test accuracy.

    python examples/digits_pipeline.py [OUTPUT.onnx]

The pipeline (examples/pipelines/digits_prune_quantize.toml) runs the lossless clean-ups, prunes 10 % of
the channels and quantizes to int8, each pass verified against the float model on the test images and
held to the file's top-1 budget. The script then measures what a user would ask: size, FLOPs, and
accuracy on the 450 labelled test images against the original's.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

import nnopt
from nnopt.runtime import make_session

HERE = Path(__file__).resolve().parent
MODEL = HERE / "digits" / "digits_cnn.onnx"
PIPELINE = HERE / "pipelines" / "digits_prune_quantize.toml"


def accuracy(model_path: Path) -> float:
    x = np.load(HERE / "digits" / "digits_test.npz")["x"]
    labels = np.load(HERE / "digits" / "digits_test_labels.npy")
    scores = make_session(model_path).run(None, {"x": x})[0]
    return float(np.mean(scores.argmax(axis=1) == labels))


def main(out: Path) -> None:
    pipeline = nnopt.Pipeline.from_file(PIPELINE)
    model, report = pipeline.run(MODEL, progress=nnopt.StreamProgress())
    print(report.format_table())
    nnopt.save_model(model, out)

    before, after = nnopt.analyze(nnopt.load_model(MODEL)).totals, nnopt.analyze(model).totals
    acc_before, acc_after = accuracy(MODEL), accuracy(out)
    print(f"weight bytes {before['weight_bytes']:,} -> {after['weight_bytes']:,}; "
          f"FLOPs {before['flops']:,} -> {after['flops']:,}; "
          f"test accuracy {acc_before:.2%} -> {acc_after:.2%}; wrote {out}")
    assert after["weight_bytes"] < before["weight_bytes"] / 4  # int8 weights, and fewer channels
    assert not report.rolled_back, [(r.name, r.reason) for r in report.rolled_back]


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp) / "digits.opt.onnx")
