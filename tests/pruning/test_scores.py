"""The scorer registry that serves the initial mask and block selection."""

import numpy as np
import pytest
import torch

from icbs_opt.derivatives import wanda_scores
from icbs_opt.pruning.scores import SCORERS, ScoreInputs, weight_scores
from icbs_opt.pruning.state import LayerState
from icbs_opt.settings import INIT_METHODS, SELECTION_METHODS, PruneConfig
from tests.tiny import mlp


def layer():
    return LayerState.of("0", mlp()[0])


def test_every_init_and_selection_method_has_a_scorer():
    inits = {PruneConfig(density=0.5, init=m).init_method for m in INIT_METHODS}
    assert inits | set(SELECTION_METHODS) == set(SCORERS)


def test_scores_follow_their_definitions():
    L = layer()
    grad = torch.randn(L.module.weight.shape)
    norms = torch.rand(L.module.weight.shape[1])
    inputs = ScoreInputs(np.random.default_rng(0), norms=norms, grad=grad)
    expected = {
        "magnitude": L.w0.abs(),
        "gradient": (L.w0 * grad.reshape(-1)).abs(),
        "wanda": wanda_scores(L.module, norms).reshape(-1),
        "sparsegpt": grad.reshape(-1),
        "random": torch.from_numpy(np.random.default_rng(0).random(L.numel)),
    }
    for method, want in expected.items():
        got = weight_scores(method, L, inputs)
        assert got.dtype == torch.float64 and got.shape == (L.numel,)
        torch.testing.assert_close(got, want.to(torch.float64), msg=method)
        if method == "random":  # the draw came from the pruner's generator
            inputs = ScoreInputs(np.random.default_rng(0), norms=norms, grad=grad)


def test_an_unknown_method_is_refused_by_name():
    with pytest.raises(KeyError, match="'fisher'"):
        weight_scores("fisher", layer(), ScoreInputs(np.random.default_rng(0)))
