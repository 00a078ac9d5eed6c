"""Every registered backend passes the shared conformance class."""

import functools
import math
from typing import Any

import numpy as np
import pytest

from icbs_opt.backends import Backend, get_backend
from icbs_opt.backends.exhaustive import MAX_POINTS, feasible_count
from icbs_opt.errors import ProblemTooLarge
from icbs_opt.problems import BlockProblem, random_problem
from icbs_opt.testing import BackendConformance, exact_optimum
from tests.tiny import FAST_OPTIONS


@functools.cache
def _seeded_mock_qpu() -> Any:
    """A simulated Advantage whose annealing is seeded (for dwave-qpu's seam)."""
    from dwave.samplers import SimulatedAnnealingSampler
    from dwave.system.testing import MockDWaveSampler

    return MockDWaveSampler(
        topology_type="pegasus",
        topology_shape=[16],
        parameter_warnings=False,
        substitute_sampler=SimulatedAnnealingSampler(),
        substitute_kwargs={"seed": 0},
    )


class TestBackendConformance(BackendConformance):
    def make_backend(self, name: str, **options: Any) -> Backend:
        options = {**FAST_OPTIONS.get(name, {}), **options}
        if name == "braket":  # the documented seam: a device object, no network
            from braket.devices import LocalSimulator

            options.setdefault("device", LocalSimulator())
        if name == "dwave-qpu":  # the seam: a structured child sampler, no network
            options.setdefault("sampler", _seeded_mock_qpu())
        if name == "dwave-hybrid":  # the seam: a local sampler with sample_cqm
            from icbs_opt.ocean import BlockCQMSampler

            options.setdefault("sampler", BlockCQMSampler("native"))
        return super().make_backend(name, **options)


# ------------------------------------------------- grouped: exhaustive and neal
def test_exhaustive_counts_products_of_group_subsets():
    assert MAX_POINTS == math.comb(24, 12)
    assert feasible_count(random_problem(10, 4, seed=0)) == math.comb(10, 4)
    problem = BlockProblem(-np.eye(7), [2, 0, 2], groups=[0, 0, 0, 1, 1, 2, 2])
    assert feasible_count(problem) == 3 * 1 * 1
    sol = get_backend("exhaustive").solve(problem)
    assert sol.info == {"evaluated": 3} and sol.x.tolist() == [1, 1, 0, 0, 0, 1, 1]


def test_exhaustive_takes_grouped_problems_above_n_24():
    wide = random_problem(28, 1, seed=1, group_size=4)  # 4^7 points
    sol = get_backend("exhaustive").solve(wide)
    assert sol.feasible and sol.info["evaluated"] == 4**7
    others = [wide.energy(wide.random_feasible(s)) for s in range(300)]
    assert sol.energy <= min(others) + 1e-12
    with pytest.raises(ProblemTooLarge, match="at most 2704156 feasible points"):
        get_backend("exhaustive").solve(random_problem(48, 2, seed=0, group_size=4))


def test_neal_counts_raw_feasibility_per_group():
    # penalty 0 and a negative diagonal: every raw read is all ones, so every
    # group is over its count; repair brings each group back to its count
    problem = BlockProblem(-np.eye(8), 2, groups=[0, 1] * 4)
    sol = get_backend("neal", penalty=0, num_reads=4, num_sweeps=20).solve(
        problem, seed=0
    )
    assert sol.info["raw_feasible_fraction"] == 0.0
    assert problem.count_ones(sol.x).tolist() == [2, 2]


@pytest.mark.parametrize("seed", range(3))
def test_neal_exact_on_grouped_problems(seed):
    problem = random_problem(16, 2, seed=seed, group_size=4)
    sol = get_backend("neal").solve(problem, seed=seed)
    assert sol.feasible
    assert sol.energy == pytest.approx(exact_optimum(problem), abs=1e-9)
