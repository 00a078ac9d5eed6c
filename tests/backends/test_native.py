"""The native SA backend: its C core, binding and Python wrapper."""

import itertools
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from icbs_opt.backends import get_backend
from icbs_opt.backends import native as native_module
from icbs_opt.cli import main
from icbs_opt.errors import BackendError, ProblemError
from icbs_opt.executors import solve_many
from icbs_opt.problems import BlockProblem, random_problem

_native = pytest.importorskip("icbs_opt._native")

REPO = Path(__file__).resolve().parents[2]


def native(**options):
    return get_backend("native", **options)


def exhaustive_energy(problem):
    return get_backend("exhaustive").solve(problem).energy


#: The binding's keyword arguments for a short run (tests of the binding itself).
BINDING_ARGS = dict(
    seed=0,
    num_restarts=1,
    beta_min=1.0,
    beta_max=2.0,
    beta_factor=1.1,
    sweeps_per_beta=1,
    sweep_size=4,
    num_threads=1,
    auto_schedule=False,
    auto_samples=16,
    auto_accept=0.5,
    auto_range=10.0,
)


# ------------------------------------------------------------------ C core
@pytest.mark.parametrize("openmp", [True, False], ids=["openmp", "serial"])
def test_c_core_tests_pass(tmp_path, openmp):
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed")
    if not (REPO / "native/test_sa.c").is_file():
        pytest.skip("native/test_sa.c is not here (installed from an sdist?)")
    exe = tmp_path / "test_sa"
    cmd = [gcc, "-O2", "-std=c99", "-Wall", "-Wextra"]
    cmd += ["-fopenmp"] if openmp else []
    cmd += [str(REPO / "native/test_sa.c"), str(REPO / "native/sa.c"), "-lm"]
    build = subprocess.run([*cmd, "-o", str(exe)], capture_output=True, text=True)
    if openmp and build.returncode != 0 and "fopenmp" in build.stderr:
        pytest.skip("gcc has no OpenMP here")
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().endswith(", 0 failed"), run.stdout


