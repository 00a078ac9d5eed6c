"""The ``icbs-opt`` command line.

Each subcommand is a pair ``_add_<name>(subparsers)`` / ``_cmd_<name>(args) -> int``.
Errors of the library (bad input, unknown names, unavailable backends, missing
files) print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from icbs_opt.backends import available_backends, backend_class, get_backend
from icbs_opt.errors import (
    BackendError,
    BackendUnavailable,
    DataError,
    ProblemError,
    PruningError,
)
from icbs_opt.problems import BlockProblem

#: Exceptions reported as one line with exit status 2.
USER_ERRORS = (
    BackendError,
    BackendUnavailable,
    DataError,
    ProblemError,
    PruningError,
    OSError,
)


def parse_key_values(items: Sequence[str] | None, flag: str) -> dict[str, str]:
    """Turn ``["a=1", "b=x"]`` into ``{"a": "1", "b": "x"}``.

    Raises:
        BackendError: For an item without ``=``.
    """
    out: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BackendError(f"{flag} expects key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _add_backend_option_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend-option",
        action="append",
        metavar="KEY=VALUE",
        help="a backend option (repeatable); see `icbs-opt backends`",
    )


# ------------------------------------------------------------------- backends
def _add_backends(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "backends", help="list solver backends, their status and options"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_backends)


def _cmd_backends(args: argparse.Namespace) -> int:
    rows = []
    for name, reason in available_backends().items():
        cls = backend_class(name)
        rows.append(
            {
                "name": name,
                "available": reason is None,
                "reason": reason,
                "max_n": cls().size_limit(),
                "options": [
                    {
                        "name": o.name,
                        "kind": o.kind,
                        "default": o.default,
                        "help": o.help,
                    }
                    for o in cls.options
                ],
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    for row in rows:
        status = "available" if row["available"] else f"unavailable: {row['reason']}"
        limit = f", n <= {row['max_n']}" if row["max_n"] is not None else ""
        print(f"{row['name']}  ({status}{limit})")
        for o in row["options"]:
            print(f"    {o['name']} [{o['kind']}] = {o['default']!r}  {o['help']}")
    return 0


# ---------------------------------------------------------------------- solve
def _add_solve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("solve", help="solve one block problem file (.npz or UBQP text)")
    p.add_argument("file", help="problem file: .npz (arrays Q, k) or UBQP text")
    p.add_argument("--backend", default="native", help="backend name (default native)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--k", type=int, default=None, help="override the file's k")
    _add_backend_option_flag(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_solve)


def _cmd_solve(args: argparse.Namespace) -> int:
    problem = BlockProblem.load(args.file, k=args.k)
    options = parse_key_values(args.backend_option, "--backend-option")
    backend = get_backend(args.backend, **options)
    sol = backend.solve(problem, seed=args.seed)
    if args.json:
        record = {"backend": args.backend, "n": problem.n, "k": problem.k}
        print(json.dumps({**record, **sol.to_dict()}, default=_json_default))
        return 0
    print(
        f"backend {args.backend}: n = {problem.n}, k = {problem.k}, "
        f"energy = {sol.energy:.10g}, feasible = {sol.feasible}, "
        f"{sol.seconds:.4f} s"
    )
    return 0


def _json_default(value: Any) -> Any:
    """JSON fallback for numpy scalars and arrays in ``info``."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


# -------------------------------------------------------------------- compare
def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare", help="run several backends on block problems and compare them"
    )
    p.add_argument(
        "--problems",
        nargs="+",
        required=True,
        metavar="PATH",
        help="problem files and/or folders of .npz/.ubqp files",
    )
    p.add_argument(
        "--backends",
        required=True,
        help="comma-separated backend names, e.g. native,neal,exhaustive",
    )
    p.add_argument(
        "--repeats", type=int, default=1, help="runs per problem (default 1)"
    )
    p.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    p.add_argument(
        "--backend-option",
        action="append",
        metavar="NAME.KEY=VALUE",
        help="an option for one backend, e.g. neal.num_reads=20 (repeatable)",
    )
    p.add_argument("--json", metavar="FILE", help="write the summary and runs as JSON")
    p.add_argument("--csv", metavar="FILE", help="write one row per run as CSV")
    p.add_argument("--plot", metavar="FILE.png", help="plot gap and time against n")
    p.set_defaults(func=_cmd_compare)


