"""The block pipeline of pruning/step.py: select, model, solve, accept."""

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from icbs_opt.backends import get_backend
from icbs_opt.executors import make_executor
from icbs_opt.pruning import Pruner
from icbs_opt.pruning.step import (
    accept,
    block_model,
    prepare_solves,
    select_blocks,
    solve_prepared,
)
from tests.tiny import ce_loss, data, mlp


def pipeline(pruner, X, y, count=2):
    layer = pruner._layers["0"]
    scores = lambda L: pruner._selection_scores(L, X, y, None)  # noqa: E731
    blocks = select_blocks([layer] * count, scores, pruner.config, 1, 1)
    models = [
        block_model(b, pruner.config, pruner.model, ce_loss, X, y, None) for b in blocks
    ]
    preps = prepare_solves(models, np.random.default_rng(0), False)
    with make_executor("threads", workers=1) as executor:
        answers = solve_prepared(models, preps, executor, get_backend("exhaustive"))
    return blocks, models, answers


def test_the_answer_is_the_exact_optimum_and_is_applied():
    X, y = data(40, (6,), 3)
    pruner = Pruner(mlp(), ce_loss, 0.5, "exhaustive", block_size=8, calibration=(X, y))
    blocks, models, answers = pipeline(pruner, X, y)
    applied = []
    for b, m, a in zip(blocks, models, answers, strict=True):
        assert a.feasible and int(a.x.sum()) == b.record.k
        n, k = m.problem.n, m.problem.k
        best = min(  # brute force over every mask with k pruned
            m.problem.energy(np.isin(np.arange(n), c).astype(np.int8))
            for c in itertools.combinations(range(n), k)
        )
        assert a.dl == pytest.approx(best + m.const, abs=1e-12)
        assert a.dl_current == pytest.approx(0.0, abs=1e-9)  # the QUBO is exact at x0
        before = b.layer.pruned[b.idx].clone()
        moved = accept(b, a)
        applied.append(moved)
        after = b.layer.pruned[b.idx]
        assert moved == (a.dl <= a.dl_current and not torch.equal(before, after))
        if moved:
            assert torch.equal(after, torch.from_numpy(a.x.astype(bool)))
            w = pruner.model[0].weight.detach().reshape(-1)[b.idx]
            assert torch.all(w[after] == 0) and torch.all(w[~after] != 0)
    assert any(applied), "no block moved: the apply path was not exercised"


def test_blocks_are_immutable_and_disjoint_within_a_layer():
    X, y = data(40, (6,), 3)
    pruner = Pruner(mlp(), ce_loss, 0.5, "exhaustive", block_size=8, calibration=(X, y))
    blocks, _, _ = pipeline(pruner, X, y, count=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        blocks[0].idx = blocks[1].idx
    chosen = [set(b.idx.tolist()) for b in blocks]
    assert not any(a & b for a, b in itertools.combinations(chosen, 2))
