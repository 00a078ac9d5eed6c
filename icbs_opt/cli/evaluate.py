"""``icbs-opt evaluate``: metric and density of a task's model or a pruned output."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from typing import Any

from icbs_opt.cli.common import (
    EXIT_WRITE_FAILED,
    add_json_flag,
    check_output,
    hide_loading_bars,
    write_each,
    write_json,
)
from icbs_opt.cli.flags import (
    REPLACED_OPTIONS,
    add_task_flags,
    add_zero_shot_flags,
    given_task_options,
    zero_shot_tasks,
)
from icbs_opt.cli.report import per_corpus
from icbs_opt.errors import PruningError
from icbs_opt.record import RunRecord
from icbs_opt.tasks import TaskSpec, task_names, task_spec
from icbs_opt.tasks.options import check_model_dir
from icbs_opt.zeroshot import format_zero_shot

#: Task options only a pruning run uses: no flags of ``evaluate``.
PRUNING_ONLY = ("retrain", "val_fraction", "val_windows", "data_seed", "save_dtype",
                "save_format")  # fmt: skip
#: Saved task options ``evaluate --model DIR`` ignores: where the dense model is
#: cached and whether to train it. A folder's prune_config.json must not make an
#: evaluation train or write anything.
NOT_FROM_FOLDER = ("cache_dir", "retrain")


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    """Add the ``evaluate`` command."""
    p = sub.add_parser(
        "evaluate", help="metric and density of a task's model or a pruned output"
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--model",
        dest="task_model",
        metavar="DIR",
        help="a `prune --out` folder (any task) or a Hugging Face causal LM",
    )
    src.add_argument("--task", help=f"a task's dense model: {', '.join(task_names())}")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_json_flag(p, "the result")
    add_zero_shot_flags(p)
    add_task_flags(p, exclude=("model", *PRUNING_ONLY))
    p.set_defaults(func=_cmd_evaluate)


def _evaluate_target(args: argparse.Namespace) -> tuple[TaskSpec, Any, Callable]:
    """The task, its validated options and a loader of the task to evaluate."""
    from icbs_opt.tasks import load_saved_task

    given = given_task_options(args)
    given.pop("model", None)  # --model names the folder to evaluate
    if args.task is not None:
        spec = task_spec(args.task)
        options = spec.make_options(**given)
        return spec, options, lambda: spec.build(options)
    folder = check_model_dir(args.task_model, hugging_face=False)
    record = RunRecord.read_config(folder)
    if record is None:  # a plain Hugging Face model folder
        spec = task_spec("causal-lm")
        options = spec.make_options(**{**given, "model": str(folder)})
        return spec, options, lambda: spec.build(options)
    spec = task_spec(record.task)
    ignored = (*REPLACED_OPTIONS, *NOT_FROM_FOLDER)
    saved = {k: v for k, v in record.task_options.items() if k not in ignored}
    if "model" in saved:  # the pruned model is the folder itself
        saved["model"] = str(folder)
    options = spec.make_options(**{**saved, **given})
    fields = dataclasses.asdict(options)
    return spec, options, lambda: load_saved_task(spec.name, folder, **fields)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from icbs_opt.checks import check_int
    from icbs_opt.pruning import nonzero_density, sparsity_pattern

    if args.threads is not None:
        check_int(args.threads, "--threads", minimum=1, error=PruningError)
    if args.json is not None:
        check_output(args.json, folder=False)
    spec, options, load = _evaluate_target(args)
    zero_shot = zero_shot_tasks(args, spec, options)
    if args.no_progress or not sys.stderr.isatty():
        hide_loading_bars()
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    task = load()
    scores = task.evaluate(task.model)
    result = {
        "task": spec.name,
        "model": args.task_model or spec.name,
        "metric": task.metric,
        task.metric: scores["metric"],
        "loss": scores["loss"],
        **per_corpus(scores),
        "density": nonzero_density(task.model, task.layers),
        "pattern": sparsity_pattern(task.model, task.layers),
        "layers": len(task.layers),
        "info": task.info,
    }
    if zero_shot:
        progress = not args.no_progress and sys.stderr.isatty()
        result["zero_shot"] = task.zero_shot(
            task.model,
            zero_shot,
            args.limit,
            dtype=args.zero_shot_dtype or "float32",
            progress=progress,
        )
    if args.json != "-":
        _print_evaluation(result, scores)
    if args.json is not None and write_each(
        [(args.json, lambda: write_json(args.json, result))]
    ):
        return EXIT_WRITE_FAILED
    return 0


def _print_evaluation(result: dict[str, Any], scores: dict[str, float]) -> None:
    """One line: the metric (per corpus), loss, density and pattern."""
    metric = result["metric"]
    each = ", ".join(
        f"{k.removeprefix('perplexity_')} {v:.4f}"
        for k, v in per_corpus(scores).items()
    )
    shown = f"{metric} {each}" if each else f"{metric} {scores['metric']:.4f}"
    print(
        f"{result['task']}: {shown}, loss {scores['loss']:.4f}, density "
        f"{result['density']:.4f} ({result['pattern']}) over "
        f"{result['layers']} prunable layers"
    )
    if "zero_shot" in result:
        print("\n".join(format_zero_shot(result["zero_shot"])))
