"""SmolLM2-135M benchmark: the figures of docs/benchmarks.md, "SmolLM2-135M".

SmolLM2-135M-Instruct (GGUF -> float32, CPU) on WikiText-2, perplexity on the first
``--eval-windows`` windows of 512 test tokens. Phases:

1. dense perplexity;
2. one-shot baselines at every ``--densities``: ``magnitude`` and
   ``wanda_per_output`` (calibration: the first 32 windows of valid.txt);
3. iCBS at every ``--icbs-densities`` and every ``--blocks-per-step`` M (one
   forward/backward pass feeds M blocks) with the task's preset (the settings of
   ``icbs-opt prune --task smollm2-135m``: Wanda per-output init, blocks of 1024,
   one window per forward/backward, the paper's settings: gradient selection,
   empirical Fisher, grad multiplier 0.75, ridge 1e-3, tabu 0.4, fix fractions
   0.42/0.35) and batches of 8 x 512 valid tokens, evaluated every
   ``--eval-every`` passes; a run stops early once its pruning time (the
   Pruner's construction included) passes ``--max-minutes``. ``--steps`` (passes),
   ``--block-size``, ``--max-batch-size``, ``--tape-dtype`` and ``--check-pass``
   replace single fields of the preset.

Prints the tables and the mean per-step time split; ``--json`` keeps everything.

    python benchmarks/llm.py                                  # issue 4's figures
    python benchmarks/llm.py --steps 300 --eval-every 50 --icbs-densities 0.5 0.7
    python benchmarks/llm.py --steps 0 --densities 0.5 0.7    # baselines only
    python benchmarks/llm.py --densities --blocks-per-step 210 64 16 1 \
        --steps 1000 --max-minutes 30 6 6 5 --eval-every 2 4 8 1000 \
        --tape-dtype bfloat16 float32 float32 float32 --check-pass 210
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import torch
from smollm2 import PRESET, add_task_args, load_task, make_pruner

from icbs_opt.pruning import Pruner, nonzero_density

PHASES = ("record", "select", "qubo", "solve", "check", "total")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def evaluate(task) -> tuple[float, float]:
    start = time.perf_counter()
    ppl = task.evaluate(task.model)["metric"]
    return ppl, time.perf_counter() - start


def icbs_pruner(task, density: float, init: str, args, blocks: int = 1) -> Pruner:
    """A pruner with the task's preset, this run's fields replaced."""
    return make_pruner(
        task,
        args,
        density=density,
        init=init,
        blocks_per_step=blocks,
        tape_dtype=args.tape_dtype_now,
        check_pass=blocks in args.check_pass,
    )


def baseline(task, density: float, init: str, args) -> dict:
    start = time.perf_counter()
    pruner = icbs_pruner(task, density, init, args)
    seconds = time.perf_counter() - start
    ppl, _ = evaluate(task)
    pruner.restore_dense()  # the next run starts from the dense model
    density_now = nonzero_density(task.model, task.layers)
    print(
        f"  {init:<18} density {density_now:.4f}  perplexity {ppl:9.2f}  "
        f"(init {seconds:.0f} s)",
        flush=True,
    )
    return {"init": init, "density": density, "perplexity": ppl, "seconds": seconds}


def icbs(task, density: float, blocks: int, args, save=lambda run: None) -> dict:
    """One iCBS run; ``save(run)`` is called with the partial run at every eval."""
    start = time.perf_counter()
    pruner = icbs_pruner(task, density, PRESET.config.init, args, blocks)
    seconds = time.perf_counter() - start  # pruning time includes construction
    ppl, _ = evaluate(task)
    curve = [{"pass": 0, "blocks": 0, "perplexity": ppl, "seconds": seconds}]
    print(f"  pass {0:>4}  perplexity {ppl:8.2f}  (init {seconds:.0f} s)")
    batches = task.batches(args.seed)
    passes: list[dict] = []
    run = {"density": density, "blocks_per_step": blocks, "curve": curve}
    for s in range(1, args.steps + 1):
        X, y = next(batches)
        record = pruner.run_pass(X, y)
        seconds += record.seconds["total"]
        passes.append(record.to_dict())
        out_of_time = seconds > 60 * args.max_minutes_now
        ends = (seconds, seconds + record.seconds["total"])  # this and the next
        last_before = any(ends[0] <= 60 * m < ends[1] for m in args.eval_minutes)
        if (
            s == args.steps
            or s % args.eval_every_now == 0
            or out_of_time
            or (last_before)
        ):
            ppl, eval_seconds = evaluate(task)
            done = sum(p["blocks"] for p in passes)
            accepted = sum(p["accepted"] for p in passes)
            curve.append(
                {"pass": s, "blocks": done, "perplexity": ppl, "seconds": seconds}
            )
            print(
                f"  pass {s:>4}  blocks {done:>5}  perplexity {ppl:8.2f}  pruning "
                f"{seconds / 60:6.1f} min  accepted {accepted:>5}  rolled back "
                f"{sum(p['rolled_back'] for p in passes)}  (eval {eval_seconds:.0f}"
                f" s, peak RSS {peak_rss_gb():.2f} GiB)",
                flush=True,
            )
            save({**run, "passes": passes})
        if out_of_time:
            print(f"  stopped: pruning time passed {args.max_minutes_now} minutes")
            break
    pruner.close()
    split = {p: float(np.mean([r["seconds"][p] for r in passes])) for p in PHASES}
    print("  mean pass: " + ", ".join(f"{p} {split[p]:.2f} s" for p in PHASES))
    final = nonzero_density(task.model, task.layers)
    pruner.restore_dense()  # the next run starts from the dense model
    return {**run, "final_density": final, "mean_pass_seconds": split,
            "passes": passes}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--densities", type=float, nargs="*", default=[0.5, 0.7])
    p.add_argument("--icbs-densities", type=float, nargs="*", default=[0.5])
    p.add_argument("--steps", type=int, default=PRESET.run.steps, help="passes")
    p.add_argument("--blocks-per-step", type=int, nargs="+", default=[1])
    p.add_argument("--tape-dtype", nargs="+", default=[PRESET.config.tape_dtype])
    p.add_argument(
        "--check-pass",
        type=int,
        nargs="*",
        default=[],
        metavar="M",
        help="the --blocks-per-step values run with the pass check",
    )
    p.add_argument("--eval-every", type=int, nargs="+", default=[50])
    p.add_argument("--max-minutes", type=float, nargs="+", default=[float("inf")])
    p.add_argument(
        "--eval-minutes",
        type=float,
        nargs="*",
        default=[],
        metavar="MIN",
        help="also evaluate after the last pass predicted to end by each MIN",
    )
    add_task_args(p)
    args = p.parse_args()
    start = time.perf_counter()
    task = load_task(args)
    load_seconds = time.perf_counter() - start
    dense_ppl, eval_seconds = evaluate(task)
    print(
        f"SmolLM2-135M: loaded in {load_seconds:.0f} s; dense perplexity "
        f"{dense_ppl:.2f} on {task.info['eval_tokens']} test tokens "
        f"(eval {eval_seconds:.0f} s); torch threads {torch.get_num_threads()}",
        flush=True,
    )
    report = {
        "load_seconds": load_seconds,
        "dense_perplexity": dense_ppl,
        "eval_seconds": eval_seconds,
        "baselines": [],
        "icbs": [],
        "settings": {**vars(args), "max_minutes": [str(m) for m in args.max_minutes]},
        "preset": PRESET.to_dict(),
        "task_info": task.info,
        "threads": torch.get_num_threads(),
    }

    def save(run: dict | None = None) -> None:
        """Write the report so far (a killed run keeps its evaluated points)."""
        if args.json:
            partial = {**report, "icbs": report["icbs"] + ([run] if run else [])}
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(partial, f, indent=2)

    args.tape_dtype_now = args.tape_dtype[0]  # baselines record no tape
    for density in args.densities:
        print(f"one-shot, density {density}:", flush=True)
        for init in ("magnitude", "wanda_per_output"):
            report["baselines"].append(baseline(task, density, init, args))
    per_m = {  # one value for every M, or one per --blocks-per-step entry
        key: dict.fromkeys(args.blocks_per_step, values[0])
        if len(values) == 1
        else dict(zip(args.blocks_per_step, values, strict=True))
        for key, values in (
            ("eval_every", args.eval_every),
            ("max_minutes", args.max_minutes),
            ("tape_dtype", args.tape_dtype),
        )
    }
    runs = [(d, m) for d in args.icbs_densities for m in args.blocks_per_step]
    for density, blocks in runs if args.steps > 0 else ():
        for key, values in per_m.items():
            setattr(args, key.replace("-", "_") + "_now", values[blocks])
        print(
            f"iCBS from {PRESET.config.init}, density {density}, {blocks} block(s) "
            f"of {args.block_size} per pass, at most {args.steps} passes:",
            flush=True,
        )
        report["icbs"].append(icbs(task, density, blocks, args, save))
        save()
    report["peak_rss_gib"] = peak_rss_gb()
    print(f"process peak RSS {report['peak_rss_gib']:.2f} GiB")
    save()


if __name__ == "__main__":
    main()
