"""Settings of the iCBS pruning loop, without torch (the CLI reads them cheaply).

:class:`PruneConfig` holds every option of DESIGN.md section 1 and validates it;
:mod:`icbs_opt.pruning` re-exports everything here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from icbs_opt.errors import PruningError

#: Hessian models of DESIGN step 3.
HESSIAN_MODELS = ("gradient_per_sample", "gradient_mean", "exact", "exact_piecewise")
SCORE_METHODS = ("magnitude", "wanda", "gradient", "random")
INIT_METHODS = SCORE_METHODS + tuple(
    f"{m}{suffix}"
    for m in ("magnitude", "wanda", "gradient")
    for suffix in ("_per_output", "_per_input")
)
SELECTION_METHODS = ("random", "magnitude", "wanda", "gradient")
SCHEDULES = ("uniform", "log")

#: The paper's classifier settings (the CLI's defaults), on top of PruneConfig's.
PAPER_CLASSIFIER_SETTINGS: dict[str, Any] = {
    "selection": "gradient",
    "hessian": "gradient_per_sample",
    "grad_multiplier": 0.75,
    "ridge_multiplier": 1e-3,
    "tabu_frac": 0.4,
    "fix_frac_prune": 0.42,
    "fix_frac_keep": 0.35,
}


# ---------------------------------------------------------------------- config
def is_integer(value: Any) -> bool:
    """Whether ``value`` is an integer (numpy integers too), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass
class PruneConfig:
    """Every setting of the method (DESIGN section 1), validated on construction.

    Attributes:
        density: Fraction of each pruned layer's weights kept, in (0, 1); a layer
            keeps ``round(density * numel)`` weights.
        block_size: ``n``, weights per block step (>= 2).
        k: Pruned weights per block, in [1, block_size - 1]; None: block_size // 2.
        init: Initial pruning: ``magnitude``, ``wanda``, ``gradient``, ``random``,
            the first three also ``*_per_output`` / ``*_per_input``.
        selection: Block selection: ``random``, ``magnitude``, ``wanda``,
            ``gradient``.
        hessian: ``gradient_per_sample``, ``gradient_mean``, ``exact`` or
            ``exact_piecewise``.
        grad_multiplier: ``lambda_g``, weight of the gradient term.
        ridge_multiplier: ``lambda_r``, weight of ``|delta|^2``.
        tabu_frac: Tabu list capacity as a fraction of a layer's free weights, [0, 1).
        fix_frac_prune: Fraction of the initially pruned weights (lowest init
            scores) frozen pruned, [0, 1].
        fix_frac_keep: Fraction of the initially kept weights (highest init
            scores) frozen kept, [0, 1].
        schedule: ``uniform`` (a random layer each step) or ``log`` (epochs giving
            each layer ``max(min_steps_per_layer, round(log10(numel)))`` steps).
        min_steps_per_layer: Floor of the ``log`` schedule's steps per layer.
        remove_zero_rows: Prune all-zero Q rows for free and solve the rest.
        max_batch_size: Largest sub-batch per forward/backward (None: whole batch).
        hessian_chunk_size: Hessian rows per pass for ``exact_piecewise``.
        seed: Seed of every random choice (init, layer, block, solver).
    """

    density: float
    block_size: int = 256
    k: int | None = None
    init: str = "magnitude"
    selection: str = "random"
    hessian: str = "gradient_per_sample"
    grad_multiplier: float = 1.0
    ridge_multiplier: float = 0.0
    tabu_frac: float = 0.0
    fix_frac_prune: float = 0.0
    fix_frac_keep: float = 0.0
    schedule: str = "uniform"
    min_steps_per_layer: int = 1
    remove_zero_rows: bool = False
    max_batch_size: int | None = None
    hessian_chunk_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        d = self.density
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < d < 1:
            raise PruningError(f"density must be a number in (0, 1), got {d!r}")
        if not is_integer(self.block_size) or self.block_size < 2:
            raise PruningError(
                f"block_size must be an integer >= 2, got {self.block_size!r}"
            )
        if self.k is None:
            self.k = self.block_size // 2
        if not is_integer(self.k) or not 1 <= self.k <= self.block_size - 1:
            raise PruningError(
                f"k must be an integer in [1, block_size - 1 = {self.block_size - 1}]"
                f", got {self.k!r}"
            )
        for name, choices in (
            ("init", INIT_METHODS),
            ("selection", SELECTION_METHODS),
            ("hessian", HESSIAN_MODELS),
            ("schedule", SCHEDULES),
        ):
            value = getattr(self, name)
            if value not in choices:
                raise PruningError(
                    f"{name} must be one of {', '.join(choices)}, got {value!r}"
                )
        for name in ("grad_multiplier", "ridge_multiplier"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise PruningError(f"{name} must be a finite number, got {value!r}")
        if not isinstance(self.tabu_frac, (int, float)) or not (
            0 <= self.tabu_frac < 1
        ):
            raise PruningError(f"tabu_frac must be in [0, 1), got {self.tabu_frac!r}")
        for name in ("fix_frac_prune", "fix_frac_keep"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise PruningError(f"{name} must be in [0, 1], got {value!r}")
        for name in ("min_steps_per_layer", "hessian_chunk_size"):
            value = getattr(self, name)
            if not is_integer(value) or value < 1:
                raise PruningError(f"{name} must be an integer >= 1, got {value!r}")
        mbs = self.max_batch_size
        if mbs is not None and (not is_integer(mbs) or mbs < 1):
            raise PruningError(
                f"max_batch_size must be None or an integer >= 1, got {mbs!r}"
            )
        if not is_integer(self.seed) or self.seed < 0:
            raise PruningError(
                f"seed must be a non-negative integer, got {self.seed!r}"
            )

    @property
    def init_method(self) -> str:
        """The scoring of ``init`` without its ``_per_*`` suffix."""
        return self.init.split("_per_")[0]

    @property
    def init_grouping(self) -> str:
        """``layer``, ``output`` or ``input``: where init scores are ranked."""
        return self.init.split("_per_")[1] if "_per_" in self.init else "layer"

    def to_dict(self) -> dict[str, Any]:
        """Every setting as a JSON-ready dictionary."""
        return dataclasses.asdict(self)
