"""``icbs-opt prune`` and ``evaluate``: the pruning half's commands.

A run starts from its task's :class:`~icbs_opt.settings.Preset`; the flags given
replace single fields of it, and the JSON, ``--help`` and ``prune_config.json``
show the values the run really uses. Everything cheap (settings, backend, task
options, output paths) is checked before the model loads.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from icbs_opt.atomic import atomic_path
from icbs_opt.backends import Backend, get_backend
from icbs_opt.cli.common import (
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    add_backend_option_flag,
    add_json_flag,
    check_output,
    hide_loading_bars,
    parse_key_values,
    progress_bar,
    write_json,
)
from icbs_opt.errors import DataError, PruningError
from icbs_opt.executors import executor_address
from icbs_opt.settings import (
    CHECKPOINT_FILE,
    Preset,
    PruneConfig,
    RunSettings,
    checkpoint_file,
    read_checkpoint_settings,
)
from icbs_opt.tasks import TaskSpec, task_names, task_spec
from icbs_opt.tasks.options import TextOptions
from icbs_opt.zeroshot import PAPER_TASKS, format_zero_shot

#: Settings flags of `prune`: (flag, PruneConfig or RunSettings field, keywords).
SETTING_FLAGS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("--density", "density", {"type": float, "help": "fraction of weights kept "
                              "(with --pattern N:M: N/M unless given)"}),
    ("--pattern", "pattern", {"metavar": "N:M", "help": "unstructured, or N:M "
                              "(e.g. 2:4): keep N of every M consecutive weights "
                              "of a row; sets --density to N/M"}),
    ("--steps", "steps", {"type": int, "help": "steps; a step is one forward/"
                          "backward pass feeding --blocks-per-step blocks"}),
    ("--blocks-per-step", "blocks_per_step", {"type": int, "help": "blocks one "
                                              "pass feeds (M distinct layers)"}),
    ("--workers", "workers", {"type": int, "help": "block problems solved at once "
                              "(None: the machine's cores)"}),
    ("--executor", "executor", {"help": "where a pass's problems are solved: "
                                "threads or dask://HOST:PORT"}),
    ("--tape-dtype", "tape_dtype", {"help": "storage of recorded activations: "
                                    "float32 or bfloat16 (half the memory)"}),
    ("--check-pass", "check_pass", {"action": "store_const", "const": True,
                                    "help": "undo a pass that raised the batch "
                                    "loss"}),
    ("--check-blocks", "check_blocks", {"action": "store_const", "const": True,
                                        "help": "undo each block of a pass that "
                                        "raised the batch loss (a forward per "
                                        "block: for small models)"}),
    ("--refit", "refit", {"action": "store_const", "const": True,
                          "help": "after the last step, refit the kept weights "
                          "to the dense layers' outputs (least squares)"}),
    ("--refit-every", "refit_every", {"type": int, "metavar": "S",
                                      "help": "also refit every S steps (0: "
                                      "never during the run)"}),
    ("--refit-target", "refit_target", {"help": "refit to the original layers' "
                                        "outputs on the pruned model's inputs "
                                        "(current) or the dense model's (dense)"}),
    ("--refit-solver", "refit_solver", {"help": "pcg (conjugate gradients, "
                                        "default) or exact (Cholesky per row)"}),
    ("--block-size", "block_size", {"type": int, "help": "weights per block, n"}),
    ("--k", "k", {"type": int, "help": "pruned weights per block (n // 2 if "
                  "unset; with --pattern N:M it is n (M-N)/M)"}),
    ("--init", "init", {"help": "initial mask: magnitude, wanda, gradient, random; "
                        "the first three also *_per_output, *_per_input; or "
                        "sparsegpt (mask and updated weights)"}),
    ("--selection", "selection", {"help": "gradient, magnitude, wanda or random"}),
    ("--hessian", "hessian", {"help": "gradient_per_sample, gradient_mean, exact "
                              "or exact_piecewise"}),
    ("--grad-multiplier", "grad_multiplier", {"type": float, "help": "lambda_g"}),
    ("--ridge", "ridge_multiplier", {"type": float, "help": "lambda_r"}),
    ("--tabu-frac", "tabu_frac", {"type": float, "help": "tabu size, fraction of "
                                  "free weights"}),
    ("--fix-frac-prune", "fix_frac_prune", {"type": float,
                                            "help": "pruned fraction frozen"}),
    ("--fix-frac-keep", "fix_frac_keep", {"type": float,
                                          "help": "kept fraction frozen"}),
    ("--schedule", "schedule", {"help": "layer schedule: uniform or log"}),
    ("--min-steps-per-layer", "min_steps_per_layer", {"type": int,
                                                      "help": "floor of the log "
                                                      "schedule"}),
    ("--remove-zero-rows", "remove_zero_rows", {"action": "store_const", "const": True,
                                                "help": "prune zero Q rows for free"}),
    ("--max-batch-size", "max_batch_size", {"type": int,
                                            "help": "samples per forward/backward"}),
    ("--hessian-chunk-size", "hessian_chunk_size", {"type": int,
                                                    "help": "Hessian rows per "
                                                    "exact_piecewise pass"}),
    ("--eval-every", "eval_every", {"type": int, "help": "evaluate every S steps "
                                    "(0: only before and after)"}),
    ("--threads", "threads", {"type": int, "help": "torch CPU threads"}),
    ("--keep-best", "keep_best", {"action": "store_const", "const": True,
                                  "help": "end with the mask that scored best on "
                                  "the validation split (needs --eval-every; "
                                  "see --val-fraction, --val-windows)"}),
    ("--time-budget", "time_budget", {"type": float, "metavar": "MINUTES",
                                      "help": "stop after the step that crosses "
                                      "MINUTES since the command started"}),
    ("--checkpoint-every", "checkpoint_every", {"type": int, "metavar": "S",
                                                "help": "write a checkpoint every "
                                                "S steps (0: only when stopped "
                                                "early)"}),
    ("--seed", "seed", {"type": int, "help": "seed of every random choice"}),
)  # fmt: skip


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _setting_flag(name: str) -> str:
    """The flag of a setting or task option (``ridge_multiplier``: ``--ridge``)."""
    return next((flag for flag, dest, _ in SETTING_FLAGS if dest == name), _flag(name))


def _option_fields() -> dict[str, dataclasses.Field]:
    """Every task option of every registered task, by name (first help wins)."""
    fields: dict[str, dataclasses.Field] = {}
    for name in task_names():
        for f in dataclasses.fields(task_spec(name).options):
            fields.setdefault(f.name, f)
    return fields


def _preset_default(field_name: str) -> str:
    """``(default ...)`` text: one value, or the value of each group of tasks."""
    by_value: dict[str, list[str]] = {}
    for name in task_names():
        preset = task_spec(name).preset
        source = preset.run if hasattr(preset.run, field_name) else preset.config
        by_value.setdefault(str(getattr(source, field_name)), []).append(name)
    if len(by_value) == 1:
        return f" (default {next(iter(by_value))})"
    parts = [f"{', '.join(names)}: {value}" for value, names in by_value.items()]
    return f" (default {'; '.join(parts)})"


def _add_task_options(
    p: argparse.ArgumentParser, exclude: tuple[str, ...] = ()
) -> None:
    group = p.add_argument_group("task options (passed to the task when given)")
    for name, f in _option_fields().items():
        if name in exclude:
            continue
        kwargs: dict[str, Any] = {"help": f.metadata.get("help", name)}
        if f.type in ("int", int):
            kwargs["type"] = int
        if f.type in ("float", float):
            kwargs["type"] = float
        if f.type in ("bool", bool):
            kwargs.update(action="store_const", const=True)
        else:
            kwargs["metavar"] = name.upper()
        group.add_argument(_flag(name), dest=f"task_{name}", default=None, **kwargs)
    for old in REPLACED_OPTIONS:
        group.add_argument(_flag(old), dest=f"replaced_{old}", help=argparse.SUPPRESS)


#: Task options of earlier versions -> the message naming what replaced them.
REPLACED_OPTIONS = {
    "calib_file": "--calib-file was replaced by --calib-data (a corpus name: "
    "wikitext2, c4; or a .txt/.jsonl file)",
    "eval_file": "--eval-file was replaced by --eval-data (comma-separated corpus "
    "names: wikitext2, c4; or .txt/.jsonl files)",
}


def _refuse_replaced(args: argparse.Namespace) -> None:
    for old, message in REPLACED_OPTIONS.items():
        if getattr(args, f"replaced_{old}", None) is not None:
            raise DataError(message)


def _add_zero_shot_flags(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("zero-shot evaluation (causal LMs; lm-eval)")
    group.add_argument(
        "--zero-shot",
        metavar="TASKS",
        help="evaluate zero-shot accuracy with lm-eval on local task files: paper "
        f"({', '.join(PAPER_TASKS)}), all (adds piqa, lambada_openai), or a "
        "comma-separated list",
    )
    group.add_argument(
        "--limit", type=int, metavar="N", help="zero-shot: first N examples per task"
    )


def _zero_shot_tasks(
    args: argparse.Namespace, spec: TaskSpec, options: Any
) -> list[str] | None:
    """The zero-shot tasks asked for, with lm-eval and their files found."""
    from icbs_opt.checks import check_int
    from icbs_opt.zeroshot import check_zero_shot, resolve_zero_shot

    if args.zero_shot is None:
        if args.limit is not None:
            raise DataError("--limit needs --zero-shot")
        return None
    if not isinstance(options, TextOptions):
        raise DataError(
            f"--zero-shot needs a causal language model; task {spec.name!r} has none"
        )
    if args.limit is not None:
        check_int(args.limit, "--limit", minimum=1, error=DataError)
    names = resolve_zero_shot(args.zero_shot)
    check_zero_shot(names, options.data_dir)
    return names


def add_prune(sub: argparse._SubParsersAction) -> None:
    """Add the ``prune`` command."""
    p = sub.add_parser("prune", help="prune a task's model with iCBS")
    p.add_argument(
        "--task",
        help=f"task: {', '.join(task_names())} (default digits-mlp; causal-lm "
        "when --model is given)",
    )
    p.add_argument("--backend", help="backend (default native)")
    add_backend_option_flag(p)
    p.add_argument("--layers", help="comma-separated module names (default: task's)")
    p.add_argument("--out", metavar="DIR", help="write masks, model, settings, results")
    add_json_flag(p, "the results summary")
    p.add_argument("--plot", metavar="FILE.png", help="plot the metric against steps")
    p.add_argument(
        "--harvest", metavar="DIR", help="save every block problem as .npz in DIR"
    )
    p.add_argument(
        "--harvest-format",
        choices=("npz", "cqm"),
        default="npz",
        help="file format of --harvest: npz (with meta) or cqm (dimod's CQM file)",
    )
    p.add_argument(
        "--checkpoint",
        metavar="DIR",
        help=f"write {CHECKPOINT_FILE} here (default: the --out folder)",
    )
    p.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run checkpointed in DIR, with its settings and outputs",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _add_zero_shot_flags(p)
    group = p.add_argument_group("pruning settings (default: the task's preset)")
    for flag, dest, kwargs in SETTING_FLAGS:
        text = kwargs["help"] + _preset_default(dest)
        group.add_argument(flag, dest=dest, default=None, **{**kwargs, "help": text})
    _add_task_options(p)
    p.set_defaults(func=_cmd_prune)


# --------------------------------------------------------------------- plan
#: Settings a resumed run may change: they leave its results as they were.
RESUME_MAY_CHANGE = ("time_budget", "checkpoint_every")
#: Outputs that are folders.
FOLDER_OUTPUTS = ("out", "harvest", "checkpoint")
#: A non-empty --out or --checkpoint folder must hold one of these (icbs-opt's).
_OURS = ("prune_config.json", CHECKPOINT_FILE)


@dataclass
class PrunePlan:
    """Everything a `prune` run needs, validated before any model loads.

    Attributes:
        checkpoint: The checkpoint file this run writes (None: no place for one).
        resume: The checkpoint file this run continues (None: a new run).
        zero_shot: Zero-shot tasks evaluated after pruning (None: none).
        limit: Examples per zero-shot task (None: all).
    """

    spec: TaskSpec
    options: Any
    preset: Preset
    backend: Backend
    layers: list[str] | None
    outputs: dict[str, str]
    progress: bool
    checkpoint: str | None = None
    resume: str | None = None
    zero_shot: list[str] | None = None
    limit: int | None = None
    harvest_format: str = "npz"

    def settings(self) -> dict[str, Any]:
        """What a checkpoint keeps of the plan and a resume is compared with."""
        return {
            "task": self.spec.name,
            "task_options": dataclasses.asdict(self.options),
            "backend": self.backend.name,
            "backend_options": self.backend.parameters,
            **self.preset.to_dict(),
            "layers": self.layers,
            "outputs": self.outputs,
        }


def _given_task_options(args: argparse.Namespace) -> dict[str, Any]:
    given = {name: getattr(args, f"task_{name}", None) for name in _option_fields()}
    return {k: v for k, v in given.items() if v is not None}


def _given_settings(args: argparse.Namespace) -> dict[str, Any]:
    given = {dest: getattr(args, dest) for _, dest, _ in SETTING_FLAGS}
    return {k: v for k, v in given.items() if v is not None}


def _plan(args: argparse.Namespace) -> PrunePlan:
    """Output paths first, then settings, backend and task options, all cheap."""
    outputs = {key: getattr(args, key) for key in ("out", "json", "plot", "harvest")}
    outputs["checkpoint"] = args.checkpoint
    outputs = {k: v for k, v in outputs.items() if v is not None}
    _check_outputs(outputs)
    _refuse_replaced(args)
    if args.resume is not None:
        plan = _resume_plan(args, outputs)
        plan.zero_shot = _zero_shot_tasks(args, plan.spec, plan.options)
        plan.limit = args.limit
        return plan
    spec = task_spec(args.task or ("causal-lm" if args.task_model else "digits-mlp"))
    preset = spec.preset.replace(**_given_settings(args))
    executor_address(preset.config.executor)  # a bad --executor fails now
    checkpoint = _checkpoint_path(outputs, preset)
    options = spec.make_options(**_given_task_options(args))
    if preset.run.keep_best:
        options = _with_validation(spec.name, options)
    backend_options = parse_key_values(args.backend_option, "--backend-option")
    backend = get_backend(args.backend or "native", **backend_options)
    layers = [s.strip() for s in args.layers.split(",")] if args.layers else None
    zero_shot = _zero_shot_tasks(args, spec, options)
    return PrunePlan(spec, options, preset, backend, layers, outputs,
                     not args.no_progress, checkpoint, zero_shot=zero_shot,
                     limit=args.limit)  # fmt: skip


def _with_validation(task: str, options: Any) -> Any:
    if not hasattr(options, "with_validation"):
        raise DataError(f"task {task!r} has no validation split for --keep-best")
    return options.with_validation()


def _checkpoint_path(outputs: dict[str, str], preset: Preset) -> str | None:
    """Where checkpoints go: ``--checkpoint DIR``, else the ``--out`` folder."""
    folder = outputs.get("checkpoint", outputs.get("out"))
    if folder is not None:
        return os.path.join(folder, CHECKPOINT_FILE)
    if preset.run.checkpoint_every:
        raise PruningError("--checkpoint-every needs --out or --checkpoint DIR")
    return None


def _check_outputs(outputs: dict[str, str]) -> None:
    """Fail now, not after the run, on an output that cannot or must not be written.

    A folder that already holds files must be one icbs-opt wrote: it has a
    ``prune_config.json`` or a checkpoint.
    """
    for key, path in outputs.items():
        check_output(path, folder=key in FOLDER_OUTPUTS)
        folder = Path(path)
        if key not in ("out", "checkpoint") or not folder.is_dir():
            continue
        ours = any((folder / name).exists() for name in _OURS)
        if not ours and any(folder.iterdir()):
            raise DataError(
                f"output folder {path!r} holds files icbs-opt did not write (no "
                f"{' or '.join(_OURS)}); give a new or empty folder"
            )


def _resume_plan(args: argparse.Namespace, outputs: dict[str, str]) -> PrunePlan:
    """The plan of the checkpoint in ``--resume``; a changed setting is refused."""
    saved = read_checkpoint_settings(args.resume)
    spec = task_spec(saved["task"])
    base = Preset(PruneConfig(**saved["config"]), RunSettings(**saved["run"]))
    saved.update(base.to_dict())  # fields added since it was written: defaults
    preset = base.replace(**_given_settings(args))
    executor_address(preset.config.executor)
    outputs = {**saved["outputs"], **outputs}
    checkpoint = _checkpoint_path(outputs, preset)
    options = spec.make_options(
        **{**saved["task_options"], **_given_task_options(args)}
    )
    name = args.backend or saved["backend"]
    backend_options = saved["backend_options"] if name == saved["backend"] else {}
    if args.backend_option:
        backend_options = parse_key_values(args.backend_option, "--backend-option")
    backend = get_backend(name, **backend_options)
    layers = saved["layers"]
    if args.layers:
        layers = [s.strip() for s in args.layers.split(",")]
    plan = PrunePlan(spec, options, preset, backend, layers, outputs,
                     not args.no_progress, checkpoint,
                     resume=checkpoint_file(args.resume))  # fmt: skip
    _refuse_changes(saved, plan.settings())
    _check_outputs(plan.outputs)
    return plan


def _refuse_changes(saved: dict[str, Any], given: dict[str, Any]) -> None:
    """Raise, naming the flag, if ``given`` settings differ from ``saved`` ones."""

    def flat(s: dict[str, Any]) -> dict[str, Any]:
        keys = ("task", "backend", "backend_options", "layers")
        return {**s["task_options"], **s["config"], **s["run"],
                **{k: s[k] for k in keys}}  # fmt: skip

    old, new = flat(saved), flat(given)
    for key, value in new.items():
        if key not in RESUME_MAY_CHANGE and value != old.get(key):
            raise PruningError(
                f"cannot resume with {_setting_flag(key)} {value!r}: the checkpoint's "
                f"run has {old.get(key)!r} (only --time-budget and --checkpoint-every "
                "may change)"
            )


# ---------------------------------------------------------------------- run
class _Stopper:
    """The ``stop`` of a run: a first SIGINT/SIGTERM, or the time budget.

    The first signal asks the run to stop after the current step; a second
    one while the loop runs abandons that step (a KeyboardInterrupt).

    Args:
        budget: Minutes from now after which to stop (None: no limit).
    """

    def __init__(self, budget: float | None):
        self.deadline = None if budget is None else time.monotonic() + 60 * budget
        self.signal: str | None = None
        self.abandonable = True

    def __call__(self) -> str | None:
        if self.signal is not None:
            return "interrupted"
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return "time_budget"
        return None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is None:
            self.signal = signal.Signals(signum).name
            print(
                f"icbs-opt: {self.signal}: stopping after the current step to write "
                "the results (Ctrl-C again abandons the step)",
                file=sys.stderr,
            )
        elif self.abandonable:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Handle SIGINT and SIGTERM within the block (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        kinds = (signal.SIGINT, signal.SIGTERM)
        previous = {kind: signal.signal(kind, self._handle) for kind in kinds}
        try:
            yield
        finally:
            for kind, handler in previous.items():
                signal.signal(kind, handler)

    @property
    def exit_status(self) -> int:
        """130 after SIGINT, 143 after SIGTERM, else 0."""
        codes = {"SIGINT": EXIT_INTERRUPTED, "SIGTERM": EXIT_TERMINATED}
        return codes.get(self.signal or "", 0)


def _cmd_prune(args: argparse.Namespace) -> int:
    plan = _plan(args)
    plan.harvest_format = args.harvest_format
    stopper = _Stopper(plan.preset.run.time_budget)
    if not (plan.progress and sys.stderr.isatty()):
        hide_loading_bars()
    import torch

    from icbs_opt.memory import release_freed_memory

    release_freed_memory()
    if plan.preset.run.threads is not None:
        torch.set_num_threads(plan.preset.run.threads)
    task = plan.spec.build(plan.options)
    pruner, start, resume = _start(plan, task)
    try:
        with stopper.installed():
            result = _prune(plan, task, pruner, stopper, resume)
            stopper.abandonable = False  # from here on the results are written
            summary = _finish(plan, task, pruner, result, start, stopper)
            if plan.outputs.get("json") != "-":  # stdout is the JSON's alone
                _print_prune_table(summary)
            _write_outputs(plan, task, pruner, summary, result)
    finally:
        pruner.close()
    if result.stopped:
        _print_stop(plan, summary)
    elif plan.zero_shot:  # after the outputs: an interrupt here loses nothing
        summary["zero_shot"] = task.zero_shot(
            task.model, plan.zero_shot, plan.limit, progress=plan.progress
        )
        if plan.outputs.get("json") != "-":
            print("\n".join(format_zero_shot(summary["zero_shot"])))
        _write_summary(plan, summary, result)
    return stopper.exit_status


def _start(plan: PrunePlan, task: Any) -> tuple[Any, dict[str, Any], Any]:
    """Evaluate the dense model, build the Pruner, load the checkpoint resumed.

    Returns:
        The pruner, facts for the summary, and the result to resume (or None).
    """
    from icbs_opt.compare import Harvester
    from icbs_opt.pruning import Pruner, nonzero_density
    from icbs_opt.pruning.checkpoint import load_checkpoint
    from icbs_opt.pruning.state import resolve_layers

    layers = [n for n, _ in resolve_layers(task.model, plan.layers or task.layers)]
    dense = {
        **task.evaluate(task.model),
        "density": nonzero_density(task.model, layers),
    }
    harvest = plan.outputs.get("harvest")
    t = time.perf_counter()
    pruner = Pruner(
        task.model,
        task.loss_fn,
        backend=plan.backend,
        layers=layers,
        calibration=task.calibration,
        problem_hook=Harvester(harvest, task.name, plan.harvest_format)
        if harvest
        else None,
        config=plan.preset.config,
    )
    start = {"layers": layers, "dense": dense, "init_seconds": time.perf_counter() - t,
             "init_density": nonzero_density(task.model, layers)}  # fmt: skip
    if plan.resume is None:
        return pruner, start, None
    saved = load_checkpoint(plan.resume)
    pruner.load_state_dict(saved.state)
    return pruner, start, saved.result


def _prune(
    plan: PrunePlan, task: Any, pruner: Any, stopper: _Stopper, resume: Any
) -> Any:
    """The loop, with progress, validation, checkpoints and the stopper."""
    from icbs_opt.pruning import prune

    run = plan.preset.run
    with progress_bar(run.steps, "prune", "pass", enabled=plan.progress) as bar:
        if resume is not None:
            bar.update(resume.steps_done)
        on_pass, evaluate = _progress_callbacks(bar, task)
        return prune(
            pruner,
            task.batches(plan.preset.config.seed),
            run.steps,
            evaluate=evaluate,
            eval_every=run.eval_every,
            on_pass=on_pass,
            validate=task.validate if run.keep_best else None,
            higher_is_better=task.higher_is_better,
            stop=stopper,
            checkpoint=lambda result: _save_checkpoint(plan, pruner, result),
            checkpoint_every=run.checkpoint_every if plan.checkpoint else 0,
            resume=resume,
        )


def _save_checkpoint(plan: PrunePlan, pruner: Any, result: Any) -> None:
    from icbs_opt.pruning.checkpoint import save_checkpoint

    save_checkpoint(plan.checkpoint, pruner, result, plan.settings())  # type: ignore[arg-type]


def _finish(
    plan: PrunePlan,
    task: Any,
    pruner: Any,
    result: Any,
    start: dict[str, Any],
    stopper: _Stopper,
) -> dict[str, Any]:
    """Checkpoint, restore the best mask (``--keep-best``), and summarise."""
    from icbs_opt.pruning import nonzero_density
    from icbs_opt.pruning.loop import restore_best

    config, run = plan.preset.config, plan.preset.run
    checkpoint = None
    if plan.checkpoint and (result.stopped or run.checkpoint_every or plan.resume):
        _save_checkpoint(plan, pruner, result)  # before the best mask is restored
        checkpoint = plan.checkpoint
    best = restore_best(pruner, result) if run.keep_best else None
    final = best or result.history[-1]
    if final["step"] != result.steps_done:  # an abandoned step lost its evaluation
        final = {"step": result.steps_done, **task.evaluate(task.model)}
    init = result.history[0]
    return {
        "task": task.name,
        "density": config.density,
        "pattern": config.pattern,
        "backend": plan.backend.name,
        "seed": config.seed,
        "metric": task.metric,
        "dense": start["dense"],
        "init": {"method": config.init, "metric": init["metric"],
                 "loss": init["loss"], **_per_corpus(init),
                 "density": start["init_density"], "seconds": start["init_seconds"]},
        "final": {"metric": final["metric"], "loss": final["loss"],
                  **_per_corpus(final),
                  "density": nonzero_density(task.model, start["layers"]),
                  "steps": result.steps_done, "blocks": len(result.records),
                  "accepted": result.accepted, "seconds": result.seconds},
        "steps_done": result.steps_done,
        "stopped": result.stopped,
        "interrupted": stopper.signal is not None,
        "signal": stopper.signal,
        "abandoned_step": result.abandoned,
        "keep_best": best,
        "checkpoint": checkpoint,
        "resumed_from": plan.resume,
        "settings": plan.preset.to_dict(),
        "layers": start["layers"],
        "executor": pruner.executor.description,
        "history": result.history,
        "passes": [p.to_dict() for p in result.passes],
    }  # fmt: skip


def _per_corpus(scores: dict[str, Any]) -> dict[str, float]:
    """The ``perplexity_<corpus>`` entries of an evaluation."""
    return {k: v for k, v in scores.items() if k.startswith("perplexity_")}


def _progress_callbacks(bar: Any, task: Any) -> tuple[Callable, Callable]:
    """``on_pass`` and ``evaluate`` that keep the bar's postfix current."""
    shown: dict[str, Any] = {"blocks": 0, "accepted": 0}

    def on_pass(record: Any) -> None:
        shown["blocks"] += len(record.blocks)
        shown["accepted"] += record.accepted
        bar.set_postfix(**shown, refresh=False)
        bar.update()

    def evaluate(model: Any) -> dict[str, float]:
        scores = task.evaluate(model)
        shown[task.metric] = f"{scores['metric']:.4g}"
        bar.set_postfix(**shown)
        return scores

    return on_pass, evaluate


