"""The HTML report of ``nnopt optimize --html REPORT.html``: one self-contained page, from the report dict.

The page is rendered from the same dict as the JSON report (``nnopt.cli_report``), so the two cannot
disagree: the header (model, nnopt's version, outcome, budget), the summary line, the per-pass table (or
the search's Pareto plot and front), each node's estimated latency and FLOPs before and after
(``node_costs``), the per-layer figures the passes measured (SQNR, output and weight errors, the search's
sensitivities), the fidelity, then the warnings and notes.

Self-contained: inline CSS, charts as inline SVG (``nnopt.svg``), no script, no font, image or link that
needs the network. Every text from the report is escaped: node names and paths are the user's or the
model author's. The same report gives the same bytes (no time stamp: the page holds what the report holds).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from nnopt.pipeline.table import BUDGET_METRICS, SUMMARY_KEYS, fixed_decimals, fmt_num, is_number, percent_change
from nnopt.report import OUTCOMES
from nnopt.search.objectives import OBJECTIVES
from nnopt.svg import CSS as CHART_CSS
from nnopt.svg import BarRow, Point, bar_chart, esc, scatter_plot

Report = Mapping[str, Any]

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; color: #222; margin: 24px auto; max-width: 1100px; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }
h3 { font-size: 14px; margin-bottom: 4px; } summary h3 { display: inline; }
table { border-collapse: collapse; margin: 8px 0; } th, td { padding: 3px 9px; border-bottom: 1px solid #eee; }
th { text-align: left; background: #f4f5f7; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
tr.rolled_back td { background: #fdecea; } tr.unchanged td { color: #777; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-weight: 600; }
.ok { background: #e3f4e6; color: #1d6b2c; } .bad { background: #fdecea; color: #a4261c; }
.unknown { background: #fff4d6; color: #7a5a00; }
dl.facts { display: grid; grid-template-columns: max-content auto; gap: 2px 14px; margin: 8px 0; }
dl.facts dt { color: #666; } dl.facts dd { margin: 0; }
.summary { font-family: ui-monospace, monospace; background: #f7f7f7; padding: 6px 10px; white-space: pre-wrap; }
.muted { color: #666; } ul.notes li { margin: 2px 0; }
"""

#: The browser's guarantee that the page loads nothing: no script, font, image, frame or connection at all,
#: only its own inline styles (and data: images, which it has none of).
_NO_NETWORK = ('<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; style-src \'unsafe-inline\'; '
               'img-src data:">')

#: Per-layer figures the passes report, charted where present: figure key -> (title, unit, which way is better).
LAYER_FIGURES: dict[str, tuple[str, str, str]] = {
    "sqnr_db": ("SQNR of the layer's output", "dB", "higher is better"),
    "output_error": ("relative output error after the refit", "", "lower is better"),
    "weight_error": ("relative weight error of the factors", "", "lower is better"),
    "rel_error": ("relative weight error of the codebook", "", "lower is better"),
}

#: The per-node figures charted before/after: node_costs key -> (title, formatter of one value).
NODE_CHARTS: dict[str, tuple[str, Callable[[float], str]]] = {
    "latency_s": ("estimated latency per node (us)", lambda v: f"{v * 1e6:,.3g} us"),
    "flops": ("FLOPs per node", lambda v: f"{v:,.0f}"),
}


def render(report: Report) -> str:
    """The whole page for a report dict (``kind`` pipeline or search)."""
    title = f"nnopt report: {report['input']['path']}"
    body = "\n".join(part for section in _SECTIONS if (part := section(report)))
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n{_NO_NETWORK}\n'
            f"<title>{esc(title)}</title>\n"
            f"<style>{_CSS}{CHART_CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


# ---------------------------------------------------------------------------------------------- sections
def _header(report: Report) -> str:
    outcome = report["outcome"]
    output = report["output"]
    written = f"{output['bytes']:,} bytes" if output.get("written") else "not written"
    facts = [
        ("model", f"{report['input']['path']} ({report['input']['bytes']:,} bytes)"),
        ("output", f"{output['path']} ({written})"),
        ("run", "automatic search, level {}".format(report["level"]) if report["kind"] == "search" else "pass pipeline"),
        ("nnopt", report["nnopt_version"]),
        ("hardware profile", report["profile"]["name"] + (" (calibrated)" if report["profile"]["calibrated"] else "")),
        ("seed", str(report["seed"])),
        ("exit code", str(report["exit_code"])),
    ]
    rows = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in facts)
    badge = "ok" if outcome == "ok" else "bad"
    return (f"<h1>{esc(report['input']['path'])}</h1>\n"
            f'<p><span class="badge {badge}" id="outcome">{esc(outcome)}</span> {esc(OUTCOMES[outcome])}</p>\n'
            f"{_budget(report.get('budget'))}\n<dl class=\"facts\">{rows}</dl>")


