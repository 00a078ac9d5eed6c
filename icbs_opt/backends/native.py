"""Native cardinality-preserving simulated annealing (C core in ``native/``).

The core (``native/sa.c``) anneals ``x^T Q x`` with swap moves (one ``1 -> 0`` and
one ``0 -> 1``), so every state it visits has exactly k ones; cached local fields
make a proposal O(1) and an accepted swap O(n). Restarts run in parallel threads,
each from its own seed stream, so the answer depends on ``seed`` but not on
``num_threads``. This module owns the validation and conversion; the binding
``icbs_opt._native`` only checks types.

Grouped problems (``BlockProblem(..., groups=...)``, e.g. N:M sparsity) are
annealed with swaps inside a group only (one 1 and one 0 of the same group), so
every state keeps every group's count; the move test is the same O(1)
expression. Groups whose count is 0 or their size never move. Proposals are
uniform over the feasible swaps: a group is drawn with probability proportional
to ``count * (size - count)`` (its number of swaps; uniform over the movable
groups when those are equal, as in N:M), then one of its ones and one of its
zeros. Ungrouped problems take the ungrouped path of the core.

Example:
    >>> from icbs_opt.backends import get_backend
    >>> from icbs_opt.problems import random_problem
    >>> sol = get_backend("native", num_restarts=4).solve(random_problem(64), seed=0)
    >>> sol.feasible, int(sol.x.sum())
    (True, 32)
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import queue
import secrets
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from icbs_opt.backends.base import Backend, Option, choice_option
from icbs_opt.checks import check_float, check_int
from icbs_opt.errors import BackendError
from icbs_opt.problems import BlockProblem

log = logging.getLogger(__name__)

# The schedule policy of the backend, in one place: the C core takes every number
# of the schedule as an argument and owns none (native/sa.h). Docstrings, option
# help and docs/backends.md quote these names.

#: ``schedule="fixed"``: the reference code's range, for Q scaled to mean
#: ``|Q_ij|`` = 1. Also the auto schedule's range when no sampled swap is uphill.
FIXED_BETA_MIN = 1e-3
FIXED_BETA_MAX = 100.0
#: ``schedule="auto"``: swaps sampled at the start state (all of them if fewer).
AUTO_SAMPLES = 2048
#: ``schedule="auto"``: mean Metropolis acceptance of the sampled uphill swaps at
#: ``beta_min``, for problems with ``n <= SMALL_N``. Colder starts (0.1) miss the
#: optimum of about 1 in 1000 small random problems; see docs/backends.md.
AUTO_ACCEPT_SMALL = 0.3
#: ``schedule="auto"``: the same for ``n > SMALL_N``, real blocks. The hot start
#: of small problems would cost 1.4 to 2.3 times as much on them for the same
#: energies (docs/benchmarks.md, issue 20).
AUTO_ACCEPT_LARGE = 0.1
#: Largest n that gets ``AUTO_ACCEPT_SMALL`` (a solve of that size takes well
#: under a millisecond whichever the start).
SMALL_N = 64
#: ``schedule="auto"``: ``beta_max / beta_min``.
AUTO_RANGE = 1e3
#: Proposals per sweep: ``max(n, MIN_SWEEP_SIZE)``, so that a temperature of a
#: small problem is long enough to mean something (and to end a restart).
MIN_SWEEP_SIZE = 64
#: Smallest ``beta_factor``: the longest schedule (from the smallest to the largest
#: float) then has 15 million temperatures, within the core's limit of 1e9.
MIN_BETA_FACTOR = 1.0001
#: ``num_threads`` is a C ``int``.
MAX_THREADS = 2**31 - 1
#: Seconds between the main thread's checks for signals while a core call runs.
_WAIT_SLICE = 0.05


class _ForkGuard:
    """Keeps a forked child off OpenMP threads when its parent had started them.

    GNU libgomp's thread pool does not survive ``fork``: a child that enters a
    parallel region after its parent ran one hangs. Such a child solves on one
    thread instead (same answers, since they do not depend on the thread count).
    """

    pool_started = False
    single_thread = False

    @classmethod
    def after_fork_in_child(cls) -> None:
        cls.single_thread = cls.single_thread or cls.pool_started


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_ForkGuard.after_fork_in_child)


def _native_module() -> Any:
    from icbs_opt import _native

    return _native


def _stop_flag() -> np.ndarray:
    """A fresh stop flag for the core: setting ``flag[0] = 1`` ends its solves."""
    return np.zeros(1, dtype=np.int32)


class _CoreThread:
    """One long-lived helper thread that runs the main thread's core calls.

    A thread per call would cost about a millisecond (and a new OpenMP pool) for
    every small solve. A forked child starts its own helper when it needs one.
    """

    _jobs: queue.SimpleQueue | None = None

    @classmethod
    def submit(cls, job: Callable[[], None]) -> None:
        if cls._jobs is None:
            cls._jobs = queue.SimpleQueue()
            threading.Thread(
                target=cls._serve,
                args=(cls._jobs,),
                name="icbs-native-main",
                daemon=True,
            ).start()
        cls._jobs.put(job)

    @staticmethod
    def _serve(jobs: queue.SimpleQueue) -> None:
        while True:
            jobs.get()()

    @classmethod
    def after_fork_in_child(cls) -> None:
        cls._jobs = None  # the helper thread did not survive the fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_CoreThread.after_fork_in_child)


def _call_core(solve: Callable[[], Any], stop: np.ndarray) -> Any:
    """Run ``solve()`` (a core call on ``stop``) so that Ctrl-C ends it promptly.

    The core runs without the GIL and does not return to Python until it ends,
    and Python runs signal handlers in the main thread only. So from the main
    thread the call runs on a helper thread while this one waits in short
    slices; when a handler raises (``KeyboardInterrupt``, or what a SIGTERM
    handler raises) the flag is set, the core stops within a sweep, and the
    exception goes on. Other threads call the core directly (their caller stops
    them through ``stop``, as :meth:`NativeBackend.in_batch` does).
    """
    if threading.current_thread() is not threading.main_thread():
        return solve()
    box: dict[str, Any] = {}
    finished = threading.Event()

    def job() -> None:
        try:
            box["value"] = solve()
        except BaseException as exc:  # handed to the main thread below
            box["error"] = exc
        finally:
            finished.set()

    _CoreThread.submit(job)
    try:
        while not finished.wait(_WAIT_SLICE):
            pass
    except BaseException:
        stop[0] = 1
        finished.wait()
        raise
    if "error" in box:
        raise box["error"]
    return box["value"]


def auto_accept(n: int) -> float:
    """The auto schedule's acceptance at ``beta_min`` for a problem of n variables.

    Example:
        >>> auto_accept(12), auto_accept(1024)
        (0.3, 0.1)
    """
    return AUTO_ACCEPT_SMALL if n <= SMALL_N else AUTO_ACCEPT_LARGE


def _seed64(seed: int) -> int:
    """The core's 64-bit seed: ``seed`` (any size) hashed by numpy's SeedSequence."""
    return int(np.random.SeedSequence(seed).generate_state(1, np.uint64)[0])


def _group_arrays(problem: BlockProblem) -> dict[str, np.ndarray | None]:
    """The core's ``groups`` (int32 ids) and ``counts`` (int64), None if ungrouped.

    ``BlockProblem`` guarantees ids ``0..G-1`` with ``0 <= count <= size``.
    """
    if not problem.is_grouped:
        return {"groups": None, "counts": None}
    return {
        "groups": np.ascontiguousarray(problem.groups, dtype=np.int32),
        "counts": np.ascontiguousarray(problem.group_counts, dtype=np.int64),
    }


def _movable_groups(problem: BlockProblem) -> int:
    """Groups with ``0 < count < size``: those whose swaps the core proposes."""
    sizes = np.bincount(problem.groups, minlength=problem.group_counts.size)
    counts = problem.group_counts
    return int(np.count_nonzero((counts > 0) & (counts < sizes)))


class NativeBackend(Backend):
    """Swap-move simulated annealing in C, with restarts in parallel threads.

    A sweep is ``max(n, MIN_SWEEP_SIZE)`` proposed swaps. Inverse temperatures
    run geometrically from ``beta_min`` to ``beta_max`` (factor ``beta_factor``,
    ``sweeps_per_beta`` sweeps each); a temperature at which no energy-changing
    swap is accepted ends the restart early. Each restart then returns to the
    best state it visited and finishes with a swap descent (for each one, the
    best swap with a zero, until no swap lowers the energy). The answer is the
    best restart (lowest energy, ties to the lower restart index).

    Grouped problems swap inside groups only (anneal and descent); proposals
    are uniform over the feasible swaps (see the module docstring).

    ``schedule="auto"`` (the default) derives the range from Q: at the start
    state it takes the energy changes of ``AUTO_SAMPLES`` random swaps (all of
    them when there are fewer), puts ``beta_min`` where the mean Metropolis
    acceptance of the uphill ones is :func:`auto_accept` (``AUTO_ACCEPT_SMALL``
    up to ``n = SMALL_N``: exact on small random problems; ``AUTO_ACCEPT_LARGE``
    above: fast on real blocks) and ``beta_max`` at
    ``AUTO_RANGE * beta_min`` (``FIXED_BETA_MIN .. FIXED_BETA_MAX`` when no
    sampled swap is uphill). ``schedule="fixed"`` uses ``beta_min`` and
    ``beta_max`` (default ``FIXED_BETA_MIN`` and ``FIXED_BETA_MAX``, the
    reference code's schedule for Q scaled to mean ``|Q_ij|`` = 1). These
    constants are module attributes; docs/backends.md gives their values.

    ``info``: ``schedule``, ``beta_min``, ``beta_max``, ``beta_factor``,
    ``num_betas``, ``sweeps_per_beta``, ``sweep_size`` (proposals per sweep),
    ``restart_energies``, ``restart_sweeps``, ``restart_accepted`` (accepted
    swaps), ``restart_descent_swaps``, ``best_restart``, ``num_threads`` (threads
    that ran), ``openmp``, ``seed`` (the seed given, or the one drawn for an
    unseeded run: solving again with it repeats the run), ``auto_accept`` (the
    acceptance target of the auto schedule; None when fixed), ``num_groups`` (1
    when ungrouped) and ``movable_groups`` (groups with ``0 < count < size``).

    Raises:
        BackendError: For a bad option value (an explicit None means the
            default, as for every backend), ``beta_min``/``beta_max`` given with
            ``schedule="auto"``, or ``beta_max < beta_min``.
    """

    name = "native"
    #: The core's stop flag for this object's solves (``in_batch`` sets one per
    #: batch on its copy); ``None``: a fresh flag per solve.
    _stop: np.ndarray | None = None
    options = (
        Option(
            "num_restarts",
            lambda v: check_int(
                v, "option 'num_restarts'", minimum=1, error=BackendError
            ),
            10,
            "independent anneals; the best is returned",
            "int >= 1",
        ),
        choice_option(
            "schedule",
            ("auto", "fixed"),
            "auto",
            f"'auto': beta_min where the mean uphill acceptance is "
            f"{AUTO_ACCEPT_SMALL:g} (n <= {SMALL_N}) or {AUTO_ACCEPT_LARGE:g}, "
            f"beta_max = {AUTO_RANGE:g} * beta_min; 'fixed': beta_min..beta_max",
        ),
        Option(
            "beta_min",
            lambda v: check_float(
                v, "option 'beta_min'", above=0.0, error=BackendError
            ),
            None,
            f"first inverse temperature, schedule='fixed' only (default "
            f"{FIXED_BETA_MIN:g})",
            "float > 0",
        ),
        Option(
            "beta_max",
            lambda v: check_float(
                v, "option 'beta_max'", above=0.0, error=BackendError
            ),
            None,
            f"last inverse temperature, schedule='fixed' only (default "
            f"{FIXED_BETA_MAX:g})",
            "float > 0",
        ),
        Option(
            "beta_factor",
            lambda v: check_float(
                v, "option 'beta_factor'", minimum=MIN_BETA_FACTOR, error=BackendError
            ),
            1.1,
            "ratio of consecutive betas",
            f"float >= {MIN_BETA_FACTOR:g}",
        ),
        Option(
            "sweeps_per_beta",
            lambda v: check_int(
                v, "option 'sweeps_per_beta'", minimum=1, error=BackendError
            ),
            1,
            f"sweeps (max(n, {MIN_SWEEP_SIZE}) proposed swaps each) per beta",
            "int >= 1",
        ),
        Option(
            "num_threads",
            lambda v: check_int(
                v,
                "option 'num_threads'",
                minimum=0,
                maximum=MAX_THREADS,
                error=BackendError,
            ),
            0,
            "threads running restarts; 0: all cores (OMP_NUM_THREADS)",
            f"int in [0, {MAX_THREADS}]",
        ),
    )

    def __init__(self, **options: Any):
        super().__init__(**options)
        self._check_schedule()

    def _check_schedule(self) -> None:
        """Check that ``beta_min``/``beta_max`` fit the schedule and each other."""
        p = self._params
        if p["schedule"] == "auto":
            for key in ("beta_min", "beta_max"):
                if p[key] is not None:
                    raise BackendError(
                        f"option {key!r} of backend 'native' applies only with "
                        f"schedule='fixed', got {key}={p[key]!r} with schedule='auto'"
                    )
            return
        lo, hi = self._fixed_range()
        if hi < lo:
            raise BackendError(
                f"option 'beta_max' of backend 'native' must be >= beta_min, "
                f"got beta_min={lo!r}, beta_max={hi!r}"
            )

    def _fixed_range(self) -> tuple[float, float]:
        """``beta_min, beta_max`` as given, or the fixed defaults."""
        p = self._params
        lo = FIXED_BETA_MIN if p["beta_min"] is None else p["beta_min"]
        hi = FIXED_BETA_MAX if p["beta_max"] is None else p["beta_max"]
        return lo, hi

    def unavailable_reason(self) -> str | None:
        """Say how to build the extension when it is missing."""
        try:
            _native_module()
        except ImportError:
            return "the native extension is not built; run: pip install -e ."
        return None

    @contextlib.contextmanager
    def in_batch(self, threads: int) -> Iterator[NativeBackend]:
        """A copy for one batch: one stop flag, one thread per solve if several.

        With ``threads > 1`` the problems share the cores instead of each
        starting a thread per core (answers do not depend on the thread count).
        When the batch ends by an exception (Ctrl-C included) the flag is set,
        and the solves still running stop within a sweep.
        """
        one = copy.copy(self)
        one._stop = _stop_flag()
        if threads > 1:
            one._params = {**self._params, "num_threads": 1}
        try:
            yield one
        except BaseException:
            one._stop[0] = 1  # the running solves; the executor drops queued ones
            raise

    def _solve(
        self, problem: BlockProblem, *, seed: int | None, x0: np.ndarray | None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        native = _native_module()
        p = self._params
        fixed = p["schedule"] == "fixed"
        if seed is None:  # draw one and report it, so that the run can be repeated
            seed = secrets.randbits(63)
        seed64 = _seed64(seed)
        sweep_size = max(problem.n, MIN_SWEEP_SIZE)
        accept = None if fixed else auto_accept(problem.n)
        threads = p["num_threads"]
        if _ForkGuard.single_thread and threads != 1:
            log.debug("forked from a process that ran OpenMP threads: one thread")
            threads = 1
        stop = self._stop if self._stop is not None else _stop_flag()
        x, run = _call_core(
            lambda: native.solve(
                np.ascontiguousarray(problem.Q, dtype=np.float64),  # float64 C: no copy
                problem.k,
                None if x0 is None else np.ascontiguousarray(x0, dtype=np.int8),
                stop=stop,
                **_group_arrays(problem),
                **self._core_options(seed64, threads, sweep_size, accept),
            ),
            stop,
        )
        if run["num_threads"] > 1:
            _ForkGuard.pool_started = True
        info = self._info(run, sweep_size, int(seed), bool(native.openmp))
        info["auto_accept"] = accept
        info["num_groups"] = problem.num_groups
        info["movable_groups"] = _movable_groups(problem)
        self._log_run(problem, run, info["movable_groups"])
        return x, info

    def _log_run(
        self, problem: BlockProblem, run: dict[str, Any], movable: int
    ) -> None:
        """Log a solve's schedule and best restart at debug level."""
        log.debug(
            "native SA n=%d k=%d groups=%d: %s schedule beta %.3g..%.3g (%d betas), "
            "best restart %d of %d%s",
            problem.n,
            problem.k,
            problem.num_groups,
            self._params["schedule"],
            run["beta_min"],
            run["beta_max"],
            run["num_betas"],
            run["best_restart"],
            self._params["num_restarts"],
            " (trivial: a single feasible point)" if movable == 0 else "",
        )

    def _core_options(
        self, seed64: int, threads: int, sweep_size: int, accept: float | None
    ) -> dict[str, Any]:
        """The keyword arguments of ``_native.solve`` besides the arrays.

        ``accept``: the auto schedule's acceptance target; None: fixed schedule.
        """
        p = self._params
        beta_min, beta_max = self._fixed_range()
        return {
            "seed": seed64,
            "num_restarts": p["num_restarts"],
            "beta_min": beta_min,
            "beta_max": beta_max,
            "beta_factor": p["beta_factor"],
            "sweeps_per_beta": p["sweeps_per_beta"],
            "sweep_size": sweep_size,
            "num_threads": threads,
            "auto_schedule": accept is not None,
            "auto_samples": AUTO_SAMPLES,
            "auto_accept": AUTO_ACCEPT_SMALL if accept is None else accept,
            "auto_range": AUTO_RANGE,
        }

    def _info(
        self, run: dict[str, Any], sweep_size: int, seed: int, openmp: bool
    ) -> dict[str, Any]:
        """The ``info`` of a solve from the core's run details."""
        p = self._params
        return {
            "schedule": p["schedule"],
            "beta_min": run["beta_min"],
            "beta_max": run["beta_max"],
            "beta_factor": p["beta_factor"],
            "num_betas": run["num_betas"],
            "sweeps_per_beta": p["sweeps_per_beta"],
            "sweep_size": sweep_size,
            "restart_energies": run["restart_energies"].tolist(),
            "restart_sweeps": run["restart_sweeps"].tolist(),
            "restart_accepted": run["restart_accepted"].tolist(),
            "restart_descent_swaps": run["restart_descent"].tolist(),
            "best_restart": run["best_restart"],
            "num_threads": run["num_threads"],
            "openmp": openmp,
            "seed": seed,
        }
