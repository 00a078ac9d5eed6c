"""``icbs-opt prune``: prune a task's model with iCBS.

A run starts from its task's :class:`~icbs_opt.settings.Preset` (or, with
``--resume``, from the checkpoint's :class:`~icbs_opt.record.RunRecord`); the
flags given replace single fields of it, and the JSON, ``--help`` and
``prune_config.json`` show the values the run really uses. Every setting (the
preset, executor, backend, task options, layers, output paths) is checked before
the model loads.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from icbs_opt.backends import Backend, get_backend
from icbs_opt.cli.common import (
    EXIT_EXECUTOR_FAILED,
    EXIT_WRITE_FAILED,
    Interrupts,
    add_backend_option_flag,
    add_json_flag,
    hide_loading_bars,
    os_reason,
    parse_key_values,
    progress_bar,
    write_each,
    write_errors,
)
from icbs_opt.cli.flags import (
    add_setting_flags,
    add_task_flags,
    add_zero_shot_flags,
    flag_of,
    given_settings,
    given_task_options,
    zero_shot_tasks,
)
from icbs_opt.cli.outputs import (
    FOLDER_OUTPUTS,
    absolute,
    check_outputs,
    stale_checkpoints,
    summary_writes,
    write_outputs,
)
from icbs_opt.cli.report import (
    per_corpus,
    print_prune_table,
    print_stop,
)
from icbs_opt.errors import DataError, PruningError
from icbs_opt.executors import executor_address
from icbs_opt.record import (
    CHECKPOINT_FILE,
    RESUME_MAY_CHANGE,
    RunRecord,
    checkpoint_file,
)
from icbs_opt.settings import Preset
from icbs_opt.tasks import TaskSpec, task_names, task_spec
from icbs_opt.zeroshot import format_zero_shot

#: Said on stderr after a first SIGINT or SIGTERM.
_NOTICE = (
    "stopping after the current step to write the results (Ctrl-C again "
    "abandons the step)"
)


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
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in an --out or --checkpoint folder that holds another "
        "run's checkpoint (which is removed when pruning starts)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_zero_shot_flags(p)
    add_setting_flags(p)
    add_task_flags(p)
    p.set_defaults(func=_cmd_prune)


# --------------------------------------------------------------------- plan
@dataclass
class PrunePlan:
    """Everything a `prune` run needs, validated before any model loads.

    Attributes:
        checkpoint: The checkpoint file this run writes (None: no place for one).
        resume: The checkpoint file this run continues (None: a new run).
        zero_shot: Zero-shot tasks evaluated after pruning (None: none).
        limit: Examples per zero-shot task (None: all).
        zero_shot_dtype: Precision of the zero-shot forward passes.
        stale: Checkpoints of earlier runs in the output folders, removed
            (``--overwrite``) once this run starts pruning.
        checkpoint_failed: Whether a checkpoint could not be written (said once).
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
    zero_shot_dtype: str = "float32"
    harvest_format: str = "npz"
    stale: list[str] = dataclasses.field(default_factory=list)
    checkpoint_failed: bool = False

    @property
    def record(self) -> RunRecord:
        """The run's settings as its files hold them."""
        return RunRecord(
            self.spec.name,
            dataclasses.asdict(self.options),
            self.backend.name,
            self.backend.parameters,
            self.preset,
            self.layers,
            self.outputs,
        )


