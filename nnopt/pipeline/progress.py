"""Progress of a pipeline run: which pass is running, and how far a slow pass has got inside it.

The pass manager calls a ``Progress`` object at the start and end of every pass and around verification;
passes call ``ctx.progress(done, total, item)`` per layer (``PassContext.progress``), which reaches the
same object. The CLI shows it on stderr (so ``--json`` on stdout stays clean) unless ``--quiet``; the
Python API shows nothing unless a ``Progress`` is passed in.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO


class Progress:
    """Receives progress events. The base class ignores them all: subclass and override what you need."""

    def pass_started(self, name: str, position: int, count: int, iteration: int) -> None:
        """Pass ``position`` (1-based) of ``count`` starts; ``iteration`` is 0 except in fixed-point repeats."""

    def layer(self, done: int, total: int, item: str) -> None:
        """Inside the running pass: ``done`` of ``total`` units of work (usually layers) are finished."""

    def verifying(self) -> None:
        """The running pass has finished; its result is being checked and measured."""

    def pass_finished(self, record: Any) -> None:
        """The pass has been kept or rolled back (``record`` is a ``PassRecord``)."""


class StreamProgress(Progress):
    """One line per pass on a text stream (stderr in the CLI), plus throttled per-layer lines.

    On a terminal the current line is rewritten in place. Elsewhere (CI logs, build steps) each pass writes
    one line when it ends, and a long pass a per-layer line at most every ``interval`` seconds, so it
    shows it is alive without flooding the log.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        interval: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.clock = clock
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._label = ""
        self._started = 0.0
        self._last_layer = 0.0
        self._dangling = False  # a tty line was written without its newline

    def pass_started(self, name: str, position: int, count: int, iteration: int) -> None:
        repeat = f" (repeat {iteration + 1})" if iteration else ""
        self._label = f"[{position}/{count}] {name}{repeat}"
        self._started = self._last_layer = self.clock()
        if self.tty:  # in a log, the finishing line says it all; per-layer lines cover long passes
            self._write(f"nnopt: {self._label} ...", final=False)

    def layer(self, done: int, total: int, item: str) -> None:
        now = self.clock()
        if done < total and now - self._last_layer < self.interval:
            return
        self._last_layer = now
        what = f" {item}" if item else ""
        self._write(f"nnopt: {self._label}: {done}/{total}{what}", final=not self.tty)

    def verifying(self) -> None:
        if self.clock() - self._started >= self.interval:
            self._write(f"nnopt: {self._label}: verifying", final=not self.tty)

    def pass_finished(self, record: Any) -> None:
        seconds = record.seconds + record.verify_seconds
        status = record.status.replace("_", " ")
        reason = f": {record.reason}" if record.reason else ""
        self._write(f"nnopt: {self._label}: {status} in {seconds:.2f} s{reason}", final=True)

    def _write(self, line: str, *, final: bool) -> None:
        if self.tty:
            # Rewrite the current line: clear it, then print; keep it open until a final line.
            self.stream.write("\r\x1b[2K" + line + ("\n" if final else ""))
            self._dangling = not final
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
