"""The pieces of benchmarks/search.py (issue #15's figures): data splits, the latency harness, goals and report."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_digits_sets_are_disjoint_and_stratified(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    import search

    model = search.prepare("digits", tmp_path, quick=False)
    assert isinstance(model, search.SearchModel) and model.metric == "top1"
    with np.load(model.calib) as calib, np.load(model.eval) as evals:
        calib_x, eval_x, eval_labels = calib["x"], evals["x"], evals["labels"]
    test_x = model.test_x["x"]
    assert (len(calib_x), len(eval_x), len(test_x)) == (512, 225, 225)
    # No image in two sets (the digits data has no duplicates within the committed test split either).
    rows = {name: {a.tobytes() for a in x} for name, x in (("calib", calib_x), ("eval", eval_x), ("test", test_x))}
    assert len(rows["eval"]) == 225 and len(rows["test"]) == 225
    assert not rows["calib"] & rows["eval"] and not rows["calib"] & rows["test"] and not rows["eval"] & rows["test"]
    # The two halves of the committed test split, with their own labels, make up all of it.
    all_x = np.load(ROOT / "examples" / "digits" / "digits_test.npz")["x"]
    all_labels = np.load(ROOT / "examples" / "digits" / "digits_test_labels.npy")
    assert sorted(rows["eval"] | rows["test"]) == sorted(a.tobytes() for a in all_x)
    index = {a.tobytes(): i for i, a in enumerate(all_x)}
    assert [all_labels[index[a.tobytes()]] for a in eval_x] == eval_labels.tolist()
    assert [all_labels[index[a.tobytes()]] for a in test_x] == model.test_labels.tolist()
    # Stratified: every class has (nearly) the same count in both halves.
    counts = np.bincount(eval_labels, minlength=10) - np.bincount(model.test_labels, minlength=10)
    assert np.abs(counts).max() <= 1
    # Seeded: the same split every run, another with another seed.
    a, b = search.stratified_halves(all_labels, seed=0)
    assert np.array_equal(a, search.stratified_halves(all_labels, seed=0)[0])
    assert not np.array_equal(a, search.stratified_halves(all_labels, seed=1)[0])
    assert not set(a) & set(b) and len(a) + len(b) == 450


def test_orientation_sets_are_disjoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("PIL")
    import search

    # Small counts: the same code path as the full run's 512 / 400.
    monkeypatch.setitem(search.COUNTS, "orientation", ({"calib": 24, "eval": 20}, {"calib": 24, "eval": 20}))
    model = search.prepare("orientation", tmp_path, quick=True)
    assert isinstance(model, search.SearchModel)
    with np.load(model.calib) as calib, np.load(model.eval) as evals:
        assert calib["x"].shape == (24, 1, 32, 32) and "labels" not in calib.files
        assert evals["x"].shape == (20, 1, 32, 32) and evals["labels"].tolist() == [0, 1, 2, 3] * 5
        sets = [{a.tobytes() for a in x} for x in (calib["x"], evals["x"], model.test_x["x"])]
    assert not sets[0] & sets[1] and not sets[0] & sets[2] and not sets[1] & sets[2]
    assert len(model.test_labels) == 800


def _tiny_model(path: Path, width: int) -> Path:
    """x [N, 16] -> MatMul by a [16, width] -> ReduceSum... a model whose cost grows with ``width``."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((16, width)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((width, 4)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [w1, w2])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_interleaved_latency_ratios(tmp_path: Path) -> None:
    import search

    original = _tiny_model(tmp_path / "original.onnx", 64)
    bigger = _tiny_model(tmp_path / "bigger.onnx", 4096)
    fixed = tmp_path / "fixed.onnx"
    proto = onnx.load(original)
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1  # batch 1 only: fails at 32
    onnx.save(proto, fixed)
    feeds = {size: {"x": np.ones((size, 16), np.float32)} for size in search.BATCHES}
    timing = search.latency_ratios(original, {"bigger": bigger, "fixed": fixed}, feeds, runs=5, rounds=2, threads=1,
                                   tmp=tmp_path)
    assert set(timing["original_s"]) == {1, 32} and all(s > 0 for s in timing["original_s"].values())
    # The A/A copy is the same bytes: its ratio stays near 1 (loose: the machine is shared).
    assert all(0.5 < r < 2.0 for r in timing["aa"].values())
    # 64x the MACs: slower at batch 32 by far more than any noise.
    assert timing["rows"]["bigger"][32][1] > 3.0
    assert set(timing["rows"]["fixed"]) == {1} and "batch 32" in timing["failed"]["fixed"]


