"""``optimize --html`` (issue #17): the report's per-node costs, and the page's structure without a browser:
it parses, holds the pass rows, one bar per costed node with lengths proportional to the figures, escaped
names, no external URL, the same bytes for the same report; written on the JSON report's outcomes only.
(tests/test_html_browser.py loads the page in headless Chromium.)"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from report_schema import validate

from nnopt.cli import main
from nnopt.cost.per_node import node_costs
from nnopt.html_report import render

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "small_cnn.onnx"
DIGITS = ROOT / "examples" / "digits" / "digits_cnn.onnx"
DIGITS_DATA = ROOT / "examples" / "digits" / "digits_test.npz"
#: HTML elements that may not be closed (void elements).
VOID = {"meta", "br", "hr", "img", "input", "link", "rect", "line", "circle", "polyline"}


class _Page(HTMLParser):
    """Every element with its attributes and text, and whether open and close tags balance."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str], list[str]]] = []  # (tag, attributes, ancestors)
        self.stack: list[str] = []
        self.text: list[str] = []
        self.unbalanced: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}, list(self.stack)))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {k: v or "" for k, v in attrs}, list(self.stack)))

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.unbalanced.append(tag)
        else:
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def find(self, tag: str, **attrs: str) -> list[dict[str, str]]:
        return [a for t, a, _ in self.elements if t == tag and all(a.get(k, "").split()[:1] == [v] or a.get(k) == v
                                                                    for k, v in attrs.items())]


def parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    parser.close()
    assert parser.unbalanced == [] and parser.stack == [], (parser.unbalanced, parser.stack)
    return parser


