"""The :class:`Pruner`: the initial mask, then one block step at a time.

:meth:`Pruner.step` is DESIGN.md section 1 read top to bottom: pick a layer, pick a
block, the block's gradient and Hessian model, its QUBO, a solve, and a move applied
only if it does not predict a worse loss.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from icbs_opt.backends import Backend, get_backend
from icbs_opt.derivatives import (
    LayerTape,
    LossFn,
    block_derivatives,
    input_column_norms,
    layer_gradients,
    record_layer,
    wanda_scores,
)
from icbs_opt.errors import BackendError, PruningError
from icbs_opt.problems import BlockProblem
from icbs_opt.pruning.qubo import block_qubo, solve_block_problem
from icbs_opt.pruning.selection import LayerSchedule, select_block
from icbs_opt.pruning.state import LayerState, freeze, keep_top, resolve_layers
from icbs_opt.settings import CONFIG_FIELDS, PruneConfig

logger = logging.getLogger(__name__)


@dataclass
class StepSeconds:
    """Wall time of one block step, split by phase.

    ``forward_backward`` is the one pass shared by gradient selection and the
    per-sample Fisher (then not counted in ``select`` or ``gradient``).
    """

    forward_backward: float = 0.0
    select: float = 0.0
    gradient: float = 0.0
    hessian: float = 0.0
    q_build: float = 0.0
    solve: float = 0.0
    total: float = 0.0


@dataclass
class StepRecord:
    """What one block step did.

    Attributes:
        step: 1-based step number of this pruner.
        layer: Qualified name of the layer.
        n: Block size (may be smaller than ``block_size`` for a small layer).
        k: Pruned weights in the block, before and after the step.
        dl: Predicted loss change of the solver's answer (``x^T Q x + const``).
        dl_current: Predicted loss change of keeping the mask (0 up to rounding).
        feasible: Whether the answer had exactly k ones.
        accepted: Whether the answer was applied (feasible, ``dl <= dl_current``,
            and different from the current mask).
        flips: Weights whose state the step changed (0 when not accepted).
        seconds: Time split.
        solver_info: The backend's ``Solution.info``.
    """

    step: int
    layer: str
    n: int
    k: int
    dl: float = 0.0
    dl_current: float = 0.0
    feasible: bool = True
    accepted: bool = False
    flips: int = 0
    seconds: StepSeconds = field(default_factory=StepSeconds)
    solver_info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return dataclasses.asdict(self)


class Pruner:
    """Prunes the Linear/Conv2d weights of a model by iCBS block steps.

    The constructor prunes the model in place to the initial mask (pruned weights
    set to exactly 0); each :meth:`step` may then move one block. Masks handed
    out by :meth:`masks` are KEEP masks: ``weight == w0 * mask`` at all times.

    Args:
        model: The model; its weights are changed in place.
        loss_fn: ``loss_fn(model, X, y) -> scalar tensor``, the mean over the
            batch's samples of per-sample losses.
        density: Fraction of weights kept in each pruned layer, in (0, 1).
        backend: A backend name (see ``icbs-opt backends``) or a Backend.
        layers: Qualified module names to prune; None: every Linear and ungrouped
            Conv2d (a weight shared by several modules is pruned once).
        calibration: ``(X, y)`` batch for ``wanda``/``gradient`` init and
            ``wanda`` selection.
        backend_options: Options for ``get_backend(backend, **backend_options)``.
        problem_hook: Called once per step, before solving, with the UNSCALED
            block problem; its meta holds ``layer``, ``step``, ``x_cur`` (current
            mask of the block, 1 = pruned), ``scale`` (the factor
            ``problem.scaled()`` applies) and ``const``.
        config: A complete :class:`PruneConfig`; exclusive with ``options``.
        **options: Fields of :class:`PruneConfig` other than density
            (``block_size``, ``k``, ``init``, ``selection``, ``hessian``, ...).

    Raises:
        PruningError: For a bad setting, an unknown layer, or missing calibration.
        BackendError: For an unknown backend or backend option.
        BackendUnavailable: If the backend cannot run here.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 4))
        >>> loss_fn = lambda m, X, y: F.cross_entropy(m(X), y)
        >>> X, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
        >>> pruner = Pruner(model, loss_fn, 0.5, backend="exhaustive", block_size=8)
        >>> record = pruner.step(X, y)
        >>> (record.n, record.k, pruner.density())
        (8, 4, 0.5)
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        density: float | None = None,
        backend: str | Backend = "native",
        *,
        layers: Sequence[str] | None = None,
        calibration: tuple[Any, Any] | None = None,
        backend_options: Mapping[str, Any] | None = None,
        problem_hook: Callable[[BlockProblem], None] | None = None,
        config: PruneConfig | None = None,
        **options: Any,
    ):
        self.config = _make_config(density, config, options)
        self.model, self.loss_fn = model, loss_fn
        self.backend = _make_backend(backend, backend_options)
        self.problem_hook = problem_hook
        self.calibration = calibration
        self.rng = np.random.default_rng(self.config.seed)
        self.steps_done = 0
        self._check_calibration()
        self._layers = {
            name: LayerState.of(name, module)
            for name, module in resolve_layers(model, layers)
        }
        cfg = self.config
        self._schedule = LayerSchedule(
            self._layers, cfg.schedule, cfg.min_steps_per_layer, self.rng
        )
        self._initial_prune()

    # ----------------------------------------------------------- public API
    @property
    def layer_names(self) -> list[str]:
        """Names of the layers being pruned."""
        return list(self._layers)

    def masks(self) -> dict[str, torch.Tensor]:
        """Keep masks: ``{layer: bool tensor shaped like the weight}``, True = kept."""
        return {
            name: (~L.pruned).reshape(L.module.weight.shape).clone()
            for name, L in self._layers.items()
        }

    def density(self) -> float:
        """Kept weights over all weights of the pruned layers."""
        kept = sum(int((~L.pruned).sum()) for L in self._layers.values())
        return kept / sum(L.numel for L in self._layers.values())

    def step(self, X: Any, y: Any, layer: str | None = None) -> StepRecord:
        """One block step (DESIGN section 1, steps 1-6) on the batch ``(X, y)``.

        Args:
            X: Inputs, samples on dim 0.
            y: Targets, samples on dim 0.
            layer: Layer to work on; None follows the schedule.

        Returns:
            The step's record. The model changes only if the move is accepted;
            an exception leaves it at the last accepted mask.
        """
        sec = StepSeconds()
        t0 = time.perf_counter()
        # 1. pick a layer
        L = self._layers[self._pick_layer(layer)]
        tape = self._shared_pass(L, X, y)
        sec.forward_backward = tape.seconds if tape is not None else 0.0
        # 2. pick a block: k currently pruned and n - k kept free weights
        cfg = self.config
        scores = lambda: self._selection_scores(L, X, y, tape)  # noqa: E731
        idx = select_block(L, scores, cfg.block_size, cfg.k)  # (n,) flat indices
        x_cur = L.pruned[idx]  # (n,) bool, True = pruned now
        sec.select = time.perf_counter() - t0 - sec.forward_backward
        record = StepRecord(self.steps_done + 1, L.name, idx.numel(), int(x_cur.sum()))
        record.seconds = sec
        if 0 < record.k < record.n:  # else nothing can move
            self._solve_block(L, idx, x_cur, X, y, record, tape)
        L.push_tabu(idx)
        self.steps_done = record.step
        sec.total = time.perf_counter() - t0
        logger.debug(
            "step %d %s n=%d k=%d dL=%.3g accepted=%s",
            record.step,
            L.name,
            record.n,
            record.k,
            record.dl,
            record.accepted,
        )
        return record

    # -------------------------------------------------------------- the step
    def _solve_block(
        self,
        L: LayerState,
        idx: torch.Tensor,
        x_cur: torch.Tensor,
        X: Any,
        y: Any,
        record: StepRecord,
        tape: LayerTape | None,
    ) -> None:
        """Steps 3-6 for the block ``idx``; fills ``record``, applies the move."""
        cfg, sec = self.config, record.seconds
        # 3. block gradient g (n,) and Hessian model H (n, n)
        g, H, sec.gradient, sec.hessian = block_derivatives(
            self.model,
            self.loss_fn,
            X,
            y,
            L.module,
            idx,
            cfg.hessian,
            max_batch_size=cfg.max_batch_size,
            chunk_size=cfg.hessian_chunk_size,
            tape=tape,
        )
        # 4. block QUBO: dL(x) = x^T Q x + const subject to sum(x) = k
        t = time.perf_counter()
        w0_B = L.w0[idx]  # (n,)
        w_B = torch.where(x_cur, torch.zeros_like(w0_B), w0_B)  # (n,)
        Q, const = block_qubo(
            w0_B, w_B, g, H, cfg.grad_multiplier, cfg.ridge_multiplier
        )
        x0 = x_cur.cpu().numpy().astype(np.int8)  # (n,) the current mask, feasible
        problem = BlockProblem(Q.cpu().numpy(), record.k)
        if self.problem_hook is not None:
            self.problem_hook(_with_meta(problem, record, x0, const))
        sec.q_build = time.perf_counter() - t
        # 5. scale, cut off |Q| <= 1e-12, solve warm-started; evaluate unscaled
        t = time.perf_counter()
        x, record.feasible, record.solver_info = solve_block_problem(
            problem, x0, self.backend, self.rng, remove_zero_rows=cfg.remove_zero_rows
        )
        sec.solve = time.perf_counter() - t
        record.dl = problem.energy(x) + const
        record.dl_current = problem.energy(x0) + const
        # 6. accept only a feasible move that is not predicted worse
        new = torch.from_numpy(x.astype(bool)).to(idx.device)  # (n,) True = pruned
        flips = int((new != x_cur).sum())
        if record.feasible and record.dl <= record.dl_current and flips:
            L.pruned[idx] = new
            L.write(idx)
            record.accepted, record.flips = True, flips

    def _pick_layer(self, layer: str | None) -> str:
        if layer is None:
            return self._schedule.next()
        if layer not in self._layers:
            names = ", ".join(self._layers)
            raise PruningError(f"unknown layer {layer!r}; this pruner prunes: {names}")
        return layer

    def _shared_pass(self, L: LayerState, X: Any, y: Any) -> LayerTape | None:
        """One forward/backward for both gradient selection and per-sample Fisher.

        Both need the layer's inputs and output gradients on the same batch; the
        tape keeps them so the step runs the model once instead of twice.
        """
        cfg = self.config
        if cfg.selection != "gradient" or cfg.hessian != "gradient_per_sample":
            return None
        return record_layer(
            self.model, self.loss_fn, X, y, L.module, max_batch_size=cfg.max_batch_size
        )

    def _selection_scores(
        self, L: LayerState, X: Any, y: Any, tape: LayerTape | None
    ) -> torch.Tensor:
        """``(numel,)`` scores of step 2: high = likelier to be wrongly pruned."""
        method = self.config.selection
        if method == "random":
            return torch.from_numpy(self.rng.random(L.numel)).to(L.w0.device)
        if method == "magnitude":
            return L.w0.abs()
        if method == "wanda":
            return L.static_scores  # type: ignore[return-value]
        if tape is not None:
            grad = tape.gradient()
        else:
            (grad,) = layer_gradients(
                self.model,
                self.loss_fn,
                X,
                y,
                [L.module],
                max_batch_size=self.config.max_batch_size,
            )
        return (L.w0 * grad.reshape(-1)).abs().to(torch.float64)

    # ----------------------------------------------------------- initial mask
    def _check_calibration(self) -> None:
        cfg = self.config
        if self.calibration is not None:
            return
        if cfg.init_method in ("wanda", "gradient"):
            raise PruningError(
                f"init {cfg.init!r} needs calibration data: pass calibration=(X, y)"
            )
        if cfg.selection == "wanda":
            raise PruningError(
                "selection 'wanda' needs calibration data: pass calibration=(X, y)"
            )

    def _initial_prune(self) -> None:
        """Score every weight, keep the top ``density``, freeze, set up tabu."""
        cfg = self.config
        X, y = self.calibration if self.calibration is not None else (None, None)
        mods = [L.module for L in self._layers.values()]
        mbs = cfg.max_batch_size
        norms = grads = [None] * len(mods)
        if "wanda" in (cfg.init_method, cfg.selection):  # (d_in,) per layer
            norms = input_column_norms(
                self.model, self.loss_fn, X, y, mods, max_batch_size=mbs
            )
        if cfg.init_method == "gradient":  # one backward for every layer
            grads = layer_gradients(
                self.model, self.loss_fn, X, y, mods, max_batch_size=mbs
            )
        for L, norm, grad in zip(self._layers.values(), norms, grads, strict=True):
            s = self._init_scores(cfg.init_method, L, norm, grad)  # (numel,)
            keep = keep_top(s, L.module.weight.shape, cfg.density, cfg.init_grouping)
            L.pruned = ~keep
            L.frozen = freeze(s, keep, cfg.fix_frac_prune, cfg.fix_frac_keep)
            if cfg.selection == "wanda":  # static; magnitude is read from w0
                L.static_scores = self._init_scores("wanda", L, norm, None).float()
            L.setup_tabu(cfg.tabu_frac, cfg.block_size)
            L.write(torch.arange(L.numel, device=L.w0.device))
        logger.info(
            "initial %s pruning to density %.4f of %d layers",
            cfg.init,
            self.density(),
            len(self._layers),
        )

    def _init_scores(
        self,
        method: str,
        L: LayerState,
        norms: torch.Tensor | None,
        grad: torch.Tensor | None,
    ) -> torch.Tensor:
        """Flat float64 scores of the layer's weights for ``method``."""
        if method == "magnitude":
            s = L.w0.abs()
        elif method == "wanda":
            s = wanda_scores(L.module, norms).reshape(-1)  # type: ignore[arg-type]
        elif method == "gradient":
            s = (L.w0 * grad.reshape(-1)).abs()  # type: ignore[union-attr]
        else:
            s = torch.from_numpy(self.rng.random(L.numel)).to(L.w0.device)
        return s.to(torch.float64)


