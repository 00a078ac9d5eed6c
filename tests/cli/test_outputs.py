"""Safe outputs: atomic writes, checked output paths, interrupted compare writes
what it has. The CLI checking outputs before any work: test_fail_fast.py."""

import csv
import json
import os

import numpy as np
import pytest

from icbs_opt.atomic import atomic_path, atomic_write
from icbs_opt.backends.exhaustive import ExhaustiveBackend
from icbs_opt.cli import main
from icbs_opt.cli.common import Terminated, check_output, write_json
from icbs_opt.errors import DataError
from icbs_opt.problems import BlockProblem, random_problem
from tests.tiny import not_root, run_cli


def leftovers(folder):
    """Temporary files an atomic write left behind."""
    return [p.name for p in folder.iterdir() if p.name.startswith(".icbs-tmp-")]


# ------------------------------------------------------------- atomic writes
@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_write_keeps_the_previous_file(tmp_path, error):
    path = tmp_path / "out.json"
    path.write_text("previous")

    def write(f):
        f.write("half of the new cont")
        raise error

    with pytest.raises(type(error)):
        atomic_write(str(path), write)
    assert path.read_text() == "previous"
    assert leftovers(tmp_path) == []


def test_atomic_write_replaces_and_keeps_the_mode(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    path.chmod(0o640)
    atomic_write(str(path), lambda f: f.write(b"new"), binary=True)
    assert path.read_bytes() == b"new"
    assert path.stat().st_mode & 0o777 == 0o640
    atomic_write(str(tmp_path / "sub" / "new.txt"), lambda f: f.write("x"))
    assert (tmp_path / "sub" / "new.txt").read_text() == "x"
    assert leftovers(tmp_path) == []


def test_atomic_path_removes_the_temporary_file_on_failure(tmp_path):
    path = tmp_path / "fig.png"
    path.write_text("previous")
    with pytest.raises(RuntimeError), atomic_path(str(path)) as tmp:
        assert tmp.endswith(".png") and os.path.dirname(tmp) == str(tmp_path)
        open(tmp, "w").write("partial")
        raise RuntimeError("savefig failed")
    assert path.read_text() == "previous"
    assert leftovers(tmp_path) == []


def test_symbolic_links_are_refused_not_followed(tmp_path):
    target = tmp_path / "elsewhere.txt"
    target.write_text("not ours")
    link = tmp_path / "out.json"
    link.symlink_to(target)
    with pytest.raises(DataError, match="is a symbolic link; give another path"):
        write_json(str(link), {"a": 1})
    with pytest.raises(DataError, match="symbolic link"), atomic_path(str(link)):
        pass
    npz = tmp_path / "p.npz"
    npz.symlink_to(target)
    with pytest.raises(DataError, match="symbolic link"):
        random_problem(4, 2, seed=0).save(npz)
    assert target.read_text() == "not ours" and link.is_symlink()
    assert leftovers(tmp_path) == []


def test_problem_writers_are_atomic(tmp_path, monkeypatch):
    problem = random_problem(6, 3, seed=1)
    path = tmp_path / "p.npz"
    problem.save(path)
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(OSError, match="disk full"):
        random_problem(6, 3, seed=2).save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    problem.save(tmp_path / "bare")  # numpy's rule: .npz is appended
    assert BlockProblem.load(tmp_path / "bare.npz").k == 3
    problem.to_ubqp(tmp_path / "p.ubqp")
    assert BlockProblem.load(tmp_path / "p.ubqp").energy(np.ones(6)) == (
        pytest.approx(problem.energy(np.ones(6)))
    )
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------- check_output
def test_check_output_accepts_good_paths(tmp_path):
    check_output("-", folder=False)
    check_output(str(tmp_path / "a" / "b" / "out.json"), folder=False)
    check_output(str(tmp_path / "new-folder"), folder=True)
    check_output(str(tmp_path), folder=True)
    (tmp_path / "old.json").write_text("{}")
    check_output(str(tmp_path / "old.json"), folder=False)  # ours to replace
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.json"]  # no side effect


def test_check_output_refuses_bad_paths(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "dir")
    cases = [
        ("file", True, "output folder .* is an existing file"),
        ("dir", False, "output file .* is a directory"),
        ("file/sub/out.json", False, "is not writable"),
        ("link", True, "is a symbolic link"),
    ]
    for name, folder, message in cases:
        with pytest.raises(DataError, match=message):
            check_output(str(tmp_path / name), folder=folder)
    with pytest.raises(DataError, match="was not written by icbs-opt"):
        check_output(str(tmp_path / "file"), folder=False, ours=lambda p: False)


@not_root
def test_check_output_refuses_an_unwritable_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(DataError, match="is not writable"):
            check_output(str(locked / "new" / "out.json"), folder=False)
        with pytest.raises(DataError, match="is not writable"):
            check_output(str(locked / "ckpt"), folder=True)
    finally:
        locked.chmod(0o700)


def test_check_output_refuses_what_access_denies(tmp_path, monkeypatch):
    # The unwritable case even as root, whose os.access says yes to everything.
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(DataError, match=f"cannot write .*: '{tmp_path}' is not"):
        check_output(str(tmp_path / "new" / "out.json"), folder=False)
    status = main(["solve", str(tmp_path / "x.npz"), "--json", str(tmp_path / "o")])
    assert status == 2


# ------------------------------------------------------ interrupted compare
@pytest.mark.parametrize(
    ("error", "status", "word"),
    [(KeyboardInterrupt, 130, "interrupted"), (Terminated, 143, "terminated")],
)
def test_interrupted_compare_writes_what_it_has(
    tmp_path, problem_folder, capsys, monkeypatch, error, status, word
):
    solve = ExhaustiveBackend._solve
    count = []

    def stop_at_the_fourth(self, problem, **kwargs):
        count.append(1)
        if len(count) == 4:
            raise error
        return solve(self, problem, **kwargs)

    monkeypatch.setattr(ExhaustiveBackend, "_solve", stop_at_the_fourth)
    out = tmp_path / "out"
    (out / "c.json").parent.mkdir()
    (out / "c.json").write_text("previous")
    argv = ["compare", "--problems", problem_folder, "--backends", "exhaustive"]
    argv += ["--repeats", "2", "--workers", "1", "--json", out / "c.json"]
    argv += ["--csv", out / "c.csv", "--plot", out / "c.png"]
    code, err, _ = run_cli(argv, capsys)
    assert code == status
    assert err.strip() == (
        f"icbs-opt: {word} after 3 of 6 runs; partial results in "
        f"{out / 'c.json'}, {out / 'c.csv'}"
    )
    doc = json.loads((out / "c.json").read_text())
    assert doc["interrupted"] is True and len(doc["runs"]) == 3
    assert doc["backends"][0]["runs"] == 3
    with open(out / "c.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 3
    assert not (out / "c.png").exists()  # a plot of a partial run would mislead
    assert sorted(p.name for p in out.iterdir()) == ["c.csv", "c.json"]


def test_finished_compare_says_it_was_not_interrupted(tmp_path, problem_folder):
    argv = ["compare", "--problems", problem_folder, "--backends", "exhaustive"]
    assert main([*map(str, argv), "--json", str(tmp_path / "c.json")]) == 0
    doc = json.loads((tmp_path / "c.json").read_text())
    assert doc["interrupted"] is False and len(doc["runs"]) == 3
