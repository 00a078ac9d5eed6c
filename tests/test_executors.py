"""Batches of block problems: serial, threads and a real Dask LocalCluster agree."""

import dataclasses
import sys
import threading
import time

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_info

from icbs_opt.backends import available_backends, backend_class, get_backend
from icbs_opt.cli import main
from icbs_opt.errors import (
    ExecutorError,
    ExecutorUnavailable,
    ProblemError,
)
from icbs_opt.executors import (
    DaskExecutor,
    Executor,
    _solve_on_worker,
    make_executor,
    solve_many,
    torch_threads,
)
from icbs_opt.problems import BlockProblem, random_problem
from tests.tiny import FAST_OPTIONS, local_cluster

BACKENDS = list(available_backends())
#: Slow backends get fewer and smaller problems (braket evaluates on a device).
SLOW = ("braket-local", "braket")


def make_backend(name, **options):
    options = {**FAST_OPTIONS.get(name, {}), **options}
    if name == "braket":
        from braket.devices import LocalSimulator

        options.setdefault("device", LocalSimulator())
    return get_backend(name, **options)


def batch(name):
    """Problems (n <= 10), seeds and warm starts, with k = 0 and k = n cases."""
    sizes = [(6, 3), (6, 2), (5, 0)] if name in SLOW else [(6, 3), (8, 3), (10, 5)]
    problems = [random_problem(n, k, seed=10 + i) for i, (n, k) in enumerate(sizes)]
    if name not in SLOW:
        problems += [random_problem(7, 7, seed=1), random_problem(9, 4, seed=2)]
    seeds = [3 * i + 1 for i in range(len(problems))]
    x0s = [None if i % 2 else p.random_feasible(seed=i) for i, p in enumerate(problems)]
    return problems, seeds, x0s


def assert_same(expected, got):
    assert len(expected) == len(got)
    for a, b in zip(expected, got, strict=True):
        assert np.array_equal(a.x, b.x) and a.x.dtype == b.x.dtype
        assert a.energy == b.energy and a.feasible == b.feasible


@pytest.fixture(scope="module")
def cluster():
    """A real two-process Dask cluster on the loopback interface."""
    with local_cluster(2, threads_per_worker=1, processes=True) as local:
        yield local.scheduler_address.replace("tcp://", "dask://")


@pytest.fixture(scope="module")
def dask_executor(cluster):
    with make_executor(cluster) as executor:
        yield executor


@pytest.mark.parametrize("name", BACKENDS)
def test_solve_many_equals_solve(name, dask_executor):
    reason = available_backends()[name]
    if name == "braket":  # unavailable without an ARN; runs on a LocalSimulator
        pytest.importorskip("braket")
    elif reason is not None:
        pytest.skip(f"{name}: {reason}")
    backend = make_backend(name)
    problems, seeds, x0s = batch(name)
    # braket samples on the (unseeded) device; at n = 6 with 2000 shots every
    # feasible state is seen, so both runs return the unique optimum.
    serial = [
        backend.solve(p, seed=s, x0=x)
        for p, s, x in zip(problems, seeds, x0s, strict=True)
    ]
    assert_same(serial, solve_many(backend, problems, seeds, x0s, workers=1))
    seen = []
    threads = make_executor(workers=3).solve_many(
        backend, problems, seeds, x0s, done=lambda i, sol: seen.append(i)
    )
    assert_same(serial, threads)
    assert sorted(seen) == list(range(len(problems)))
    if not backend.portable:  # braket with a device object: not rebuildable
        with pytest.raises(ExecutorError, match="cannot be rebuilt on a Dask worker"):
            dask_executor.solve_many(backend, problems, seeds, x0s)
        return
    assert_same(serial, dask_executor.solve_many(backend, problems, seeds, x0s))


@pytest.mark.parametrize("name", BACKENDS)
def test_parameters_rebuild_the_backend(name):
    cls = backend_class(name)
    options = {
        "braket": {"s3_folder": "s3://bucket/prefix", "initial_angles": "1,2,3,4"},
        "braket-local": {"initial_angles": "0.1,0.2,0.3,0.4"},
    }.get(name, {})
    backend = cls(**options)
    assert cls(**backend.parameters).parameters == backend.parameters