def _plan(args: argparse.Namespace) -> PrunePlan:
    """The run's plan; every setting and output path checked, all cheap."""
    given = {key: getattr(args, key) for key in (*FOLDER_OUTPUTS, "json", "plot")}
    outputs = {k: v for k, v in given.items() if v is not None}
    saved = RunRecord.read_checkpoint(args.resume) if args.resume is not None else None
    if saved is not None:
        outputs = {**saved.outputs, **outputs}
    check_outputs(outputs)  # messages show the paths as typed
    outputs = {k: absolute(v) for k, v in outputs.items()}
    stale = stale_checkpoints(outputs, args.resume, args.overwrite)
    spec = task_spec(_task_name(args, saved))
    preset = (saved.preset if saved else spec.preset).replace(**given_settings(args))
    executor_address(preset.config.executor)  # a bad --executor fails now
    options = spec.make_options(
        **{**(saved.task_options if saved else {}), **given_task_options(args)}
    )
    if preset.run.keep_best:
        options = _with_validation(spec.name, options)
    layers = saved.layers if saved else None
    plan = PrunePlan(
        spec,
        options,
        preset,
        _backend(args, saved),
        _layers(args.layers) if args.layers is not None else layers,
        outputs,
        progress=not args.no_progress,
        checkpoint=_checkpoint_path(outputs, preset),
        resume=checkpoint_file(args.resume) if saved else None,
        zero_shot=zero_shot_tasks(args, spec, options),
        limit=args.limit,
        zero_shot_dtype=args.zero_shot_dtype or "float32",
        harvest_format=args.harvest_format,
        stale=stale,
    )
    if saved is not None:
        _refuse_changes(saved, plan.record)
    return plan


def _task_name(args: argparse.Namespace, saved: RunRecord | None) -> str:
    """The task resumed, given, or the default (causal-lm with --model)."""
    if saved is None:
        if args.task is not None:
            return args.task
        return "causal-lm" if args.task_model is not None else "digits-mlp"
    if args.task not in (None, saved.task):
        raise _refusal("task", saved.task, args.task)
    return saved.task


def _backend(args: argparse.Namespace, saved: RunRecord | None) -> Backend:
    """The backend given, or the one resumed with its options."""
    name = args.backend
    if name is None:
        name = saved.backend if saved else "native"
    options = saved.backend_options if saved and name == saved.backend else {}
    if args.backend_option:
        options = parse_key_values(args.backend_option, "--backend-option")
    return get_backend(name, **options)


def _layers(text: str) -> list[str]:
    """The module names of ``--layers``."""
    names = [s.strip() for s in text.split(",")]
    if not all(names):
        raise DataError(f"--layers must be comma-separated module names, got {text!r}")
    return names


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


def _refuse_changes(saved: RunRecord, given: RunRecord) -> None:
    """Raise, naming the flag, if ``given`` changes a setting of ``saved``."""
    change = saved.changed(given)
    if change is not None:
        raise _refusal(*change)


def _refusal(name: str, old: Any, new: Any) -> PruningError:
    """The error of a resume that changes the setting ``name``."""
    *others, last = [flag_of(n) for n in RESUME_MAY_CHANGE]
    may = f"{', '.join(others)} and {last}"
    return PruningError(
        f"cannot resume with {flag_of(name)} {new!r}: the checkpoint's run has "
        f"{old!r} (only {may} may change)"
    )


# ---------------------------------------------------------------------- run
def _stop_rule(interrupts: Interrupts, budget: float | None) -> Callable:
    """The loop's ``stop``: after a first signal, or once ``budget`` minutes pass."""
    deadline = None if budget is None else time.monotonic() + 60 * budget

    def stop() -> str | None:
        if interrupts.received is not None:
            return "interrupted"
        if deadline is not None and time.monotonic() >= deadline:
            return "time_budget"
        return None

    return stop


