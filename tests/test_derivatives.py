import pytest
import torch
import torch.nn.functional as F
from torch import nn

from icbs_opt.derivatives import (
    block_derivatives,
    exact_block_hessian,
    input_column_norms,
    layer_gradients,
    per_sample_block_gradients,
    record_layers,
    split_batch,
)
from icbs_opt.errors import PruningError
from icbs_opt.pruning import Pruner
from tests.tiny import ce_loss, tiny_llama


def seq_loss(model, X, y):  # token-mean cross-entropy over (B, T)
    logits = model(X)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def brute_per_sample(model, loss_fn, X, y, module, idx):
    rows = []
    for s in range(len(X)):
        (g,) = torch.autograd.grad(
            loss_fn(model, X[s : s + 1], y[s : s + 1]), module.weight
        )
        rows.append(g.reshape(-1)[idx])
    return torch.stack(rows).double()


def mlp():
    torch.manual_seed(0)
    # in-place ReLU: the hook must see the gradient of the Linear output itself
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 3))


def convnet():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding="same", padding_mode="reflect", dilation=1),
        nn.ReLU(),
        nn.Conv2d(5, 2, 2, padding="valid"),
        nn.Flatten(),
        nn.Linear(2 * 5 * 5, 3),
    )


IDX = torch.tensor([0, 3, 5, 7, 13, 17, 23])


@pytest.mark.parametrize("layer", [0, 2])
@pytest.mark.parametrize("max_batch_size", [None, 3])
def test_per_sample_linear_matches_brute_force(layer, max_batch_size):
    model = mlp()
    X, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    mod = model[layer]
    G = per_sample_block_gradients(
        model, ce_loss, X, y, mod, IDX, max_batch_size=max_batch_size
    )
    assert G.shape == (10, len(IDX)) and G.dtype == torch.float64
    torch.testing.assert_close(G, brute_per_sample(model, ce_loss, X, y, mod, IDX))
    (full,) = layer_gradients(model, ce_loss, X, y, [mod])
    torch.testing.assert_close(G.mean(0), full.reshape(-1)[IDX].double())


def test_per_sample_sequence_inputs():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    X, y = torch.randn(5, 7, 6), torch.randint(0, 4, (5, 7))
    G = per_sample_block_gradients(
        model, seq_loss, X, y, model[0], IDX, max_batch_size=2
    )
    torch.testing.assert_close(
        G, brute_per_sample(model, seq_loss, X, y, model[0], IDX)
    )


@pytest.mark.parametrize("layer", [0, 2, 4])
def test_per_sample_conv_matches_brute_force(layer):
    model = convnet()
    X, y = torch.randn(6, 3, 12, 12), torch.randint(0, 3, (6,))
    mod = model[layer]
    G = per_sample_block_gradients(model, ce_loss, X, y, mod, IDX)
    brute = brute_per_sample(model, ce_loss, X, y, mod, IDX)
    torch.testing.assert_close(G, brute)
    # a tape's per-sample gradients of the whole layer (smaller than its patches)
    (tape,), _ = record_layers(model, ce_loss, X, y, [mod], max_batch_size=4)
    (grad,) = layer_gradients(model, ce_loss, X, y, [mod])
    torch.testing.assert_close(tape.gradient(), grad)
    assert tape.xs == []
    torch.testing.assert_close(tape.per_sample_block_gradients(IDX), brute)


def test_per_sample_shared_module_sums_calls():
    torch.manual_seed(2)
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.Tanh(), lin, nn.Linear(4, 2))
    X, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
    idx = torch.tensor([0, 5, 10, 15])
    G = per_sample_block_gradients(model, ce_loss, X, y, lin, idx)
    torch.testing.assert_close(G, brute_per_sample(model, ce_loss, X, y, lin, idx))


def test_frozen_weights_get_gradients_and_stay_frozen():
    model = mlp()
    for p in model.parameters():
        p.requires_grad_(False)
    X, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    G = per_sample_block_gradients(model, ce_loss, X, y, model[2], IDX)
    assert G.abs().sum() > 0
    assert not any(p.requires_grad for p in model.parameters())
    assert model[2].weight.grad is None


def full_hessian(model, loss_fn, X, y, module):
    w = module.weight

    def f(flat):
        saved = module.weight
        del module.weight
        module.weight = flat.reshape(w.shape)
        try:
            return loss_fn(model, X, y)
        finally:
            module.weight = saved

    return torch.autograd.functional.hessian(f, w.detach().reshape(-1).clone())


