"""The recording engine that every capture of layer inputs goes through."""

import pytest
import torch
from torch import nn

from icbs_opt.pruning.sequential import sequential_update
from icbs_opt.recording import StopForward, decoder_blocks, recording
from tests.tiny import two_block_llama

transformers = pytest.importorskip("transformers")
from icbs_opt.tasks import causal_lm as llm  # noqa: E402


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
