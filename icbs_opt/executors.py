"""Executors: where the block problems of one batch are solved.

An executor takes a backend and a batch of problems with their seeds and returns
the solutions in order, the same as solving them one by one with those seeds.

- ``make_executor()`` or ``make_executor("threads")``: a pool of threads on this
  machine (:meth:`Backend.solve_many <icbs_opt.backends.base.Backend.solve_many>`).
- ``make_executor("dask://HOST:PORT")`` (or ``tcp://HOST:PORT``): the workers of a
  running Dask cluster (``pip install "icbs-opt[dask]"``; docs/cluster.md). Each
  task carries the problem's arrays (``Q``, ``k``, ``x0``, seed) and the backend's
  registry name and parameters; the worker rebuilds the backend with
  ``get_backend(name, **parameters)``, so backend objects are never pickled.

Example:
    >>> from icbs_opt.backends import get_backend
    >>> from icbs_opt.problems import random_problem
    >>> problems = [random_problem(6, seed=i) for i in range(4)]
    >>> with make_executor("threads", workers=2) as executor:
    ...     solutions = executor.solve_many(get_backend("exhaustive"), problems,
    ...                                     seeds=[0, 1, 2, 3])
    >>> executor.description, [s.feasible for s in solutions]
    ('threads (2 workers)', [True, True, True, True])
"""

from __future__ import annotations

import abc
import logging
import os
import re
import socket
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from icbs_opt.backends import Backend, Solution, backend_class, get_backend
from icbs_opt.backends.base import check_batch, check_workers
from icbs_opt.errors import ExecutorError, ExecutorUnavailable
from icbs_opt.problems import BlockProblem

logger = logging.getLogger(__name__)

#: Seconds to wait for a Dask scheduler to answer, and then for a first worker.
CONNECT_TIMEOUT = 5.0
_FORMS = "'threads', 'dask://HOST:PORT' or 'tcp://HOST:PORT'"
_ADDRESS = re.compile(r"^(?:dask|tcp)://(?P<host>\[[^\]]+\]|[^:/\s]+):(?P<port>\d+)$")
_INSTALL = (
    'the Dask executor needs the distributed package; run: pip install "icbs-opt[dask]"'
)

#: Called as ``done(index, solution)`` as each answer of a batch arrives.
Done = Callable[[int, Solution], None]


class Executor(abc.ABC):
    """Solves batches of block problems; a context manager that closes itself.

    Attributes:
        description: What it runs on, e.g. ``"threads (2 workers)"``.
    """

    description: str

    @abc.abstractmethod
    def solve_many(
        self,
        backend: Backend,
        problems: Sequence[BlockProblem],
        seeds: Sequence[int | None],
        x0s: Sequence[np.ndarray | None] | None = None,
        *,
        done: Done | None = None,
    ) -> list[Solution]:
        """Solve ``problems`` with ``backend``; equal to solving one by one.

        Args:
            backend: A configured backend.
            problems: The block problems.
            seeds: One seed per problem.
            x0s: ``None``, or one warm start (or ``None``) per problem.
            done: Called in the calling thread as ``done(index, solution)`` as each
                answer arrives, e.g. to advance a progress bar.

        Returns:
            The solutions, in the order of ``problems``.
        """

    def close(self) -> None:
        """Release what the executor holds (a no-op for threads)."""
        return None

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self.description}>"


class ThreadExecutor(Executor):
    """Threads on this machine, through ``backend.solve_many``.

    Args:
        workers: Threads per batch (an integer >= 1); ``None``: the backend's
            default (``os.cpu_count()``; braket: one per problem).
    """

    def __init__(self, workers: int | None = None):
        self.workers = None if workers is None else _check_workers(workers)
        self.description = (
            f"threads ({self.workers} workers)"
            if self.workers is not None
            else f"threads ({os.cpu_count() or 1} workers; braket: one per problem)"
        )

    def solve_many(
        self,
        backend: Backend,
        problems: Sequence[BlockProblem],
        seeds: Sequence[int | None],
        x0s: Sequence[np.ndarray | None] | None = None,
        *,
        done: Done | None = None,
    ) -> list[Solution]:
        """Solve the batch in threads; see :meth:`Executor.solve_many`."""
        return backend.solve_many(
            problems, seeds=seeds, x0s=x0s, workers=self.workers, done=done
        )


