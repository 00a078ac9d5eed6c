"""What the SmolLM2-135M benchmarks share: the task's options and its loading.

``benchmarks/llm.py`` and ``benchmarks/sparsegpt.py`` import it (scripts run as
``python benchmarks/NAME.py`` find it beside them).
"""

from __future__ import annotations

import argparse

import torch

from icbs_opt.memory import release_freed_memory
from icbs_opt.pruning import Pruner
from icbs_opt.tasks import get_task, task_spec

TASK = "smollm2-135m"
PRESET = task_spec(TASK).preset  # what `icbs-opt prune --task smollm2-135m` uses


def add_task_args(p: argparse.ArgumentParser) -> None:
    """The options every SmolLM2 benchmark takes (the issue-4 evaluation)."""
    p.add_argument("--block-size", type=int, default=PRESET.config.block_size)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batch-size", type=int, default=PRESET.config.max_batch_size)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument(
        "--calib-data", default="c4", help="calibration corpus (wikitext2: as before)"
    )
    p.add_argument("--backend", default="native")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int)
    p.add_argument("--json", metavar="FILE")


def load_task(args: argparse.Namespace, calib_data: str | None = None):
    """The task, loaded as ``icbs-opt prune --task smollm2-135m`` loads it.

    ``calib_data`` replaces ``args.calib_data`` when given.
    """
    release_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    return get_task(
        TASK,
        eval_windows=args.eval_windows,
        calib_windows=args.calib_windows,
        batch_size=args.batch_size,
        calib_data=calib_data or args.calib_data,
    )


def make_pruner(task, args: argparse.Namespace, **fields) -> Pruner:
    """A pruner with the task's preset, ``fields`` and the common options replaced."""
    preset = PRESET.replace(
        block_size=args.block_size,
        max_batch_size=args.max_batch_size,
        seed=args.seed,
        **fields,
    )
    return Pruner(
        task.model,
        task.loss_fn,
        backend=args.backend,
        layers=task.layers,
        calibration=task.calibration,
        config=preset.config,
    )
