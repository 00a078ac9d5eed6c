"""`icbs-opt prune` keeps its work: signals, checkpoints, resume and time budget
(issue 13). Keep-best: tests/pruning/test_loop.py; output paths checked before any
model loads: test_fail_fast.py."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from icbs_opt.cli import main
from icbs_opt.cli import prune as cli_prune
from icbs_opt.errors import ExecutorUnavailable
from icbs_opt.pruning import pruner as pruner_module
from icbs_opt.tasks import get_task

STEPS = 40
RUN = ["--steps", str(STEPS), "--eval-every", "10", "--block-size", "64"]
RUN += ["--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")


def prune_argv(cache, out, *extra):
    return ["prune", "--cache-dir", str(cache), *RUN, "--out", str(out), *extra]


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory):
    """An uninterrupted run: its results, by blocks per step."""
    runs = {}
    for blocks in (1, 3):
        out = tmp_path_factory.mktemp(f"reference{blocks}")
        argv = prune_argv(cache, out, "--blocks-per-step", str(blocks))
        assert main(argv) == 0
        runs[blocks] = out
    return runs


def outcome(out):
    """Masks, and records and history without timings, of an --out folder."""
    results = json.loads((out / "results.json").read_text())

    def drop(d):
        return {k: v for k, v in d.items() if k != "seconds"}

    masks = load_file(str(out / "masks.safetensors"))
    steps = [drop(r) for r in results["steps"]]
    return masks, steps, [drop(h) for h in results["history"]]


def assert_same_run(a, b):
    masks_a, steps_a, history_a = outcome(a)
    masks_b, steps_b, history_b = outcome(b)
    assert masks_a.keys() == masks_b.keys()
    assert all(torch.equal(masks_a[k], masks_b[k]) for k in masks_a)
    assert steps_a == steps_b
    assert history_a == history_b


def signal_at_pass(monkeypatch, passes, kind=signal.SIGINT):
    """Send ``kind`` to this process when each pass number in ``passes`` ends."""
    callbacks = cli_prune._progress_callbacks

    def patched(bar, task):
        on_pass, evaluate = callbacks(bar, task)

        def on_pass_and_signal(record):
            on_pass(record)
            for _ in range(passes.count(record.number)):
                os.kill(os.getpid(), kind)

        return on_pass_and_signal, evaluate

    monkeypatch.setattr(cli_prune, "_progress_callbacks", patched)


def test_sigint_stops_after_the_step_and_resume_ends_as_if_never_stopped(
    cache, reference, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    signal_at_pass(monkeypatch, [17])
    assert main(prune_argv(cache, out, "--json", str(tmp_path / "s.json"))) == 130
    err = capsys.readouterr().err
    assert "stopped by SIGINT after step 17 of 40" in err
    assert f"icbs-opt prune --resume {out}" in err
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["interrupted"] and s["signal"] == "SIGINT"
    assert s["stopped"] == "interrupted" and not s["abandoned_step"]
    assert s["steps_done"] == s["final"]["steps"] == 17
    assert [h["step"] for h in s["history"]] == [0, 10]
    assert len(s["passes"]) == 17
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    monkeypatch.undo()
    assert main(["prune", "--resume", str(out)]) == 0
    assert_same_run(out, reference[1])
    assert json.loads((tmp_path / "s.json").read_text())["resumed_from"]


def test_second_sigint_abandons_the_step_and_still_writes(
    cache, reference, tmp_path, monkeypatch, capsys
):
    build, calls = pruner_module.Pruner._block_model, {"n": 0}

    def build_and_signal(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] in (29, 30):  # the 2nd and 3rd block of pass 10
            os.kill(os.getpid(), signal.SIGINT)
        return build(self, *args, **kwargs)

    monkeypatch.setattr(pruner_module.Pruner, "_block_model", build_and_signal)
    out = tmp_path / "run"
    assert main(prune_argv(cache, out, "--blocks-per-step", "3")) == 130
    assert "the step under way was abandoned" in capsys.readouterr().err
    s = json.loads((out / "results.json").read_text())
    assert s["abandoned_step"] and s["steps_done"] == 9 and len(s["steps"]) == 27
    monkeypatch.undo()
    assert main(["prune", "--resume", str(out)]) == 0
    assert_same_run(out, reference[3])


def test_sigterm_from_outside_keeps_the_work(cache, reference, tmp_path):
    out = tmp_path / "run"
    argv = prune_argv(cache, out, "--checkpoint-every", "1", "--steps", "100000")
    code = "import sys; from icbs_opt.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not (out / "checkpoint.safetensors").exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    s = json.loads((out / "results.json").read_text())
    assert s["signal"] == "SIGTERM" and 1 <= s["steps_done"] < 100000
    assert json.loads((out / "prune_config.json").read_text())["task"] == "digits-mlp"
    load_file(str(out / "model.safetensors"))


def test_periodic_checkpoint_resumes_exactly(cache, reference, tmp_path):
    out = tmp_path / "run"
    assert main(prune_argv(cache, out, "--checkpoint-every", "7")) == 0
    ckpt = json.loads((out / "results.json").read_text())["checkpoint"]
    assert ckpt == str(out / "checkpoint.safetensors")
    assert_same_run(out, reference[1])


def test_time_budget_ends_the_run_cleanly(cache, tmp_path, capsys):
    out = tmp_path / "run"
    argv = prune_argv(cache, out, "--time-budget", "0.00001")
    assert main(argv) == 0
    s = json.loads((out / "results.json").read_text())
    assert s["stopped"] == "time_budget" and not s["interrupted"]
    assert s["steps_done"] == 1 and s["history"][-1]["step"] == 0
    assert s["final"]["steps"] == 1 and s["final"]["metric"] > 0
    assert "stopped by --time-budget after step 1 of 40" in capsys.readouterr().err
    assert main(["prune", "--resume", str(out), "--time-budget", "60"]) == 0
    assert json.loads((out / "results.json").read_text())["steps_done"] == STEPS


def test_resume_with_another_setting_is_refused(cache, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(prune_argv(cache, out, "--checkpoint-every", "20")) == 0
    for flag, value, field in (
        ("--density", "0.2", "--density"),
        ("--batch-size", "100", "--batch-size"),
        ("--seed", "1", "--seed"),
        ("--backend", "exhaustive", "--backend"),
        ("--ridge", "0.5", "--ridge"),
    ):
        capsys.readouterr()
        assert main(["prune", "--resume", str(out), flag, value]) == 2
        err = capsys.readouterr().err
        assert f"cannot resume with {field} " in err and err.count("\n") == 1, err


def test_validation_split_is_held_out_of_the_pruning_data(cache):
    task = get_task("digits-mlp", cache_dir=cache, val_fraction=0.2)
    full = get_task("digits-mlp", cache_dir=cache)
    assert task.info["validation"] == 251 and task.info["train"] == 1006
    X_cal = task.calibration[0]
    assert len(X_cal) == 1006 and task.validate is not None
    rows = {tuple(x.tolist()) for x in X_cal}
    X_val = [x for x in full.calibration[0] if tuple(x.tolist()) not in rows]
    assert len(X_val) >= 240  # a few digits images are duplicates
    X, _ = next(task.batches(0))
    assert all(tuple(x.tolist()) in rows for x in X)
    assert full.validate is None


def test_an_executor_lost_mid_run_writes_the_finished_steps(
    cache, tmp_path, monkeypatch, capsys, caplog
):
    solve, calls = pruner_module.solve_prepared, {"n": 0}

    def lost_on_the_fifth(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise ExecutorUnavailable("the cluster at tcp://x:1 has had no workers")
        return solve(*args, **kwargs)

    monkeypatch.setattr(pruner_module, "solve_prepared", lost_on_the_fifth)
    out = tmp_path / "run"
    assert main(prune_argv(cache, out, "--checkpoint-every", "1")) == 3
    assert "has had no workers" in caplog.text  # the CLI's log line on stderr
    assert "stopped because the executor failed" in capsys.readouterr().err
    s = json.loads((out / "results.json").read_text())
    assert s["steps_done"] == 4 and s["abandoned_step"]
    assert (out / "masks.safetensors").is_file()
    monkeypatch.undo()
    assert main(["prune", "--resume", str(out)]) == 0