def _row(key: str, **figures: float) -> dict:
    return {"key": key, "label": key, "tool": "nnopt", "status": "applied", "notes": [], **figures}


def _fake_results() -> list[dict]:
    common = {"agreement": 0.99, "accuracy": 0.98, "flops_ratio": 0.5, "bytes": 1000}
    digits = {
        "model": "digits", "file": "digits_cnn.onnx", "metric": "top1", "note": "fake", "test_count": 225,
        "original": {"bytes": 10_000, "params": 1, "flops": 2},
        "latency": {"original_s": {"1": 1e-4, "32": 1e-3}, "aa_ratio": {"1": 1.01, "32": 0.99}},
        "settings": [
            _row("level1", drop=0.0, bytes_ratio=0.26, latency_b1_ratio=0.7, latency_b32_ratio=0.66, total_s=100.0,
                 **common),
            _row("level2-size", drop=0.0133, bytes_ratio=0.1, total_s=700.0, **common),
            _row("level3-size", drop=0.004, bytes_ratio=0.065, total_s=320.0, time_budget_s=300.0, **common),
            {"key": "level3-latency", "label": "l3", "tool": "nnopt", "status": "error", "total_s": 5.0,
             "notes": ["nnopt: error: boom"]},
        ],
    }
    ppocr = {
        "model": "ppocr_cls", "file": "cls.onnx", "metric": "agreement", "note": "fake", "test_count": 64,
        "original": {"bytes": 10_000, "params": 1, "flops": 2},
        "latency": {"original_s": {"1": 1e-4, "32": 1e-3}, "aa_ratio": {"1": 1.04, "32": 1.0}},
        "settings": [
            _row("level1", drop=0.0, bytes_ratio=0.3, latency_b1_ratio=1.03, latency_b32_ratio=0.9, total_s=9.0,
                 **common),
            _row("level2-size", drop=0.01, bytes_ratio=0.2, total_s=9.0, **{**common, "bytes": 2000}),
            {**_row("ort", drop=0.02, bytes_ratio=0.25, total_s=1.0, **{**common, "bytes": 2500}), "tool": "ort",
             "agreement": 0.992},
        ],
    }
    return [digits, ppocr]


def test_goals_from_fake_results() -> None:
    import search

    got = {(g["model"], g["goal"]): g for g in search.goals(_fake_results())}
    met = {key: g["met"] for key, g in got.items()}
    assert met[("digits", "level 1 ≤ 0.27× file")] == "yes"
    assert met[("digits", "level 1 ≤ 0.65× latency (batch 32)")] == "**no**"
    assert got[("digits", "level 1 ≤ 0.65× latency (batch 32)")]["value"] == "0.66× at batch 32"
    assert met[("digits", "level 2 (size) within the drop (≤ 1 pt) on the test set")] == "**no**"
    assert got[("digits", "level 2 (size) within the drop (≤ 1 pt) on the test set")]["value"] == \
        "1.33 pt lost on the test set"
    assert met[("digits", "level 2 (size) wall time ≤ 10 min")] == "**no**"
    assert met[("digits", "level 1 wall time ≤ 2 min")] == "yes"
    assert met[("digits", "level 3 --objective size ≤ 0.07× file")] == "yes"
    assert met[("digits", "level 3 (size) honours --time-budget within 10 %")] == "yes"  # 320 s ≤ 330 s
    assert got[("digits", "level 3 (size) honours --time-budget within 10 %")]["value"] == \
        "320 s wall for a 300 s budget"
    assert met[("digits", "level 3 (latency) within the drop on the test set")] == "**no** (failed)"
    assert "nnopt: error: boom" in got[("digits", "level 3 (latency) within the drop on the test set")]["value"]
    assert met[("digits", "level 2 (latency) within the drop on the test set")] == "not measured"
    # ppocr_cls: 1.03× at batch 1 is inside its A/A noise (1.04); 2000 B < ORT's 2500 B at 0.99 vs 0.992.
    assert met[("ppocr_cls", "level 1 never slower than float (batch 1 and 32)")] == "yes"
    assert met[("ppocr_cls", "level 2 smaller than ORT quantize_static at the same agreement (≥ ORT's − 0.5 pt)")] \
        == "yes"
    assert ("ppocr_cls", "level 1 ≤ 0.27× file") not in got  # the CNN goals are for the CNNs only


