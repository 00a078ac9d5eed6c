"""SmolLM2-135M weight reconstruction benchmark (issue 11): SparseGPT and refits.

SmolLM2-135M-Instruct on WikiText-2 as in ``benchmarks/llm.py`` (perplexity on the
first ``--eval-windows`` windows of 512 test tokens; calibration: the first
``--calib-windows`` windows of valid.txt). Rows, at every ``--densities``:

1. ``sparsegpt``: SparseGPT alone (``--init sparsegpt --steps 0``);
2. ``wanda_per_output + refit`` and ``magnitude + refit`` (``--steps 0 --refit``);
3. iCBS with the task's preset (Wanda per-output init unless ``--icbs-init``),
   ``--steps`` passes of ``--blocks-per-step`` blocks, its perplexity before and
   after a final refit (at the densities in ``--icbs-densities``).

Times are wall seconds of each phase (init, passes, refit); ``--json`` keeps all.

    python benchmarks/sparsegpt.py                         # the issue-11 table
    python benchmarks/sparsegpt.py --densities 0.5 --icbs-densities 0.5 \\
        --steps 10 --blocks-per-step 64 --refit-target current
    python benchmarks/sparsegpt.py --calib-windows 2 --eval-windows 2 --steps 1 \\
        --blocks-per-step 2 --block-size 64                # a smoke run
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from smollm2 import PRESET, add_task_args, load_task, make_pruner

from icbs_opt.pruning import Pruner, nonzero_density


def pruner_for(task, density: float, init: str, args, **fields) -> Pruner:
    """A pruner with the task's preset, this row's fields replaced."""
    return make_pruner(
        task, args, density=density, init=init, refit_target=args.refit_target,
        **fields,
    )  # fmt: skip


def perplexity(task) -> float:
    return float(task.evaluate(task.model)["metric"])


def report(row: dict) -> dict:
    times = ", ".join(f"{k} {v:.0f} s" for k, v in row["seconds"].items())
    print(
        f"  {row['method']:<28} density {row['density']:.4f}  perplexity "
        f"{row['perplexity']:9.2f}  ({times})",
        flush=True,
    )
    return row


def one_shot(task, density: float, init: str, refit: bool, args) -> dict:
    """An initial mask (and a refit of it), evaluated, then the dense model back."""
    t = time.perf_counter()
    pruner = pruner_for(task, density, init, args)
    seconds = {"init": time.perf_counter() - t}
    if refit:
        seconds["refit"] = pruner.refit()
    method = init + (" + refit" if refit else "")
    row = {
        "method": method,
        "density": nonzero_density(task.model, task.layers),
        "perplexity": perplexity(task),
        "seconds": seconds,
    }
    pruner.restore_dense()
    return report(row)


def icbs(task, density: float, args) -> list[dict]:
    """iCBS passes, evaluated before and after a final refit."""
    t = time.perf_counter()
    pruner = pruner_for(
        task, density, args.icbs_init, args, blocks_per_step=args.blocks_per_step
    )
    seconds = {"init": time.perf_counter() - t, "passes": 0.0}
    batches = task.batches(args.seed)
    accepted = 0
    for _ in range(args.steps):
        record = pruner.run_pass(*next(batches))
        seconds["passes"] += record.seconds["total"]
        accepted += record.accepted
    name = f"iCBS {args.steps} x {args.blocks_per_step} ({args.icbs_init})"
    rows = [
        report(
            {
                "method": name,
                "density": nonzero_density(task.model, task.layers),
                "perplexity": perplexity(task),
                "seconds": dict(seconds),
                "accepted": accepted,
            }
        )
    ]
    seconds["refit"] = pruner.refit()
    rows.append(
        report(
            {
                **rows[0],
                "method": name + " + refit",
                "perplexity": perplexity(task),
                "seconds": seconds,
            }
        )
    )
    pruner.close()
    pruner.restore_dense()
    return rows


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--densities", type=float, nargs="*", default=[0.5, 0.7])
    p.add_argument("--icbs-densities", type=float, nargs="*", default=[0.5, 0.7])
    p.add_argument("--steps", type=int, default=PRESET.run.steps, help="passes")
    p.add_argument("--blocks-per-step", type=int, default=PRESET.config.blocks_per_step)
    p.add_argument("--icbs-init", default=PRESET.config.init)
    p.add_argument(
        "--refit-target", default=PRESET.config.refit_target, help="dense or current"
    )
    p.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=["sparsegpt", "wanda", "magnitude", "icbs"],
    )
    add_task_args(p)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    task = load_task(args)
    dense = perplexity(task)
    print(
        f"SmolLM2-135M: dense perplexity {dense:.2f}; torch threads "
        f"{torch.get_num_threads()}; refit target {args.refit_target}",
        flush=True,
    )
    rows: list[dict] = []
    for density in args.densities:
        print(f"density {density}:")
        if "sparsegpt" not in args.skip:
            rows.append(one_shot(task, density, "sparsegpt", False, args))
        for init in ("wanda_per_output", "magnitude"):
            if init.split("_")[0] not in args.skip:
                rows.append(one_shot(task, density, init, True, args))
        if "icbs" not in args.skip and density in args.icbs_densities:
            rows.extend(icbs(task, density, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dense": dense, "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
