import itertools
import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from icbs_opt.backends import Backend, get_backend
from icbs_opt.backends.native import NativeBackend
from icbs_opt.errors import BackendError, BackendUnavailable, PruningError
from icbs_opt.problems import BlockProblem
from icbs_opt.pruning import (
    INIT_METHODS,
    PAPER_CLASSIFIER_SETTINGS,
    PruneConfig,
    Pruner,
    block_qubo,
    nonzero_density,
    prune,
)
from icbs_opt.pruning.selection import select_block
from tests.tiny import ce_loss, mlp


def mse_loss(model, X, y):
    return F.mse_loss(model(X), y)


def convnet(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 3),
    )


def batches(shape=(6,), classes=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield (
            torch.randn(size, *shape, generator=g),
            torch.randint(0, classes, (size,), generator=g),
        )


def originals(model):
    return {
        n: m.weight.detach().clone()
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    }


def check_invariants(pruner, w0, density, frozen_before=None):
    modules = dict(pruner.model.named_modules())
    for name, keep in pruner.masks().items():
        w = modules[name].weight
        assert keep.dtype == torch.bool and keep.shape == w.shape
        # pruned weights exactly 0, kept weights exactly their values if kept:
        # the original ones, unless SparseGPT updated them
        r = pruner._layers[name].keep_values.reshape(w.shape)
        if pruner.config.init != "sparsegpt":
            assert torch.equal(r, w0[name])
        assert torch.equal(w.detach(), torch.where(keep, r, 0.0))
        assert int(keep.sum()) == round(density * w.numel())
    if frozen_before is not None:
        for name, keep in pruner.masks().items():
            frozen = pruner._layers[name].frozen.reshape(keep.shape)
            assert torch.equal(keep[frozen], frozen_before[name][frozen])


CASES = (
    [{"init": m, "selection": "random"} for m in INIT_METHODS]
    + [{"selection": m} for m in ("random", "magnitude", "wanda", "gradient")]
    + [{"hessian": m} for m in ("gradient_mean", "exact", "exact_piecewise")]
    + [
        {"schedule": "log", "min_steps_per_layer": 2},
        {"tabu_frac": 0.3, "fix_frac_prune": 0.3, "fix_frac_keep": 0.3},
        {"max_batch_size": 5, "hessian": "exact_piecewise", "hessian_chunk_size": 3},
        {"remove_zero_rows": True, "grad_multiplier": 0.75, "ridge_multiplier": 1e-3},
        {"k": 2, "block_size": 10},
        PAPER_CLASSIFIER_SETTINGS,
    ]
)


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items())
)
@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_invariants_after_every_step(case, arch):
    model = mlp() if arch == "mlp" else convnet()
    shape = (6,) if arch == "mlp" else (2, 4, 4)
    data = batches(shape)
    calib = next(data)
    w0 = originals(model)
    if case.get("remove_zero_rows"):  # exact zeros give all-zero Q rows
        with torch.no_grad():
            model[0].weight.view(-1)[:10] = 0.0
        w0 = originals(model)
    density = 0.3
    options = {"block_size": 8, **case}
    pruner = Pruner(model, ce_loss, density, "exhaustive", calibration=calib, **options)
    check_invariants(pruner, w0, density)
    frozen_masks = pruner.masks()
    for _ in range(6):
        X, y = next(data)
        record = pruner.step(X, y)
        check_invariants(pruner, w0, density, frozen_masks)
        assert record.n <= options["block_size"]
        assert record.dl <= record.dl_current or not record.accepted
        assert abs(record.dl_current) < 1e-9
        assert record.seconds.total >= record.seconds.solve >= 0
    assert pruner.density() == pytest.approx(nonzero_density(model, pruner.layer_names))


def test_k_is_kept_in_the_block():
    model = mlp()
    pruner = Pruner(model, ce_loss, 0.5, "exhaustive", block_size=10, k=3)
    record = pruner.step(*next(batches()), layer="0")
    assert (record.n, record.k) == (10, 3)


def test_small_layer_takes_all_free_weights():
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2))
    pruner = Pruner(model, ce_loss, 0.5, "exhaustive", block_size=8)
    X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    record = pruner.step(X, y, layer="2")
    assert (record.n, record.k) == (4, 2)


