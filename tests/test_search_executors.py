"""The search's executors: serial, local processes and a real local Ray head give the same results in item order,
send the shared payload once, and turn a dead worker, a buggy function or a bad Ray address into one-line errors."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from nnopt import runtime
from nnopt.errors import InputError
from nnopt.search import executors
from nnopt.search.executors import (
    ExecutorError,
    ProcessPoolExecutor,
    RayExecutor,
    SerialExecutor,
    make_executor,
)

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"

# ---- toy evaluations: module-level, so the workers import them ------------------------------------------


def _digits_shared() -> dict:
    return {"model": (DIGITS / "digits_cnn.onnx").read_bytes(), "x": np.load(DIGITS / "digits_test.npz")["x"][:64]}


def _noisy_digits(shared: dict, seed: int) -> tuple[int, bytes, list[int]]:
    """The digits CNN through onnxruntime on the test images plus seeded noise: (seed, logits' bytes, top-1)."""
    x = shared["x"] + np.random.default_rng(seed).normal(0, 0.2, shared["x"].shape).astype(np.float32)
    session = runtime.make_session(onnx.load_from_string(shared["model"]))
    logits = runtime.run_model(session, {"x": x})[0]
    return seed, logits.tobytes(), logits.argmax(axis=1).tolist()


def _meet(folder: str, item: int) -> int:
    """Writes this process's id into ``folder`` and waits (at most 60 s) until two processes have: proof that
    two workers ran at the same time. Returns the pid."""
    Path(folder, str(os.getpid())).touch()
    deadline = time.monotonic() + 60
    while len(os.listdir(folder)) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    return os.getpid()


def _raise_on_two(shared: object, item: int) -> int:
    if item == 2:
        raise ValueError("boom\nsecond line")
    return item


def _raise_input_error(shared: object, item: int) -> int:
    raise InputError("the metric raised ZeroDivisionError")


def _die(shared: object, item: int) -> int:
    if item == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # what the OS's OOM killer does
    return item


def _thread_settings(shared: object, item: int) -> tuple[int | None, str | None]:
    return runtime._SESSION_THREADS, os.environ.get("OMP_NUM_THREADS")


#: In a worker: how many times a _Payload was unpickled there.
_UNPICKLED = 0


class _Payload:
    """A shared payload that counts its pickling (in this process) and its unpickling (in each worker)."""

    pickled = 0

    def __init__(self, value: int) -> None:
        self.value = value

    def __getstate__(self) -> dict:
        type(self).pickled += 1
        return {"value": self.value}

    def __setstate__(self, state: dict) -> None:
        global _UNPICKLED
        _UNPICKLED += 1
        self.value = state["value"]


def _payload_use(shared: _Payload, item: int) -> tuple[int, int, int]:
    return shared.value + item, _UNPICKLED, os.getpid()


# ---- serial and local processes ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool():
    with ProcessPoolExecutor(2) as executor:
        yield executor


def test_process_pool_matches_serial_byte_for_byte_in_item_order(pool):
    shared = _digits_shared()
    seeds = [5, 3, 8, 1, 0, 7]
    serial = SerialExecutor().map(_noisy_digits, shared, seeds)
    parallel = pool.map(_noisy_digits, shared, seeds)
    assert [r[0] for r in parallel] == seeds
    assert parallel == serial
    # The noise is real: the seeds give different logits, and the model still reads most digits.
    assert len({r[1] for r in serial}) == len(seeds)
    labels = np.load(DIGITS / "digits_test_labels.npy")[:64]
    assert all(np.mean(np.array(r[2]) == labels) > 0.8 for r in serial)


def test_process_pool_runs_two_workers_at_once(pool, tmp_path):
    pids = pool.map(_meet, str(tmp_path), list(range(4)))
    assert len(set(pids)) == 2 and os.getpid() not in pids
    assert len(os.listdir(tmp_path)) == 2


def test_process_pool_sends_the_shared_payload_once_per_pool():
    _Payload.pickled = 0
    payload = _Payload(100)
    with ProcessPoolExecutor(2) as executor:
        first = executor.map(_payload_use, payload, list(range(8)))
        second = executor.map(_payload_use, payload, list(range(8)))
        assert _Payload.pickled == 1 and executor.pools_started == 1
        # Each worker unpickled it once, whatever the number of items it ran.
        assert [r[0] for r in first + second] == [100 + i for i in range(8)] * 2
        assert {r[1] for r in first + second} == {1}
        # Another payload (by identity, even if equal) starts another pool, which receives it.
        third = executor.map(_payload_use, _Payload(100), [0, 1])
        assert executor.pools_started == 2 and _Payload.pickled == 2
        assert [r[0] for r in third] == [100, 101] and {r[2] for r in third}.isdisjoint({r[2] for r in first})


def test_workers_share_the_cores_and_the_parent_keeps_onnxruntime_defaults(pool):
    settings = pool.map(_thread_settings, None, [0, 1, 2])
    expected = max(1, executors.available_cores() // 2)
    assert pool.threads == expected
    assert settings == [(expected, str(expected))] * 3
    assert runtime._SESSION_THREADS is None


def test_session_threads_setting_reaches_new_sessions_only_when_set():
    model = onnx.load(DIGITS / "digits_cnn.onnx")
    assert runtime.make_session(model).get_session_options().intra_op_num_threads == 0  # onnxruntime's default
    runtime.set_session_threads(1)
    try:
        assert runtime.make_session(model).get_session_options().intra_op_num_threads == 1
    finally:
        runtime.set_session_threads(None)
    with pytest.raises(ValueError):
        runtime.set_session_threads(0)


def test_on_result_sees_every_item_once(pool):
    seen: dict[int, int] = {}
    results = pool.map(_raise_on_two, None, [0, 1, 3, 4], on_result=seen.__setitem__)
    assert results == [0, 1, 3, 4] and seen == {0: 0, 1: 1, 2: 3, 3: 4}
    seen.clear()
    assert SerialExecutor().map(_raise_on_two, None, [7, 9], on_result=seen.__setitem__) == [7, 9]
    assert seen == {0: 7, 1: 9}


@pytest.mark.parametrize("make", [SerialExecutor, lambda: ProcessPoolExecutor(2)], ids=["serial", "processes"])
def test_a_foreign_exception_is_an_executor_error_and_nnopt_errors_pass_through(make):
    with make() as executor:
        with pytest.raises(ExecutorError, match=r"^evaluation 2 raised ValueError: boom$"):
            executor.map(_raise_on_two, None, [0, 1, 2, 3])
        with pytest.raises(InputError, match=r"^the metric raised ZeroDivisionError$"):
            executor.map(_raise_input_error, None, [0, 1])
        # The executor still works after a failed map.
        assert executor.map(_raise_on_two, None, [0, 1]) == [0, 1]


def test_a_killed_worker_is_a_one_line_error_not_a_hang():
    with ProcessPoolExecutor(2) as executor:
        started = time.monotonic()
        with pytest.raises(ExecutorError, match="worker process died") as caught:
            executor.map(_die, None, [0, 1, 2, 3])
        assert time.monotonic() - started < 60
        assert "\n" not in str(caught.value)
        # A new pool replaces the broken one.
        assert executor.map(_die, None, [0, 2]) == [0, 2]


def test_make_executor_picks_by_workers_and_rejects_none_left():
    assert isinstance(make_executor(1), SerialExecutor)
    with make_executor(2) as executor:
        assert isinstance(executor, ProcessPoolExecutor) and executor.workers == 2 and executor.name == "processes"
    with make_executor(None) as executor:
        assert executor.workers == executors.available_cores()
    with pytest.raises(InputError, match="at least 1"):
        make_executor(0)
    assert SerialExecutor().map(_raise_on_two, None, []) == []


# ---- Ray --------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_missing_ray_is_a_one_line_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(InputError, match=r"^--ray needs Ray: pip install 'nnopt\[ray\]'$"):
        make_executor(2, "127.0.0.1:6379")


def test_unreachable_ray_address_fails_within_seconds():
    pytest.importorskip("ray")
    address = f"127.0.0.1:{_free_port()}"
    started = time.monotonic()
    with pytest.raises(InputError, match=f"^cannot reach a Ray cluster at {address}: ") as caught:
        RayExecutor(address)
    assert time.monotonic() - started < 5
    assert "\n" not in str(caught.value)


_OPEN_PORT_SCRIPT = """
import socket, sys, time
from nnopt.errors import InputError
from nnopt.search.executors import RayExecutor
server = socket.socket()
server.bind(("0.0.0.0", 0))
server.listen(8)  # accepts connections, answers nothing: no Ray cluster
started = time.monotonic()
try:
    RayExecutor(f"127.0.0.1:{server.getsockname()[1]}")
except InputError as exc:
    print(f"{time.monotonic() - started:.1f}|{exc}")
"""


@pytest.mark.ray
def test_a_port_that_is_no_ray_cluster_fails_in_seconds_not_minutes():
    pytest.importorskip("ray")
    # A fresh interpreter: Ray reads the settings that shorten its retries when it is first imported.
    done = subprocess.run([sys.executable, "-c", _OPEN_PORT_SCRIPT], capture_output=True, text=True, timeout=120)
    seconds, message = done.stdout.strip().split("|", 1)
    assert message.startswith("cannot connect to the Ray cluster at 127.0.0.1:") and "\n" not in message
    assert float(seconds) < 30  # Ray's own retries: about 12 minutes


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head of 2 CPUs on 127.0.0.1, started for these tests alone (its own temp dir) and stopped after."""
    ray = pytest.importorskip("ray")
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="nnopt-ray-")  # short: Ray's socket paths live under it
    command = [
        str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
        f"--port={port}", "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
        f"--temp-dir={temp_dir}", "--object-store-memory=200000000",
    ]
    # --block keeps `ray start` in the foreground: stopping that one process stops this head's processes
    # and no other (`ray stop` would stop every Ray on the machine).
    head = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and head.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail("the local Ray head did not start")
        # The workers cannot import tests/ (not on their path): pickle this module's functions by value.
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        yield head, f"127.0.0.1:{port}"
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)  # the group `ray start` leads: only this head's processes
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_executor(ray_head):
    with RayExecutor(ray_head[1]) as executor:
        yield executor


@pytest.mark.ray
def test_ray_matches_the_process_pool_byte_for_byte_in_item_order(ray_executor, pool):
    assert ray_executor.workers == 2 and ray_executor.name == "ray"
    shared = _digits_shared()
    seeds = [5, 3, 8, 1, 0, 7]
    assert ray_executor.map(_noisy_digits, shared, seeds) == pool.map(_noisy_digits, shared, seeds)


@pytest.mark.ray
def test_ray_runs_two_tasks_at_once(ray_executor, tmp_path):
    pids = ray_executor.map(_meet, str(tmp_path), list(range(4)))
    assert len(set(pids)) == 2 and os.getpid() not in pids


@pytest.mark.ray
def test_ray_puts_the_shared_payload_once(ray_executor, monkeypatch):
    import ray

    puts = []
    real_put = ray.put
    monkeypatch.setattr(ray, "put", lambda value, **kw: puts.append(value) or real_put(value, **kw))
    _Payload.pickled = 0
    payload = _Payload(10)
    first = ray_executor.map(_payload_use, payload, list(range(6)))
    second = ray_executor.map(_payload_use, payload, list(range(6)), on_result=lambda i, r: None)
    assert [r[0] for r in first] == [r[0] for r in second] == [10 + i for i in range(6)]
    assert len(puts) == 1 and puts[0] is payload and _Payload.pickled == 1
    ray_executor.map(_payload_use, _Payload(10), [0])
    assert len(puts) == 2


@pytest.mark.ray
def test_ray_errors_are_the_same_as_local_ones(ray_executor):
    with pytest.raises(ExecutorError, match=r"^evaluation 2 raised ValueError: boom$"):
        ray_executor.map(_raise_on_two, None, [0, 1, 2, 3])
    with pytest.raises(InputError, match=r"^the metric raised ZeroDivisionError$"):
        ray_executor.map(_raise_input_error, None, [0, 1])
    with pytest.raises(ExecutorError, match="worker or node died") as caught:
        ray_executor.map(_die, None, [0, 1, 2])
    assert "\n" not in str(caught.value)
    assert ray_executor.map(_raise_on_two, None, [0, 1]) == [0, 1]


@pytest.mark.ray
def test_closing_a_ray_executor_disconnects_but_leaves_the_cluster(ray_head):
    import ray

    head, address = ray_head
    # The module's executor is connected: a second one shares the connection and its close keeps it.
    with make_executor(None, address) as executor:
        assert isinstance(executor, RayExecutor) and executor.map(_raise_on_two, None, [4]) == [4]
    assert ray.is_initialized()
    ray.shutdown()
    with RayExecutor(address) as executor:
        assert executor.map(_raise_on_two, None, [5]) == [5]
    assert not ray.is_initialized() and head.poll() is None
    socket.create_connection(("127.0.0.1", int(address.rsplit(":", 1)[1])), timeout=5).close()
