import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from icbs_opt.cli import main
from icbs_opt.errors import DataError
from icbs_opt.tasks import digits as tasks
from icbs_opt.tasks import get_task, register_task, task_names
from icbs_opt.tasks.digits import default_cache_dir
from icbs_opt.tasks.options import DIGITS_PRESET, DigitsOptions

pytestmark = pytest.mark.usefixtures("one_thread")


def test_digits_task(cache, caplog):
    with caplog.at_level(logging.INFO, logger="icbs_opt.tasks"):
        task = get_task("digits-mlp", cache_dir=cache)
    assert "loaded the digits MLP" in caplog.text
    assert task.name == "digits-mlp" and task.metric == "accuracy"
    assert task.layers == ["0", "2", "4"]
    assert [tuple(task.model.get_submodule(n).weight.shape) for n in task.layers] == [
        (256, 64),
        (256, 256),
        (10, 256),
    ]
    result = task.evaluate(task.model)
    assert result["metric"] == pytest.approx(task.info["dense_accuracy"])
    assert result["metric"] > 95 and 0 < result["loss"] < 0.5
    assert len(task.calibration[0]) == task.info["train"] == 1257
    a, b, c = task.batches(0), task.batches(0), task.batches(1)
    Xa, ya = next(a)
    Xb, yb = next(b)
    assert Xa.shape == (200, 64) and torch.equal(Xa, Xb) and torch.equal(ya, yb)
    assert not torch.equal(Xa, next(c)[0]) and not torch.equal(Xa, next(a)[0])
    assert float(Xa.max()) <= 1.0


