"""SparseGPT and the sequential driver (DESIGN.md section 1b); the refit's tests
are in test_refit.py."""

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from icbs_opt.cli import main
from icbs_opt.errors import PruningError
from icbs_opt.pruning import Pruner
from icbs_opt.pruning.sequential import sequential_update
from icbs_opt.pruning.sparsegpt import block_counts, sparsegpt, sparsegpt_layer
from tests import tiny
from tests.tiny import (
    WORDS,
    assert_masks_describe_the_zeros,
    block_energies,
    prune_digits,
    tiny_llama,
    word_tokenizer,
)
from tests.tiny import ce_loss as loss_fn


def mlp(seed=0):
    return tiny.mlp((12, 10, 7, 3), seed)


def data(seed=1):
    return tiny.data(64, (12,), 3, seed)


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
    from icbs_opt.tasks import causal_lm as llm

    model = tiny_llama(layers=3)
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


# ------------------------------------------------------------ the pruner
def test_sparsegpt_init_keeps_its_weights_and_the_qubo_exact():
    def check_init(pruner):
        for L in pruner._layers.values():
            assert int((~L.pruned).sum()) == round(0.5 * L.numel)
            kept = ~L.pruned
            assert not torch.equal(L.keep_values[kept], L.w0[kept])  # OBS update
            assert torch.equal(L.keep_values[L.pruned], L.w0[L.pruned])  # w0 back
        assert_masks_describe_the_zeros(pruner)

    settings = {"init": "sparsegpt"}
    pruner, seen = block_energies(mlp(), data(), settings, before_steps=check_init)
    assert seen and max(abs(e) for e in seen) < 1e-12  # dL(x_cur) = 0
    assert_masks_describe_the_zeros(pruner)


def test_sparsegpt_init_needs_calibration_data():
    with pytest.raises(PruningError, match="init 'sparsegpt' needs calibration"):
        Pruner(mlp(), loss_fn, 0.5, backend="exhaustive", init="sparsegpt")


# ------------------------------------------------------------ the CLI
def test_cli_sparsegpt_baseline_beats_magnitude(cache, tmp_path):
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        magnitude = prune_digits(cache, tmp_path / "m.json", "--steps", "0")
        argv = ["--steps", "0", "--init", "sparsegpt"]
        sgpt = prune_digits(cache, tmp_path / "s.json", *argv)
    finally:
        torch.set_num_threads(old)
    assert sgpt["init"]["method"] == "sparsegpt"
    assert sgpt["final"]["density"] == pytest.approx(0.1, abs=1e-4)
    assert sgpt["final"]["metric"] > magnitude["final"]["metric"] + 30


@pytest.mark.parametrize("steps", ["0", "1"])
def test_cli_sparsegpt_and_refit_on_a_model_dir(text_dir, tmp_path, capsys, steps):
    pytest.importorskip("transformers")
    from icbs_opt.tasks import causal_lm as llm

    llm.save_causal_lm(
        tiny_llama(vocab=len(WORDS) + 1), word_tokenizer(), tmp_path / "m"
    )
    out, summary = tmp_path / "pruned", tmp_path / "s.json"
    argv = [
        "prune",
        "--model",
        str(tmp_path / "m"),
        "--calib-data",
        str(text_dir / "valid.txt"),
        "--eval-data",
        str(text_dir / "test.txt"),
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
