"""Many blocks per pass: one recording engine, one pass feeding M blocks."""

import hashlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from icbs_opt.derivatives import record_layers
from icbs_opt.errors import PruningError
from icbs_opt.executors import make_executor
from icbs_opt.pruning import PAPER_CLASSIFIER_SETTINGS, PruneConfig, Pruner, prune
from icbs_opt.pruning.step import select_blocks
from tests import tiny
from tests.tiny import ce_loss as loss

PAPER = dict(PAPER_CLASSIFIER_SETTINGS)

#: Masks of version 0.1.0 (commit 44b24ac, before passes existed) after 15 steps
#: of each setting below on the exhaustive backend: M = 1 must reproduce them.
GOLDEN = {
    "paper": ({**PAPER}, "23a4a756bc02ab02"),
    "random": ({"selection": "random"}, "70ecd6af09e95392"),
    "magnitude_log": (
        {"selection": "magnitude", "tabu_frac": 0.3, "schedule": "log"},
        "208c9a5f9d15e88d",
    ),
    "wanda": (
        {"init": "wanda_per_output", "selection": "wanda", "max_batch_size": 7},
        "39c42a2ca55e6c34",
    ),
    "gradient_mbs": (
        {"selection": "gradient", "max_batch_size": 7, "init": "gradient"},
        "9488b66ee7c6e4e9",
    ),
    "mean": ({"selection": "gradient", "hessian": "gradient_mean"}, "402d09820964ec87"),
}


def data():
    return tiny.data(60, (10,), 4)


def mlp():
    return tiny.mlp((10, 12, 8, 4), seed=1)


def mask_hash(pruner):
    h = hashlib.sha256()
    for name, keep in pruner.masks().items():
        h.update(name.encode())
        h.update(keep.numpy().tobytes())
    return h.hexdigest()[:16]


def run(steps=15, density=0.4, **options):
    X, y = data()
    batches = [(X[i : i + 20], y[i : i + 20]) for i in range(0, 60, 20)]
    pruner = Pruner(
        mlp(),
        loss,
        density,
        "exhaustive",
        block_size=12,
        calibration=(X, y),
        seed=3,
        **options,
    )
    return pruner, prune(pruner, batches, steps)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_one_block_per_pass_reproduces_the_masks_of_0_1_0(name):
    options, expected = GOLDEN[name]
    pruner, result = run(**options)
    assert mask_hash(pruner) == expected
    assert len(result.records) == len(result.passes) == 15
    assert [r.pass_number for r in result.records] == list(range(1, 16))


def test_a_pass_feeds_m_blocks_in_distinct_layers():
    pruner, result = run(steps=4, blocks_per_step=3, **PAPER)
    assert len(result.passes) == 4 and len(result.records) == 12
    for p in result.passes:
        assert sorted(r.layer for r in p.blocks) == ["0", "2", "4"]
        assert set(p.seconds) == {"record", "select", "qubo", "solve", "check", "total"}
        assert p.accepted == sum(r.accepted for r in p.blocks)
    assert [r.step for r in result.records] == list(range(1, 13))
    for keep in pruner.masks().values():  # every block kept its k
        assert int(keep.sum()) == round(0.4 * keep.numel())


def test_more_blocks_than_layers_gives_disjoint_blocks_per_layer():
    seen = []

    def hook(problem):
        seen.append((problem.meta["layer"], problem.meta["step"]))

    X, y = data()
    pruner = Pruner(
        mlp(), loss, 0.4, "exhaustive", block_size=8, calibration=(X, y),
        problem_hook=hook, **{**PAPER, "tabu_frac": 0.0, "fix_frac_prune": 0.0,
                              "fix_frac_keep": 0.0},
    )  # fmt: skip
    record = pruner.run_pass(X, y, blocks=7)
    layers = [r.layer for r in record.blocks]
    assert len(layers) == 7 and set(layers) == {"0", "2", "4"}
    assert max(layers.count(name) for name in "024") <= 3  # ceil(7 / 3) each
    assert len(seen) == sum(0 < r.k < r.n for r in record.blocks)


def test_pass_blocks_in_one_layer_are_disjoint():
    X, y = data()
    pruner = Pruner(mlp(), loss, 0.4, "exhaustive", block_size=8, calibration=(X, y))
    layer = pruner._layers["0"]
    scores = lambda L: pruner._selection_scores(L, X, y, None)  # noqa: E731
    work = select_blocks([layer] * 3, scores, pruner.config, 1, 1)
    chosen = [set(b.idx.tolist()) for b in work]
    assert all(len(c) == 8 for c in chosen)
    assert not (chosen[0] & chosen[1]) and not (chosen[1] & chosen[2])


# 2:4 on the two layers whose inputs split into groups of 4 (12 and 8 wide)
NM = {"density": None, "pattern": "2:4", "layers": ["2", "4"]}


@pytest.mark.parametrize("pattern", [{}, NM], ids=["unstructured", "2:4"])
def test_serial_threads_and_a_cluster_give_the_same_masks(pattern):
    hashes = []
    with tiny.local_cluster(1, threads_per_worker=2, processes=False) as cluster:
        address = cluster.scheduler_address.replace("tcp://", "dask://")
        for executor, workers in ((None, 1), ("threads", 2), (address, None)):
            pruner, result = run(
                steps=3, blocks_per_step=3, executor=executor, workers=workers,
                **{**PAPER, **pattern},
            )  # fmt: skip
            assert all(r.feasible for r in result.records)
            assert result.accepted, "nothing moved: the masks prove nothing"
            hashes.append(mask_hash(pruner))
            pruner.close()
    assert hashes[0] == hashes[1] == hashes[2]