class DaskExecutor(Executor):
    """The workers of a running Dask cluster (``distributed.Client``).

    Every worker needs icbs-opt installed, the same version as here (a task
    checks it), with the extras of the backends it runs.

    Args:
        address: The scheduler, ``"tcp://HOST:PORT"``.
        workers: Most tasks in flight at once (an integer >= 1); ``None``: the
            whole batch (the scheduler spreads it over its workers).
        timeout: Seconds to wait for the scheduler, and then for a first worker.

    Raises:
        ExecutorUnavailable: If ``distributed`` is missing, the scheduler does not
            answer, or it has no workers.
    """

    def __init__(
        self,
        address: str,
        *,
        workers: int | None = None,
        timeout: float = CONNECT_TIMEOUT,
    ):
        distributed = _import_distributed()
        self.address = address
        self.workers = None if workers is None else _check_workers(workers)
        try:
            self.client = distributed.Client(
                address, timeout=timeout, set_as_default=False
            )
        except (OSError, TimeoutError):
            raise ExecutorUnavailable(
                f"cannot reach a Dask scheduler at {address} within {timeout:g} s; "
                f"start one with `dask scheduler` and workers with "
                f"`dask worker {address}`"
            ) from None
        try:
            self.client.wait_for_workers(1, timeout=timeout)
        except (OSError, TimeoutError):
            self.client.close()
            raise ExecutorUnavailable(
                f"the Dask scheduler at {address} has no workers after "
                f"{timeout:g} s; start some with `dask worker {address}`"
            ) from None
        info = self.client.scheduler_info()["workers"]
        threads = sum(w.get("nthreads", 1) for w in info.values())
        self.description = f"{address} ({len(info)} workers, {threads} threads)"
        logger.info("connected to the Dask cluster at %s", self.description)

    def solve_many(
        self,
        backend: Backend,
        problems: Sequence[BlockProblem],
        seeds: Sequence[int | None],
        x0s: Sequence[np.ndarray | None] | None = None,
        *,
        done: Done | None = None,
    ) -> list[Solution]:
        """Solve the batch on the cluster; see :meth:`Executor.solve_many`."""
        problems, seeds, x0s = check_batch(problems, seeds, x0s)
        name, parameters = _portable_spec(backend)
        if not problems:
            return []
        for problem in problems:  # fail here, before anything is sent
            backend.check_size(problem)
        jobs = [
            (p.to_arrays(), None if x is None else np.asarray(x), s)
            for p, s, x in zip(problems, seeds, x0s, strict=True)
        ]
        results: list[Any] = [None] * len(jobs)
        for i, solution in self._run(name, parameters, jobs):
            results[i] = solution
            if done is not None:
                done(i, solution)
        return results

    def _run(
        self, name: str, parameters: dict[str, Any], jobs: list[tuple[Any, ...]]
    ) -> Iterator[tuple[int, Solution]]:
        """Submit the jobs (at most ``workers`` in flight); yield answers as done."""
        from distributed import KilledWorker, as_completed

        from icbs_opt import __version__

        index: dict[str, int] = {}
        pending = iter(enumerate(jobs))
        running = as_completed(loop=self.client.loop)

        def submit_next() -> None:
            i, job = next(pending, (None, None))
            if job is not None:
                future = self.client.submit(
                    _solve_on_worker, __version__, name, parameters, *job, pure=False
                )
                index[future.key] = i
                running.add(future)

        for _ in range(self.workers or len(jobs)):
            submit_next()
        try:
            for future in running:
                yield index[future.key], future.result()
                submit_next()
        except BaseException as exc:  # a failure or Ctrl-C: drop the queued tasks
            self.client.cancel(list(running.futures))
            if isinstance(exc, KilledWorker):
                raise ExecutorUnavailable(
                    f"Dask workers of {self.address} died while solving ({exc}); "
                    "see the workers' logs (memory limit?)"
                ) from None
            raise

    def close(self) -> None:
        """Close the connection to the scheduler (the cluster keeps running)."""
        self.client.close()


