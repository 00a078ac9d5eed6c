"""Batches of block problems: serial, threads and a real Dask LocalCluster agree."""

import sys
import threading
import time

import numpy as np
import pytest

from icbs_opt.backends import available_backends, backend_class, get_backend
from icbs_opt.cli import main
from icbs_opt.errors import (
    BackendError,
    ExecutorError,
    ExecutorUnavailable,
    ProblemError,
)
from icbs_opt.executors import _solve_on_worker, make_executor
from icbs_opt.problems import BlockProblem, random_problem
from tests.tiny import FAST_OPTIONS

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
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        protocol="tcp",
        dashboard_address="127.0.0.1:0",
    ) as local:
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
    assert_same(serial, backend.solve_many(problems, seeds=seeds, x0s=x0s, workers=1))
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
        expected = native.solve_many(problems, seeds=[5, 6, 7])
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
        backend.solve_many(problems, seeds=[0])
    with pytest.raises(
        ProblemError, match=r"x0s must have one entry per problem \(2\), got 3"
    ):
        backend.solve_many(problems, seeds=[0, 1], x0s=[None] * 3)
    with pytest.raises(ProblemError, match="problems\\[1\\] must be a BlockProblem"):
        backend.solve_many([problems[0], "p"], seeds=[0, 1])
    with pytest.raises(ProblemError, match="seed must be a non-negative integer"):
        backend.solve_many(problems, seeds=[0, -1])
    for bad in (0, -2, 1.5, "x", True):
        message = f"workers must be an integer >= 1, got {bad!r}"
        with pytest.raises(BackendError, match=message):
            backend.solve_many(problems, seeds=[0, 1], workers=bad)
    bad_x0 = [None, [1, 1, 1, 0]]
    with pytest.raises(ProblemError, match="x0 must have exactly k = 2 ones, got 3"):
        backend.solve_many(problems, seeds=[0, 1], x0s=bad_x0, workers=2)
    assert backend.solve_many([], seeds=[]) == []


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
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(
        n_workers=0,
        processes=False,
        host="127.0.0.1",
        protocol="tcp",
        dashboard_address="127.0.0.1:0",
    ) as empty:
        with pytest.raises(ExecutorUnavailable, match="has no workers after 0.5 s"):
            make_executor(empty.scheduler_address, timeout=0.5)


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
        Failing().solve_many(problems, seeds=range(50), workers=2)
    assert len(calls) < 50  # the queued solves were cancelled