# --------------------------------------------------------------- answers
@pytest.mark.parametrize("n", [8, 12, 16])
@pytest.mark.parametrize("seed", [0, 1])
def test_exact_optimum_against_exhaustive(n, seed):
    for k in (1, n // 2, n - 1):
        problem = random_problem(n, k, seed=1000 * seed + 10 * n + k)
        sol = native().solve(problem, seed=seed)
        assert sol.feasible
        assert sol.energy == pytest.approx(exhaustive_energy(problem), abs=1e-9)


def small_random_problems(seeds=range(5), max_n=14):
    """Normal and uniform random Q, every n <= max_n and every k: 1190 problems."""
    for seed in seeds:
        for dist in ("normal", "uniform"):
            for n in range(1, max_n + 1):
                rng = np.random.default_rng([seed, n, dist == "normal"])
                if dist == "normal":
                    Q = rng.standard_normal((n, n))
                else:
                    Q = rng.uniform(-1.0, 1.0, (n, n))
                for k in range(n + 1):
                    yield BlockProblem(Q, k, meta={"dist": dist, "seed": seed})


def test_default_schedule_exact_on_small_random_problems():
    backend, exhaustive = native(), get_backend("exhaustive")
    misses, total = [], 0
    for problem in small_random_problems():
        total += 1
        sol = backend.solve(problem, seed=total)
        best = exhaustive.solve(problem).energy
        if sol.energy > best + 1e-9 * max(1.0, abs(best)):
            misses.append((problem.meta["dist"], problem.meta["seed"], problem.n))
    assert total >= 1000
    assert misses == []


def test_readme_example_is_exact():
    # The old auto schedule (mean uphill acceptance 0.1, sweeps of n) found -7.574.
    problem = BlockProblem(np.random.default_rng(0).standard_normal((12, 12)), 5)
    sol = native().solve(problem, seed=0)
    assert sol.energy == pytest.approx(exhaustive_energy(problem), abs=1e-12)
    assert sol.energy == pytest.approx(-9.011, abs=1e-3)


@pytest.mark.parametrize(("n", "k"), [(2, 1), (3, 2), (50, 7), (300, 150), (300, 299)])
def test_feasible_and_energy_consistent(n, k):
    problem = random_problem(n, k, seed=n + k)
    sol = native(num_restarts=3).solve(problem, seed=5)
    assert sol.feasible and int(sol.x.sum()) == k
    assert sol.x.dtype == np.int8
    info = sol.info
    assert min(info["restart_energies"]) == pytest.approx(sol.energy, rel=1e-12)
    assert info["restart_energies"][info["best_restart"]] == min(
        info["restart_energies"]
    )


def test_same_seed_same_answer_for_any_thread_count():
    problem = random_problem(600, 250, seed=9)  # n >= 512 runs restarts in parallel
    runs = [
        native(num_restarts=6, num_threads=t).solve(problem, seed=3) for t in (1, 2, 0)
    ]
    for sol in runs[1:]:
        assert sol.x.tolist() == runs[0].x.tolist()
        assert sol.info["restart_energies"] == runs[0].info["restart_energies"]
        assert sol.info["restart_sweeps"] == runs[0].info["restart_sweeps"]
    if _native.openmp and _native.max_threads() > 1:
        assert runs[1].info["num_threads"] == 2
    assert runs[0].info["num_threads"] == 1
    other = native(num_restarts=6).solve(problem, seed=4)
    assert other.info["restart_energies"] != runs[0].info["restart_energies"]


def test_unseeded_runs_report_a_seed_that_repeats_them():
    problem = random_problem(200, seed=2)
    first = native(num_restarts=2).solve(problem)
    other = native(num_restarts=2).solve(problem, seed=None)
    assert first.info["seed"] != other.info["seed"]
    again = native(num_restarts=2).solve(problem, seed=first.info["seed"])
    assert again.x.tolist() == first.x.tolist()
    assert again.info["restart_energies"] == first.info["restart_energies"]
    assert native().solve(problem, seed=2**100).info["seed"] == 2**100


# ------------------------------------------------------------ warm starts
def test_warm_start_at_optimum_with_cold_schedule_stays():
    problem = random_problem(12, 5, seed=4)
    opt = get_backend("exhaustive").solve(problem)
    cold = native(schedule="fixed", beta_min=1e6, beta_max=1e6, num_restarts=4)
    sol = cold.solve(problem, seed=0, x0=opt.x)
    assert sol.x.tolist() == opt.x.tolist()
    assert sol.info["restart_energies"] == pytest.approx([opt.energy] * 4, abs=1e-12)
    assert sol.info["restart_descent_swaps"] == [0] * 4


def test_warm_start_is_used():
    # Two basins: {0, 1} (energy -20) is a swap-local minimum, {2, 3} (-22) global.
    Q = np.zeros((4, 4))
    Q[0, 1] = Q[1, 0] = -10.0
    Q[2, 3] = Q[3, 2] = -11.0
    problem = BlockProblem(Q, 2)
    cold = native(schedule="fixed", beta_min=1e6, beta_max=1e6, num_restarts=3)
    assert cold.solve(problem, seed=0, x0=[1, 1, 0, 0]).x.tolist() == [1, 1, 0, 0]
    assert native().solve(problem, seed=0).x.tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("seed", range(4))
def test_answer_never_worse_than_warm_start(seed):
    problem = random_problem(60, 25, seed=seed)
    x0 = problem.random_feasible(seed=seed)
    hot = native(schedule="fixed", beta_min=1e-6, beta_max=1e-5, num_restarts=2)
    sol = hot.solve(problem, seed=seed, x0=x0)
    assert sol.energy <= problem.energy(x0) + 1e-12


# ------------------------------------------------------- sizes and cases
@pytest.mark.parametrize("k", [0, 1])
def test_single_variable(k):
    sol = native().solve(BlockProblem([[3.0]], k), seed=0)
    assert sol.x.tolist() == [k]
    assert sol.energy == 3.0 * k


@pytest.mark.parametrize("k", [0, 7])
def test_k_zero_and_k_n(k):
    problem = random_problem(7, k, seed=1)
    sol = native().solve(problem, seed=0)
    assert sol.x.tolist() == [1 if k else 0] * 7
    assert sol.info["restart_sweeps"] == [0] * 10
    assert sol.energy == pytest.approx(problem.energy(sol.x))


@pytest.mark.slow
def test_n_16384_smoke_with_short_schedule():
    # Through the binding: a BlockProblem of this size would hold several 2 GiB
    # copies of Q; here Q (2 GiB) is made once. The diagonal makes the optimum
    # known (the k smallest diagonal entries).
    n, k = 16384, 8192
    Q = np.zeros((n, n))
    diag = np.random.default_rng(0).permutation(n).astype(np.float64)
    Q[np.diag_indices(n)] = diag
    args = {**BINDING_ARGS, "seed": 1, "beta_max": 1.0, "sweep_size": n}
    x, info = _native.solve(Q, k, None, **{**args, "num_threads": 0})
    assert x.dtype == np.int8 and int(x.sum()) == k
    assert set(np.flatnonzero(x)) == set(np.argsort(diag)[:k])
    assert info["num_betas"] == 1
    assert info["restart_energies"][info["best_restart"]] == diag[diag < k].sum()


# ---------------------------------------------------------------- schedule
def test_info_auto_schedule():
    problem = random_problem(100, seed=3)
    info = native(num_restarts=3).solve(problem, seed=0).info
    assert info["schedule"] == "auto"
    assert info["beta_max"] == pytest.approx(
        native_module.AUTO_RANGE * info["beta_min"]
    )
    steps = np.log(native_module.AUTO_RANGE) / np.log(1.1)
    assert info["num_betas"] == int(np.floor(steps + 1e-9)) + 1
    assert info["sweep_size"] == 100
    assert len(info["restart_energies"]) == len(info["restart_sweeps"]) == 3
    assert all(1 <= s <= info["num_betas"] for s in info["restart_sweeps"])
    assert info["openmp"] == bool(_native.openmp)


def test_sweeps_of_small_problems_have_min_sweep_size_proposals():
    problem = random_problem(10, seed=3)
    info = native(num_restarts=2).solve(problem, seed=0).info
    assert info["sweep_size"] == native_module.MIN_SWEEP_SIZE


@pytest.mark.parametrize(
    ("n", "k", "target"),
    [(10, 5, "AUTO_ACCEPT_SMALL"), (64, 20, "AUTO_ACCEPT_SMALL"),
     (65, 20, "AUTO_ACCEPT_LARGE"), (200, 8, "AUTO_ACCEPT_LARGE")],
)  # fmt: skip
def test_auto_schedule_hits_its_acceptance_target(n, k, target):
    # Every swap of the start state is sampled (k (n - k) <= AUTO_SAMPLES), so
    # the mean uphill acceptance at beta_min can be recomputed exactly: hot for
    # n <= SMALL_N (exact on small problems), colder above (fast on real blocks).
    assert native_module.SMALL_N == 64
    problem = random_problem(n, k, seed=4)
    x0 = problem.random_feasible(seed=0)
    info = native(num_restarts=1).solve(problem, seed=0, x0=x0).info
    assert info["auto_accept"] == getattr(native_module, target)
    ones, zeros = np.flatnonzero(x0), np.flatnonzero(x0 == 0)
    Q, f = problem.Q, problem.Q @ x0
    d = [
        Q[i, i] - 2 * f[i] + Q[j, j] + 2 * f[j] - 2 * Q[i, j]
        for i in ones
        for j in zeros
    ]
    up = np.array([v for v in d if v > 0])
    acceptance = np.exp(-info["beta_min"] * up).mean()
    assert acceptance == pytest.approx(info["auto_accept"], rel=1e-4)


def test_docs_quote_the_schedule_constants():
    # docs/backends.md states each constant's value: they are owned by the wrapper.
    doc = (REPO / "docs/backends.md").read_text()
    for name in (
        "FIXED_BETA_MIN",
        "FIXED_BETA_MAX",
        "AUTO_SAMPLES",
        "AUTO_ACCEPT_SMALL",
        "AUTO_ACCEPT_LARGE",
        "SMALL_N",
        "AUTO_RANGE",
        "MIN_SWEEP_SIZE",
        "MIN_BETA_FACTOR",
    ):
        assert f"| `{name}` | {getattr(native_module, name):g} |" in doc, name


def test_auto_schedule_follows_q_scale():
    problem = random_problem(80, seed=6)
    scaled = BlockProblem(problem.Q * 50.0, problem.k)
    a = native().solve(problem, seed=1).info["beta_min"]
    b = native().solve(scaled, seed=1).info["beta_min"]
    assert b == pytest.approx(a / 50.0, rel=1e-4)


def test_info_fixed_schedule_defaults_to_reference():
    info = native(schedule="fixed").solve(random_problem(30, seed=0), seed=0).info
    assert (info["beta_min"], info["beta_max"]) == (
        native_module.FIXED_BETA_MIN,
        native_module.FIXED_BETA_MAX,
    )
    assert info["num_betas"] == 121  # 1e-3 * 1.1**120 <= 100 < 1e-3 * 1.1**121
    assert info["auto_accept"] is None
    sweeps = native(schedule="fixed", sweeps_per_beta=3).solve(
        random_problem(30, seed=0), seed=0
    )
    assert all(s % 3 == 0 for s in sweeps.info["restart_sweeps"])


def test_releases_the_gil():
    problem = random_problem(1200, seed=8)
    backend = native(schedule="fixed", num_restarts=4, num_threads=1)
    started = threading.Event()

    def work():
        started.set()
        backend.solve(problem, seed=0)

    thread = threading.Thread(target=work)
    thread.start()
    started.wait()
    spins = 0
    while thread.is_alive():
        spins += 1
    thread.join()
    assert spins > 1000  # the main thread ran while the core was annealing


def _solve_in_child(problem, queue):
    sol = native(num_restarts=4).solve(problem, seed=0)
    queue.put((sol.x.tolist(), sol.info["num_threads"]))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_solves_after_parent_used_threads():
    problem = random_problem(600, seed=0)
    parent = native(num_restarts=4, num_threads=2).solve(problem, seed=0)
    if parent.info["num_threads"] < 2:
        pytest.skip("no OpenMP threads in this build")
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_solve_in_child, args=(problem, queue))
    child.start()
    child.join(timeout=60)
    if child.is_alive():  # GNU libgomp's pool did not survive the fork: a hang
        child.kill()
        child.join()
        pytest.fail("the forked child hung in the native solver")
    assert child.exitcode == 0
    x, threads = queue.get(timeout=5)
    assert x == parent.x.tolist() and threads == 1