def _budget(budget: Mapping[str, Any] | None) -> str:
    if budget is None:
        return '<p class="muted" id="budget">no budget set</p>'
    verdict = {True: ("ok", "budget met"), False: ("bad", "budget NOT met"), None: ("unknown", "budget not measured")}
    css, text = verdict[budget["met"]]
    rows = []
    for check in budget["limits"]:
        label = BUDGET_METRICS[check["metric"]][1] if check["metric"] in BUDGET_METRICS else "accuracy drop"
        met = {True: "met", False: "NOT met", None: "not measured"}[check["met"]]
        value = fmt_num(check["value"], digits=4) if is_number(check["value"]) else ""  # as the budget line
        rows.append([label, _g(check["limit"]), value, met])
    return (f'<p id="budget"><span class="badge {css}">{text}</span></p>\n'
            + _table(["limit", "allowed", "final model", ""], rows, numeric={1, 2}))


def _summary(report: Report) -> str:
    if report["kind"] == "search":
        from nnopt.search.report import SearchReport

        lines = SearchReport.from_dict(report).summary_lines()
        return f'<h2>Summary</h2>\n<p class="summary" id="summary">{esc(chr(10).join(lines))}</p>'
    from nnopt.pipeline.table import summary_line

    before, after = report["original"], report["final"]
    output = report["output"]
    files = (report["input"]["bytes"], output["bytes"]) if output.get("written") else None
    rows = [[label, _int(before.get(key)), _int(after.get(key)), percent_change(before.get(key), after.get(key))]
            for key, label in [*SUMMARY_KEYS, ("flops", "FLOPs")]]
    rows.append(["est. latency (us)", _us(before.get("latency_s")), _us(after.get("latency_s")),
                 percent_change(before.get("latency_s"), after.get("latency_s"))])
    if files is not None:
        rows.append(["file bytes", _int(files[0]), _int(files[1]), percent_change(*files)])
    return (f'<h2>Summary</h2>\n<p class="summary" id="summary">{esc(summary_line(before, after, files))}</p>\n'
            + _table(["", "input", "output", "change"], [[*r[:3], r[3].strip(" ()")] for r in rows], numeric={1, 2, 3}))


def _passes(report: Report) -> str:
    if report["kind"] != "pipeline":
        return ""
    records = [r for r in report["passes"] if not (r["iteration"] > 0 and r["status"] == "unchanged")]
    latencies = [r["after"].get("latency_s") for r in records] + [report["original"].get("latency_s")]
    us = fixed_decimals([v * 1e6 for v in latencies if is_number(v)])
    header = ["pass", "status", "params", "flops", "weight bytes", f"est. us ({report['profile']['name']})",
              "max rel. error", "cosine", "top-1 agreement", "seconds", "reason"]
    rows: list[list[str]] = [["(input)", "", *_costs(report["original"], us), "", "", "", "", ""]]
    classes = [""]
    for r in records:
        fid = r.get("fidelity") or {}
        rows.append([r["name"] if r["iteration"] == 0 else f"{r['name']} (#{r['iteration'] + 1})",
                     r["status"].replace("_", " "), *_costs(r["after"], us), _fid(fid.get("max_rel_error")),
                     _fid(fid.get("cosine_similarity"), 6), _fid(fid.get("top1_agreement"), 4),
                     f"{r['seconds'] + r['verify_seconds']:.2f}", r["reason"]])
        classes.append(r["status"])
    note = f"<p class=\"muted\">verification: {esc(report['verification'])}</p>"
    return ("<h2>Passes</h2>\n" + _table(header, rows, numeric={2, 3, 4, 5, 6, 7, 8, 9}, classes=classes, id_="passes")
            + "\n" + note)