def test_check_pass_undoes_a_pass_that_raised_the_batch_loss():
    pruner, result = run(steps=6, blocks_per_step=3, check_pass=True, **PAPER)
    for p in result.passes:
        assert p.loss_before is not None and p.loss_after is not None
        if p.rolled_back:
            assert p.loss_after > p.loss_before and p.accepted == 0
        else:
            assert p.loss_after <= p.loss_before
    assert result.accepted == sum(p.accepted for p in result.passes)


def test_check_pass_restores_the_model_when_the_batch_loss_rose():
    # The loss counts weights pruned since the init (no gradient): every move raises it
    def loss_and_moves(m, X, y):
        moved = sum(int(((m[i].weight == 0) != init[i]).sum()) for i in init)
        return loss(m, X, y) + moved

    X, y = data()
    init = {}
    pruner = Pruner(mlp(), loss_and_moves, 0.4, "exhaustive", block_size=12,
                    calibration=(X, y), seed=3, blocks_per_step=3, check_pass=True,
                    **PAPER)  # fmt: skip
    init.update({i: pruner.model[i].weight == 0 for i in (0, 2, 4)})
    masks = pruner.masks()
    weights = [w.detach().clone() for w in pruner.model.parameters()]
    result = prune(pruner, [(X, y)], 3)
    assert [(p.rolled_back, p.accepted) for p in result.passes] == [(True, 0)] * 3
    assert all(p.loss_after > p.loss_before for p in result.passes)
    assert all(torch.equal(masks[k], v) for k, v in pruner.masks().items())
    for a, b in zip(weights, pruner.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_check_blocks_keeps_only_moves_that_lower_the_batch_loss():
    pruner, result = run(steps=8, blocks_per_step=3, check_blocks=True, **PAPER)
    undone = [r for r in result.records if r.rolled_back]
    assert undone and len(undone) < sum(r.accepted for r in result.records)
    checked = [p for p in result.passes if p.loss_after is not None]
    assert checked
    for p in checked:
        assert p.loss_after <= p.loss_before
    # the masks in force are those of the moves that stood
    keep = pruner.masks()
    for name, L in pruner._layers.items():
        assert torch.equal(keep[name].reshape(-1), ~L.pruned)
        w = dict(pruner.model.named_modules())[name].weight.reshape(-1)
        assert torch.equal(w != 0, ~L.pruned & (L.w0 != 0))


def test_tapes_share_inputs_and_match_single_layer_recording():
    torch.manual_seed(0)
    lin = nn.Linear(6, 6)
    heads = nn.ModuleList([nn.Linear(6, 3), nn.Linear(6, 3)])

    def fn(m, X, y):  # both heads read the same input tensor
        h = lin(X)
        return F.mse_loss(heads[0](h) + heads[1](h), y)

    X, y = torch.randn(9, 6), torch.randn(9, 3)
    tapes, batch = record_layers(None, fn, X, y, [lin, *heads], max_batch_size=4)
    assert batch == pytest.approx(float(fn(None, X, y).detach()), rel=1e-6)
    assert tapes[1].xs[0].data_ptr() == tapes[2].xs[0].data_ptr()  # shared storage
    for module, tape in zip([lin, *heads], tapes, strict=True):
        (alone,), _ = record_layers(None, fn, X, y, [module], max_batch_size=4)
        idx = torch.arange(module.weight.numel())
        assert torch.equal(tape.per_sample_block_gradients(idx),
                           alone.per_sample_block_gradients(idx))  # fmt: skip
        (w,) = torch.autograd.grad(fn(None, X, y), module.weight)
        torch.testing.assert_close(tape.gradient(), w, rtol=1e-5, atol=1e-7)
    half, _ = record_layers(None, fn, X, y, heads, dtype=torch.bfloat16)
    assert half[0].xs[0].dtype == torch.bfloat16
    assert half[0].nbytes() * 2 == tapes[1].nbytes()  # half the memory


def test_memory_guard_refuses_a_pass_that_would_not_fit():
    X, y = data()
    model = mlp()
    with pytest.raises(PruningError, match=r"needs about .* GiB, more than the .*"
                       r"--blocks-per-step.*--tape-dtype bfloat16"):  # fmt: skip
        record_layers(model, loss, X, y, [model[0], model[2]], max_batch_size=10,
                      memory_limit=1000)  # fmt: skip


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"blocks_per_step": 0}, "blocks_per_step must be an integer >= 1, got 0"),
        ({"workers": 0}, "workers must be an integer >= 1, got 0"),
        ({"tape_dtype": "float16"}, "tape_dtype must be one of float32, bfloat16"),
        ({"check_pass": "yes"}, "check_pass must be True or False"),
        ({"executor": 3}, "executor must be a string, got 3"),
    ],
)
def test_bad_pass_settings(options, match):
    with pytest.raises(PruningError, match=match):
        PruneConfig(density=0.5, **options)


def test_unknown_executor_is_refused_before_work():
    with pytest.raises(ValueError, match="nowhere"):
        make_executor("nowhere://x")
