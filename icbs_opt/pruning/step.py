"""The block step (DESIGN.md section 1, steps 2-6) as a pipeline of plain functions.

A pass works on a list of :class:`Block`; each stage returns new immutable values:

    select_blocks -> block_model -> prepare_solves, solve_prepared -> accept

1. (the pruner) the layer of each block, and one forward/backward recording them;
2. :func:`select_blocks`: k currently pruned and n - k kept free weights per block;
3-4. :func:`block_model`: the block's gradient ``g``, Hessian model ``H`` and its
   QUBO ``dL(x) = x^T Q x + const`` subject to the block's pruned count(s);
5. :func:`prepare_solves`, :func:`solve_prepared`: scale, warm-start at the
   current mask, solve them all;
6. :func:`accept`: apply an answer that is feasible, differs from the current
   mask and is not predicted worse than it.

The stages change nothing but :func:`accept` (and :func:`set_block`), which write
a block's mask into its layer and the model.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from icbs_opt.backends import Backend
from icbs_opt.derivatives import LayerTape, LossFn, block_derivatives
from icbs_opt.executors import Executor
from icbs_opt.problems import BlockProblem
from icbs_opt.pruning.qubo import (
    PreparedSolve,
    block_problem,
    block_qubo,
    finish_solve,
    prepare_solve,
    with_constraint,
)
from icbs_opt.pruning.selection import select_block, select_groups
from icbs_opt.pruning.state import LayerState
from icbs_opt.settings import PruneConfig


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


@dataclass(frozen=True)
class Block:
    """A block of one layer: where a step works (step 2's result).

    Attributes:
        layer: The layer's state.
        idx: ``(n,)`` sorted flat indices into the weight.
        x_cur: ``(n,)`` bool, the block's mask when selected (True = pruned).
        record: The step's record, filled in as the block goes through the pass.
    """

    layer: LayerState
    idx: torch.Tensor
    x_cur: torch.Tensor
    record: StepRecord

    @property
    def can_move(self) -> bool:
        """Whether the block holds both a pruned and a kept weight."""
        return 0 < self.record.k < self.record.n


@dataclass(frozen=True)
class BlockModel:
    """Steps 3-4 for a block: ``dL(x) = problem.energy(x) + const``.

    Attributes:
        block: The block.
        problem: ``Q`` with the block's pruned count(s) as constraint.
        const: The constant of the loss model.
        x0: ``(n,)`` int8 current mask (a feasible point).
    """

    block: Block
    problem: BlockProblem
    const: float
    x0: np.ndarray


@dataclass(frozen=True)
class Answer:
    """Step 5 for a block: the solver's answer on the whole block.

    Attributes:
        x: ``(n,)`` int8, 1 = pruned.
        feasible: Whether it keeps the block's pruned count(s).
        dl: Predicted loss change of ``x``.
        dl_current: Predicted loss change of the current mask.
        info: The backend's ``Solution.info``.
    """

    x: np.ndarray
    feasible: bool
    dl: float
    dl_current: float
    info: dict[str, Any]


# ------------------------------------------------------------------ step 2
def select_blocks(
    plan: Sequence[LayerState],
    scores: Callable[[LayerState], torch.Tensor],
    config: PruneConfig,
    first_step: int,
    pass_number: int,
) -> list[Block]:
    """Step 2 for every entry of ``plan``; blocks of one layer are disjoint.

    Args:
        plan: The layer of each block, in order.
        scores: ``(numel,)`` selection scores of a layer, asked at most once
            per layer (and not when a layer's free weights fit in one block).
        config: The settings (``block_size``, ``k``, ``pattern``).
        first_step: The step number of the first block.
        pass_number: The pass the blocks belong to.
    """
    taken: dict[str, torch.Tensor] = {}
    cache: dict[str, torch.Tensor] = {}
    left = collections.Counter(L.name for L in plan)
    blocks = []
    for i, L in enumerate(plan):

        def layer_scores(L: LayerState = L) -> torch.Tensor:
            if L.name not in cache:
                cache[L.name] = scores(L)
            return cache[L.name]

        exclude = taken.get(L.name)
        if config.nm is None:
            idx = select_block(L, layer_scores, config.block_size, config.k, exclude)
        else:  # whole groups of M
            m = config.nm[1]
            idx = select_groups(L, layer_scores, config.block_size, m, exclude)
        left[L.name] -= 1
        if left[L.name]:  # more blocks of this layer follow: keep them apart
            taken.setdefault(L.name, torch.zeros_like(L.pruned))[idx] = True
        else:
            cache.pop(L.name, None)
        x_cur = L.pruned[idx]
        record = StepRecord(
            first_step + i, L.name, idx.numel(), int(x_cur.sum()), pass_number
        )
        blocks.append(Block(L, idx, x_cur, record))
    return blocks


# -------------------------------------------------------------- steps 3-4
def block_model(
    block: Block,
    config: PruneConfig,
    model: torch.nn.Module,
    loss_fn: LossFn,
    X: Any,
    y: Any,
    tape: LayerTape | None,
) -> BlockModel:
    """Steps 3-4: the block's loss model as a constrained QUBO.

    With pattern N:M the constraint is one count per group of the block.
    """
    b, sec = block, block.record.seconds
    low_rank = config.hessian.startswith("gradient")  # H = F^T F, never formed
    g, H, sec.gradient, sec.hessian = block_derivatives(
        model,
        loss_fn,
        X,
        y,
        b.layer.module,
        b.idx,
        config.hessian,
        max_batch_size=config.max_batch_size,
        chunk_size=config.hessian_chunk_size,
        tape=tape,
        factor=low_rank,
    )  # g (n,), H (n, n) or its factor F (m, n)
    t = time.perf_counter()
    r = b.layer.keep_values[b.idx]  # (n,) values if kept ("Restore values")
    w = torch.where(b.x_cur, torch.zeros_like(r), r)  # (n,) current values
    lam_g, lam_r = config.grad_multiplier, config.ridge_multiplier
    if low_rank:
        Q, const = block_qubo(r, w, g, None, lam_g, lam_r, factor=H)
    else:
        Q, const = block_qubo(r, w, g, H, lam_g, lam_r)
    group_of = None if config.nm is None else b.idx // config.nm[1]  # (n,)
    problem = block_problem(Q, b.x_cur, group_of)
    x0 = b.x_cur.cpu().numpy().astype(np.int8)
    sec.q_build = time.perf_counter() - t
    return BlockModel(b, problem, const, x0)


def with_meta(m: BlockModel) -> BlockProblem:
    """The UNSCALED problem with the meta a ``problem_hook`` receives.

    ``layer``, ``step``, ``x_cur`` (the block's mask, 1 = pruned), ``scale``
    (the factor ``problem.scaled()`` applies) and ``const``.
    """
    _, scale = m.problem.scaled()
    meta = {
        "layer": m.block.record.layer,
        "step": m.block.record.step,
        "x_cur": m.x0,
        "scale": scale,
        "const": m.const,
    }
    return with_constraint(m.problem, m.problem.Q, meta=meta)


# ------------------------------------------------------------------ step 5
def prepare_solves(
    models: Sequence[BlockModel], rng: np.random.Generator, remove_zero_rows: bool
) -> list[PreparedSolve]:
    """Step 5's preparation: scale each problem and warm-start it at ``x0``.

    Seeds are drawn from ``rng`` in order, one per problem left to a backend.
    """
    return [
        prepare_solve(m.problem, m.x0, rng, remove_zero_rows=remove_zero_rows)
        for m in models
    ]


def solve_prepared(
    models: Sequence[BlockModel],
    preps: Sequence[PreparedSolve],
    executor: Executor,
    backend: Backend,
) -> list[Answer]:
    """Step 5: solve the prepared problems at once; one answer per model."""
    asked = [i for i, p in enumerate(preps) if p.scaled is not None]
    solutions = executor.solve_many(
        backend,
        [preps[i].scaled for i in asked],  # type: ignore[misc]
        [preps[i].seed for i in asked],
        [preps[i].warm for i in asked],
    )
    by_model = dict(zip(asked, solutions, strict=True))
    answers = []
    for i, (m, prep) in enumerate(zip(models, preps, strict=True)):
        x, feasible, info = finish_solve(prep, m.problem, by_model.get(i))
        dl = m.problem.energy(x) + m.const
        dl_current = m.problem.energy(m.x0) + m.const
        answers.append(Answer(x, feasible, dl, dl_current, info))
    return answers


# ------------------------------------------------------------------ step 6
def accept(block: Block, answer: Answer) -> bool:
    """Step 6: apply a feasible move that is not predicted worse; record it."""
    r = block.record
    r.feasible, r.solver_info = answer.feasible, answer.info
    r.dl, r.dl_current = answer.dl, answer.dl_current
    new = answer_mask(block, answer)
    flips = int((new != block.x_cur).sum())
    if answer.feasible and answer.dl <= answer.dl_current and flips:
        set_block(block, new)
        r.accepted, r.flips = True, flips
    return r.accepted


def answer_mask(block: Block, answer: Answer) -> torch.Tensor:
    """``(n,)`` bool: the answer for the block, True = pruned."""
    return torch.from_numpy(answer.x.astype(bool)).to(block.idx.device)


def set_block(block: Block, pruned: torch.Tensor) -> None:
    """Give the block's weights the state ``pruned`` in the mask and the model."""
    block.layer.pruned[block.idx] = pruned
    block.layer.write(block.idx)


def check_moves(
    record: PassRecord,
    work: Sequence[Block],
    moves: dict[int, torch.Tensor],
    loss: Callable[[], float],
    *,
    one_by_one: bool = False,
) -> None:
    """Undo the pass's moves that raised the batch loss ``loss()``.

    ``moves`` maps a block's index in ``work`` to its applied mask. All moves
    stand or fall together, or with ``one_by_one`` each is replayed in order and
    kept only if the loss does not rise.
    """
    moved = sorted(moves)
    if one_by_one:
        for i in reversed(moved):
            set_block(work[i], work[i].x_cur)
        best = record.loss_before
        for i in moved:
            set_block(work[i], moves[i])
            now = loss()
            if now > best:  # type: ignore[operator]
                set_block(work[i], work[i].x_cur)
                work[i].record.rolled_back = True
            else:
                best = now
        record.loss_after = best
        record.rolled_back = all(work[i].record.rolled_back for i in moved)
        return
    record.loss_after = loss()
    if record.loss_after <= record.loss_before:  # type: ignore[operator]
        return
    for i in reversed(moved):
        set_block(work[i], work[i].x_cur)
        work[i].record.rolled_back = True
    record.rolled_back = True


def share_seconds(work: list[Block], seconds: dict[str, float]) -> None:
    """Give each block an even share of the pass's recording and solving time."""
    for b in work:
        sec = b.record.seconds
        sec.forward_backward = seconds["record"] / len(work)
        sec.select = seconds["select"] / len(work)
        sec.solve = seconds["solve"] / len(work)
        sec.total = seconds["total"] / len(work)
