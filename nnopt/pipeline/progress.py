"""Progress of a pipeline run: which pass is running, and how far a slow pass has got inside it.

The pass manager calls a ``Progress`` object at the start and end of every pass and around verification;
passes call ``ctx.progress(done, total, item)`` per layer (``PassContext.progress``), which reaches the
same object. The CLI shows it on stderr (so ``--json`` on stdout stays clean) unless ``--quiet``; the
Python API shows nothing unless a ``Progress`` is passed in.
"""

from __future__ import annotations

import shutil
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

    def finished(self) -> None:
        """The run is over (also when a pass failed under ``strict``): nothing more will be reported."""


class StreamProgress(Progress):
    """Progress on a text stream (stderr in the CLI): one line per pass, plus throttled per-layer lines.

    On a terminal one line is rewritten in place and cleared when the run ends, so the table that follows
    stands alone. Elsewhere (CI logs, build steps) each pass writes one line when it ends, a long pass a
    per-layer line at most every ``interval`` seconds (alive, without flooding the log), and a fixed-point
    repeat in which no pass changed anything one line for the whole repeat.
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
        self._held: list[tuple[str, float]] = []  # a repeat's "unchanged" lines, while nothing has changed
        self._repeat = 0  # the fixed-point iteration being held (0: none)
        self._repeat_changed = False

    def pass_started(self, name: str, position: int, count: int, iteration: int) -> None:
        if position == 1:
            self._end_repeat()
        self._repeat = iteration
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
        self._release_held()  # a slow pass inside a repeat: its lines keep their order
        self._write(f"nnopt: {self._label}: {done}/{total}{what}", final=not self.tty)

    def verifying(self) -> None:
        if self.clock() - self._started >= self.interval:
            self._write(f"nnopt: {self._label}: verifying", final=not self.tty)

    def pass_finished(self, record: Any) -> None:
        seconds = record.seconds + record.verify_seconds
        status = record.status.replace("_", " ")
        reason = f": {record.reason}" if record.reason else ""
        line = f"nnopt: {self._label}: {status} in {seconds:.2f} s{reason}"
        if self.tty:
            self._write(line, final=False)  # rewritten by the next pass, cleared by finished()
        elif record.iteration and record.status == "unchanged" and not self._repeat_changed:
            self._held.append((line, seconds))
        else:
            self._release_held()
            self._repeat_changed = bool(record.iteration)
            self._write(line, final=True)

    def finished(self) -> None:
        self._end_repeat()
        if self.tty and self._dangling:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
            self._dangling = False

    def _release_held(self) -> None:
        """Write the held lines one by one: something in this repeat is worth reading after all."""
        for line, _ in self._held:
            self._write(line, final=True)
        self._held = []
        self._repeat_changed = self._repeat_changed or bool(self._repeat)

    def _end_repeat(self) -> None:
        """A repeat in which nothing changed: one line instead of one per pass."""
        if self._held:
            seconds = sum(s for _, s in self._held)
            self._write(f"nnopt: repeat {self._repeat + 1}: nothing changed in {len(self._held)} passes "
                        f"({seconds:.2f} s): fixed point reached", final=True)
        self._held = []
        self._repeat_changed = False

    def _write(self, line: str, *, final: bool) -> None:
        if self.tty:
            # Rewrite the current line: clear it, then print; keep it open until a final line. A line wider
            # than the terminal would wrap, and clearing would then leave its first part behind: cut it.
            width = shutil.get_terminal_size().columns
            line = line if len(line) < width else line[: max(width - 4, 1)] + "..."
            self.stream.write("\r\x1b[2K" + line + ("\n" if final else ""))
            self._dangling = not final
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