def test_dask_basics(dask_executor):
    assert dask_executor.description.endswith("(2 workers, 2 threads)")
    assert dask_executor.description.startswith("tcp://127.0.0.1:")
    backend = get_backend("exhaustive")
    assert dask_executor.solve_many(backend, [], []) == []
    problem = random_problem(6, 3, seed=0)
    with pytest.raises(ProblemError, match="x0 must have exactly k = 3 ones, got 1"):
        dask_executor.solve_many(
            backend, [problem, problem], [0, 1], [None, [1] + [0] * 5]
        )
    with pytest.raises(ProblemError, match="at most n = 24"):
        dask_executor.solve_many(backend, [random_problem(25, 3, seed=0)], [0])
    # at most one task in flight: same answers
    with make_executor(dask_executor.address, workers=1) as one:
        problems = [random_problem(8, 4, seed=i) for i in range(3)]
        native = get_backend("native", num_restarts=2)
        expected = solve_many(native, problems, [5, 6, 7])
        assert_same(expected, one.solve_many(native, problems, [5, 6, 7]))


def test_worker_checks_the_version():
    with pytest.raises(ExecutorUnavailable, match="install the same version"):
        arrays = BlockProblem(np.eye(2), 1).to_arrays()
        _solve_on_worker("0.0.0", "exhaustive", {}, arrays, None, 0)


@pytest.mark.parametrize("name", ["native", "exhaustive", "neal"])
def test_grouped_problems_keep_their_groups_on_dask(name, dask_executor):
    # N:M blocks: each group of 4 keeps 2 (k = 2 per group), or counts per group
    problems = [random_problem(8, 2, seed=1, group_size=4),
                random_problem(12, [1, 2, 3], seed=2, group_size=4)]  # fmt: skip
    backend = make_backend(name)
    serial = [backend.solve(p, seed=5) for p in problems]
    got = dask_executor.solve_many(backend, problems, [5, 5])
    assert_same(serial, got)
    for problem, solution in zip(problems, got, strict=True):
        counts = problem.count_ones(solution.x)
        assert counts.tolist() == problem.group_counts.tolist()
        assert solution.energy == pytest.approx(problem.energy(solution.x))


