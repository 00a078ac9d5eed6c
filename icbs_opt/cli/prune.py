"""``icbs-opt prune`` and ``evaluate``: the pruning half's commands.

A run starts from its task's :class:`~icbs_opt.settings.Preset`; the flags given
replace single fields of it, and the JSON, ``--help`` and ``prune_config.json``
show the values the run really uses. Everything cheap (settings, backend, task
options, output paths) is checked before the model loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from icbs_opt.backends import Backend, get_backend
from icbs_opt.cli.common import (
    add_backend_option_flag,
    add_json_flag,
    hide_loading_bars,
    parse_key_values,
    progress_bar,
    write_json,
)
from icbs_opt.errors import DataError, PruningError
from icbs_opt.settings import Preset
from icbs_opt.tasks import TaskSpec, task_names, task_spec

#: Settings flags of `prune`: (flag, PruneConfig or RunSettings field, keywords).
SETTING_FLAGS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("--density", "density", {"type": float, "help": "fraction of weights kept"}),
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
    ("--block-size", "block_size", {"type": int, "help": "weights per block, n"}),
    ("--k", "k", {"type": int, "help": "pruned weights per block (n // 2 if unset)"}),
    ("--init", "init", {"help": "initial mask: magnitude, wanda, gradient, random; "
                        "the first three also *_per_output, *_per_input"}),
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
    ("--seed", "seed", {"type": int, "help": "seed of every random choice"}),
)  # fmt: skip


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


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
        if f.type in ("bool", bool):
            kwargs.update(action="store_const", const=True)
        else:
            kwargs["metavar"] = name.upper()
        group.add_argument(_flag(name), dest=f"task_{name}", default=None, **kwargs)


def add_prune(sub: argparse._SubParsersAction) -> None:
    """Add the ``prune`` command."""
    p = sub.add_parser("prune", help="prune a task's model with iCBS")
    p.add_argument(
        "--task",
        help=f"task: {', '.join(task_names())} (default digits-mlp; causal-lm "
        "when --model is given)",
    )
    p.add_argument("--backend", default="native", help="backend (default native)")
    add_backend_option_flag(p)
    p.add_argument("--layers", help="comma-separated module names (default: task's)")
    p.add_argument("--out", metavar="DIR", help="write masks, model, settings, results")
    add_json_flag(p, "the results summary")
    p.add_argument("--plot", metavar="FILE.png", help="plot the metric against steps")
    p.add_argument(
        "--harvest", metavar="DIR", help="save every block problem as .npz in DIR"
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    group = p.add_argument_group("pruning settings (default: the task's preset)")
    for flag, dest, kwargs in SETTING_FLAGS:
        text = kwargs["help"] + _preset_default(dest)
        group.add_argument(flag, dest=dest, default=None, **{**kwargs, "help": text})
    _add_task_options(p)
    p.set_defaults(func=_cmd_prune)


# --------------------------------------------------------------------- plan
@dataclass
class PrunePlan:
    """Everything a `prune` run needs, validated before any model loads."""

    spec: TaskSpec
    options: Any
    preset: Preset
    backend: Backend
    layers: list[str] | None
    outputs: dict[str, str]
    progress: bool


def _given_task_options(args: argparse.Namespace) -> dict[str, Any]:
    given = {name: getattr(args, f"task_{name}", None) for name in _option_fields()}
    return {k: v for k, v in given.items() if v is not None}


def _plan(args: argparse.Namespace) -> PrunePlan:
    """Settings, backend, task options and output paths, checked cheaply."""
    spec = task_spec(args.task or ("causal-lm" if args.task_model else "digits-mlp"))
    given = {dest: getattr(args, dest) for _, dest, _ in SETTING_FLAGS}
    preset = spec.preset.replace(**{k: v for k, v in given.items() if v is not None})
    options = spec.make_options(**_given_task_options(args))
    backend_options = parse_key_values(args.backend_option, "--backend-option")
    backend = get_backend(args.backend, **backend_options)
    layers = [s.strip() for s in args.layers.split(",")] if args.layers else None
    outputs = {
        "out": args.out,
        "json": args.json,
        "plot": args.plot,
        "harvest": args.harvest,
    }
    outputs = {k: v for k, v in outputs.items() if v is not None}
    for key, path in outputs.items():
        _check_output(path, folder=key in ("out", "harvest"))
    return PrunePlan(
        spec, options, preset, backend, layers, outputs, not args.no_progress
    )


def _check_output(path: str, *, folder: bool) -> None:
    """Fail now, not after the run, if ``path`` cannot be written."""
    if path == "-" and not folder:
        return
    target = Path(path)
    if folder and target.exists() and not target.is_dir():
        raise DataError(f"output folder {path!r} is an existing file")
    if not folder and target.is_dir():
        raise DataError(f"output file {path!r} is a directory")
    parent = target if folder and target.is_dir() else target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise DataError(f"cannot write {path!r}: {str(parent)!r} is not writable")


# ---------------------------------------------------------------------- run
def _cmd_prune(args: argparse.Namespace) -> int:
    plan = _plan(args)
    if not (plan.progress and sys.stderr.isatty()):
        hide_loading_bars()
    import torch

    if plan.preset.run.threads is not None:
        torch.set_num_threads(plan.preset.run.threads)
    task = plan.spec.build(plan.options)
    summary, pruner, result = _run(plan, task)
    if plan.outputs.get("json") != "-":  # stdout is the JSON's alone
        _print_prune_table(summary)
    _write_outputs(plan, task, pruner, summary, result)
    return 0


def _run(plan: PrunePlan, task: Any) -> tuple[dict[str, Any], Any, Any]:
    """Evaluate the dense model, prune, and summarise."""
    from icbs_opt.compare import Harvester
    from icbs_opt.pruning import Pruner, nonzero_density, prune
    from icbs_opt.pruning.state import resolve_layers

    config, run = plan.preset.config, plan.preset.run
    layers = [n for n, _ in resolve_layers(task.model, plan.layers or task.layers)]
    dense = {
        **task.evaluate(task.model),
        "density": nonzero_density(task.model, layers),
    }
    harvest = plan.outputs.get("harvest")
    start = time.perf_counter()
    pruner = Pruner(
        task.model,
        task.loss_fn,
        backend=plan.backend,
        layers=layers,
        calibration=task.calibration,
        problem_hook=Harvester(harvest, task.name) if harvest else None,
        config=config,
    )
    init_seconds = time.perf_counter() - start
    init_density = nonzero_density(task.model, layers)
    with progress_bar(run.steps, "prune", "pass", enabled=plan.progress) as bar:
        on_pass, evaluate = _progress_callbacks(bar, task)
        try:
            result = prune(
                pruner,
                task.batches(config.seed),
                run.steps,
                evaluate=evaluate,
                eval_every=run.eval_every,
                on_pass=on_pass,
            )
        finally:
            pruner.close()
    init, final = result.history[0], result.history[-1]
    summary = {
        "task": task.name,
        "density": config.density,
        "backend": plan.backend.name,
        "seed": config.seed,
        "metric": task.metric,
        "dense": dense,
        "init": {"method": config.init, "metric": init["metric"],
                 "loss": init["loss"], "density": init_density,
                 "seconds": init_seconds},
        "final": {"metric": final["metric"], "loss": final["loss"],
                  "density": nonzero_density(task.model, layers),
                  "steps": run.steps, "blocks": len(result.records),
                  "accepted": result.accepted, "seconds": result.seconds},
        "settings": plan.preset.to_dict(),
        "layers": layers,
        "executor": pruner.executor.description,
        "history": result.history,
        "passes": [p.to_dict() for p in result.passes],
    }  # fmt: skip
    return summary, pruner, result


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
    print(
        f"{s['task']}: density {s['density']:g}, backend {s['backend']}, "
        f"seed {s['seed']}"
    )
    print(f"{'':>6}  {s['metric']:>11}  {'loss':>9}  {'density':>8}  {'seconds':>8}")
    for label in ("dense", "init", "final"):
        r = s[label]
        seconds = f"{r['seconds']:.2f}" if "seconds" in r else "-"
        print(
            f"{label:>6}  {r['metric']:>11.4g}  {r['loss']:>9.4f}  "
            f"{r['density']:>8.4f}  {seconds:>8}"
        )
    f = s["final"]
    print(
        f"init {s['init']['method']}; {f['steps']} steps of "
        f"{s['settings']['config']['blocks_per_step']} block(s), "
        f"{f['accepted']} of {f['blocks']} blocks accepted"
    )


# -------------------------------------------------------------------- write
def _write_outputs(
    plan: PrunePlan, task: Any, pruner: Any, summary: dict[str, Any], result: Any
) -> None:
    """The summary JSON, the plot, and the ``--out`` folder."""
    if "json" in plan.outputs:
        write_json(plan.outputs["json"], summary)
    if "plot" in plan.outputs:
        plot_history(summary["history"], task.metric, plan.outputs["plot"])
    out = plan.outputs.get("out")
    if out is None:
        return
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    masks = {name: m.cpu().contiguous() for name, m in pruner.masks().items()}
    save_file(
        masks,
        os.path.join(out, "masks.safetensors"),
        metadata={"convention": "True = kept: weight == original weight * mask"},
    )
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
    steps = [r.to_dict() for r in result.records]
    write_json(os.path.join(out, "results.json"), {**summary, "steps": steps})


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
    fig.savefig(path, dpi=120)
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
    add_json_flag(p, "the result")
    _add_task_options(p, exclude=("model",))
    p.set_defaults(func=_cmd_evaluate)


def _evaluate_target(args: argparse.Namespace) -> tuple[str, Callable[[], Any]]:
    """The task name and a loader of the task with the model to evaluate."""
    from icbs_opt.tasks import load_saved_task

    given = _given_task_options(args)
    given.pop("model", None)  # --model names the folder to evaluate
    if args.task is not None:
        spec = task_spec(args.task)
        options = spec.make_options(**given)
        return args.task, lambda: spec.build(options)
    folder = Path(args.task_model)
    saved = folder / "prune_config.json"
    if not saved.is_file():  # a plain Hugging Face model folder
        spec = task_spec("causal-lm")
        options = spec.make_options(**{**given, "model": str(folder)})
        return "causal-lm", lambda: spec.build(options)
    try:
        run = json.loads(saved.read_text(encoding="utf-8"))
        name, options = run["task"], {**run["task_options"], **given}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"cannot read the run settings {str(saved)!r}: {exc}") from exc
    if "model" in options:  # the pruned model is the folder itself
        options["model"] = str(folder)
    return name, lambda: load_saved_task(name, folder, **options)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from icbs_opt.checks import check_int
    from icbs_opt.pruning import nonzero_density

    if args.threads is not None:
        check_int(args.threads, "--threads", minimum=1, error=PruningError)
    name, load = _evaluate_target(args)
    if not sys.stderr.isatty():
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
        "density": nonzero_density(task.model, task.layers),
        "layers": len(task.layers),
        "info": task.info,
    }
    if args.json is not None:
        write_json(args.json, result)
    if args.json != "-":
        print(
            f"{name}: {task.metric} {scores['metric']:.4f}, loss "
            f"{scores['loss']:.4f}, density {result['density']:.4f} over "
            f"{len(task.layers)} prunable layers"
        )
    return 0