def _print_prune_table(s: dict[str, Any]) -> None:
    pattern = f" ({s['pattern']})" if s["pattern"] != "unstructured" else ""
    print(
        f"{s['task']}: density {s['density']:g}{pattern}, backend {s['backend']}, "
        f"seed {s['seed']}"
    )
    corpora = list(_per_corpus(s["dense"])) or ["metric"]
    names = [c.removeprefix("perplexity_") for c in corpora]
    if corpora == ["metric"]:
        names = [s["metric"]]
    head = "".join(f"  {name:>11}" for name in names)
    print(f"{'':>6}{head}  {'loss':>9}  {'density':>8}  {'seconds':>8}")
    for label in ("dense", "init", "final"):
        r = s[label]
        seconds = f"{r['seconds']:.2f}" if "seconds" in r else "-"
        values = "".join(f"  {r.get(c, float('nan')):>11.4g}" for c in corpora)
        print(f"{label:>6}{values}  {r['loss']:>9.4f}  {r['density']:>8.4f}  "
              f"{seconds:>8}")  # fmt: skip
    if corpora != ["metric"]:
        print(f"perplexity on held-out text; loss: {names[0]}")
    f = s["final"]
    print(
        f"init {s['init']['method']}; {f['steps']} steps of "
        f"{s['settings']['config']['blocks_per_step']} block(s), "
        f"{f['accepted']} of {f['blocks']} blocks accepted"
    )
    if s["keep_best"] is not None:
        b = s["keep_best"]
        print(
            f"kept the best validation mask: step {b['step']}, validation "
            f"{s['metric']} {b['val_metric']:.4g} (final is its test score)"
        )


