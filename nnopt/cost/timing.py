"""Measured latency in onnxruntime (CPU): warm-up, repeated runs, median."""

from __future__ import annotations

import os
import statistics
import time
from typing import Literal

import numpy as np
import onnx

from nnopt.analysis.shapes import ShapeResult
from nnopt.errors import InputError, first_line
from nnopt.ir.model import Model
from nnopt.runtime import (
    RuntimeUnavailable,
    make_feeds,
    make_session,
    oversized_tensor,
    run_model,
)


def measure_latency(
    model_or_proto: Model | onnx.ModelProto | str | os.PathLike[str],
    feeds: dict[str, np.ndarray] | None = None,
    *,
    warmup: int = 3,
    runs: int = 20,
    input_shapes: dict[str, list[int]] | None = None,
    time_limit: float | None | Literal["current"] = "current",
    shapes: ShapeResult | None = None,
) -> dict[str, float | int]:
    """Time the model in onnxruntime on CPU, with onnxruntime's default graph optimizations.

    Args:
        model_or_proto: The model (a Model, a ModelProto with weights loaded, or a path).
        feeds: Values for some or all inputs; :func:`make_feeds` generates the others (using
            ``input_shapes``).
        warmup: Untimed runs first (allocations, caches, thread-pool start-up).
        runs: Timed runs.
        input_shapes: Shapes for generated inputs.
        time_limit: The first run is stopped after this many seconds (a valid Loop may never end;
            "current": the limit ``run_time_limit`` set, by default 60 s); the
            others, on the same inputs, take as long and go unguarded so the timer costs them nothing.
        shapes: Shape inference of the model: if it shows a tensor too large to build (see
            ``oversized_tensor``), nothing is run.

    Returns:
        ``{"median_s", "min_s", "mean_s", "runs"}``, wall-clock seconds per run.

    Raises:
        InputError: bad ``warmup``/``runs``, feeds that cannot be generated, or onnxruntime rejecting the
            model or the feeds.
    """
    if runs < 1 or warmup < 0:
        raise InputError(
            f"latency measurement needs runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}"
        )
    try:
        session = make_session(model_or_proto, optimize=True)
        feeds = make_feeds(session, input_shapes, given=feeds)
    except RuntimeUnavailable as exc:  # the model cannot run here, or its inputs cannot be generated
        raise InputError(str(exc)) from exc
    flood = oversized_tensor(shapes) if shapes is not None else None
    if flood is not None:
        raise InputError(f"cannot measure latency: {flood}")
    try:
        times = []
        for i in range(warmup + runs):
            start = time.perf_counter()
            if i == 0:
                run_model(session, feeds, time_limit=time_limit)
            else:
                session.run(None, feeds)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    except Exception as exc:  # boundary: onnxruntime raises its own exception types
        raise InputError(f"onnxruntime cannot run the model: {first_line(exc)}") from exc
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "mean_s": statistics.fmean(times),
        "runs": runs,
    }

