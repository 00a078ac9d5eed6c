"""dwave-neal simulated annealing on the penalty BQM, with decoding and repair."""

from __future__ import annotations

from typing import Any

import numpy as np

from icbs_opt.backends.base import (
    C_INT_MAX,
    Backend,
    Option,
    best_repaired,
    int_option,
)
from icbs_opt.checks import check_float
from icbs_opt.errors import BackendError
from icbs_opt.problems import BlockProblem

#: Penalty strengths tried by ``penalty="auto"``, as fractions of the safe bound
#: ``BlockProblem.default_penalty()``, weakest first.
AUTO_FRACTIONS = (1 / 256, 1 / 64, 1 / 16, 1 / 4, 1.0)


def _parse_penalty(value: Any) -> float | str:
    if isinstance(value, str) and value.strip() == "auto":
        return "auto"
    return check_float(
        value, "option 'penalty' ('auto' or a number)", minimum=0, error=BackendError
    )


def _parse_beta_range(value: Any) -> tuple[float, float]:
    parts = value.split(",") if isinstance(value, str) else value
    if not isinstance(parts, (list, tuple, np.ndarray)) or len(parts) != 2:
        raise BackendError(
            f"option 'beta_range' must be two numbers 'low,high' with "
            f"0 < low < high, e.g. '0.1,10', got {value!r}"
        )
    lo = check_float(parts[0], "option 'beta_range' low", above=0, error=BackendError)
    hi = check_float(parts[1], "option 'beta_range' high", above=lo, error=BackendError)
    return lo, hi


class NealBackend(Backend):
    """dwave-neal's ``SimulatedAnnealingSampler`` on ``problem.to_bqm(penalty)``.

    The BQM carries one penalty per group (one in all when ungrouped). Every
    read is decoded and repaired to the right count of ones in every group
    (greedy, then swap descent inside groups); the best repaired read is
    returned. ``penalty="auto"`` tries the strengths ``AUTO_FRACTIONS`` times the
    safe bound, weakest first, stops once all reads at a strength come back
    feasible in every group, and keeps the best repaired answer
    over all strengths. A fixed penalty is used as given.

    ``info``: ``penalty`` (strength of the returned answer), ``penalties`` (all
    tried), ``raw_feasible_fraction`` (feasible reads before repair, over all
    reads) and ``reads``.
    """

    name = "neal"
    options = (
        Option(
            "penalty",
            _parse_penalty,
            "auto",
            "cardinality penalty strength, or 'auto' to search it",
            "auto | float >= 0",
        ),
        int_option(
            "num_reads",
            10,
            "reads (independent anneals) per strength",
            maximum=C_INT_MAX,
        ),
        int_option("num_sweeps", 1000, "sweeps per read", maximum=C_INT_MAX),
        Option(
            "beta_range",
            _parse_beta_range,
            None,
            "'low,high' inverse temperatures (default: neal's, from the BQM)",
            "low,high",
        ),
    )

    def unavailable_reason(self) -> str | None:
        """Say how to install dwave-neal when it is missing."""
        try:
            import neal  # noqa: F401
        except ImportError:
            return "dwave-neal is not installed; run: pip install dwave-neal"
        return None

    def _solve(
        self, problem: BlockProblem, *, seed: int | None, x0: np.ndarray | None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        import neal

        p = self._params
        safe = problem.default_penalty()
        strengths = (
            [f * safe for f in AUTO_FRACTIONS]
            if p["penalty"] == "auto"
            else [p["penalty"]]
        )
        rng = np.random.default_rng(seed)
        sampler = neal.SimulatedAnnealingSampler()
        kwargs: dict[str, Any] = {
            "num_reads": p["num_reads"],
            "num_sweeps": p["num_sweeps"],
        }
        if p["beta_range"] is not None:
            kwargs["beta_range"] = p["beta_range"]
        if x0 is not None:
            kwargs["initial_states"] = np.tile(x0, (p["num_reads"], 1))
            kwargs["initial_states_generator"] = "tile"
        best_x, best_e, best_p = None, np.inf, strengths[0]
        feasible = reads = 0
        tried = []
        for strength in strengths:
            bqm = problem.to_bqm(strength)
            sampleset = sampler.sample(bqm, seed=int(rng.integers(2**31)), **kwargs)
            order = np.argsort(np.asarray(sampleset.variables))
            samples = sampleset.record.sample[:, order]  # (num_reads, n)
            tried.append(float(strength))
            x, e, ok = best_repaired(problem, samples)
            feasible += ok
            reads += len(samples)
            if e < best_e:
                best_x, best_e, best_p = x, e, float(strength)
            if ok == len(samples):
                break
        return best_x, {
            "penalty": best_p,
            "penalties": tried,
            "raw_feasible_fraction": feasible / reads,
            "reads": reads,
        }