@pytest.mark.parametrize("chunk", [None, 1, 3])
def test_exact_hessian_matches_autograd(chunk):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    X, y = torch.randn(9, 4), torch.randint(0, 3, (9,))
    idx = torch.tensor([1, 2, 8, 11, 19])
    g, H = exact_block_hessian(
        model, ce_loss, X, y, model[0], idx, chunk_size=chunk, max_batch_size=4
    )
    ref = full_hessian(model, ce_loss, X, y, model[0])[idx][:, idx].double()
    torch.testing.assert_close(H, ref, rtol=1e-5, atol=1e-7)
    (full,) = layer_gradients(model, ce_loss, X, y, [model[0]])
    torch.testing.assert_close(g, full.reshape(-1)[idx].double())


def test_exact_hessian_of_linear_loss_is_zero():
    model = nn.Linear(3, 1, bias=False)
    X = torch.randn(4, 3)
    g, H = exact_block_hessian(model, lambda m, X, y: m(X).mean(), X, X, model, [0, 1])
    assert H.abs().max() == 0
    torch.testing.assert_close(g, X.mean(0)[:2].double())


@pytest.mark.parametrize(
    "hessian", ["gradient_per_sample", "gradient_mean", "exact", "exact_piecewise"]
)
def test_block_derivatives_models(hessian):
    model = mlp()
    X, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    g, H, t_g, t_h = block_derivatives(
        model, ce_loss, X, y, model[0], IDX, hessian, chunk_size=2
    )
    assert g.shape == (len(IDX),) and H.shape == (len(IDX), len(IDX))
    assert g.dtype == H.dtype == torch.float64
    assert t_g >= 0 and t_h >= 0
    torch.testing.assert_close(H, H.T)
    (full,) = layer_gradients(model, ce_loss, X, y, [model[0]])
    torch.testing.assert_close(g, full.reshape(-1)[IDX].double())
    if hessian == "gradient_per_sample":
        G = brute_per_sample(model, ce_loss, X, y, model[0], IDX)
        torch.testing.assert_close(H, G.T @ G / len(X))
    if hessian == "gradient_mean":
        torch.testing.assert_close(H, torch.outer(g, g) / len(X))


def test_block_derivatives_bad_model_name():
    model = mlp()
    with pytest.raises(PruningError, match="'fisher'"):
        block_derivatives(
            model,
            ce_loss,
            torch.randn(2, 6),
            torch.zeros(2).long(),
            model[0],
            IDX,
            "fisher",
        )


def test_non_scalar_loss_raises():
    model = mlp()
    with pytest.raises(PruningError, match="scalar"):
        per_sample_block_gradients(
            model, lambda m, X, y: m(X), torch.randn(2, 6), None, model[0], IDX
        )


def test_unsupported_module_raises():
    model = nn.Sequential(nn.Embedding(5, 3))
    with pytest.raises(PruningError, match="Embedding"):
        per_sample_block_gradients(
            model, ce_loss, torch.zeros(2).long(), None, model[0], [0]
        )


def test_input_column_norms():
    model = convnet()
    X, y = torch.randn(5, 3, 12, 12), torch.randint(0, 3, (5,))
    norms = input_column_norms(
        model, ce_loss, X, y, [model[0], model[6]], max_batch_size=2
    )
    torch.testing.assert_close(norms[0], X.double().pow(2).sum((0, 2, 3)).sqrt())
    assert norms[1].shape == (50,)
    with pytest.raises(PruningError, match="never called"):
        input_column_norms(model, ce_loss, X, y, [nn.Linear(2, 2)])


def test_split_batch():
    X = torch.arange(7)
    parts = split_batch(X, X, 3)
    assert [len(a) for a, _ in parts] == [3, 3, 1]
    assert split_batch(X, X, None)[0][0] is X
    with pytest.raises(PruningError, match="empty"):
        split_batch(X[:0], X[:0], 2)


# ------------------------------------------------------------ on a causal LM
def llama(vocab=32):
    """A tiny Llama and the causal-LM task module (skips without transformers)."""
    pytest.importorskip("transformers")
    from icbs_opt.tasks import causal_lm

    return tiny_llama(vocab=vocab), causal_lm


@pytest.mark.parametrize(
    "layer", ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
)
def test_hook_per_sample_block_gradients_equal_autograd(layer):
    model, llm = llama()
    module = dict(model.named_modules())[layer]
    X = torch.randint(0, 32, (5, 12), generator=torch.Generator().manual_seed(3))
    idx = torch.randperm(module.weight.numel(), generator=torch.Generator())[:20]
    G = per_sample_block_gradients(
        model, llm.causal_lm_loss, X, X, module, idx, max_batch_size=2
    )
    assert G.shape == (5, 20)
    module.weight.requires_grad_(True)
    try:
        for s in range(5):
            loss = llm.causal_lm_loss(model, X[s : s + 1], X[s : s + 1])
            (grad,) = torch.autograd.grad(loss, module.weight)
            expect = grad.reshape(-1)[idx].double()
            torch.testing.assert_close(G[s], expect, atol=1e-5, rtol=0)
    finally:
        module.weight.requires_grad_(False)
    assert not any(p.requires_grad for p in model.parameters())


