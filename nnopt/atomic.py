"""Atomic writes of small files (reports, hardware profiles, plots, study records) beside their target.

Every such file is written to a temporary file in the target's folder and renamed over the target, so a
reader sees the old file or the new one, never a part. The temporary is created with mode 0666 filtered by
the umask, as ``open()`` creates a file, so a report or a profile gets the same permissions as the model
written beside it (``tempfile.mkstemp`` would make it 0600: unreadable to the build's other users).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from nnopt.errors import OutputError, first_line

#: Mode of a new file before the umask: what ``open(path, "w")`` and onnx.save_model use.
_NEW_FILE_MODE = 0o666


def stage(path: str | os.PathLike[str], data: bytes, *, sync: bool = False) -> Path:
    """Write ``data`` to a new temporary file beside ``path`` and return it; ``commit`` renames it into place.

    Stale temporaries of killed nnopt runs in that folder are removed first. ``sync``: the data is on disk
    before this returns (it survives a power cut once committed).

    Raises:
        OutputError: the folder cannot be created or the file written (the OS's message).
    """
    from nnopt.ir.model import make_output_folder, remove_stale_temporaries, temporary_prefix

    target = Path(path)
    tmp: Path | None = None
    try:
        folder = make_output_folder(target.resolve().parent)
        remove_stale_temporaries(folder)
        fd, tmp = _create(folder, temporary_prefix())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        return tmp
    except OSError as exc:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise OutputError(f"{target}: cannot write: {exc.strerror or first_line(exc)}") from exc
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise


def fill(staged: Path, path: str | os.PathLike[str], data: bytes) -> None:
    """Replace the content of a file from ``stage`` (meant for ``path``) with ``data``: for a file whose
    content is known only once something else is written (a report holds the written model's size)."""
    try:
        with open(staged, "wb") as f:
            f.write(data)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write: {exc.strerror or first_line(exc)}") from exc


def commit(staged: Path, path: str | os.PathLike[str]) -> None:
    """Rename a file from ``stage`` over ``path`` (OutputError with the OS's message if that fails)."""
    try:
        os.replace(staged, path)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write: {exc.strerror or first_line(exc)}") from exc


def write_atomic(path: str | os.PathLike[str], data: bytes, *, sync: bool = False) -> None:
    """Write ``data`` to ``path`` all at once: ``stage`` then ``commit``; nothing is left behind on failure.

    Raises:
        OutputError: the folder cannot be created or the file written.
    """
    staged = stage(path, data, sync=sync)
    try:
        commit(staged, path)
    finally:
        staged.unlink(missing_ok=True)


def _create(folder: Path, prefix: str) -> tuple[int, Path]:
    """A new file ``folder/prefix<random>`` opened for writing, with the umask's permissions."""
    while True:
        candidate = folder / f"{prefix}{secrets.token_hex(8)}"
        try:
            return os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _NEW_FILE_MODE), candidate
        except FileExistsError:  # a name another writer picked: draw again
            continue
