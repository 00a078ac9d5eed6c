"""Digits pruning benchmark: the figures of docs/benchmarks.md, "Digits pruning".

Runs the digits-mlp task's preset (the settings of ``icbs-opt prune --task
digits-mlp``: density 0.1, blocks of 256, the paper's classifier settings, one torch
thread) from magnitude, wanda and gradient inits to ``--steps`` steps, evaluating
every ``--eval-every`` steps, and prints: the accuracy-vs-steps curve per init, the
time to reach each point (pruning only, evaluations excluded), and the mean
per-step time split. ``--density``, ``--block-size``, ``--threads``,
``--blocks-per-step`` (a step is then a pass of M blocks), ``--check-pass``,
``--check-blocks``, ``--grad-multiplier``, ``--pattern`` (N:M, instead of the
density) and ``--refit`` (a refit of the kept weights after the last step, the
table's last column) replace single fields of the preset; ``--inits`` may also
name ``sparsegpt`` and ``random``, and ``--steps 0`` measures an init alone.

    python benchmarks/digits.py                       # the full table, native
    python benchmarks/digits.py --steps 300 --inits magnitude --seeds 0,1,2
    python benchmarks/digits.py --steps 4 --eval-every 2 --inits magnitude  # smoke
    python benchmarks/digits.py --steps 100 --eval-every 25 --blocks-per-step 3 \
        --inits magnitude --seeds 0,1,2         # 300 blocks, three per pass
    python benchmarks/digits.py --steps 0 --inits magnitude,sparsegpt --refit
    python benchmarks/digits.py --steps 300 --eval-every 300 --pattern 2:4 \
        --inits magnitude,wanda --refit
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from icbs_opt.pruning import Pruner, prune
from icbs_opt.tasks import get_task, task_spec

PRESET = task_spec("digits-mlp").preset  # what `icbs-opt prune` uses by default

PHASES = (
    "forward_backward",
    "select",
    "gradient",
    "hessian",
    "q_build",
    "solve",
    "total",
)


def run(init: str, seed: int, args: argparse.Namespace) -> dict:
    task = get_task("digits-mlp")
    dense = task.evaluate(task.model)["metric"]
    sparsity = {"pattern": args.pattern} if args.pattern else {"density": args.density}
    config = PRESET.replace(
        **sparsity,
        refit=args.refit,
        block_size=args.block_size,
        init=init,
        seed=seed,
        blocks_per_step=args.blocks_per_step,
        check_pass=args.check_pass,
        check_blocks=args.check_blocks,
        grad_multiplier=args.grad_multiplier or PRESET.config.grad_multiplier,
    ).config
    start = time.perf_counter()
    pruner = Pruner(
        task.model,
        task.loss_fn,
        backend=args.backend,
        layers=task.layers,
        calibration=task.calibration,
        config=config,
    )
    init_seconds = time.perf_counter() - start
    result = prune(
        pruner,
        task.batches(seed),
        args.steps,
        evaluate=task.evaluate,
        eval_every=args.eval_every,
    )
    split = {
        p: 1000 * float(np.mean([getattr(r.seconds, p) for r in result.records]))
        for p in PHASES
    }
    return {
        "init": init,
        "seed": seed,
        "dense": dense,
        "init_seconds": init_seconds,
        "history": result.history,
        "accepted": result.accepted,
        "blocks": len(result.records),
        "rolled_back_passes": sum(p.rolled_back for p in result.passes),
        "rolled_back_blocks": sum(r.rolled_back for r in result.records),
        "ms_per_step": split,
        "density": pruner.density(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="native")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--block-size", type=int, default=PRESET.config.block_size)
    parser.add_argument("--density", type=float, default=PRESET.config.density)
    parser.add_argument("--inits", default="magnitude,wanda,gradient")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--threads", type=int, default=PRESET.run.threads)
    parser.add_argument("--blocks-per-step", type=int, default=1, help="M")
    parser.add_argument("--check-pass", action="store_true")
    parser.add_argument("--check-blocks", action="store_true")
    parser.add_argument("--grad-multiplier", type=float)
    parser.add_argument("--pattern", help="N:M pattern instead of --density")
    parser.add_argument("--refit", action="store_true", help="refit after the end")
    parser.add_argument("--json", help="also write all runs to this file")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    runs = [
        run(init, int(seed), args)
        for init in args.inits.split(",")
        for seed in args.seeds.split(",")
    ]
    print(
        f"{args.blocks_per_step} block(s) per step (pass); "
        f"dense accuracy {runs[0]['dense']:.2f}%, backend {args.backend}, "
        f"{torch.get_num_threads()} torch thread(s), "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(
        "\n| init | seed | "
        + " | ".join(f"{h['step']}" for h in runs[0]["history"])
        + " |"
    )
    print("|---|---|" + "---|" * len(runs[0]["history"]))
    for r in runs:
        cells = [f"{h['metric']:.2f}" for h in r["history"]]
        print(f"| {r['init']} | {r['seed']} | " + " | ".join(cells) + " |")
    print("\nseconds of pruning (init + steps, evaluations excluded) at each point:")
    for r in runs:
        cells = [f"{r['init_seconds'] + h['seconds']:.1f}" for h in r["history"]]
        print(f"| {r['init']} | {r['seed']} | " + " | ".join(cells) + " |")
    print("\n| init | seed | accepted | " + " | ".join(PHASES) + " (ms/step) |")
    print("|---|---|---|" + "---|" * len(PHASES))
    for r in runs:
        cells = [f"{r['ms_per_step'][p]:.1f}" for p in PHASES]
        print(
            f"| {r['init']} | {r['seed']} | {r['accepted']}/{r['blocks']} "
            f"({r['rolled_back_passes']} passes, {r['rolled_back_blocks']} blocks "
            "undone) | " + " | ".join(cells) + " |"
        )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            report = {"args": vars(args), "preset": PRESET.to_dict(), "runs": runs}
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
