"""The initial mask (DESIGN.md section 1, "Initial pruning"): score, keep, freeze.

Every layer's weights are scored by the ``init`` method of
:mod:`icbs_opt.pruning.scores`; the top ``density`` are kept (per layer, per output
or per input, or the top N of every group of M), the surest of both sides are
frozen, and the tabu list is set up. ``sparsegpt`` instead takes SparseGPT's masks,
and its updated kept weights become the layers' ``keep_values``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from icbs_opt.derivatives import LossFn, input_column_norms, layer_gradients
from icbs_opt.pruning.scores import ScoreInputs, weight_scores
from icbs_opt.pruning.sparsegpt import sparsegpt
from icbs_opt.pruning.state import LayerState, freeze, keep_top, keep_top_nm
from icbs_opt.settings import PruneConfig


def initial_prune(
    model: nn.Module,
    loss_fn: LossFn,
    layers: list[LayerState],
    config: PruneConfig,
    calibration: tuple[Any, Any] | None,
    rng: np.random.Generator,
) -> None:
    """Prune every layer to its initial mask, in place (state and model).

    Args:
        model: The model.
        loss_fn: Its mean per-sample loss.
        layers: The layers' dense states; their masks, frozen sets, static
            selection scores and tabu lists are set.
        config: The settings (``init``, ``density``, ``pattern``, ...).
        calibration: ``(X, y)`` for the methods that need data.
        rng: The pruner's generator (``random`` scores).
    """
    cfg = config
    X, y = calibration if calibration is not None else (None, None)
    mods = [L.module for L in layers]
    mbs = cfg.max_batch_size
    norms: list[Any] = [None] * len(mods)
    grads: list[Any] = [None] * len(mods)
    masks: list[Any] = [None] * len(mods)
    if "wanda" in (cfg.init_method, cfg.selection):  # (d_in,) per layer
        norms = input_column_norms(model, loss_fn, X, y, mods, max_batch_size=mbs)
    if cfg.init_method == "gradient":  # one backward for every layer
        grads = layer_gradients(model, loss_fn, X, y, mods, max_batch_size=mbs)
    if cfg.init_method == "sparsegpt":  # masks, saliencies, updated weights
        done = sparsegpt(
            model, loss_fn, X, y, mods, cfg.density, pattern=cfg.nm, max_batch_size=mbs
        )
        masks, grads = [m for m, _ in done], [s for _, s in done]
    for L, norm, grad, mask in zip(layers, norms, grads, masks, strict=True):
        inputs = ScoreInputs(rng, norms=norm, grad=grad)
        s = weight_scores(cfg.init_method, L, inputs)  # (numel,)
        if mask is not None:  # SparseGPT's; its kept weights' new values restored
            keep = mask.reshape(-1)
            w = L.module.weight.detach().reshape(-1)
            L.keep_values = torch.where(keep, w, L.w0)
        elif cfg.nm is not None:
            keep = keep_top_nm(s, *cfg.nm)
        else:
            keep = keep_top(s, L.module.weight.shape, cfg.density, cfg.init_grouping)
        L.pruned = ~keep
        L.frozen = freeze(s, keep, cfg.fix_frac_prune, cfg.fix_frac_keep)
        if cfg.selection == "wanda":  # static; the weights change from here on
            L.static_scores = weight_scores("wanda", L, inputs).float()
        L.setup_tabu(cfg.tabu_frac, cfg.block_size)
        L.write(torch.arange(L.numel, device=L.w0.device))
