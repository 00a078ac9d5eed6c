import json

import numpy as np
import pytest

from icbs_opt.backends import get_backend
from icbs_opt.cli import main
from icbs_opt.errors import BackendError
from icbs_opt.problems import BlockProblem, random_problem


@pytest.fixture
def problem_file(tmp_path):
    path = tmp_path / "block.npz"
    random_problem(10, 4, seed=3).save(path)
    return path


def test_backends_lists_every_backend(tmp_path, capsys):
    assert main(["backends", "--json", "-"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert {"native", "neal", "exhaustive"} <= set(rows)
    assert rows["exhaustive"]["available"] and rows["exhaustive"]["max_n"] == 24
    assert "num_reads" in {o["name"] for o in rows["neal"]["options"]}
    assert main(["backends"]) == 0
    assert "neal  (available)" in capsys.readouterr().out
    path = tmp_path / "sub" / "backends.json"
    assert main(["backends", "--json", str(path)]) == 0
    assert "neal  (available)" in capsys.readouterr().out  # the table as well
    assert {r["name"] for r in json.loads(path.read_text())} == set(rows)


def test_solve_json(problem_file, tmp_path, capsys):
    argv = ["solve", str(problem_file), "--backend", "exhaustive", "--json"]
    assert main([*argv, "-"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {
        "backend",
        "n",
        "k",
        "energy",
        "feasible",
        "seconds",
        "x",
        "info",
    }
    p = BlockProblem.load(problem_file)
    assert out["n"] == 10 and out["k"] == 4 and out["feasible"] is True
    assert sum(out["x"]) == 4
    assert out["energy"] == pytest.approx(p.energy(np.array(out["x"])))
    assert main([*argv, str(tmp_path / "answer.json")]) == 0
    assert "backend exhaustive: n = 10, k = 4" in capsys.readouterr().out
    saved = json.loads((tmp_path / "answer.json").read_text())
    saved["seconds"] = out["seconds"]  # the only field that differs between runs
    assert saved == out


def test_solve_ubqp_with_backend_option(tmp_path, capsys):
    path = tmp_path / "block.ubqp"
    random_problem(8, 3, seed=1).to_ubqp(path)
    argv = ["solve", str(path), "--backend", "neal", "--backend-option", "num_reads=3"]
    assert main([*argv, "--json", "-"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["info"]["reads"] % 3 == 0 and out["feasible"]


def test_solve_grouped_file(tmp_path, capsys):
    problem = random_problem(12, [1, 2, 3], seed=4, group_size=4)
    for name, write in (("g.npz", problem.save), ("g.ubqp", problem.to_ubqp)):
        write(tmp_path / name)
        argv = ["solve", str(tmp_path / name), "--backend", "exhaustive"]
        assert main([*argv, "--json", "-"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["groups"] == 3 and out["group_counts"] == [1, 2, 3]
        assert out["k"] == 6 and out["feasible"] is True
        assert problem.count_ones(out["x"]).tolist() == [1, 2, 3]
        assert main(argv) == 0
        assert "n = 12, k = 6 in 3 groups, energy" in capsys.readouterr().out
    argv = ["solve", str(tmp_path / "g.npz"), "--backend", "neal", "--k", "2"]
    assert main([*argv, "--json", "-"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["group_counts"] == [2, 2, 2] and out["feasible"] is True
    err = _error(capsys, [*argv[:-1], "5"])
    assert "k for group 0 (4 variables) must be an integer in [0, 4], got 5" in err


def _error(capsys, argv):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert len(captured.err.strip().splitlines()) == 1
    return captured.err


def test_solve_errors(tmp_path, problem_file, capsys):
    err = _error(capsys, ["solve", str(problem_file), "--backend", "nope"])
    assert "unknown backend 'nope'; known backends: native, neal, exhaustive" in err
    np.savez(tmp_path / "nan.npz", Q=np.array([[np.nan]]), k=0)
    assert "Q must be finite" in _error(capsys, ["solve", str(tmp_path / "nan.npz")])
    np.savez(tmp_path / "rect.npz", Q=np.ones((2, 3)), k=1)
    assert "square matrix" in _error(capsys, ["solve", str(tmp_path / "rect.npz")])
    np.savez(tmp_path / "bigk.npz", Q=np.eye(2), k=5)
    err = _error(capsys, ["solve", str(tmp_path / "bigk.npz")])
    assert "bigk.npz': k must be an integer in [0, 2], got 5" in err
    (tmp_path / "x.bin").write_bytes(b"\x00\xff\x10")
    assert "not an .npz or UBQP" in _error(capsys, ["solve", str(tmp_path / "x.bin")])
    err = _error(
        capsys,
        ["solve", str(problem_file), "--backend", "neal", "--backend-option", "bad"],
    )
    assert "expects key=value, got 'bad'" in err
    big = tmp_path / "big.npz"
    BlockProblem(np.eye(30), 3).save(big)
    err = _error(capsys, ["solve", str(big), "--backend", "exhaustive"])
    assert "at most n = 24" in err


def _zip_without_arrays(path):
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        z.writestr("notes.txt", "hello")


@pytest.mark.parametrize(
    ("name", "write", "message"),
    [
        (
            "k_array.npz",
            lambda p: np.savez(p, Q=np.eye(2), k=[1]),
            "k must be a single integer, got an array of shape (1,)",
        ),
        (
            "k_nan.npz",
            lambda p: np.savez(p, Q=np.eye(2), k=np.nan),
            "k must be an integer in [0, 2], got nan",
        ),
        (
            "k_frac.npz",
            lambda p: np.savez(p, Q=np.eye(2), k=2.5),
            "k must be an integer in [0, 2], got 2.5",
        ),
        (
            "overflow.npz",
            lambda p: np.savez(p, Q=[[0.0, 1.7e308], [1.7e308, 0.0]], k=1),
            "Q is too large for float64",
        ),
        ("members.npz", _zip_without_arrays, "member 'notes.txt' is not a .npy array"),
        ("text.npz", lambda p: p.write_text("hello"), "not an .npz archive"),
        (
            "neg.ubqp",
            lambda p: p.write_text("# k = 1\n-2 1\n1 1 1.0\n"),
            "n in the header 'n m' must be an integer >= 1, got '-2'",
        ),
        (
            "huge.ubqp",
            lambda p: p.write_text("# k = 1\n100000000 1\n1 1 1.0\n"),
            "n = 100000000 in the header is too large",
        ),
        (
            "frac.ubqp",
            lambda p: p.write_text("# k = 1\n2 1\n1.7 2 1.0\n"),
            "line 3: index i must be an integer in [1, 2], got '1.7'",
        ),
        (
            "cols.ubqp",
            lambda p: p.write_text("# k = 1\n2 1\n1 2 3 4\n"),
            "entry lines must be 'i j q' (three numbers)",
        ),
    ],
)
def test_solve_bad_files_give_one_line(tmp_path, capsys, name, write, message):
    path = tmp_path / name
    write(path)
    err = _error(capsys, ["solve", str(path), "--backend", "exhaustive"])
    assert err.startswith(f"icbs-opt: error: problem file '{path}': ")
    assert message in err


def test_solve_a_directory(tmp_path, capsys):
    err = _error(capsys, ["solve", str(tmp_path)])
    assert f"problem file '{tmp_path}': is a directory" in err
    assert "no such file" not in err
    err = _error(capsys, ["solve", str(tmp_path / "missing.npz")])
    assert "missing.npz': no such file" in err


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("num_reads=1e23", "option 'num_reads' must be an integer in [1, 2147483647]"),
        (
            "num_reads=100000000000000000000000",
            "got '100000000000000000000000'",
        ),
        ("num_sweeps=nan", "option 'num_sweeps' must be an integer"),
        ("penalty=inf", "option 'penalty' ('auto' or a number) must be a finite"),
        ("beta_range=1,nan", "option 'beta_range' high must be a finite number > 1"),
    ],
)
def test_solve_bad_backend_options(problem_file, capsys, option, message):
    argv = ["solve", str(problem_file), "--backend", "neal", "--backend-option"]
    err = _error(capsys, [*argv, option])
    assert "backend 'neal': " in err and message in err


def test_solve_bad_seed_and_k(problem_file, capsys):
    err = _error(capsys, ["solve", str(problem_file), "--seed", "-1"])
    assert "seed must be a non-negative integer, got -1" in err
    err = _error(capsys, ["solve", str(problem_file), "--k", "11"])
    assert "k must be an integer in [0, 10], got 11" in err


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"num_reads": 10**23}, r"in \[1, 2147483647\], got 100000000000000000000000"),
        ({"num_reads": 1e23}, r"option 'num_reads' .*got 1e\+23"),
        ({"num_reads": True}, r"option 'num_reads' .*got True"),
        ({"num_sweeps": float("nan")}, r"option 'num_sweeps' .*got nan"),
        ({"penalty": False}, r"option 'penalty' .*got False"),
        ({"penalty": float("-inf")}, r"option 'penalty' .*got -inf"),
        ({"beta_range": (0.0, 1.0)}, r"'beta_range' low must be a finite number > 0"),
        ({"beta_range": "0.1,10,100"}, r"'beta_range' must be two numbers"),
        ({"beta_range": 7}, r"'beta_range' must be two numbers .*got 7"),
    ],
)
def test_neal_option_values(options, match):
    with pytest.raises(BackendError, match=f"backend 'neal': .*{match}"):
        get_backend("neal", **options)


def test_none_option_means_the_default():
    default = get_backend("neal").parameters
    assert get_backend("neal", num_reads=None, penalty=None).parameters == default
    assert get_backend("neal", num_reads="7").parameters["num_reads"] == 7