def _cmd_compare(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from icbs_opt import compare as cmp

    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    per_backend: dict[str, dict[str, str]] = {n: {} for n in names}
    for key, value in parse_key_values(args.backend_option, "--backend-option").items():
        bname, dot, option = key.partition(".")
        if not dot or bname not in per_backend:
            raise BackendError(
                f"--backend-option expects NAME.key=value with NAME one of "
                f"{', '.join(names)}, got {key!r}"
            )
        per_backend[bname][option] = value
    backends = {n: get_backend(n, **opts) for n, opts in per_backend.items()}
    problems, unreadable = cmp.load_problems(cmp.find_problem_files(args.problems))
    total = len(problems) * len(backends) * args.repeats
    with tqdm(total=total, desc="compare", unit="run") as bar:

        def advance(run: cmp.Run) -> None:
            skipped = args.repeats - run.repeat if run.status == "skipped" else 1
            bar.update(skipped)

        result = cmp.compare(
            problems,
            backends,
            repeats=args.repeats,
            seed=args.seed,
            unreadable=unreadable,
            progress=advance,
        )
    print(
        f"{len(problems)} problems ({len(unreadable)} unreadable, skipped), "
        f"{args.repeats} repeat(s) per backend"
    )
    header = (
        "backend",
        "runs",
        "skipped",
        "mean gap",
        "median gap",
        "feasible",
        "success",
        "mean s",
    )
    print("  ".join(f"{h:>11}" for h in header))
    for row in result.summary():
        cells = [
            row["backend"],
            row["runs"],
            row["skipped"],
            row["mean_gap"],
            row["median_gap"],
            row["feasible_fraction"],
            row["success_rate"],
            row["mean_seconds"],
        ]
        print("  ".join(_cell(c) for c in cells))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result.to_dict(), f, indent=2, default=_json_default)
    if args.csv:
        result.write_csv(args.csv)
    if args.plot:
        result.plot(args.plot)
    return 0


def _cell(value: Any) -> str:
    if value is None:
        return f"{'-':>11}"
    if isinstance(value, float):
        return f"{value:>11.4g}"
    return f"{value!s:>11}"


# ---------------------------------------------------------------------- prune
#: `prune` defaults where neither a flag nor the task's ``prune_defaults`` set a
#: value (on top of PAPER_CLASSIFIER_SETTINGS and PruneConfig's defaults).
PRUNE_DEFAULTS: dict[str, Any] = {
    "density": 0.1,
    "block_size": 256,
    "steps": 300,
    "eval_every": 0,
}