def _pareto(report: Report) -> str:
    if report["kind"] != "search":
        return ""
    from nnopt.search.report import SearchReport

    search = SearchReport.from_dict(report)
    objective = search.objective
    (scale, unit), label = OBJECTIVES[objective].plot, OBJECTIVES[objective].label

    def usable(r: Any) -> bool:
        return not r.failed and r.drop is not None and math.isfinite(r.objective(objective))

    by_key = {r.key: r for r in search.candidates}
    front = [by_key[k] for k in search.front if k in by_key and usable(by_key[k])]
    chosen = search.candidate(search.chosen)
    # A candidate that broke the model (drop 0.6) would squash the ones that matter into the bottom row:
    # the y axis stops at 4x the larger of the max drop and the chosen's, and such points sit on its top edge.
    cap = 4 * max(search.max_drop, float(chosen.drop or 0.0) if chosen is not None else 0.0, 1e-3)

    def point(r: Any, kind: str) -> Point:
        x, drop = r.objective(objective) / scale, float(r.drop or 0.0)
        title = f"{'chosen: ' if kind == 'chosen' else ''}{r.key}: {label} {x:,.4g} {unit}, drop {drop:.4f}"
        return Point(x, min(drop, cap), kind, title)

    points = [point(r, "front" if r.key in search.front else "candidate")
              for r in search.candidates if usable(r) and r is not chosen]
    points.sort(key=lambda p: p.kind == "front")  # the front on top of the other candidates
    if chosen is not None and usable(chosen):
        points.append(point(chosen, "chosen"))
    xs = [p.x for p in points]
    log_x = bool(xs) and min(xs) > 0 and max(xs) > 20 * min(xs)
    above = sum(1 for r in search.candidates if usable(r) and float(r.drop or 0.0) > cap)
    title = f"{len(points)} candidates: Pareto front (blue), chosen (red)" + (
        f"; {above} with a drop above {cap:.3g} drawn at the top" if above else "")
    plot = scatter_plot(points, x_label=f"{label} ({unit})", y_label=f"drop of {search.metric} ({search.drop_type})",
                        title=title, log_x=log_x, limit=(search.max_drop, f"max drop {search.max_drop:g}"),
                        line=[(p.x, p.y) for p in (point(r, "front") for r in front)])
    rows = [[r.key + (" (chosen)" if r is chosen else ""), f"{r.objective(objective) / scale:,.4g}", _g(r.metric),
             _g(r.drop), _g(r.drop_bound)] for r in front]
    table = _table(["front candidate", f"{label} ({unit})", search.metric, "drop", "drop + 1 s.e."], rows,
                   numeric={1, 2, 3, 4}, id_="front")
    return f'<h2>Candidates</h2>\n<div id="pareto">{plot}</div>\n{table}'


def _node_charts(report: Report) -> str:
    costs = report.get("node_costs")
    if not costs or not costs["nodes"]:
        return ""
    parts = ["<h2>Cost per node, input and output model</h2>"]
    for key, (title, fmt) in NODE_CHARTS.items():
        # A node with none of this figure on either side (a DequantizeLinear of a weight: 0 us) has no bar.
        rows = [BarRow(f"{n['name']} ({n['op_type']})", tuple(_side(n[s], key) for s in ("before", "after")),
                       ("new", "removed")) for n in costs["nodes"] if any(_side(n[s], key) for s in ("before", "after"))]
        if not rows:
            continue
        chart = (f'<div class="node-chart" data-figure="{esc(key)}">'
                 f'{bar_chart(rows, ["input", "output"], fmt, title=title)}</div>')
        # The first chart open; the others (long: every QuantizeLinear has FLOPs) one click away.
        parts.append(f"<details{' open' if len(parts) == 1 else ''}><summary><h3>{esc(title)}, {len(rows)} nodes"
                     f"</h3></summary>\n{chart}</details>")
    omitted = costs["omitted"]
    if omitted["nodes"]:
        parts.append(f'<p class="muted">{omitted["nodes"]:,} more node(s) not drawn: estimated '
                     f'{_us(omitted["before"]["latency_s"])} us in the input model, '
                     f'{_us(omitted["after"]["latency_s"])} us in the output model.</p>')
    return "\n".join(parts)


def _layer_charts(report: Report) -> str:
    charts: list[str] = []
    for record in report.get("passes", []):
        for key, (title, unit, better) in LAYER_FIGURES.items():
            rows = [BarRow(f"{layer['node']} ({layer.get('op_type', '')})", (float(layer[key]),))
                    for layer in record.get("layers", []) if is_number(layer.get(key))]
            if rows:
                heading = f"{record['name']}: {title}" + (f" ({unit})" if unit else "") + f", {better}"
                charts.append(f"<h3>{esc(heading)}</h3>\n" + _figure_chart(rows, key, unit))
    decisions = [d for d in report.get("decisions", []) if is_number(d.get("sensitivity"))]
    if decisions:
        rows = [BarRow(f"{d['layer']}: {d['technique']} {d['choice']}".rstrip(), (float(d["sensitivity"]),))
                for d in decisions]
        charts.append("<h3>search: sensitivity of each chosen layer choice (output distortion measured alone), "
                      "lower is better</h3>\n" + _figure_chart(rows, "sensitivity", ""))
    return "<h2>Per-layer figures</h2>\n" + "\n".join(charts) if charts else ""


