"""The :class:`Pruner`: the initial mask, then one block step at a time.

:meth:`Pruner.step` is DESIGN.md section 1 read top to bottom: pick a layer, pick a
block, the block's gradient and Hessian model, its QUBO, a solve, and a move applied
only if it does not predict a worse loss.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psutil
import torch
from torch import nn

from icbs_opt.backends import Backend, get_backend
from icbs_opt.derivatives import (
    LayerTape,
    LossFn,
    batch_loss,
    block_derivatives,
    input_column_norms,
    layer_gradients,
    record_layers,
    wanda_scores,
)
from icbs_opt.errors import BackendError, PruningError
from icbs_opt.executors import make_executor
from icbs_opt.problems import BlockProblem
from icbs_opt.pruning.qubo import (
    PreparedSolve,
    block_problem,
    block_qubo,
    finish_solve,
    prepare_solve,
    with_constraint,
)
from icbs_opt.pruning.refit import refit as refit_layers
from icbs_opt.pruning.selection import LayerSchedule, select_block, select_groups
from icbs_opt.pruning.sparsegpt import sparsegpt
from icbs_opt.pruning.state import (
    LayerState,
    check_groups,
    freeze,
    keep_top,
    keep_top_nm,
    resolve_layers,
)
from icbs_opt.settings import CONFIG_FIELDS, PruneConfig

logger = logging.getLogger(__name__)

#: Blocks of a pass built and solved together (bounds the problems held at once).
SOLVE_CHUNK = 32


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
        step: 1-based block number of this pruner.
        layer: Qualified name of the layer.
        n: Block size (may be smaller than ``block_size`` for a small layer).
        k: Pruned weights in the block, before and after the step.
        dl: Predicted loss change of the solver's answer (``x^T Q x + const``).
        dl_current: Predicted loss change of keeping the mask (0 up to rounding).
        feasible: Whether the answer had exactly k ones (N:M: each group its
            count).
        accepted: Whether the answer was applied (feasible, ``dl <= dl_current``,
            and different from the current mask).
        flips: Weights whose state the step changed (0 when not accepted).
        pass_number: The pass (step of :func:`prune`) the block belongs to.
        rolled_back: Whether an accepted move was undone by the pass check.
        seconds: Time split; a pass's shared work is split evenly over its blocks.
        solver_info: The backend's ``Solution.info``.
    """

    step: int
    layer: str
    n: int
    k: int
    pass_number: int = 0
    dl: float = 0.0
    dl_current: float = 0.0
    feasible: bool = True
    accepted: bool = False
    flips: int = 0
    rolled_back: bool = False
    seconds: StepSeconds = field(default_factory=StepSeconds)
    solver_info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return dataclasses.asdict(self)


@dataclass
class PassRecord:
    """What one pass (one forward/backward and its blocks) did.

    Attributes:
        number: 1-based pass number of this pruner.
        blocks: One :class:`StepRecord` per block.
        loss_before: Batch loss at the start of the pass (when measured).
        loss_after: Batch loss after the pass's moves (with ``check_pass``).
        rolled_back: Whether the pass check undid the pass's moves.
        seconds: ``record``, ``select``, ``qubo``, ``solve``, ``check``, ``total``.
    """

    number: int
    blocks: list[StepRecord]
    loss_before: float | None = None
    loss_after: float | None = None
    rolled_back: bool = False
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def accepted(self) -> int:
        """Blocks whose move stands."""
        return sum(r.accepted and not r.rolled_back for r in self.blocks)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the blocks' records are listed separately)."""
        return {
            "pass": self.number,
            "blocks": len(self.blocks),
            "accepted": self.accepted,
            "rolled_back": self.rolled_back,
            "loss_before": self.loss_before,
            "loss_after": self.loss_after,
            "seconds": self.seconds,
        }