def _print_stop(plan: PrunePlan, s: dict[str, Any]) -> None:
    """Say on stderr why the run stopped, what it wrote and how to go on."""
    why = {"interrupted": f"by {s['signal']}", "time_budget": "by --time-budget"}
    lost = " (the step under way was abandoned)" if s["abandoned_step"] else ""
    print(
        f"icbs-opt: stopped {why.get(s['stopped'], s['stopped'])} after step "
        f"{s['steps_done']} of {s['settings']['run']['steps']}{lost}",
        file=sys.stderr,
    )
    written = [f"{k} {v}" for k, v in plan.outputs.items() if v != "-"]
    if written:
        print(f"icbs-opt: wrote {', '.join(written)}", file=sys.stderr)
    if s["checkpoint"]:
        folder = os.path.dirname(s["checkpoint"])
        print(f"icbs-opt: continue with: icbs-opt prune --resume {folder}",
              file=sys.stderr)  # fmt: skip


# -------------------------------------------------------------------- write
def _write_outputs(
    plan: PrunePlan, task: Any, pruner: Any, summary: dict[str, Any], result: Any
) -> None:
    """The summary JSON, the plot, and the ``--out`` folder."""
    later = plan.zero_shot and not result.stopped  # the summary grows after this
    if "json" in plan.outputs and not (later and plan.outputs["json"] == "-"):
        write_json(plan.outputs["json"], summary)
    if "plot" in plan.outputs:
        plot_history(summary["history"], task.metric, plan.outputs["plot"])
    out = plan.outputs.get("out")
    if out is None:
        return
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    masks = {name: m.cpu().contiguous() for name, m in pruner.masks().items()}
    with atomic_path(os.path.join(out, "masks.safetensors")) as tmp:
        meta = {"convention": "True = kept: weight == original weight * mask"}
        save_file(masks, tmp, metadata=meta)
    task.save_model(task.model, out)
    run = {
        "task": task.name,
        "task_options": dataclasses.asdict(plan.options),
        "backend": plan.backend.name,
        "backend_options": plan.backend.parameters,
        **plan.preset.to_dict(),
        "layers": summary["layers"],
        "task_info": task.info,
        "versions": _versions(),
    }
    write_json(os.path.join(out, "prune_config.json"), run)
    _write_summary(plan, summary, result, json_too=False)