def test_markdown_and_combine(tmp_path: Path) -> None:
    import search

    results = _fake_results()
    payload = {"machine": {"command": "python benchmarks/search.py", "date": "2026-12-05", "cores": 2, "cpu": "x",
                           "onnxruntime": "1", "onnx": "1", "python": "3"},
               "settings": [], "workers": 2, "runs": 5, "rounds": 2, "threads": 1, "skipped": ["silero: no"],
               "partial": True, "seconds": 12.0, "models": results[:1], "goals": search.goals(results[:1])}
    text = search.to_markdown(payload)
    assert text.startswith("# Automatic compression under an accuracy constraint (issue #15)")
    assert "**Partial results**" in text and "- silero: no" in text
    assert "| level1 | applied | 1.0 (0.260) | 0.500 | 0.9800 | 0.9900 | 0.00 | (0.70) | (0.66) | 100.0 | – |" in text
    assert "| level3-size | applied | 1.0 (0.065) |" in text and "| 320.0 / 300 |" in text
    assert "| l3 | error | – | – | – | – | – | – | – | 5.0 | – |" in text
    assert "- `level3-latency`: nnopt: error: boom" in text
    # Two runs of different models merge into one report; the goals are recomputed over both.
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps(payload))
    second.write_text(json.dumps({**payload, "models": results[1:], "skipped": [], "partial": False}))
    merged = search.combine([str(first), str(second)])
    assert [m["model"] for m in merged["models"]] == ["digits", "ppocr_cls"] and merged["partial"]
    assert {g["model"] for g in merged["goals"]} == {"digits", "ppocr_cls"}


def test_nnopt_command_line(tmp_path: Path) -> None:
    import search

    model = search.SearchModel("digits", tmp_path / "m.onnx", "top1", tmp_path / "c.npz", tmp_path / "e.npz",
                               {}, np.zeros(1))
    options = argparse.Namespace(workers=2, budget={"digits": 300.0})
    known = {s.key: s for s in search.SETTINGS}
    cmd = search.nnopt_command(model, known["level3-size"], tmp_path / "o.onnx", tmp_path / "w", options)
    text = " ".join(cmd[1:])
    assert text.startswith(f"optimize {tmp_path / 'm.onnx'} -o {tmp_path / 'o.onnx'} --level 3 --objective size")
    for flag in ("--max-drop 0.01", "--metric top1", "--labels labels", "--time-budget 300", "--workers 2",
                 f"--eval {tmp_path / 'e.npz'}", f"--report {tmp_path / 'w' / 'report.json'}"):
        assert flag in text
    level1 = " ".join(search.nnopt_command(model, known["level1"], tmp_path / "o.onnx", tmp_path / "w", options))
    assert "--time-budget" not in level1 and "--objective" not in level1


def test_combine_merges_runs_of_one_model(tmp_path: Path) -> None:
    import search

    digits = _fake_results()[0]
    first = {**digits, "settings": digits["settings"][:2]}
    second = {**digits, "settings": [{**digits["settings"][1], "bytes_ratio": 0.09}, *digits["settings"][2:]],
              "latency": {"original_s": {"1": 2e-4, "32": 2e-3}, "aa_ratio": {"1": 0.97, "32": 1.02}}}
    paths = []
    for i, model in enumerate((first, second)):
        path = tmp_path / f"{i}.json"
        path.write_text(json.dumps({"machine": {"command": f"run {i}"}, "models": [model], "skipped": [],
                                    "seconds": 10.0, "partial": False}))
        paths.append(str(path))
    merged = search.combine(paths)
    (model,) = merged["models"]
    assert [r["key"] for r in model["settings"]] == ["level1", "level2-size", "level3-size", "level3-latency"]
    assert model["settings"][1]["bytes_ratio"] == 0.09  # the later run's row replaces the earlier's
    assert [run["aa_ratio"]["1"] for run in model["latency_runs"]] == [1.01, 0.97]
    assert merged["machine"]["command"] == "run 0 ; run 1" and merged["seconds"] == 20.0
    text = "\n".join(search.model_table(model))
    assert "batch 1: 1.010, batch 32: 0.990 (run of level1, level2-size)" in text
    assert "batch 1: 0.970, batch 32: 1.020 (run of level2-size, level3-size, level3-latency)" in text