#: Pruning flags of `prune`: (flag, PruneConfig field or run setting, keywords).
PRUNE_FLAGS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("--density", "density", {"type": float, "help": "fraction of weights kept"}),
    ("--steps", "steps", {"type": int, "help": "block steps"}),
    ("--block-size", "block_size", {"type": int, "help": "weights per block, n"}),
    ("--k", "k", {"type": int, "help": "pruned weights per block (default n/2)"}),
    (
        "--init",
        "init",
        {
            "help": "magnitude, wanda, gradient, random; the first "
            "three also *_per_output, *_per_input"
        },
    ),
    ("--selection", "selection", {"help": "gradient, magnitude, wanda or random"}),
    (
        "--hessian",
        "hessian",
        {"help": "gradient_per_sample, gradient_mean, exact or exact_piecewise"},
    ),
    ("--grad-multiplier", "grad_multiplier", {"type": float, "help": "lambda_g"}),
    ("--ridge", "ridge_multiplier", {"type": float, "help": "lambda_r"}),
    (
        "--tabu-frac",
        "tabu_frac",
        {"type": float, "help": "tabu size, fraction of free weights"},
    ),
    (
        "--fix-frac-prune",
        "fix_frac_prune",
        {"type": float, "help": "pruned fraction frozen"},
    ),
    (
        "--fix-frac-keep",
        "fix_frac_keep",
        {"type": float, "help": "kept fraction frozen"},
    ),
    ("--schedule", "schedule", {"help": "layer schedule: uniform or log"}),
    (
        "--min-steps-per-layer",
        "min_steps_per_layer",
        {"type": int, "help": "floor of the log schedule"},
    ),
    (
        "--remove-zero-rows",
        "remove_zero_rows",
        {"action": "store_const", "const": True, "help": "prune zero Q rows for free"},
    ),
    (
        "--max-batch-size",
        "max_batch_size",
        {"type": int, "help": "samples per forward/backward"},
    ),
    (
        "--hessian-chunk-size",
        "hessian_chunk_size",
        {"type": int, "help": "Hessian rows per exact_piecewise pass"},
    ),
    (
        "--eval-every",
        "eval_every",
        {"type": int, "help": "evaluate every S steps (0: only before and after)"},
    ),
    ("--seed", "seed", {"type": int, "help": "seed of every random choice"}),
)

