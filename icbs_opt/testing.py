"""Conformance kit: the tests every registered backend must pass.

Use it from a test module by subclassing::

    from icbs_opt.testing import BackendConformance

    class TestBackends(BackendConformance):
        pass

The class is parametrised over every registered backend. Override
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
from icbs_opt.problems import BlockProblem, random_problem


def exact_optimum(problem: BlockProblem) -> float:
    """The optimum energy by enumeration (small n only)."""
    return get_backend("exhaustive").solve(problem).energy


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
