"""Conformance kit: the tests every registered backend must pass.

Use it from a test module by subclassing::

    from icbs_opt.testing import BackendConformance

    class TestBackends(BackendConformance):
        pass

The class is parametrised over every registered backend. Grouped (N:M) problems
have their own cases: exact optima against brute force, feasibility in every
group, warm starts checked per group, and a batch of grouped and ungrouped
problems through the threads executor giving the one-by-one answers. Override
:meth:`BackendConformance.make_backend` to hand a backend test-only options (for
example a local device for a cloud backend, or fewer iterations for a slow one).
Requires pytest.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from icbs_opt.backends import Backend, get_backend, registered_backends
from icbs_opt.errors import BackendError, ProblemTooLarge
from icbs_opt.executors import make_executor
from icbs_opt.problems import BlockProblem, random_problem

#: Largest n :func:`exact_optimum` enumerates (``2^n`` points).
BRUTE_FORCE_MAX_N = 16


def exact_optimum(problem: BlockProblem) -> float:
    """The optimum energy by brute force over all ``2^n`` points (n <= 16).

    Independent of every backend (``exhaustive`` included): it keeps the points
    that :meth:`BlockProblem.is_feasible` would accept (every group's count) and
    returns :meth:`BlockProblem.energy` of the best, so a backend that finds the
    same point reports exactly the same energy.

    Example:
        >>> exact_optimum(BlockProblem([[1.0, -2.0], [-2.0, 1.0]], k=1))
        1.0
    """
    if problem.n > BRUTE_FORCE_MAX_N:
        raise ValueError(
            f"exact_optimum enumerates 2^n points, n <= {BRUTE_FORCE_MAX_N}; "
            f"got n = {problem.n}"
        )
    n = problem.n
    X = (np.arange(2**n)[:, None] >> np.arange(n)) & 1  # (2^n, n) every point
    X = X[(problem.count_ones(X) == problem.group_counts).all(axis=1)]
    energies = np.einsum("mi,mi->m", X @ problem.Q, X)  # (feasible,) x^T Q x
    return problem.energy(X[int(np.argmin(energies))])


def grouped_problems(seed: int, max_n: int | None = None) -> list[BlockProblem]:
    """Small grouped problems of the conformance kit (n <= 12).

    2:4 on two groups of four, one per group on three groups of four, and
    unequal group sizes and counts on non-contiguous groups (with a group that
    must stay all zeros and one that must be all ones). Those above ``max_n``
    are left out.
    """
    Q9 = random_problem(9, seed=seed + 50).Q
    problems = [
        random_problem(8, 2, seed=seed, group_size=4),
        random_problem(12, 1, seed=seed + 20, group_size=4),
        BlockProblem(Q9, [1, 3, 0], groups=[2, 0, 1, 1, 0, 1, 0, 1, 1]),
        BlockProblem(Q9[:7, :7], [2, 0, 2], groups=[0, 0, 0, 1, 1, 2, 2]),
    ]
    return [p for p in problems if max_n is None or p.n <= max_n]


class BackendConformance:
    """Behaviour every backend must show; parametrised over the registry."""

    #: Largest n used for the exact-optimum cases (capped by a backend's limit).
    exact_n = 8

    @pytest.fixture(params=registered_backends())
    def backend(self, request: pytest.FixtureRequest) -> Backend:
        """The backend under test, one per registered name."""
        return self.make_backend(request.param)

    def make_backend(self, name: str, **options: Any) -> Backend:
        """Return the backend under test; override to add test-only options."""
        return get_backend(name, **options)

    def _check(self, backend: Backend, problem: BlockProblem, **kwargs: Any):
        sol = backend.solve(problem, **kwargs)
        assert sol.x.shape == (problem.n,)
        assert sol.x.dtype == np.int8
        assert set(np.unique(sol.x)) <= {0, 1}
        assert sol.feasible and int(sol.x.sum()) == problem.k
        assert problem.count_ones(sol.x).tolist() == problem.group_counts.tolist()
        assert sol.energy == pytest.approx(problem.energy(sol.x), rel=1e-9, abs=1e-12)
        assert sol.seconds >= 0
        assert isinstance(sol.info, dict)
        return sol

    def test_single_variable(self, backend: Backend) -> None:
        """A single variable with k = 0 or 1 has one feasible answer."""
        for k in (0, 1):
            sol = self._check(backend, BlockProblem([[-2.0]], k), seed=0)
            assert sol.x.tolist() == [k]

    def test_k_zero_and_k_n(self, backend: Backend) -> None:
        """Problems with k = 0 and k = n have one feasible answer each."""
        problem = random_problem(5, 0, seed=3)
        assert self._check(backend, problem, seed=0).x.tolist() == [0] * 5
        problem = random_problem(5, 5, seed=3)
        assert self._check(backend, problem, seed=0).x.tolist() == [1] * 5

    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_exact_optimum_small(self, backend: Backend, seed: int) -> None:
        """Seeded small problems are solved to the exhaustive optimum."""
        n = min(self.exact_n, backend.size_limit() or self.exact_n)
        for k in (1, n // 2, n - 1):
            problem = random_problem(n, k, seed=100 * seed + k)
            sol = self._check(backend, problem, seed=seed)
            assert sol.energy == pytest.approx(exact_optimum(problem), abs=1e-9)

    def test_same_seed_same_answer(self, backend: Backend) -> None:
        """The same seed gives the same answer."""
        problem = random_problem(min(12, backend.size_limit() or 12), seed=7)
        first = self._check(backend, problem, seed=11)
        second = self._check(backend, problem, seed=11)
        assert first.x.tolist() == second.x.tolist()

    def test_warm_start_accepted(self, backend: Backend) -> None:
        """A feasible warm start is accepted and the answer stays feasible."""
        problem = random_problem(6, 3, seed=5)
        x0 = problem.random_feasible(seed=1)
        self._check(backend, problem, seed=0, x0=x0)

    def test_rejects_infeasible_warm_start(self, backend: Backend) -> None:
        """A warm start with the wrong number of ones is refused."""
        problem = random_problem(4, 2, seed=5)
        with pytest.raises(ValueError, match="x0 must have exactly k = 2 ones, got 3"):
            backend.solve(problem, x0=[1, 1, 1, 0])

    def test_bad_option_raises(self, backend: Backend) -> None:
        """Unknown options and invalid values raise BackendError."""
        with pytest.raises(BackendError, match="unknown option 'no_such_option'"):
            self.make_backend(backend.name, no_such_option=1)
        for opt in backend.options:
            if opt.kind == "text":  # free text (an ARN, a folder) has no bad value
                continue
            with pytest.raises(BackendError, match=f"option {opt.name!r}"):
                self.make_backend(backend.name, **{opt.name: "not-a-valid-value"})

    def test_size_limit(self, backend: Backend) -> None:
        """A problem above the declared size limit raises ProblemTooLarge."""
        limit = backend.size_limit()
        if limit is None:
            assert backend.properties["max_n"] is None
            return
        problem = BlockProblem(np.eye(limit + 1), 1)
        with pytest.raises(ProblemTooLarge, match=f"at most n = {limit}"):
            backend.solve(problem)

    # ------------------------------------------------------- grouped problems
    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_grouped_exact_optimum(self, backend: Backend, seed: int) -> None:
        """Small grouped problems are solved to the brute-force optimum."""
        for problem in grouped_problems(seed, backend.size_limit()):
            sol = self._check(backend, problem, seed=seed)
            assert sol.energy == pytest.approx(exact_optimum(problem), abs=1e-9)

    def test_grouped_same_seed_same_answer(self, backend: Backend) -> None:
        """The same seed gives the same answer on a grouped problem."""
        problem = random_problem(12, 2, seed=8, group_size=4)
        first = self._check(backend, problem, seed=5)
        assert first.x.tolist() == self._check(backend, problem, seed=5).x.tolist()

    def test_grouped_warm_start_accepted(self, backend: Backend) -> None:
        """A warm start feasible in every group is accepted."""
        for problem in grouped_problems(3, backend.size_limit()):
            self._check(backend, problem, seed=0, x0=problem.random_feasible(1))

    def test_grouped_rejects_infeasible_warm_start(self, backend: Backend) -> None:
        """A warm start with the right total but a wrong group count is refused."""
        problem = random_problem(8, 2, seed=5, group_size=4)
        with pytest.raises(
            ValueError, match="x0 must have exactly 2 ones in group 0, got 3"
        ):
            backend.solve(problem, x0=[1, 1, 1, 0, 1, 0, 0, 0])

    # ------------------------------------------------------------- executors
    def test_grouped_batch_in_threads_matches_one_by_one(
        self, backend: Backend
    ) -> None:
        """A batch with grouped problems in threads gives the one-by-one answers."""
        limit = backend.size_limit()
        problems = grouped_problems(4, limit) + [random_problem(6, 2, seed=9)]
        seeds = [10 + i for i in range(len(problems))]
        x0s = [None if i % 2 else p.random_feasible(i) for i, p in enumerate(problems)]
        alone = [
            self._check(backend, p, seed=s, x0=x)
            for p, s, x in zip(problems, seeds, x0s, strict=True)
        ]
        with make_executor("threads", workers=3) as executor:
            batch = executor.solve_many(backend, problems, seeds, x0s)
        for problem, one, many in zip(problems, alone, batch, strict=True):
            assert many.x.tolist() == one.x.tolist()
            assert many.energy == one.energy and many.feasible
            counts = problem.count_ones(many.x).tolist()
            assert counts == problem.group_counts.tolist()