def test_compare_cli_on_the_cluster(cluster, tmp_path, capsys):
    for i, n in enumerate((6, 8, 10)):
        random_problem(n, n // 2, seed=i).save(tmp_path / f"p{i}.npz")
    random_problem(26, 13, seed=9).save(tmp_path / "large.npz")
    argv = ["compare", "--problems", str(tmp_path), "--backends", "exhaustive,neal"]
    argv += ["--backend-option", "neal.num_reads=3", "--repeats", "2", "--json", "-"]
    assert main(argv) == 0
    serial = capsys.readouterr().out
    assert main([*argv, "--executor", cluster, "--workers", "3"]) == 0
    on_cluster = capsys.readouterr().out
    assert main([*argv, "--executor", "threads", "--workers", "2"]) == 0
    threads = capsys.readouterr().out

    def answers(text):
        import json

        runs = json.loads(text)["runs"]
        return [{k: v for k, v in r.items() if k != "seconds"} for r in runs]

    assert answers(serial) == answers(on_cluster) == answers(threads)
    assert len(answers(serial)) == 4 * 2 + 3 * 2 + 1  # exhaustive skips n = 26


def test_bad_batches():
    backend = get_backend("exhaustive")
    problems = [random_problem(4, 2, seed=i) for i in range(2)]
    with pytest.raises(
        ProblemError, match=r"seeds must have one entry per problem \(2\), got 1"
    ):
        solve_many(backend, problems, [0])
    with pytest.raises(
        ProblemError, match=r"x0s must have one entry per problem \(2\), got 3"
    ):
        solve_many(backend, problems, [0, 1], [None] * 3)
    with pytest.raises(ProblemError, match="problems\\[1\\] must be a BlockProblem"):
        solve_many(backend, [problems[0], "p"], [0, 1])
    with pytest.raises(ProblemError, match="seed must be a non-negative integer"):
        solve_many(backend, problems, [0, -1])
    for bad in (0, -2, 1.5, "x", True):
        message = f"workers must be an integer >= 1, got {bad!r}"
        with pytest.raises(ExecutorError, match=message):
            solve_many(backend, problems, [0, 1], workers=bad)
    bad_x0 = [None, [1, 1, 1, 0]]
    with pytest.raises(ProblemError, match="x0 must have exactly k = 2 ones, got 3"):
        solve_many(backend, problems, [0, 1], bad_x0, workers=2)
    assert solve_many(backend, [], []) == []


def test_bad_executors(monkeypatch):
    for bad in (0, -1, 2.5, "many"):
        with pytest.raises(
            ExecutorError, match=f"workers must be an integer >= 1, got {bad!r}"
        ):
            make_executor("threads", workers=bad)
    for spec in ("mpi://host:1", "dask://host", "dask://:8786", "tcp://h:99999", ""):
        with pytest.raises(ExecutorError) as info:
            make_executor(spec)
        assert str(info.value) == (
            f"unknown executor {spec!r}; use 'threads', 'dask://HOST:PORT' or "
            "'tcp://HOST:PORT'"
        )
    with pytest.raises(ExecutorUnavailable) as info:
        make_executor("dask://127.0.0.1:1", timeout=1)
    text = str(info.value)
    assert "\n" not in text and "tcp://127.0.0.1:1" in text
    assert "start one with `dask scheduler`" in text
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if not installed
    with pytest.raises(ExecutorUnavailable) as info:
        make_executor("dask://127.0.0.1:8786")
    assert str(info.value) == (
        "the Dask executor needs the distributed package; run: "
        'pip install "icbs-opt[dask]"'
    )


def test_scheduler_without_workers():
    with local_cluster(0, processes=False) as empty:
        with pytest.raises(ExecutorUnavailable, match="has no workers after 0.5 s"):
            make_executor(empty.scheduler_address, timeout=0.5)


def test_a_cluster_that_loses_its_workers_fails_in_one_line():
    with local_cluster(1, processes=False) as local:
        executor = DaskExecutor(local.scheduler_address, lost_timeout=1.0)
        executor.client.retire_workers()  # as if every worker were killed
        start = time.perf_counter()
        with pytest.raises(ExecutorUnavailable, match="has had no workers for 1 s"):
            executor.solve_many(get_backend("exhaustive"), [random_problem(6)], [0])
        assert time.perf_counter() - start < 10  # Dask alone would wait forever
        executor.close()


def test_braket_trackers_keep_their_own_threads_tasks():
    pytest.importorskip("braket")
    from braket.tracking.tracking_context import broadcast_event
    from braket.tracking.tracking_events import _TaskCreationEvent

    from icbs_opt.backends.braket import _thread_tracker

    held = {}

    def solve(label):
        with _thread_tracker() as tracker:
            arn = f"arn:aws:braket:us-east-1:1:quantum-task/{label}"
            broadcast_event(_TaskCreationEvent(arn, 10, False, "sv1"))
            barrier.wait()  # both trackers are listening to both events
        held[label] = tracker.tracked_resources()

    barrier = threading.Barrier(2)
    threads = [threading.Thread(target=solve, args=(x,)) for x in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {k: [v.rsplit("/", 1)[1] for v in arns] for k, arns in held.items()} == {
        "a": ["a"],
        "b": ["b"],
    }


def test_threads_stop_after_a_failure():
    calls = []

    class Failing(type(get_backend("exhaustive"))):
        def _solve(self, problem, *, seed, x0):
            calls.append(seed)
            if seed == 0:
                raise ProblemError("boom")
            time.sleep(0.02)
            return super()._solve(problem, seed=seed, x0=x0)

    problems = [BlockProblem([[1.0]], 0)] * 50
    with pytest.raises(ProblemError, match="boom"):
        solve_many(Failing(), problems, range(50), workers=2)
    assert len(calls) < 50  # the queued solves were cancelled


def blas_threads():
    return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}


def test_solves_side_by_side_run_numpy_blas_on_one_thread():
    seen = []

    class Probe(type(get_backend("exhaustive"))):
        def _solve(self, problem, *, seed, x0):
            seen.append(blas_threads())
            return super()._solve(problem, seed=seed, x0=x0)

    before = blas_threads()
    problems = [random_problem(4, 2, seed=i) for i in range(4)]
    solve_many(Probe(), problems, range(4), workers=2)
    assert seen == [{1}] * 4 and blas_threads() == before  # restored after
    before_torch = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    with pytest.raises(ProblemError), torch_threads(1):
        raise ProblemError("boom")
    assert torch.get_num_threads() == before_torch


# ------------------------------------- answers are checked where they arrive
def across_groups(x):
    """``x`` with a one of group 0 moved to a zero of group 1 (groups of 4)."""
    x = x.copy()
    x[np.flatnonzero(x[:4] == 1)[0]] = 0
    x[4 + np.flatnonzero(x[4:8] == 0)[0]] = 1
    return x


def tamper(answers):
    """Answers that break a group count (same total) and claim a great energy."""
    for i, sol in answers:
        yield (
            i,
            dataclasses.replace(
                sol, x=across_groups(sol.x), energy=-1e9, feasible=True
            ),
        )


class Lying(Executor):
    """Solves here, then hands back tampered answers (as a bad worker might)."""

    description = "lying"

    def _solve(self, backend, batch):
        problems, seeds, _ = batch
        honest = ((i, backend.solve(p, seed=s)) for i, (p, s) in enumerate(
            zip(problems, seeds, strict=True)))  # fmt: skip
        yield from tamper(honest)


def assert_exposed(problems, got):
    for problem, sol in zip(problems, got, strict=True):
        assert problem.count_ones(sol.x).tolist() == [1, 3]  # the tampered answer
        assert sol.feasible is False
        assert sol.energy == problem.energy(sol.x) != -1e9


def test_tampered_answers_are_reported_infeasible_with_true_energy():
    problems = [random_problem(8, 2, seed=s, group_size=4) for s in range(3)]
    seen = []
    got = Lying().solve_many(
        get_backend("native"), problems, [0, 1, 2], done=lambda i, s: seen.append(s)
    )
    assert_exposed(problems, got)
    assert seen == got  # done sees the checked answers


def test_tampered_dask_answers_are_checked_on_the_client(dask_executor, monkeypatch):
    real = DaskExecutor._run
    monkeypatch.setattr(
        DaskExecutor, "_run", lambda self, *args: tamper(real(self, *args))
    )
    problems = [random_problem(8, 2, seed=s, group_size=4) for s in range(2)]
    assert_exposed(problems, dask_executor.solve_many(get_backend("exhaustive"),
                                                      problems, [0, 1]))  # fmt: skip


def test_malformed_answers_are_refused():
    class Short(Executor):
        description = "short"

        def _solve(self, backend, batch):
            yield 0, dataclasses.replace(backend.solve(batch[0][0]), x=np.ones(3))

    problem = random_problem(8, 2, seed=0, group_size=4)
    with pytest.raises(
        ExecutorError,
        match=r"answer 0 is not a Solution with a 0/1 vector of length n = 8: got "
        r"Solution with x of shape \(3,\)",
    ):
        Short().solve_many(get_backend("exhaustive"), [problem], [0])


def test_a_failing_done_callback_drops_the_queued_solves():
    calls = []

    class Slow(type(get_backend("exhaustive"))):
        def _solve(self, problem, *, seed, x0):
            calls.append(seed)
            time.sleep(0.02)
            return super()._solve(problem, seed=seed, x0=x0)

    def done(index, solution):
        raise RuntimeError("progress bar broke")

    problems = [BlockProblem([[1.0]], 0)] * 50
    with pytest.raises(RuntimeError, match="progress bar broke"):
        solve_many(Slow(), problems, range(50), workers=2, done=done)
    assert len(calls) < 50
