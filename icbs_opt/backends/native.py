"""Native cardinality-preserving simulated annealing (C core in ``native/``).

The core (``native/sa.c``) anneals ``x^T Q x`` with swap moves (one ``1 -> 0`` and
one ``0 -> 1``), so every state it visits has exactly k ones; cached local fields
make a proposal O(1) and an accepted swap O(n). Restarts run in parallel threads,
each from its own seed stream, so the answer depends on ``seed`` but not on
``num_threads``. This module owns the validation and conversion; the binding
``icbs_opt._native`` only checks types.

Example:
    >>> from icbs_opt.backends import get_backend
    >>> from icbs_opt.problems import random_problem
    >>> sol = get_backend("native", num_restarts=4).solve(random_problem(64), seed=0)
    >>> sol.feasible, int(sol.x.sum())
    (True, 32)
"""

from __future__ import annotations

import logging
import math
import os
import secrets
from typing import Any

import numpy as np

from icbs_opt.backends.base import Backend, Option, choice_option, int_option
from icbs_opt.errors import BackendError
from icbs_opt.problems import BlockProblem

log = logging.getLogger(__name__)

#: The reference schedule (the paper's SA): used by ``schedule="fixed"``.
FIXED_BETA_MIN = 1e-3
FIXED_BETA_MAX = 100.0


def _float_above(
    name: str, default: float | None, help: str, *, above: float
) -> Option:
    """A finite float option strictly greater than ``above``."""
    expected = f"expected a finite number > {above:g}"

    def parse(value: Any) -> float:
        try:
            number = math.nan if isinstance(value, bool) else float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not (math.isfinite(number) and number > above):
            raise ValueError(expected)
        return number

    return Option(name, parse, default, help, f"float > {above:g}")


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


def _seed64(seed: int) -> int:
    """The core's 64-bit seed: ``seed`` (any size) hashed by numpy's SeedSequence."""
    return int(np.random.SeedSequence(seed).generate_state(1, np.uint64)[0])