def test_tabu_switched_off_for_small_layer(caplog):
    with caplog.at_level(logging.WARNING, logger="icbs_opt.pruning"):
        pruner = Pruner(mlp(), ce_loss, 0.5, "exhaustive", block_size=16, tabu_frac=0.5)
    assert "tabu switched off" in caplog.text and "layer 2 " in caplog.text
    assert pruner._layers["2"].tabu_cap == 0
    assert pruner._layers["0"].tabu_cap == 24


def test_tabu_passes_over_recent_weights():
    model = nn.Sequential(nn.Linear(10, 10))
    pruner = Pruner(
        model,
        mse_loss,
        0.5,
        "exhaustive",
        block_size=10,
        tabu_frac=0.5,
        selection="magnitude",
    )
    X, y = torch.randn(8, 10), torch.randn(8, 10)
    L = pruner._layers["0"]
    first = select_block(L, L.w0.abs, 10, 5)
    L.push_tabu(first)
    second = select_block(L, L.w0.abs, 10, 5)
    assert not set(first.tolist()) & set(second.tolist())
    # the FIFO holds at most tabu_frac of the free weights
    for blocks in range(2, 7):  # the first block and then one per step
        pruner.step(X, y)
        held = torch.cat(list(L.tabu)).tolist()
        assert len(held) == min(50, 10 * blocks)  # cap: tabu_frac * 100 free
        # the mask is the FIFO's content, even with an index in it twice
        assert set(torch.nonzero(L.tabu_mask()).squeeze(1).tolist()) == set(held)


def test_fixed_fractions_and_per_group_init():
    model = mlp()
    w0 = originals(model)
    pruner = Pruner(
        model,
        ce_loss,
        0.25,
        "exhaustive",
        block_size=8,
        init="magnitude_per_output",
        fix_frac_prune=0.5,
        fix_frac_keep=0.5,
    )
    keep = pruner.masks()["0"]  # (8, 6): 12 kept, 1 or 2 per row
    assert keep.sum(1).tolist() == [2] * 4 + [1] * 4
    frozen = pruner._layers["0"].frozen.reshape(8, 6)
    assert int((frozen & keep).sum()) == 6 and int((frozen & ~keep).sum()) == 18
    # frozen kept weights are the largest kept ones, frozen pruned the smallest
    mag = w0["0"].abs()
    assert mag[frozen & keep].min() >= mag[~frozen & keep].max()
    assert mag[frozen & ~keep].max() <= mag[~frozen & ~keep].min()
    per_in = Pruner(mlp(), ce_loss, 0.25, "exhaustive", init="magnitude_per_input")
    assert per_in.masks()["0"].sum(0).tolist() == [2] * 6


def test_wanda_init_uses_activation_norms():
    model = nn.Sequential(nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 2.0]]))
    X = torch.tensor([[10.0, 1.0], [10.0, 1.0]])
    pruner = Pruner(
        model,
        mse_loss,
        0.5,
        "exhaustive",
        init="wanda",
        calibration=(X, torch.zeros(2, 1)),
    )
    assert pruner.masks()["0"].tolist() == [[True, False]]
    magnitude = Pruner(
        nn.Sequential(nn.Linear(2, 1, bias=False)), mse_loss, 0.5, "exhaustive"
    )
    assert magnitude.density() == 0.5


def test_log_schedule_counts():
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 100), nn.Linear(100, 10))
    pruner = Pruner(
        model,
        mse_loss,
        0.5,
        "exhaustive",
        block_size=4,
        schedule="log",
        min_steps_per_layer=3,
    )
    picks = [pruner._schedule.next() for _ in range(3 + 3 + 3)]
    assert sorted(picks) == ["0"] * 3 + ["1"] * 3 + ["2"] * 3
    pruner = Pruner(model, mse_loss, 0.5, "exhaustive", block_size=4, schedule="log")
    picks = [pruner._schedule.next() for _ in range(2 + 3 + 3)]
    assert sorted(picks) == ["0"] * 2 + ["1"] * 3 + ["2"] * 3


