"""The data and benchmark of issue #14: rendered-text generators, the committed orientation CNN, benchmarks/recovery.py."""

from __future__ import annotations

import importlib.util
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
    # The committed test split is the generator's (sample i depends only on the draws before it).
    with np.load(ORIENTATION / "orientation_test.npz") as npz:
        assert np.array_equal(datasets.orientation_crops(8, "test", seed=0)[0]["x"], npz["x"][:8])
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
    assert recovery.main(["--models", "digits", "--settings", "original", "prune30", "--out", str(out)]) == 0
    payload = json.loads(out.with_suffix(".json").read_text())
    rows = {r["key"]: r for r in payload["models"][0]["settings"]}
    assert rows["original"]["accuracy"] == pytest.approx(446 / 450)
    # prune without recovery on the digits CNN (either spelling: before and after reconstruct=off existed):
    # docs/prune.md's 73.3 %, measured on the 450 test images the pass never saw.
    assert rows["prune30"]["ran"].startswith("default+prune:ratio=0.3,round_to=8")
    assert rows["prune30"]["accuracy"] == pytest.approx(330 / 450)
    assert rows["prune30"]["delta_pt"] == pytest.approx(100 * (330 - 446) / 450)
    goals = {g["goal"]: g for g in payload["goals"]}
    assert goals["`prune30-rec` loses ≤ 3 pt"]["met"] == "not measured"  # not among the settings run
    assert out.with_suffix(".md").read_text().startswith("# Accuracy recovery")


@pytest.mark.slow
def test_recovery_bench_quick(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    import recovery

    out = tmp_path / "quick"
    assert recovery.main(["--quick", "--out", str(out)]) == 0
    payload = json.loads(out.with_suffix(".json").read_text())
    assert [m["model"] for m in payload["models"]] == ["digits", "ppocr_cls"]
    # The peer's rows need the bench extra (onnxsim); without it they are error rows by design.
    peer_ok = importlib.util.find_spec("onnxsim") is not None
    for model in payload["models"]:
        rows = [r for r in model["settings"] if peer_ok or not r["key"].startswith("onnxsim")]
        assert all(r["status"] != "error" for r in rows), rows