def _write_summary(
    plan: PrunePlan, summary: dict[str, Any], result: Any, json_too: bool = True
) -> None:
    """``--json`` (when ``json_too``) and the ``--out`` folder's ``results.json``."""
    if json_too and "json" in plan.outputs:
        write_json(plan.outputs["json"], summary)
    if "out" in plan.outputs:
        steps = [r.to_dict() for r in result.records]
        path = os.path.join(plan.outputs["out"], "results.json")
        write_json(path, {**summary, "steps": steps})


def plot_history(history: Sequence[dict[str, float]], metric: str, path: str) -> None:
    """Draw the metric against steps and against pruning seconds into ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    values = [h["metric"] for h in history]
    for ax, key, label in (
        (axes[0], "step", "step"),
        (axes[1], "seconds", "pruning seconds"),
    ):
        ax.plot([h[key] for h in history], values, marker="o")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(metric)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def _versions() -> dict[str, str]:
    import platform
    from importlib import metadata

    from icbs_opt import __version__

    out = {"icbs-opt": __version__, "python": platform.python_version()}
    for dist in ("torch", "numpy", "dimod", "dwave-neal", "scikit-learn",
                 "safetensors", "transformers"):  # fmt: skip
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


# ------------------------------------------------------------------- evaluate
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
    _add_zero_shot_flags(p)
    _add_task_options(p, exclude=("model", "save_dtype", "save_format"))
    p.set_defaults(func=_cmd_evaluate)


def _evaluate_target(args: argparse.Namespace) -> tuple[TaskSpec, Any, Callable]:
    """The task, its validated options and a loader of the task to evaluate."""
    from icbs_opt.tasks import load_saved_task

    given = _given_task_options(args)
    given.pop("model", None)  # --model names the folder to evaluate
    if args.task is not None:
        spec = task_spec(args.task)
        options = spec.make_options(**given)
        return spec, options, lambda: spec.build(options)
    folder = Path(args.task_model)
    saved = folder / "prune_config.json"
    if not saved.is_file():  # a plain Hugging Face model folder
        spec = task_spec("causal-lm")
        options = spec.make_options(**{**given, "model": str(folder)})
        return spec, options, lambda: spec.build(options)
    try:
        run = json.loads(saved.read_text(encoding="utf-8"))
        spec, saved_options = task_spec(run["task"]), dict(run["task_options"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"cannot read the run settings {str(saved)!r}: {exc}") from exc
    for old in REPLACED_OPTIONS:  # a run of an earlier version: its text files
        saved_options.pop(old, None)  # are replaced by the default corpora
    if "model" in saved_options:  # the pruned model is the folder itself
        saved_options["model"] = str(folder)
    options = spec.make_options(**{**saved_options, **given})
    fields = dataclasses.asdict(options)
    return spec, options, lambda: load_saved_task(spec.name, folder, **fields)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from icbs_opt.checks import check_int
    from icbs_opt.pruning import nonzero_density, sparsity_pattern

    if args.threads is not None:
        check_int(args.threads, "--threads", minimum=1, error=PruningError)
    _refuse_replaced(args)
    spec, options, load = _evaluate_target(args)
    zero_shot = _zero_shot_tasks(args, spec, options)
    name = spec.name
    if args.no_progress or not sys.stderr.isatty():
        hide_loading_bars()
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    task = load()
    scores = task.evaluate(task.model)
    result = {
        "task": name,
        "model": args.task_model or name,
        "metric": task.metric,
        task.metric: scores["metric"],
        "loss": scores["loss"],
        **_per_corpus(scores),
        "density": nonzero_density(task.model, task.layers),
        "pattern": sparsity_pattern(task.model, task.layers),
        "layers": len(task.layers),
        "info": task.info,
    }
    if zero_shot:
        progress = not args.no_progress and sys.stderr.isatty()
        result["zero_shot"] = task.zero_shot(
            task.model, zero_shot, args.limit, progress=progress
        )
    if args.json is not None:
        write_json(args.json, result)
    if args.json != "-":
        each = ", ".join(
            f"{k.removeprefix('perplexity_')} {v:.4f}"
            for k, v in _per_corpus(scores).items()
        )
        metric = (
            f"{task.metric} {each}" if each else f"{task.metric} {scores['metric']:.4f}"
        )
        print(
            f"{name}: {metric}, loss {scores['loss']:.4f}, density "
            f"{result['density']:.4f} ({result['pattern']}) over "
            f"{len(task.layers)} prunable layers"
        )
        if zero_shot:
            print("\n".join(format_zero_shot(result["zero_shot"])))
    return 0