def test_layer_tape_matches_autograd_and_runs_once():
    model, llm = llama()
    layer = "model.layers.1.mlp.up_proj"
    module = dict(model.named_modules())[layer]
    X = torch.randint(0, 32, (5, 12), generator=torch.Generator().manual_seed(4))
    calls = []

    def loss_fn(m, Xb, yb):
        calls.append(len(Xb))
        return llm.causal_lm_loss(m, Xb, yb)

    (tape,), _ = record_layers(model, loss_fn, X, X, [module], max_batch_size=2)
    assert calls == [2, 2, 1]
    idx = torch.arange(0, module.weight.numel(), 7)
    G = per_sample_block_gradients(model, llm.causal_lm_loss, X, X, module, idx)
    torch.testing.assert_close(
        tape.per_sample_block_gradients(idx), G, atol=1e-6, rtol=0
    )
    (grad,) = layer_gradients(model, llm.causal_lm_loss, X, X, [module])
    torch.testing.assert_close(tape.gradient(), grad, atol=1e-6, rtol=0)
    # a gradient-selection, per-sample-Fisher step runs the model once per sub-batch
    pruner = Pruner(
        model,
        loss_fn,
        0.5,
        backend="exhaustive",
        layers=[layer],
        block_size=8,
        selection="gradient",
        hessian="gradient_per_sample",
        max_batch_size=2,
    )
    calls.clear()
    record = pruner.step(X, X)
    assert calls == [2, 2, 1]
    assert record.seconds.forward_backward > 0


@pytest.mark.parametrize(("tokens", "replaced"), [(12, True), (1, False)])
def test_tape_keeps_per_sample_gradients_only_where_smaller(tokens, replaced):
    # long sequences: the layer's per-sample gradients replace the rows once the
    # gradient forms them; one token per sample: the rows are smaller and stay
    model, llm = llama()
    module = model.get_submodule("model.layers.1.mlp.up_proj")  # 16 -> 32
    X = torch.randint(
        0, 32, (5, tokens + 1), generator=torch.Generator().manual_seed(6)
    )
    (tape,), _ = record_layers(model, llm.causal_lm_loss, X, X, [module])
    idx = torch.randperm(module.weight.numel(), generator=torch.Generator())[:40]
    rows_bytes, before = tape.nbytes(), tape.per_sample_block_gradients(idx)
    (grad,) = layer_gradients(model, llm.causal_lm_loss, X, X, [module])
    torch.testing.assert_close(tape.gradient(), grad, atol=1e-6, rtol=0)
    assert (tape.xs == []) is replaced
    assert tape.nbytes() <= rows_bytes
    torch.testing.assert_close(
        tape.per_sample_block_gradients(idx), before, atol=1e-6, rtol=1e-6
    )
    torch.testing.assert_close(tape.gradient(), grad, atol=1e-6, rtol=0)  # again


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_recording_every_layer_equals_recording_each_alone(dtype):
    # q/k/v and gate/up share their input; every tape must see its own layer's
    model, llm = llama(vocab=14)
    modules = [model.get_submodule(n) for n in llm.prunable_layers(model)]
    X = torch.randint(0, 14, (3, 16), generator=torch.Generator().manual_seed(2))
    loss = llm.causal_lm_loss
    tapes, _ = record_layers(model, loss, X, X, modules, max_batch_size=1, dtype=dtype)
    for module, tape in zip(modules, tapes, strict=True):
        (alone,), _ = record_layers(
            model, loss, X, X, [module], max_batch_size=1, dtype=dtype
        )
        idx = torch.arange(module.weight.numel())
        assert torch.equal(
            tape.per_sample_block_gradients(idx), alone.per_sample_block_gradients(idx)
        )


@pytest.mark.parametrize("hessian", ["gradient_per_sample", "gradient_mean"])
def test_block_derivatives_factor_gives_the_same_hessian(hessian):
    model = mlp()
    X, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    args = (model, ce_loss, X, y, model[0], IDX, hessian)
    g, H, _, _ = block_derivatives(*args)
    g_f, F, _, _ = block_derivatives(*args, factor=True)
    torch.testing.assert_close(g_f, g)
    torch.testing.assert_close(F.T @ F, H)


def test_block_derivatives_exact_models_have_no_factor():
    model = mlp()
    X, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    with pytest.raises(PruningError, match="'exact' has no low-rank factor"):
        block_derivatives(model, ce_loss, X, y, model[0], IDX, "exact", factor=True)