# ---------------------------------------------------------------- grouped
def brute_force_groups(problem):
    """The optimum over every x with each group's count (products of subsets)."""
    members = [np.flatnonzero(problem.groups == g) for g in range(problem.num_groups)]
    choices = [
        itertools.combinations(m.tolist(), int(c))
        for m, c in zip(members, problem.group_counts, strict=True)
    ]
    best = np.inf
    for pick in itertools.product(*choices):
        x = np.zeros(problem.n)
        x[[i for ones in pick for i in ones]] = 1
        best = min(best, float(x @ problem.Q @ x))
    return best


def assert_feasible_per_group(problem, sol):
    assert sol.x.dtype == np.int8
    assert problem.count_ones(sol.x).tolist() == problem.group_counts.tolist()
    assert sol.feasible
    assert sol.energy == problem.energy(sol.x)


def grouped_cases(seed):
    """N:M, round-robin, unequal and partly fixed groupings of small problems."""
    rng = np.random.default_rng(seed)
    Q = rng.standard_normal((14, 14))
    return [
        random_problem(8, 2, seed=seed, group_size=4),  # 2:4
        random_problem(12, 2, seed=seed, group_size=4),
        random_problem(16, 4, seed=seed, group_size=8),  # 4:8
        random_problem(12, 1, seed=seed, group_size=3),
        BlockProblem(Q[:12, :12], 2, groups=np.arange(12) % 3),  # not contiguous
        BlockProblem(
            Q, [1, 4, 0, 2], groups=[3, 1, 1, 0, 2, 1, 3, 1, 0, 1, 3, 1, 1, 0]
        ),
        BlockProblem(Q[:9, :9], [0, 2, 3], groups=[0, 1, 1, 2, 2, 2, 1, 0, 1]),
    ]


