"""The automatic search (nnopt.search): metrics, data, space, strategies, and `nnopt optimize --level` end to end."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from report_schema import validate

from nnopt.cli import main
from nnopt.errors import DataError, InputError
from nnopt.plugin_manager import build_plugins
from nnopt.search.candidate import CandidateResult, config_key
from nnopt.search.evaldata import load_search_data
from nnopt.search.evaluate import SharedInputs, evaluate, run_outputs
from nnopt.search.levels import best_of, level1, level2
from nnopt.search.metrics import resolve_metric
from nnopt.search.space import build_space, find_layers

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"


@pytest.fixture(scope="module")
def digits_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Calibration: 256 training images (no labels); evaluation: the first 225 test images with labels;
    test: the other 225, which no search sees."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    folder = tmp_path_factory.mktemp("digits")
    data = load_digits()
    images = (data.images / 16).astype(np.float32)[:, None]
    x_train, _, _, _ = train_test_split(images, data.target, test_size=0.25, random_state=0, stratify=data.target)
    x = np.load(DIGITS / "digits_test.npz")["x"]
    y = np.load(DIGITS / "digits_test_labels.npy")
    np.savez(folder / "calib.npz", x=x_train[:256])
    np.savez(folder / "eval.npz", x=x[:225], labels=y[:225])
    np.savez(folder / "nolabels.npz", x=x[:225])
    np.savez(folder / "test.npz", x=x[225:], labels=y[225:])
    return {"calib": folder / "calib.npz", "eval": folder / "eval.npz", "nolabels": folder / "nolabels.npz",
            "test": folder / "test.npz", "model": DIGITS / "digits_cnn.onnx"}


def _accuracy(proto: onnx.ModelProto, path: Path) -> float:
    with np.load(path) as npz:
        x, y = npz["x"], npz["labels"]
    out = run_outputs(proto, [{"x": x[i:i + 1]} for i in range(len(x))])["logits"]
    return float((out.argmax(1) == y).mean())


# ---------------------------------------------------------------------------------------------- metrics
def test_builtin_metrics_score_what_they_say() -> None:
    reference = {"y": np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])}
    outputs = {"y": np.array([[0.2, 0.8], [0.1, 0.9], [0.4, 0.6], [0.6, 0.4]])}
    data = {"labels": np.array([1, 0, 0, 0])}
    assert resolve_metric("top1").score(outputs, data, reference) == 0.5  # predicts 1,1,1,0
    assert resolve_metric("agreement").score(outputs, data, reference) == 0.75
    cosine = resolve_metric("cosine").score(outputs, data, reference)
    assert 0.7 < cosine < 0.95
    assert resolve_metric("cosine").score(reference, data, reference) == pytest.approx(1.0)
    assert resolve_metric(None, reference=reference).name == "agreement"
    assert resolve_metric(None, reference={"y": np.ones((4, 3, 5))}).name == "cosine"
    assert resolve_metric("top1", labels_key="y_true").labels_key == "y_true"


def test_custom_metrics_module_function_and_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("my_metrics")
    module.mean_score = lambda outputs, data: float(np.mean(outputs["y"]))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "my_metrics", module)
    outputs = {"y": np.array([[1.0, 3.0]])}
    assert resolve_metric("my_metrics:mean_score").score(outputs, {}, outputs) == 2.0

    class Plugin:
        @staticmethod
        def nnopt_register_metrics() -> dict[str, Any]:
            return {"max_score": lambda outputs, data: float(np.max(outputs["y"])), "top1": lambda o, d: 0.0}

    plugins = build_plugins(load_entry_points=False, extra=[Plugin])
    assert set(plugins.metrics) == {"max_score"}  # a built-in name cannot be replaced
    assert resolve_metric("max_score", plugin_metrics=plugins.metrics).score(outputs, {}, outputs) == 3.0
    with pytest.raises(InputError, match="unknown metric"):
        resolve_metric("f1")
    with pytest.raises(InputError, match="cannot import"):
        resolve_metric("no_such_module_here:f")
    with pytest.raises(InputError, match="has no function"):
        resolve_metric("my_metrics:absent")
    metric = resolve_metric("my_metrics:mean_score")
    module.mean_score = lambda outputs, data: float("nan")  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="nan"):
        resolve_metric("my_metrics:mean_score").score(outputs, {}, outputs)
    assert metric.name == "my_metrics:mean_score"


# ---------------------------------------------------------------------------------------------- data
def test_eval_data_is_held_out_and_seeded(digits_files: dict[str, Path]) -> None:
    proto = onnx.load(digits_files["model"])
    split = load_search_data(proto, digits_files["eval"], None, seed=3, labels_key="labels", needs_labels=True)
    again = load_search_data(proto, digits_files["eval"], None, seed=3, labels_key="labels", needs_labels=True)
    other = load_search_data(proto, digits_files["eval"], None, seed=4, labels_key="labels", needs_labels=True)
    assert len(split.eval_samples) == 56 and split.calibration_count == 169  # a quarter of 225 held out
    assert split.calibration == again.calibration and split.calibration != other.calibration
    assert "seeded split" in split.description
    with np.load(__import__("io").BytesIO(split.calibration)) as npz:
        calib_x = npz["x"]
        assert len(npz["labels"]) == 169
    held = split.eval_arrays["x"]
    # No held-out image is among the calibration images.
    assert not any(np.array_equal(h, c) for h in held for c in calib_x)
    given = load_search_data(proto, digits_files["calib"], digits_files["eval"], seed=0, labels_key="labels",
                             needs_labels=True)
    assert len(given.eval_samples) == 225 and given.calibration_count == 256
    assert given.eval_arrays["labels"].shape == (225,)


def test_eval_data_refuses_missing_or_bad_labels(digits_files: dict[str, Path], tmp_path: Path) -> None:
    proto = onnx.load(digits_files["model"])
    with pytest.raises(DataError, match="no array 'labels'"):
        load_search_data(proto, digits_files["calib"], digits_files["nolabels"], seed=0, labels_key="labels",
                         needs_labels=True)
    x = np.load(digits_files["eval"])["x"]
    np.savez(tmp_path / "float_labels.npz", x=x, labels=np.zeros(len(x), np.float32))
    with pytest.raises(DataError, match="one integer class per sample"):
        load_search_data(proto, digits_files["calib"], tmp_path / "float_labels.npz", seed=0, labels_key="labels",
                         needs_labels=True)
    np.savez(tmp_path / "other_key.npz", x=x, y_true=np.zeros(len(x), np.int64))
    found = load_search_data(proto, digits_files["calib"], tmp_path / "other_key.npz", seed=0, labels_key="y_true",
                             needs_labels=True)
    assert found.eval_arrays["y_true"].shape == (225,)


# ---------------------------------------------------------------------------------------------- space
def test_space_of_the_digits_cnn_and_the_pipeline_of_a_configuration(digits_files: dict[str, Path]) -> None:
    proto = onnx.load(digits_files["model"])
    layers = {layer.name: layer for layer in find_layers(proto)}
    assert list(layers) == ["/0/Conv", "/3/Conv", "/7/Conv", "/12/Gemm", "/14/Gemm"]
    assert not layers["/14/Gemm"].prunable and layers["/12/Gemm"].prunable  # the classifier's 10 outputs stay
    assert layers["/7/Conv"].full_rank == 128 and layers["/0/Conv"].full_rank == 9
    space = build_space(proto, ("prune", "rank", "weights"))
    assert "/14/Gemm/prune" not in space.params
    assert space.params["/0/Conv/rank"] == (None, 0.5)  # rank 9: 0.25 would keep 2, below MIN_RANK
    assert space.params["/7/Conv/rank"] == (None, 0.5, 0.25, 0.125)
    config = {"/7/Conv/prune": 0.5, "/12/Gemm/prune": 0.5, "/7/Conv/rank": 0.25, "/7/Conv/weights": "k3",
              "/0/Conv/weights": "int8", "/3/Conv/weights": "float"}
    assert space.normalise(config) == {k: v for k, v in sorted(config.items()) if v != "float"}
    assert config_key(config) == config_key(dict(reversed(list(config.items()))))
    assert space.pipeline(config) == [
        ("prune", {"ratio": 0.5, "nodes": ["/7/Conv", "/12/Gemm"]}),
        ("svd", {"rank": 32, "nodes": ["/7/Conv"], "min_param_saving": 0.0, "min_latency_saving": None}),
        ("kmeans", {"bits": 3, "per_channel": True, "nodes": ["svd//7/Conv/first", "svd//7/Conv/second"]}),
        ("quantize", {"exclude": ["/3/Conv", "svd//7/Conv/first", "svd//7/Conv/second", "/12/Gemm", "/14/Gemm"],
                      "select": "all"}),
    ]
    with pytest.raises(ValueError):
        space.normalise({"/7/Conv/prune": 0.3})
    with pytest.raises(KeyError):
        space.normalise({"/99/Conv/prune": 0.5})


# ---------------------------------------------------------------------------------------------- strategies
def _fake_results(model: dict[str, tuple[float, float]]) -> Any:
    """A run function over a made-up additive problem: each (param=value) costs a drop and saves size."""
    calls: list[list[dict[str, Any]]] = []

    def run(configs: list[dict[str, Any]]) -> list[CandidateResult]:
        calls.append(configs)
        out = []
        for config in configs:
            drop = sum(model[f"{k}={v}"][0] for k, v in config.items())
            size = 1000 - sum(model[f"{k}={v}"][1] for k, v in config.items())
            # The quantize pass's SQNR per int8 layer: lower where the layer costs more.
            layers = {k.rsplit("/", 1)[0]: {"own_sqnr_db": 40.0 - 1000 * model[f"{k}={v}"][0]}
                      for k, v in config.items() if v == "int8"}
            out.append(CandidateResult(config_key(config), config, 1.0 - drop, drop, size_bytes=int(size),
                                       distortion=drop, extra={"layers": layers}))
        return out

    run.calls = calls  # type: ignore[attr-defined]
    return run


def test_level2_keeps_the_biggest_savings_within_the_drop() -> None:
    from nnopt.search.space import Layer, SearchSpace

    layers = tuple(Layer(f"l{i}", "Conv", (8, 8, 3, 3), True) for i in range(4))
    params = {f"l{i}/prune": (0.0, 0.5) for i in range(4)} | {f"l{i}/weights": ("float", "k4") for i in range(4)}
    space = SearchSpace(layers, params)
    costs = {f"l{i}/prune=0.5": (0.001 * (i + 1), 100.0) for i in range(4)}
    costs |= {f"l{i}/weights=k4": (0.0005, 150.0) for i in range(4)}
    costs["l3/weights=k4"] = (0.02, 150.0)  # alone beyond the drop: never chosen
    run = _fake_results(costs)
    outcome = level2(space, run, max_drop=0.01, objective="size")
    best = outcome.best
    assert best is not None and best.drop is not None and best.drop <= 0.01
    # The optimum: three k4 (0.0015) + prune l0..l2 (0.006) = 0.0075; adding l3's prune (0.004) would exceed.
    assert best.config == {"l0/prune": 0.5, "l1/prune": 0.5, "l2/prune": 0.5, "l0/weights": "k4",
                           "l1/weights": "k4", "l2/weights": "k4"}
    assert best.size_bytes == 1000 - 300 - 450
    assert set(outcome.sensitivities) == set(params)
    # Deterministic: the same sequence of candidates again.
    again = _fake_results(costs)
    level2(space, again, max_drop=0.01, objective="size")
    assert again.calls == run.calls


def test_level1_reverts_the_most_harmful_layers_first() -> None:
    from nnopt.search.space import Layer, SearchSpace

    layers = tuple(Layer(f"l{i}", "Conv", (8, 8, 3, 3), True) for i in range(4))
    space = SearchSpace(layers, {f"l{i}/weights": ("float", "int8") for i in range(4)})
    run = _fake_results({"l0/weights=int8": (0.001, 10.0), "l1/weights=int8": (0.02, 10.0),
                         "l2/weights=int8": (0.003, 10.0), "l3/weights=int8": (0.009, 10.0)})
    outcome = level1(space, run, max_drop=0.01, objective="size")
    assert outcome.best is not None
    assert outcome.best.config == {"l0/weights": "int8", "l2/weights": "int8"}  # l1 then l3 reverted
    # All int8 and the float model, then one round of probes (1, 2 and 3 layers reverted): 5 candidates.
    assert [len(c) for c in run.calls] == [2, 3]
    assert best_of([outcome.best], 0.01, "size") == outcome.best


def test_a_failing_candidate_is_recorded_not_fatal(digits_files: dict[str, Path]) -> None:
    proto = onnx.load(digits_files["model"])
    found = load_search_data(proto, digits_files["calib"], digits_files["eval"], seed=0, labels_key="labels",
                             needs_labels=True)
    space = build_space(proto, ("weights",))
    reference = run_outputs(proto, found.eval_samples)
    shared = SharedInputs(proto.SerializeToString(), b"not an npz", found.eval_samples, found.eval_arrays,
                          reference, space, "top1", "labels", 0.99, "absolute", 0, load_plugins=False)
    result = evaluate(shared, {"/7/Conv/weights": "k4"})  # the calibration file cannot be read
    assert result.failed and result.metric is None and "data file" in (result.error or "")
    untouched = evaluate(shared, {})
    assert not untouched.failed and untouched.metric == pytest.approx(0.9955, abs=1e-3)
    assert untouched.drop == pytest.approx(0.99 - untouched.metric)


# ---------------------------------------------------------------------------------------------- CLI
def test_level1_on_the_digits_cnn_stays_within_the_drop_on_unseen_images(digits_files: dict[str, Path],
                                                                          tmp_path: Path, capsys: Any) -> None:
    out, report = tmp_path / "l1.onnx", tmp_path / "l1.json"
    code = main(["optimize", str(digits_files["model"]), "-o", str(out), "--level", "1", "--data",
                 str(digits_files["calib"]), "--eval", str(digits_files["eval"]), "--metric", "top1",
                 "--max-drop", "0.01", "--report", str(report), "--html", str(tmp_path / "l1.html"), "--workers", "1",
                 "--no-plugins"])
    assert code == 0, capsys.readouterr().err
    rep = json.loads(report.read_text())
    chosen = {c["key"]: c for c in rep["candidates"]}[rep["chosen"]]
    assert chosen["drop"] <= 0.01 and all(v == "int8" for v in chosen["config"].values())
    assert len(chosen["config"]) == 5
    original = onnx.load(digits_files["model"])
    result = onnx.load(out)
    assert out.stat().st_size < 0.3 * digits_files["model"].stat().st_size
    assert _accuracy(result, digits_files["test"]) >= _accuracy(original, digits_files["test"]) - 0.01
    assert chosen["measured_latency_s"] > 0 and rep["evaluations"] == 2
    assert rep["front"] and rep["meets_constraint"] and rep["original"]["size"] == digits_files["model"].stat().st_size
    validate(rep)  # the common fields of every report (nnopt.report), then the search's own
    assert (rep["kind"], rep["outcome"], rep["exit_code"]) == ("search", "ok", 0)
    assert rep["output"] == {"path": str(out), "bytes": out.stat().st_size, "written": True}
    assert rep["fidelity"] == {"source": "user data", "samples": 225} and rep["eval_samples"] == 225
    assert rep["budget"] == {"met": True, "limits": [{"metric": "max_drop", "limit": 0.01, "value": chosen["drop"],
                                                      "met": True}]}
    provenance = {p.key: p.value for p in result.metadata_props}
    assert json.loads(provenance["nnopt.pipeline"])[0] == "search:level=1"
    assert json.loads(provenance["nnopt.options"])["max_drop"] == 0.01
    png = report.with_suffix(".png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l1.html", "l1.json", "l1.onnx", "l1.png"]
    # The HTML page: rendered from the same report, with a point per candidate and the chosen one marked.
    from nnopt.html_report import render

    page = (tmp_path / "l1.html").read_text(encoding="utf-8")
    assert page == render(rep)
    assert page.count('<circle class="point ') == len(rep["candidates"]) and page.count("point chosen") == 1
    # Per-node cost of the input and the chosen model: /7/Conv estimated faster in int8.
    conv = next(n for n in rep["node_costs"]["nodes"] if n["name"] == "/7/Conv")
    assert conv["after"]["latency_s"] < conv["before"]["latency_s"] and 'data-figure="latency_s"' in page


@pytest.mark.parametrize("flags, message", [
    (["--level", "2", "--metric", "top1", "--eval", "{nolabels}"], "no array 'labels'"),
    (["--level", "1", "--metric", "top1", "--labels", "y"], "no array 'y'"),
    (["--level", "1", "--max-drop", "1.5"], "--max-drop: expected a number in [0, 1]"),
    (["--level", "1", "--max-drop", "-0.1"], "--max-drop: expected a number in [0, 1]"),
    (["--level", "1", "--metric", "raising_metric_module:score"], "failed on the original model's outputs"),
    (["--level", "1", "--metric", "nope"], "unknown metric"),
    (["--level", "1", "-p", "prune"], "cannot be combined with --level"),
    (["--eval", "{eval}"], "belongs to the automatic search"),
    (["--max-drop", "0.01"], "belongs to the automatic search"),
    (["--level", "4"], "invalid choice"),
    (["--level", "1", "--ray", "127.0.0.1:9"], "cannot reach a Ray cluster at 127.0.0.1:9"),
    (["--level", "1", "--workers", "0"], "expected a positive integer"),
])
def test_bad_search_input_is_one_line_exit_2_and_nothing_written(
        digits_files: dict[str, Path], tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch,
        flags: list[str], message: str) -> None:
    module = types.ModuleType("raising_metric_module")

    def score(outputs: Any, data: Any) -> float:
        raise RuntimeError("boom")

    module.score = score  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "raising_metric_module", module)
    flags = [f.format(**{k: str(v) for k, v in digits_files.items()}) for f in flags]
    out = tmp_path / "out.onnx"
    code = main(["optimize", str(digits_files["model"]), "-o", str(out), "--data", str(digits_files["calib"]),
                 "--report", str(tmp_path / "r.json"), "--no-plugins", *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("nnopt: error")] == [err.strip().splitlines()[-1]]
    assert list(tmp_path.iterdir()) == []


def test_level_needs_data(digits_files: dict[str, Path], tmp_path: Path, capsys: Any) -> None:
    code = main(["optimize", str(digits_files["model"]), "-o", str(tmp_path / "o.onnx"), "--level", "1"])
    assert code == 2 and "--level needs --data" in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()


def test_strict_search_with_nothing_within_the_drop_exits_3(digits_files: dict[str, Path], tmp_path: Path,
                                                            capsys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # A metric that only the original's exact outputs pass: the first outputs it sees are the original's
    # (the baseline); folding BatchNorm already moves the last bits, so no candidate, not even the cleaned
    # float model, stays within the drop.
    seen: list[np.ndarray] = []

    def exact(outputs: dict[str, np.ndarray], data: dict[str, np.ndarray]) -> float:
        if not seen:
            seen.append(outputs["logits"])
        return float(np.array_equal(outputs["logits"], seen[0]))

    module = types.ModuleType("exact_metric_module")
    module.exact = exact  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "exact_metric_module", module)
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    code = main(["optimize", str(digits_files["model"]), "-o", str(out), "--level", "1", "--data",
                 str(digits_files["calib"]), "--eval", str(digits_files["eval"]), "--metric", "exact_metric_module:exact",
                 "--max-drop", "0.5", "--strict", "--workers", "1", "--no-plugins", "--report", str(report)])
    err = capsys.readouterr().err
    assert code == 3 and "no candidate stayed within --max-drop 0.5: the closest" in err
    assert "dropped 1.0000" in err
    # No model (nor plot), but the report, with the outcome and the closest candidate's drop.
    assert list(tmp_path.iterdir()) == [report]
    rep = validate(json.loads(report.read_text()))
    assert (rep["outcome"], rep["exit_code"], rep["output"]["written"]) == ("budget_failed", 3, False)
    assert rep["budget"]["met"] is False and rep["budget"]["limits"][0]["value"] == 1.0


def test_python_api_compress(digits_files: dict[str, Path]) -> None:
    import nnopt

    model, report = nnopt.compress(digits_files["model"], data=digits_files["calib"], eval_data=digits_files["eval"],
                                   level=1, max_drop=0.01, metric="top1", workers=1, load_plugins=False)
    chosen = report.candidate(report.chosen)
    assert report.meets_constraint and chosen is not None and chosen.drop is not None and chosen.drop <= 0.01
    assert model.to_proto().ByteSize() == chosen.size_bytes
    assert _accuracy(model.to_proto(), digits_files["test"]) >= 0.97


def test_flips_that_cancel_out_are_not_taken_for_no_change() -> None:
    from nnopt.search.evaluate import DROP_MARGIN_Z, drop_margin
    from nnopt.search.space import SearchSpace

    labels = np.arange(400) % 4
    reference = {"y": np.eye(4)[labels]}  # the original is right on every sample
    wrong = labels.copy()
    wrong[:8] = (wrong[:8] + 1) % 4  # 8 samples flip to a wrong class ...
    shared = SharedInputs(b"", b"", [], {"labels": labels}, reference, SearchSpace((), {}), "top1", "labels", 1.0,
                          "absolute", 0)
    metric = resolve_metric("top1")
    flipped = {"y": np.eye(4)[wrong]}
    margin = drop_margin(metric, flipped, shared)
    # d_i = 1 on 8 of 400 samples: std 0.140, standard error 0.0070.
    assert margin == pytest.approx(DROP_MARGIN_Z * np.std(np.r_[np.ones(8), np.zeros(392)], ddof=1) / 20)
    assert drop_margin(metric, reference, shared) == 0.0  # no change, no margin
    assert drop_margin(resolve_metric("agreement"), flipped, shared) == pytest.approx(margin)
    # A candidate at drop 0.005 with that margin is outside a max drop of 0.01; without flips it is inside.
    result = CandidateResult("k", {}, 0.995, 0.005, extra={"drop_bound": 0.005 + margin})
    assert result.drop_bound == pytest.approx(0.0120, abs=1e-4) and not result.feasible(0.01)
    assert CandidateResult("k", {}, 0.995, 0.005).feasible(0.01)


def test_a_repeated_search_resumes_from_its_study(digits_files: dict[str, Path], tmp_path: Path, capsys: Any) -> None:
    study = tmp_path / "study"
    common = [str(digits_files["model"]), "--level", "1", "--data", str(digits_files["calib"]), "--eval",
              str(digits_files["eval"]), "--metric", "top1", "--workers", "1", "--no-plugins", "--study", str(study)]
    assert main(["optimize", "-o", str(tmp_path / "a.onnx"), "--report", str(tmp_path / "a.json"), *common]) == 0
    assert main(["optimize", "-o", str(tmp_path / "b.onnx"), "--report", str(tmp_path / "b.json"), *common]) == 0
    first, second = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert first["evaluations"] == 2 and second["evaluations"] == 0  # every candidate came from the study
    assert first["chosen"] == second["chosen"]
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    # The study keeps the candidate as evaluated; the output is that model plus its provenance.
    written = onnx.load(tmp_path / "a.onnx")
    assert [p.key for p in written.metadata_props] == ["nnopt.version", "nnopt.pipeline", "nnopt.options", "nnopt.seed"]
    del written.metadata_props[:]
    assert (study / "models" / f"{first['chosen']}.onnx").read_bytes() == written.SerializeToString()
    # Another seed is another study: refused in one line, nothing written.
    code = main(["optimize", "-o", str(tmp_path / "c.onnx"), *common, "--seed", "1"])
    assert code == 2 and "seed" in capsys.readouterr().err and not (tmp_path / "c.onnx").exists()


@pytest.mark.slow
def test_level3_on_the_digits_cnn_stays_within_the_drop(digits_files: dict[str, Path], tmp_path: Path) -> None:
    # Whether it honours its time budget is measured in benchmarks/search.py, not timed here.
    out, report = tmp_path / "l3.onnx", tmp_path / "l3.json"
    code = main(["optimize", str(digits_files["model"]), "-o", str(out), "--level", "3", "--data",
                 str(digits_files["calib"]), "--eval", str(digits_files["eval"]), "--metric", "top1",
                 "--max-drop", "0.01", "--time-budget", "90", "--workers", "2", "--report", str(report), "-q"])
    assert code == 0
    rep = json.loads(report.read_text())
    assert rep["level"] == 3 and rep["evaluations"] > 20
    chosen = {c["key"]: c for c in rep["candidates"]}[rep["chosen"]]
    assert rep["meets_constraint"] and chosen["extra"].get("drop_bound", chosen["drop"]) <= 0.01
    # Smaller than int8 (0.28x) by far: k-means and pruning chosen per layer.
    assert out.stat().st_size < 0.15 * digits_files["model"].stat().st_size
    assert any(d["technique"] != "weights" or d["choice"] not in ("float", "int8") for d in rep["decisions"]
               if d["changed"])
    original = onnx.load(digits_files["model"])
    assert _accuracy(onnx.load(out), digits_files["test"]) >= _accuracy(original, digits_files["test"]) - 0.015
