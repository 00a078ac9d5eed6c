import csv
import json

import numpy as np
import pytest

from icbs_opt.backends import get_backend
from icbs_opt.cli import main
from icbs_opt.compare import compare, find_problem_files, load_problems, run_seed
from icbs_opt.errors import ProblemError
from icbs_opt.problems import BlockProblem, random_problem
from icbs_opt.testing import exact_optimum


@pytest.fixture
def folder(tmp_path):
    for i, n in enumerate((6, 8, 10)):
        random_problem(n, n // 2, seed=i).save(tmp_path / f"p{i}.npz")
    random_problem(26, 13, seed=9).save(tmp_path / "large.npz")
    (tmp_path / "broken.npz").write_text("not an archive")
    (tmp_path / "notes.md").write_text("ignored: not a problem suffix")
    return tmp_path


def test_exact_optima_unreadable_and_skipped(folder):
    problems, unreadable = load_problems(find_problem_files([folder]))
    assert len(problems) == 4 and list(unreadable) == [str(folder / "broken.npz")]
    backends = {"exhaustive": get_backend("exhaustive"), "neal": get_backend("neal")}
    result = compare(problems, backends, repeats=2, seed=3, unreadable=unreadable)
    rows = {r["backend"]: r for r in result.summary()}
    assert rows["exhaustive"]["mean_gap"] == 0.0
    assert rows["exhaustive"]["success_rate"] == 1.0
    assert rows["exhaustive"]["runs"] == 6 and rows["exhaustive"]["skipped"] == 1
    assert rows["neal"]["runs"] == 8 and rows["neal"]["skipped"] == 0
    assert 0 <= rows["neal"]["feasible_fraction"] <= 1
    assert rows["exhaustive"]["feasible_fraction"] is None
    for run in result.runs:
        if run.status == "ok":
            assert run.gap >= 0
    skipped = [r for r in result.runs if r.status == "skipped"]
    assert len(skipped) == 1 and "at most n = 24" in skipped[0].reason
    # exhaustive's energy is the best known wherever it ran
    for name, problem in problems.items():
        if problem.n <= 24:
            exact = get_backend("exhaustive").solve(problem).energy
            assert result.best[name] == pytest.approx(exact)


def test_seeds_are_shared_and_reproducible():
    assert run_seed(0, 1, 2) == run_seed(0, 1, 2) != run_seed(0, 1, 3)
    problems = {"a": random_problem(12, 6, seed=1)}
    backends = {"neal": get_backend("neal", num_reads=2, num_sweeps=50)}
    first = compare(problems, backends, repeats=2, seed=5)
    second = compare(problems, backends, repeats=2, seed=5)
    assert [r.energy for r in first.runs] == [r.energy for r in second.runs]


def test_bad_inputs(tmp_path):
    with pytest.raises(ProblemError, match="no such problem file or folder"):
        find_problem_files([tmp_path / "missing"])
    with pytest.raises(ProblemError, match="no problem files"):
        find_problem_files([tmp_path])
    with pytest.raises(ProblemError, match="repeats must be an integer >= 1, got 0"):
        compare({}, {}, repeats=0)
    with pytest.raises(ProblemError, match="repeats must be an integer >= 1, got 1.5"):
        compare({}, {}, repeats=1.5)
    with pytest.raises(
        ProblemError, match="seed must be a non-negative integer, got -1"
    ):
        compare({}, {}, seed=-1)


def test_unreadable_files_are_skipped_with_a_warning(folder, caplog):
    (folder / "dir.npz").mkdir()
    (folder / "frac.ubqp").write_text("# k = 1\n2 1\n1.7 2 1.0\n")
    problems, unreadable = load_problems(find_problem_files([folder]))
    assert len(problems) == 4
    assert set(unreadable) == {
        str(folder / name) for name in ("broken.npz", "dir.npz", "frac.ubqp")
    }
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 3
    for path, reason in unreadable.items():
        assert f"skipping {reason}" in warnings
        assert reason.startswith(f"problem file {path!r}: ")
    assert "is a directory" in unreadable[str(folder / "dir.npz")]
    assert "got '1.7'" in unreadable[str(folder / "frac.ubqp")]


def test_cli_outputs(folder, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    argv = [
        "compare",
        "--problems",
        str(folder),
        "--backends",
        "exhaustive,neal",
        "--backend-option",
        "neal.num_reads=3",
        "--seed",
        "1",
        "--json",
        str(out / "c.json"),
        "--csv",
        str(out / "c.csv"),
        "--plot",
        str(out / "c.png"),
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "4 problems (1 unreadable, skipped)" in text
    doc = json.loads((out / "c.json").read_text())
    assert doc["problems"] == 4
    assert {b["backend"] for b in doc["backends"]} == {"exhaustive", "neal"}
    for row in doc["backends"]:
        assert set(row) >= {
            "backend",
            "mean_gap",
            "median_gap",
            "feasible_fraction",
            "success_rate",
            "mean_seconds",
        }
    assert len(doc["runs"]) == 4 + 4  # exhaustive: three runs and one skipped
    with open(out / "c.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and {"problem", "backend", "energy", "gap"} <= set(rows[0])
    assert (out / "c.png").stat().st_size > 1000


def test_cli_errors(folder, capsys):
    argv = ["compare", "--problems", str(folder), "--backends", "exhaustive"]
    assert main([*argv, "--backend-option", "neal.num_reads=3"]) == 2
    assert "NAME one of exhaustive" in capsys.readouterr().err
    assert main(["compare", "--problems", str(folder), "--backends", "nope"]) == 2
    assert "unknown backend 'nope'" in capsys.readouterr().err
    assert main(["compare", "--problems", str(folder), "--backends", " , "]) == 2
    assert "--backends needs at least one backend name" in capsys.readouterr().err
    assert main([*argv, "--seed", "-2"]) == 2
    assert "seed must be a non-negative integer, got -2" in capsys.readouterr().err
    neal = [*argv[:-1], "neal", "--backend-option", "neal.num_reads=1e23"]
    assert main(neal) == 2
    err = capsys.readouterr().err
    assert "backend 'neal': option 'num_reads' must be an integer" in err


def test_cli_skips_unreadable_files_and_json_to_stdout(folder, capsys):
    argv = ["compare", "--problems", str(folder), "--backends", "exhaustive"]
    assert main([*argv, "--json", "-"]) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)  # standard output holds the JSON alone
    assert doc["problems"] == 4
    assert list(doc["unreadable"]) == [str(folder / "broken.npz")]
    assert "Traceback" not in captured.err


def test_cli_no_readable_problem(tmp_path, capsys):
    (tmp_path / "a.npz").write_text("not an archive")
    (tmp_path / "b.ubqp").write_text("# k = 1\n-1 0\n")
    argv = ["compare", "--problems", str(tmp_path), "--backends", "exhaustive"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "icbs-opt: error: none of the 2 problem files could be read "
        "(each is named in a warning above)"
    )
    assert "Traceback" not in "\n".join(err)


def test_harvest_style_meta_round_trip(tmp_path):
    meta = {"x_cur": [1, 0, 1, 0], "layer": "fc1", "step": 7, "scale": 2.5}
    p = BlockProblem(random_problem(4, 2, seed=0).Q, 2, meta=meta)
    p.save(tmp_path / "h.npz")
    q = BlockProblem.load(tmp_path / "h.npz")
    assert q.meta["x_cur"].tolist() == [1, 0, 1, 0] and q.meta["layer"] == "fc1"


def test_harvest_reloads_identical_problems(tmp_path):
    import torch
    import torch.nn.functional as F

    from icbs_opt.compare import Harvester
    from icbs_opt.pruning import Pruner

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    )
    X, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    seen = []
    harvest = Harvester(tmp_path / "blocks", task="tiny")

    def hook(problem):
        seen.append(problem)
        harvest(problem)

    pruner = Pruner(
        model,
        lambda m, a, b: F.cross_entropy(m(a), b),
        0.5,
        backend="exhaustive",
        block_size=8,
        problem_hook=hook,
        seed=1,
    )
    for _ in range(4):
        pruner.step(X, y)
    files = sorted((tmp_path / "blocks").iterdir())
    assert [f.name for f in files] == [p.name for p in harvest.files]
    assert len(files) == 4
    for original, path in zip(seen, harvest.files, strict=True):
        loaded = BlockProblem.load(path)
        scaled, scale = original.scaled()
        assert np.array_equal(loaded.Q, scaled.Q) and loaded.k == original.k
        meta = loaded.meta
        assert meta["task"] == "tiny" and meta["scale"] == scale
        assert meta["layer"] == original.meta["layer"]
        assert meta["step"] == original.meta["step"]
        assert meta["x_cur"].tolist() == list(original.meta["x_cur"])
        assert loaded.is_feasible(meta["x_cur"])
        # the current mask predicts no change: scale * const + x_cur^T Q x_cur = 0
        dl = loaded.energy(meta["x_cur"]) + scale * meta["const"]
        assert dl == pytest.approx(0.0, abs=1e-9 * max(1.0, abs(scale * meta["const"])))


def test_cli_prune_harvest(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("ICBS_OPT_CACHE_DIR", str(cache))
    out = tmp_path / "blocks"
    argv = [
        "prune",
        "--task",
        "digits-mlp",
        "--steps",
        "3",
        "--block-size",
        "10",
        "--backend",
        "exhaustive",
        "--harvest",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    files = sorted(out.glob("*.npz"))
    assert len(files) == 3
    problems, unreadable = load_problems(files)
    assert not unreadable
    assert all(p.n == 10 and p.k == 5 for p in problems.values())


def test_threads_executor_gives_the_serial_runs(folder):
    from dataclasses import asdict

    from icbs_opt.executors import make_executor

    problems, _ = load_problems(find_problem_files([folder]))
    backends = {
        "exhaustive": get_backend("exhaustive"),
        "native": get_backend("native", num_restarts=2),
        "neal": get_backend("neal", num_reads=2, num_sweeps=100),
    }
    serial = compare(problems, backends, repeats=2, seed=4)
    seen = []
    with make_executor("threads", workers=3) as executor:
        threads = compare(
            problems,
            backends,
            repeats=2,
            seed=4,
            executor=executor,
            progress=seen.append,
        )

    def strip(result):
        return [{**asdict(r), "seconds": None} for r in result.runs]

    assert strip(serial) == strip(threads)
    assert len(seen) == len(threads.runs) == 4 * 3 * 2 - 1  # exhaustive skips n = 26
    assert serial.best == threads.best


def test_cli_executor_errors(folder, capsys):
    argv = ["compare", "--problems", str(folder), "--backends", "exhaustive"]
    assert main([*argv, "--workers", "0"]) == 2
    assert "workers must be an integer >= 1, got 0" in capsys.readouterr().err
    assert main([*argv, "--executor", "mpi://x:1"]) == 2
    err = capsys.readouterr().err
    assert "unknown executor 'mpi://x:1'; use 'threads', 'dask://HOST:PORT'" in err


def test_grouped_problems_are_compared_as_grouped(tmp_path, capsys):
    random_problem(8, 2, seed=0, group_size=4).save(tmp_path / "g.npz")
    random_problem(12, 1, seed=1, group_size=4).to_ubqp(tmp_path / "g.ubqp")
    random_problem(6, 3, seed=2).save(tmp_path / "u.npz")
    problems, unreadable = load_problems(find_problem_files([tmp_path]))
    assert not unreadable
    assert [p.num_groups for p in problems.values()] == [2, 3, 1]
    backends = {"exhaustive": get_backend("exhaustive"), "neal": get_backend("neal")}
    result = compare(problems, backends, seed=2)
    for run in result.runs:
        assert run.feasible and run.success
        assert run.groups == problems[run.problem].num_groups
    for name, problem in problems.items():
        assert result.best[name] == pytest.approx(exact_optimum(problem), abs=1e-9)
    argv = ["compare", "--problems", str(tmp_path), "--backends", "exhaustive"]
    assert main([*argv, "--json", str(tmp_path / "c.json")]) == 0
    assert "3 problems (0 unreadable, skipped; 2 grouped)" in capsys.readouterr().out
    runs = json.loads((tmp_path / "c.json").read_text())["runs"]
    assert [r["groups"] for r in runs] == [2, 3, 1]


def test_exhaustive_skips_grouped_problems_by_point_count(tmp_path):
    small = random_problem(32, 2, seed=0, group_size=4)  # 6^8 points, n > 24
    large = random_problem(40, 2, seed=0, group_size=4)  # 6^10 points
    result = compare(
        {"small": small, "large": large}, {"ex": get_backend("exhaustive")}
    )
    status = {r.problem: r for r in result.runs}
    assert status["small"].status == "ok" and status["small"].feasible
    assert status["large"].status == "skipped"
    assert "at most 2704156 feasible points, got 60466176" in status["large"].reason


def test_harvest_keeps_groups(tmp_path):
    from icbs_opt.compare import Harvester

    meta = {"layer": "fc", "step": 2, "x_cur": [1, 1, 0, 0, 0, 1, 1, 0]}
    p = random_problem(8, 2, seed=3, group_size=4)
    Harvester(tmp_path)(BlockProblem(p.Q, 2, groups=p.groups, meta=meta))
    q = BlockProblem.load(tmp_path / "step00002_fc.npz")
    assert q.groups.tolist() == p.groups.tolist() and q.group_counts.tolist() == [2, 2]
    assert q.meta["x_cur"].tolist() == meta["x_cur"]
    Harvester(tmp_path)(BlockProblem(p.Q, 4, meta={**meta, "step": 3}))
    assert not BlockProblem.load(tmp_path / "step00003_fc.npz").is_grouped


def test_cli_refuses_standard_output_for_csv_and_plot(folder, tmp_path, capsys):
    argv = ["compare", "--problems", str(folder), "--backends", "exhaustive"]
    for flag in ("--csv", "--plot"):
        assert main([*argv, flag, "-"]) == 2
        err = capsys.readouterr().err
        assert f"{flag} needs a file name" in err and err.count("\n") == 1
    assert main([*argv, "--plot", str(tmp_path / "c.nope")]) == 2
    assert not (tmp_path / "c.nope").exists() and not (tmp_path / "-").exists()


def test_cli_writes_the_other_outputs_when_one_fails(
    folder, tmp_path, monkeypatch, capsys
):
    from icbs_opt import compare as cmp

    def full_disk(self, path):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(cmp.Comparison, "write_csv", full_disk)
    argv = ["compare", "--problems", str(folder), "--backends", "exhaustive"]
    argv += ["--json", str(tmp_path / "c.json"), "--csv", str(tmp_path / "c.csv")]
    argv += ["--plot", str(tmp_path / "c.svg")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"cannot write '{tmp_path / 'c.csv'}': No space left" in err
    assert json.loads((tmp_path / "c.json").read_text())["problems"] == 4
    assert (tmp_path / "c.svg").read_text().lstrip().startswith("<?xml")
