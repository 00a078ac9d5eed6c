"""Checkpoint and resume, stop reasons and keep-best of the pruning loop."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from icbs_opt.errors import DataError, PruningError
from icbs_opt.pruning import Pruner, prune
from icbs_opt.pruning import pruner as pruner_module
from icbs_opt.pruning.checkpoint import load_checkpoint, save_checkpoint
from icbs_opt.pruning.loop import restore_best

SETTINGS = {
    "block_size": 16,
    "init": "random",
    "selection": "random",
    "schedule": "log",
    "tabu_frac": 0.3,
    "fix_frac_prune": 0.2,
    "fix_frac_keep": 0.2,
    "seed": 3,
}


def loss_fn(model, X, y):
    return F.cross_entropy(model(X), y)


def make_pruner(**changes):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)
    )
    settings = {**SETTINGS, **changes}
    return Pruner(model, loss_fn, 0.4, backend="native", workers=1, **settings)


def batches(seed=0):
    rng = np.random.default_rng(seed)
    while True:
        X = torch.from_numpy(rng.standard_normal((32, 16))).float()
        yield X, torch.from_numpy(rng.integers(0, 4, 32))


def evaluate(model):
    X, y = next(batches(99))
    with torch.no_grad():
        logits = model(X)
    acc = (logits.argmax(1) == y).double().mean().item() * 100
    return {"metric": acc, "loss": F.cross_entropy(logits, y).item()}


def comparable(result):
    """Records, passes and history without timings."""
    drop = lambda d: {k: v for k, v in d.items() if k != "seconds"}  # noqa: E731
    return (
        [drop(r.to_dict()) for r in result.records],
        [drop(p.to_dict()) for p in result.passes],
        [drop(h) for h in result.history],
        result.best and drop(result.best),
    )


def equal_masks(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def stop_at(step):
    calls = iter(range(1, 10**6))
    return lambda: "test" if next(calls) == step else None


@pytest.mark.parametrize("blocks_per_step", [1, 3])
def test_resume_equals_an_uninterrupted_run(tmp_path, blocks_per_step):
    kw = {"evaluate": evaluate, "eval_every": 3}
    full = make_pruner(blocks_per_step=blocks_per_step)
    expected = prune(full, batches(), 12, **kw)
    first = make_pruner(blocks_per_step=blocks_per_step)
    stopped = prune(first, batches(), 12, stop=stop_at(5), **kw)
    assert stopped.stopped == "test" and stopped.steps_done == 5
    assert stopped.history[-1]["step"] == 3  # no extra evaluation at the stop
    save_checkpoint(tmp_path / "c.safetensors", first, stopped, {"a": 1})
    saved = load_checkpoint(tmp_path / "c.safetensors")
    assert saved.settings == {"a": 1}
    second = make_pruner(blocks_per_step=blocks_per_step)
    second.load_state_dict(saved.state)
    resumed = prune(second, batches(), 12, resume=saved.result, **kw)
    assert resumed.stopped is None
    assert equal_masks(resumed_masks := second.masks(), full.masks()), resumed_masks
    assert comparable(resumed) == comparable(expected)
    assert [list(t) for t in second._layers["0"].tabu] == [
        list(t) for t in full._layers["0"].tabu
    ]


def test_periodic_checkpoints_resume_exactly(tmp_path):
    path = tmp_path / "c.safetensors"
    full = make_pruner()
    expected = prune(full, batches(), 9, evaluate=evaluate, eval_every=2)
    seen = []

    def checkpoint(result):
        seen.append(result.steps_done)
        if result.steps_done == 4:
            save_checkpoint(path, first, result, {})

    first = make_pruner()
    prune(first, batches(), 9, evaluate=evaluate, eval_every=2,
          checkpoint=checkpoint, checkpoint_every=2)  # fmt: skip
    assert seen == [2, 4, 6, 8]
    saved = load_checkpoint(path)
    second = make_pruner()
    second.load_state_dict(saved.state)
    resumed = prune(second, batches(), 9, evaluate=evaluate, eval_every=2,
                    resume=saved.result)  # fmt: skip
    assert equal_masks(second.masks(), full.masks())
    assert comparable(resumed) == comparable(expected)


def test_keyboard_interrupt_abandons_the_step_and_keeps_the_state(monkeypatch):
    pruner = make_pruner(blocks_per_step=3)
    prune(pruner, batches(), 3)
    before = pruner.state_dict()
    accept, calls = pruner_module.accept, {"n": 0}

    def interrupted(block, answer):
        calls["n"] += 1
        if calls["n"] == 6:  # the last block of the second pass
            raise KeyboardInterrupt
        return accept(block, answer)

    twin = make_pruner(blocks_per_step=3)
    twin.load_state_dict(before)
    prune(twin, batches(), 1)
    monkeypatch.setattr(pruner_module, "accept", interrupted)
    result = prune(pruner, batches(), 10, evaluate=evaluate)
    assert result.stopped == "interrupted" and result.abandoned
    assert result.steps_done == 1 and pruner.passes_done == 4
    assert len(result.history) == 1  # step 0 only: no evaluation of a lost step
    assert any(r.accepted for r in twin_pass_two(twin)), "nothing to undo"
    assert pruner.state_dict()["rng"] == twin.state_dict()["rng"]
    assert equal_masks(pruner.masks(), twin.masks())
    for a, b in zip(twin.model.parameters(), pruner.model.parameters(), strict=True):
        assert torch.equal(a, b)


def twin_pass_two(twin):
    """The records of the abandoned pass, run by a copy of ``twin``."""
    copy = make_pruner(blocks_per_step=3)
    copy.load_state_dict(twin.state_dict())
    feed = batches()
    next(feed)
    return prune(copy, feed, 1).records


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


def test_load_state_dict_refuses_another_model():
    a, b = make_pruner(), make_pruner(fix_frac_keep=0.5)
    prune(a, batches(), 2)
    state = a.state_dict()
    state["layers"]["0"]["pruned"] = ~state["layers"]["0"]["pruned"]
    with pytest.raises(PruningError, match="moves frozen weights"):
        b.load_state_dict(state)
    del state["layers"]["0"]
    with pytest.raises(PruningError, match="prunes layers"):
        b.load_state_dict(state)


def test_load_checkpoint_of_a_bad_file(tmp_path):
    bad = tmp_path / "checkpoint.safetensors"
    bad.write_bytes(b"nonsense")
    with pytest.raises(DataError, match="cannot read the checkpoint"):
        load_checkpoint(tmp_path)


def test_resume_with_refits_restores_the_kept_values(tmp_path):
    calibration = next(batches(7))
    kw = {"evaluate": evaluate, "eval_every": 2}
    settings = {"calibration": calibration, "refit_every": 3}

    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)
        )
        return Pruner(model, loss_fn, 0.4, backend="native", workers=1,
                      **{**SETTINGS, **settings})  # fmt: skip

    full = make()
    expected = prune(full, batches(), 10, **kw)
    first = make()
    stopped = prune(first, batches(), 10, stop=stop_at(4), **kw)
    save_checkpoint(tmp_path / "c.safetensors", first, stopped, {})
    saved = load_checkpoint(tmp_path / "c.safetensors")
    second = make()
    second.load_state_dict(saved.state)
    resumed = prune(second, batches(), 10, resume=saved.result, **kw)
    assert comparable(resumed) == comparable(expected)
    for a, b in zip(full.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_keep_best_with_refits_restores_the_values_of_that_point():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)
    )
    calibration = next(batches(7))
    pruner = Pruner(model, loss_fn, 0.4, backend="native", workers=1,
                    calibration=calibration, refit_every=2, **SETTINGS)  # fmt: skip
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