#: Task flags of `prune`, passed to ``get_task(task, **{dest: value})`` when given
#: (dest: the flag without dashes, '-' as '_'). A task's own flags go here; a
#: task rejects options it does not take, naming them.
TASK_FLAGS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("--cache-dir", {"help": "digits-mlp: where the trained model is cached"}),
    ("--batch-size", {"type": int, "help": "samples per pruning batch"}),
    ("--device", {"help": "torch device of the model and data"}),
    ("--model", {"metavar": "DIR", "help": "causal-lm: a local Hugging Face model"}),
    ("--seq-len", {"type": int, "help": "LLM tasks: tokens per window (512)"}),
    ("--data-dir", {"help": "LLM tasks: folder of valid.txt/test.txt"}),
    ("--calib-file", {"help": "LLM tasks: calibration/pruning text"}),
    ("--eval-file", {"help": "LLM tasks: perplexity text"}),
    ("--eval-windows", {"type": int, "help": "LLM tasks: eval windows (40)"}),
    ("--calib-windows", {"type": int, "help": "LLM tasks: calibration windows (32)"}),
    ("--eval-batch-size", {"type": int, "help": "LLM tasks: windows per eval pass"}),
)


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _add_prune(sub: argparse._SubParsersAction) -> None:
    import dataclasses

    from icbs_opt.prune_config import PAPER_CLASSIFIER_SETTINGS, PruneConfig

    p = sub.add_parser("prune", help="prune a task's model with iCBS")
    p.add_argument(
        "--task", help="task (default digits-mlp; causal-lm when --model is given)"
    )
    p.add_argument("--backend", default="native", help="backend (default native)")
    _add_backend_option_flag(p)
    p.add_argument("--layers", help="comma-separated module names (default: task's)")
    p.add_argument(
        "--threads", type=int, help="torch CPU threads (default: task's, else torch's)"
    )
    p.add_argument("--out", metavar="DIR", help="write masks, model, config, results")
    p.add_argument("--json", metavar="FILE", help="write the results summary as JSON")
    p.add_argument(
        "--harvest", metavar="DIR", help="save every block problem as .npz in DIR"
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    shown = {f.name: f.default for f in dataclasses.fields(PruneConfig)}
    shown.update(PAPER_CLASSIFIER_SETTINGS)
    shown.update(PRUNE_DEFAULTS)
    group = p.add_argument_group("pruning settings (default: the task's, else shown)")
    for flag, dest, kwargs in PRUNE_FLAGS:
        text = kwargs["help"]
        if shown.get(dest) is not None and "action" not in kwargs:
            text += f" (default {shown[dest]})"
        group.add_argument(flag, dest=dest, default=None, **{**kwargs, "help": text})
    tasks = p.add_argument_group("task options (passed to the task when given)")
    for flag, kwargs in TASK_FLAGS:
        tasks.add_argument(flag, dest=_dest(flag), default=None, **kwargs)
    p.set_defaults(func=_cmd_prune)


def _cmd_prune(args: argparse.Namespace) -> int:
    import time

    import torch
    from tqdm import tqdm

    from icbs_opt.compare import Harvester
    from icbs_opt.pruning import (
        PAPER_CLASSIFIER_SETTINGS,
        PruneConfig,
        Pruner,
        nonzero_density,
        prune,
    )
    from icbs_opt.tasks import get_task

    if args.threads is not None:
        if args.threads < 1:
            raise PruningError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    backend_options = parse_key_values(args.backend_option, "--backend-option")
    backend = get_backend(args.backend, **backend_options)  # fail before any work
    task_options = {_dest(f): getattr(args, _dest(f)) for f, _ in TASK_FLAGS}
    task_options = {k: v for k, v in task_options.items() if v is not None}
    name = args.task or ("causal-lm" if args.model else "digits-mlp")
    task = get_task(name, **task_options)
    given = {dest: getattr(args, dest) for _, dest, _ in PRUNE_FLAGS}
    settings = {
        **PAPER_CLASSIFIER_SETTINGS,
        **PRUNE_DEFAULTS,
        **task.prune_defaults,
        **{k: v for k, v in given.items() if v is not None},
    }
    steps, eval_every = settings.pop("steps"), settings.pop("eval_every")
    threads = settings.pop("threads", None)
    if args.threads is None and threads is not None:
        torch.set_num_threads(threads)  # the task's preference
    config = PruneConfig(**settings)
    layers = [s.strip() for s in args.layers.split(",")] if args.layers else task.layers

    dense = dict(task.evaluate(task.model))
    dense["density"] = nonzero_density(task.model, layers)
    start = time.perf_counter()
    pruner = Pruner(
        task.model,
        task.loss_fn,
        backend=backend,
        layers=layers,
        calibration=task.calibration,
        problem_hook=Harvester(args.harvest, task.name) if args.harvest else None,
        config=config,
    )
    init_seconds = time.perf_counter() - start
    init_density = nonzero_density(task.model, layers)
    with tqdm(total=steps, desc="prune", unit="step", disable=args.no_progress) as bar:
        accepted = 0
        shown: dict[str, str] = {}  # the metric at the last evaluation point

        def advance(record: Any) -> None:
            nonlocal accepted
            accepted += record.accepted
            bar.set_postfix(
                layer=record.layer, accepted=accepted, **shown, refresh=False
            )
            bar.update()

        def evaluate(model: Any) -> dict[str, float]:
            scores = task.evaluate(model)
            shown[task.metric] = f"{scores['metric']:.4g}"
            bar.set_postfix(accepted=accepted, **shown)
            return scores

        result = prune(
            pruner,
            task.batches(config.seed),
            steps,
            evaluate=evaluate,
            eval_every=eval_every,
            on_step=advance,
        )
    init, final = result.history[0], result.history[-1]
    summary = {
        "task": task.name,
        "density": config.density,
        "backend": backend.name,
        "seed": config.seed,
        "metric": task.metric,
        "dense": dense,
        "init": {
            "method": config.init,
            "metric": init["metric"],
            "loss": init["loss"],
            "density": init_density,
            "seconds": init_seconds,
        },
        "final": {
            "metric": final["metric"],
            "loss": final["loss"],
            "density": nonzero_density(task.model, layers),
            "steps": steps,
            "accepted": result.accepted,
            "seconds": result.seconds,
        },
        "history": result.history,
    }
    _print_prune_table(summary)
    if args.json:
        _write_json(args.json, summary)
    if args.out:
        run = {
            "task": task.name,
            "task_options": task_options,
            "backend": backend.name,
            "backend_options": backend.parameters,
            "prune": config.to_dict(),
            "steps": steps,
            "eval_every": eval_every,
            "layers": layers,
            "seed": config.seed,
            "task_info": task.info,
            "versions": _versions(),
        }
        _write_prune_outputs(args.out, task, pruner, run, summary, result.records)
    return 0


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
    print(
        f"init {s['init']['method']}; {s['final']['steps']} steps, "
        f"{s['final']['accepted']} accepted"
    )


def _write_json(path: str, data: Any) -> None:
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=_json_default)


