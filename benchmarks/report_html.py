"""The screenshot of the ``--html`` report in docs/ (issue #17): the README's digits run, shot in headless Chromium.

Runs, from the repository's root, the command the README shows:

    nnopt optimize examples/digits/digits_cnn.onnx -o out/digits.small.onnx \\
        --pipeline examples/pipelines/digits_prune_quantize.toml --html out/digits.report.html

prints its table (the README quotes it), then loads the page in headless Chromium (Debian: ``apt-get install
chromium``) and writes ``docs/report_html.png``. Usage: ``python benchmarks/report_html.py [--height PX]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMAND = ["optimize", "examples/digits/digits_cnn.onnx", "-o", "out/digits.small.onnx", "--pipeline",
           "examples/pipelines/digits_prune_quantize.toml", "--html", "out/digits.report.html"]
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=2500, help="height of the shot in pixels (the page's top)")
    parser.add_argument("--output", default=str(ROOT / "docs" / "report_html.png"))
    args = parser.parse_args()
    browser = next((path for name in BROWSERS if (path := shutil.which(name))), None)
    if browser is None:
        print("no Chromium found: apt-get install chromium", file=sys.stderr)
        return 2
    done = subprocess.run([sys.executable, "-m", "nnopt", *COMMAND], cwd=ROOT, text=True, capture_output=True)
    print(f"$ nnopt {' '.join(COMMAND)}\n{done.stdout}", end="")
    if done.returncode != 0:
        print(done.stderr, file=sys.stderr)
        return done.returncode
    page = ROOT / "out" / "digits.report.html"
    with tempfile.TemporaryDirectory() as profile:
        shot = subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
                               f"--user-data-dir={profile}", f"--window-size=1150,{args.height}",
                               f"--screenshot={Path(args.output).resolve()}", page.as_uri()],
                              capture_output=True, text=True, timeout=120)
    if shot.returncode != 0:
        print(shot.stderr, file=sys.stderr)
        return shot.returncode
    print(f"wrote {os.path.relpath(args.output, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
