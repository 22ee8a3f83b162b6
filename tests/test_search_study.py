"""The --study store: records survive a kill, a resumed run re-evaluates nothing, another run's folder is refused."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest

from nnopt.errors import InputError
from nnopt.search.candidate import CandidateResult, Configuration, config_key
from nnopt.search.study import CANDIDATES_FILE, MODELS_FOLDER, STUDY_FILE, Study

FINGERPRINT = {"model": "9f" * 32, "data": "1c" * 32, "metric": "top1", "drop_type": "absolute", "seed": 0,
               "level": 3, "options": {"objective": "size", "techniques": ["prune", "kmeans"]}}


def _result(config: Configuration, **fields) -> CandidateResult:
    ratio = float(sum(v for v in config.values() if isinstance(v, float)))
    values = dict(metric=0.98 - ratio / 10, drop=ratio / 10, size_bytes=int(1000 * (3 - ratio)), flops=2e6,
                  latency_s=1e-4, seconds=0.5)
    values.update(fields)
    return CandidateResult(key=config_key(config), config=config, **values)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_results_survive_reopening(tmp_path):
    folder = tmp_path / "study"
    study = Study.open(folder, FINGERPRINT)
    results = [_result({"conv1/prune": 0.25}, extra={"kept": np.float32(0.5), "layers": np.array([1, 2])}),
               _result({}, measured_latency_s=2e-4),
               _result({"fc/rank": 0.5}, metric=None, drop=None, error="onnxruntime: invalid graph")]
    for result in results:
        study.add(result)
    assert sorted(p.name for p in folder.iterdir()) == [CANDIDATES_FILE, STUDY_FILE]
    again = Study.open(folder, json.loads(json.dumps(FINGERPRINT)))
    assert len(again) == 3 and [r.key for r in again.results()] == [r.key for r in results]
    assert again.get(results[1].key) == results[1]
    assert again.get(results[2].key).failed and again.get(results[2].key).error == "onnxruntime: invalid graph"
    assert again.get(results[0].key).extra == {"kept": 0.5, "layers": [1, 2]}
    assert again.get("0" * 16) is None and results[0].key in again


def test_adding_a_key_again_replaces_its_result_in_place(tmp_path):
    study = Study.open(tmp_path / "s", FINGERPRINT)
    first, second = _result({"a/prune": 0.5}), _result({})
    study.add(first)
    study.add(second)
    measured = _result({"a/prune": 0.5}, measured_latency_s=3e-5)
    study.add(measured)
    again = Study.open(tmp_path / "s", FINGERPRINT)
    assert again.results() == [measured, second]


def _synthetic(config: Configuration) -> CandidateResult:
    drop = sum(0.004 * (i + 1) * config.get(f"l{i}/prune", 0.0) for i in range(4))
    size = 1000 + sum(500 * (1 - config.get(f"l{i}/prune", 0.0)) for i in range(4))
    return CandidateResult(key=config_key(config), config=config, metric=0.9 - drop, drop=drop, size_bytes=int(size))


def test_an_interrupted_search_resumes_without_evaluating_anything_twice(tmp_path):
    pytest.importorskip("optuna")
    from nnopt.search.joint import joint_search

    params = {f"l{i}/prune": (0.0, 0.25, 0.5, 0.75) for i in range(4)}
    evaluated: list[str] = []

    def evaluate(configs, stop_after=None):
        for config in configs:
            if len(evaluated) == stop_after:
                raise KeyboardInterrupt  # the run is killed here, in the middle of its 4th batch of 4
            evaluated.append(config_key(config))
        return [_synthetic(c) for c in configs]

    def search(study, stop_after=None):
        return joint_search(params, study.cached(lambda configs: evaluate(configs, stop_after)), objective="size",
                            max_drop=0.01, seed=0, deadline=time.monotonic() + 60, max_trials=24)

    folder = tmp_path / "study"
    with pytest.raises(KeyboardInterrupt):
        search(Study.open(folder, FINGERPRINT), stop_after=13)
    assert len(evaluated) == 13 and len(Study.open(folder, FINGERPRINT)) == 12  # the batch killed is lost
    # Reopened: the 12 kept are not evaluated again; the run asks the same sequence and finishes it.
    evaluated.clear()
    resumed = search(study := Study.open(folder, FINGERPRINT))
    assert len(evaluated) == study.evaluations == 24 - 12
    assert not set(evaluated) & {r.key for r in resumed[:12]}
    # Repeated: nothing evaluated, the same answer as an uninterrupted run.
    evaluated.clear()
    repeated = search(Study.open(folder, FINGERPRINT))
    assert evaluated == []
    assert [r.key for r in repeated] == [r.key for r in resumed] == [r.key for r in search(Study(None, FINGERPRINT))]
    assert len(Study.open(folder, FINGERPRINT)) == 24


def test_another_runs_folder_is_refused_naming_what_differs_and_nothing_is_written(tmp_path):
    folder = tmp_path / "study"
    study = Study.open(folder, FINGERPRINT)
    study.add(_result({}))
    before = _snapshot(folder)
    other = {**FINGERPRINT, "seed": 1, "model": "ab" * 32}
    del other["drop_type"]
    with pytest.raises(InputError) as caught:
        Study.open(folder, other)
    message = str(caught.value)
    assert "\n" not in message
    assert "seed 1 here, 0 in the study" in message
    assert "model 'abababababababababa... here, '9f9f9f9f9f9f9f9f9f9... in the study" in message
    assert "drop_type (none) here, 'absolute' in the study" in message
    assert "metric" not in message and "options" not in message
    assert _snapshot(folder) == before


def test_a_folder_that_is_not_a_study_is_refused(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(InputError, match="holds no study.json and is not empty"):
        Study.open(tmp_path / "photos", FINGERPRINT)
    assert sorted(p.name for p in (tmp_path / "photos").iterdir()) == ["cat.jpg"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is not a folder"):
        Study.open(tmp_path / "file", FINGERPRINT)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / STUDY_FILE).write_text("{not json")
    with pytest.raises(InputError, match="unreadable"):
        Study.open(tmp_path / "broken", FINGERPRINT)
    (tmp_path / "empty").mkdir()
    assert len(Study.open(tmp_path / "empty", FINGERPRINT)) == 0


def test_a_torn_last_line_is_ignored_with_a_warning_and_cut_off(tmp_path, caplog):
    folder = tmp_path / "study"
    study = Study.open(folder, FINGERPRINT)
    for ratio in (0.25, 0.5, 0.75):
        study.add(_result({"a/prune": ratio}))
    record = folder / CANDIDATES_FILE
    whole = record.read_bytes()
    # A run killed in the middle of writing its fourth record.
    line = json.dumps(_result({"a/prune": 0.9}).to_dict()).encode()
    record.write_bytes(whole + line[: len(line) // 2])
    with caplog.at_level(logging.WARNING, logger="nnopt.search.study"):
        again = Study.open(folder, FINGERPRINT)
    assert len(again) == 3
    assert [r.message for r in caplog.records] == [f"{record}: ignoring its last line, cut short (a run stopped while writing it)"]
    assert record.read_bytes() == whole
    again.add(_result({"a/prune": 0.9}))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nnopt.search.study"):
        assert len(Study.open(folder, FINGERPRINT)) == 4
    assert caplog.records == []


def test_models_are_written_atomically_and_pruned(tmp_path):
    folder = tmp_path / "study"
    study = Study.open(folder, FINGERPRINT)
    keys = [config_key({"a/prune": r}) for r in (0.25, 0.5, 0.75)]
    for i, key in enumerate(keys):
        path = study.save_model(key, bytes([i]) * 1000)
        assert path == folder / MODELS_FOLDER / f"{key}.onnx"
    study.save_model(keys[0], b"new" * 10)  # replaced whole
    assert study.model_bytes(keys[0]) == b"new" * 10
    assert sorted(p.name for p in (folder / MODELS_FOLDER).iterdir()) == sorted(f"{k}.onnx" for k in keys)
    study.remove_models(keep=[keys[1]])
    assert [p.name for p in (folder / MODELS_FOLDER).iterdir()] == [f"{keys[1]}.onnx"]
    assert study.model_path(keys[0]) is None and study.model_path(keys[1]).stat().st_size == 1000
    with pytest.raises(ValueError, match="not a configuration key"):
        study.save_model("../../etc/passwd", b"x")
    assert os.listdir(tmp_path) == ["study"]


def test_a_study_in_memory_keeps_results_and_models_but_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    study = Study(None, FINGERPRINT)
    study.add(_result({}))
    key = config_key({})
    assert study.save_model(key, b"onnx") is None
    assert study.model_path(key) is None and study.model_bytes(key) == b"onnx"
    assert study.get(key) == _result({}) and len(study) == 1
    study.remove_models(keep=[])
    assert study.model_bytes(key) is None
    assert os.listdir(tmp_path) == []


def test_cached_evaluates_only_what_the_study_lacks_in_one_call_per_batch(tmp_path):
    calls: list[list[str]] = []

    def evaluate(configs):
        calls.append([config_key(c) for c in configs])
        return [_synthetic(c) for c in configs]

    study = Study.open(tmp_path / "s", FINGERPRINT)
    evaluate_cached = study.cached(evaluate)
    a, b, c = {"l0/prune": 0.25}, {"l1/prune": 0.5}, {}
    assert evaluate_cached([a, b]) == [_synthetic(a), _synthetic(b)]
    assert evaluate_cached([b, c, a, c]) == [_synthetic(b), _synthetic(c), _synthetic(a), _synthetic(c)]
    assert calls == [[config_key(a), config_key(b)], [config_key(c)]] and study.evaluations == 3
    again = Study.open(tmp_path / "s", FINGERPRINT)
    assert again.cached(evaluate)([c, b, a]) == [_synthetic(c), _synthetic(b), _synthetic(a)]
    assert len(calls) == 2 and again.evaluations == 0
    with pytest.raises(ValueError, match="another order"):
        again.cached(lambda configs: [_synthetic(x) for x in reversed(configs)])([{"l2/prune": 0.25}, {"l3/prune": 0.25}])