def _versions() -> dict[str, str]:
    import platform
    from importlib import metadata

    from icbs_opt import __version__

    out = {"icbs-opt": __version__, "python": platform.python_version()}
    for dist in (
        "torch",
        "numpy",
        "dimod",
        "dwave-neal",
        "scikit-learn",
        "safetensors",
        "transformers",
    ):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def _write_prune_outputs(
    out: str,
    task: Any,
    pruner: Any,
    run: dict[str, Any],
    summary: dict[str, Any],
    records: Sequence[Any],
) -> None:
    """Write masks.safetensors, the model, config.json and results.json."""
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    masks = {name: m.cpu().contiguous() for name, m in pruner.masks().items()}
    save_file(
        masks,
        os.path.join(out, "masks.safetensors"),
        metadata={"convention": "True = kept: weight == original weight * mask"},
    )
    files = task.save_model(task.model, out)
    # a Hugging Face model owns config.json; the run settings then go beside it
    taken = any(os.path.basename(f) == "config.json" for f in files)
    _write_json(os.path.join(out, "prune_config.json" if taken else "config.json"), run)
    steps = [r.to_dict() for r in records]
    _write_json(os.path.join(out, "results.json"), {**summary, "steps": steps})


# ------------------------------------------------------------------- evaluate
def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="perplexity and density of a causal LM (e.g. prune --out)"
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="DIR", help="a local Hugging Face causal LM")
    src.add_argument("--task", help="a built-in LLM task's dense model: smollm2-135m")
    p.add_argument("--data-dir", help="folder of test.txt (default: see docs/llm.md)")
    p.add_argument("--eval-file", help="text file to score (default DATA_DIR/test.txt)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window (512)")
    p.add_argument("--eval-windows", type=int, default=40, help="windows scored (40)")
    p.add_argument("--eval-batch-size", type=int, default=4, help="windows per pass")
    p.add_argument(
        "--threads", type=int, help="torch CPU threads (default: task's, else torch's)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from icbs_opt import llm

    if args.threads is not None:
        if args.threads < 1:
            raise DataError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.task is not None:
        if args.task != "smollm2-135m":
            raise DataError(f"evaluate --task takes smollm2-135m, got {args.task!r}")
        model, tokenizer = llm.load_smollm2()
    else:
        model, tokenizer = llm.load_causal_lm(args.model)
    result = llm.evaluate_causal_lm(
        model,
        tokenizer,
        data_dir=args.data_dir,
        eval_file=args.eval_file,
        seq_len=args.seq_len,
        eval_windows=args.eval_windows,
        batch_size=args.eval_batch_size,
    )
    if args.json:
        print(json.dumps({"model": args.model or args.task, **result}))
        return 0
    print(
        f"perplexity {result['perplexity']:.4f} on {result['eval_windows']} x "
        f"{args.seq_len} tokens of {result['eval_file']}"
    )
    print(
        f"density {result['density']:.4f} over {result['layers']} prunable layers "
        f"({result['weights']} weights; embeddings, norms and lm_head excluded)"
    )
    return 0


# ----------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    """Return the ``icbs-opt`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="icbs-opt",
        description="Prune neural networks with iCBS and compare block-QUBO solvers.",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="more log output (-vv: debug)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = (_add_backends, _add_solve, _add_compare, _add_prune, _add_evaluate)
    for add in commands:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"icbs-opt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("icbs-opt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