def _figure_chart(rows: list[BarRow], key: str, unit: str) -> str:
    def fmt(value: float) -> str:
        return f"{value:.4g} {unit}".rstrip()

    return f'<div class="layer-chart" data-figure="{esc(key)}">{bar_chart(rows, [key], fmt, title=key)}</div>'


def _fidelity(report: Report) -> str:
    fid = report.get("fidelity")
    if fid is None:
        return f"<h2>Fidelity</h2>\n<p id=\"fidelity\">not measured: {esc(report.get('verification', ''))}</p>"
    rows = [["measured on", f"{fid['source']} ({fid['samples']} samples)"]]
    labels = {"max_abs_error": "max absolute error", "max_rel_error": "max relative error",
              "cosine_similarity": "lowest cosine similarity", "top1_agreement": "top-1 agreement"}
    rows += [[label, _fid(fid[key], 6 if key in ("cosine_similarity", "top1_agreement") else 3)]
             for key, label in labels.items() if fid.get(key) is not None]
    if report["kind"] == "search":
        from nnopt.search.report import SearchReport

        search = SearchReport.from_dict(report)
        chosen = search.candidate(search.chosen)
        rows.append([f"{search.metric} of the input model", _g(search.baseline_metric)])
        if chosen is not None:
            rows += [[f"{search.metric} of the output model", _g(chosen.metric)], ["drop", _g(chosen.drop)],
                     ["drop + 1 standard error", _g(chosen.drop_bound)]]
    return "<h2>Fidelity</h2>\n" + _table(["", "output model against the input model"], rows, numeric={1}, id_="fidelity")


def _notes(report: Report) -> str:
    parts = []
    for title, items in (("Warnings", report.get("warnings", [])), ("Notes", report.get("notes", []))):
        if items:
            parts.append(f"<h2>{title}</h2>\n<ul class=\"notes\">" + "".join(f"<li>{esc(i)}</li>" for i in items) + "</ul>")
    return "\n".join(parts)


#: The page's sections in order; each gives "" where it has nothing to show.
_SECTIONS: tuple[Callable[[Report], str], ...] = (_header, _summary, _passes, _pareto, _node_charts, _layer_charts,
                                                  _fidelity, _notes)


# ---------------------------------------------------------------------------------------------- helpers
def _table(header: Sequence[str], rows: Sequence[Sequence[str]], *, numeric: Collection[int] = (),
           classes: Sequence[str] = (), id_: str = "") -> str:
    """An HTML table, every cell escaped; ``numeric``: the columns aligned right; ``classes``: each row's class."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        css = f' class="{esc(classes[i])}"' if i < len(classes) and classes[i] else ""
        cells = "".join(f'<td class="n">{esc(c)}</td>' if j in numeric else f"<td>{esc(c)}</td>" for j, c in enumerate(row))
        body.append(f"<tr{css}>{cells}</tr>")
    ident = f' id="{esc(id_)}"' if id_ else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _side(figures: Mapping[str, Any] | None, key: str) -> float | None:
    return None if figures is None else float(figures[key])


def _costs(totals: Mapping[str, Any], us: Callable[[float], str]) -> list[str]:
    latency: Any = totals.get("latency_s")
    return [_int(totals.get("params")), _int(totals.get("flops")), _int(totals.get("weight_bytes")),
            us(latency * 1e6) if is_number(latency) else ""]


def _int(value: Any) -> str:
    return f"{int(value):,}" if is_number(value) else ""


def _us(seconds: Any) -> str:
    return f"{seconds * 1e6:,.1f}" if is_number(seconds) else ""


def _g(value: Any) -> str:
    return f"{value:.4g}" if is_number(value) else ("" if value is None else str(value))


def _fid(value: Any, digits: int = 3) -> str:
    """A fidelity figure as the text table writes it (``"inf"`` stays a string in the JSON)."""
    return value if isinstance(value, str) else fmt_num(value, digits)