@pytest.mark.parametrize("seed", range(3))
def test_grouped_exact_optimum_against_brute_force(seed):
    for case, problem in enumerate(grouped_cases(seed)):
        best = brute_force_groups(problem)
        for schedule in ("auto", "fixed"):
            sol = native(schedule=schedule).solve(problem, seed=seed)
            assert_feasible_per_group(problem, sol)
            assert sol.energy == pytest.approx(best, abs=1e-9), (case, schedule)


def test_grouped_default_schedule_exact_on_many_small_problems():
    backend, misses, total = native(), [], 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        n = int(rng.integers(4, 13))
        G = int(rng.integers(2, min(n, 5) + 1))
        groups = np.concatenate([np.arange(G), rng.integers(0, G, n - G)])
        rng.shuffle(groups)
        sizes = np.bincount(groups, minlength=G)
        counts = [int(rng.integers(0, s + 1)) for s in sizes]
        problem = BlockProblem(rng.standard_normal((n, n)), counts, groups=groups)
        total += 1
        sol = backend.solve(problem, seed=seed)
        assert_feasible_per_group(problem, sol)
        if sol.energy > brute_force_groups(problem) + 1e-9:
            misses.append(seed)
    assert total == 40 and misses == []


@pytest.mark.parametrize(
    ("n", "group_size", "count"), [(256, 4, 2), (256, 8, 4), (300, 3, 1), (64, 8, 7)]
)
def test_grouped_feasible_and_energy_consistent(n, group_size, count):
    problem = random_problem(n, count, seed=n + group_size, group_size=group_size)
    sol = native(num_restarts=3).solve(problem, seed=2)
    assert_feasible_per_group(problem, sol)
    info = sol.info
    assert min(info["restart_energies"]) == pytest.approx(sol.energy, rel=1e-12)
    assert info["num_groups"] == n // group_size
    assert info["movable_groups"] == n // group_size


