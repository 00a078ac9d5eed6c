"""The refit on decoder blocks against a direct least-squares computation, and the
recording engine every layer-input capture goes through (issue 20)."""

import copy

import pytest
import torch
from torch import nn

from icbs_opt.pruning.refit import refit
from icbs_opt.pruning.sequential import sequential_update
from icbs_opt.recording import StopForward, decoder_blocks, recording

transformers = pytest.importorskip("transformers")
from icbs_opt.tasks import causal_lm as llm  # noqa: E402

DAMPENING = 0.01


def two_block_llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.2,  # large enough for pruning errors to matter
    )
    return llm._prepare(transformers.LlamaForCausalLM(config))


def inputs_of(model: nn.Module, name: str, X: torch.Tensor) -> torch.Tensor:
    """``(rows, d_in)`` float64 inputs of one layer over the batch."""
    got = []
    layer = model.get_submodule(name)
    hook = layer.register_forward_hook(lambda m, i, o: got.append(i[0].detach()))
    with torch.no_grad():
        llm.causal_lm_loss(model, X, X)
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
    names = llm.prunable_layers(dense)
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
    loss = llm.causal_lm_loss
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
def test_recording_sees_every_call_with_its_arguments_and_output():
    lin = nn.Linear(3, 2)
    net = nn.Sequential(lin, nn.ReLU(), lin)  # the same layer called twice
    seen = []

    def note(mod, args, kwargs, out):
        shapes = [tuple(a.shape) for a in args]
        seen.append((mod, shapes, {k: tuple(v.shape) for k, v in kwargs.items()}))
        want = (args or [kwargs.get("input")])[0] @ mod.weight.T + mod.bias
        torch.testing.assert_close(out, want)

    x = torch.randn(4, 3)
    with recording([lin], note):
        lin(x)
        lin(input=x)  # keyword arguments reach the callback
    assert seen == [(lin, [(4, 3)], {}), (lin, [], {"input": (4, 3)})]
    seen.clear()
    with pytest.raises(RuntimeError), recording([lin], note):
        net(x)  # 2 outputs do not feed a 3-input layer: the second call fails
    assert len(seen) == 1
    lin(x)
    assert len(seen) == 1  # the hooks are gone after the block, error or not


def test_recording_replaces_the_output_with_what_the_callback_returns():
    lin = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    with recording([lin], lambda m, a, k, out: out * 0 + 7):
        got = lin(x)
    assert torch.equal(got, torch.full((4, 2), 7.0))
    assert not torch.equal(lin(x), got)


def test_recording_before_a_call_and_stopping_the_forward():
    first, second = nn.Linear(3, 3), nn.Linear(3, 3)
    net = nn.Sequential(first, second)
    calls = []

    def stop(mod, args, kwargs, out):
        calls.append((mod, out))
        raise StopForward

    with recording([second], stop, before=True):
        net(torch.randn(2, 3))
        calls.append("not reached")
    assert calls == [(second, None)]  # before the call, nothing after it
    net(torch.randn(2, 3))
    assert len(calls) == 1


def test_decoder_blocks_of_a_hugging_face_model_and_of_a_plain_one():
    model = two_block_llama()
    name, blocks = decoder_blocks(model)
    assert name == "model.layers" and blocks is model.model.layers
    q = model.model.layers[1].self_attn.q_proj
    assert decoder_blocks(model, [q])[1] is blocks
    assert decoder_blocks(model, [model.lm_head]) is None  # not inside them
    inner = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
    outer = nn.ModuleList([nn.Sequential(inner), nn.Linear(2, 2)])
    net = nn.Sequential(outer, nn.ModuleList([nn.ReLU()]))
    assert decoder_blocks(net) == ("0", outer)  # the outermost, of two or more
    assert decoder_blocks(net, [inner[1]]) == ("0", outer)
    assert decoder_blocks(nn.Sequential(nn.Linear(2, 2))) is None


def test_a_dense_replay_stops_each_stage_after_its_layers():
    """Stages: (q, k, v), o, (gate, up), down; each stage's current and dense runs
    stop after its last layer, but the last stage's, which feed the next block."""
    model = two_block_llama()
    mods = [model.get_submodule(n) for n in llm.prunable_layers(model)]
    dense = {m: m.weight.detach().clone() for m in mods}
    block = model.model.layers[0]
    counted = {"q": block.self_attn.q_proj, "down": block.mlp.down_proj}
    calls = dict.fromkeys(counted, 0)
    hooks = [
        m.register_forward_hook(lambda *_, k=k: calls.__setitem__(k, calls[k] + 1))
        for k, m in counted.items()
    ]
    updated = []
    X = torch.randint(0, 64, (4, 6))
    loss = llm.causal_lm_loss
    sequential_update(
        model, loss, X, X, mods, lambda m, g: updated.append(m), dense=dense
    )
    for h in hooks:
        h.remove()
    assert updated == mods
    # the probe 1; each of 4 stages 2 (current, dense); the next block's input 1
    assert calls == {"q": 1 + 4 * 2 + 1, "down": 1 + 2 + 1}
