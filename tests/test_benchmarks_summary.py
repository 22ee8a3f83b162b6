"""``benchmarks/run_all.py --render``: the headline summary quotes the figures of the committed reports.

Nothing is measured here; the test reads the committed JSONs of docs/ and checks that the summary it
writes carries their numbers (so a change to a report's format cannot silently break the summary).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def test_render_writes_the_headline_figures_of_each_report(tmp_path):
    out = tmp_path / "benchmarks.md"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--render", "--out", str(out)],
        capture_output=True, text=True, check=False,
    )
    assert done.returncode == 0, done.stderr
    text = out.read_text()

    cost = json.loads((DOCS / "cost_model.json").read_text())["summary"]
    for profile in ("default", "calibrated"):
        assert f"| {cost[profile]['spearman']:.3f} | × {math.exp(cost[profile]['median_abs_log_ratio']):.2f} |" in text
    assert f"Over {cost['points']} (model, variant) points" in text

    scale = json.loads((DOCS / "scale.json").read_text())
    assert f"| `default` | {scale['results']['default']['res2k']['seconds']:.3f} |" in text
    assert f"| {scale['summary']['default']['slope']:.2f} |" in text

    peers = json.loads((DOCS / "peers.json").read_text())
    models = [res["model"] for res in peers["models"]]
    assert [line.split(" | ")[0].lstrip("| ") for line in text.splitlines()
            if line.split(" | ")[0].lstrip("| ") in models] == models  # one goal row per model, in order
    assert text.count("](") >= 6  # the three reports and their three plots are linked
    for name in ("peers.png", "scale.png", "cost_model.png"):
        assert (DOCS / name).is_file() and f"]({name})" in text


def test_the_committed_summary_is_up_to_date(tmp_path):
    """docs/benchmarks.md is what --render writes from the committed JSONs (re-render after a run)."""
    out = tmp_path / "benchmarks.md"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--render", "--out", str(out)],
                   check=True, capture_output=True)
    assert out.read_text() == (DOCS / "benchmarks.md").read_text()
