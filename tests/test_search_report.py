"""The search's report: the Pareto front and the choice on hand-made points, JSON without NaN, the PNG plot."""

from __future__ import annotations

import io
import json
import math
import random
import sys

import pytest

from nnopt.errors import InputError
from nnopt.search.candidate import CandidateResult
from nnopt.search.report import SearchReport, choose, decisions, json_safe, pareto_front


def _point(name: str, metric: float | None, size: int | None, *, key: str | None = None, **fields) -> CandidateResult:
    # Hand-made keys: the letter repeated, so that ties are broken in a known order.
    return CandidateResult(key=key or name * 16, config={f"{name}/prune": 0.5}, metric=metric,
                           drop=None if metric is None else round(0.98 - metric, 6), size_bytes=size, **fields)


POINTS = [
    _point("a", 0.98, 100),
    _point("b", 0.97, 50),
    _point("c", 0.97, 60),   # b is as good and smaller
    _point("d", 0.96, 50),   # b is better at the same size
    _point("e", 0.99, 200),
    _point("f", None, 10, error="crashed"),
    _point("g", 0.95, 20),
    _point("h", 0.97, 50, key="0" * 16),  # the same point as b, with a smaller key: it stands for both
    _point("i", 0.999, None),  # no size measured
    _point("j", 0.90, 20),   # g is better at the same size
]


def test_pareto_front_of_hand_made_points_in_any_order():
    front = pareto_front(POINTS, "size")
    assert [r.key for r in front] == ["g" * 16, "0" * 16, "a" * 16, "e" * 16]
    shuffled = POINTS[:]
    for seed in range(5):
        random.Random(seed).shuffle(shuffled)
        assert pareto_front(shuffled, "size") == front
    assert pareto_front([], "size") == []
    # The FLOPs are unknown for all: no front on them.
    assert pareto_front(POINTS, "flops") == []


def test_choose_the_smallest_within_the_drop_else_the_closest():
    chosen, meets = choose(POINTS, "size", max_drop=0.01)
    assert (chosen.key, meets) == ("0" * 16, True)  # 0.97: drop 0.01, size 50; b ties and has the larger key
    chosen, meets = choose(POINTS, "size", max_drop=0.05)
    assert (chosen.key, meets) == ("g" * 16, True)
    chosen, meets = choose(POINTS, "size", max_drop=0.0)
    assert (chosen.key, meets) == ("a" * 16, True)  # no drop at all: a, or e (better and larger)
    chosen, meets = choose(POINTS, "size", max_drop=-0.02)  # nothing meets it: the closest, without a size
    assert (chosen.key, meets) == ("i" * 16, False)
    assert choose([POINTS[5]], "size", 0.01) == (None, False)


def test_decisions_split_layer_names_that_hold_slashes():
    rows = decisions({"/features/conv1/Conv/prune": 0.25, "fc1/rank": 0.5, "bare": "k4"},
                     {"/features/conv1/Conv/prune": 0.0031})
    assert rows == [
        {"layer": "/features/conv1/Conv", "technique": "prune", "choice": 0.25, "sensitivity": 0.0031},
        {"layer": "fc1", "technique": "rank", "choice": 0.5, "sensitivity": None},
        {"layer": "bare", "technique": "", "choice": "k4", "sensitivity": None},
    ]


def _report(**overrides) -> SearchReport:
    candidates = POINTS + [_point("k", 0.975, 30, latency_s=math.inf, distortion=math.nan, flops=4e6)]
    options = dict(level=3, metric="top1", drop_type="absolute", max_drop=0.01, objective="size",
                   baseline_metric=0.98, eval_data="--eval test.npz (450 samples)", seconds=12.5, evaluations=9,
                   sensitivity={"k/prune": 0.004}, notes=["stopped at the time budget"], original={"size": 120})
    options.update(overrides)
    return SearchReport.from_results(candidates, **options)


def test_the_report_chooses_and_says_why():
    report = _report()
    assert report.chosen == "k" * 16 and report.meets_constraint  # 0.975: drop 0.005, size 30
    assert report.front == ["g" * 16, "k" * 16, "a" * 16, "e" * 16]  # k is better and smaller than b
    assert report.decisions == [{"layer": "k", "technique": "prune", "choice": 0.5, "sensitivity": 0.004}]
    lines = report.summary_lines()
    assert lines[0] == "level 3: 11 candidates (9 evaluated by this run, 1 failed) in 12.5 s; Pareto front of 4"
    assert lines[1] == "top1 of the original 0.9800 on --eval test.npz (450 samples); max drop 0.01 (absolute)"
    assert lines[2] == ("chosen: kkkkkkkkkkkkkkkk: top1 0.9750 (drop 0.0050), file size 30 B (0.250x the original), "
                        "FLOPs 4 MFLOP")
    assert lines[3:] == ["  k: prune 0.5 (sensitivity 0.004)", "note: stopped at the time budget"]
    unmet = _report(max_drop=-0.05)
    assert not unmet.meets_constraint and unmet.chosen == "i" * 16
    assert unmet.summary_lines()[2] == "no candidate within the drop of -0.05; the closest: iiiiiiiiiiiiiiii: top1 0.9990 (drop -0.0190)"


def test_json_has_no_nan_and_reads_back(tmp_path):
    report = _report()
    path = tmp_path / "out" / "report.json"
    report.write_json(path)
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]  # no temporary left behind
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text)
    chosen = next(c for c in data["candidates"] if c["key"] == data["chosen"])
    assert chosen["latency_s"] is None and chosen["distortion"] is None and chosen["size_bytes"] == 30
    again = SearchReport.from_dict(data)
    assert again.chosen == report.chosen and again.front == report.front
    assert [c.key for c in again.candidates] == [c.key for c in report.candidates]
    assert json_safe({"x": (1.0, math.nan), 2: math.inf}) == {"x": [1.0, None], "2": None}


def test_the_plot_is_a_png_of_the_front(tmp_path):
    image_module = pytest.importorskip("PIL.Image")
    pytest.importorskip("matplotlib")
    report = _report()
    path = tmp_path / "front.png"
    report.write_plot(path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 15_000 < len(data) < 300_000
    image = image_module.open(io.BytesIO(data))
    assert image.size == (700, 450)
    pixels = image.convert("RGB")
    # The chosen star and the max-drop line are red, the front blue: both colours are drawn.
    colours = {pixels.getpixel((x, y)) for x in range(0, 700, 2) for y in range(0, 450, 2)}
    assert (214, 39, 40) in colours and (31, 119, 180) in colours
    assert report.plot_png() == data  # deterministic
    assert [p.name for p in tmp_path.iterdir()] == ["front.png"]


def test_without_matplotlib_one_line_names_the_extra(monkeypatch):
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(InputError, match=r"pip install 'nnopt\[search\]'"):
        _report().plot_png()
