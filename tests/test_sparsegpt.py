"""SparseGPT, the sequential driver and the refit (DESIGN.md section 1b)."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from icbs_opt.cli import main
from icbs_opt.errors import PruningError
from icbs_opt.pruning import Pruner, prune
from icbs_opt.pruning.refit import refit, refit_layer, refit_layer_pcg
from icbs_opt.pruning.sequential import sequential_update
from icbs_opt.pruning.sparsegpt import block_counts, sparsegpt, sparsegpt_layer
from icbs_opt.settings import PruneConfig


def loss_fn(model, X, y):
    return F.cross_entropy(model(X), y)


def mlp(seed=0, sizes=(12, 10, 7, 3)):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


def data(n=64, d=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, 3, (n,), generator=g)


# ------------------------------------------------------------ one layer
def numpy_sparsegpt(W, X, prune_count, blocksize, damp):
    """SparseGPT in plain loop form: every column's OBS update applied at once."""
    W = W.astype(np.float64).copy()
    d_out, d_in = W.shape
    H = X.T @ X
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    H += damp * np.mean(np.diag(H)) * np.eye(d_in)
    U = np.linalg.cholesky(np.linalg.inv(H)).T  # upper: H^-1 = U^T U
    keep = np.ones_like(W, dtype=bool)
    counts = block_counts(prune_count, d_in, blocksize)
    for b, start in enumerate(range(0, d_in, blocksize)):
        stop = min(start + blocksize, d_in)
        sal = W[:, start:stop] ** 2 / np.diag(U)[start:stop] ** 2
        sal[:, dead[start:stop]] = 0.0
        order = np.argsort(sal.reshape(-1), kind="stable")[: counts[b]]
        block = np.ones(sal.size, dtype=bool)
        block[order] = False
        keep[:, start:stop] = block.reshape(sal.shape)
        for j in range(start, stop):
            for r in range(d_out):
                if not keep[r, j]:
                    err = W[r, j] / U[j, j]
                    W[r, j:] -= err * U[j, j:]
                    W[r, j] = 0.0
    return W, keep


def test_sparsegpt_layer_matches_a_direct_numpy_implementation():
    torch.manual_seed(0)
    X = torch.randn(80, 20, dtype=torch.float64)
    X[:, 3] = 0.0  # a dead input
    W = torch.randn(6, 20, dtype=torch.float64)
    got, keep, scores = sparsegpt_layer(W, X.T @ X, 70, blocksize=8, dampening=0.01)
    want, want_keep = numpy_sparsegpt(W.numpy(), X.numpy(), 70, 8, 0.01)
    np.testing.assert_array_equal(keep.numpy(), want_keep)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-10)
    assert int((~keep).sum()) == 70 and torch.all(got[~keep] == 0)
    assert torch.all(~keep[:, 3])  # dead inputs are pruned first
    assert scores.shape == W.shape


def test_sparsegpt_layer_beats_plain_masking_on_the_reconstruction():
    torch.manual_seed(0)
    X = torch.randn(200, 16, dtype=torch.float64) @ torch.randn(16, 16).double()
    W = torch.randn(5, 16, dtype=torch.float64)
    Wn, keep, _ = sparsegpt_layer(W, X.T @ X, 40, blocksize=4)
    err = lambda V: float((X @ (W - V).T).pow(2).sum())  # noqa: E731
    assert err(Wn) < err(W * keep)


def test_block_counts_sum_to_the_total():
    assert block_counts(70, 20, 8) == [28, 28, 14]
    assert sum(block_counts(1001, 333, 128)) == 1001


# ------------------------------------------------------------ the driver
def test_sparsegpt_keeps_the_exact_density_of_each_layer():
    model = mlp()
    X, y = data()
    mods = [model[0], model[2], model[4]]
    got = sparsegpt(model, loss_fn, X, y, mods, 0.37, blocksize=4, max_batch_size=10)
    for m, (keep, _) in zip(mods, got, strict=True):
        assert int(keep.sum()) == round(0.37 * m.weight.numel())
        assert torch.equal(m.weight != 0, keep)


