"""The refit: least-squares weights of the kept mask (DESIGN.md section 1b)."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from icbs_opt.cli import main
from icbs_opt.errors import PruningError
from icbs_opt.pruning import Pruner, prune
from icbs_opt.pruning.refit import refit, refit_layer, refit_layer_pcg
from icbs_opt.settings import PruneConfig
from tests import tiny
from tests.tiny import (
    assert_masks_describe_the_zeros,
    block_energies,
    prune_digits,
    two_block_llama,
)
from tests.tiny import ce_loss as loss_fn


def mlp(seed=0):
    return tiny.mlp((12, 10, 7, 3), seed)


def data(seed=1):
    return tiny.data(64, (12,), 3, seed)


# ------------------------------------------------------------ one layer, a model
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


# ------------------------------------------------------------ in the pruner
def test_refit_keeps_masks_and_the_qubo_exact():
    state = {}

    def do_refit(pruner):
        state["masks"] = pruner.masks()
        state["before"] = {n: L.keep_values.clone() for n, L in pruner._layers.items()}
        assert pruner.refit() >= 0

    pruner, seen = block_energies(mlp(), data(), {}, before_steps=do_refit, steps=0)
    for name, keep in pruner.masks().items():
        assert torch.equal(keep, state["masks"][name])
        L = pruner._layers[name]
        w = L.module.weight.detach().reshape(-1)
        assert torch.equal(L.keep_values[~L.pruned], w[~L.pruned])
        assert torch.equal(L.keep_values[L.pruned], state["before"][name][L.pruned])
    assert_masks_describe_the_zeros(pruner)
    for _ in range(4):
        pruner.step(*data())
    assert seen and max(abs(e) for e in seen) < 1e-12  # dL(x_cur) = 0 after a refit


def test_refit_needs_calibration_data():
    with pytest.raises(PruningError, match="refit needs calibration data"):
        Pruner(mlp(), loss_fn, 0.5, backend="exhaustive", refit=True)


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
def test_cli_saved_model_holds_the_refit_weights(cache, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--steps", "2", "--refit", "--out", str(out)]
    s = prune_digits(cache, tmp_path / "summary.json", *argv)
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


# ------------------------------------------- decoder blocks, against least squares
DAMPENING = 0.01


def _llm():
    """The causal-LM task module (these tests need transformers)."""
    pytest.importorskip("transformers")
    from icbs_opt.tasks import causal_lm

    return causal_lm


def inputs_of(model: torch.nn.Module, name: str, X: torch.Tensor) -> torch.Tensor:
    """``(rows, d_in)`` float64 inputs of one layer over the batch."""
    got = []
    layer = model.get_submodule(name)
    hook = layer.register_forward_hook(lambda m, i, o: got.append(i[0].detach()))
    with torch.no_grad():
        _llm().causal_lm_loss(model, X, X)
    hook.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in got]).double()


def ridge_fit(X, Xt, W0, keep):
    """Per row ``min ||Xt w0 - X w||^2 + lam ||w0 - w||^2`` over the kept entries."""
    G = X.T @ X
    lam = DAMPENING * G.diagonal().mean()
    W = torch.zeros_like(W0)
    for r in range(W0.shape[0]):
        S = keep[r]
        A = G[S][:, S] + lam * torch.eye(int(S.sum()), dtype=G.dtype)
        W[r, S] = torch.linalg.solve(A, (X.T @ (Xt @ W0[r]) + lam * W0[r])[S])
    return W


def pruned_and_refit(target: str):
    """A dense two-block Llama, its masks, the masked model and its refit."""
    dense = two_block_llama()
    names = _llm().prunable_layers(dense)
    X = torch.randint(0, 64, (16, 12))
    model = copy.deepcopy(dense)
    keeps = {n: torch.rand(model.get_submodule(n).weight.shape) < 0.5 for n in names}
    targets = {}
    for n in names:
        m = model.get_submodule(n)
        targets[m] = (keeps[n], m.weight.detach().clone())
        with torch.no_grad():
            m.weight.mul_(keeps[n])
    masked = copy.deepcopy(model)
    loss = _llm().causal_lm_loss
    kw = {"solver": "exact", "dampening": DAMPENING, "max_batch_size": 6}
    refit(model, loss, X, X, targets, target=target, **kw)  # 3 sub-batches
    return dense, names, X, keeps, masked, model


def test_dense_refit_is_the_least_squares_fit_on_the_refit_inputs():
    """Every layer, in forward order, fits the dense model's same layer on its own
    dense inputs from the inputs of the model refit so far, inside a block too
    (before the fix o_proj and the MLP saw inputs of the not yet refit attention,
    and corrected an error the refit had already removed: 0.6 to 1.3 apart)."""
    dense, names, X, keeps, ref, model = pruned_and_refit("dense")
    for n in names:
        W0 = dense.get_submodule(n).weight.detach().double()
        Xt = inputs_of(dense, n, X)  # the dense layer on its dense inputs
        W = ridge_fit(inputs_of(ref, n, X), Xt, W0, keeps[n])
        with torch.no_grad():
            ref.get_submodule(n).weight.copy_(W)  # the next layers see it
        got = model.get_submodule(n).weight.detach().double()
        assert torch.equal(got != 0, W != 0), n
        torch.testing.assert_close(got, W, rtol=1e-4, atol=1e-4, msg=n)


def test_current_refit_fits_a_block_from_its_inputs_before_the_refit():
    """``current`` (SparseGPT's way) fits all of a block's layers from the block's
    inputs before any of them changed; the next block sees the refit one."""
    dense, names, X, keeps, masked, model = pruned_and_refit("current")
    before = masked  # the model as the current block found it
    for block in ("0", "1"):
        after = copy.deepcopy(before)
        for n in (n for n in names if n.split(".")[2] == block):
            Xc = inputs_of(before, n, X)
            W = ridge_fit(Xc, Xc, dense.get_submodule(n).weight.double(), keeps[n])
            with torch.no_grad():
                after.get_submodule(n).weight.copy_(W)
            got = model.get_submodule(n).weight.detach().double()
            torch.testing.assert_close(got, W, rtol=1e-4, atol=1e-4, msg=n)
        before = after


def test_dense_refit_keeps_the_masks_and_restores_no_dense_weight():
    dense, names, X, keeps, masked, model = pruned_and_refit("dense")
    for n in names:
        w = model.get_submodule(n).weight
        assert torch.all(w[~keeps[n]] == 0), n
        assert not torch.equal(w, dense.get_submodule(n).weight), n


# ------------------------------------------------------------ the engine
