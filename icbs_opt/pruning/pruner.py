"""The :class:`Pruner`: the state of a pruning run and the orchestration of a pass.

The constructor prunes to the initial mask (:mod:`icbs_opt.pruning.init`);
:meth:`Pruner.run_pass` is DESIGN.md section 1 read top to bottom: the layers of
the pass and one forward/backward recording them, then the block pipeline of
:mod:`icbs_opt.pruning.step` (select, model, solve, accept), then the optional
pass check. The pruner owns the masks, the random state and the counters.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
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
    layer_gradients,
    record_layers,
)
from icbs_opt.errors import BackendError, PruningError
from icbs_opt.executors import make_executor, one_blas_thread, torch_threads
from icbs_opt.problems import BlockProblem
from icbs_opt.pruning.init import initial_prune
from icbs_opt.pruning.refit import refit as refit_layers
from icbs_opt.pruning.scores import ScoreInputs, weight_scores
from icbs_opt.pruning.selection import LayerSchedule
from icbs_opt.pruning.state import LayerState, check_groups, load_layers, resolve_layers
from icbs_opt.pruning.step import (
    Block,
    BlockModel,
    PassRecord,
    StepRecord,
    StepSeconds,
    accept,
    answer_mask,
    block_model,
    check_moves,
    prepare_solves,
    select_blocks,
    set_block,
    share_seconds,
    solve_prepared,
    with_meta,
)
from icbs_opt.settings import CONFIG_FIELDS, PruneConfig

__all__ = ["PassRecord", "Pruner", "StepRecord", "StepSeconds"]

logger = logging.getLogger(__name__)

#: Blocks of a pass built and solved together (bounds the problems held at once).
SOLVE_CHUNK = 32


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
        initial_prune(
            model, loss_fn, list(self._layers.values()), cfg, calibration, self.rng
        )
        logger.info(
            "initial %s pruning to density %.4f (%s) of %d layers",
            cfg.init,
            self.density(),
            cfg.pattern,
            len(self._layers),
        )
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
        work = select_blocks(
            plan,
            lambda L: self._selection_scores(L, X, y, tapes.get(L.name)),
            self.config,
            self.steps_done + 1,
            number,
        )
        t2 = time.perf_counter()
        # 3-4. gradient, Hessian model and QUBO; 5. solve; 6. accept each block
        moves: dict[int, torch.Tensor] = {}  # block index -> its accepted mask
        try:
            qubo, solve = self._model_solve_accept(work, tapes, X, y, moves)
            record = PassRecord(number, [b.record for b in work], loss_before)
            if check and record.accepted:
                check_moves(
                    record,
                    work,
                    moves,
                    lambda: batch_loss(self.model, self.loss_fn, X, y, self._mbs),
                    one_by_one=self.config.check_blocks,
                )
        except BaseException:  # KeyboardInterrupt too: never stop half-way
            for i in sorted(moves, reverse=True):
                set_block(work[i], work[i].x_cur)
            raise
        for b in work:
            b.layer.push_tabu(b.idx)
        self.passes_done, self.steps_done = number, work[-1].record.step
        t5 = time.perf_counter()
        record.seconds = {"record": t1 - t0, "select": t2 - t1, "qubo": qubo,
                          "solve": solve, "check": t5 - t2 - qubo - solve,
                          "total": t5 - t0}  # fmt: skip
        share_seconds(work, record.seconds)
        return record

    # -------------------------------------------------------------- the pass
    def _model_solve_accept(
        self,
        work: list[Block],
        tapes: dict[str, LayerTape],
        X: Any,
        y: Any,
        moves: dict[int, torch.Tensor],
    ) -> tuple[float, float]:
        """Steps 3-6 in chunks of :data:`SOLVE_CHUNK` blocks.

        A pass of hundreds of blocks holds few problems at once, and a layer's
        tape is freed after its last block. When every block's derivatives come
        from a tape (so they do not depend on the moves), a chunk's problems are
        built while the previous chunk is solved, on one torch thread and one
        numpy BLAS thread: the other cores are the solver's.

        Returns:
            Seconds spent building problems, and solving them (not overlapped).
        """
        last = {b.layer.name: i for i, b in enumerate(work)}
        overlap = all(b.layer.name in tapes for b in work if b.can_move)
        seconds = {"qubo": 0.0, "solve": 0.0}
        pending: tuple[list[tuple[int, BlockModel]], Future] | None = None
        solves = ThreadPoolExecutor(1, thread_name_prefix="icbs-solve")
        threads = torch_threads(1 if overlap else None)
        with solves as pool, one_blas_thread(), threads:
            try:
                for start in range(0, len(work), SOLVE_CHUNK):
                    t = time.perf_counter()
                    models = []
                    for i in range(start, min(start + SOLVE_CHUNK, len(work))):
                        if work[i].can_move:  # else nothing can move
                            models.append((i, self._block_model(work[i], X, y, tapes)))
                        if last[work[i].layer.name] == i:
                            tapes.pop(work[i].layer.name, None)
                    seconds["qubo"] += time.perf_counter() - t
                    if pending is not None:
                        self._accept_chunk(work, *pending, moves, seconds)
                    chunk = [m for _, m in models]
                    preps = prepare_solves(
                        chunk, self.rng, self.config.remove_zero_rows
                    )
                    solving = pool.submit(
                        solve_prepared, chunk, preps, self.executor, self.backend
                    )
                    pending = (models, solving)
                    if not overlap:
                        self._accept_chunk(work, *pending, moves, seconds)
                        pending = None
                if pending is not None:
                    self._accept_chunk(work, *pending, moves, seconds)
            except BaseException:
                if pending is not None:  # let the running solves end first
                    wait([pending[1]])
                raise
        return seconds["qubo"], seconds["solve"]

    def _block_model(
        self, b: Block, X: Any, y: Any, tapes: dict[str, LayerTape]
    ) -> BlockModel:
        model = block_model(
            b, self.config, self.model, self.loss_fn, X, y, tapes.get(b.layer.name)
        )
        if self.problem_hook is not None:
            self.problem_hook(with_meta(model))
        return model

    def _accept_chunk(
        self,
        work: list[Block],
        models: list[tuple[int, BlockModel]],
        future: Future,
        moves: dict[int, torch.Tensor],
        seconds: dict[str, float],
    ) -> None:
        """Step 6 for a chunk once ``future`` has its answers."""
        t = time.perf_counter()
        answers = future.result()
        seconds["solve"] += time.perf_counter() - t
        for (i, _), answer in zip(models, answers, strict=True):
            if accept(work[i], answer):
                moves[i] = answer_mask(work[i], answer)

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

    def _selection_scores(
        self, L: LayerState, X: Any, y: Any, tape: LayerTape | None
    ) -> torch.Tensor:
        """``(numel,)`` scores of step 2: high = likelier to be wrongly pruned."""
        method = self.config.selection
        if method == "wanda":  # static, from the initial pruning
            return L.static_scores.to(torch.float64)  # type: ignore[union-attr]
        grad = None
        if method == "gradient" and tape is not None:
            grad = tape.gradient()
        elif method == "gradient":
            (grad,) = layer_gradients(
                self.model, self.loss_fn, X, y, [L.module], max_batch_size=self._mbs
            )
        return weight_scores(method, L, ScoreInputs(self.rng, grad=grad))

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
            load_layers(self._layers, state["layers"], self.config)
        self.steps_done, self.passes_done = state["steps_done"], state["passes_done"]
        self.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        self._schedule.load_state_dict(state["schedule"])


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
