"""The data and benchmark of issue #14: rendered-text generators, the committed orientation CNN, benchmarks/recovery.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from nnopt.runtime import make_session

ROOT = Path(__file__).resolve().parents[1]
ORIENTATION = ROOT / "examples" / "orientation"
sys.path.insert(0, str(ROOT / "benchmarks"))

#: What examples/orientation/README.md states: correct test crops out of 800.
ORIENTATION_CORRECT = 788


def test_orientation_cnn_reaches_its_stated_accuracy() -> None:
    with np.load(ORIENTATION / "orientation_test.npz") as npz:
        x = npz["x"]
    labels = np.load(ORIENTATION / "orientation_test_labels.npy")
    assert x.shape == (800, 1, 32, 32) and x.dtype == np.float32
    assert np.bincount(labels).tolist() == [200, 200, 200, 200]
    predictions = make_session(ORIENTATION / "orientation_cnn.onnx").run(None, {"x": x})[0].argmax(1)
    assert int(np.sum(predictions == labels)) == ORIENTATION_CORRECT
    assert (ORIENTATION / "orientation_cnn.onnx").stat().st_size < 1_000_000


def test_generators_are_deterministic_and_splits_disjoint() -> None:
    pytest.importorskip("PIL")
    import datasets

    a, la = datasets.orientation_crops(8, "test", seed=3)
    b, lb = datasets.orientation_crops(8, "test", seed=3)
    assert np.array_equal(a["x"], b["x"]) and np.array_equal(la, lb)
    assert la.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    c, _ = datasets.orientation_crops(8, "calibration", seed=3)
    assert not np.array_equal(a["x"], c["x"])
    for make, shape in ((datasets.page_inputs, (2, 3, 224, 224)), (datasets.line_inputs, (2, 3, 48, 192))):
        p, dp = make(2, "calibration", seed=1)
        q, dq = make(2, "calibration", seed=1)
        assert p["x"].shape == shape and p["x"].dtype == np.float32
        assert np.array_equal(p["x"], q["x"]) and np.array_equal(dp, dq)
        assert not np.array_equal(p["x"], make(2, "test", seed=1)[0]["x"])
    calib = {w.lower().strip(",.;:!?") for w in datasets.words("calibration", np.random.default_rng(0), 500)}
    test = {w.lower().strip(",.;:!?") for w in datasets.words("test", np.random.default_rng(0), 500)}
    assert len(calib) > 200 and len(test) > 200 and not calib & test


def test_recovery_bench_runs_on_digits(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    import recovery

    out = tmp_path / "recovery"
    assert recovery.main(["--models", "digits", "--settings", "original", "prune30", "prune30-rec",
                          "--out", str(out)]) == 0
    payload = json.loads(out.with_suffix(".json").read_text())
    rows = {r["key"]: r for r in payload["models"][0]["settings"]}
    assert rows["original"]["accuracy"] == pytest.approx(446 / 450)
    # Today's prune (no recovery) on the digits CNN: docs/prune.md's 73.3 %.
    if rows["prune30"]["ran"] == "default+prune:ratio=0.3,round_to=8":
        assert rows["prune30"]["accuracy"] == pytest.approx(330 / 450)
    assert rows["prune30-rec"]["status"] in ("not available", "applied")
    assert out.with_suffix(".md").read_text().startswith("# Accuracy recovery")


@pytest.mark.slow
def test_recovery_bench_quick() -> None:
    pytest.importorskip("PIL")
    import recovery

    assert recovery.main(["--quick"]) == 0