def test_grouped_same_seed_same_answer_for_any_thread_count():
    problem = random_problem(600, 2, seed=9, group_size=4)
    runs = [
        native(num_restarts=6, num_threads=t).solve(problem, seed=3) for t in (1, 2, 0)
    ]
    assert_feasible_per_group(problem, runs[0])
    for sol in runs[1:]:
        assert sol.x.tolist() == runs[0].x.tolist()
        assert sol.info["restart_energies"] == runs[0].info["restart_energies"]
        assert sol.info["restart_sweeps"] == runs[0].info["restart_sweeps"]
    again = native(num_restarts=6).solve(problem, seed=3)
    assert again.x.tolist() == runs[0].x.tolist()
    other = native(num_restarts=6).solve(problem, seed=4)
    assert other.info["restart_energies"] != runs[0].info["restart_energies"]


def test_grouped_solve_many_matches_solve():
    problems = [random_problem(64, 2, seed=s, group_size=4) for s in range(3)]
    problems.append(BlockProblem(np.eye(6), [1, 0, 2], groups=[0, 1, 2, 0, 2, 2]))
    backend = native(num_restarts=2)
    batch = solve_many(backend, problems, [5, 6, 7, 8], workers=2)
    for problem, seed, sol in zip(problems, [5, 6, 7, 8], batch, strict=True):
        assert_feasible_per_group(problem, sol)
        assert sol.x.tolist() == backend.solve(problem, seed=seed).x.tolist()
        assert sol.info["num_threads"] == 1  # side by side: one thread each
    assert backend.parameters["num_threads"] == 0  # the batch ran on a copy


def test_single_group_is_the_ungrouped_problem():
    # BlockProblem normalises one group to the ungrouped problem: same path, answer.
    Q = random_problem(40, seed=1).Q
    one = BlockProblem(Q, 15, groups=np.zeros(40, dtype=int))
    plain = native(num_restarts=3).solve(BlockProblem(Q, 15), seed=4)
    sol = native(num_restarts=3).solve(one, seed=4)
    assert sol.x.tolist() == plain.x.tolist()
    assert sol.info["restart_energies"] == plain.info["restart_energies"]
    assert (plain.info["num_groups"], plain.info["movable_groups"]) == (1, 1)


def test_grouped_fixed_groups_never_move():
    problem = BlockProblem(
        random_problem(9, seed=2).Q, [0, 3, 0], groups=[0, 0, 0, 1, 1, 1, 2, 2, 2]
    )
    sol = native().solve(problem, seed=0)
    assert sol.x.tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0]
    assert sol.info["restart_sweeps"] == [0] * 10
    assert sol.info["movable_groups"] == 0
    assert sol.info["restart_energies"] == pytest.approx([sol.energy] * 10, abs=1e-12)
    # One movable group among fixed ones: only it changes.
    mixed = BlockProblem(problem.Q, [0, 3, 1], groups=problem.groups)
    sol = native().solve(mixed, seed=0)
    assert sol.x[:6].tolist() == [0, 0, 0, 1, 1, 1] and int(sol.x[6:].sum()) == 1
    assert sol.energy == pytest.approx(brute_force_groups(mixed), abs=1e-12)


def test_grouped_warm_start_at_optimum_with_cold_schedule_stays():
    problem = random_problem(12, 1, seed=4, group_size=3)
    best = brute_force_groups(problem)
    opt = native().solve(problem, seed=0)
    assert opt.energy == pytest.approx(best, abs=1e-12)
    cold = native(schedule="fixed", beta_min=1e6, beta_max=1e6, num_restarts=4)
    sol = cold.solve(problem, seed=1, x0=opt.x)
    assert sol.x.tolist() == opt.x.tolist()
    assert sol.info["restart_descent_swaps"] == [0] * 4


@pytest.mark.parametrize("seed", range(3))
def test_grouped_answer_never_worse_than_warm_start(seed):
    problem = random_problem(64, 3, seed=seed, group_size=8)
    x0 = problem.random_feasible(seed=seed)
    hot = native(schedule="fixed", beta_min=1e-6, beta_max=1e-5, num_restarts=2)
    sol = hot.solve(problem, seed=seed, x0=x0)
    assert_feasible_per_group(problem, sol)
    assert sol.energy <= problem.energy(x0) + 1e-12


