"""Level 3's joint search on a synthetic problem whose optimum and Pareto front are known by brute force."""

from __future__ import annotations

import itertools
import math
import sys
import time
from collections.abc import Callable

import pytest

from nnopt.errors import InputError
from nnopt.search.candidate import CandidateResult, Configuration, config_key

pytest.importorskip("optuna")

from nnopt.search.joint import FAILED_VIOLATION, joint_search  # noqa: E402

# Six layers, each quantised to a number of bits ("float" = no change): the file shrinks with the bits, the
# accuracy drop is the sum of each layer's sensitivity times the damage its bits do. 6^6 = 46656 configurations.
WEIGHTS = [40_000, 25_000, 16_000, 9_000, 6_000, 4_000]
SENSITIVITY = [0.002, 0.010, 0.004, 0.020, 0.001, 0.008]
BITS = ("float", 8, 6, 4, 3, 2)
DAMAGE = {"float": 0.0, 8: 0.05, 6: 0.2, 4: 0.6, 3: 1.3, 2: 3.0}
PARAMS = {f"layer{i}/weights": BITS for i in range(6)}
BASELINE = 0.98
OVERHEAD = 2_000  # bytes of the file that no choice changes
MAX_DROP = 0.01


def _measure(config: Configuration) -> tuple[int, float]:
    size, drop = OVERHEAD, 0.0
    for i in range(6):
        bits = config.get(f"layer{i}/weights", "float")
        size += WEIGHTS[i] * (32 if bits == "float" else bits) // 32
        drop += SENSITIVITY[i] * DAMAGE[bits]
    return size, drop


def _result(config: Configuration) -> CandidateResult:
    size, drop = _measure(config)
    return CandidateResult(key=config_key(config), config=config, metric=BASELINE - drop, drop=drop, size_bytes=size)


def _all_points() -> list[tuple[int, float]]:
    configs = ({f"layer{i}/weights": b for i, b in enumerate(combo) if b != "float"}
               for combo in itertools.product(BITS, repeat=6))
    return [_measure(c) for c in configs]


def _optimum(max_drop: float) -> int:
    return min(size for size, drop in _all_points() if drop <= max_drop)


def _hypervolume(points: list[tuple[int, float]], max_drop: float) -> float:
    """The area (drop <= max_drop, size <= the float model's) that the points dominate."""
    reference = _measure({})[0]
    area, best, staircase = 0.0, float(reference), []
    for drop, size in sorted((d, s) for s, d in points if d <= max_drop):
        if size < best:
            staircase.append((drop, size))
            best = size
    for i, (drop, size) in enumerate(staircase):
        right = staircase[i + 1][0] if i + 1 < len(staircase) else max_drop
        area += (right - drop) * (reference - size)
    return area


def _search(evaluate: Callable[[list[Configuration]], list[CandidateResult]] | None = None, **options):
    settings = dict(objective="size", max_drop=MAX_DROP, seed=0, deadline=time.monotonic() + 120)
    settings.update(options)
    return joint_search(PARAMS, evaluate or (lambda configs: [_result(c) for c in configs]), **settings)


def _first_within(results: list[CandidateResult], target: float) -> int | None:
    """The number of trials after which the best feasible size is at most ``target``."""
    best = math.inf
    for n, result in enumerate(results, 1):
        if result.feasible(MAX_DROP):
            best = min(best, result.objective("size"))
        if best <= target:
            return n
    return None


def test_tpe_finds_the_brute_force_optimum_within_200_of_46656_configurations():
    optimum = _optimum(MAX_DROP)
    assert optimum == 16_249  # 3, 6, 4, 8, 3 and 8 bits
    reached = {}
    for seed in (0, 1, 2):
        results = _search(seed=seed, max_trials=200)
        assert len(results) == 200 and len({r.key for r in results}) == 200  # never one configuration twice
        reached[seed] = (_first_within(results, 1.2 * optimum), _first_within(results, optimum))
    # Seeds 0-9 with Optuna 5.0.0: within 1.2x after 36 trials (median), the optimum after 128 (at most 183);
    # seeds 0-2: (36, 146), (21, 136), (36, 58).
    assert all(near <= 70 and exact <= 200 for near, exact in reached.values()), reached
    # The same choices as unordered categories: the optimum within 200 trials on 4 seeds of 10, not seeds 0-1.
    for seed in (0, 1):
        categorical = _search(seed=seed, max_trials=200, ordinal=False)
        assert _first_within(categorical, 1.05 * optimum) is None


def test_nsga2_returns_a_pareto_front_close_to_the_true_one():
    true = _hypervolume(_all_points(), MAX_DROP)
    results = _search(sampler="nsga2", max_trials=300)
    from nnopt.search.report import pareto_front

    front = pareto_front(results, "size")
    feasible_front = [r for r in front if r.feasible(MAX_DROP)]
    assert len(feasible_front) >= 10
    ratio = _hypervolume([(r.size_bytes, r.drop) for r in results], MAX_DROP) / true
    tpe_ratio = _hypervolume([(r.size_bytes, r.drop) for r in _search(max_trials=300)], MAX_DROP) / true
    # Measured: NSGA-II 0.947 (median of seeds 0-9) of the true front's area, TPE 0.80: TPE aims at the one best.
    assert ratio >= 0.93 and ratio > tpe_ratio + 0.05, (ratio, tpe_ratio)


