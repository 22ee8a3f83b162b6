"""Where a search's evaluations run: in this process, in a pool of local processes, or as tasks on a Ray cluster."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import multiprocessing
import os
import pickle
import signal
import socket
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from types import TracebackType
from typing import Any, Protocol, TypeVar

from nnopt.errors import InputError, NnoptError, first_line

S = TypeVar("S")
T = TypeVar("T")
R = TypeVar("R")

#: Called with (item index, result) as each result arrives, in completion order: progress, partial saves.
OnResult = Callable[[int, Any], None]

#: How long ``RayExecutor`` waits for the cluster's port to accept a connection. ``ray.init`` on a dead
#: address retries for many minutes (20 attempts of about 35 s each, in Ray 2.60).
RAY_CONNECT_TIMEOUT_S = 5.0

#: Ray's settings (environment variables it reads when it is imported and when ``ray.init`` connects) that
#: make a port that accepts connections but is no Ray cluster (a dashboard's, a typo's) fail in about 12 s,
#: not 12 minutes: one attempt, of a few seconds. A variable the user set is left as it is; none applies
#: when Ray was imported before the executor.
_RAY_CONNECT_ENV = {
    "RAY_gcs_server_port_wait_time_s": "1",  # attempts to reach the cluster (default 20)
    "RAY_gcs_rpc_server_connect_timeout_s": "3",
    "RAY_py_gcs_connect_timeout_s": "5",  # waiting for the cluster's id (default 30 s)
}

#: A Ray task whose worker died (a node lost, the OS's OOM killer) is run once more: a lost node is
#: worth a retry, a candidate that exhausts memory every time is not worth three (Ray's default).
RAY_TASK_RETRIES = 1

# Workers start from a fork server, not by forking this process: onnxruntime's and OpenMP's thread pools do
# not survive a fork of a process that has run them, and the fork server has run nothing (it imports
# _PRELOAD, which starts no thread pool of onnxruntime's; OpenBLAS's handles the fork). Rather than "spawn":
# each spawned worker starts a fresh interpreter that imports numpy, onnx and onnxruntime itself, where
# forked workers find them imported. Measured here (2 workers, 2 busy cores, a task that runs onnxruntime;
# medians of 5 fresh runs, alternated): the first pool gave its results after 1.41 s with the fork server,
# 2.72 s with spawn; a second pool in the same process (a new shared payload) 0.11 s against 2.79 s.
_START_METHOD = "forkserver"
#: Imported once by the fork server. "__main__" too (what Python 3.14's default does): a function defined
#: in the main script must be importable in the workers.
_PRELOAD = ["__main__", "nnopt.runtime"]


class ExecutorError(NnoptError):
    """The infrastructure failed: a worker process died, or the evaluated function raised an exception that
    is not one of nnopt's (a bug: the evaluator records a candidate's own failure in its result)."""


class Executor(Protocol):
    """Maps a pure, picklable, module-level function over items, wherever the work runs.

    ``map(fn, shared, items)`` returns ``[fn(shared, item) for item in items]``, in item order, whichever
    executor runs it; ``shared`` is the large read-only payload (model, data, settings) every call gets,
    sent to each worker once, not with every item. An ``NnoptError`` the function raises propagates as it
    is; any other exception, and a worker that dies, raise ``ExecutorError``.
    """

    workers: int
    name: str

    def map(
        self, fn: Callable[[S, T], R], shared: S, items: Sequence[T], *, on_result: OnResult | None = None
    ) -> list[R]: ...

    def close(self) -> None: ...

    def __enter__(self) -> Executor: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


class _Closing:
    """Context-manager behaviour shared by the executors: ``with make_executor(...) as ex:`` closes it."""

    def close(self) -> None:
        """Release workers and connections; the executor is not used again."""

    def __enter__(self: Any) -> Any:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _unexpected(exc: BaseException, index: int) -> NnoptError:
    """The error the caller sees for an exception the evaluated function raised on item ``index``."""
    if isinstance(exc, NnoptError):
        return exc
    return ExecutorError(f"evaluation {index} raised {type(exc).__name__}: {first_line(exc, 300)}")


class SerialExecutor(_Closing):
    """Evaluations one after another in this process: no copies, onnxruntime's default threads."""

    name = "serial"
    workers = 1

    def map(
        self, fn: Callable[[S, T], R], shared: S, items: Sequence[T], *, on_result: OnResult | None = None
    ) -> list[R]:
        results: list[R] = []
        for index, item in enumerate(items):
            try:
                result = fn(shared, item)
            except Exception as exc:  # boundary: the same error whichever executor runs the function
                error = _unexpected(exc, index)
                if error is exc:
                    raise
                raise error from exc
            results.append(result)
            if on_result is not None:
                on_result(index, result)
        return results


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


# ---- the local process pool ---------------------------------------------------------------------------

#: In a pool's worker process: the shared payload, unpickled once by ``_init_worker``.
_SHARED: Any = None