def test_grouped_warm_start_infeasible_per_group_refused():
    problem = random_problem(8, 2, seed=0, group_size=4)
    with pytest.raises(ProblemError, match="x0 must have exactly 2 ones in group 0"):
        native().solve(problem, x0=[1, 1, 1, 0, 1, 0, 0, 0])


def test_grouped_auto_schedule_hits_its_acceptance_target():
    # 4 groups of 4 with 2 ones: 16 swaps <= AUTO_SAMPLES, so every swap inside a
    # group is sampled and the acceptance at beta_min can be recomputed exactly.
    problem = random_problem(16, 2, seed=4, group_size=4)
    x0 = problem.random_feasible(seed=0)
    info = native(num_restarts=1).solve(problem, seed=0, x0=x0).info
    Q, f = problem.Q, problem.Q @ x0
    d = [
        Q[i, i] - 2 * f[i] + Q[j, j] + 2 * f[j] - 2 * Q[i, j]
        for g in range(4)
        for i in np.flatnonzero((x0 == 1) & (problem.groups == g))
        for j in np.flatnonzero((x0 == 0) & (problem.groups == g))
    ]
    up = np.array([v for v in d if v > 0])
    acceptance = np.exp(-info["beta_min"] * up).mean()
    assert acceptance == pytest.approx(native_module.AUTO_ACCEPT_SMALL, rel=1e-4)


def test_grouped_proposals_uniform_over_feasible_swaps():
    # Q = 0: every swap changes nothing and is accepted, so a restart makes one
    # sweep, here of one proposal, and ends where that proposal took it. Group 0
    # (1 of 2: 1 swap) and group 1 (3 of 6: 9 swaps), group 2 fixed: proposals
    # uniform over the 10 swaps move group 0 once in 10 (uniform over the movable
    # groups would move it once in 2). 400 seeded runs: about 40 (sd 6).
    problem = BlockProblem(
        np.zeros((11, 11)), [1, 3, 3], groups=[0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2]
    )
    x0 = np.array([1, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1], np.int8)
    groups = {
        "groups": problem.groups.astype(np.int32),
        "counts": problem.group_counts.astype(np.int64),
    }
    moved = 0
    for seed in range(400):
        args = {**BINDING_ARGS, "sweep_size": 1, "seed": seed}
        x, info = _native.solve(problem.Q, problem.k, x0, **groups, **args)
        assert info["restart_accepted"].tolist() == [1]
        assert problem.count_ones(x).tolist() == [1, 3, 3]
        assert x[8:].tolist() == [1, 1, 1]
        moved += x[0] == 0
    assert 15 <= moved <= 70


def test_binding_checks_group_types():
    Q = np.eye(4)
    groups = np.array([0, 0, 1, 1], np.int32)
    counts = np.array([1, 1], np.int64)
    x, _ = _native.solve(Q, 2, None, groups=groups, counts=counts, **BINDING_ARGS)
    assert x[:2].sum() == 1 and x[2:].sum() == 1
    with pytest.raises(TypeError, match="groups and counts must both be None"):
        _native.solve(Q, 2, None, groups=groups, **BINDING_ARGS)
    with pytest.raises(TypeError, match="groups and counts must both be None"):
        _native.solve(
            Q, 2, None, groups=groups.astype(np.int64), counts=counts, **BINDING_ARGS
        )
    with pytest.raises(TypeError, match="groups and counts must both be None"):
        _native.solve(Q, 2, None, groups=groups[:3], counts=counts, **BINDING_ARGS)
    with pytest.raises(TypeError, match="groups and counts must both be None"):
        _native.solve(Q, 2, None, groups=groups, counts=counts[:0], **BINDING_ARGS)
    # Values are the core's to refuse (the wrapper never passes such arrays).
    with pytest.raises(ValueError, match="rejected its arguments"):
        _native.solve(Q, 2, None, groups=groups + 1, counts=counts, **BINDING_ARGS)
    with pytest.raises(ValueError, match="rejected its arguments"):
        _native.solve(Q, 2, None, groups=groups, counts=counts * 3, **BINDING_ARGS)
    bad_x0 = np.array([1, 1, 0, 0], np.int8)
    with pytest.raises(ValueError, match="rejected its arguments"):
        _native.solve(Q, 2, bad_x0, groups=groups, counts=counts, **BINDING_ARGS)


