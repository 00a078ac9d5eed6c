"""SparseGPT (Frantar and Alistarh, 2023): one-shot pruning with an OBS update.

DESIGN.md section 1b. For one layer with weight matrix ``W`` ``(d_out, d_in)`` and
calibration inputs ``X`` ``(N, d_in)`` (Conv2d: unfolded patches), the Hessian of
the layer-wise reconstruction error ``||X W0^T - X W^T||^2`` is ``H = 2 X^T X / N``;
its scale cancels everywhere below, so the Gram matrix ``G = X^T X`` is used. With
dampening ``lambda = dampening * mean(diag H)`` and ``U`` the upper Cholesky
factor of ``(H + lambda I)^-1``, the columns are visited left to right in lazy
blocks of ``blocksize``:

- at a block's start, its mask is chosen from the saliency ``w^2 / U_jj^2`` (the
  OBS error of pruning ``w`` given the columns still to come): the block prunes
  its share of the layer's pruned count, lowest saliencies over all the block's
  rows and columns (the paper's Algorithm 1; rows may end up with different
  counts);
- with an N:M pattern, instead, every M columns (at the first column of a
  group, from the weights as updated so far) each row prunes the ``M - N``
  lowest saliencies of the group, as the paper does for semi-structured
  sparsity; the lazy blocks then hold whole groups;
- column ``j``: a pruned weight is set to 0 and its error ``(w - q) / U_jj`` is
  spread over the row's later columns through ``U[j, j:]``; within the block at
  once, and to the columns after the block in one matrix product at its end.

Inputs whose Gram diagonal is 0 (never active) are dead: their columns are
decoupled (``H_jj = 1``), pruned first (saliency 0) and left unchanged if kept.

:func:`sparsegpt` prunes a model's layers in forward order, each on the inputs
of the model as already pruned (:func:`~icbs_opt.pruning.sequential.sequential_update`
says how, and at what cost).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from icbs_opt.derivatives import LossFn, weight_matrix_shape
from icbs_opt.pruning.sequential import LayerGrams, sequential_update

logger = logging.getLogger(__name__)

#: Dampening of the Hessian: this fraction of its mean diagonal is added to it.
DEFAULT_DAMPENING = 0.01
#: Columns per lazy block (also the span over which a mask is chosen).
DEFAULT_BLOCKSIZE = 128


# ---------------------------------------------------------------- one layer
def dampened(G: torch.Tensor, dampening: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``H = G + lambda I`` with dead inputs decoupled, and the dead mask.

    Args:
        G: ``(d_in, d_in)`` Gram matrix of the layer inputs.
        dampening: ``lambda`` as a fraction of the mean diagonal (after setting
            the dead inputs' diagonal to 1).

    Returns:
        ``H`` float64 and ``dead`` ``(d_in,)`` bool.
    """
    H = G.to(torch.float64).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    H.diagonal().add_(dampening * float(torch.diagonal(H).mean()))
    return H, dead


def block_counts(total: int, cols: int, blocksize: int) -> list[int]:
    """``total`` split over the column blocks in proportion to their widths."""
    edges = list(range(0, cols, blocksize)) + [cols]
    cum = [round(total * e / cols) for e in edges]
    return [b - a for a, b in zip(cum[:-1], cum[1:], strict=True)]


