"""Where a step works (DESIGN.md section 1, steps 1-2): the layer, then the block."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from icbs_opt.pruning.state import LayerState, top


class LayerSchedule:
    """Step 1: which layer each step works on.

    ``uniform`` draws a layer at random every step; ``log`` runs epochs in which
    each layer gets ``max(min_steps, round(log10(numel)))`` steps, shuffled.

    Args:
        layers: The layers' states, by name.
        kind: ``uniform`` or ``log``.
        min_steps: Floor of the ``log`` schedule's steps per layer.
        rng: The pruner's random generator.
    """

    def __init__(
        self,
        layers: dict[str, LayerState],
        kind: str,
        min_steps: int,
        rng: np.random.Generator,
    ):
        self.names = list(layers)
        self.counts = {
            name: max(min_steps, round(math.log10(L.numel)))
            for name, L in layers.items()
        }
        self.kind, self.rng = kind, rng
        self.pending: list[str] = []  # the rest of the current log epoch, popped

    def next(self) -> str:
        """The next layer's name."""
        if self.kind == "uniform":
            return self.names[int(self.rng.integers(len(self.names)))]
        if not self.pending:  # a new epoch
            epoch = [name for name in self.names for _ in range(self.counts[name])]
            self.pending = [epoch[i] for i in self.rng.permutation(len(epoch))]
        return self.pending.pop()

    def state_dict(self) -> dict[str, list[str]]:
        """The rest of the current ``log`` epoch (the random state is the rng's)."""
        return {"pending": list(self.pending)}

    def load_state_dict(self, state: dict[str, list[str]]) -> None:
        """Continue from a :meth:`state_dict`."""
        self.pending = list(state["pending"])


def select_block(
    L: LayerState,
    scores: Callable[[], torch.Tensor],
    block_size: int,
    k: int,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """Step 2: flat indices of a block of k pruned and n - k kept free weights.

        Pruned weights with the highest ``scores()`` and kept weights with the lowest
        (the likeliest to be mislabelled) are taken first; tabu weights are passed
        over, and a side with too few other candidates is topped up with its tabu
        weights. A layer with at most ``block_size`` free weights gives all of them
    (and ``scores`` is not called). Weights in ``exclude`` (a bool mask, e.g.
    another block of the same pass) are treated as frozen.

    Returns:
        ``(n,)`` sorted flat indices into the weight.
    """
    free = ~L.frozen if exclude is None else ~(L.frozen | exclude)
    if int(free.sum()) <= block_size:
        return torch.nonzero(free).squeeze(1)
    cand_p = torch.nonzero(free & L.pruned).squeeze(1)
    cand_k = torch.nonzero(free & ~L.pruned).squeeze(1)
    n_p = max(min(k, cand_p.numel()), block_size - cand_k.numel())
    S = scores()  # (numel,)
    tabu = L.tabu_mask()  # (numel,) bool
    pick_p = top(cand_p, S, tabu, n_p, largest=True)  # likeliest wrong
    pick_k = top(cand_k, S, tabu, block_size - n_p, largest=False)
    return torch.sort(torch.cat([pick_p, pick_k])).values


def select_groups(
    L: LayerState,
    scores: Callable[[], torch.Tensor],
    block_size: int,
    m: int,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """Step 2 for pattern N:M: the free weights of whole groups of ``m``.

    A group can move when it has a free pruned and a free kept weight; its
    likeliest mislabelling is the swap of its highest-scoring free pruned weight
    with its lowest-scoring free kept one, so groups are ranked by that margin
    ``max S[pruned] - min S[kept]`` (highest first; tabu groups, those holding a
    tabu weight, last). Groups are taken in that order while their free weights
    fit in ``block_size``: ``block_size / m`` groups when none holds a frozen
    weight. When all movable groups fit, ``scores`` is not called. Weights in
    ``exclude`` (another block of the same pass) are treated as frozen.

    Returns:
        ``(n,)`` sorted flat indices into the weight; every group of the block
        is movable and all of its free weights are in it.
    """
    frozen = L.frozen if exclude is None else L.frozen | exclude
    free = (~frozen).reshape(-1, m)  # (groups, M)
    pruned = L.pruned.reshape(-1, m)
    movable = (free & pruned).any(1) & (free & ~pruned).any(1)  # (groups,)
    cand = torch.nonzero(movable).squeeze(1)
    size = free[cand].sum(1)  # (candidates,) free weights per group
    if int(size.sum()) > block_size:
        S = scores().reshape(-1, m)[cand]  # (candidates, M)
        inf = torch.tensor(float("inf"), dtype=S.dtype, device=S.device)
        hi = torch.where(free[cand] & pruned[cand], S, -inf).amax(1)
        lo = torch.where(free[cand] & ~pruned[cand], S, inf).amin(1)
        tabu = L.tabu_mask().reshape(-1, m)[cand].any(1)
        order = torch.argsort(hi - lo, descending=True, stable=True)
        order = order[torch.argsort(tabu[order].byte(), stable=True)]  # tabu last
        cand = cand[order[torch.cumsum(size[order], 0) <= block_size]]
    chosen = torch.zeros_like(free)  # (groups, M)
    chosen[cand] = free[cand]
    return torch.nonzero(chosen.reshape(-1)).squeeze(1)
