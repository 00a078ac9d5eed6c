"""Exact solver by enumeration of every feasible point (small problems only)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from icbs_opt.backends.base import Backend
from icbs_opt.errors import ProblemTooLarge
from icbs_opt.problems import BlockProblem

#: Largest number of feasible points enumerated: ``C(24, 12)``, the most an
#: ungrouped problem within ``max_n = 24`` has.
MAX_POINTS = math.comb(24, 12)

#: Points evaluated at once, and the cap on entries of their ``(points, n)``
#: matrix (32 MiB of float64) for large grouped n.
_CHUNK = 1 << 16
_CHUNK_ENTRIES = 1 << 22


def feasible_count(problem: BlockProblem) -> int:
    """The number of feasible points: ``prod_g C(size_g, k_g)`` (``C(n, k)``).

    Example:
        >>> from icbs_opt.problems import random_problem
        >>> feasible_count(random_problem(8, 2, seed=0, group_size=4))
        36
    """
    return math.prod(
        math.comb(members.size, int(count))
        for members, count in zip(
            problem.group_indices, problem.group_counts, strict=True
        )
    )


def _pruned_sets(problem: BlockProblem) -> Iterator[int]:
    """The indices of the ones of every feasible point, flattened, in order.

    Points come in lexicographic order of the per-group subsets (group 0 first),
    each as its ``k`` indices. Built from itertools alone, so no Python code runs
    per point.
    """
    per_group = [
        itertools.combinations(members.tolist(), int(count))
        for members, count in zip(
            problem.group_indices, problem.group_counts, strict=True
        )
    ]
    points = itertools.product(*per_group)  # one tuple of subsets per point
    return itertools.chain.from_iterable(map(itertools.chain.from_iterable, points))


class ExhaustiveBackend(Backend):
    """Enumerates all feasible points and returns the lowest energy.

    The feasible points are the products of one ``k_g``-subset per group
    (``C(n, k)`` subsets when ungrouped). Deterministic (ties go to the first point
    in enumeration order); ``seed`` and ``x0`` are accepted and ignored. Refuses
    ungrouped problems with n > 24 and grouped ones with more than
    ``MAX_POINTS = C(24, 12)`` feasible points.
    """

    name = "exhaustive"
    max_n = 24

    def check_size(self, problem: BlockProblem) -> None:
        """Refuse n > 24 ungrouped, or more than ``MAX_POINTS`` grouped points."""
        if not problem.is_grouped:
            super().check_size(problem)
            return
        count = feasible_count(problem)
        if count > MAX_POINTS:
            raise ProblemTooLarge(
                f"backend {self.name!r} enumerates at most {MAX_POINTS} feasible "
                f"points, got {count} (the product of C(size, count) over the "
                f"{problem.num_groups} groups); use a smaller block size"
            )

    def _solve(
        self, problem: BlockProblem, *, seed: int | None, x0: np.ndarray | None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        n, k, Q = problem.n, problem.k, problem.Q
        indices = _pruned_sets(problem)
        total = feasible_count(problem)
        chunk = max(1, min(_CHUNK, _CHUNK_ENTRIES // n))
        best_e, best_idx = np.inf, None
        for start in range(0, total, chunk):
            m = min(chunk, total - start)
            idx = np.fromiter(
                itertools.islice(indices, m * k), dtype=np.intp, count=m * k
            ).reshape(m, k)
            X = np.zeros((m, n))
            np.put_along_axis(X, idx, 1.0, axis=1)
            energies = np.einsum("mi,mi->m", X @ Q, X)  # (m,) x^T Q x per point
            j = int(np.argmin(energies))
            if energies[j] < best_e:
                best_e, best_idx = energies[j], idx[j]
        x = np.zeros(n, dtype=np.int8)
        x[best_idx] = 1
        return x, {"evaluated": total}
