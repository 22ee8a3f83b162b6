"""Benchmark: nnopt's fp16 pass against onnxconverter-common's float16 converter on the real models.

Both convert with float32 inputs and outputs kept (``keep_io_types``). For each model and converter: the
serialised size against the original, the Casts added to the main graph, and the lowest cosine over every
output and 4 generated samples in onnxruntime (or why onnxruntime cannot run the result). The converter is
not a dependency of nnopt: ``pip install onnxconverter-common==1.16.0`` (or pass ``--converter-path DIR``
where it was installed with ``pip install --target DIR --no-deps``). Prints a Markdown table (docs/fp16.md
quotes it).

    python benchmarks/fp16_vs_onnxconverter.py [--models KEY ...] [--converter-path DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from realmodels import REAL_MODELS, write_data  # noqa: E402

import nnopt  # noqa: E402

SAMPLES = 4


def _cosine(reference: ort.InferenceSession, model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> str:
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime's refusal is the result
        return f"onnxruntime cannot load it: {str(exc).splitlines()[0][:110]}"
    worst = 1.0
    for feed in feeds:
        for want, got in zip(reference.run(None, feed), session.run(None, feed)):
            a, b = np.asarray(want, np.float64).ravel(), np.asarray(got, np.float64).ravel()
            worst = min(worst, float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)))
    return f"{worst:.6f}"


def _casts(model: onnx.ModelProto) -> int:
    return sum(node.op_type == "Cast" for node in model.graph.node)


def compare(key: str, tmp: Path) -> list[dict[str, Any]]:
    """One row per converter for the real model ``key``."""
    from onnxconverter_common import float16

    [spec] = [m for m in REAL_MODELS if m.key == key]
    path = spec.path()
    if path is None:
        return []
    data = write_data(spec, path, tmp / f"{key}.npz", samples=SAMPLES, seed=1000)
    with np.load(data) as npz:
        feeds = [{k: np.asarray(npz[k][i]) for k in npz.files if k != "labels"} for i in range(SAMPLES)]
    original = onnx.load(path)
    reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in reference.get_inputs()}
    feeds = [{k: v for k, v in f.items() if k in names} for f in feeds]
    converted: dict[str, onnx.ModelProto | str] = {}
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            converted["onnxconverter-common"] = float16.convert_float_to_float16(onnx.load(path), keep_io_types=True)
    except Exception as exc:  # noqa: BLE001 - a converter failure is the result
        converted["onnxconverter-common"] = f"fails: {type(exc).__name__}"
    model, _ = nnopt.Pipeline(["fp16"], verify=False).run(path)
    converted["nnopt fp16"] = model.to_proto()
    rows = []
    for name, result in converted.items():
        if isinstance(result, str):
            rows.append({"model": key, "converter": name, "size": None, "casts": None, "cosine": result})
            continue
        rows.append({"model": key, "converter": name, "size": result.ByteSize() / original.ByteSize(),
                     "casts": _casts(result) - _casts(original), "cosine": _cosine(reference, result, feeds)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=[m.key for m in REAL_MODELS])
    parser.add_argument("--converter-path", help="a folder onnxconverter-common was installed into (pip --target)")
    args = parser.parse_args(argv)
    if args.converter_path:
        sys.path.insert(0, args.converter_path)
    print("| model | converter | size (ratio) | Casts added (main graph) | lowest cosine |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.models:
            for row in compare(key, Path(tmp)):
                size = "–" if row["size"] is None else f"{row['size']:.3f}"
                casts = "–" if row["casts"] is None else f"+{row['casts']}"
                print(f"| {row['model']} | {row['converter']} | {size} | {casts} | {row['cosine']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
