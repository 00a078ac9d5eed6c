"""SmolLM2-135M one-shot pruners, iCBS and refits (issues 11 and 12).

SmolLM2-135M-Instruct on WikiText-2 as in ``benchmarks/llm.py`` (perplexity on the
first ``--eval-windows`` windows of 512 test tokens; calibration: the first
``--calib-windows`` windows of valid.txt). For each of ``--sparsities`` (a density
such as ``0.5`` or an N:M pattern such as ``2:4``) it measures the ``--methods``:

- ``sparsegpt``: SparseGPT alone (``--init sparsegpt --steps 0``);
- ``wanda``, ``magnitude``: the initial masks (Wanda per output row for
  unstructured densities, as the task's preset);
- ``wanda+refit``, ``magnitude+refit``: the same masks after a refit of the kept
  weights (``--steps 0 --refit``);
- ``icbs``, ``icbs+refit``: iCBS with the task's preset from ``--icbs-init``,
  ``--steps`` passes of ``--blocks-per-step`` blocks (after a refit of the init
  with ``--refit-first``), before and after a final refit;
- ``dense``: the dense model (once).

Times are wall seconds of each phase (init, passes, refit); ``--json`` keeps all.

    python benchmarks/sparsegpt.py --sparsities 0.5 \\
        --methods sparsegpt wanda wanda+refit magnitude+refit icbs icbs+refit
    python benchmarks/sparsegpt.py --sparsities 2:4 4:8 \\
        --methods magnitude wanda sparsegpt icbs icbs+refit
    python benchmarks/sparsegpt.py --calib-windows 2 --eval-windows 2 --steps 1 \\
        --blocks-per-step 2 --block-size 64 --sparsities 0.5 2:4   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from smollm2 import PRESET, add_task_args, load_task, make_pruner

from icbs_opt.pruning import Pruner, nonzero_density

METHODS = (
    "dense",
    "sparsegpt",
    "wanda",
    "wanda+refit",
    "magnitude",
    "magnitude+refit",
    "icbs",
    "icbs+refit",
)


def sparsity_fields(sparsity: str) -> dict:
    """``{"density": d}`` for a number, ``{"pattern": "N:M"}`` for a pattern."""
    return {"pattern": sparsity} if ":" in sparsity else {"density": float(sparsity)}


def pruner_for(task, sparsity: str, init: str, args, **fields) -> Pruner:
    """A pruner with the task's preset, this row's fields replaced."""
    return make_pruner(
        task, args, init=init, refit_target=args.refit_target,
        **sparsity_fields(sparsity), **fields,
    )  # fmt: skip


def perplexity(task) -> float:
    return float(task.evaluate(task.model)["metric"])


def row(task, sparsity: str, method: str, seconds: dict, **extra) -> dict:
    """One measured row, printed as it comes."""
    out = {
        "sparsity": sparsity,
        "method": method,
        "density": nonzero_density(task.model, task.layers),
        "perplexity": perplexity(task),
        "seconds": dict(seconds),
        **extra,
    }
    times = ", ".join(f"{k} {v:.0f} s" for k, v in out["seconds"].items())
    print(
        f"  {sparsity:>5} {method:<32} density {out['density']:.4f}  perplexity "
        f"{out['perplexity']:9.2f}  ({times})",
        flush=True,
    )
    return out


def one_shot(task, sparsity: str, init: str, methods: set, args) -> list[dict]:
    """An initial mask, evaluated, refit and evaluated as asked; then dense again."""
    name = init.split("_")[0]
    t = time.perf_counter()
    pruner = pruner_for(task, sparsity, init, args)
    seconds = {"init": time.perf_counter() - t}
    rows = []
    if name in methods:
        rows.append(row(task, sparsity, init, seconds))
    if name + "+refit" in methods:
        seconds["refit"] = pruner.refit()
        rows.append(row(task, sparsity, init + " + refit", seconds))
    pruner.restore_dense()
    return rows


def icbs(task, sparsity: str, methods: set, args) -> list[dict]:
    """iCBS passes, evaluated before and after a final refit as asked."""
    t = time.perf_counter()
    pruner = pruner_for(
        task, sparsity, args.icbs_init, args, blocks_per_step=args.blocks_per_step
    )
    seconds = {"init": time.perf_counter() - t}
    if args.refit_first:
        seconds["first refit"] = pruner.refit()
    seconds["passes"] = 0.0
    batches = task.batches(args.seed)
    accepted = 0
    for _ in range(args.steps):
        record = pruner.run_pass(*next(batches))
        seconds["passes"] += record.seconds["total"]
        accepted += record.accepted
    name = f"iCBS {args.steps} x {args.blocks_per_step} ({args.icbs_init})"
    name = "refit, " + name if args.refit_first else name
    rows = []
    if "icbs" in methods:
        rows.append(row(task, sparsity, name, seconds, accepted=accepted))
    if "icbs+refit" in methods:
        seconds["refit"] = pruner.refit()
        rows.append(row(task, sparsity, name + " + refit", seconds, accepted=accepted))
    pruner.close()
    pruner.restore_dense()
    return rows


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sparsities", nargs="+", default=["0.5", "0.7"])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--steps", type=int, default=PRESET.run.steps, help="passes")
    p.add_argument("--blocks-per-step", type=int, default=PRESET.config.blocks_per_step)
    p.add_argument("--icbs-init", default=PRESET.config.init)
    p.add_argument(
        "--refit-first", action="store_true", help="refit the init before iCBS"
    )
    p.add_argument(
        "--refit-target", default=PRESET.config.refit_target, help="dense or current"
    )
    add_task_args(p)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    methods = set(args.methods)
    task = load_task(args)
    print(
        f"SmolLM2-135M; torch threads {torch.get_num_threads()}; refit target "
        f"{args.refit_target}",
        flush=True,
    )
    rows: list[dict] = []
    if "dense" in methods:
        rows.append(row(task, "1", "dense", {}))
    for sparsity in args.sparsities:
        if "sparsegpt" in methods:
            rows.extend(one_shot(task, sparsity, "sparsegpt", methods, args))
        for init in ("wanda_per_output", "magnitude"):
            rows.extend(one_shot(task, sparsity, init, methods, args))
        if methods & {"icbs", "icbs+refit"}:
            rows.extend(icbs(task, sparsity, methods, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
