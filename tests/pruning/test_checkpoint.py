"""Checkpoint and resume, and stop reasons of the pruning loop (keep-best:
test_loop.py)."""

import pytest
import torch

from icbs_opt.errors import DataError, ExecutorUnavailable, PruningError
from icbs_opt.pruning import prune
from icbs_opt.pruning import pruner as pruner_module
from icbs_opt.pruning.checkpoint import load_checkpoint, save_checkpoint
from tests.tiny import batches, equal_masks, evaluate, make_pruner


def comparable(result):
    """Records, passes and history without timings."""
    drop = lambda d: {k: v for k, v in d.items() if k != "seconds"}  # noqa: E731
    return (
        [drop(r.to_dict()) for r in result.records],
        [drop(p.to_dict()) for p in result.passes],
        [drop(h) for h in result.history],
        result.best and drop(result.best),
    )


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

    full = make_pruner(**settings)
    expected = prune(full, batches(), 10, **kw)
    first = make_pruner(**settings)
    stopped = prune(first, batches(), 10, stop=stop_at(4), **kw)
    save_checkpoint(tmp_path / "c.safetensors", first, stopped, {})
    saved = load_checkpoint(tmp_path / "c.safetensors")
    second = make_pruner(**settings)
    second.load_state_dict(saved.state)
    resumed = prune(second, batches(), 10, resume=saved.result, **kw)
    assert comparable(resumed) == comparable(expected)
    for a, b in zip(full.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_an_executor_failure_abandons_the_step_and_keeps_the_work(monkeypatch):
    pruner = make_pruner(blocks_per_step=3)
    prune(pruner, batches(), 2)
    before = pruner.state_dict()
    masks = pruner.masks()
    weights = [p.detach().clone() for p in pruner.model.parameters()]

    def lost(*args, **kwargs):
        raise ExecutorUnavailable("the Dask cluster at tcp://x:1 has had no workers")

    monkeypatch.setattr(pruner_module, "solve_prepared", lost)
    result = prune(pruner, batches(), 10)
    assert result.stopped == "executor_failed" and result.abandoned
    assert result.steps_done == 0 and pruner.passes_done == 2
    assert pruner.state_dict()["rng"] == before["rng"]
    assert equal_masks(pruner.masks(), masks)
    for w, p in zip(weights, pruner.model.parameters(), strict=True):
        assert torch.equal(w, p)
