"""Packed scoring: each continuation's log-likelihood as if it ran alone."""

import pytest
import torch

pytest.importorskip("transformers")

from icbs_opt.zeroshot import packed  # noqa: E402
from tests.tiny import tiny_llama  # noqa: E402


def requests(seed=0, vocab=32):
    """Shared contexts with 1-6 token continuations, one-token ones, a long one."""
    g = torch.Generator().manual_seed(seed)

    def tokens(n):
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    out = []
    for q in range(7):
        context = tokens(1 + 3 * q)  # 1 to 19 tokens
        for _ in range(1 + q % 4):
            out.append((("ctx", q), context, tokens(1 + (q * 5) % 6)))
    out.append((None, tokens(40), tokens(3)))  # longer than max_length: cut
    out.insert(3, (None, out[0][1], tokens(1)))  # a context met again later
    return out


def alone(model, reqs, max_length):
    """lm-eval's computation: one row per pair, cut from the left, float64."""
    answers = []
    for _, context, cont in reqs:
        ids = (context + cont)[-(max_length + 1) :][:-1]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
        rows = logits[-len(cont) :]
        target = torch.tensor(cont)
        logp = rows.log_softmax(-1)[torch.arange(len(cont)), target]
        answers.append((float(logp.sum()), bool((rows.argmax(-1) == target).all())))
    return answers


def greedy(model, context, n):
    """The model's own n-token continuation of ``context``."""
    ids = list(context)
    for _ in range(n):
        with torch.no_grad():
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(context) :]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("budget", [1, 24, 4096])
def test_each_continuation_scores_as_if_alone(attention, budget):
    model = tiny_llama(seed=1)
    model.config._attn_implementation = attention
    assert packed.packable(model)
    reqs = requests()
    reqs.append((None, reqs[5][1], greedy(model, reqs[5][1], 3)))
    got = packed.score(model, reqs, max_length=16, token_budget=budget)
    want = alone(model, reqs, 16)
    assert [g for _, g in got] == [w for _, w in want]
    assert [s for s, _ in got] == pytest.approx([s for s, _ in want], abs=1e-4)
    assert got[-1][1] and not all(g for _, g in got)  # greedy both ways


def test_rows_share_contexts_and_fit_the_model():
    reqs = requests()
    rows = packed.pack(reqs, max_length=16)
    assert sorted(i for row in rows for i in row.members) == list(range(len(reqs)))
    assert all(row.length <= 16 for row in rows)
    assert [row.length for row in rows] == sorted((r.length for r in rows), reverse=1)
    first = [row for row in rows if 0 in row.members][0]
    assert 3 in first.members  # the repeated context shares a row
    # a context of 16 tokens and two continuations of 2 do not fit 16: cut, split
    q5 = [row for row in rows if any(reqs[i][0] == ("ctx", 5) for i in row.members)]
    assert len(q5) == 2 and all(len(row.context) == 15 for row in q5)
    assert len(packed.pack(reqs, max_length=64)) < len(rows)


def test_bad_requests_are_named():
    with pytest.raises(ValueError, match="request 1: context of 0 and continuation"):
        packed.pack([(None, [1], [2]), (None, [], [2])], max_length=8)
    with pytest.raises(ValueError, match="continuation of 9 tokens"):
        packed.pack([(None, [1], list(range(9)))], max_length=8)


def test_bfloat16_autocast_stays_close_and_leaves_the_weights():
    model = tiny_llama(seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reqs = requests(seed=1)
    exact = packed.score(model, reqs, max_length=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = packed.score(model, reqs, max_length=16)
    assert [s for s, _ in half] == pytest.approx([s for s, _ in exact], rel=0.05)
    assert [s for s, _ in half] != [s for s, _ in exact]  # it did run in bf16
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(v.dtype == torch.float32 for v in after.values())


def test_models_it_cannot_pack():
    model = tiny_llama()
    model.config.final_logit_softcapping = 30.0
    assert not packed.packable(model)
    model = tiny_llama()
    model.config._attn_implementation = "flex_attention"
    assert not packed.packable(model)
    assert not packed.packable(torch.nn.Linear(2, 2))