def test_layers_are_updated_in_forward_order_on_the_updated_inputs():
    model = mlp()
    X, y = data()
    seen = {}

    def update(m, grams):
        seen[m] = grams
        with torch.no_grad():
            m.weight.mul_(0.5)

    mods = [model[4], model[0], model[2]]  # any order in, forward order out
    sequential_update(model, loss_fn, X, y, mods, update, max_batch_size=24)
    assert list(seen) == [model[0], model[2], model[4]]
    # layer 2 sees the output of the already halved layer 1
    h = torch.relu(model[0](X)).double()
    assert seen[model[2]].rows == 64 and seen[model[2]].C is None
    torch.testing.assert_close(seen[model[2]].G, h.T @ h, rtol=1e-5, atol=1e-5)


def test_dense_inputs_are_paired_with_the_updated_ones():
    model = mlp()
    dense_model = copy.deepcopy(model)
    X, y = data()
    mods = [model[0], model[2]]
    dense = {m: m.weight.detach().clone() for m in mods}
    seen = {}

    def update(m, grams):
        seen[m] = grams
        with torch.no_grad():
            m.weight.mul_(0.5)

    sequential_update(model, loss_fn, X, y, mods, update, dense=dense)
    h = torch.relu(model[0](X)).double()
    hd = torch.relu(dense_model[0](X)).double()
    torch.testing.assert_close(seen[model[2]].C, h.T @ hd, rtol=1e-5, atol=1e-5)
    assert torch.equal(model[0].weight, dense_model[0].weight * 0.5)  # restored


def test_decoder_blocks_are_replayed_one_by_one():
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    from icbs_opt.tasks import causal_lm as llm

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = llm._prepare(LlamaForCausalLM(config))
    reference = copy.deepcopy(model)
    X = torch.randint(0, 32, (5, 8))
    names = llm.prunable_layers(model)
    mods = [model.get_submodule(n) for n in names]
    seen = {}

    def update(m, grams):
        seen[m] = grams.G
        with torch.no_grad():
            m.weight.mul_(0.5)

    sequential_update(model, llm.causal_lm_loss, X, X, mods, update, max_batch_size=2)
    assert list(seen) == mods  # forward order, every layer once
    for block in range(3):  # each block's layers see the inputs of the halved
        ref = copy.deepcopy(reference)  # earlier blocks, and of their own block
        for n in names:  # before any of its layers changed
            if int(n.split(".")[2]) < block:
                with torch.no_grad():
                    ref.get_submodule(n).weight.mul_(0.5)
        grams = {}

        def record(m, inputs, out, grams=grams):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            grams[m] = grams.get(m, 0) + x.T @ x

        mine = [n for n in names if int(n.split(".")[2]) == block]
        hooks = [ref.get_submodule(n).register_forward_hook(record) for n in mine]
        with torch.no_grad():
            llm.causal_lm_loss(ref, X, X)
        for h in hooks:
            h.remove()
        for n in mine:
            got = seen[model.get_submodule(n)]
            want = grams[ref.get_submodule(n)]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------ the refit
@pytest.mark.parametrize("kept", [0.2, 0.5, 0.8])  # both ways of solving
def test_refit_layer_is_the_least_squares_optimum(kept):
    torch.manual_seed(0)
    X = torch.randn(40, 9, dtype=torch.float64)
    W0 = torch.randn(5, 9, dtype=torch.float64)
    keep = torch.rand(5, 9) < kept
    keep[0] = False  # a row with nothing kept
    keep[1] = True  # and one with everything kept
    W = refit_layer(W0, keep, X.T @ X, dampening=0.0)
    for r in range(5):
        S = keep[r]
        want = torch.zeros(9, dtype=torch.float64)
        if S.any():
            sol = torch.linalg.lstsq(X[:, S], X @ W0[r]).solution
            want[S] = sol
        torch.testing.assert_close(W[r], want, rtol=1e-8, atol=1e-8)
    assert torch.all(W[~keep] == 0)