def make_executor(
    spec: str | None = None,
    *,
    workers: int | None = None,
    timeout: float = CONNECT_TIMEOUT,
) -> Executor:
    """Return the executor ``spec`` names.

    Args:
        spec: ``None`` or ``"threads"``: threads here; ``"dask://HOST:PORT"`` or
            ``"tcp://HOST:PORT"``: the Dask scheduler at that address.
        workers: Threads, or Dask tasks in flight (an integer >= 1); ``None``:
            the machine's cores for threads (braket: one per problem), the whole
            batch for Dask.
        timeout: Seconds to wait for a Dask scheduler (and a first worker).

    Raises:
        ExecutorError: For an unknown spec or bad ``workers``.
        ExecutorUnavailable: If Dask is needed but missing or unreachable.

    Example:
        >>> make_executor(workers=3).description
        'threads (3 workers)'
        >>> make_executor("mpi://x")
        Traceback (most recent call last):
        ...
        icbs_opt.errors.ExecutorError: unknown executor 'mpi://x'; use 'threads', \
'dask://HOST:PORT' or 'tcp://HOST:PORT'
    """
    if workers is not None:
        workers = _check_workers(workers)
    address = executor_address(spec)
    if address is None:
        return ThreadExecutor(workers)
    return DaskExecutor(address, workers=workers, timeout=timeout)


def executor_address(spec: str | None) -> str | None:
    """The Dask scheduler address ``spec`` names (None: threads), unconnected.

    Raises:
        ExecutorError: For an unknown spec.
        ExecutorUnavailable: If it names Dask and ``distributed`` is missing.
    """
    if spec is None or spec == "threads":
        return None
    match = _ADDRESS.match(spec.strip()) if isinstance(spec, str) else None
    if match is None or not 1 <= int(match["port"]) <= 65535:
        raise ExecutorError(f"unknown executor {spec!r}; use {_FORMS}")
    _import_distributed()
    return f"tcp://{match['host']}:{int(match['port'])}"


def _check_workers(workers: Any) -> int:
    return check_workers(workers, error=ExecutorError)


def _import_distributed() -> Any:
    try:
        import distributed
    except ImportError:
        raise ExecutorUnavailable(_INSTALL) from None
    return distributed


def _portable_spec(backend: Backend) -> tuple[str, dict[str, Any]]:
    """``(name, parameters)`` that rebuild ``backend`` on a worker."""
    if not isinstance(backend, Backend):
        raise ExecutorError(f"expected a Backend, got {type(backend).__name__}")
    if backend_class(backend.name) is not type(backend) or not backend.portable:
        raise ExecutorError(
            f"backend {backend.name!r} cannot be rebuilt on a Dask worker from its "
            "registry name and options (it holds an object such as a device, or its "
            "class is not the registered one); use the threads executor"
        )
    return backend.name, backend.parameters


def _solve_on_worker(
    version: str,
    name: str,
    parameters: dict[str, Any],
    arrays: dict[str, Any],
    x0: np.ndarray | None,
    seed: int | None,
) -> Solution:
    """One Dask task: rebuild the backend and the problem (groups too), then solve."""
    from icbs_opt import __version__

    if version != __version__:
        raise ExecutorUnavailable(
            f"Dask worker {socket.gethostname()} runs icbs-opt {__version__}, the "
            f"client {version}; install the same version on every worker"
        )
    backend = get_backend(name, **parameters)
    return backend.solve(BlockProblem.from_arrays(arrays), seed=seed, x0=x0)