class NativeBackend(Backend):
    """Swap-move simulated annealing in C, with restarts in parallel threads.

    A sweep is n proposed swaps. Inverse temperatures run geometrically from
    ``beta_min`` to ``beta_max`` (factor ``beta_factor``, ``sweeps_per_beta``
    sweeps each); a temperature at which no energy-changing swap is accepted ends
    the restart early. Each restart then returns to the best state it visited and
    finishes with a swap descent (for each one, the best swap with a zero, until
    no swap lowers the energy). The answer is the best restart (lowest energy,
    ties to the lower restart index).

    ``schedule="auto"`` (the default) derives the range from Q: at the start state
    it samples up to 4096 swaps and picks ``beta_min`` where the mean Metropolis
    acceptance of the uphill ones is 0.1 and ``beta_max`` where it is 1e-4.
    ``schedule="fixed"`` uses ``beta_min`` and ``beta_max`` (default 1e-3 and 100,
    the reference code's schedule for Q scaled to mean ``|Q_ij|`` = 1).

    ``info``: ``schedule``, ``beta_min``, ``beta_max``, ``beta_factor``,
    ``num_betas``, ``sweeps_per_beta``, ``sweep_size`` (proposals per sweep),
    ``restart_energies``, ``restart_sweeps``, ``restart_accepted`` (accepted
    swaps), ``restart_descent_swaps``, ``best_restart``, ``num_threads`` (threads
    that ran), ``openmp`` and ``seed`` (the seed given, or the one drawn for an
    unseeded run: solving again with it repeats the run).

    Raises:
        BackendError: For a bad option, or ``beta_min``/``beta_max`` given with
            ``schedule="auto"``, or ``beta_max < beta_min``.
    """

    name = "native"
    options = (
        int_option("num_restarts", 10, "independent anneals; the best is returned"),
        choice_option(
            "schedule",
            ("auto", "fixed"),
            "auto",
            "'auto': beta range from Q's energy scale; 'fixed': beta_min..beta_max",
        ),
        _float_above(
            "beta_min",
            None,
            f"first inverse temperature, schedule='fixed' only (default "
            f"{FIXED_BETA_MIN:g})",
            above=0.0,
        ),
        _float_above(
            "beta_max",
            None,
            f"last inverse temperature, schedule='fixed' only (default "
            f"{FIXED_BETA_MAX:g})",
            above=0.0,
        ),
        _float_above("beta_factor", 1.1, "ratio of consecutive betas", above=1.0),
        int_option("sweeps_per_beta", 1, "sweeps (n proposed swaps each) per beta"),
        int_option(
            "num_threads",
            0,
            "threads running restarts; 0: all cores (OMP_NUM_THREADS)",
            minimum=0,
        ),
    )

    def __init__(self, **options: Any):
        super().__init__(**options)
        p = self._params
        if p["schedule"] == "auto":
            for key in ("beta_min", "beta_max"):
                if p[key] is not None:
                    raise BackendError(
                        f"option {key!r} of backend 'native' applies only with "
                        f"schedule='fixed', got {key}={p[key]!r} with schedule='auto'"
                    )
        else:
            lo = FIXED_BETA_MIN if p["beta_min"] is None else p["beta_min"]
            hi = FIXED_BETA_MAX if p["beta_max"] is None else p["beta_max"]
            if hi < lo:
                raise BackendError(
                    f"option 'beta_max' of backend 'native' must be >= beta_min, "
                    f"got beta_min={lo!r}, beta_max={hi!r}"
                )

    def unavailable_reason(self) -> str | None:
        """Say how to build the extension when it is missing."""
        try:
            _native_module()
        except ImportError:
            return "the native extension is not built; run: pip install -e ."
        return None

    def _solve(
        self, problem: BlockProblem, *, seed: int | None, x0: np.ndarray | None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        native = _native_module()
        p = self._params
        fixed = p["schedule"] == "fixed"
        if seed is None:  # draw one and report it, so that the run can be repeated
            seed = secrets.randbits(63)
        seed64 = _seed64(seed)
        threads = p["num_threads"]
        if _ForkGuard.single_thread and threads != 1:
            log.debug("forked from a process that ran OpenMP threads: one thread")
            threads = 1
        x, run = native.solve(
            np.ascontiguousarray(problem.Q, dtype=np.float64),  # no copy: float64 C
            problem.k,
            None if x0 is None else np.ascontiguousarray(x0, dtype=np.int8),
            seed=seed64,
            num_restarts=p["num_restarts"],
            beta_min=FIXED_BETA_MIN if p["beta_min"] is None else p["beta_min"],
            beta_max=FIXED_BETA_MAX if p["beta_max"] is None else p["beta_max"],
            beta_factor=p["beta_factor"],
            sweeps_per_beta=p["sweeps_per_beta"],
            num_threads=threads,
            auto_schedule=not fixed,
        )
        if run["num_threads"] > 1:
            _ForkGuard.pool_started = True
        trivial = problem.k in (0, problem.n)
        info = {
            "schedule": p["schedule"],
            "beta_min": run["beta_min"],
            "beta_max": run["beta_max"],
            "beta_factor": p["beta_factor"],
            "num_betas": run["num_betas"],
            "sweeps_per_beta": p["sweeps_per_beta"],
            "sweep_size": problem.n,
            "restart_energies": run["restart_energies"].tolist(),
            "restart_sweeps": run["restart_sweeps"].tolist(),
            "restart_accepted": run["restart_accepted"].tolist(),
            "restart_descent_swaps": run["restart_descent"].tolist(),
            "best_restart": run["best_restart"],
            "num_threads": run["num_threads"],
            "openmp": bool(native.openmp),
            "seed": int(seed),
        }
        log.debug(
            "native SA n=%d k=%d: %s schedule beta %.3g..%.3g (%d betas), best "
            "restart %d of %d%s",
            problem.n,
            problem.k,
            p["schedule"],
            run["beta_min"],
            run["beta_max"],
            run["num_betas"],
            run["best_restart"],
            p["num_restarts"],
            " (trivial: k = 0 or k = n)" if trivial else "",
        )
        return x, info