def _init_worker(payload: bytes, threads: int) -> None:
    """A pool worker's start: limit its threads to its share of the cores, then unpickle the shared payload."""
    global _SHARED
    # The parent handles Ctrl-C (it stops the pool); a worker interrupted while idle would print a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # OpenMP runtimes read this when they load (scikit-learn's k-means loads one later); threadpoolctl
    # limits the ones already loaded (numpy's BLAS); onnxruntime takes its thread count per session.
    os.environ["OMP_NUM_THREADS"] = str(threads)
    from threadpoolctl import threadpool_limits

    from nnopt import runtime

    threadpool_limits(limits=threads)
    runtime.set_session_threads(threads)
    _SHARED = pickle.loads(payload)


def _call_in_worker(fn: Callable[[Any, T], R], index: int, item: T) -> R:
    """One evaluation in a pool worker. A foreign exception becomes an ExecutorError here, so that what
    crosses back is always picklable and says what it was."""
    try:
        return fn(_SHARED, item)
    except NnoptError:
        raise
    except Exception as exc:  # boundary: any exception of the evaluated function
        raise _unexpected(exc, index) from exc


class ProcessPoolExecutor(_Closing):
    """Evaluations in ``workers`` local processes (from a fork server), each using its share of the cores.

    The shared payload is pickled once per pool and unpickled once in each worker (the pool's initializer);
    a ``map`` with a different shared object (by identity) starts a new pool.
    """

    name = "processes"

    def __init__(self, workers: int, *, threads_per_worker: int | None = None) -> None:
        """
        Args:
            workers: processes that evaluate at once (at least 1).
            threads_per_worker: onnxruntime and OpenMP threads in each; default the cores divided among
                the workers (at least 1), so that two workers on two cores do not run four threads.
        """
        if workers < 1:
            raise InputError(f"the number of workers must be at least 1, got {workers}")
        self.workers = workers
        self.threads = threads_per_worker or max(1, available_cores() // workers)
        self._pool: cf.ProcessPoolExecutor | None = None
        self._shared: Any = None
        self.pools_started = 0  # how many times a pool (and the shared payload's copy) was made

    def _pool_for(self, shared: Any) -> cf.ProcessPoolExecutor:
        if self._pool is not None and self._shared is shared:
            return self._pool
        self._stop(wait=True)
        # Pickled here, once: the initializer's argument is then plain bytes, copied to each worker as it starts.
        payload = pickle.dumps(shared, protocol=pickle.HIGHEST_PROTOCOL)
        context = multiprocessing.get_context(_START_METHOD)
        if _START_METHOD == "forkserver":
            context.set_forkserver_preload(_PRELOAD)  # no effect once this process's fork server runs
        self._pool = cf.ProcessPoolExecutor(
            self.workers, mp_context=context,
            initializer=_init_worker, initargs=(payload, self.threads),
        )
        self._shared = shared  # kept alive, so that identity compares this object and not a recycled id
        self.pools_started += 1
        return self._pool

    def map(
        self, fn: Callable[[S, T], R], shared: S, items: Sequence[T], *, on_result: OnResult | None = None
    ) -> list[R]:
        if not items:
            return []
        pool = self._pool_for(shared)
        futures = [pool.submit(_call_in_worker, fn, index, item) for index, item in enumerate(items)]
        try:
            return _collect(futures, on_result)
        except BrokenProcessPool as exc:
            self._stop(wait=False)
            raise ExecutorError(
                "a search worker process died (killed by the operating system, out of memory?): "
                f"{first_line(exc, 200)}"
            ) from exc
        except BaseException:
            # Another item's error, or Ctrl-C: the queued evaluations are not wanted any more.
            for future in futures:
                future.cancel()
            self._stop(wait=False, terminate=True)
            raise

    def _stop(self, *, wait: bool, terminate: bool = False) -> None:
        pool, self._pool, self._shared = self._pool, None, None
        if pool is None:
            return
        if terminate:
            # Running evaluations would otherwise hold the exit until they finish (Python 3.14 has
            # terminate_workers(); before it the pool's processes are only reachable as _processes).
            for process in list((getattr(pool, "_processes", None) or {}).values()):
                process.terminate()
        pool.shutdown(wait=wait, cancel_futures=True)

    def close(self) -> None:
        self._stop(wait=True)


def _collect(futures: list[cf.Future[R]], on_result: OnResult | None) -> list[R]:
    """The futures' results in their order; ``on_result`` sees each as it completes."""
    if on_result is not None:
        index_of = {id(future): index for index, future in enumerate(futures)}
        for future in cf.as_completed(futures):
            on_result(index_of[id(future)], future.result())
    return [future.result() for future in futures]


# ---- Ray ------------------------------------------------------------------------------------------------


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise InputError("--ray needs Ray: pip install 'nnopt[ray]'") from exc
    return ray


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a Ray address such as ``10.0.0.5:6379`` or ``ray://head:10001``; None for "auto"."""
    rest = address.split("://", 1)[-1]
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def check_reachable(address: str, timeout: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """Fail in seconds, with one line, when nothing accepts connections at a Ray address's host and port.

    Raises:
        InputError: the address is unreachable (refused, unknown host, or no answer within ``timeout``).
    """
    host_port = _host_port(address)
    if host_port is None:
        return
    try:
        socket.create_connection(host_port, timeout=timeout).close()
    except OSError as exc:
        reason = "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or first_line(exc))
        raise InputError(f"cannot reach a Ray cluster at {address}: {reason}") from exc


@contextlib.contextmanager
def _environment(defaults: dict[str, str]) -> Iterator[None]:
    """Within the block, the environment variables of ``defaults`` that are not set have those values."""
    added = [name for name in defaults if name not in os.environ]
    os.environ.update({name: defaults[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def _call_on_ray(fn: Callable[[Any, T], R], shared: Any, index: int, item: T) -> R:
    """One evaluation as a Ray task of one CPU; ``shared`` arrives resolved from the object store."""
    from nnopt import runtime

    runtime.set_session_threads(1)  # the task holds one of the node's CPUs; Ray sets OMP_NUM_THREADS to match
    try:
        return fn(shared, item)
    except NnoptError:
        raise
    except Exception as exc:  # boundary: any exception of the evaluated function
        raise _unexpected(exc, index) from exc


class RayExecutor(_Closing):
    """Evaluations as Ray tasks (one CPU each) on the cluster at ``address``; the shared payload is put in
    Ray's object store once per distinct object, and every task takes its reference.

    nnopt (and whatever the evaluated function imports) must be installed on every node. A cluster this
    executor connects to is never stopped: ``close`` only disconnects.
    """

    name = "ray"

    def __init__(self, address: str, *, connect_timeout: float = RAY_CONNECT_TIMEOUT_S) -> None:
        """
        Raises:
            InputError: Ray is not installed, or nothing answers at ``address`` within ``connect_timeout``.
        """
        # Around the import too: Ray's C++ core reads its settings when the module loads.
        with _environment(_RAY_CONNECT_ENV):
            ray = _import_ray()
            check_reachable(address, connect_timeout)
            self._connected_here = not ray.is_initialized()
            if self._connected_here:
                try:
                    # Quiet: the workers' output and Ray's INFO lines would bury the search's progress on stderr.
                    ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
                except Exception as exc:  # boundary: Ray raises its own (and builtin) types when it cannot connect
                    raise InputError(
                        f"cannot connect to the Ray cluster at {address}: {first_line(exc, 200)}"
                    ) from exc
        self.address = address
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._ray = ray
        self._task = ray.remote(num_cpus=1, max_retries=RAY_TASK_RETRIES)(_call_on_ray)
        self._shared: Any = None
        self._ref: Any = None
        self.puts = 0  # how many times a shared payload was put in the object store

    def _ref_for(self, shared: Any) -> Any:
        if self._ref is None or self._shared is not shared:
            self._ref = self._ray.put(shared)
            self._shared = shared
            self.puts += 1
        return self._ref

    def map(
        self, fn: Callable[[S, T], R], shared: S, items: Sequence[T], *, on_result: OnResult | None = None
    ) -> list[R]:
        if not items:
            return []
        ref = self._ref_for(shared)
        refs = [self._task.remote(fn, ref, index, item) for index, item in enumerate(items)]
        try:
            if on_result is not None:
                self._report_as_completed(refs, on_result)
            return list(self._ray.get(refs))
        except self._ray.exceptions.RayTaskError as exc:
            self._cancel(refs)
            cause = getattr(exc, "cause", None)
            if isinstance(cause, NnoptError):
                raise cause from None
            raise ExecutorError(f"a Ray task failed: {first_line(cause or exc, 300)}") from exc
        except self._ray.exceptions.RayError as exc:
            self._cancel(refs)
            raise ExecutorError(f"a Ray worker or node died: {first_line(exc, 300)}") from exc
        except BaseException:
            self._cancel(refs)
            raise

    def _report_as_completed(self, refs: list[Any], on_result: OnResult) -> None:
        index_of = {ref: index for index, ref in enumerate(refs)}
        pending = list(refs)
        while pending:
            done, pending = self._ray.wait(pending, num_returns=1)
            for ref in done:
                on_result(index_of[ref], self._ray.get(ref))

    def _cancel(self, refs: list[Any]) -> None:
        for ref in refs:
            try:
                self._ray.cancel(ref, force=False)
            except Exception:  # boundary: a finished or failed task cannot be cancelled; nothing to do
                pass

    def close(self) -> None:
        self._ref = self._shared = None
        if self._connected_here and self._ray.is_initialized():
            self._ray.shutdown()  # this driver's connection; the cluster keeps running
        self._connected_here = False


def make_executor(workers: int | None = None, ray_address: str | None = None) -> Executor:
    """The executor for ``--workers`` and ``--ray``: Ray when an address is given (``workers`` is then the
    cluster's CPUs), else a process pool of ``workers`` (None: the available cores), serial for one.

    Raises:
        InputError: ``workers`` below 1; Ray missing or unreachable.
    """
    if ray_address is not None:
        return RayExecutor(ray_address)
    count = available_cores() if workers is None else workers
    if count < 1:
        raise InputError(f"--workers must be at least 1, got {count}")
    return SerialExecutor() if count == 1 else ProcessPoolExecutor(count)