# ------------------------------------------------------------ QUBO and acceptance
@pytest.mark.parametrize("low_rank", [False, True])
def test_block_qubo_matches_its_definition(low_rank):
    rng = np.random.default_rng(0)
    n = 7
    w0 = torch.tensor(rng.standard_normal(n))
    pruned = torch.tensor([1, 0, 1, 1, 0, 0, 1], dtype=torch.bool)
    w = torch.where(pruned, 0.0, w0)
    g = torch.tensor(rng.standard_normal(n))
    F = torch.tensor(rng.standard_normal((3 if low_rank else n, n)))  # H = F^T F
    H = F.T @ F
    if low_rank:  # the empirical Fisher's form: H is never formed
        Q, const = block_qubo(w0, w, g, None, 0.75, 1e-2, factor=F)
    else:
        Q, const = block_qubo(w0, w, g, H, 0.75, 1e-2)
    for bits in itertools.combinations(range(n), 4):
        x = torch.zeros(n, dtype=torch.float64)
        x[list(bits)] = 1
        delta = w0 * (1 - x) - w
        dl = 0.75 * g @ delta + 0.5 * delta @ H @ delta + 1e-2 * delta @ delta
        assert float(x @ Q @ x) + const == pytest.approx(float(dl), abs=1e-10)
    x_cur = pruned.double()
    assert float(x_cur @ Q @ x_cur) + const == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("hessian", ["exact", "exact_piecewise"])
def test_predicted_dl_is_exact_for_linear_regression(hessian):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3))
    X, y = (
        torch.randn(40, 5, dtype=torch.float64),
        torch.randn(40, 3, dtype=torch.float64),
    )
    model.double()
    pruner = Pruner(
        model,
        mse_loss,
        0.5,
        "exhaustive",
        block_size=10,
        hessian=hessian,
        init="random",
        hessian_chunk_size=3,
    )
    accepted = 0
    for _ in range(4):
        before = mse_loss(model, X, y).item()
        record = pruner.step(X, y)
        after = mse_loss(model, X, y).item()
        accepted += record.accepted
        if record.accepted:
            assert record.dl < 0
            assert after - before == pytest.approx(record.dl, abs=1e-10)
        else:
            assert after == before
    assert accepted > 0


class ScriptedBackend(Backend):
    """Test backend: returns what ``self.answer(problem, x0)`` says."""

    name = "scripted"

    def __init__(self, answer):
        super().__init__()
        self.answer = answer

    def _solve(self, problem, *, seed, x0):
        return self.answer(problem, x0), {}