def _optimize(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(["optimize", *argv])
    return code, capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- node_costs
def _node(name: str, op: str, latency: float, flops: int = 0, weight_bytes: int = 0) -> dict[str, object]:
    return {"name": name, "op_type": op, "latency_s": latency, "flops": flops, "weight_bytes": weight_bytes,
            "outputs": [f"{name}_out"]}


def test_node_costs_match_by_name_and_keep_graph_order():
    before = [_node("conv", "Conv", 4e-6, 100, 40), _node("bn", "BatchNormalization", 1e-6, 10),
              _node("relu", "Relu", 5e-7, 5), _node("", "Gemm", 2e-6, 50), _node("dead", "Identity", 0.0)]
    after = [_node("q", "QuantizeLinear", 1e-7, 3), _node("conv", "Conv", 2e-6, 90), _node("dq", "DequantizeLinear", 0.0),
             _node("", "Gemm", 1.5e-6, 50)]
    rows = node_costs(before, after)
    # The added QuantizeLinear first (after's order), each removed node after the kept node before it; the
    # DequantizeLinear and the Identity cost nothing on either side and are left out; an unnamed node is
    # known by its first output.
    assert [(r["name"], r["before"] is not None, r["after"] is not None) for r in rows["nodes"]] == [
        ("q", False, True), ("conv", True, True), ("bn", True, False), ("relu", True, False), ("_out", True, True)]
    assert rows["nodes"][1] == {"name": "conv", "op_type": "Conv",
                                "before": {"latency_s": 4e-6, "flops": 100, "weight_bytes": 40},
                                "after": {"latency_s": 2e-6, "flops": 90, "weight_bytes": 0}}
    assert rows["omitted"] == {"nodes": 0, "before": {"latency_s": 0.0, "flops": 0, "weight_bytes": 0},
                               "after": {"latency_s": 0.0, "flops": 0, "weight_bytes": 0}}


def test_node_costs_keep_the_costliest_rows_and_sum_the_others():
    before = [_node(f"n{i}", "Relu", (i + 1) * 1e-6, i + 1) for i in range(10)]
    after = [_node(f"n{i}", "Relu", (i + 1) * 1e-6, i + 1) for i in range(10)] + [_node("n3", "Relu", 9e-5)]
    rows = node_costs(before, after, limit=4)
    # The repeated name n3 is a node of its own (n3#2), the costliest; then n9, n8, n7, in graph order.
    assert [r["name"] for r in rows["nodes"]] == ["n7", "n8", "n9", "n3#2"]
    assert rows["nodes"][3]["before"] is None
    omitted = rows["omitted"]
    assert omitted["nodes"] == 7 and omitted["before"]["flops"] == sum(range(1, 8))
    assert omitted["before"]["latency_s"] == pytest.approx(28e-6) and omitted["after"]["flops"] == 28


# ---------------------------------------------------------------------------------------------- the page
@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The digits CNN through the default pipeline and int8 quantization on its data: a lossy run with SQNR."""
    folder = tmp_path_factory.mktemp("html")
    paths = {"model": folder / "o.onnx", "json": folder / "r.json", "html": folder / "r.html"}
    code = main(["optimize", str(DIGITS), "-o", str(paths["model"]), "-p", "default", "-p", "quantize:select=all",
                 "--data", str(DIGITS_DATA), "--min-top1", "0.98", "--report", str(paths["json"]), "--html",
                 str(paths["html"]), "-q"])
    assert code == 0
    return paths


def test_node_costs_of_a_real_run_follow_the_schema_and_the_cost_reports(digits_run):
    from nnopt import analyze

    report = validate(json.loads(digits_run["json"].read_text()))
    rows = {r["name"]: r for r in report["node_costs"]["nodes"]}
    before, after = analyze(str(DIGITS)).nodes, analyze(str(digits_run["model"])).nodes
    conv_before = next(n for n in before if n["name"] == "/7/Conv")
    conv_after = next(n for n in after if n["name"] == "/7/Conv")
    assert rows["/7/Conv"]["before"]["flops"] == conv_before["flops"] == 2_359_296
    assert rows["/7/Conv"]["after"]["latency_s"] == pytest.approx(conv_after["latency_s"], rel=1e-5)
    assert rows["/7/Conv"]["after"]["latency_s"] < rows["/7/Conv"]["before"]["latency_s"]  # int8 on the profile
    assert rows["/1/BatchNormalization"]["after"] is None  # folded into /0/Conv
    assert any(r["before"] is None and r["op_type"] == "QuantizeLinear" for r in rows.values())
    # The totals agree with the rows (none omitted on a model this small).
    assert report["node_costs"]["omitted"]["nodes"] == 0
    assert sum(r["before"]["flops"] for r in rows.values() if r["before"]) == report["original"]["flops"]
    assert sum(r["after"]["flops"] for r in rows.values() if r["after"]) == report["final"]["flops"]


def test_the_page_is_the_report_rendered_and_holds_every_section(digits_run):
    report = json.loads(digits_run["json"].read_text())
    page = digits_run["html"].read_text(encoding="utf-8")
    assert page == render(report)  # one source of truth, and the same bytes for the same report
    parsed = parse(page)
    text = " ".join(parsed.text)
    assert "examples/digits/digits_cnn.onnx" in text and report["nnopt_version"] in text
    assert parsed.find("span", id="outcome") and "budget met" in text
    assert report["input"]["bytes"] == 448_020 and "448,020" in text
    # The summary line, as the text table prints it.
    assert re.search(r"summary: nodes 15 -> \d+ \([+-][\d.]+ %\), params 111,370 -> ", text)
    # One row per pass (repeats that found nothing left out), after the input row.
    rows = _table_rows(page, "passes")
    shown = [p["name"] for p in report["passes"] if not (p["iteration"] > 0 and p["status"] == "unchanged")]
    assert [r[0] for r in rows] == ["(input)", *shown] and rows[-1][:2] == ["quantize", "applied"]
    assert rows[-1][3] == f"{report['final']['flops']:,}"
    # Fidelity, on the user's data.
    assert "user data (450 samples)" in text and f"{report['fidelity']['cosine_similarity']:.6f}" in text


def _table_rows(page: str, ident: str) -> list[list[str]]:
    body = page.split(f'<table id="{ident}">', 1)[1].split("</table>", 1)[0].split("<tbody>", 1)[1]
    return [[re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row)]
            for row in re.findall(r"<tr[^>]*>(.*?)</tr>", body)]


def _bars(page: str, figure: str) -> list[tuple[float, float]]:
    """(length, value) of each bar of the chart of ``figure``."""
    chart = page.split(f'data-figure="{figure}">', 1)[1].split("</svg>", 1)[0]
    return [(float(w), float(v)) for w, v in re.findall(r'<rect class="bar s\d" [^>]*width="([\d.]+)"[^>]*'
                                                        r'data-value="([^"]+)"', chart)]


def test_one_bar_per_costed_node_and_lengths_proportional_to_the_figures(digits_run):
    report = json.loads(digits_run["json"].read_text())
    page = digits_run["html"].read_text(encoding="utf-8")
    for figure in ("latency_s", "flops"):
        bars = _bars(page, figure)
        expected = [n[side][figure] for n in report["node_costs"]["nodes"]
                    if any(n[s] and n[s][figure] for s in ("before", "after"))
                    for side in ("before", "after") if n[side] is not None]
        assert [v for _, v in bars] == pytest.approx(expected) and len(bars) > 10
        largest = max(v for _, v in bars)
        for length, value in bars:  # the longest bar is 460 px, the others in proportion
            assert length == pytest.approx(460 * value / largest, abs=1e-3)
    # /3/Conv's int8 estimate is drawn shorter than its float one, in the same proportion.
    conv = next(n for n in report["node_costs"]["nodes"] if n["name"] == "/3/Conv")
    lengths = dict((v, w) for w, v in _bars(page, "latency_s"))
    assert lengths[conv["after"]["latency_s"]] / lengths[conv["before"]["latency_s"]] == pytest.approx(
        conv["after"]["latency_s"] / conv["before"]["latency_s"], rel=1e-4)
    # quantize's per-layer SQNR: one bar per layer it measured.
    sqnr = [layer["sqnr_db"] for p in report["passes"] if p["name"] == "quantize" for layer in p["layers"]
            if layer.get("sqnr_db") is not None]
    assert [v for _, v in _bars(page, "sqnr_db")] == sqnr and len(sqnr) >= 5


def test_the_page_needs_no_network(digits_run):
    page = digits_run["html"].read_text(encoding="utf-8")
    parsed = parse(page)
    for tag, attrs, _ in parsed.elements:
        assert tag not in ("script", "link", "img", "iframe", "object", "embed"), tag
        for name in ("src", "href", "xlink:href", "action", "data"):
            value = attrs.get(name, "")
            assert not value.startswith(("http://", "https://", "//")), (tag, name, value)
    assert "http://" not in page and "https://" not in page and "@import" not in page and "url(" not in page


def _model_with_names(conv: str, relu: str) -> onnx.ModelProto:
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 1, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name=conv), helper.make_node("Relu", ["y"], ["z"], name=relu)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4, 6, 6])], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_names_from_the_model_are_escaped(tmp_path, capsys):
    hostile = '<script>alert("x")</script>&amp;'
    other = "<img src=//example.com/x onerror=alert(1)>"
    model = tmp_path / "m<&>.onnx"
    onnx.save(_model_with_names(hostile, other), model)
    out, page_path = tmp_path / "o.onnx", tmp_path / "r.html"
    code, err = _optimize(capsys, str(model), "-o", str(out), "-p", "quantize:mode=weight_only", "--html",
                          str(page_path), "-q")
    assert code == 0, err
    page = page_path.read_text(encoding="utf-8")
    parsed = parse(page)
    assert not [t for t, _, _ in parsed.elements if t in ("script", "img")]
    text = "".join(parsed.text)
    assert hostile in text and other in text and str(model) in text  # shown as written, as text
    assert "&lt;script&gt;" in page and "&amp;amp;" in page


def test_html_on_every_outcome_with_a_report_and_never_on_bad_input(tmp_path, capsys):
    out, rep, page = tmp_path / "o.onnx", tmp_path / "r.json", tmp_path / "r.html"
    breaks = ["-p", "kmeans:bits=1,min_size=1", "--min-cosine", "0.99999"]
    # --strict rollback: exit 3, both reports and no model.
    code, _ = _optimize(capsys, str(EXAMPLE), "-o", str(out), *breaks, "--strict", "--report", str(rep),
                        "--html", str(page))
    assert code == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["r.html", "r.json"]
    report = json.loads(rep.read_text())
    assert page.read_text(encoding="utf-8") == render(report)
    assert "rolled_back_strict" in page.read_text() and '<tr class="rolled_back">' in page.read_text()
    assert "not written" in page.read_text()
    # Bad input (an unknown pass; an output that is a folder): nothing written, the page included.
    for p in tmp_path.iterdir():
        p.unlink()
    code, err = _optimize(capsys, str(EXAMPLE), "-o", str(out), "-p", "nope", "--html", str(page))
    assert code == 2 and list(tmp_path.iterdir()) == []
    code, err = _optimize(capsys, str(EXAMPLE), "-o", str(out), "--html", str(tmp_path))
    assert code == 2 and "--html take a file path" in err and list(tmp_path.iterdir()) == []
    code, err = _optimize(capsys, str(EXAMPLE), "-o", str(out), "--report", str(page), "--html", str(page))
    assert code == 2 and "name the same file" in err and list(tmp_path.iterdir()) == []


def test_a_search_report_gets_its_pareto_plot():
    from nnopt.search.candidate import CandidateResult
    from nnopt.search.report import SearchReport

    def point(key: str, metric: float, size: int) -> CandidateResult:
        return CandidateResult(key=key * 16, config={f"/{key}/Conv/prune": 0.5}, metric=metric,
                               drop=round(0.98 - metric, 6), size_bytes=size, extra={"drop_bound": round(0.985 - metric, 6)})

    search = SearchReport.from_results(
        [point("a", 0.98, 1000), point("b", 0.97, 500), point("c", 0.96, 600), point("d", 0.90, 100)],
        level=2, metric="top1", drop_type="absolute", max_drop=0.02, objective="size", baseline_metric=0.98,
        eval_data="--eval e.npz", seconds=3.0, evaluations=4, sensitivity={"/b/Conv/prune": 0.0042})
    report = {"schema_version": 1, "nnopt_version": "0", "kind": "search", "outcome": "ok", "exit_code": 0,
              "input": {"path": "m.onnx", "bytes": 1200}, "output": {"path": "o.onnx", "bytes": 500, "written": True},
              "profile": {"name": "x86-avx2-2core", "calibrated": False}, "budget": None, "seed": 0, "warnings": [],
              "fidelity": {"source": "user data", "samples": 200}, **search.to_dict()}
    page = render(report)
    parsed = parse(page)
    circles = [a for t, a, _ in parsed.elements if t == "circle"]
    assert sorted(a["class"] for a in circles) == ["point candidate", "point chosen", "point front", "point front"]
    # The chosen (b: the smallest within the drop) is drawn last, on top; the front is a ... a, b, d line.
    assert circles[-1]["class"] == "point chosen" and search.chosen == "b" * 16
    assert search.front == ["d" * 16, "b" * 16, "a" * 16]
    assert len(parsed.find("polyline")) == 1 and len(parsed.find("line", **{"class": "limit"})) == 1
    assert [r[0] for r in _table_rows(page, "front")] == ["d" * 16, "b" * 16 + " (chosen)", "a" * 16]
    assert [v for _, v in _bars(page, "sensitivity")] == [0.0042]
    assert "level 2: 4 candidates" in page
