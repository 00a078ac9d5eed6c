"""The iterative Combinatorial Brain Surgeon: `Pruner` and the `prune` loop.

DESIGN.md section 1 is the specification. Notation for one layer: ``w0`` the original
dense weights (flattened), ``pruned`` the mask (``True`` = pruned), current weights
``w = w0 * ~pruned``. A block step picks ``n`` weights of one layer, builds the QUBO
of the second-order loss change over which ``k`` of them to prune, solves it with a
backend and applies the answer only if it does not predict a worse loss than the
current mask.

Masks handed out by :meth:`Pruner.masks` (and written by the CLI) are KEEP masks:
``True`` = kept, so ``weight == w0 * mask`` at all times.

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

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from icbs_opt.backends import Backend, get_backend
from icbs_opt.derivatives import (
    PRUNABLE_TYPES,
    LayerTape,
    LossFn,
    block_derivatives,
    check_prunable,
    input_column_norms,
    layer_gradients,
    record_layer,
    wanda_scores,
)
from icbs_opt.errors import BackendError, DataError, PruningError
from icbs_opt.problems import BlockProblem
from icbs_opt.prune_config import (
    INIT_METHODS,
    PAPER_CLASSIFIER_SETTINGS,
    SCHEDULES,
    SELECTION_METHODS,
    PruneConfig,
    is_integer,
)

logger = logging.getLogger(__name__)

__all__ = [
    "INIT_METHODS",
    "PAPER_CLASSIFIER_SETTINGS",
    "SCHEDULES",
    "SELECTION_METHODS",
    "PruneConfig",
    "PruneResult",
    "Pruner",
    "StepRecord",
    "StepSeconds",
    "block_qubo",
    "nonzero_density",
    "prune",
]


# --------------------------------------------------------------------- records
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
    dl: float
    dl_current: float
    feasible: bool
    accepted: bool
    flips: int
    seconds: StepSeconds
    solver_info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return dataclasses.asdict(self)


@dataclass
class _Layer:
    """Pruning state of one layer (all flat, on the weight's device)."""

    name: str
    module: nn.Module
    w0: torch.Tensor  # (numel,) original dense weights
    pruned: torch.Tensor  # (numel,) bool
    frozen: torch.Tensor  # (numel,) bool
    static_scores: torch.Tensor | None  # (numel,) float32, for wanda selection
    tabu: collections.deque = field(default_factory=collections.deque)
    tabu_count: torch.Tensor | None = None  # (numel,) int32, entries in the FIFO
    tabu_cap: int = 0

    @property
    def numel(self) -> int:
        return self.w0.numel()


# ----------------------------------------------------------------------- QUBO
def block_qubo(
    w0: torch.Tensor,
    w: torch.Tensor,
    g: torch.Tensor,
    H: torch.Tensor,
    grad_multiplier: float = 1.0,
    ridge_multiplier: float = 0.0,
) -> tuple[torch.Tensor, float]:
    """The block QUBO of DESIGN step 4: ``dL(x) = x^T Q x + const``.

    ``x_i = 1`` means weight i of the block is pruned after the step; the weight
    change is ``delta = -(dw + W0 x)`` with ``dw = w - w0``, and
    ``dL = lambda_g g^T delta + 1/2 delta^T H delta + lambda_r |delta|^2``.

    Args:
        w0: ``(n,)`` original weights of the block.
        w: ``(n,)`` current weights (``0`` where pruned, ``w0`` where kept).
        g: ``(n,)`` loss gradient at ``w``.
        H: ``(n, n)`` Hessian model.
        grad_multiplier: ``lambda_g``.
        ridge_multiplier: ``lambda_r``.

    Returns:
        ``Q`` ``(n, n)`` float64 and ``const``.
    """
    w0, w, g, H = (t.to(torch.float64) for t in (w0, w, g, H))
    dw = w - w0  # (n,) = -w0 where pruned, 0 where kept
    Q = 0.5 * w0[:, None] * H * w0[None, :]  # (n, n) 1/2 W0 H W0
    diag = (
        w0 * (H @ dw)  # diag(W0 H dw)
        - grad_multiplier * w0 * g  # -lambda_g diag(W0 g)
        + ridge_multiplier * w0 * (2 * dw + w0)  # lambda_r diag(w0 (2 dw + w0))
    )
    Q = Q + torch.diag(diag)
    const = 0.5 * dw @ H @ dw - grad_multiplier * g @ dw + ridge_multiplier * dw @ dw
    return Q, float(const)


# ---------------------------------------------------------------------- pruner
class Pruner:
    """Prunes the Linear/Conv2d weights of a model by iCBS block steps.

    The constructor prunes the model in place to the initial mask (pruned weights
    set to exactly 0); each :meth:`step` may then move one block.

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
        self.config = self._make_config(density, config, options)
        self.model, self.loss_fn = model, loss_fn
        self.backend = self._make_backend(backend, backend_options)
        self.problem_hook = problem_hook
        self.calibration = calibration
        self.rng = np.random.default_rng(self.config.seed)
        self.steps_done = 0
        self._schedule: list[str] = []
        self._check_calibration()
        self._layers = {
            name: self._new_layer(name, mod) for name, mod in self._resolve(layers)
        }
        self._initial_prune()

    # -------------------------------------------------------- construction
    @staticmethod
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
        fields = {f.name for f in dataclasses.fields(PruneConfig)} - {"density"}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise PruningError(
                f"unknown Pruner option {unknown[0]!r}; options are: "
                f"{', '.join(sorted(fields))}"
            )
        return PruneConfig(density=density, **options)

    @staticmethod
    def _make_backend(
        backend: str | Backend, options: Mapping[str, Any] | None
    ) -> Backend:
        if isinstance(backend, Backend):
            if options:
                raise BackendError(
                    "backend_options apply to a backend name, not to a Backend "
                    f"instance (got {sorted(options)})"
                )
            return backend
        return get_backend(backend, **dict(options or {}))

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

    def _resolve(self, layers: Sequence[str] | None) -> list[tuple[str, nn.Module]]:
        modules = dict(self.model.named_modules())
        if layers is None:
            chosen = [
                (name, m)
                for name, m in modules.items()
                if isinstance(m, PRUNABLE_TYPES)
                and not (isinstance(m, nn.Conv2d) and m.groups != 1)
            ]
        else:
            if isinstance(layers, str):
                raise PruningError(
                    f"layers must be a list of module names, got the string {layers!r}"
                )
            chosen = []
            for name in layers:
                if name not in modules:
                    known = [
                        n for n, m in modules.items() if isinstance(m, PRUNABLE_TYPES)
                    ]
                    raise PruningError(
                        f"unknown layer {name!r}; prunable layers are: "
                        f"{', '.join(known[:20])}{' ...' if len(known) > 20 else ''}"
                    )
                check_prunable(modules[name], name)
                chosen.append((name, modules[name]))
        seen: dict[int, str] = {}
        unique = []
        for name, m in chosen:
            key = id(m.weight)
            if key in seen:
                logger.info(
                    "layer %s shares its weight with %s; pruned once", name, seen[key]
                )
                continue
            seen[key] = name
            unique.append((name, m))
        if not unique:
            raise PruningError("the model has no Linear or Conv2d layer to prune")
        return unique

    def _new_layer(self, name: str, module: nn.Module) -> _Layer:
        with torch.no_grad():
            if not module.weight.is_contiguous():
                module.weight.data = module.weight.data.contiguous()
            w0 = module.weight.detach().reshape(-1).clone()
        false = torch.zeros_like(w0, dtype=torch.bool)
        return _Layer(name, module, w0, false.clone(), false.clone(), None)

    def _layer_scores(
        self,
        method: str,
        L: _Layer,
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

    def _initial_prune(self) -> None:
        cfg = self.config
        needed = {cfg.init_method, cfg.selection}
        X, y = self.calibration if self.calibration is not None else (None, None)
        mods = [L.module for L in self._layers.values()]
        mbs = cfg.max_batch_size
        norms = grads = [None] * len(mods)
        if "wanda" in needed:  # (d_in,) input column norms per layer
            norms = input_column_norms(
                self.model, self.loss_fn, X, y, mods, max_batch_size=mbs
            )
        if cfg.init_method == "gradient":  # one backward for every layer
            grads = layer_gradients(
                self.model, self.loss_fn, X, y, mods, max_batch_size=mbs
            )
        for L, norm, grad in zip(self._layers.values(), norms, grads, strict=True):
            s = self._layer_scores(cfg.init_method, L, norm, grad)  # (numel,)
            keep = _keep_top(s, L.module.weight.shape, cfg.density, cfg.init_grouping)
            L.pruned = ~keep
            L.frozen = _freeze(s, keep, cfg.fix_frac_prune, cfg.fix_frac_keep)
            if cfg.selection == "wanda":  # static; magnitude is read from w0
                L.static_scores = self._layer_scores("wanda", L, norm, None).float()
            self._setup_tabu(L)
            self._write(L, torch.arange(L.numel, device=L.w0.device))
        logger.info(
            "initial %s pruning to density %.4f of %d layers",
            cfg.init,
            self.density(),
            len(self._layers),
        )

    def _setup_tabu(self, L: _Layer) -> None:
        free = int((~L.frozen).sum())
        cap = int(self.config.tabu_frac * free)
        if cap and free - cap < self.config.block_size:
            logger.warning(
                "layer %s has %d free weights: too few for a tabu list of %d and "
                "blocks of %d; tabu switched off for it",
                L.name,
                free,
                cap,
                self.config.block_size,
            )
            cap = 0
        L.tabu_cap = cap
        L.tabu = collections.deque()
        L.tabu_count = torch.zeros_like(L.pruned, dtype=torch.int32)

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
        step = self.steps_done + 1
        # 1. pick a layer
        L = self._layers[self._pick_layer(layer)]
        tape = self._shared_pass(L, X, y)
        sec.forward_backward = tape.seconds if tape is not None else 0.0
        # 2. pick a block: k currently pruned and n - k kept free weights
        idx = self._select_block(L, X, y, tape)  # (n,) flat indices into the weight
        x_cur = L.pruned[idx]  # (n,) bool, True = pruned now
        n, k = idx.numel(), int(x_cur.sum())
        sec.select = time.perf_counter() - t0 - sec.forward_backward
        record = StepRecord(step, L.name, n, k, 0.0, 0.0, True, False, 0, sec)
        if 0 < k < n:  # else nothing can move
            self._solve_block(L, idx, x_cur, X, y, record, tape)
        self._push_tabu(L, idx)
        self.steps_done = step
        sec.total = time.perf_counter() - t0
        logger.debug(
            "step %d %s n=%d k=%d dL=%.3g accepted=%s",
            step,
            L.name,
            n,
            k,
            record.dl,
            record.accepted,
        )
        return record

    def _solve_block(
        self,
        L: _Layer,
        idx: torch.Tensor,
        x_cur: torch.Tensor,
        X: Any,
        y: Any,
        record: StepRecord,
        tape: LayerTape | None = None,
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
        Q_t, const = block_qubo(
            w0_B, w_B, g, H, cfg.grad_multiplier, cfg.ridge_multiplier
        )
        x0 = x_cur.cpu().numpy().astype(np.int8)  # (n,) the current mask, feasible
        problem = BlockProblem(Q_t.cpu().numpy(), record.k)
        if self.problem_hook is not None:
            self.problem_hook(self._with_meta(problem, record, x0, const))
        sec.q_build = time.perf_counter() - t
        # 5. scale, cut off |Q| <= 1e-12, solve warm-started; evaluate unscaled
        t = time.perf_counter()
        x, record.feasible, record.solver_info = self._solve(problem, x0)
        sec.solve = time.perf_counter() - t
        record.dl = problem.energy(x) + const
        record.dl_current = problem.energy(x0) + const
        # 6. accept only a feasible move that is not predicted worse
        new = torch.from_numpy(x.astype(bool)).to(idx.device)  # (n,) True = pruned
        flips = int((new != x_cur).sum())
        if record.feasible and record.dl <= record.dl_current and flips:
            L.pruned[idx] = new
            self._write(L, idx)
            record.accepted, record.flips = True, flips

    # ------------------------------------------------------------ internals
    def _pick_layer(self, layer: str | None) -> str:
        if layer is not None:
            if layer not in self._layers:
                raise PruningError(
                    f"unknown layer {layer!r}; this pruner prunes: "
                    f"{', '.join(self._layers)}"
                )
            return layer
        names = list(self._layers)
        if self.config.schedule == "uniform":
            return names[int(self.rng.integers(len(names)))]
        if not self._schedule:  # a new epoch
            for name, L in self._layers.items():
                count = max(self.config.min_steps_per_layer, round(math.log10(L.numel)))
                self._schedule += [name] * count
            self._schedule = [
                self._schedule[i] for i in self.rng.permutation(len(self._schedule))
            ]
        return self._schedule.pop()

    def _shared_pass(self, L: _Layer, X: Any, y: Any) -> LayerTape | None:
        """One forward/backward for both gradient selection and per-sample Fisher.

        Both need the layer's inputs and output gradients on the same batch; the
        tape keeps them so the step runs the model once instead of twice.
        """
        cfg = self.config
        if cfg.selection != "gradient" or cfg.hessian != "gradient_per_sample":
            return None
        return record_layer(
            self.model,
            self.loss_fn,
            X,
            y,
            L.module,
            max_batch_size=cfg.max_batch_size,
        )

    def _select_block(
        self, L: _Layer, X: Any, y: Any, tape: LayerTape | None = None
    ) -> torch.Tensor:
        """Flat indices of the block: k pruned and n - k kept free weights.

        Tabu weights are passed over; a side with too few other candidates is
        topped up with its tabu weights (so every block keeps its k).
        """
        cfg = self.config
        free = ~L.frozen
        if int(free.sum()) <= cfg.block_size:
            return torch.nonzero(free).squeeze(1)
        cand_p = torch.nonzero(free & L.pruned).squeeze(1)
        cand_k = torch.nonzero(free & ~L.pruned).squeeze(1)
        n_p = max(min(cfg.k, cand_p.numel()), cfg.block_size - cand_k.numel())
        scores = self._selection_scores(L, X, y, tape)  # (numel,)
        tabu = L.tabu_count > 0  # (numel,) bool
        pick_p = _top(cand_p, scores, tabu, n_p, largest=True)  # likeliest wrong
        pick_k = _top(cand_k, scores, tabu, cfg.block_size - n_p, largest=False)
        return torch.sort(torch.cat([pick_p, pick_k])).values

    def _selection_scores(
        self, L: _Layer, X: Any, y: Any, tape: LayerTape | None = None
    ) -> torch.Tensor:
        method = self.config.selection
        if method == "random":
            return torch.from_numpy(self.rng.random(L.numel)).to(L.w0.device)
        if method == "gradient" and tape is not None:
            grad = tape.gradient()
            return (L.w0 * grad.reshape(-1)).abs().to(torch.float64)
        if method == "gradient":
            (grad,) = layer_gradients(
                self.model,
                self.loss_fn,
                X,
                y,
                [L.module],
                max_batch_size=self.config.max_batch_size,
            )
            return (L.w0 * grad.reshape(-1)).abs().to(torch.float64)
        if method == "magnitude":
            return L.w0.abs()
        return L.static_scores  # type: ignore[return-value]

    def _with_meta(
        self, problem: BlockProblem, record: StepRecord, x0: np.ndarray, const: float
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

    def _solve(
        self, problem: BlockProblem, x0: np.ndarray
    ) -> tuple[np.ndarray, bool, dict[str, Any]]:
        """Solve the scaled problem (optionally without its zero rows)."""
        x = np.zeros(problem.n, dtype=np.int8)
        rest, k = np.arange(problem.n), problem.k
        if self.config.remove_zero_rows:
            zero = ~(problem.Q != 0).any(axis=1)  # rows (= columns) of zeros
            z = np.flatnonzero(zero)
            x[z[: min(z.size, k)]] = 1  # pruning them changes nothing
            k -= min(z.size, k)
            rest = np.flatnonzero(~zero)
        if k == 0 or k == rest.size:
            x[rest] = 1 if k else 0
            return x, problem.is_feasible(x), {}
        sub = (
            problem
            if rest.size == problem.n
            else BlockProblem(problem.Q[np.ix_(rest, rest)], k)
        )
        scaled, _ = sub.scaled()
        warm = x0[rest]
        if int(warm.sum()) != k:
            warm = scaled.repair(warm)
        seed = int(self.rng.integers(2**31))
        sol = self.backend.solve(scaled, seed=seed, x0=warm)
        x[rest] = sol.x
        return x, bool(sol.feasible) and problem.is_feasible(x), dict(sol.info)

    def _write(self, L: _Layer, idx: torch.Tensor) -> None:
        """Set weights ``idx``: 0 where pruned, ``w0`` where kept."""
        with torch.no_grad():
            flat = L.module.weight.view(-1)
            w0 = L.w0[idx]
            flat[idx] = torch.where(L.pruned[idx], torch.zeros_like(w0), w0)

    def _push_tabu(self, L: _Layer, idx: torch.Tensor) -> None:
        if not L.tabu_cap:
            return
        L.tabu.extend(idx.tolist())
        L.tabu_count.index_add_(0, idx, torch.ones_like(idx, dtype=torch.int32))
        expired = [L.tabu.popleft() for _ in range(len(L.tabu) - L.tabu_cap)]
        if expired:  # an index may sit in the FIFO more than once: count them
            gone = torch.tensor(expired, device=idx.device)
            L.tabu_count.index_add_(0, gone, -torch.ones_like(gone, dtype=torch.int32))


def _top(
    cand: torch.Tensor,
    scores: torch.Tensor,
    tabu: torch.Tensor | None,
    count: int,
    *,
    largest: bool,
) -> torch.Tensor:
    """The ``count`` candidates with the largest (or smallest) scores.

    Candidates in ``tabu`` (a bool mask over all weights) come last.
    """
    order = torch.argsort(scores[cand], descending=largest, stable=True)
    if tabu is not None:
        order = order[torch.argsort(tabu[cand][order].to(torch.uint8), stable=True)]
    return cand[order[:count]]


def _keep_top(
    scores: torch.Tensor, shape: torch.Size, density: float, grouping: str
) -> torch.Tensor:
    """Keep mask: the highest ``round(density * numel)`` scores, ranked per group."""
    numel = scores.numel()
    kept = round(density * numel)
    if grouping == "layer":
        keep = torch.zeros(numel, dtype=torch.bool, device=scores.device)
        keep[torch.argsort(scores, descending=True, stable=True)[:kept]] = True
        return keep
    S = scores.reshape(shape[0], -1)  # (d_out, d_in)
    if grouping == "input":
        S = S.T
    groups, size = S.shape
    counts = torch.full((groups,), kept // groups, device=S.device)
    counts[: kept % groups] += 1  # the layer keeps exactly round(density * numel)
    order = torch.argsort(S, dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(size, device=S.device).expand(groups, size))
    keep = ranks < counts[:, None]
    return (keep.T if grouping == "input" else keep).reshape(-1)


def _freeze(
    scores: torch.Tensor, keep: torch.Tensor, frac_prune: float, frac_keep: float
) -> torch.Tensor:
    """Frozen mask: the lowest-scoring pruned and highest-scoring kept fractions."""
    frozen = torch.zeros_like(keep)
    pruned_idx = torch.nonzero(~keep).squeeze(1)
    kept_idx = torch.nonzero(keep).squeeze(1)
    frozen[
        _top(
            pruned_idx,
            scores,
            None,
            round(frac_prune * pruned_idx.numel()),
            largest=False,
        )
    ] = True
    frozen[
        _top(kept_idx, scores, None, round(frac_keep * kept_idx.numel()), largest=True)
    ] = True
    return frozen


# ------------------------------------------------------------------------ loop
@dataclass
class PruneResult:
    """Outcome of :func:`prune`.

    Attributes:
        records: One :class:`StepRecord` per step.
        history: ``{step, metric, loss, seconds}`` per evaluation (step 0 is the
            initial mask); ``seconds`` is pruning time so far, evaluations excluded.
        seconds: Total pruning time (evaluations excluded).
    """

    records: list[StepRecord]
    history: list[dict[str, float]]
    seconds: float

    @property
    def accepted(self) -> int:
        """Number of accepted steps."""
        return sum(r.accepted for r in self.records)


def prune(
    pruner: Pruner,
    batches: Iterable[tuple[Any, Any]],
    steps: int,
    *,
    evaluate: Callable[[nn.Module], Mapping[str, float]] | None = None,
    eval_every: int = 0,
    on_step: Callable[[StepRecord], None] | None = None,
) -> PruneResult:
    """Run ``steps`` block steps, one batch each.

    Args:
        pruner: The pruner.
        batches: ``(X, y)`` batches. An iterator must last ``steps`` batches; a
            re-iterable (a list, a DataLoader) is restarted when it runs out.
        steps: Number of steps (>= 0).
        evaluate: ``evaluate(model) -> {"metric": ..., "loss": ...}``, called
            before the first step, every ``eval_every`` steps and after the last.
        eval_every: Evaluation period in steps (0: only before and after).
        on_step: Called with each step's record (e.g. to drive a progress bar).

    Returns:
        The records, the evaluation history and the pruning time.

    Raises:
        PruningError: For a negative ``steps`` or ``eval_every``.
        DataError: If an iterator of batches runs out early or is empty.
    """
    if not is_integer(steps) or steps < 0:
        raise PruningError(f"steps must be an integer >= 0, got {steps!r}")
    if not is_integer(eval_every) or eval_every < 0:
        raise PruningError(f"eval_every must be an integer >= 0, got {eval_every!r}")
    records: list[StepRecord] = []
    history: list[dict[str, float]] = []
    seconds = 0.0

    def score(step: int) -> None:
        if evaluate is not None:
            result = evaluate(pruner.model)
            history.append(
                {
                    "step": step,
                    "metric": float(result["metric"]),
                    "loss": float(result["loss"]),
                    "seconds": seconds,
                }
            )

    score(0)
    it = iter(batches)
    for s in range(1, steps + 1):
        try:
            X, y = next(it)
        except StopIteration:
            it = iter(batches)
            if it is batches:
                raise DataError(
                    f"the batches ran out after {s - 1} of {steps} steps"
                ) from None
            try:
                X, y = next(it)
            except StopIteration:
                raise DataError("the batches are empty") from None
        t = time.perf_counter()
        record = pruner.step(X, y)
        seconds += time.perf_counter() - t
        records.append(record)
        if on_step is not None:
            on_step(record)
        if s == steps or (eval_every and s % eval_every == 0):
            score(s)
    return PruneResult(records, history, seconds)


def nonzero_density(model: nn.Module, layers: Sequence[str]) -> float:
    """Non-zero weights over all weights of the named Linear/Conv2d modules.

    Raises:
        PruningError: For an unknown module name.
    """
    modules = dict(model.named_modules())
    nonzero = total = 0
    for name in layers:
        if name not in modules:
            raise PruningError(f"unknown layer {name!r}")
        w = modules[name].weight
        nonzero += int(torch.count_nonzero(w))
        total += w.numel()
    return nonzero / total if total else 0.0
