"""Weight scores: one registry for the initial mask and for block selection.

A score ranks a layer's weights by importance: the initial mask keeps the
highest, and block selection (DESIGN.md section 1, step 2) takes the pruned
weights with the highest and the kept ones with the lowest as the likeliest to
be mislabelled. Every scorer maps a layer and what it needs to ``(numel,)``
scores:

- ``random``: uniform draws from the pruner's generator;
- ``magnitude``: ``|w0|``;
- ``wanda``: ``|w0| * ||x_j||`` (Wanda's score; needs the input column norms);
- ``gradient``: ``|w0 * dL/dw|`` (needs the layer's loss gradient);
- ``sparsegpt``: SparseGPT's saliency ``w^2 / [H^-1]_jj`` (passed as ``grad``;
  initial mask only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from icbs_opt.derivatives import wanda_scores
from icbs_opt.pruning.state import LayerState


@dataclass(frozen=True)
class ScoreInputs:
    """What a scorer may read besides the layer.

    Attributes:
        rng: The pruner's random generator.
        norms: ``(d_in,)`` input column norms (``wanda``).
        grad: The layer's loss gradient shaped like the weight (``gradient``),
            or its SparseGPT saliency (``sparsegpt``).
    """

    rng: np.random.Generator
    norms: torch.Tensor | None = None
    grad: torch.Tensor | None = None


Scorer = Callable[[LayerState, ScoreInputs], torch.Tensor]


def _random(L: LayerState, s: ScoreInputs) -> torch.Tensor:
    return torch.from_numpy(s.rng.random(L.numel)).to(L.w0.device)


def _magnitude(L: LayerState, s: ScoreInputs) -> torch.Tensor:
    return L.w0.abs()


def _wanda(L: LayerState, s: ScoreInputs) -> torch.Tensor:
    return wanda_scores(L.module, s.norms).reshape(-1)  # type: ignore[arg-type]


def _gradient(L: LayerState, s: ScoreInputs) -> torch.Tensor:
    return (L.w0 * s.grad.reshape(-1)).abs()  # type: ignore[union-attr]


def _sparsegpt(L: LayerState, s: ScoreInputs) -> torch.Tensor:
    return s.grad.reshape(-1)  # type: ignore[union-attr]


#: Scorers by name; each returns ``(numel,)`` scores, high = important.
SCORERS: dict[str, Scorer] = {
    "random": _random,
    "magnitude": _magnitude,
    "wanda": _wanda,
    "gradient": _gradient,
    "sparsegpt": _sparsegpt,
}


def weight_scores(method: str, L: LayerState, inputs: ScoreInputs) -> torch.Tensor:
    """``(numel,)`` float64 scores of the layer's weights by ``method``.

    Raises:
        KeyError: For a method not in :data:`SCORERS` (settings check names
            before a pruner is built).
    """
    return SCORERS[method](L, inputs).to(torch.float64)
