"""The ``--html`` page in a real browser (issue #17): headless Chromium loads it without a console message,
a script error or a blocked load, and lays out every bar at a length proportional to its figure.

A probe script is put in front of the page's own content (before its Content-Security-Policy, which would
block it): it records errors and policy violations, opens the collapsed charts, measures each bar once the
page has loaded and writes what it found into the DOM, which ``--dump-dom`` prints. Chromium's console
(``--enable-logging=stderr``) is checked too. Skipped where no Chromium is installed (Debian:
``apt-get install chromium``).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from nnopt.cli import main

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits" / "digits_cnn.onnx"
DIGITS_DATA = ROOT / "examples" / "digits" / "digits_test.npz"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")

PROBE = """<script>
window.__errors = [];
window.addEventListener("error", e => __errors.push("error: " + (e.message || e.target.tagName + " failed to load")), true);
document.addEventListener("securitypolicyviolation", e => __errors.push("blocked: " + e.violatedDirective + " " + e.blockedURI));
window.addEventListener("load", () => {
  document.querySelectorAll("details").forEach(d => { d.open = true; });
  const bars = [...document.querySelectorAll("svg.chart rect.bar")];
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({errors: __errors, bars: bars.map(r => [r.getBBox().width, +r.dataset.value,
    r.closest("svg").getAttribute("aria-label")]), points: document.querySelectorAll("svg.chart circle").length,
    charts: [...document.querySelectorAll("svg.chart")].map(s => s.getBoundingClientRect().height)});
  document.body.appendChild(out);
});
</script>
"""


def _browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def load_in_browser(page: Path, folder: Path) -> tuple[dict, str]:
    """Load ``page`` (with the probe) in headless Chromium: (the probe's findings, Chromium's stderr)."""
    browser = _browser()
    if browser is None:
        pytest.skip("no Chromium found (chromium, chromium-browser, google-chrome): apt-get install chromium")
    probed = folder / "probed.html"
    probed.write_text(page.read_text(encoding="utf-8").replace("<head>\n", "<head>\n" + PROBE, 1), encoding="utf-8")
    done = subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox", "--enable-logging=stderr", "--v=0",
                           f"--user-data-dir={folder / 'profile'}", "--dump-dom", probed.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, re.S)
    assert found is not None, "the probe did not run: the page did not load"
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&")), done.stderr


def test_the_page_loads_in_chromium_without_errors_and_draws_its_charts(tmp_path):
    page = tmp_path / "r.html"
    code = main(["optimize", str(DIGITS), "-o", str(tmp_path / "o.onnx"), "-p", "default", "-p", "quantize:select=all",
                 "--data", str(DIGITS_DATA), "--html", str(page), "-q"])
    assert code == 0
    found, console = load_in_browser(page, tmp_path)
    assert found["errors"] == []
    assert [line for line in console.splitlines() if ":CONSOLE" in line] == []
    source = page.read_text(encoding="utf-8")
    # Every bar of the source is laid out, at its figure over the chart's largest times 460 px.
    assert len(found["bars"]) == source.count('<rect class="bar ') > 30
    largest: dict[str, float] = {}
    for _, value, chart in found["bars"]:
        largest[chart] = max(largest.get(chart, 0.0), value)
    for width, value, chart in found["bars"]:
        assert width == pytest.approx(460 * value / largest[chart], abs=0.05)
    assert set(largest) >= {"estimated latency per node (us)", "FLOPs per node", "sqnr_db"}
    assert len(found["charts"]) == source.count('<svg class="chart') and min(found["charts"]) > 40


def test_the_probe_sees_errors_and_blocked_loads(tmp_path):
    # The check above can fail: a page with a script error and a network image is caught twice over.
    page = tmp_path / "bad.html"
    page.write_text("<!DOCTYPE html>\n<html>\n<head>\n<meta http-equiv=\"Content-Security-Policy\" "
                    "content=\"default-src 'none'\">\n</head>\n<body><img src=\"https://example.invalid/x.png\">"
                    "<svg class=\"chart\"><rect class=\"bar s0\" width=\"10\" height=\"5\" data-value=\"1\"/></svg>"
                    "</body>\n</html>\n", encoding="utf-8")
    found, console = load_in_browser(page, tmp_path)
    assert found["errors"] == ["blocked: img-src https://example.invalid/x.png", "error: IMG failed to load"]
    assert any("Content Security Policy" in line for line in console.splitlines() if ":CONSOLE" in line)
    assert found["bars"] == [[10, 1, None]]
