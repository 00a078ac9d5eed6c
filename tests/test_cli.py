import json

import numpy as np
import pytest

from icbs_opt.cli import main
from icbs_opt.problems import BlockProblem, random_problem


@pytest.fixture
def problem_file(tmp_path):
    path = tmp_path / "block.npz"
    random_problem(10, 4, seed=3).save(path)
    return path


def test_backends_lists_every_backend(capsys):
    assert main(["backends", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert {"native", "neal", "exhaustive"} <= set(rows)
    assert rows["exhaustive"]["available"] and rows["exhaustive"]["max_n"] == 24
    assert "num_reads" in {o["name"] for o in rows["neal"]["options"]}
    assert main(["backends"]) == 0
    assert "neal  (available)" in capsys.readouterr().out


def test_solve_json(problem_file, capsys):
    assert main(["solve", str(problem_file), "--backend", "exhaustive", "--json"]) == 0
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


def test_solve_ubqp_with_backend_option(tmp_path, capsys):
    path = tmp_path / "block.ubqp"
    random_problem(8, 3, seed=1).to_ubqp(path)
    argv = ["solve", str(path), "--backend", "neal", "--backend-option", "num_reads=3"]
    assert main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["info"]["reads"] % 3 == 0 and out["feasible"]


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
    assert "got k = 5" in _error(capsys, ["solve", str(tmp_path / "bigk.npz")])
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