# ------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("options", "match"),
    [
        (
            {"num_restarts": 0},
            "backend 'native': option 'num_restarts' must be an integer >= 1, got 0",
        ),
        (
            {"num_restarts": 2.5},
            "option 'num_restarts' must be an integer >= 1, got 2.5",
        ),
        (
            {"num_restarts": 10**23},
            "option 'num_restarts' must be an integer <= 9223372036854775807, "
            "got 100000000000000000000000",
        ),
        (
            {"num_restarts": 1e23},
            "option 'num_restarts' must be an integer >= 1, got 1e\\+23",
        ),
        (
            {"schedule": "hot"},
            "option 'schedule'.*got 'hot': expected one of 'auto', 'fixed'",
        ),
        (
            {"schedule": "fixed", "beta_min": 0},
            "backend 'native': option 'beta_min' must be a finite number > 0, got 0",
        ),
        (
            {"schedule": "fixed", "beta_max": float("inf")},
            "option 'beta_max' must .*got inf",
        ),
        (
            {"beta_factor": 1.0000000001},
            "option 'beta_factor' must be a finite number >= 1.0001, got 1.0000000001",
        ),
        ({"beta_factor": 1.0}, "option 'beta_factor' must .*>= 1.0001, got 1.0"),
        ({"beta_factor": "x"}, "option 'beta_factor' must .*>= 1.0001, got 'x'"),
        ({"sweeps_per_beta": 0}, "option 'sweeps_per_beta' must .*got 0"),
        ({"sweeps_per_beta": 2**63}, "option 'sweeps_per_beta' must be an integer <= "),
        (
            {"num_threads": -1},
            "backend 'native': option 'num_threads' must be an integer in "
            "\\[0, 2147483647\\], got -1",
        ),
        ({"num_threads": 2**31}, "option 'num_threads' must be .*got 2147483648"),
        (
            {"beta_min": 0.1},
            "option 'beta_min' of backend 'native' applies only with "
            "schedule='fixed', got beta_min=0.1 with schedule='auto'",
        ),
        ({"beta_max": 5}, "'beta_max' .*applies only with schedule='fixed'"),
        (
            {"schedule": "fixed", "beta_min": 10, "beta_max": 1},
            "option 'beta_max' of backend 'native' must be >= beta_min, "
            "got beta_min=10.0, beta_max=1.0",
        ),
        ({"schedule": "fixed", "beta_min": 500}, "got beta_min=500.0, beta_max=100.0"),
        ({"restarts": 3}, "unknown option 'restarts' for backend 'native'"),
    ],
)
def test_bad_options(options, match):
    with pytest.raises(BackendError, match=match):
        native(**options)


def test_smallest_beta_factor_runs():
    # The shortest steps allowed: 1e-3 .. 100 in 115136 temperatures.
    problem = random_problem(4, 2, seed=0)
    backend = native(schedule="fixed", beta_factor=native_module.MIN_BETA_FACTOR)
    sol = backend.solve(problem, seed=0)
    assert sol.info["num_betas"] == 115136  # floor(log(1e5) / log(1.0001)) + 1
    assert sol.energy == pytest.approx(exhaustive_energy(problem), abs=1e-12)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (
            "beta_factor=1.0000000001",
            "option 'beta_factor' must be a finite number >= 1.0001",
        ),
        (
            "num_restarts=" + "1" + "0" * 23,
            "option 'num_restarts' must be an integer <= ",
        ),
        (
            "num_restarts=None",
            "option 'num_restarts' must be an integer >= 1, got 'None'",
        ),
        (
            "num_threads=-2",
            "option 'num_threads' must be an integer in [0, 2147483647]",
        ),
    ],
)
def test_cli_bad_option_one_line_exit_2(tmp_path, capsys, option, message):
    path = tmp_path / "block.npz"
    random_problem(6, 3, seed=0).save(path)
    rc = main(["solve", str(path), "--backend", "native", "--backend-option", option])
    out, err = capsys.readouterr()
    assert rc == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert message in err


def test_options_from_command_line_strings():
    backend = native(num_restarts="3", schedule="fixed", beta_min="0.01")
    assert backend.parameters["num_restarts"] == 3
    assert backend.parameters["beta_min"] == 0.01


def test_bad_solve_arguments():
    problem = random_problem(6, 3, seed=0)
    with pytest.raises(ProblemError, match="x0 must have exactly k = 3 ones, got 2"):
        native().solve(problem, x0=[1, 1, 0, 0, 0, 0])
    with pytest.raises(ProblemError, match="seed must be a non-negative integer"):
        native().solve(problem, seed=-1)