def test_refit_layer_to_dense_inputs():
    torch.manual_seed(0)
    X, Xd = torch.randn(40, 9, dtype=torch.float64), torch.randn(40, 9).double()
    W0 = torch.randn(4, 9, dtype=torch.float64)
    keep = torch.rand(4, 9) < 0.6
    keep[0, :2] = False  # a row solved by its kept, one by its pruned weights
    keep[1, 2:] = True
    W = refit_layer(W0, keep, X.T @ X, X.T @ Xd, dampening=0.0)
    for r in range(4):
        S = keep[r]
        sol = torch.linalg.lstsq(X[:, S], Xd @ W0[r]).solution
        torch.testing.assert_close(W[r, S], sol, rtol=1e-8, atol=1e-8)


def test_refit_with_dampening_keeps_a_dense_row():
    torch.manual_seed(0)
    X, W0 = torch.randn(30, 6).double(), torch.randn(2, 6).double()
    X[:, 2] = 0  # a dead input keeps its value
    keep = torch.tensor([[True] * 6, [True, True, True, False, True, False]])
    W = refit_layer(W0, keep, X.T @ X, dampening=0.01)
    torch.testing.assert_close(W[0], W0[0])
    assert W[1, 2] == pytest.approx(float(W0[1, 2]))


@pytest.mark.parametrize("dead", [False, True])
def test_pcg_refit_reaches_the_exact_solution(dead):
    torch.manual_seed(1)
    X, Xd = torch.randn(60, 12).double(), torch.randn(60, 12).double()
    X[:, 3] = 0 if dead else X[:, 3]
    W0 = torch.randn(6, 12, dtype=torch.float64)
    keep = torch.rand(6, 12) < 0.5
    keep[0], keep[1] = False, True  # nothing kept; everything kept
    G, C = X.T @ X, X.T @ Xd
    want = refit_layer(W0, keep, G, C, dampening=0.01)
    start = torch.randn(6, 12, dtype=torch.float64)  # any start converges
    W = refit_layer_pcg(
        W0, keep, G, C, start=start, tolerance=1e-12, dtype=torch.float64
    )
    torch.testing.assert_close(W, want, rtol=1e-8, atol=1e-8)
    assert torch.all(W[~keep] == 0)


