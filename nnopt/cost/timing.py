"""Measured latency in onnxruntime (CPU): one model's median, or several models timed interleaved."""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort

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



def time_alternating(
    sessions: Sequence[ort.InferenceSession],
    feeds: Sequence[dict[str, np.ndarray]],
    *,
    rounds: int,
    runs: int,
    warmup: int,
    tick: Callable[[], float] = time.perf_counter,
) -> list[list[float]]:
    """Run the sessions in turn, ``rounds`` times: each ``warmup`` times untimed, then ``runs`` times timed.
    Returns each session's timed runs (``rounds * runs``), in seconds; ``feeds[i]`` are session i's inputs.

    Load from outside the machine (on a shared host, bursts of tens of seconds the machine itself does not
    see) then falls on every session alike, so ratios of their medians hold where absolute times do not.
    Blocks, not single runs, alternate: with more than one intra-op thread, onnxruntime pins each session's
    worker threads to the same CPUs and they spin for a while after a run, so a session run right after
    another one competes with its spinning workers (ppocr_det, two threads: 6.6 ms alone, 12 ms alternating
    run by run, 6.6 ms alternating blocks after 3 warm-up runs). onnxruntime's exceptions propagate.
    """
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(rounds):
        for session, session_feeds, timed in zip(sessions, feeds, times):
            for _ in range(warmup):
                session.run(None, session_feeds)
            for _ in range(runs):
                start = tick()
                session.run(None, session_feeds)
                timed.append(tick() - start)
    return times


#: The name under which ``measure_interleaved`` times a second session of its first model (A/A).
AA_SUFFIX = " A/A"
_CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "thread": time.thread_time}


@dataclass(frozen=True)
class Timing:
    """One model's timings from ``measure_interleaved``: the median of each round's runs, in seconds."""

    per_round: tuple[float, ...]

    @property
    def median_s(self) -> float:
        """Median of the per-round medians: the figure for the thread clock (other jobs add no CPU time)."""
        return statistics.median(self.per_round)

    @property
    def min_s(self) -> float:
        """Least per-round median: the figure for the wall clock (other jobs on shared cores only add time)."""
        return min(self.per_round)


def measure_interleaved(
    models: Mapping[str, Model | onnx.ModelProto | str | os.PathLike[str]],
    feeds: dict[str, np.ndarray],
    *,
    rounds: int = 5,
    runs: int = 10,
    warmup: int = 2,
    threads: int | None = 1,
    clock: Literal["wall", "thread"] = "thread",
    aa: bool = True,
    fresh_sessions: bool = False,
) -> dict[str, Timing]:
    """Time several models against each other in onnxruntime (CPU, default graph optimizations).

    Each session is created once (``fresh_sessions``: anew every round); then ``rounds`` rounds each run
    every model ``warmup`` times untimed and ``runs`` times timed, the models' order rotating by one each
    round, so drift in the machine's load hits every model alike and no model always runs first.

    Args:
        models: Name -> model (a Model, a ModelProto with its weights loaded, or a path); ordered.
        feeds: Input values, the same for every model.
        rounds: Interleaved rounds.
        runs: Timed runs per model and round (their median is the round's figure).
        warmup: Untimed runs per model before each round's timed ones (caches, after the other models ran).
        threads: onnxruntime intra-op threads (None: its default, one per core).
        clock: ``thread``: CPU time of the calling thread (``time.thread_time``), which with one intra-op
            thread is where onnxruntime computes, so time the scheduler gave other processes is not
            counted (needs ``threads=1``); ``wall``: wall-clock time.
        aa: Also time a second, separate session of the first model, under ``<first name> A/A``: how far
            two timings of the same model differ here is the noise of the comparison (see ``aa_noise``).
        fresh_sessions: Create every session again before each round (one at a time, the previous one
            released first). A session's speed can depend on where its buffers land: among a dozen large
            models timed together, two quantized models onnxruntime executes as the same graph differed by
            5-13 % for whole runs, and by nothing timed alone. Fresh sessions give each model several
            placements; the least round then compares like with like.

    Returns:
        Name -> ``Timing`` (the A/A copy last).

    Raises:
        InputError: bad counts, the thread clock with more than one thread, or onnxruntime rejecting a model
            or the feeds.
    """
    if rounds < 1 or runs < 1 or warmup < 0 or not models:
        raise InputError(f"interleaved timing needs models, rounds >= 1, runs >= 1 and warmup >= 0, got "
                         f"{len(models)} model(s), rounds={rounds}, runs={runs}, warmup={warmup}")
    if clock == "thread" and threads != 1:
        raise InputError(f"the thread clock measures one intra-op thread only, got threads={threads}")
    first = next(iter(models))
    sources = dict(models)
    if aa:
        sources[first + AA_SUFFIX] = models[first]
    try:
        sessions = {name: _timing_session(model, threads) for name, model in sources.items()}
        order = list(sessions)
        per_round: dict[str, list[float]] = {name: [] for name in order}
        tick = _CLOCKS[clock]
        for r in range(rounds):
            for name in order[r % len(order):] + order[:r % len(order)]:
                if fresh_sessions and r:
                    del sessions[name]
                    sessions[name] = _timing_session(sources[name], threads)
                per_round[name].append(_round_median(sessions[name], feeds, runs, warmup, tick))
    except InputError:
        raise
    except Exception as exc:  # boundary: onnxruntime raises its own exception types
        raise InputError(f"onnxruntime cannot run the model: {first_line(exc)}") from exc
    return {name: Timing(tuple(times)) for name, times in per_round.items()}


def aa_noise(timings: Mapping[str, Timing], first: str) -> float:
    """Relative difference of the A/A copy's median to ``first``'s (0.03: timings here differ by 3 % for
    the same model); NaN without an A/A copy."""
    copy = timings.get(first + AA_SUFFIX)
    if copy is None or not timings[first].median_s > 0:
        return math.nan
    return abs(copy.median_s / timings[first].median_s - 1.0)


def _timing_session(model: Model | onnx.ModelProto | str | os.PathLike[str], threads: int | None,
                    ) -> ort.InferenceSession:
    """A session with onnxruntime's default graph optimizations and ``threads`` intra-op threads."""
    options = ort.SessionOptions()
    options.log_severity_level = 4
    if threads is not None:
        options.intra_op_num_threads = threads
    if isinstance(model, (str, os.PathLike)):
        return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    proto = model.to_proto() if isinstance(model, Model) else model
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _round_median(session: ort.InferenceSession, feeds: dict[str, np.ndarray], runs: int, warmup: int,
                  tick: Callable[[], float]) -> float:
    (times,) = time_alternating([session], [feeds], rounds=1, runs=runs, warmup=warmup, tick=tick)
    return statistics.median(times)