def _make_config(
    density: float | None, config: PruneConfig | None, options: dict[str, Any]
) -> PruneConfig:
    if config is not None:
        if options or density is not None:
            raise PruningError(
                "give either config or density and options, not both "
                f"(got density={density!r}, options {sorted(options)})"
            )
        return config
    if density is None:
        raise PruningError("density is required (a number in (0, 1))")
    fields = set(CONFIG_FIELDS) - {"density"}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise PruningError(
            f"unknown Pruner option {unknown[0]!r}; options are: "
            f"{', '.join(sorted(fields))}"
        )
    return PruneConfig(density=density, **options)


def _make_backend(backend: str | Backend, options: Mapping[str, Any] | None) -> Backend:
    if isinstance(backend, Backend):
        if options:
            raise BackendError(
                "backend_options apply to a backend name, not to a Backend "
                f"instance (got {sorted(options)})"
            )
        return backend
    return get_backend(backend, **dict(options or {}))


def _with_meta(
    problem: BlockProblem, record: StepRecord, x0: np.ndarray, const: float
) -> BlockProblem:
    _, scale = problem.scaled()
    meta = {
        "layer": record.layer,
        "step": record.step,
        "x_cur": x0,
        "scale": scale,
        "const": const,
    }
    return BlockProblem(problem.Q, problem.k, meta=meta)