def test_binding_checks_types():
    Q = np.eye(4)
    args = BINDING_ARGS
    with pytest.raises(TypeError, match="C-contiguous float64"):
        _native.solve(Q.astype(np.float32), 2, None, **args)
    with pytest.raises(TypeError, match="C-contiguous float64"):
        _native.solve(np.asfortranarray(np.ones((4, 4)))[:, :3], 2, None, **args)
    with pytest.raises(TypeError, match="numpy array"):
        _native.solve(Q.tolist(), 2, None, **args)
    with pytest.raises(TypeError, match="x0 must be None or a contiguous int8"):
        _native.solve(Q, 2, np.array([1, 1, 0, 0]), **args)
    with pytest.raises(ValueError, match="rejected its arguments"):
        _native.solve(Q, 5, None, **args)
    with pytest.raises(TypeError, match="stop must be None or a writable"):
        _native.solve(Q, 2, None, stop=np.zeros(1, np.int64), **args)
    x, info = _native.solve(np.zeros((0, 0)), 0, None, **args)
    assert x.shape == (0,) and info["best_restart"] == -1


def test_explicit_none_means_the_default():
    backend = get_backend("native", num_restarts=None, schedule=None, num_threads=None)
    assert backend.parameters["num_restarts"] == 10
    assert backend.parameters["schedule"] == "auto"


# ---------------------------------------------------------------- interrupts
#: A schedule of 115,000 temperatures: minutes on a problem of n = 1000.
LONG = dict(schedule="fixed", beta_factor=1.0001, num_restarts=2, num_threads=1)


@pytest.fixture(scope="module")
def big_problem():
    return random_problem(1000, 500, seed=0)


def send_sigint_later(seconds):
    """SIGINT to the main thread after ``seconds``; returns the timer."""
    main_id = threading.main_thread().ident
    timer = threading.Timer(seconds, signal.pthread_kill, (main_id, signal.SIGINT))
    timer.start()
    return timer


def test_stop_flag_ends_a_core_call_in_another_thread(big_problem):
    stop = np.zeros(1, np.int32)
    errors = []
    args = {**BINDING_ARGS, "beta_min": 1e-3, "beta_max": 100.0, "beta_factor": 1.0001}
    args["sweep_size"] = big_problem.n

    def run():
        try:
            _native.solve(big_problem.Q, big_problem.k, None, stop=stop, **args)
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    time.sleep(0.3)
    assert worker.is_alive()
    stop[0] = 1
    start = time.perf_counter()
    worker.join(5)
    assert not worker.is_alive() and time.perf_counter() - start < 1.0
    assert len(errors) == 1 and isinstance(errors[0], KeyboardInterrupt)


def test_ctrl_c_ends_a_solve_within_a_second(big_problem):
    timer = send_sigint_later(0.5)
    start = time.perf_counter()
    try:
        with pytest.raises(KeyboardInterrupt):
            native(**LONG).solve(big_problem, seed=0)
    finally:
        timer.cancel()
    assert time.perf_counter() - start < 1.5
    assert native().solve(random_problem(8, 4, seed=0), seed=0).feasible  # still fine


def test_ctrl_c_ends_solve_many_within_a_second(big_problem):
    timer = send_sigint_later(0.5)
    start = time.perf_counter()
    try:
        with pytest.raises(KeyboardInterrupt):
            solve_many(native(**LONG), [big_problem] * 3, [0, 1, 2], workers=2)
    finally:
        timer.cancel()
    assert time.perf_counter() - start < 1.5

    def pool_threads():
        return [t for t in threading.enumerate() if t.name.startswith("icbs-native_")]

    while pool_threads() and time.perf_counter() - start < 1.5:
        time.sleep(0.01)
    assert pool_threads() == []


@pytest.mark.parametrize(
    ("signum", "status", "word"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
)
def test_cli_solve_stops_within_a_second(tmp_path, big_problem, signum, status, word):
    path = tmp_path / "big.npz"
    big_problem.save(path)
    options = [f"--backend-option={k}={v}" for k, v in LONG.items()]
    script = (
        "import sys; from icbs_opt.cli import main; print('ready', flush=True); "
        "sys.exit(main(sys.argv[1:]))"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, "solve", str(path), *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline() == "ready\n"
        time.sleep(1.0)  # loading, then well inside the solve
        assert child.poll() is None
        child.send_signal(signum)
        start = time.perf_counter()
        code = child.wait(timeout=10)
        seconds = time.perf_counter() - start
    finally:
        child.kill()
        child.wait()
    err = child.stderr.read()
    assert code == status and err == f"icbs-opt: {word}\n"
    assert seconds < 1.5