def sparsegpt_layer(
    W: torch.Tensor,
    G: torch.Tensor,
    prune_count: int,
    *,
    blocksize: int = DEFAULT_BLOCKSIZE,
    dampening: float = DEFAULT_DAMPENING,
    pattern: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SparseGPT on one weight matrix: mask and OBS-updated weights.

    Args:
        W: ``(d_out, d_in)`` weights (not changed).
        G: ``(d_in, d_in)`` Gram matrix ``X^T X`` of the layer's inputs.
        prune_count: Weights to prune in the layer, exactly (ignored with
            ``pattern``, which prunes ``M - N`` of every group).
        blocksize: Columns per lazy block (with ``pattern``, rounded down to a
            multiple of M, at least M).
        dampening: Fraction of the mean Hessian diagonal added to it.
        pattern: ``(N, M)``: keep N of every M consecutive weights of a row
            (``d_in`` a multiple of M); None: unstructured.

    Returns:
        ``W`` float64 with pruned weights exactly 0 and kept ones updated, the
        keep mask (bool), and the saliency each weight had when its mask was
        chosen (float64; high = kept); all ``(d_out, d_in)``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> X, W = torch.randn(64, 8), torch.randn(3, 8)
        >>> Wn, keep, _ = sparsegpt_layer(W, X.T @ X, 9, blocksize=4)
        >>> int((~keep).sum()), bool((Wn[~keep] == 0).all())
        (9, True)
        >>> _, keep, _ = sparsegpt_layer(W, X.T @ X, 0, pattern=(2, 4))
        >>> keep.reshape(-1, 4).sum(1).tolist()
        [2, 2, 2, 2, 2, 2]
    """
    W = W.to(torch.float64).clone()  # (d_out, d_in)
    H, dead = dampened(G, dampening)
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))  # (d_in, d_in)
    U = torch.linalg.cholesky(Hinv, upper=True)
    keep = torch.ones_like(W, dtype=torch.bool)
    scores = torch.zeros_like(W)
    d_in = W.shape[1]
    if pattern is not None:  # lazy blocks of whole groups
        blocksize = max(pattern[1], blocksize // pattern[1] * pattern[1])
    counts = block_counts(prune_count, d_in, blocksize)
    for b, i1 in enumerate(range(0, d_in, blocksize)):
        i2 = min(i1 + blocksize, d_in)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]  # (d_out, B), (B, B)
        d = torch.diagonal(U1)  # (B,)
        S1, dead1 = scores[:, i1:i2], dead[i1:i2]  # S1 a view: filled in place
        prune1 = torch.zeros_like(W1, dtype=torch.bool)  # (d_out, B)
        if pattern is None:  # the block's share, lowest over its rows and columns
            S1.copy_(_saliency(W1, d, dead1))
            low = torch.argsort(S1.reshape(-1), stable=True)[: counts[b]]
            prune1.view(-1)[low] = True
        E1 = torch.zeros_like(W1)  # (d_out, B) scaled errors of the block
        for j in range(i2 - i1):
            if pattern is not None and j % pattern[1] == 0:  # a group starts
                n, m = pattern
                g = slice(j, j + m)
                S1[:, g] = _saliency(W1[:, g], d[g], dead1[g])  # (d_out, M)
                low = torch.argsort(S1[:, g], dim=1, stable=True)[:, : m - n]
                prune1[:, g] = prune1[:, g].scatter(1, low, True)
            w = W1[:, j]
            q = torch.where(prune1[:, j], torch.zeros_like(w), w)
            err = (w - q) / d[j]  # (d_out,)
            W1[:, j:] -= err[:, None] * U1[j, j:][None, :]
            W1[:, j] = q  # exactly 0 where pruned
            E1[:, j] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= E1 @ U[i1:i2, i2:]  # the lazy update of the later columns
        keep[:, i1:i2] = ~prune1
    return W, keep, scores


def _saliency(W: torch.Tensor, d: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """``(d_out, B)`` OBS error ``w^2 / U_jj^2`` of pruning each weight (dead: 0)."""
    s = W.pow(2) / d.pow(2)
    s[:, dead] = 0.0
    return s


# ---------------------------------------------------------------- the model
def sparsegpt(
    model: nn.Module,
    loss_fn: LossFn,
    X: Any,
    y: Any,
    modules: Sequence[nn.Module],
    density: float,
    *,
    pattern: tuple[int, int] | None = None,
    blocksize: int = DEFAULT_BLOCKSIZE,
    dampening: float = DEFAULT_DAMPENING,
    max_batch_size: int | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Prune ``modules`` of ``model`` in place with SparseGPT, in forward order.

    Each layer keeps exactly ``round(density * numel)`` weights (with
    ``pattern`` ``(N, M)``: N of every M consecutive weights of a row); its
    kept weights get the OBS update, its pruned weights are exactly 0.

    Args:
        model: The model, changed in place.
        loss_fn: ``loss_fn(model, X, y)`` (only the forward is used).
        X: Calibration inputs, samples on dim 0.
        y: Their targets.
        modules: Linear/Conv2d modules to prune.
        density: Fraction of each layer's weights kept, in (0, 1).
        pattern: ``(N, M)`` of an N:M pattern (``density`` is then N / M), or
            None. Every module's input size must be a multiple of M.
        blocksize: Columns per lazy block.
        dampening: Fraction of the mean Hessian diagonal added to it.
        max_batch_size: Largest sub-batch per forward.

    Returns:
        Per module, in the order given: the keep mask and the saliency scores,
        both shaped like the weight.
    """
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    t = time.perf_counter()

    def update(m: nn.Module, grams: LayerGrams) -> None:
        shape, numel = m.weight.shape, m.weight.numel()
        W = m.weight.detach().reshape(weight_matrix_shape(m))
        count = numel - round(density * numel)
        Wn, keep, s = sparsegpt_layer(
            W,
            grams.G,
            count,
            blocksize=blocksize,
            dampening=dampening,
            pattern=pattern,
        )
        with torch.no_grad():
            m.weight.copy_(Wn.reshape(shape).to(m.weight.dtype))
        out[id(m)] = (keep.reshape(shape), s.reshape(shape))

    sequential_update(
        model, loss_fn, X, y, modules, update, max_batch_size=max_batch_size
    )
    logger.info(
        "SparseGPT pruned %d layers to density %.4f in %.1f s",
        len(modules),
        density,
        time.perf_counter() - t,
    )
    return [out[id(m)] for m in modules]
