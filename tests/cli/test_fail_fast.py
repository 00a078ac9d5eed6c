"""The CLI refuses bad input before any work: exit status 2, one line on stderr,
no model loaded and no problem solved. A new check of that kind goes here (a row of
the first table where the arguments alone trigger it)."""

import time

import pytest

from icbs_opt.backends.exhaustive import ExhaustiveBackend
from icbs_opt.cli import main
from icbs_opt.tasks import compressed
from icbs_opt.tasks import digits as tasks
from tests.tiny import not_root, run_cli


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the digits model is loaded (or trained)."""

    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(tasks, "load_or_train_digits_mlp", load)


# ------------------------------------------------------------ bad settings
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["prune", "--task", "causal-lm"], "task 'causal-lm' needs a model: pass"),
        (["prune", "--device", "gpu"], "--device must be a torch device such as cpu"),
        (["prune", "--device", "cuda:7"], "device 'cuda:7' is not available here"),
        (["prune", "--threads", "0"], "--threads must be an integer >= 1, got 0"),
        (["prune", "--json", "."], "output file '.' is a directory"),
        (["prune", "--seq-len", "8"], "task 'digits-mlp' does not take option"),
        (["prune", "--data-dir", "/nowhere", "--task", "smollm2-135m"],
         "data folder '/nowhere' (--data-dir) does not exist"),
        (["evaluate", "--model", "/nowhere"], "model directory '/nowhere' does not"),
        (["evaluate", "--task", "mnist"], "unknown task 'mnist'; known tasks:"),
        (["prune", "--executor", "mpi://x"], "unknown executor 'mpi://x'; use"),
        (["prune", "--keep-best", "--eval-every", "0"],
         "--keep-best needs --eval-every > 0"),
        (["prune", "--val-fraction", "1.5"], "--val-fraction must be"),
        (["prune", "--task", "smollm2-135m", "--data-dir", "{tmp}"],
         "corpus 'c4' needs"),
        (["prune", "--zero-shot", "paper"], "needs a causal language model"),
        (["prune", "--limit", "3"], "--limit needs --zero-shot"),
        (["evaluate", "--task", "digits-mlp", "--zero-shot", "rte"],
         "causal language"),
        (["prune", "--calib-file", "x.txt"],
         "--calib-file was replaced by --calib-data"),
        (["evaluate", "--task", "smollm2-135m", "--eval-file", "x"], "--eval-data"),
        (["prune", "--pattern", "2:4", "--density", "0.1"],
         "density 0.1 disagrees with pattern '2:4'"),
        (["prune", "--pattern", "3"], "pattern must be 'unstructured' or 'N:M'"),
        (["prune", "--pattern", "2:4", "--block-size", "10"],
         "--block-size must be a multiple of M = 4"),
        (["prune", "--pattern", "2:4", "--k", "3"],
         "--k must be --block-size * (M - N) / M"),
    ],
)  # fmt: skip
@pytest.mark.usefixtures("no_model")
def test_bad_input_fails_fast_in_one_line(argv, message, tmp_path, capsys):
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_prune_refuses_compressed_output_without_the_package(monkeypatch, capsys):
    monkeypatch.setattr(compressed, "compressed_tensors_available", lambda: False)
    argv = ["prune", "--task", "smollm2-135m", "--save-format", "compressed"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("icbs-opt: error: --save-format 'compressed' needs")
    assert err.count("\n") == 1, err


# ------------------------------------------------------------ bad output paths
@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("out_is_file", "output folder"),
        ("json_is_dir", "is a directory"),
        ("plot_is_dir", "is a directory"),
        ("harvest_is_file", "output folder"),
        ("checkpoint_is_file", "output folder"),
        ("out_not_ours", "holds files icbs-opt did not write"),
        ("json_symlink", "symbolic link"),
        ("checkpoint_every_nowhere", "--checkpoint-every needs --out"),
        ("resume_missing", "cannot read the checkpoint"),
    ],
)
@pytest.mark.usefixtures("no_model")
def test_prune_checks_its_outputs_first(case, message, tmp_path, capsys):
    a_file, a_dir = tmp_path / "file", tmp_path / "dir"
    a_file.write_text("x")
    a_dir.mkdir()
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("mine")
    (tmp_path / "link.json").symlink_to(tmp_path / "elsewhere.json")
    argv = {
        "out_is_file": ["--out", str(a_file)],
        "json_is_dir": ["--json", str(a_dir)],
        "plot_is_dir": ["--plot", str(a_dir)],
        "harvest_is_file": ["--harvest", str(a_file)],
        "checkpoint_is_file": ["--checkpoint", str(a_file)],
        "out_not_ours": ["--out", str(tmp_path / "theirs")],
        "json_symlink": ["--json", str(tmp_path / "link.json")],
        "checkpoint_every_nowhere": ["--checkpoint-every", "5"],
        "resume_missing": ["--resume", str(a_dir)],
    }[case]
    start = time.perf_counter()
    assert main(["prune", *argv]) == 2
    assert time.perf_counter() - start < 1.0
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


@not_root
@pytest.mark.usefixtures("no_model")
def test_prune_refuses_an_unwritable_out(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert main(["prune", "--out", str(locked / "run")]) == 2
    assert "is not writable" in capsys.readouterr().err


def bad_outputs(tmp_path):
    """(path, message) of every kind of bad output file."""
    (tmp_path / "a-dir").mkdir(parents=True)
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-link").symlink_to(tmp_path / "a-file")
    return [
        (tmp_path / "a-dir", "is a directory"),
        (tmp_path / "a-file" / "out.json", "is not writable"),
        (tmp_path / "a-link", "is a symbolic link"),
    ]


def test_solve_checks_its_output_first(tmp_path, capsys):
    missing = tmp_path / "no-such-problem.npz"  # the output is checked before it
    for path, message in bad_outputs(tmp_path):
        status, err, seconds = run_cli(["solve", missing, "--json", path], capsys)
        assert status == 2 and message in err and str(path) in err
        assert err.count("\n") == 1 and seconds < 0.5


def test_compare_checks_every_output_first(tmp_path, problem_folder, capsys):
    base = ["compare", "--problems", problem_folder, "--backends", "exhaustive"]
    for flag in ("--json", "--csv", "--plot"):
        for path, message in bad_outputs(tmp_path / flag.strip("-")):
            status, err, seconds = run_cli([*base, flag, path], capsys)
            assert status == 2 and message in err and str(path) in err, err
            assert err.count("\n") == 1 and seconds < 0.5
    status, err, _ = run_cli(
        ["backends", "--json", tmp_path / "plot" / "a-dir"], capsys
    )
    assert status == 2 and "is a directory" in err


def test_bad_output_paths_before_any_work(
    tmp_path, problem_folder, capsys, monkeypatch
):
    calls = []
    monkeypatch.setattr(ExhaustiveBackend, "_solve", lambda *a, **k: calls.append(1))
    (tmp_path / "d").mkdir()
    argv = ["compare", "--problems", problem_folder, "--backends", "exhaustive"]
    assert run_cli([*argv, "--csv", tmp_path / "d"], capsys)[0] == 2
    assert calls == []


@not_root
def test_unwritable_output_folder_in_the_cli(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        status, err, _ = run_cli(
            ["solve", tmp_path / "x.npz", "--json", locked / "out.json"], capsys
        )
        assert status == 2 and "is not writable" in err
    finally:
        locked.chmod(0o700)
