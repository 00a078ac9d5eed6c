"""Exact solver by enumeration of every feasible point (small n only)."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np

from icbs_opt.backends.base import Backend
from icbs_opt.problems import BlockProblem

_CHUNK = 1 << 16


class ExhaustiveBackend(Backend):
    """Enumerates all ``C(n, k)`` feasible points and returns the lowest energy.

    Deterministic (ties go to the first point in lexicographic order of the pruned
    indices); ``seed`` and ``x0`` are accepted and ignored. Refuses n > 24.
    """

    name = "exhaustive"
    max_n = 24

    def _solve(
        self, problem: BlockProblem, *, seed: int | None, x0: np.ndarray | None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        n, k, Q = problem.n, problem.k, problem.Q
        combos = itertools.combinations(range(n), k)
        best_e, best_idx = np.inf, None
        total = math.comb(n, k)
        for start in range(0, total, _CHUNK):
            m = min(_CHUNK, total - start)
            idx = np.fromiter(
                itertools.chain.from_iterable(itertools.islice(combos, m)),
                dtype=np.intp,
                count=m * k,
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