def _cmd_prune(args: argparse.Namespace) -> int:
    plan = _plan(args)
    interrupts = Interrupts(stop_first=True, notice=_NOTICE)
    stop = _stop_rule(interrupts, plan.preset.run.time_budget)
    if not (plan.progress and sys.stderr.isatty()):
        hide_loading_bars()
    import torch

    from icbs_opt.memory import release_freed_memory

    release_freed_memory()
    if plan.preset.run.threads is not None:
        torch.set_num_threads(plan.preset.run.threads)
    task = plan.spec.build(plan.options)
    pruner, start, resume = _start(plan, task)
    for stale in plan.stale:  # --overwrite: a later --resume must not find it
        os.unlink(stale)
    try:
        with interrupts.installed():
            result = _prune(plan, task, pruner, stop, resume)
            interrupts.abandonable = False  # from here on the results are written
            summary = _finish(plan, task, pruner, result, start, interrupts.received)
            if plan.outputs.get("json") != "-":  # stdout is the JSON's alone
                print_prune_table(summary)
            failed = write_outputs(plan, task, pruner, summary, result)
    finally:
        pruner.close()
    if result.stopped:
        print_stop(plan.outputs, summary, failed)
    elif plan.zero_shot:  # after the outputs: an interrupt here loses nothing
        summary["zero_shot"] = task.zero_shot(
            task.model,
            plan.zero_shot,
            plan.limit,
            dtype=plan.zero_shot_dtype,
            progress=plan.progress,
        )
        if plan.outputs.get("json") != "-":
            print("\n".join(format_zero_shot(summary["zero_shot"])))
        writes = summary_writes(plan, summary, result)
        failed += write_each([w for w in writes if w is not None])
    if failed:
        return EXIT_WRITE_FAILED
    if result.stopped == "executor_failed":
        return EXIT_EXECUTOR_FAILED
    return interrupts.exit_status


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
    with _no_tabu_notes(plan.preset.run.steps == 0):
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


@contextlib.contextmanager
def _no_tabu_notes(quiet: bool) -> Iterator[None]:
    """Drop the notes on tabu lists while ``quiet`` (``--steps 0`` uses none)."""
    log = logging.getLogger("icbs_opt.pruning.state")
    drop = lambda record: "tabu" not in str(record.msg)  # noqa: E731
    if quiet:
        log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


def _prune(plan: PrunePlan, task: Any, pruner: Any, stop: Callable, resume: Any) -> Any:
    """The loop, with progress, validation, checkpoints and ``stop``."""
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
            stop=stop,
            checkpoint=lambda result: _save_checkpoint(plan, pruner, result),
            checkpoint_every=run.checkpoint_every if plan.checkpoint else 0,
            resume=resume,
        )


def _save_checkpoint(plan: PrunePlan, pruner: Any, result: Any) -> bool:
    """Write the checkpoint; a failure (a full disk) is a one-line warning, once.

    Returns:
        Whether the checkpoint was written.
    """
    try:
        plan.record.write_checkpoint(plan.checkpoint, pruner, result)  # type: ignore[arg-type]
    except write_errors() as exc:
        if not plan.checkpoint_failed:
            where, why = plan.checkpoint, os_reason(exc)
            print(f"icbs-opt: warning: cannot write the checkpoint {where!r}: {why}; "
                  "going on without it", file=sys.stderr)  # fmt: skip
        plan.checkpoint_failed = True
        return False
    return True


def _finish(
    plan: PrunePlan,
    task: Any,
    pruner: Any,
    result: Any,
    start: dict[str, Any],
    signal: str | None,
) -> dict[str, Any]:
    """Checkpoint, restore the best mask (``--keep-best``), and summarise."""
    from icbs_opt.pruning import nonzero_density
    from icbs_opt.pruning.loop import restore_best

    config, run = plan.preset.config, plan.preset.run
    checkpoint = None
    if plan.checkpoint and (result.stopped or run.checkpoint_every or plan.resume):
        if _save_checkpoint(plan, pruner, result):  # before the best mask is restored
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
                 "loss": init["loss"], **per_corpus(init),
                 "density": start["init_density"], "seconds": start["init_seconds"]},
        "final": {"metric": final["metric"], "loss": final["loss"],
                  **per_corpus(final),
                  "density": nonzero_density(task.model, start["layers"]),
                  "steps": result.steps_done, "blocks": len(result.records),
                  "accepted": result.accepted, "seconds": result.seconds},
        "steps_done": result.steps_done,
        "stopped": result.stopped,
        "interrupted": signal is not None,
        "signal": signal,
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


def _progress_callbacks(bar: Any, task: Any) -> tuple[Callable, Callable]:
    """``on_pass`` and ``evaluate`` that keep the bar's postfix current."""
    shown: dict[str, Any] = {"blocks": 0, "accepted": 0}

    def on_pass(record: Any) -> None:
        if record.blocks:  # a pass feeds blocks of several layers: the last one
            shown["layer"] = record.blocks[-1].layer
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
