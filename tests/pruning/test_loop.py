"""The pruning loop (`prune`): evaluation history, restarts, and keep-best."""

import json

import pytest

from icbs_opt.cli import main
from icbs_opt.errors import DataError, PruningError
from icbs_opt.pruning import Pruner, prune
from icbs_opt.pruning.loop import restore_best
from tests import tiny
from tests.tiny import batches, ce_loss, equal_masks, evaluate, make_pruner

STEPS = 40


def test_prune_loop_history_and_restart():
    data = [tiny.data(16, (6,), 3, seed) for seed in range(3)]  # restarted
    pruner = Pruner(tiny.mlp(), ce_loss, 0.5, "exhaustive", block_size=8)
    calls = []

    def counted(m):
        calls.append(1)
        return {"metric": 1.0, "loss": 2.0}

    seen = []
    result = prune(pruner, data, 7, evaluate=counted, eval_every=3, on_step=seen.append)
    assert [h["step"] for h in result.history] == [0, 3, 6, 7] and len(calls) == 4
    assert len(result.records) == len(seen) == 7
    assert result.accepted == sum(r.accepted for r in result.records)
    assert result.seconds >= sum(r.seconds.total for r in result.records) * 0.99
    assert result.history[-1]["seconds"] == result.seconds


def test_prune_loop_iterator_runs_out():
    pruner = Pruner(tiny.mlp(), ce_loss, 0.5, "exhaustive", block_size=8)
    with pytest.raises(DataError, match="ran out after 2 of 5"):
        prune(pruner, iter([tiny.data(16, (6,), 3, seed) for seed in range(2)]), 5)
    with pytest.raises(DataError, match="empty"):
        prune(pruner, [], 1)
    with pytest.raises(PruningError, match="steps must be"):
        prune(pruner, [], -1)


# ------------------------------------------------------------ keep-best
def test_keep_best_restores_the_best_validated_mask():
    pruner = make_pruner()
    scores = iter([50.0, 70.0, 90.0, 60.0, 80.0, 40.0])
    masks = {}

    def validate(model):
        step = len(masks)
        masks[step] = {k: v.clone() for k, v in pruner.masks().items()}
        return {"metric": next(scores), "loss": 0.0}

    result = prune(pruner, batches(), 10, evaluate=evaluate, eval_every=2,
                   validate=validate)  # fmt: skip
    assert [h["val_metric"] for h in result.history] == [50, 70, 90, 60, 80, 40]
    assert result.best["step"] == 4 and result.best["val_metric"] == 90
    best = restore_best(pruner, result)
    assert best["step"] == 4
    assert equal_masks(pruner.masks(), masks[2])
    assert evaluate(pruner.model)["metric"] == result.history[2]["metric"]


def test_keep_best_with_refits_restores_the_values_of_that_point():
    pruner = make_pruner(calibration=next(batches(7)), refit_every=2)
    scores = iter([50.0, 90.0, 60.0, 70.0])

    def validate(model):
        return {"metric": next(scores), "loss": 0.0}

    result = prune(pruner, batches(), 6, evaluate=evaluate, eval_every=2,
                   validate=validate)  # fmt: skip
    assert result.best["step"] == 2 and result.best_values is not None
    restore_best(pruner, result)
    assert evaluate(pruner.model) == {
        "metric": result.history[1]["metric"],
        "loss": result.history[1]["loss"],
    }


@pytest.mark.usefixtures("one_thread")
def test_cli_keep_best_restores_the_best_validation_mask(cache, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["prune", "--cache-dir", str(cache), "--steps", str(STEPS)]
    argv += ["--block-size", "64", "--no-progress", "--out", str(out)]
    assert main([*argv, "--keep-best", "--eval-every", "4"]) == 0
    s = json.loads((out / "results.json").read_text())
    best = max(s["history"], key=lambda h: h["val_metric"])  # the first best
    assert s["keep_best"]["step"] == best["step"] < STEPS
    assert s["final"]["metric"] == best["metric"]
    assert s["settings"]["run"]["keep_best"]
    config = json.loads((out / "prune_config.json").read_text())
    assert config["task_options"]["val_fraction"] == 0.2
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out), "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == best["metric"]
