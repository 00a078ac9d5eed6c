"""Faults a user meets: full disks, bad resumes, untrusted folders, rough input.

Each case gives one line on stderr and a documented exit status, and loses
nothing finished (docs/cli.md "Outputs, interrupts and exit status").
"""

import errno
import json
import os
import stat
import sys

import pytest

from icbs_opt.cli import main
from icbs_opt.tasks import digits as digits_task

pytestmark = pytest.mark.usefixtures("one_thread")

#: The --out folder's files.
OUT_FILES = ("masks.safetensors", "model.safetensors", "prune_config.json",
             "results.json")  # fmt: skip


NO_SPACE = os.strerror(errno.ENOSPC)


def prune_argv(cache, *extra):
    """A one-second digits run."""
    return ["prune", "--cache-dir", str(cache), "--backend", "exhaustive",
            "--block-size", "12", "--steps", "2", "--no-progress", *extra]  # fmt: skip


def full_disk(monkeypatch, victim):
    """Make every write of a file named ``victim`` fail: no space left."""
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if os.path.basename(dst) == victim:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


def no_model(monkeypatch):
    """Fail the test if a model is loaded (the input should be refused first)."""

    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(digits_task, "load_or_train_digits_mlp", load)


def status_of(argv):
    """The exit status of the command line, the parser's own exits included."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def one_error_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("icbs-opt: error: "), err
    assert "Traceback" not in err
    return lines[0]


# ------------------------------------------------------------------ full disk
def test_failed_checkpoint_warns_and_the_run_goes_on(
    cache, tmp_path, capsys, monkeypatch
):
    full_disk(monkeypatch, "checkpoint.safetensors")
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    summary = tmp_path / "s.json"
    argv = prune_argv(cache, "--out", str(out), "--checkpoint", str(ckpt),
                      "--checkpoint-every", "1", "--json", str(summary))  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err  # three tries (two steps, the end), one warning
    assert err.startswith("icbs-opt: warning: cannot write the checkpoint")
    assert err.count("\n") == 1 and "No space left on device; going on" in err
    assert sorted(p.name for p in out.iterdir()) == sorted(OUT_FILES)
    summary = json.loads(summary.read_text())
    assert summary["steps_done"] == 2 and summary["checkpoint"] is None
    assert not any(ckpt.glob("*"))  # no temporary file left


def test_safetensors_error_on_a_checkpoint_is_a_warning(
    cache, tmp_path, capsys, monkeypatch
):
    import safetensors.torch

    def save_file(*args, **kwargs):
        raise safetensors.SafetensorError("Error while serializing: No space left")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    argv = prune_argv(cache, "--checkpoint", str(tmp_path), "--checkpoint-every", "2")
    assert main([*argv, "--json", str(tmp_path / "s.json")]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left" in err
    assert json.loads((tmp_path / "s.json").read_text())["steps_done"] == 2


@pytest.mark.parametrize("victim", ["s.json", "curve.png", *OUT_FILES])
def test_a_failed_output_names_its_path_and_the_rest_is_written(
    victim, cache, tmp_path, capsys, monkeypatch
):
    full_disk(monkeypatch, victim)
    out = tmp_path / "out"
    argv = prune_argv(cache, "--out", str(out), "--json", str(tmp_path / "s.json"),
                      "--plot", str(tmp_path / "curve.png"))  # fmt: skip
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.endswith(f"{victim}': No space left on device"), line
    written = {p.name for p in [*out.iterdir(), *tmp_path.iterdir()] if p.is_file()}
    assert written == {"s.json", "curve.png", *OUT_FILES} - {victim}
    assert not [p for p in out.iterdir() if p.name.startswith(".icbs-tmp-")]


def test_outputs_whose_folder_cannot_be_made_are_refused_first(capsys, monkeypatch):
    no_model(monkeypatch)
    assert main(["prune", "--json", "/proc/nope/x.json"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "cannot write '/proc/nope/x.json': cannot create '/proc/nope'" in line


def test_output_folders_are_proven_writable_without_leaving_them(
    tmp_path, capsys, monkeypatch
):
    no_model(monkeypatch)
    (tmp_path / "file").write_text("x")
    argv = ["prune", "--json", str(tmp_path / "a" / "b" / "s.json"),
            "--out", str(tmp_path / "file" / "out")]  # fmt: skip
    assert main(argv) == 2
    one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_json_to_dev_null_is_allowed(cache, tmp_path, capsys):
    assert main(prune_argv(cache, "--json", os.devnull, "--out", str(tmp_path))) == 0
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)  # written in place
    assert capsys.readouterr().err == ""


def test_outputs_are_readable_by_others_as_json_is(cache, tmp_path):
    assert main(prune_argv(cache, "--out", str(tmp_path))) == 0
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    umask = os.umask(0)
    os.umask(umask)
    assert modes == dict.fromkeys(OUT_FILES, 0o666 & ~umask)


# --------------------------------------------------------------------- resume
def stopped_run(cache, out, *extra):
    """A run of 3 steps stopped by its time budget after the first.

    Its resume needs a new ``--time-budget``.
    """
    argv = prune_argv(cache, "--steps", "3", "--time-budget", "1e-9", *extra)
    assert main([*argv, "--out", str(out)]) == 0
    assert (out / "checkpoint.safetensors").is_file()


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("prune_config.json", b'{"task": "digits-mlp"}', "not a checkpoint (its head"),
        ("random.bin", bytes(range(256)) * 20, "not a checkpoint (its header size"),
        ("short.bin", b"abc", "not a checkpoint (3 bytes, shorter than a header)"),
        ("nothing", None, "no such file (give the folder holding checkpoint"),
    ],
)
def test_resume_of_what_is_not_a_checkpoint(
    name, content, reason, tmp_path, capsys, monkeypatch
):
    no_model(monkeypatch)
    if content is not None:
        (tmp_path / name).write_bytes(content)
    assert main(["prune", "--resume", str(tmp_path / name)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"cannot read the checkpoint '{tmp_path / name}': {reason}" in line, line


def test_resume_of_a_safetensors_file_without_run_settings(
    cache, tmp_path, capsys, monkeypatch
):
    assert main(prune_argv(cache, "--out", str(tmp_path))) == 0
    no_model(monkeypatch)
    assert main(["prune", "--resume", str(tmp_path / "masks.safetensors")]) == 2
    assert "not a checkpoint of a prune run" in one_error_line(capsys.readouterr().err)


def test_relative_paths_resume_from_another_folder(cache, tmp_path, monkeypatch):
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    monkeypatch.chdir(tmp_path / "first")
    stopped_run(os.path.relpath(cache), tmp_path / "first" / "run", "--json", "s.json")
    monkeypatch.chdir(tmp_path / "second")
    assert main(["prune", "--resume", "../first/run", "--time-budget", "60"]) == 0
    assert list((tmp_path / "second").iterdir()) == []  # nothing written here
    summary = json.loads((tmp_path / "first" / "s.json").read_text())
    assert summary["steps_done"] == 3 and not summary["stopped"]
    config = json.loads((tmp_path / "first" / "run" / "prune_config.json").read_text())
    assert config["task_options"]["cache_dir"] == str(cache)


def test_resume_may_change_executor_and_workers_not_task(cache, tmp_path, capsys):
    from safetensors.torch import load_file

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert main(prune_argv(cache, "--steps", "3", "--out", str(whole))) == 0
    stopped_run(cache, resumed)
    capsys.readouterr()
    assert main(["prune", "--resume", str(resumed), "--task", "smollm2-135m"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "cannot resume with --task 'smollm2-135m'" in line
    assert "(only --time-budget, --checkpoint-every, --executor and --workers" in line
    argv = ["prune", "--resume", str(resumed), "--time-budget", "60", "--executor",
            "threads"]  # fmt: skip
    assert main([*argv, "--workers", "2", "--no-progress"]) == 0
    a, b = (load_file(str(d / "masks.safetensors")) for d in (whole, resumed))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_new_run_over_another_runs_checkpoint_needs_overwrite(
    cache, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    stopped_run(cache, out)
    capsys.readouterr()
    assert main(prune_argv(cache, "--out", str(out))) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"--out '{out}' holds the checkpoint of another run" in line
    assert f"--resume {out}, or give --overwrite" in line
    assert main(prune_argv(cache, "--out", str(out), "--overwrite")) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(OUT_FILES)


# ------------------------------------------------------------ untrusted input
@pytest.fixture
def lm_folder(tmp_path):
    """A tiny Llama (64 positions) saved as a Hugging Face folder, and its data."""
    pytest.importorskip("transformers")
    from icbs_opt.tasks.causal_lm import save_causal_lm
    from tests.tiny import WORDS, tiny_llama, word_tokenizer, write_text

    save_causal_lm(tiny_llama(vocab=len(WORDS) + 1), word_tokenizer(), tmp_path / "m")
    write_text(tmp_path / "valid.txt", 400, seed=1)
    write_text(tmp_path / "test.txt", 200, seed=2)
    return tmp_path / "m"


def lm_flags(folder):
    data = folder.parent
    return ["--calib-data", str(data / "valid.txt"), "--eval-data",
            str(data / "test.txt"), "--pruning-windows", "8", "--calib-windows", "2",
            "--batch-size", "2", "--eval-windows", "2", "--seq-len", "16"]  # fmt: skip


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json"])
def test_a_folder_that_names_its_own_code_is_refused(name, lm_folder, capsys):
    path = lm_folder / name
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "auto_map": {"AutoTokenizer": "x.Tok"}}))
    (lm_folder / "x.py").write_text("raise SystemExit('the folder ran its code')\n")
    for argv in (["evaluate", "--model", str(lm_folder)],
                 ["prune", "--model", str(lm_folder)]):  # fmt: skip
        assert main([*argv, *lm_flags(lm_folder)]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"{str(path)!r} names code of its own (auto_map)" in line


def test_every_load_refuses_remote_code(lm_folder, monkeypatch):
    import transformers

    from icbs_opt.tasks.causal_lm import load_causal_lm

    calls = []
    for cls in (transformers.AutoConfig, transformers.AutoTokenizer,
                transformers.AutoModelForCausalLM):  # fmt: skip
        real = cls.from_pretrained

        def spy(*args, _real=real, **kwargs):
            calls.append(kwargs.get("trust_remote_code"))
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    load_causal_lm(lm_folder)
    assert len(calls) >= 3 and set(calls) == {False}


def test_seq_len_beyond_the_models_positions(lm_folder, capsys):
    argv = ["evaluate", "--model", str(lm_folder), *lm_flags(lm_folder)]
    assert main([*argv, "--seq-len", "100000"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--seq-len must be at most the 64 positions of the model in" in line
    assert line.endswith("got 100000")
    assert main([*argv, "--seq-len", "64"]) == 0


def test_seq_len_beyond_the_memory_is_refused(lm_folder, capsys, monkeypatch):
    from icbs_opt.tasks import causal_lm

    monkeypatch.setattr(causal_lm, "available_memory", lambda: 2**20)
    argv = ["evaluate", "--model", str(lm_folder), *lm_flags(lm_folder)]
    assert main([*argv, "--seq-len", "64", "--eval-batch-size", "64"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--seq-len 64 with --eval-batch-size 64 needs about" in line
    assert "more than the 0.0 GiB available" in line


def test_the_gguf_bar_follows_the_progress_switch(monkeypatch):
    pytest.importorskip("transformers")
    from transformers import modeling_gguf_pytorch_utils as gguf
    from transformers.utils import logging as hf_logging

    from icbs_opt.tasks.causal_lm import _gguf_bar_follows_transformers

    drawn = gguf.tqdm
    monkeypatch.setattr(hf_logging, "_tqdm_active", False)  # --no-progress
    with _gguf_bar_follows_transformers():
        assert gguf.tqdm is hf_logging.tqdm  # off with the switch
        assert list(gguf.tqdm(range(3), desc="x")) == [0, 1, 2]
    assert gguf.tqdm is drawn
    monkeypatch.setattr(hf_logging, "_tqdm_active", True)
    with _gguf_bar_follows_transformers():
        assert gguf.tqdm is drawn


def test_evaluate_a_folder_reads_only_what_it_needs(cache, tmp_path, capsys,
                                                    monkeypatch):  # fmt: skip
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    assert main(prune_argv(cache, "--out", str(out), "--json", "-")) == 0
    final = json.loads(capsys.readouterr().out)["final"]
    config = json.loads((out / "prune_config.json").read_text())
    config["task_options"].update(cache_dir=str(elsewhere), retrain=True)
    (out / "prune_config.json").write_text(json.dumps(config))
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    def train(*args, **kwargs):
        raise AssertionError("evaluate trained a model")

    monkeypatch.setattr(digits_task, "train_digits_mlp", train)
    assert main(["evaluate", "--model", str(out), "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == final["metric"]
    assert not elsewhere.exists()
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_evaluate_checks_its_json_before_evaluating(capsys, monkeypatch):
    no_model(monkeypatch)
    assert main(["evaluate", "--task", "digits-mlp", "--json", "/proc/x/e.json"]) == 2
    assert "cannot write '/proc/x/e.json'" in one_error_line(capsys.readouterr().err)


# ---------------------------------------------------------------- rough edges
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["prune", "--density", "abc"], "argument --density: invalid float value"),
        (["prune", "--steps", "1.5"], "argument --steps: invalid int value: '1.5'"),
        (["prune", "--block-size", "0"], "--block-size must be an integer >= 2, got 0"),
        (["prune", "--keep-best"], "--keep-best needs --eval-every > 0"),
        (["prune", "--layers", ""], "--layers must be comma-separated module names"),
        (["prune", "--plot", "-"], "--plot needs a file name: standard output"),
        (["prune", "--plot", "curve.xyz"], "the extension gives the format; use one"),
        (["prune", "--nope"], "unrecognized arguments: --nope"),
        (["prune", "--task", "smollm2-135m", "--data-dir", "/nowhere"],
         "'/nowhere' (--data-dir) does not exist; the named corpora are looked for"),
    ],
)  # fmt: skip
def test_rough_input_is_one_line(argv, message, capsys, monkeypatch):
    no_model(monkeypatch)
    assert status_of(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "usage:" not in err, err


def test_messages_show_values_not_reprs():
    import numpy as np
    import torch

    from icbs_opt.cli.flags import cli_message

    text = (f"seq_len {np.int64(5)!r} got {np.array([2, 2, 1])!r} and "
            f"{torch.Size([3, 3])!r} or {np.float64(0.5)!r}\nsecond line")  # fmt: skip
    shown = "--seq-len 5 got [2, 2, 1] and [3, 3] or 0.5; second line"
    assert cli_message(text) == shown
    assert cli_message("'/data/seq_len/x' is missing") == "'/data/seq_len/x' is missing"


def test_weights_of_the_wrong_shape_are_one_line(cache, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file, save_file

    assert main(prune_argv(cache, "--out", str(tmp_path))) == 0
    state = load_file(str(tmp_path / "model.safetensors"))
    state["2.weight"] = torch.zeros(3, 3)
    save_file(state, str(tmp_path / "model.safetensors"))
    capsys.readouterr()
    assert main(["evaluate", "--model", str(tmp_path)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "size mismatch for 2.weight: copying a param with shape [3, 3]" in line


def test_no_tabu_notes_for_the_one_shot_method(cache, capsys, caplog):
    assert main(prune_argv(cache, "--steps", "0", "--block-size", "1024")) == 0
    assert "tabu" not in capsys.readouterr().err and "tabu" not in caplog.text
    argv = prune_argv(cache, "--steps", "1", "--block-size", "1024")
    assert main([*argv, "--backend", "native"]) == 0
    assert "tabu switched off" in caplog.text  # where a step would use it


def test_plot_follows_its_extension(cache, tmp_path):
    plots = [tmp_path / "a.pdf", tmp_path / "b.svg", tmp_path / "c.png"]
    for plot in plots:
        assert main(prune_argv(cache, "--plot", str(plot), "--eval-every", "1")) == 0
    assert plots[0].read_bytes()[:5] == b"%PDF-"
    assert b"<svg" in plots[1].read_bytes()[:500]
    assert plots[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_help_lists_no_pruning_only_options(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = capsys.readouterr().out
    for flag in ("--retrain", "--val-fraction", "--val-windows", "--data-seed",
                 "--save-dtype", "--save-format", "--steps", "--density"):  # fmt: skip
        assert flag not in text
    assert "--eval-data" in text and "--seq-len" in text


# ----------------------------------------------------------------- the runner
def test_the_fast_fault_cases_print_no_traceback(cache, tmp_path, monkeypatch):
    import importlib.util

    from tests.conftest import REPO

    path = REPO / "benchmarks" / "faults.py"
    spec = importlib.util.spec_from_file_location("faults_runner", path)
    runner = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, runner)  # for its dataclasses
    spec.loader.exec_module(runner)
    fixtures = runner.make_fixtures(tmp_path, cache)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    selected = [c for c in runner.cases(fixtures, None) if c.fast]
    try:
        outcomes = runner.run_cases(selected)
    finally:
        fixtures["ro"].chmod(0o700)
    failed = [f"{o.case.name}: {o.failure}" for o in outcomes if o.failure]
    assert len(outcomes) >= 50 and failed == []
    assert list((tmp_path / "cwd").iterdir()) == []  # nothing written to '.'


def test_the_progress_bar_shows_the_layer():
    from types import SimpleNamespace

    from icbs_opt.cli import prune as cli_prune

    shown = {}
    bar = SimpleNamespace(set_postfix=lambda refresh=True, **kw: shown.update(kw),
                          update=lambda: None)  # fmt: skip
    on_pass, _ = cli_prune._progress_callbacks(bar, None)
    blocks = [SimpleNamespace(layer="2"), SimpleNamespace(layer="4")]
    on_pass(SimpleNamespace(blocks=blocks, accepted=1))
    assert shown == {"layer": "4", "blocks": 2, "accepted": 1}


def test_a_stopped_run_says_what_it_could_not_write(cache, tmp_path, capsys,
                                                    monkeypatch):  # fmt: skip
    full_disk(monkeypatch, "s.json")
    out, summary = tmp_path / "run", tmp_path / "s.json"
    argv = prune_argv(cache, "--steps", "3", "--time-budget", "1e-9")
    assert main([*argv, "--out", str(out), "--json", str(summary)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert (
        err[0] == f"icbs-opt: error: cannot write '{summary}': No space left on device"
    )
    assert err[1] == "icbs-opt: stopped by --time-budget after step 1 of 3"
    assert err[2] == f"icbs-opt: wrote out {out}"  # not the JSON
    assert (out / "checkpoint.safetensors").is_file() and not summary.exists()


def test_evaluate_names_the_json_it_could_not_write(cache, tmp_path, capsys,
                                                    monkeypatch):  # fmt: skip
    full_disk(monkeypatch, "e.json")
    argv = ["evaluate", "--task", "digits-mlp", "--cache-dir", str(cache)]
    assert main([*argv, "--json", str(tmp_path / "e.json")]) == 2
    captured = capsys.readouterr()
    assert "digits-mlp: accuracy" in captured.out  # the result is shown anyway
    line = one_error_line(captured.err)
    assert line.endswith("e.json': No space left on device")