@dataclass
class _Block:
    """One block of a pass on its way through steps 2-6."""

    L: LayerState
    idx: torch.Tensor  # (n,) flat indices into the weight
    x_cur: torch.Tensor  # (n,) bool, True = pruned now
    record: StepRecord
    problem: BlockProblem | None = None
    const: float = 0.0
    x0: np.ndarray | None = None  # (n,) int8 current mask
    prep: PreparedSolve | None = None
    x: np.ndarray | None = None  # (n,) int8 the solver's answer


class Pruner:
    """Prunes the Linear/Conv2d weights of a model by iCBS block steps.

    The constructor prunes the model in place to the initial mask (pruned weights
    set to exactly 0); each :meth:`step` may then move one block. Masks handed
    out by :meth:`masks` are KEEP masks: ``weight == w0 * mask`` at all times.

    Args:
        model: The model; its weights are changed in place.
        loss_fn: ``loss_fn(model, X, y) -> scalar tensor``, the mean over the
            batch's samples of per-sample losses.
        density: Fraction of weights kept in each pruned layer, in (0, 1); may
            be left out with an N:M ``pattern`` option (it implies ``N / M``).
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
            (``pattern``, ``block_size``, ``k``, ``init``, ``selection``, ...).

    Raises:
        PruningError: For a bad setting, an unknown layer, a layer whose input
            size is not a multiple of an N:M pattern's M, or missing calibration.
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
        self.config = cfg = _make_config(density, config, options)
        self.model, self.loss_fn = model, loss_fn
        self.backend = _make_backend(backend, backend_options)
        self.problem_hook = problem_hook
        self.calibration = calibration
        self.rng = np.random.default_rng(cfg.seed)
        self.steps_done = self.passes_done = 0
        self._check_calibration()
        chosen = resolve_layers(model, layers)
        if cfg.nm is not None:  # every row must split into groups of M
            for name, module in chosen:
                check_groups(name, module, cfg.pattern, cfg.nm[1])
        self._layers = {name: LayerState.of(name, module) for name, module in chosen}
        self._schedule = LayerSchedule(
            self._layers, cfg.schedule, cfg.min_steps_per_layer, self.rng
        )
        self._initial_prune()
        #: Where block problems are solved (see :mod:`icbs_opt.executors`).
        self.executor = make_executor(cfg.executor, workers=cfg.workers)

    @property
    def _mbs(self) -> int | None:
        return self.config.max_batch_size

    def close(self) -> None:
        """Release the executor (a Dask client, for one)."""
        self.executor.close()

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

    def restore_dense(self) -> None:
        """Put the original weights back into every pruned layer.

        The model is then as it was before this Pruner; the Pruner's own masks
        are unchanged, so do not step it again.
        """
        with torch.no_grad():
            for L in self._layers.values():
                L.module.weight.copy_(L.w0.reshape(L.module.weight.shape))

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
        return self.run_pass(X, y, [layer] if layer is not None else None, 1).blocks[0]

    def run_pass(
        self,
        X: Any,
        y: Any,
        layers: Sequence[str] | None = None,
        blocks: int | None = None,
    ) -> PassRecord:
        """One forward/backward pass feeding ``blocks`` block steps (steps 1-6).

        Each block is selected, gets its own QUBO from the pass and its own
        acceptance test, as a single step does; the problems are solved at once.

        Args:
            X: Inputs, samples on dim 0.
            y: Targets, samples on dim 0.
            layers: The layer of each block; None follows the schedule.
            blocks: Blocks in the pass (None: ``blocks_per_step``).

        Returns:
            The pass's record with one :class:`StepRecord` per block. An
            exception leaves the model at the last accepted mask.
        """
        t0 = time.perf_counter()
        number = self.passes_done + 1
        # 1. the layers of the pass, and one forward/backward recording them all
        plan = self._plan_pass(layers, blocks or self.config.blocks_per_step)
        tapes, loss_before = self._record(plan, X, y)
        check = self.config.check_pass or self.config.check_blocks
        if check and loss_before is None:
            loss_before = batch_loss(self.model, self.loss_fn, X, y, self._mbs)
        t1 = time.perf_counter()
        # 2. a block per entry: k currently pruned and n - k kept free weights
        work = self._select_blocks(plan, tapes, X, y, number)
        t2 = time.perf_counter()
        # 3-4. gradient, Hessian model and QUBO; 5. solve; 6. accept each block
        try:
            qubo, solve = self._build_solve_accept(work, tapes, X, y)
            record = PassRecord(number, [b.record for b in work], loss_before)
            if check and record.accepted:
                self._check_pass(record, work, X, y)
        except BaseException:  # KeyboardInterrupt too: never stop half-way
            for b in reversed(work):
                if b.record.accepted:
                    _set_block(b, b.x_cur)
            raise
        for b in work:
            b.L.push_tabu(b.idx)
        self.passes_done, self.steps_done = number, work[-1].record.step
        t5 = time.perf_counter()
        record.seconds = {"record": t1 - t0, "select": t2 - t1, "qubo": qubo,
                          "solve": solve, "check": t5 - t2 - qubo - solve,
                          "total": t5 - t0}  # fmt: skip
        _share_seconds(work, record.seconds)
        return record

    # -------------------------------------------------------------- the pass
    def _build_solve_accept(
        self, work: list[_Block], tapes: dict[str, LayerTape], X: Any, y: Any
    ) -> tuple[float, float]:
        """Steps 3-6, in chunks: a pass of hundreds of blocks holds few problems.

        A layer's tape is freed after its last block.

        Returns:
            Seconds spent building problems and solving them.
        """
        qubo = solve = 0.0
        last = {b.L.name: i for i, b in enumerate(work)}
        for start in range(0, len(work), SOLVE_CHUNK):
            chunk = work[start : start + SOLVE_CHUNK]
            t = time.perf_counter()
            for i, b in enumerate(chunk, start):
                if 0 < b.record.k < b.record.n:  # else nothing can move
                    self._build_problem(b, X, y, tapes.get(b.L.name))
                if last[b.L.name] == i:
                    tapes.pop(b.L.name, None)
            t3 = time.perf_counter()
            self._solve_all(chunk)
            for b in chunk:
                self._accept(b)
                b.problem = b.prep = None  # keep only the record
            qubo, solve = qubo + t3 - t, solve + time.perf_counter() - t3
        return qubo, solve

    def _plan_pass(self, layers: Sequence[str] | None, count: int) -> list[LayerState]:
        """Step 1: the layer of each block, in schedule order.

        Distinct layers while ``count`` does not exceed their number; otherwise
        each layer gets at most ``ceil(count / layers)`` blocks.
        """
        if layers is not None:
            for name in layers:
                if name not in self._layers:
                    names = ", ".join(self._layers)
                    raise PruningError(
                        f"unknown layer {name!r}; this pruner prunes: {names}"
                    )
            return [self._layers[name] for name in layers]
        cap = math.ceil(count / len(self._layers))
        taken: collections.Counter = collections.Counter()
        plan = []
        while len(plan) < count:
            name = self._schedule.next()
            if taken[name] < cap:
                taken[name] += 1
                plan.append(self._layers[name])
        return plan

    def _record(
        self, plan: list[LayerState], X: Any, y: Any
    ) -> tuple[dict[str, LayerTape], float | None]:
        """The pass's forward/backward: layer inputs and output gradients.

        Recorded when the per-sample Fisher needs them and they serve more than
        one use (gradient selection, or several blocks); otherwise each block
        runs its own derivatives as a single step does.
        """
        cfg = self.config
        if cfg.hessian != "gradient_per_sample" or (
            cfg.selection != "gradient" and len(plan) == 1
        ):
            return {}, None
        modules = list({id(L.module): L.module for L in plan}.values())
        names = {id(L.module): L.name for L in plan}
        tapes, loss = record_layers(
            self.model,
            self.loss_fn,
            X,
            y,
            modules,
            max_batch_size=cfg.max_batch_size,
            dtype=getattr(torch, cfg.tape_dtype),
            memory_limit=int(0.9 * psutil.virtual_memory().available),
        )
        return {names[id(t.module)]: t for t in tapes}, loss

    def _select_blocks(
        self,
        plan: list[LayerState],
        tapes: dict[str, LayerTape],
        X: Any,
        y: Any,
        number: int,
    ) -> list[_Block]:
        """Step 2 for every block; blocks in one layer are disjoint."""
        cfg, work = self.config, []
        taken: dict[str, torch.Tensor] = {}
        scores: dict[str, torch.Tensor] = {}
        left = collections.Counter(L.name for L in plan)
        for i, L in enumerate(plan):

            def layer_scores(L: LayerState = L) -> torch.Tensor:
                if L.name not in scores:  # once per layer and pass
                    scores[L.name] = self._selection_scores(L, X, y, tapes.get(L.name))
                return scores[L.name]

            if cfg.nm is None:
                idx = select_block(
                    L, layer_scores, cfg.block_size, cfg.k, taken.get(L.name)
                )
            else:  # whole groups of M
                idx = select_groups(
                    L, layer_scores, cfg.block_size, cfg.nm[1], taken.get(L.name)
                )
            left[L.name] -= 1
            if left[L.name]:  # more blocks of this layer follow: keep them apart
                taken.setdefault(L.name, torch.zeros_like(L.pruned))[idx] = True
            else:  # the layer's last block of the pass
                scores.pop(L.name, None)
            x_cur = L.pruned[idx]  # (n,) bool, True = pruned now
            step = self.steps_done + i + 1
            record = StepRecord(step, L.name, idx.numel(), int(x_cur.sum()), number)
            work.append(_Block(L, idx, x_cur, record))
        return work

    def _build_problem(self, b: _Block, X: Any, y: Any, tape: LayerTape | None) -> None:
        """Steps 3-4: ``dL(x) = x^T Q x + const`` subject to ``sum(x) = k``.

        With pattern N:M the constraint is one count per group of the block.
        """
        cfg, sec = self.config, b.record.seconds
        g, H, sec.gradient, sec.hessian = block_derivatives(
            self.model,
            self.loss_fn,
            X,
            y,
            b.L.module,
            b.idx,
            cfg.hessian,
            max_batch_size=cfg.max_batch_size,
            chunk_size=cfg.hessian_chunk_size,
            tape=tape,
        )  # g (n,), H (n, n)
        t = time.perf_counter()
        r_B = b.L.keep_values[b.idx]  # (n,) values if kept ("Restore values")
        w_B = torch.where(b.x_cur, torch.zeros_like(r_B), r_B)  # (n,)
        Q, b.const = block_qubo(
            r_B, w_B, g, H, cfg.grad_multiplier, cfg.ridge_multiplier
        )
        b.x0 = b.x_cur.cpu().numpy().astype(np.int8)  # (n,) current mask, feasible
        group_of = None if cfg.nm is None else b.idx // cfg.nm[1]  # (n,)
        b.problem = block_problem(Q, b.x_cur, group_of)
        if self.problem_hook is not None:
            self.problem_hook(_with_meta(b.problem, b.record, b.x0, b.const))
        sec.q_build = time.perf_counter() - t

    def _solve_all(self, work: list[_Block]) -> None:
        """Step 5: scale, warm-start and solve every block problem at once."""
        todo = [b for b in work if b.problem is not None]
        for b in todo:
            b.prep = prepare_solve(
                b.problem,  # type: ignore[arg-type]
                b.x0,  # type: ignore[arg-type]
                self.rng,
                remove_zero_rows=self.config.remove_zero_rows,
            )
        asked = [b for b in todo if b.prep.scaled is not None]  # type: ignore[union-attr]
        preps = [b.prep for b in asked]
        solutions = self.executor.solve_many(
            self.backend,
            [p.scaled for p in preps],  # type: ignore[union-attr]
            [p.seed for p in preps],  # type: ignore[union-attr]
            [p.warm for p in preps],  # type: ignore[union-attr]
        )
        answers = dict(zip(map(id, asked), solutions, strict=True))
        for b in todo:
            r = b.record
            b.x, r.feasible, r.solver_info = finish_solve(
                b.prep,
                b.problem,
                answers.get(id(b)),  # type: ignore[arg-type]
            )
            r.dl = b.problem.energy(b.x) + b.const  # type: ignore[union-attr]
            r.dl_current = b.problem.energy(b.x0) + b.const  # type: ignore[union-attr]

    def _accept(self, b: _Block) -> None:
        """Step 6: apply a feasible move that is not predicted worse."""
        if b.x is None:
            return
        r = b.record
        new = _pruned_mask(b)
        flips = int((new != b.x_cur).sum())
        if r.feasible and r.dl <= r.dl_current and flips:
            _set_block(b, new)
            r.accepted, r.flips = True, flips

    def _check_pass(
        self, record: PassRecord, work: list[_Block], X: Any, y: Any
    ) -> None:
        """Undo the pass's moves (or each block's) that raised the batch loss."""
        moved = [b for b in work if b.record.accepted]
        if self.config.check_blocks:  # replay the moves one at a time
            for b in reversed(moved):
                _set_block(b, b.x_cur)
            best = record.loss_before
            for b in moved:
                _set_block(b, _pruned_mask(b))
                loss = batch_loss(self.model, self.loss_fn, X, y, self._mbs)
                if loss > best:  # type: ignore[operator]
                    _set_block(b, b.x_cur)
                    b.record.rolled_back = True
                else:
                    best = loss
            record.loss_after = best
            record.rolled_back = all(b.record.rolled_back for b in moved)
            return
        record.loss_after = batch_loss(self.model, self.loss_fn, X, y, self._mbs)
        if record.loss_after <= record.loss_before:  # type: ignore[operator]
            return
        for b in reversed(moved):
            _set_block(b, b.x_cur)
            b.record.rolled_back = True
        record.rolled_back = True

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
                self.model, self.loss_fn, X, y, [L.module], max_batch_size=self._mbs
            )
        return (L.w0 * grad.reshape(-1)).abs().to(torch.float64)

    # ----------------------------------------------------------- initial mask
    def _check_calibration(self) -> None:
        cfg = self.config
        if self.calibration is not None:
            return
        if cfg.init_method in ("wanda", "gradient", "sparsegpt"):
            raise PruningError(
                f"init {cfg.init!r} needs calibration data: pass calibration=(X, y)"
            )
        if cfg.refit or cfg.refit_every:
            raise PruningError("refit needs calibration data: pass calibration=(X, y)")
        if cfg.selection == "wanda":
            raise PruningError(
                "selection 'wanda' needs calibration data: pass calibration=(X, y)"
            )

    def _initial_prune(self) -> None:
        """Score every weight, keep the top ``density``, freeze, set up tabu.

        With pattern N:M each group keeps its top N. ``sparsegpt`` instead takes
        SparseGPT's masks, and its updated kept weights become their
        ``keep_values``.
        """
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
        masks = [None] * len(mods)
        if cfg.init_method == "sparsegpt":  # masks, saliencies, updated weights
            done = sparsegpt(
                self.model,
                self.loss_fn,
                X,
                y,
                mods,
                cfg.density,
                pattern=cfg.nm,
                max_batch_size=mbs,
            )
            masks, grads = [m for m, _ in done], [s for _, s in done]
        layers = zip(self._layers.values(), norms, grads, masks, strict=True)
        for L, norm, grad, mask in layers:
            s = self._init_scores(cfg.init_method, L, norm, grad)  # (numel,)
            if mask is None and cfg.nm is not None:
                keep = keep_top_nm(s, *cfg.nm)
            elif mask is None:
                shape = L.module.weight.shape
                keep = keep_top(s, shape, cfg.density, cfg.init_grouping)
            else:  # SparseGPT's mask; its kept weights' new values are restored
                keep = mask.reshape(-1)
                w = L.module.weight.detach().reshape(-1)
                L.keep_values = torch.where(keep, w, L.w0)
            L.pruned = ~keep
            L.frozen = freeze(s, keep, cfg.fix_frac_prune, cfg.fix_frac_keep)
            if cfg.selection == "wanda":  # static; magnitude is read from w0
                L.static_scores = self._init_scores("wanda", L, norm, None).float()
            L.setup_tabu(cfg.tabu_frac, cfg.block_size)
            L.write(torch.arange(L.numel, device=L.w0.device))
        logger.info(
            "initial %s pruning to density %.4f (%s) of %d layers",
            cfg.init,
            self.density(),
            cfg.pattern,
            len(self._layers),
        )

    def _init_scores(
        self,
        method: str,
        L: LayerState,
        norms: torch.Tensor | None,
        grad: torch.Tensor | None,
    ) -> torch.Tensor:
        """Flat float64 scores of the layer's weights for ``method``.

        ``grad`` is the layer's loss gradient for ``gradient`` and its SparseGPT
        saliency (``w^2 / [H^-1]_jj`` when its mask was chosen) for ``sparsegpt``.
        """
        if method == "sparsegpt":
            return grad.reshape(-1).to(torch.float64)  # type: ignore[union-attr]
        if method == "magnitude":
            s = L.w0.abs()
        elif method == "wanda":
            s = wanda_scores(L.module, norms).reshape(-1)  # type: ignore[arg-type]
        elif method == "gradient":
            s = (L.w0 * grad.reshape(-1)).abs()  # type: ignore[union-attr]
        else:
            s = torch.from_numpy(self.rng.random(L.numel)).to(L.w0.device)
        return s.to(torch.float64)

    # ------------------------------------------------- weight reconstruction
    def refit(self) -> float:
        """Refit the kept weights of every layer with the masks fixed (DESIGN 1b).

        Each layer's kept weights become the least-squares reconstruction of
        the ORIGINAL layer's outputs on the calibration batch (inputs from the
        model with the earlier layers already refit; see
        :mod:`icbs_opt.pruning.refit`). ``keep_values`` then holds the refit
        values of kept weights, and pruned weights keep theirs, so the block
        QUBO stays exact: ``dL(x_cur) = 0``.

        Returns:
            Seconds spent.

        Raises:
            PruningError: If the pruner has no calibration data.
        """
        if self.calibration is None:
            raise PruningError("refit needs calibration data: pass calibration=(X, y)")
        X, y = self.calibration
        layers = list(self._layers.values())
        targets = {L.module: (~L.pruned, L.w0) for L in layers}
        try:
            seconds = refit_layers(
                self.model,
                self.loss_fn,
                X,
                y,
                targets,
                target=self.config.refit_target,
                solver=self.config.refit_solver,
                max_batch_size=self._mbs,
            )
        except BaseException:  # KeyboardInterrupt too: back to the values before
            for L in layers:
                L.write(torch.arange(L.numel, device=L.w0.device))
            raise
        for L in layers:
            w = L.module.weight.detach().reshape(-1)
            L.keep_values = torch.where(L.pruned, L.keep_values, w)
        return seconds

    # ------------------------------------------- checkpoint state (issue 13)
    def state_dict(self, *, layers: bool = True) -> dict[str, Any]:
        """What a checkpoint needs to continue this pruner exactly.

        Counters, the numpy and torch random states, the layer schedule, and
        each layer's mask, tabu FIFO and (once they differ from ``w0``: refit,
        sparsegpt) kept values, as copies. ``w0``, the frozen sets and static
        scores are not included: a Pruner built with the same model and config
        derives them again. ``layers=False`` leaves the layers out (a cheap
        snapshot of the random states and counters).
        """
        state = {
            "steps_done": self.steps_done,
            "passes_done": self.passes_done,
            "rng": self.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "schedule": self._schedule.state_dict(),
        }
        if not layers:
            return state
        values = self.reconstructed_values()
        state["layers"] = {}
        for name, L in self._layers.items():
            tabu = [t.clone() for t in L.tabu]
            state["layers"][name] = {"pruned": L.pruned.clone(), "tabu": tabu}
            if name in values:
                state["layers"][name]["keep_values"] = values[name]
        return state

    def reconstructed_values(self) -> dict[str, torch.Tensor]:
        """Copies of the kept weights' values where they differ from ``w0``.

        By layer name; layers whose kept weights still have their original
        values (no refit, no SparseGPT init) are left out.
        """
        return {
            name: L.keep_values.clone()
            for name, L in self._layers.items()
            if L.keep_values is not L.w0
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`; the model is set to its masks.

        Raises:
            PruningError: If the layers differ, a saved mask moves a frozen
                weight or breaks the N:M pattern (the checkpoint is of another
                model or config).
        """
        if "layers" in state:
            self._load_layers(state["layers"])
        self.steps_done, self.passes_done = state["steps_done"], state["passes_done"]
        self.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        self._schedule.load_state_dict(state["schedule"])

    def _load_layers(self, saved: Mapping[str, Any]) -> None:
        """Masks, tabu FIFOs and kept values of :meth:`state_dict`, checked first."""
        if sorted(saved) != sorted(self._layers):
            raise PruningError(
                f"the checkpoint prunes layers {sorted(saved)}, this pruner "
                f"{sorted(self._layers)}"
            )
        for name, L in self._layers.items():  # check all before changing any
            pruned = saved[name]["pruned"].to(L.pruned.device)
            if not torch.equal(pruned[L.frozen], L.pruned[L.frozen]):
                raise PruningError(
                    f"the checkpoint's mask of layer {name!r} moves frozen weights"
                )
            nm = self.config.nm
            if nm is not None and torch.any(
                (~pruned).reshape(-1, nm[1]).sum(1) != nm[0]
            ):
                raise PruningError(
                    f"the checkpoint's mask of layer {name!r} is not "
                    f"{self.config.pattern} in every group"
                )
        for name, L in self._layers.items():
            L.pruned = saved[name]["pruned"].to(L.pruned.device).clone()
            if "keep_values" in saved[name]:
                L.keep_values = saved[name]["keep_values"].to(L.w0).clone()
            L.tabu = collections.deque(t.to(L.w0.device) for t in saved[name]["tabu"])
            L.write(torch.arange(L.numel, device=L.w0.device))


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


def _pruned_mask(b: _Block) -> torch.Tensor:
    """``(n,)`` bool: the solver's answer for the block, True = pruned."""
    return torch.from_numpy(b.x.astype(bool)).to(b.idx.device)  # type: ignore[union-attr]


def _set_block(b: _Block, pruned: torch.Tensor) -> None:
    """Give the block's weights the state ``pruned`` in the mask and the model."""
    b.L.pruned[b.idx] = pruned
    b.L.write(b.idx)


def _share_seconds(work: list[_Block], seconds: dict[str, float]) -> None:
    """Give each block an even share of the pass's recording and solving time."""
    for b in work:
        sec = b.record.seconds
        sec.forward_backward = seconds["record"] / len(work)
        sec.select = seconds["select"] / len(work)
        sec.solve = seconds["solve"] / len(work)
        sec.total = seconds["total"] / len(work)


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
    return with_constraint(problem, problem.Q, meta=meta)
