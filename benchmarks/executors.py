"""The search's executors: evaluations per minute with 1 and 2 local workers (issue #15's target: 2 give ≥ 1.6×).

The evaluation stands in for a candidate's: from the shared payload (the digits CNN's bytes and its 450 test
images with labels) it rounds every weight to a seeded grid of 16 levels (a numpy pass over the weights),
builds an onnxruntime session through ``nnopt.runtime.make_session`` and runs the test images ``ROUNDS``
times in batches of 32, then scores top-1. CPU-bound, about 0.5 s alone on an idle core. Each round maps
``--items`` evaluations through each executor in turn (interleaved, so a busy machine slows them alike); the
executors are started (and warmed by one map) before the first round, so the figure is the steady rate of a
search, and the pool's start-up is printed apart. Prints medians and the ratio; writes nothing.

    python benchmarks/executors.py [--items 16] [--rounds 5] [--ray ADDRESS]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from nnopt import runtime
from nnopt.search.executors import Executor, ProcessPoolExecutor, RayExecutor, SerialExecutor, available_cores

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"
ROUNDS = 10  # passes over the 450 test images per evaluation: about 0.5 s on one busy core of this machine


def evaluate(shared: dict[str, Any], seed: int) -> tuple[int, float]:
    """(seed, top-1) of the digits CNN with its weights rounded to a seeded 16-level grid."""
    model = onnx.load_from_string(shared["model"])
    rng = np.random.default_rng(seed)
    for init in model.graph.initializer:
        weight = numpy_helper.to_array(init)
        if weight.ndim > 1:
            step = (np.abs(weight).max() / 8) * rng.uniform(0.9, 1.1)
            init.CopyFrom(numpy_helper.from_array((np.round(weight / step) * step).astype(weight.dtype), init.name))
    session = runtime.make_session(model)
    x, labels = shared["x"], shared["labels"]
    correct = 0
    for _ in range(ROUNDS):
        for start in range(0, len(x), 32):
            logits = runtime.run_model(session, {"x": x[start:start + 32]})[0]
            correct += int((logits.argmax(axis=1) == labels[start:start + 32]).sum())
    return seed, correct / (ROUNDS * len(x))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=16, help="evaluations per map")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians over them)")
    parser.add_argument("--ray", metavar="ADDRESS", help="also a Ray cluster at this address")
    args = parser.parse_args(argv)
    shared = {"model": (DIGITS / "digits_cnn.onnx").read_bytes(), "x": np.load(DIGITS / "digits_test.npz")["x"],
              "labels": np.load(DIGITS / "digits_test_labels.npy")}
    items = list(range(args.items))
    executors: dict[str, Executor] = {"serial (--workers 1)": SerialExecutor()}
    started = time.perf_counter()
    # One process with all the cores' threads (what a pool of one would be), one with a single thread (the
    # unit that two workers double), and two workers of a thread each (what --workers 2 runs).
    for workers, threads in ((1, None), (1, 1), (2, None)):
        pool = ProcessPoolExecutor(workers, threads_per_worker=threads)
        executors[f"{workers} process{'es' if workers > 1 else ''} x {pool.threads} thread(s)"] = pool
        pool.map(evaluate, shared, items[:workers])
        print(f"pool of {workers} started and warmed in {time.perf_counter() - started:.2f} s", file=sys.stderr)
        started = time.perf_counter()
    if args.ray:
        executors[f"ray {args.ray}"] = ray = RayExecutor(args.ray)
        ray.map(evaluate, shared, items[: ray.workers])
    times: dict[str, list[float]] = {name: [] for name in executors}
    reference: list[Any] | None = None
    for round_ in range(args.rounds):
        for name, executor in executors.items():
            begun = time.perf_counter()
            results = executor.map(evaluate, shared, items)
            times[name].append(time.perf_counter() - begun)
            if reference is None:
                reference = results
            assert results == reference, f"{name} gave other results"  # same inputs, same results, any executor
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    for executor in executors.values():
        executor.close()
    base = statistics.median(times["serial (--workers 1)"])
    print(f"{args.items} evaluations per map, {args.rounds} interleaved rounds, {available_cores()} cores")
    print(f"{'executor':<34} {'median s':>9} {'s/eval':>7} {'evals/min':>10} {'vs serial':>10}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<34} {median:9.2f} {median / args.items:7.3f} {60 * args.items / median:10.1f} "
              f"{base / median:9.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