def test_pcg_refit_solves_the_rows_it_did_not_finish_exactly():
    torch.manual_seed(0)
    X, W0 = torch.randn(40, 9).double(), torch.randn(3, 9).double()
    keep = torch.rand(3, 9) < 0.5
    G = X.T @ X
    W = refit_layer_pcg(W0, keep, G, max_iterations=1, dtype=torch.float64)
    torch.testing.assert_close(W, refit_layer(W0, keep, G), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("solver", ["pcg", "exact"])
@pytest.mark.parametrize("target", ["current", "dense"])
def test_refit_model_reconstructs_in_forward_order(target, solver):
    model = mlp()
    dense_model = copy.deepcopy(model)
    X, y = data()
    mods = [model[0], model[2], model[4]]
    keeps = [torch.rand(m.weight.shape) < 0.5 for m in mods]
    targets = {
        m: (k, m.weight.detach().clone()) for m, k in zip(mods, keeps, strict=True)
    }
    with torch.no_grad():
        for m, k in zip(mods, keeps, strict=True):
            m.weight.mul_(k)
    refit(model, loss_fn, X, y, targets, target=target, solver=solver, dampening=0)
    for m, k in zip(mods, keeps, strict=True):
        assert torch.all(m.weight[~k] == 0)
    # the second layer is the least-squares fit on the refit first layer's output
    h = torch.relu(model[0](X)).detach().double()
    ht = h if target == "current" else torch.relu(dense_model[0](X)).detach().double()
    W0 = dense_model[2].weight.detach().double()
    for r in range(W0.shape[0]):
        S = keeps[1][r]
        want = torch.linalg.lstsq(h[:, S], ht @ W0[r]).solution
        torch.testing.assert_close(
            model[2].weight[r, S].double(), want, rtol=1e-4, atol=1e-4
        )


def test_refit_rejects_an_unknown_target():
    model = mlp()
    X, y = data()
    with pytest.raises(PruningError, match="target must be one of dense, current"):
        refit(model, loss_fn, X, y, {}, target="nope")
    with pytest.raises(PruningError, match="solver must be one of pcg, exact"):
        refit(model, loss_fn, X, y, {}, solver="cg")


# ------------------------------------------------------------ the pruner
def energies(pruner_kwargs, before_steps=None, steps=4, seed=0):
    model = mlp(seed)
    X, y = data()
    seen = []

    def hook(problem):
        seen.append(problem.energy(problem.meta["x_cur"]) + problem.meta["const"])

    pruner = Pruner(
        model,
        loss_fn,
        0.5,
        backend="exhaustive",
        calibration=(X, y),
        block_size=8,
        problem_hook=hook,
        **pruner_kwargs,
    )
    if before_steps is not None:
        before_steps(pruner)
    for _ in range(steps):
        pruner.step(X, y)
    return pruner, seen


def assert_masks_describe_the_zeros(pruner):
    for name, keep in pruner.masks().items():
        w = pruner.model.get_submodule(name).weight
        assert torch.equal(w != 0, keep)


def test_sparsegpt_init_keeps_its_weights_and_the_qubo_exact():
    def check_init(pruner):
        for L in pruner._layers.values():
            assert int((~L.pruned).sum()) == round(0.5 * L.numel)
            kept = ~L.pruned
            assert not torch.equal(L.keep_values[kept], L.w0[kept])  # OBS update
            assert torch.equal(L.keep_values[L.pruned], L.w0[L.pruned])  # w0 back
        assert_masks_describe_the_zeros(pruner)

    pruner, seen = energies({"init": "sparsegpt"}, before_steps=check_init)
    assert seen and max(abs(e) for e in seen) < 1e-12  # dL(x_cur) = 0
    assert_masks_describe_the_zeros(pruner)


def test_refit_keeps_masks_and_the_qubo_exact():
    state = {}

    def do_refit(pruner):
        state["masks"] = pruner.masks()
        state["before"] = {n: L.keep_values.clone() for n, L in pruner._layers.items()}
        assert pruner.refit() >= 0

    pruner, seen = energies({}, before_steps=do_refit, steps=0)
    for name, keep in pruner.masks().items():
        assert torch.equal(keep, state["masks"][name])
        L = pruner._layers[name]
        w = L.module.weight.detach().reshape(-1)
        assert torch.equal(L.keep_values[~L.pruned], w[~L.pruned])
        assert torch.equal(L.keep_values[L.pruned], state["before"][name][L.pruned])
    assert_masks_describe_the_zeros(pruner)
    for _ in range(4):
        pruner.step(*data())
    _, seen = energies({}, before_steps=lambda p: p.refit(), steps=4)
    assert seen and max(abs(e) for e in seen) < 1e-12


def test_refit_needs_calibration_data():
    with pytest.raises(PruningError, match="refit needs calibration data"):
        Pruner(mlp(), loss_fn, 0.5, backend="exhaustive", refit=True)
    with pytest.raises(PruningError, match="init 'sparsegpt' needs calibration"):
        Pruner(mlp(), loss_fn, 0.5, backend="exhaustive", init="sparsegpt")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("refit_every", -1, "refit_every must be an integer >= 0, got -1"),
        ("refit", 1, "refit must be True or False, got 1"),
        ("refit_target", "x", "refit_target must be one of dense, current"),
        ("refit_solver", "x", "refit_solver must be one of pcg, exact, got 'x'"),
    ],
)
def test_refit_settings_are_checked(field, value, message):
    with pytest.raises(PruningError, match=message):
        PruneConfig(density=0.5, **{field: value})


@pytest.mark.parametrize(
    ("settings", "steps", "calls"),
    [
        ({"refit": True}, 0, [0]),
        ({"refit": True}, 3, [3]),
        ({"refit_every": 2}, 5, [2, 4]),
        ({"refit": True, "refit_every": 2}, 4, [2, 4]),
        ({"refit": True, "refit_every": 2}, 5, [2, 4, 5]),
    ],
)
def test_the_loop_refits_when_asked(settings, steps, calls, monkeypatch):
    X, y = data()
    pruner = Pruner(
        mlp(),
        loss_fn,
        0.5,
        backend="exhaustive",
        calibration=(X, y),
        block_size=8,
        **settings,
    )
    done = []
    real = pruner.refit
    monkeypatch.setattr(
        pruner, "refit", lambda: done.append(pruner.passes_done) or real()
    )
    result = prune(pruner, [(X, y)], steps, evaluate=lambda m: {"metric": 0, "loss": 0})
    assert done == calls and result.steps_done == steps


