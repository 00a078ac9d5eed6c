"""The pruning loop: one batch per block step, evaluations along the way."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from icbs_opt.checks import check_int
from icbs_opt.errors import DataError, ExecutorUnavailable, PruningError
from icbs_opt.pruning.pruner import PassRecord, Pruner, StepRecord
from icbs_opt.pruning.state import nm_violations
from icbs_opt.settings import UNSTRUCTURED, parse_pattern

logger = logging.getLogger(__name__)

#: The N:M patterns :func:`sparsity_pattern` looks for, finest first (a 2:4
#: model is 4:8 too).
KNOWN_PATTERNS = ("2:4", "4:8")


@dataclass
class PruneResult:
    """Outcome of :func:`prune`.

    Attributes:
        records: One :class:`StepRecord` per block.
        history: ``{step, metric, loss, seconds}`` per evaluation (step 0 is the
            initial mask), with ``val_metric`` and ``val_loss`` when validating;
            ``seconds`` is pruning time so far, evaluations excluded.
        seconds: Total pruning time (evaluations excluded).
        passes: One :class:`PassRecord` per step (a pass of one or more blocks).
        stopped: Why the run ended before its last step (the reason ``stop``
            gave, or ``"interrupted"``), None if it ran every step.
        abandoned: Whether a KeyboardInterrupt abandoned a step (its moves were
            undone and the pruner's state is that of the step before).
        best: The history point of the best validation score (with ``validate``).
        best_masks: Keep masks of that point, ``{layer: bool tensor}``.
        best_values: The kept weights' values at that point, by layer, when
            they differ from the original weights (refit, sparsegpt), else None.
    """

    records: list[StepRecord]
    history: list[dict[str, float]]
    seconds: float
    passes: list[PassRecord] = field(default_factory=list)
    stopped: str | None = None
    abandoned: bool = False
    best: dict[str, float] | None = None
    best_masks: dict[str, torch.Tensor] | None = None
    best_values: dict[str, torch.Tensor] | None = None

    @property
    def accepted(self) -> int:
        """Number of blocks whose move stands."""
        return sum(r.accepted and not r.rolled_back for r in self.records)

    @property
    def steps_done(self) -> int:
        """Steps (passes) run so far."""
        return len(self.passes)


Scorer = Callable[[nn.Module], Mapping[str, float]]


def prune(
    pruner: Pruner,
    batches: Iterable[tuple[Any, Any]],
    steps: int,
    *,
    evaluate: Scorer | None = None,
    eval_every: int = 0,
    on_step: Callable[[StepRecord], None] | None = None,
    on_pass: Callable[[PassRecord], None] | None = None,
    validate: Scorer | None = None,
    higher_is_better: bool = True,
    stop: Callable[[], str | None] | None = None,
    checkpoint: Callable[[PruneResult], None] | None = None,
    checkpoint_every: int = 0,
    resume: PruneResult | None = None,
) -> PruneResult:
    """Run ``steps`` steps, one batch each: a pass of ``blocks_per_step`` blocks.

    The pruner's config may ask for refits of the kept weights
    (:meth:`Pruner.refit`): every ``refit_every`` steps and, with ``refit``,
    after the last step (before its evaluation; with ``steps=0``, before the
    only one). Their time counts as pruning time.

    Args:
        pruner: The pruner.
        batches: ``(X, y)`` batches. An iterator must last ``steps`` batches; a
            re-iterable (a list, a DataLoader) is restarted when it runs out.
        steps: Number of steps (passes), >= 0.
        evaluate: ``evaluate(model) -> {"metric": ..., "loss": ...}``, called
            before the first step, every ``eval_every`` steps and after the last.
        eval_every: Evaluation period in steps (0: only before and after).
        on_step: Called with each block's record.
        on_pass: Called with each pass's record (a progress bar, say).
        validate: Like ``evaluate``, on held-out data, at the same points; the
            best point and its masks are kept (see :func:`restore_best`).
        higher_is_better: Whether a larger validation metric is better.
        stop: Called after each step; a reason (a string) ends the run there
            (no evaluation is added: the history of a stopped and resumed run
            is that of a run never stopped).
        checkpoint: Called with the result every ``checkpoint_every`` steps
            (the pruner is then at the end of that step).
        checkpoint_every: Checkpoint period in steps (0: never).
        resume: The result of an earlier, stopped run of this pruner (restored
            with :meth:`Pruner.load_state_dict`) to continue; ``batches`` must
            be the same sequence from its start, its used part is skipped.

    Returns:
        The records, passes, evaluation history and pruning time. A
        KeyboardInterrupt during a step abandons that step and ends the run; so
        does an executor that can no longer solve (``stopped`` is then
        ``"executor_failed"``, the error logged).

    Raises:
        PruningError: For a negative ``steps`` or ``eval_every``.
        DataError: If the batches run out early (an iterator) or are empty.
    """
    steps = check_int(steps, "steps", minimum=0, error=PruningError)
    eval_every = check_int(eval_every, "eval_every", minimum=0, error=PruningError)
    result = resume if resume is not None else PruneResult([], [], 0.0)
    score = _scorer(pruner, result, evaluate, validate, higher_is_better)
    if resume is None:
        if steps == 0 and pruner.config.refit:  # the initial mask, refit
            result.seconds += pruner.refit()
        score(0)
    feed = _batches(batches, steps)
    for _ in range(result.steps_done):
        next(feed)
    for s in range(result.steps_done + 1, steps + 1):
        before = pruner.state_dict(layers=False)  # a step undoes its own moves
        try:
            X, y = next(feed)
            t = time.perf_counter()
            record = pruner.run_pass(X, y)
        except KeyboardInterrupt:
            pruner.load_state_dict(before)  # random states as before the step
            result.stopped, result.abandoned = "interrupted", True
            break
        except ExecutorUnavailable as exc:  # e.g. every Dask worker died
            pruner.load_state_dict(before)
            logger.error("%s", exc)
            result.stopped, result.abandoned = "executor_failed", True
            break
        result.seconds += time.perf_counter() - t
        result.passes.append(record)
        result.records.extend(record.blocks)
        try:
            _after_step(s, record, on_step, on_pass)
            result.stopped = stop() if stop is not None else None
            if _refit_due(pruner, s, steps):
                result.seconds += pruner.refit()
            if s == steps or (eval_every and s % eval_every == 0):
                score(s)
        except KeyboardInterrupt:  # the step stands; its evaluation is lost
            result.stopped, result.abandoned = "interrupted", True
        if result.stopped:
            break
        if checkpoint is not None and checkpoint_every and s % checkpoint_every == 0:
            checkpoint(result)
    return result


def _refit_due(pruner: Pruner, s: int, steps: int) -> bool:
    """Whether step ``s`` ends with a refit (``refit_every``, or the last step)."""
    cfg = pruner.config
    return bool(cfg.refit_every and s % cfg.refit_every == 0) or (
        cfg.refit and s == steps
    )


def _after_step(
    s: int,
    record: PassRecord,
    on_step: Callable[[StepRecord], None] | None,
    on_pass: Callable[[PassRecord], None] | None,
) -> None:
    for block in record.blocks if on_step is not None else ():
        on_step(block)
    if on_pass is not None:
        on_pass(record)


def _scorer(
    pruner: Pruner,
    result: PruneResult,
    evaluate: Scorer | None,
    validate: Scorer | None,
    higher_is_better: bool,
) -> Callable[[int], None]:
    """``score(step)``: evaluate, validate, and keep the best validated mask."""

    def score(step: int) -> None:
        point: dict[str, float] = {"step": step}
        if evaluate is not None:
            got = evaluate(pruner.model)  # metric, loss and any per-corpus scores
            point.update({key: float(value) for key, value in got.items()})
        if validate is not None:
            got = validate(pruner.model)
            value = float(got["metric"])
            point.update(val_metric=value, val_loss=float(got["loss"]))
            best = result.best["val_metric"] if result.best else None
            if best is None or (value > best if higher_is_better else value < best):
                _keep_best(result, point, pruner)
        if evaluate is not None or validate is not None:
            result.history.append({**point, "seconds": result.seconds})

    return score


def _keep_best(result: PruneResult, point: dict[str, float], pruner: Pruner) -> None:
    values = pruner.reconstructed_values()  # not the whole state: no tabu copies
    result.best, result.best_masks = dict(point), pruner.masks()
    result.best_values = values or None


def restore_best(pruner: Pruner, result: PruneResult) -> dict[str, float] | None:
    """Set the pruner and model to the best validated mask of ``result``.

    Returns:
        The history point of that mask (its test ``metric`` and ``loss`` too),
        or None when nothing was validated.
    """
    if result.best_masks is None:
        return None
    state = pruner.state_dict()
    for name, keep in result.best_masks.items():
        state["layers"][name]["pruned"] = ~keep.reshape(-1)
    for name, values in (result.best_values or {}).items():
        state["layers"][name]["keep_values"] = values
    pruner.load_state_dict(state)
    return result.best


def _batches(batches: Iterable[tuple[Any, Any]], steps: int) -> Iterator[Any]:
    """``steps`` batches: an iterator once, a re-iterable restarted as needed."""
    it, served = iter(batches), 0
    while served < steps:
        for batch in it:
            served += 1
            yield batch
            if served == steps:
                return
        if it is batches:
            raise DataError(f"the batches ran out after {served} of {steps} steps")
        it = iter(batches)
        first = next(it, None)
        if first is None:
            raise DataError("the batches are empty")
        served += 1
        yield first


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


def sparsity_pattern(
    model: nn.Module, layers: Sequence[str], patterns: Sequence[str] = KNOWN_PATTERNS
) -> str:
    """The first of ``patterns`` every named layer satisfies, else ``unstructured``.

    A layer satisfies N:M when its rows (Conv2d: flattened inputs) split into
    groups of M consecutive weights with at most N non-zeros each (a weight
    that is 0 by itself counts as pruned, as on hardware). A model without
    zeros in these layers is ``dense``.

    Example:
        >>> import torch
        >>> layer = torch.nn.Linear(8, 2)
        >>> with torch.no_grad():
        ...     layer.weight[:, ::2] = 0
        >>> sparsity_pattern(torch.nn.Sequential(layer), ["0"])
        '2:4'

    Raises:
        PruningError: For an unknown module name or a bad pattern.
    """
    if nonzero_density(model, layers) == 1.0:
        return "dense"
    modules = dict(model.named_modules())
    for pattern in patterns:
        nm = parse_pattern(pattern)  # None for "unstructured": never a match
        if nm is not None and all(
            nm_violations(modules[name].weight, *nm) == 0 for name in layers
        ):
            return pattern
    return UNSTRUCTURED
