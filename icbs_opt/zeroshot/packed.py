"""Log-likelihoods of continuations with each context run once.

lm-eval's HF wrapper runs every (context, continuation) pair as its own row, so a
HellaSwag question's context goes through the model four times. Here the
continuations that share a context are packed behind one copy of it::

    row        c0 c1 c2 | a0 a1 | b0 b1 b2      (continuations a0..a2, b0..b3)
    positions   0  1  2 |  3  4 |  3  4  5
    a0 is scored from c2; a1, a2 from a0, a1; b0 from c2; b1..b3 from b0..b2

and a 4D attention mask lets each continuation see the context and its own earlier
tokens only. With the positions restarting after the context, every continuation
token gets the same inputs as in a row of its own; the output logits are computed
only where a continuation token is scored. Pairs too long for the model are cut
from the left as lm-eval cuts them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

#: Padded tokens per forward pass (rows x the longest row).
DEFAULT_TOKEN_BUDGET = 2048
#: Attention implementations whose masks this module builds (others: lm-eval's own).
MASKS = ("sdpa", "eager")

Request = tuple[Any, Sequence[int], Sequence[int]]


@dataclass
class _Row:
    """One context and the continuations packed behind it."""

    context: list[int]
    members: list[int]  # request indices
    conts: list[list[int]]

    @property
    def length(self) -> int:
        return len(self.context) + sum(len(c) - 1 for c in self.conts)


def packable(model: nn.Module) -> bool:
    """Whether :func:`score` can run ``model`` (a decoder, a head, a known mask)."""
    config = getattr(model, "config", None)
    return (
        callable(getattr(model, "get_decoder", None))
        and callable(getattr(model, "get_output_embeddings", None))
        and model.get_output_embeddings() is not None
        and getattr(config, "_attn_implementation", None) in MASKS
        and not getattr(config, "final_logit_softcapping", None)
        and getattr(config, "logit_scale", None) is None
        and not getattr(config, "is_encoder_decoder", False)
    )


def pack(requests: Sequence[Request], max_length: int) -> list[_Row]:
    """Rows of at most ``max_length`` tokens, one context each, longest first.

    Raises:
        ValueError: For an empty context or continuation, or a continuation longer
            than ``max_length``.
    """
    rows: dict[tuple[int, ...], list[_Row]] = {}
    for index, (_, context, cont) in enumerate(requests):
        context, cont = list(context), list(cont)
        if not context or not cont or len(cont) > max_length:
            raise ValueError(
                f"request {index}: context of {len(context)} and continuation of "
                f"{len(cont)} tokens (both must be 1 to max_length={max_length})"
            )
        context = context[max(0, len(context) + len(cont) - 1 - max_length) :]
        same = rows.setdefault(tuple(context), [])
        if not same or same[-1].length + len(cont) - 1 > max_length:
            same.append(_Row(context, [], []))
        same[-1].members.append(index)
        same[-1].conts.append(cont)
    return sorted((r for rs in rows.values() for r in rs), key=lambda r: -r.length)


def _batch(
    rows: list[_Row], eager_dtype: torch.dtype | None, device: torch.device
) -> dict[str, torch.Tensor]:
    """Inputs of one forward pass and the outputs it scores.

    ``rows``/``cols`` pick the scored outputs, ``targets`` their tokens and
    ``owner`` (on the CPU) their requests.
    """
    width = rows[0].length
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    segment = torch.full((len(rows), width), -1, dtype=torch.long)
    scored, targets, owner = [], [], []
    for r, row in enumerate(rows):
        n = len(row.context)
        ids[r, :n] = torch.tensor(row.context)
        positions[r, :n] = torch.arange(n)
        segment[r, :n] = 0
        start = n
        for s, (member, cont) in enumerate(zip(row.members, row.conts, strict=True)):
            body = len(cont) - 1
            ids[r, start : start + body] = torch.tensor(cont[:-1], dtype=torch.long)
            positions[r, start : start + body] = torch.arange(n, n + body)
            segment[r, start : start + body] = s + 1
            scored += [(r, n - 1)] + [(r, start + j) for j in range(body)]
            targets += cont
            owner += [member] * len(cont)
            start += body
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = segment[:, :, None] == segment[:, None, :]
    context_key = (segment == 0)[:, None, :]
    padding = torch.eye(width, dtype=torch.bool) & (segment < 0)[:, :, None]
    mask = (causal & (same | context_key) & (segment >= 0)[:, :, None]) | padding
    mask = mask[:, None]
    if eager_dtype is not None:  # eager attention adds its mask to the scores
        blocked = torch.finfo(eager_dtype).min
        mask = torch.zeros(mask.shape, dtype=eager_dtype).masked_fill(~mask, blocked)
    index = torch.tensor(scored, dtype=torch.long)
    return {
        "input_ids": ids.to(device),
        "position_ids": positions.to(device),
        "attention_mask": mask.to(device),
        "rows": index[:, 0].to(device),
        "cols": index[:, 1].to(device),
        "targets": torch.tensor(targets, dtype=torch.long, device=device),
        "owner": torch.tensor(owner, dtype=torch.long),
    }


@torch.inference_mode()
def score(
    model: nn.Module,
    requests: Sequence[Request],
    *,
    max_length: int,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    on_done: Callable[[int], None] | None = None,
) -> list[tuple[float, bool]]:
    """Each request's ``(sum of continuation log-probabilities, greedy)``.

    Args:
        model: A causal LM for which :func:`packable` holds.
        requests: ``(key, context tokens, continuation tokens)`` as lm-eval gives
            them to ``_loglikelihood_tokens``.
        max_length: The longest row the model takes.
        token_budget: Padded tokens per forward pass (at least one row each).
        on_done: Called with the number of requests finished after each pass.

    Returns:
        One pair per request, in the order given: the log-likelihood in float64
        and whether every continuation token is the model's argmax.
    """
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    device = next(model.parameters()).device
    eager = model.config._attn_implementation == "eager"
    mask_dtype = next(model.parameters()).dtype if eager else None
    total = torch.zeros(len(requests), dtype=torch.float64)
    missed = torch.zeros(len(requests), dtype=torch.long)
    rows = pack(requests, max_length)
    start = 0
    while start < len(rows):
        stop = start + max(1, token_budget // rows[start].length)
        chunk = rows[start:stop]
        inputs = _batch(chunk, mask_dtype, device)
        hidden = decoder(
            input_ids=inputs["input_ids"],
            position_ids=inputs["position_ids"],
            attention_mask=inputs["attention_mask"],
            use_cache=False,
        ).last_hidden_state
        logits = head(hidden[inputs["rows"], inputs["cols"]]).float()
        picked = logits.log_softmax(-1).gather(1, inputs["targets"][:, None])[:, 0]
        wrong = (logits.argmax(-1) != inputs["targets"]).long()
        total.index_add_(0, inputs["owner"], picked.double().cpu())
        missed.index_add_(0, inputs["owner"], wrong.cpu())
        if on_done is not None:
            on_done(sum(len(row.members) for row in chunk))
        start = stop
    return [(float(t), not bool(m)) for t, m in zip(total, missed, strict=True)]