# ------------------------------------------------------------ the CLI
def run_cli(cache, out, *extra):
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
        "--no-progress",
        "--json",
        str(out / "summary.json"),
        *extra,
    ]
    assert main(argv) == 0
    return json.loads((out / "summary.json").read_text())


def test_cli_sparsegpt_baseline_beats_magnitude(cache, tmp_path):
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        magnitude = run_cli(cache, tmp_path, "--steps", "0")
        sgpt = run_cli(cache, tmp_path, "--steps", "0", "--init", "sparsegpt")
    finally:
        torch.set_num_threads(old)
    assert sgpt["init"]["method"] == "sparsegpt"
    assert sgpt["final"]["density"] == pytest.approx(0.1, abs=1e-4)
    assert sgpt["final"]["metric"] > magnitude["final"]["metric"] + 30


def test_cli_saved_model_holds_the_refit_weights(cache, tmp_path, capsys):
    out = tmp_path / "run"
    s = run_cli(cache, tmp_path, "--steps", "2", "--refit", "--out", str(out))
    assert s["settings"]["config"]["refit"] is True
    masks = load_file(str(out / "masks.safetensors"))
    state = load_file(str(out / "model.safetensors"))
    for name in ("0", "2", "4"):
        keep, w = masks[name], state[f"{name}.weight"]
        assert torch.all(w[~keep] == 0) and torch.all(w[keep] != 0)
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out), "--json", "-"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["accuracy"] == pytest.approx(s["final"]["metric"])
    assert s["final"]["metric"] > s["init"]["metric"] + 30  # the refit's gain


@pytest.mark.parametrize("steps", ["0", "1"])
def test_cli_sparsegpt_and_refit_on_a_model_dir(tmp_path, capsys, steps):
    pytest.importorskip("transformers")
    from test_llm import WORDS, tiny_llama, word_tokenizer, write_text

    from icbs_opt.tasks import causal_lm as llm

    write_text(tmp_path / "valid.txt", 400, seed=1)
    write_text(tmp_path / "test.txt", 200, seed=2)
    llm.save_causal_lm(
        tiny_llama(vocab=len(WORDS) + 1), word_tokenizer(), tmp_path / "m"
    )
    out, summary = tmp_path / "pruned", tmp_path / "s.json"
    argv = [
        "prune",
        "--model",
        str(tmp_path / "m"),
        "--calib-data",
        str(tmp_path / "valid.txt"),
        "--eval-data",
        str(tmp_path / "test.txt"),
        "--pruning-windows",
        "32",
        "--save-dtype",
        "float32",
        "--save-format",
        "dense",
        "--seq-len",
        "16",
        "--eval-windows",
        "3",
        "--calib-windows",
        "4",
        "--batch-size",
        "4",
        "--density",
        "0.5",
        "--steps",
        steps,
        "--block-size",
        "8",
        "--backend",
        "exhaustive",
        "--no-progress",
        "--init",
        "sparsegpt",
        "--refit",
        "--json",
        str(summary),
        "--out",
        str(out),
    ]
    assert main(argv) == 0, capsys.readouterr().err
    record = json.loads(summary.read_text())
    assert record["final"]["density"] == pytest.approx(0.5, abs=0.01)
    masks = load_file(str(out / "masks.safetensors"))
    state = load_file(str(out / "model.safetensors"))
    for name, keep in masks.items():
        w = state[f"{name}.weight"]
        assert torch.all(w[~keep] == 0) and torch.all(w[keep] != 0)
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out), "--json", "-"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["perplexity"] == pytest.approx(record["final"]["metric"], rel=1e-6)
