"""The pruning loop: one batch per block step, evaluations along the way."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from icbs_opt.checks import check_int
from icbs_opt.errors import DataError, PruningError
from icbs_opt.pruning.pruner import PassRecord, Pruner, StepRecord


@dataclass
class PruneResult:
    """Outcome of :func:`prune`.

    Attributes:
        records: One :class:`StepRecord` per block.
        history: ``{step, metric, loss, seconds}`` per evaluation (step 0 is the
            initial mask); ``seconds`` is pruning time so far, evaluations excluded.
        seconds: Total pruning time (evaluations excluded).
        passes: One :class:`PassRecord` per step (a pass of one or more blocks).
    """

    records: list[StepRecord]
    history: list[dict[str, float]]
    seconds: float
    passes: list[PassRecord] = field(default_factory=list)

    @property
    def accepted(self) -> int:
        """Number of blocks whose move stands."""
        return sum(r.accepted and not r.rolled_back for r in self.records)


def prune(
    pruner: Pruner,
    batches: Iterable[tuple[Any, Any]],
    steps: int,
    *,
    evaluate: Callable[[nn.Module], Mapping[str, float]] | None = None,
    eval_every: int = 0,
    on_step: Callable[[StepRecord], None] | None = None,
    on_pass: Callable[[PassRecord], None] | None = None,
) -> PruneResult:
    """Run ``steps`` steps, one batch each: a pass of ``blocks_per_step`` blocks.

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

    Returns:
        The records, passes, evaluation history and pruning time.

    Raises:
        PruningError: For a negative ``steps`` or ``eval_every``.
        DataError: If the batches run out early (an iterator) or are empty.
    """
    steps = check_int(steps, "steps", minimum=0, error=PruningError)
    eval_every = check_int(eval_every, "eval_every", minimum=0, error=PruningError)
    result = PruneResult([], [], 0.0)

    def score(step: int) -> None:
        if evaluate is not None:
            got = evaluate(pruner.model)
            metric, loss = float(got["metric"]), float(got["loss"])
            point = {"step": step, "metric": metric, "loss": loss}
            result.history.append({**point, "seconds": result.seconds})

    score(0)
    feed = _batches(batches, steps)
    for s in range(1, steps + 1):
        X, y = next(feed)
        t = time.perf_counter()
        record = pruner.run_pass(X, y)
        result.seconds += time.perf_counter() - t
        result.passes.append(record)
        result.records.extend(record.blocks)
        for block in record.blocks if on_step is not None else ():
            on_step(block)
        if on_pass is not None:
            on_pass(record)
        if s == steps or (eval_every and s % eval_every == 0):
            score(s)
    return result


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
