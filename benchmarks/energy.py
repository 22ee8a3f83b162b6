"""Energy estimates and throughput at batch 1 and 8 on the digits CNN (float, k-means 4-bit, int8) and the real models.

For each model: the cost model's energy per inference on the default profile (x86-avx2-2core) split into arithmetic,
on-chip and off-chip bytes, and `nnopt analyze --batch`'s estimated and measured throughput (onnxruntime CPU,
median of --runs runs, default threads) at batch 1 and 8. Writes docs/energy.json and prints the Markdown tables
of docs/energy.md. The energy figures are estimates from 45 nm-era figures (nnopt.cost.energy), not measurements.

    python benchmarks/energy.py [--runs 20] [--out docs/energy.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from realmodels import REAL_MODELS  # noqa: E402

from nnopt.cost import DEFAULT_PROFILE, analyze  # noqa: E402
from nnopt.cost.hardware import FREE_KERNELS  # noqa: E402
from nnopt.cost.inputs import free_batch_dims  # noqa: E402
from nnopt.cost.timing import measure_latency  # noqa: E402
from nnopt.errors import InputError  # noqa: E402
from nnopt.ir.model import load_model  # noqa: E402

BATCHES = (1, 8)
DIGITS = ROOT / "examples" / "digits"


def digits_variants(folder: Path) -> dict[str, Path]:
    """The digits CNN as shipped, after k-means 4-bit weights, and after static int8 quantization."""
    x = np.load(DIGITS / "digits_test.npz")["x"]
    np.savez(folder / "calib.npz", x=x[:200])
    variants = {"digits (float)": DIGITS / "digits_cnn.onnx"}
    for name, passes in (("digits (kmeans 4-bit)", ["-p", "default", "-p", "kmeans:bits=4"]),
                         ("digits (int8)", ["-p", "default", "-p", "quantize"])):
        out = folder / (name.replace(" ", "_").replace("(", "").replace(")", "") + ".onnx")
        subprocess.run([sys.executable, "-m", "nnopt", "optimize", str(DIGITS / "digits_cnn.onnx"), "-o", str(out),
                        *passes, "--data", str(folder / "calib.npz"), "-q"], check=True)
        variants[name] = out
    return variants


def energy_split(report: Any) -> dict[str, float]:
    """Joules of one run: arithmetic, on-chip bytes and off-chip bytes (nodes the runtime folds or fuses cost 0)."""
    figures = report.hardware.energy
    onchip = offchip = 0.0
    for node in report.nodes:
        if node["kernel"] in FREE_KERNELS:
            continue
        onchip += (node["bytes_moved"] - node["offchip_bytes"]) * figures.onchip_pj_per_byte * 1e-12
        offchip += node["offchip_bytes"] * figures.offchip_pj_per_byte * 1e-12
    total = float(report.totals["energy_j"])
    return {"total_j": total, "arithmetic_j": total - onchip - offchip, "onchip_j": onchip, "offchip_j": offchip}


#: Recurrent states that carry the batch on axis 1 ([layers, batch, hidden]): `--batch` leaves them as they are, so
#: they are given at the batch, as a user would with --input-shape state=2,8,128.
STATES = ("state", "h", "c")


def measure(path: Path, shapes: dict[str, list[int]], fixed: dict[str, np.ndarray], runs: int) -> float | str:
    """Median seconds per run, as `nnopt analyze --batch --measure` times it; or why onnxruntime cannot run it."""
    proto = free_batch_dims(load_model(path).to_proto(), shapes)
    names = {i.name for i in proto.graph.input}
    try:
        feeds = {k: v for k, v in fixed.items() if k in names}
        return float(measure_latency(proto, feeds, runs=runs, input_shapes=shapes)["median_s"])
    except InputError as exc:
        return str(exc).split("\n")[0][:160]


def row(name: str, path: Path, given: dict[str, list[int]], fixed: dict[str, np.ndarray], runs: int) -> dict[str, Any]:
    out: dict[str, Any] = {"model": name}
    for batch in BATCHES:
        shapes = {k: [d[0], batch, *d[2:]] if k in STATES and len(d) == 3 else d for k, d in given.items()}
        try:
            # Batch 1 is the plain analysis (`nnopt analyze` without --batch), which never refuses.
            report = analyze(path, hardware=DEFAULT_PROFILE, input_shapes=shapes, batch=None if batch == 1 else batch)
        except InputError as exc:
            out[f"batch{batch}"] = {"refused": str(exc)}
            continue
        seconds = measure(path, report.input_shapes, fixed, runs)
        ran = isinstance(seconds, float)
        out[f"batch{batch}"] = {
            "energy": energy_split(report), "offchip_bytes": int(report.totals["offchip_bytes"]),
            "macs": int(report.totals["macs"]), "weight_bytes": int(report.totals["weight_bytes"]),
            "estimated_latency_s": float(report.totals["latency_s"]),
            "estimated_throughput_per_s": float(report.totals["throughput_per_s"]),
            "measured_latency_s": seconds if ran else None,
            "measured_throughput_per_s": batch / seconds if ran else None,
            "measure_error": None if ran else seconds,
        }
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | MACs | weights | energy / inference (est.) | arithmetic | on-chip bytes | off-chip bytes "
             "| off-chip bytes/inference |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        one = r["batch1"]
        if "refused" in one:
            lines.append(f"| {r['model']} | – | – | refused: {one['refused']} | | | | |")
            continue
        e = one["energy"]
        share = {k: f"{100 * e[k] / e['total_j']:.0f} %" for k in ("arithmetic_j", "onchip_j", "offchip_j")}
        lines.append(f"| {r['model']} | {one['macs'] / 1e6:,.2f} M | {one['weight_bytes'] / 1e3:,.1f} kB "
                     f"| {e['total_j'] * 1e6:,.2f} uJ | {share['arithmetic_j']} | {share['onchip_j']} "
                     f"| {share['offchip_j']} | {one['offchip_bytes'] / 1e3:,.1f} kB |")
    lines += ["", "| model | batch | energy / inference (est.) | latency / batch est. | measured | throughput est. "
              "| measured |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        for batch in BATCHES:
            b = r[f"batch{batch}"]
            if "refused" in b:
                lines.append(f"| {r['model']} | {batch} | refused: {b['refused']} | | | | |")
                continue
            ran = b["measured_latency_s"] is not None
            measured = (f"{b['measured_latency_s'] * 1e6:,.1f} us", f"{b['measured_throughput_per_s']:,.0f}/s") if ran \
                else ("onnxruntime cannot run it", "–")
            lines.append(f"| {r['model']} | {batch} | {b['energy']['total_j'] / batch * 1e6:,.2f} uJ "
                         f"| {b['estimated_latency_s'] * 1e6:,.1f} us | {measured[0]} "
                         f"| {b['estimated_throughput_per_s']:,.0f}/s | {measured[1]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "docs" / "energy.json"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in digits_variants(Path(tmp)).items():
            rows.append(row(name, path, {}, {}, args.runs))
        for model in REAL_MODELS:
            path = model.path()
            if path is None:
                continue
            shapes = {k: v for k, v in model.input_shapes.items() if k not in model.fixed_inputs}
            rows.append(row(model.key, path, shapes, model.fixed_inputs, args.runs))
    data = {"profile": DEFAULT_PROFILE.name, "runs": args.runs, "rows": rows}
    Path(args.out).write_text(json.dumps(data, indent=2) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
