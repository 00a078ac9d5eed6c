"""Pruning state of the layers: which modules, their masks, frozen and tabu sets.

Notation for one layer (flat over ``weight.reshape(-1)``): ``w0`` the original
dense weights, ``pruned`` the mask (``True`` = pruned), current weights
``w = w0 * ~pruned``. :meth:`LayerState.write` keeps the module's weight equal to
that at all times.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from icbs_opt.derivatives import PRUNABLE_TYPES, check_prunable, weight_matrix_shape
from icbs_opt.errors import PruningError
from icbs_opt.settings import PruneConfig

logger = logging.getLogger(__name__)


@dataclass
class LayerState:
    """Pruning state of one layer (all flat, on the weight's device).

    Attributes:
        name: Qualified module name.
        module: The Linear or Conv2d module.
        w0: ``(numel,)`` original dense weights.
        pruned: ``(numel,)`` bool, True = pruned.
        frozen: ``(numel,)`` bool, weights no step may move.
        static_scores: ``(numel,)`` scores for ``wanda`` selection, else None.
        tabu: FIFO of the index tensors of recent blocks, oldest first, holding
            at most ``tabu_cap`` indices (the oldest block is cut to fit).
        tabu_cap: Capacity of the FIFO in indices (0: no tabu list).
        keep_values: ``(numel,)`` the value of each weight when kept (DESIGN
            section 1, "Restore values"): ``w0`` by default; a kept weight's
            SparseGPT or refit value, and for a pruned weight the value it had
            when last kept after such an update, else ``w0``. Replaced, never
            changed in place (it starts as ``w0`` itself).
    """

    name: str
    module: nn.Module
    w0: torch.Tensor
    pruned: torch.Tensor
    frozen: torch.Tensor
    static_scores: torch.Tensor | None = None
    tabu: collections.deque = field(default_factory=collections.deque)
    tabu_cap: int = 0
    keep_values: torch.Tensor = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.keep_values is None:
            self.keep_values = self.w0

    @classmethod
    def of(cls, name: str, module: nn.Module) -> LayerState:
        """The dense state of ``module`` (nothing pruned, nothing frozen)."""
        with torch.no_grad():
            if not module.weight.is_contiguous():
                module.weight.data = module.weight.data.contiguous()
            w0 = module.weight.detach().reshape(-1).clone()
        false = torch.zeros_like(w0, dtype=torch.bool)
        return cls(name, module, w0, false.clone(), false.clone())

    @property
    def numel(self) -> int:
        """Number of weights."""
        return self.w0.numel()

    def write(self, idx: torch.Tensor) -> None:
        """Set weights ``idx`` of the module: 0 if pruned, else ``keep_values``."""
        with torch.no_grad():
            flat = self.module.weight.view(-1)
            r = self.keep_values[idx]
            flat[idx] = torch.where(self.pruned[idx], torch.zeros_like(r), r)

    def setup_tabu(self, tabu_frac: float, block_size: int) -> None:
        """An empty tabu FIFO of ``tabu_frac`` of the free weights (or none)."""
        free = int((~self.frozen).sum())
        cap = int(tabu_frac * free)
        if cap and free - cap < block_size:
            logger.warning(
                "layer %s has %d free weights: too few for a tabu list of %d and "
                "blocks of %d; tabu switched off for it",
                self.name,
                free,
                cap,
                block_size,
            )
            cap = 0
        self.tabu_cap = cap
        self.tabu = collections.deque()

    def push_tabu(self, idx: torch.Tensor) -> None:
        """Append a block's indices to the FIFO, expiring the oldest."""
        if not self.tabu_cap:
            return
        self.tabu.append(idx.to(torch.int32))
        excess = sum(t.numel() for t in self.tabu) - self.tabu_cap
        while excess > 0:
            oldest = self.tabu.popleft()
            if oldest.numel() > excess:  # keep the oldest block's newer part
                self.tabu.appendleft(oldest[excess:])
            excess -= oldest.numel()

    def tabu_mask(self) -> torch.Tensor:
        """``(numel,)`` bool: the weights in the FIFO."""
        mask = torch.zeros_like(self.pruned)
        if self.tabu:
            mask[torch.cat(list(self.tabu)).long()] = True
        return mask


def resolve_layers(
    model: nn.Module, layers: Sequence[str] | None
) -> list[tuple[str, nn.Module]]:
    """The modules to prune: ``layers`` by name, or every Linear/ungrouped Conv2d.

    A weight shared by several modules is listed once.

    Raises:
        PruningError: For an unknown or unsupported layer, or none at all.
    """
    modules = dict(model.named_modules())
    prunable = [
        name
        for name, m in modules.items()
        if isinstance(m, PRUNABLE_TYPES)
        and not (isinstance(m, nn.Conv2d) and m.groups != 1)
    ]
    if layers is None:
        chosen = [(name, modules[name]) for name in prunable]
    elif isinstance(layers, str):
        raise PruningError(
            f"layers must be a list of module names, got the string {layers!r}"
        )
    else:
        chosen = []
        for name in layers:
            if name not in modules:
                more = " ..." if len(prunable) > 20 else ""
                raise PruningError(
                    f"unknown layer {name!r}; prunable layers are: "
                    f"{', '.join(prunable[:20])}{more}"
                )
            check_prunable(modules[name], name)
            chosen.append((name, modules[name]))
    seen: dict[int, str] = {}
    unique = []
    for name, m in chosen:
        if id(m.weight) in seen:
            logger.info("layer %s shares its weight with %s", name, seen[id(m.weight)])
            continue
        seen[id(m.weight)] = name
        unique.append((name, m))
    if not unique:
        raise PruningError("the model has no Linear or Conv2d layer to prune")
    return unique


def keep_top(
    scores: torch.Tensor, shape: torch.Size, density: float, grouping: str
) -> torch.Tensor:
    """Keep mask: the highest ``round(density * numel)`` scores, ranked per group.

    ``grouping`` is ``layer``, ``output`` (per row) or ``input`` (per column).
    """
    numel = scores.numel()
    kept = round(density * numel)
    if grouping == "layer":
        keep = torch.zeros(numel, dtype=torch.bool, device=scores.device)
        keep[torch.argsort(scores, descending=True, stable=True)[:kept]] = True
        return keep
    S = scores.reshape(shape[0], -1)  # (d_out, d_in)
    if grouping == "input":
        S = S.T
    groups = S.shape[0]
    counts = torch.full((groups,), kept // groups, device=S.device)
    counts[: kept % groups] += 1  # the layer keeps exactly round(density * numel)
    keep = _keep_rows(S, counts)
    return (keep.T if grouping == "input" else keep).reshape(-1)


def keep_top_nm(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep mask of pattern N:M: the top ``n`` scores of every ``m`` in a row.

    The flat weights ``(d_out * d_in,)`` with ``d_in`` a multiple of ``m`` fall
    into consecutive groups of ``m`` that never cross a row.
    """
    S = scores.reshape(-1, m)  # (groups, M)
    return _keep_rows(S, torch.full((S.shape[0],), n, device=S.device)).reshape(-1)


def _keep_rows(S: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``(rows, size)`` bool: the ``counts[r]`` highest scores of each row r.

    Among equal scores the earlier weight is kept.
    """
    rows, size = S.shape
    order = torch.argsort(S, dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(size, device=S.device).expand(rows, size))
    return ranks < counts[:, None]


def check_groups(name: str, module: nn.Module, pattern: str, m: int) -> None:
    """Refuse a layer whose rows do not split into groups of ``m``.

    Raises:
        PruningError: Naming the layer, its input size and the pattern.
    """
    d_in = weight_matrix_shape(module)[1]
    if d_in % m:
        raise PruningError(
            f"layer {name!r} has {d_in} inputs per output row, not a multiple of "
            f"M = {m} (pattern {pattern!r}); leave it out: give the layers to "
            "prune (layers=[...], --layers)"
        )


def nm_violations(weight: torch.Tensor, n: int, m: int) -> int | None:
    """Groups of ``m`` consecutive weights of a row with more than ``n`` non-zeros.

    None when the rows (Conv2d: flattened inputs) do not split into groups of
    ``m``. A weight that is 0 by itself counts as pruned, as on hardware.
    """
    d_out = weight.shape[0]
    if (weight.numel() // d_out) % m:
        return None
    nonzero = (weight.detach().reshape(-1, m) != 0).sum(1)  # (groups,)
    return int((nonzero > n).sum())


def top(
    cand: torch.Tensor,
    scores: torch.Tensor,
    tabu: torch.Tensor | None,
    count: int,
    *,
    largest: bool,
) -> torch.Tensor:
    """The ``count`` candidates with the largest (or smallest) scores.

    Candidates in ``tabu`` (a bool mask over all weights) come last; among equal
    scores the earlier candidate wins (the set a stable sort would give).
    """
    if tabu is None:
        return _top_set(cand, scores[cand], count, largest)
    is_tabu = tabu[cand]
    free = _top_set(cand[~is_tabu], scores[cand[~is_tabu]], count, largest)
    rest = count - free.numel()
    taken = _top_set(cand[is_tabu], scores[cand[is_tabu]], rest, largest)
    return torch.cat([free, taken])


def _top_set(
    cand: torch.Tensor, s: torch.Tensor, count: int, largest: bool
) -> torch.Tensor:
    """``count`` of ``cand`` by score ``s``, ties to the earlier (unordered)."""
    if count <= 0:
        return cand[:0]
    if count >= cand.numel():
        return cand
    kth = torch.topk(s, count, largest=largest, sorted=False).values
    kth = kth.max() if not largest else kth.min()  # the count-th best score
    better = s > kth if largest else s < kth
    ties = torch.nonzero(s == kth).squeeze(1)[: count - int(better.sum())]
    return torch.cat([cand[better], cand[ties]])


def freeze(
    scores: torch.Tensor, keep: torch.Tensor, frac_prune: float, frac_keep: float
) -> torch.Tensor:
    """Frozen mask: the lowest-scoring pruned and highest-scoring kept fractions."""
    frozen = torch.zeros_like(keep)
    pruned_idx = torch.nonzero(~keep).squeeze(1)
    kept_idx = torch.nonzero(keep).squeeze(1)
    n_prune = round(frac_prune * pruned_idx.numel())
    n_keep = round(frac_keep * kept_idx.numel())
    frozen[top(pruned_idx, scores, None, n_prune, largest=False)] = True
    frozen[top(kept_idx, scores, None, n_keep, largest=True)] = True
    return frozen


def load_layers(
    layers: dict[str, LayerState], saved: Mapping[str, Any], config: PruneConfig
) -> None:
    """Set masks, tabu FIFOs and kept values from a checkpoint, all checked first.

    Raises:
        PruningError: If the layers differ, or a saved mask moves a frozen weight
            or breaks the N:M pattern (a checkpoint of another model or config).
    """
    if sorted(saved) != sorted(layers):
        raise PruningError(
            f"the checkpoint prunes layers {sorted(saved)}, this pruner "
            f"{sorted(layers)}"
        )
    nm = config.nm
    for name, L in layers.items():  # check all before changing any
        pruned = saved[name]["pruned"].to(L.pruned.device)
        if not torch.equal(pruned[L.frozen], L.pruned[L.frozen]):
            raise PruningError(
                f"the checkpoint's mask of layer {name!r} moves frozen weights"
            )
        if nm is not None and torch.any((~pruned).reshape(-1, nm[1]).sum(1) != nm[0]):
            raise PruningError(
                f"the checkpoint's mask of layer {name!r} is not "
                f"{config.pattern} in every group"
            )
    for name, L in layers.items():
        L.pruned = saved[name]["pruned"].to(L.pruned.device).clone()
        if "keep_values" in saved[name]:
            L.keep_values = saved[name]["keep_values"].to(L.w0).clone()
        L.tabu = collections.deque(t.to(L.w0.device) for t in saved[name]["tabu"])
        L.write(torch.arange(L.numel, device=L.w0.device))
