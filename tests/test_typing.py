"""The type checker holds: mypy (settings in pyproject.toml) is clean over nnopt/ and passes/."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _package_tree(where: Path) -> Path:
    """A tree of links laid out as installed: ``nnopt/`` with ``passes/`` as ``nnopt/passes``.

    mypy names modules after their path, and ``passes/`` is installed as ``nnopt.passes``
    (``[tool.setuptools.package-dir]``): checked where it lies, ``from nnopt.passes._lowrank import ...``
    would not resolve.
    """
    tree = where / "tree"
    shutil.rmtree(tree, ignore_errors=True)
    package = tree / "nnopt"
    package.mkdir(parents=True)
    for entry in (ROOT / "nnopt").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    (package / "passes").symlink_to(ROOT / "passes", target_is_directory=True)
    return tree


def test_mypy_is_clean(request: pytest.FixtureRequest) -> None:
    # Under pytest's cache directory: mypy's own cache there makes reruns take seconds instead of a minute.
    where = Path(request.config.cache.mkdir("mypy"))
    tree = _package_tree(where)
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
         "--cache-dir", str(where / "cache"), "-p", "nnopt"],
        cwd=tree, capture_output=True, text=True, env={**os.environ, "MYPY_FORCE_COLOR": "0"},
    )
    # Messages name files as laid out in the tree: nnopt/passes/x.py is passes/x.py in the repository.
    messages = re.sub(r"^nnopt/passes/", "passes/", done.stdout + done.stderr, flags=re.MULTILINE)
    assert done.returncode == 0, messages
    assert "Success: no issues found" in done.stdout