def test_digits_cache_is_rebuilt_when_corrupt(tmp_path, caplog):
    path = tasks._digits_cache_file(tmp_path)
    path.write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING, logger="icbs_opt.tasks"):
        task = get_task("digits-mlp", cache_dir=tmp_path)
    assert "retraining" in caplog.text and task.info["dense_accuracy"] > 95
    assert load_file(str(path))  # rewritten


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv(tasks.CACHE_ENV, str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv(tasks.CACHE_ENV)
    assert "icbs-opt" in str(default_cache_dir())


def test_task_registry_errors(cache):
    assert "digits-mlp" in task_names()
    with pytest.raises(
        DataError, match="unknown task 'mnist'; known tasks: digits-mlp"
    ):
        get_task("mnist")
    with pytest.raises(DataError, match="does not take option 'seq_len'"):
        get_task("digits-mlp", seq_len=8)
    with pytest.raises(DataError, match="batch_size must be an integer >= 1, got 0"):
        get_task("digits-mlp", cache_dir=cache, batch_size=0)
    with pytest.raises(DataError, match=r"batch_size must be in \[1, 1257\], got 2000"):
        get_task("digits-mlp", cache_dir=cache, batch_size=2000)
    with pytest.raises(DataError, match="already registered"):
        register_task(
            "digits-mlp",
            tasks.build_digits_mlp,
            options=DigitsOptions,
            preset=DIGITS_PRESET,
        )


def test_cli_prune_writes_everything(cache, tmp_path, capsys):
    out, summary = tmp_path / "run", tmp_path / "summary.json"
    argv = [
        "prune",
        "--task",
        "digits-mlp",
        "--cache-dir",
        str(cache),
        "--backend",
        "exhaustive",
        "--block-size",
        "12",
        "--steps",
        "4",
        "--eval-every",
        "2",
        "--seed",
        "1",
        "--no-progress",
        "--json",
        str(summary),
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "dense" in printed and "final" in printed and "4 steps" in printed
    s = json.loads(summary.read_text())
    assert {
        "task",
        "density",
        "backend",
        "seed",
        "metric",
        "dense",
        "init",
        "final",
        "history",
    } <= set(s)
    assert (s["task"], s["density"], s["backend"], s["seed"], s["metric"]) == (
        "digits-mlp",
        0.1,
        "exhaustive",
        1,
        "accuracy",
    )
    assert s["dense"]["density"] == 1.0
    assert s["init"]["method"] == "magnitude"
    assert s["init"]["density"] == pytest.approx(0.1, abs=1e-4)
    assert s["final"]["density"] == pytest.approx(0.1, abs=1e-4)
    assert s["final"]["steps"] == 4 and 0 <= s["final"]["accepted"] <= 4
    assert [h["step"] for h in s["history"]] == [0, 2, 4]
    assert s["init"]["metric"] == s["history"][0]["metric"]
    assert s["final"]["metric"] == s["history"][-1]["metric"]
    assert not (out / "config.json").exists()
    run = json.loads((out / "prune_config.json").read_text())
    assert run["config"]["block_size"] == 12 and run["config"]["k"] == 6
    assert run["config"]["grad_multiplier"] == 0.75 and run["config"]["seed"] == 1
    assert run["config"]["selection"] == "gradient" and run["run"]["steps"] == 4
    assert run["run"]["threads"] == 1 and run["task_options"]["cache_dir"] == str(cache)
    assert s["settings"] == {"config": run["config"], "run": run["run"]}
    assert "torch" in run["versions"]
    results = json.loads((out / "results.json").read_text())
    assert len(results["steps"]) == 4
    masks = load_file(str(out / "masks.safetensors"))
    state = load_file(str(out / "model.safetensors"))
    for name in ("0", "2", "4"):
        keep, w = masks[name], state[f"{name}.weight"]
        assert keep.dtype == torch.bool and keep.shape == w.shape
        assert torch.all(w[~keep] == 0) and torch.all(w[keep] != 0)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--density", "1.5"], "density must be a finite number in (0, 1), got 1.5"),
        (["--task", "mnist"], "unknown task 'mnist'"),
        (["--backend", "nope"], "unknown backend 'nope'"),
        (["--k", "12"], "k must be an integer in [1, 11], got 12"),
        (["--init", "wanda_per_row"], "init must be one of"),
        (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
        (["--layers", "0,7"], "unknown layer '7'"),
    ],
)
def test_cli_prune_errors(cache, capsys, extra, message):
    argv = [
        "prune",
        "--cache-dir",
        str(cache),
        "--backend",
        "exhaustive",
        "--block-size",
        "12",
        "--steps",
        "1",
        "--no-progress",
        *extra,
    ]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_prune_then_evaluate_the_output_folder(cache, tmp_path, capsys):
    out, plot = tmp_path / "run", tmp_path / "curve.png"
    argv = ["prune", "--cache-dir", str(cache), "--backend", "exhaustive"]
    argv += ["--block-size", "12", "--steps", "4", "--eval-every", "2"]
    argv += ["--out", str(out), "--plot", str(plot), "--json", "-"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert captured.err == ""  # no progress bar when stderr is not a terminal
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["evaluate", "--model", str(out), "--json", "-"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["task"] == "digits-mlp"
    assert evaluated["accuracy"] == pytest.approx(summary["final"]["metric"])
    assert evaluated["density"] == pytest.approx(summary["final"]["density"])
    assert main(["evaluate", "--task", "digits-mlp", "--cache-dir", str(cache)]) == 0
    assert "digits-mlp: accuracy 97." in capsys.readouterr().out


def test_cli_help_shows_each_task_preset(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default digits-mlp: 256; smollm2-135m, causal-lm: 1024)" in text
    assert "(default digits-mlp: 0.1; smollm2-135m, causal-lm: 0.5)" in text
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("icbs-opt 0.")


def test_cli_prune_passes_of_many_blocks(cache, tmp_path, capsys):
    summary = tmp_path / "s.json"
    argv = ["prune", "--cache-dir", str(cache), "--backend", "exhaustive"]
    argv += ["--block-size", "12", "--steps", "2", "--blocks-per-step", "3"]
    argv += ["--workers", "2", "--check-pass", "--json", str(summary)]
    assert main(argv) == 0
    assert "2 steps of 3 block(s)" in capsys.readouterr().out
    s = json.loads(summary.read_text())
    assert s["settings"]["config"]["blocks_per_step"] == 3
    assert s["settings"]["config"]["check_pass"] is True
    assert s["final"]["blocks"] == 6 and s["executor"] == "threads (2 workers)"
    assert [p["pass"] for p in s["passes"]] == [1, 2]
    for p in s["passes"]:
        assert p["blocks"] == 3 and 0 <= p["accepted"] <= 3
        assert {"record", "select", "qubo", "solve", "total"} <= set(p["seconds"])
        assert p["loss_before"] is not None and p["loss_after"] is not None
