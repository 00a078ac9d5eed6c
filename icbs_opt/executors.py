"""Executors: where the block problems of one batch are solved.

An executor takes a backend and a batch of problems with their seeds and returns
the solutions in order, the same as solving them one by one with those seeds.

- ``make_executor()`` or ``make_executor("threads")``: a pool of threads on this
  machine (:class:`ThreadExecutor`; :func:`solve_many` for short).
- ``make_executor("dask://HOST:PORT")`` (or ``tcp://HOST:PORT``): the workers of a
  running Dask cluster (``pip install "icbs-opt[dask]"``; docs/cluster.md). Each
  task carries the problem's arrays (``BlockProblem.to_arrays()``, groups
  included), ``x0``, the seed, and the backend's registry name and parameters;
  the worker rebuilds the backend with ``get_backend(name, **parameters)``, so
  backend objects are never pickled.

This module is the only place where problems are solved concurrently: backends
only ``solve`` one problem (with :meth:`Backend.in_batch` to configure a batch).
Every answer is checked against its problem here, wherever it was solved
(:func:`checked_answer`). While solves run side by side, numpy's BLAS runs on one
thread (:func:`one_blas_thread`).

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
import contextlib
import dataclasses
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from icbs_opt.backends import Backend, Solution, backend_class, get_backend
from icbs_opt.backends.base import check_seed
from icbs_opt.checks import check_int
from icbs_opt.errors import ExecutorError, ExecutorUnavailable, ProblemError
from icbs_opt.problems import BlockProblem

logger = logging.getLogger(__name__)

#: Seconds to wait for a Dask scheduler to answer, and then for a first worker.
CONNECT_TIMEOUT = 5.0
#: Seconds a batch waits on a Dask cluster left with no workers before it fails.
LOST_TIMEOUT = 30.0
#: Seconds between looks for finished Dask tasks.
POLL_SECONDS = 0.01
_FORMS = "'threads', 'dask://HOST:PORT' or 'tcp://HOST:PORT'"
_ADDRESS = re.compile(r"^(?:dask|tcp)://(?P<host>\[[^\]]+\]|[^:/\s]+):(?P<port>\d+)$")
_INSTALL = (
    'the Dask executor needs the distributed package; run: pip install "icbs-opt[dask]"'
)

#: Called as ``done(index, solution)`` as each answer of a batch arrives.
Done = Callable[[int, Solution], None]
#: One batch of solves: the problems, their seeds and their warm starts.
Batch = tuple[list[BlockProblem], list[int | None], list[Any]]


class Executor(abc.ABC):
    """Solves batches of block problems; a context manager that closes itself.

    Subclasses implement :meth:`_solve`, which yields the backend's answers as
    they arrive; :meth:`solve_many` checks the batch, checks every answer
    against its problem here (energy and feasibility recomputed, never taken
    from where it was solved) and calls ``done``.

    Attributes:
        description: What it runs on, e.g. ``"threads (2 workers)"``.
    """

    description: str

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
                answer arrives (in completion order), e.g. for a progress bar.

        Returns:
            The solutions, in the order of ``problems``, each with ``energy`` and
            ``feasible`` recomputed from its problem.

        Raises:
            ProblemError: If ``seeds`` or ``x0s`` has not one entry per problem,
                or for what :meth:`Backend.solve` raises (the first failure; the
                queued solves are then dropped, as they are on Ctrl-C).
            ExecutorError: If an answer is not a 0/1 vector of the problem's size.
        """
        batch = check_batch(problems, seeds, x0s)
        results: list[Any] = [None] * len(batch[0])
        with contextlib.closing(self._solve(backend, batch)) as answers:
            for i, answer in answers:
                results[i] = checked_answer(batch[0][i], answer, i)
                if done is not None:
                    done(i, results[i])
        return results

    @abc.abstractmethod
    def _solve(self, backend: Backend, batch: Batch) -> Iterator[tuple[int, Any]]:
        """Yield ``(index, answer)`` for every problem of ``batch``, as they arrive.

        Closing the generator early (a failure or Ctrl-C in the caller) drops the
        solves not yet done.
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
    """Threads on this machine; one thread: serially in the calling thread.

    Each batch runs through :meth:`Backend.in_batch` (native: one stop flag per
    batch, one OpenMP thread per solve when several run side by side). Threads
    give real speed-up where a backend releases the GIL (native) or waits on a
    device (braket).

    Args:
        workers: Threads per batch (an integer >= 1); ``None``: the backend's
            :meth:`Backend.batch_threads` (``os.cpu_count()``; braket: one per
            problem).
    """

    def __init__(self, workers: int | None = None):
        self.workers = None if workers is None else _check_workers(workers)
        self.description = (
            f"threads ({self.workers} workers)"
            if self.workers is not None
            else f"threads ({os.cpu_count() or 1} workers; braket: one per problem)"
        )

    def _solve(self, backend: Backend, batch: Batch) -> Iterator[tuple[int, Any]]:
        jobs = list(zip(*batch, strict=True))
        threads = self.workers or backend.batch_threads(len(jobs))
        threads = min(threads, max(len(jobs), 1))
        with backend.in_batch(threads) as solver:
            if threads == 1:
                for i, (problem, seed, x0) in enumerate(jobs):
                    yield i, solver.solve(problem, seed=seed, x0=x0)
            else:
                with one_blas_thread():
                    yield from _in_threads(solver, jobs, threads)


def one_blas_thread() -> contextlib.AbstractContextManager:
    """Numpy's BLAS on one thread, for the whole process, until the block ends.

    For work that is already parallel (solves side by side, or solves beside the
    pruner's torch work): BLAS threads of one small product each would wait for
    cores the others hold, which made a pass of 128 SmolLM2 blocks spend 3 s in
    ``x^T Q x`` on 2 cores (docs/benchmarks.md, issue 20). Torch's own threads
    are left as they are.
    """
    return threadpool_limits(limits=1, user_api="blas")


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Torch's intra-op threads set to ``threads`` (None: unchanged) in the block.

    For small products, where more threads only wait on each other: the
    pruner builds problems on one thread while a chunk is solved beside it
    (waiting threads would hold the solver's cores), and the digits MLP trains
    on one.
    """
    if threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _in_threads(
    solver: Backend, jobs: list[tuple[BlockProblem, int | None, Any]], threads: int
) -> Iterator[tuple[int, Solution]]:
    """Solve ``jobs`` in a pool of ``threads``; yield answers as they finish."""
    pool = ThreadPoolExecutor(threads, thread_name_prefix=f"icbs-{solver.name}")
    try:
        futures = {
            pool.submit(solver.solve, problem, seed=seed, x0=x0): i
            for i, (problem, seed, x0) in enumerate(jobs)
        }
        for future in as_completed(futures):
            yield futures[future], future.result()
    except BaseException:  # a failure, Ctrl-C or an early close: drop the queue
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


class DaskExecutor(Executor):
    """The workers of a running Dask cluster (``distributed.Client``).

    Every worker needs icbs-opt installed, the same version as here (a task
    checks it), with the extras of the backends it runs.

    Args:
        address: The scheduler, ``"tcp://HOST:PORT"``.
        workers: Most tasks in flight at once (an integer >= 1); ``None``: the
            whole batch (the scheduler spreads it over its workers).
        timeout: Seconds to wait for the scheduler, and then for a first worker.
        lost_timeout: Seconds a batch waits while the cluster has no workers
            (all killed or retired) before it fails with
            :class:`~icbs_opt.errors.ExecutorUnavailable`.

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
        lost_timeout: float = LOST_TIMEOUT,
    ):
        distributed = _import_distributed()
        self.address, self.lost_timeout = address, lost_timeout
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

    def _solve(self, backend: Backend, batch: Batch) -> Iterator[tuple[int, Any]]:
        problems, seeds, x0s = batch
        name, parameters = _portable_spec(backend)
        for problem in problems:  # fail here, before anything is sent
            backend.check_size(problem)
        jobs = [
            (p.to_arrays(), None if x is None else np.asarray(x), s)
            for p, s, x in zip(problems, seeds, x0s, strict=True)
        ]
        if jobs:
            yield from self._run(name, parameters, jobs)

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
            for future in self._arrivals(running):
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

    def _arrivals(self, running: Any) -> Iterator[Any]:
        """The futures of ``running`` as they finish.

        Raises:
            ExecutorUnavailable: When the cluster has had no workers for
                ``lost_timeout`` seconds (Dask itself would wait forever).
        """
        since = None  # when the cluster was first seen without workers
        last_look = time.monotonic()
        while not running.is_empty():
            if running.has_ready():
                yield from running.next_batch(block=False)
                since = None
                continue
            time.sleep(POLL_SECONDS)
            now = time.monotonic()
            if now - last_look < 1.0:
                continue
            last_look = now
            if self.client.nthreads():
                since = None
            elif since is None:
                since = now
            elif now - since >= self.lost_timeout:
                raise ExecutorUnavailable(
                    f"the Dask cluster at {self.address} has had no workers for "
                    f"{self.lost_timeout:g} s while block problems were waiting; "
                    f"start workers with `dask worker {self.address}`"
                )

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


def solve_many(
    backend: Backend,
    problems: Sequence[BlockProblem],
    seeds: Sequence[int | None],
    x0s: Sequence[np.ndarray | None] | None = None,
    *,
    workers: int | None = None,
    done: Done | None = None,
) -> list[Solution]:
    """Solve a batch in threads here: ``ThreadExecutor(workers).solve_many(...)``.

    Example:
        >>> from icbs_opt.backends import get_backend
        >>> from icbs_opt.problems import random_problem
        >>> backend = get_backend("exhaustive")
        >>> problems = [random_problem(6, seed=i) for i in range(3)]
        >>> many = solve_many(backend, problems, [0, 1, 2], workers=2)
        >>> [s.energy for s in many] == [backend.solve(p).energy for p in problems]
        True
    """
    return ThreadExecutor(workers).solve_many(backend, problems, seeds, x0s, done=done)


def check_batch(problems: Any, seeds: Any, x0s: Any = None) -> Batch:
    """The arguments of ``solve_many`` as three lists of equal length.

    Args:
        problems: A sequence of :class:`BlockProblem`.
        seeds: One seed (non-negative int or ``None``) per problem.
        x0s: ``None``, or one warm start (or ``None``) per problem.

    Raises:
        ProblemError: If a problem is not a BlockProblem, a seed is bad, or
            ``seeds`` or ``x0s`` has not one entry per problem.

    Example:
        >>> from icbs_opt.problems import random_problem
        >>> problems, seeds, x0s = check_batch([random_problem(4, seed=0)], [7])
        >>> seeds, x0s
        ([7], [None])
    """
    problems, seeds = list(problems), list(seeds)
    for i, problem in enumerate(problems):
        if not isinstance(problem, BlockProblem):
            raise ProblemError(
                f"problems[{i}] must be a BlockProblem, got {type(problem).__name__}"
            )
    x0s = [None] * len(problems) if x0s is None else list(x0s)
    for label, values in (("seeds", seeds), ("x0s", x0s)):
        if len(values) != len(problems):
            raise ProblemError(
                f"{label} must have one entry per problem ({len(problems)}), "
                f"got {len(values)}"
            )
    seeds = [None if s is None else check_seed(s) for s in seeds]
    return problems, seeds, x0s


def checked_answer(problem: BlockProblem, answer: Any, index: int = 0) -> Solution:
    """``answer`` with its energy and feasibility recomputed from ``problem``.

    Wherever a problem was solved (a thread, a Dask worker), what the solver says
    of its answer is not trusted: the energy is ``x^T Q x`` of the problem here,
    and the answer is feasible only if every group has its count.

    Args:
        problem: The problem that was sent.
        answer: What came back for it.
        index: Its index in the batch, for the error message.

    Raises:
        ExecutorError: If ``answer`` is not a Solution whose ``x`` is a 0/1
            vector of length n.

    Example:
        >>> p = BlockProblem(np.eye(4), 1, groups=[0, 0, 1, 1])  # one per group
        >>> lie = Solution(np.array([1, 1, 0, 0]), -5.0, True, 0.1)
        >>> fixed = checked_answer(p, lie)
        >>> fixed.energy, fixed.feasible
        (2.0, False)
    """
    x = np.asarray(getattr(answer, "x", None))
    if not isinstance(answer, Solution) or x.shape != (problem.n,):
        raise ExecutorError(
            f"answer {index} is not a Solution with a 0/1 vector of length "
            f"n = {problem.n}: got {type(answer).__name__} with x of shape {x.shape}"
        )
    if not np.isin(x, (0, 1)).all():
        raise ExecutorError(
            f"answer {index} has values other than 0 and 1: {np.unique(x)[:5]}"
        )
    x = x.astype(np.int8)
    feasible = problem.is_feasible(x)
    return dataclasses.replace(answer, x=x, energy=problem.energy(x), feasible=feasible)


def _check_workers(workers: Any) -> int:
    """``workers`` as an int >= 1."""
    return check_int(workers, "workers", minimum=1, error=ExecutorError)


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
