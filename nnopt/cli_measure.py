"""``optimize --measure``: the input and output models timed in onnxruntime, interleaved run by run."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from nnopt.errors import InputError, first_line

#: Untimed runs of each model before each block of timed ones (caches, and the other session's spinning
#: worker threads: see ``time_alternating``), and timed runs per block.
WARMUP = 3
BLOCK = 5


def measure_before_after(src: Path, optimized: Any, runs: int, feeds: dict[str, Any] | None,
                         input_shapes: dict[str, list[int]]) -> dict[str, Any]:
    """Median wall-clock seconds per run of the input model (at ``src``) and the ``optimized`` one (a Model)
    on the same inputs.

    The two models' runs alternate in blocks of ``BLOCK`` (before, after, before, ...), so that load from
    other processes falls on both alike and the ratio holds even on a busy machine; both sessions use
    onnxruntime's default graph optimizations, as a deployment would. ``runs`` is rounded up to whole blocks.

    Returns:
        ``{"runs", "before_s", "after_s", "ratio"}`` (``ratio``: after ÷ before).
    """
    from nnopt.cost.timing import time_alternating
    from nnopt.runtime import RuntimeUnavailable, feeds_for, make_feeds, make_session

    try:
        sessions = [make_session(str(src), optimize=True), make_session(optimized, optimize=True)]
        inputs = make_feeds(sessions[0], input_shapes, given=feeds)
    except RuntimeUnavailable as exc:
        raise InputError(f"--measure: {exc}") from exc
    # The same values for both, each in its session's float input types (fp16 with keep_io_types=false).
    per_session = [feeds_for(session, inputs) for session in sessions]
    try:
        times = time_alternating(sessions, per_session, rounds=-(-runs // BLOCK), runs=min(runs, BLOCK),
                                 warmup=WARMUP)
    except Exception as exc:  # boundary: onnxruntime raises its own exception types
        raise InputError(f"--measure: onnxruntime cannot run the model: {first_line(exc)}") from exc
    before, after = (statistics.median(t) for t in times)
    return {"runs": len(times[0]), "before_s": before, "after_s": after, "ratio": after / before if before else None}


def measured_line(measured: dict[str, Any]) -> str:
    """``measured: 55.1 -> 41.0 us (-25.6 %), onnxruntime CPU, median of 20 interleaved runs``."""
    before, after = measured["before_s"] * 1e6, measured["after_s"] * 1e6
    change = f" ({(after - before) / before * 100:+.1f} %)" if before else ""
    return (f"measured: {before:,.1f} -> {after:,.1f} us{change}, onnxruntime CPU, median of {measured['runs']} "
            "interleaved runs each")