@pytest.mark.parametrize("sampler", ["tpe", "nsga2"])
def test_same_seed_same_configurations(sampler):
    first = [r.config for r in _search(sampler=sampler, seed=7, max_trials=60)]
    second = [r.config for r in _search(sampler=sampler, seed=7, max_trials=60)]
    other = [r.config for r in _search(sampler=sampler, seed=8, max_trials=60)]
    assert first == second
    assert first != other


def test_deadline_stops_within_one_round_and_the_rounds_are_a_prefix():
    rounds: list[tuple[float, int]] = []

    def slow(configs):
        rounds.append((time.monotonic(), len(configs)))
        time.sleep(0.05 * len(configs))
        return [_result(c) for c in configs]

    deadline = time.monotonic() + 0.6
    results = _search(slow, deadline=deadline, batch_size=4)
    ended = time.monotonic()
    starts = [start for start, _ in rounds]
    assert starts[-1] < deadline and all(size == 4 for _, size in rounds)
    assert 2 <= len(rounds) <= 4  # 0.2 s rounds in 0.6 s (fewer on a busy machine)
    assert ended - deadline < 0.2 + 0.5  # the round running at the deadline, and slack for a loaded machine
    # Stopped early, the sequence is the start of the one an unhurried run asks for.
    assert [r.key for r in results] == [r.key for r in _search(max_trials=len(results))]


def test_rounds_hold_batch_size_configurations_and_max_trials_cuts_the_last():
    sizes = []

    def evaluate(configs):
        sizes.append(len(configs))
        return [_result(c) for c in configs]

    results = _search(evaluate, batch_size=3, max_trials=10)
    assert sizes == [3, 3, 3, 1] and len(results) == 10


def test_a_small_space_is_searched_once_and_the_search_stops_by_itself():
    params = {"a/prune": (0.0, 0.5), "b/prune": (0.0, 0.5, 0.75)}
    calls = []

    def evaluate(configs):
        calls.extend(config_key(c) for c in configs)
        return [CandidateResult(key=config_key(c), config=c, metric=1.0 - sum(c.values()) / 10, drop=sum(c.values()) / 10,
                                size_bytes=int(100 * (2 - sum(c.values())))) for c in configs]

    started = time.monotonic()
    results = joint_search(params, evaluate, objective="size", max_drop=0.2, seed=0, deadline=started + 60)
    assert len(calls) == len(set(calls)) == 6  # every configuration, each once
    assert {r.key for r in results} == set(calls)
    assert time.monotonic() - started < 10
    # A configuration leaves out the parameters at "no change", so its key is that of levels 1-2's candidate.
    assert {"a/prune": 0.5} in [r.config for r in results] and {} in [r.config for r in results]


def test_failed_candidates_are_told_as_penalties_and_the_search_goes_on():
    def crashy(configs):
        # Layer 3 at 2 bits crashes (e.g. an invalid graph): a result with an error, not an exception.
        return [CandidateResult(key=config_key(c), config=c, metric=None, drop=None, error="boom")
                if c.get("layer3/weights") == 2 else _result(c) for c in configs]

    results = _search(crashy, max_trials=200)
    failed = [r for r in results if r.failed]
    # Told as the worst trials, the sampler steers away from the crash: 3-7 failures in 200 trials on seeds 0-4
    # (a random search: 1 in 6), and the optimum found on 5 of 5 (told as FAIL, which TPE ignores: 3-10 failures,
    # the optimum on 3 of 5).
    assert 0 < len(failed) <= 10
    assert min(r.size_bytes for r in results if r.feasible(MAX_DROP)) == _optimum(MAX_DROP)
    assert FAILED_VIOLATION > 1.0  # worse than any drop a metric in [0, 1] can have


def test_start_is_evaluated_first_and_known_results_are_not_evaluated_again():
    best_of_level_2 = {"layer0/weights": 4, "layer2/weights": 4}
    known = [_result({}), _result({"layer0/weights": 8}), _result({"layer9/prune": 0.5})]  # the last: outside
    evaluated: list[str] = []

    def evaluate(configs):
        evaluated.extend(config_key(c) for c in configs)
        return [_result(c) for c in configs]

    results = _search(evaluate, start=[best_of_level_2], known=known, max_trials=40)
    assert results[0].config == best_of_level_2
    assert not {r.key for r in known} & set(evaluated)
    assert len(evaluated) == 40
    with pytest.raises(ValueError, match="outside the search space"):
        _search(start=[{"layer0/weights": 5}], max_trials=1)


def test_results_in_another_order_are_refused():
    with pytest.raises(ValueError, match="order"):
        _search(lambda configs: [_result(c) for c in reversed(configs)], max_trials=8)
    with pytest.raises(ValueError, match="objective"):
        _search(objective="accuracy", max_trials=1)
    with pytest.raises(ValueError, match="a choice given twice"):
        joint_search({"a/bits": (8, 4, 8)}, lambda configs: [], objective="size", max_drop=0.01, seed=0,
                     deadline=time.monotonic() + 1)


def test_progress_is_reported_and_optuna_stays_quiet(capfd, recwarn):
    seen = []
    results = _search(max_trials=30, on_result=seen.append)
    assert seen == results
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""
    assert not [w for w in recwarn if "optuna" in str(w.filename) or "optuna" in str(w.message).lower()]


def test_without_optuna_one_line_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(InputError, match=r"pip install 'nnopt\[search\]'") as caught:
        _search(max_trials=1)
    assert "\n" not in str(caught.value)