def step_with(answer, **options):
    model = mlp()
    pruner = Pruner(
        model, ce_loss, 0.5, ScriptedBackend(answer), block_size=8, **options
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks = pruner.masks()
    record = pruner.step(*next(batches()), layer="0")
    same = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    same_masks = all(torch.equal(masks[k], v) for k, v in pruner.masks().items())
    return record, same and same_masks


def test_worse_answer_is_rejected():
    def worst(problem, x0):
        return get_backend("exhaustive").solve(BlockProblem(-problem.Q, problem.k)).x

    record, unchanged = step_with(worst)
    assert record.feasible and record.dl > record.dl_current
    assert not record.accepted and unchanged and record.flips == 0


def test_infeasible_answer_is_rejected():
    record, unchanged = step_with(lambda problem, x0: np.ones(problem.n, np.int8))
    assert not record.feasible and not record.accepted and unchanged


def test_best_answer_is_accepted():
    record, unchanged = step_with(
        lambda problem, x0: get_backend("exhaustive").solve(problem).x
    )
    assert record.accepted and not unchanged and record.dl < 0 and record.flips > 0


def test_exception_in_a_step_leaves_the_model():
    def boom(problem, x0):
        raise RuntimeError("solver crashed")

    model = mlp()
    pruner = Pruner(model, ce_loss, 0.5, ScriptedBackend(boom), block_size=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="crashed"):
        pruner.step(*next(batches()))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_warm_start_is_the_current_mask():
    seen = []

    def record_x0(problem, x0):
        seen.append((problem.energy(x0), x0.copy()))
        return x0

    record, unchanged = step_with(record_x0)
    assert unchanged and not record.accepted and int(seen[0][1].sum()) == record.k


def test_problem_hook_gets_unscaled_problem_with_meta(tmp_path):
    problems = []
    model = mlp()
    pruner = Pruner(
        model, ce_loss, 0.5, "exhaustive", block_size=8, problem_hook=problems.append
    )
    masks = pruner.masks()
    record = pruner.step(*next(batches()), layer="2")
    (p,) = problems
    meta = p.meta
    assert meta["layer"] == "2" and meta["step"] == 1 and p.k == record.k
    assert p.scaled()[1] == pytest.approx(meta["scale"])
    assert int(meta["x_cur"].sum()) == p.k
    assert p.energy(meta["x_cur"]) + meta["const"] == pytest.approx(0.0, abs=1e-12)
    assert math.isfinite(record.dl)
    p.save(tmp_path / "block.npz")
    assert BlockProblem.load(tmp_path / "block.npz").meta["layer"] == "2"
    assert not torch.equal(masks["2"], pruner.masks()["2"]) or not record.accepted


# ----------------------------------------------------------------- determinism
def run(seed, steps=8, **options):
    model = mlp()
    data = batches(seed=1)
    pruner = Pruner(
        model,
        ce_loss,
        0.4,
        "neal",
        block_size=10,
        seed=seed,
        backend_options={"num_reads": 2, "num_sweeps": 50},
        calibration=next(data),
        **options,
    )
    prune(pruner, data, steps)
    return pruner.masks()


@pytest.mark.parametrize(
    "options", [{"init": "random", "selection": "random"}, PAPER_CLASSIFIER_SETTINGS]
)
def test_same_seed_same_masks(options):
    a, b = run(3, **options), run(3, **options)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = run(4, **options)
    assert any(not torch.equal(a[k], c[k]) for k in a)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("density", [0, 1, 1.5, -0.1, "half", True, float("nan")])
def test_bad_density(density):
    with pytest.raises(PruningError, match=f"density must be .* got {density!r}"):
        Pruner(mlp(), ce_loss, density, "exhaustive")


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"block_size": 1}, "block_size must be an integer >= 2, got 1"),
        ({"block_size": 8, "k": 0}, r"k must be an integer in \[1, 7\], got 0"),
        ({"block_size": 8, "k": 8}, "got 8"),
        ({"init": "l1"}, "init must be one of .* got 'l1'"),
        ({"init": "random_per_output"}, "got 'random_per_output'"),
        ({"selection": "best"}, "selection must be one of .* got 'best'"),
        ({"hessian": "fisher"}, "got 'fisher'"),
        ({"schedule": "cosine"}, "got 'cosine'"),
        ({"tabu_frac": 1.0}, r"tabu_frac must be a finite number in \[0, 1\), got 1.0"),
        ({"fix_frac_keep": -0.1}, r"fix_frac_keep must be a finite number in \[0, 1\]"),
        ({"max_batch_size": 0}, "max_batch_size must be an integer >= 1, got 0"),
        ({"seed": -1}, "seed must be an integer >= 0, got -1"),
        ({"blocksize": 8}, "unknown Pruner option 'blocksize'"),
        ({"layers": ["0", "fc9"]}, "unknown layer 'fc9'; prunable layers are: 0, 2"),
        ({"layers": "0"}, "must be a list"),
        ({"layers": ["1"]}, "layer '1' is a ReLU"),
        ({"init": "wanda"}, "init 'wanda' needs calibration data"),
        ({"init": "gradient_per_input"}, "needs calibration data"),
        ({"selection": "wanda"}, "selection 'wanda' needs calibration data"),
    ],
)
def test_bad_options(options, match):
    with pytest.raises(PruningError, match=match):
        Pruner(mlp(), ce_loss, 0.5, "exhaustive", **options)


def test_bad_step_layer():
    pruner = Pruner(mlp(), ce_loss, 0.5, "exhaustive", block_size=8)
    with pytest.raises(PruningError, match="unknown layer 'fc'"):
        pruner.step(*next(batches()), layer="fc")


def test_unknown_and_unavailable_backend(monkeypatch):
    with pytest.raises(BackendError, match="unknown backend 'nope'"):
        Pruner(mlp(), ce_loss, 0.5, "nope")
    with pytest.raises(BackendError, match="unknown option 'sweeps'"):
        Pruner(mlp(), ce_loss, 0.5, "neal", backend_options={"sweeps": 3})
    monkeypatch.setattr(NativeBackend, "unavailable_reason", lambda self: "not built")
    with pytest.raises(BackendUnavailable, match="'native' cannot run here: not built"):
        Pruner(mlp(), ce_loss, 0.5)


def test_config_object_and_conflicts():
    cfg = PruneConfig(density=0.5, block_size=8)
    assert cfg.k == 4 and cfg.to_dict()["block_size"] == 8
    pruner = Pruner(mlp(), ce_loss, backend="exhaustive", config=cfg)
    assert pruner.config is cfg
    with pytest.raises(PruningError, match="either config or density"):
        Pruner(mlp(), ce_loss, 0.5, "exhaustive", config=cfg)
    with pytest.raises(PruningError, match="density is required"):
        Pruner(mlp(), ce_loss, backend="exhaustive")
