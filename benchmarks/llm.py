"""SmolLM2-135M benchmark: the figures of docs/benchmarks.md, "SmolLM2-135M".

SmolLM2-135M-Instruct (GGUF -> float32, CPU) on WikiText-2, perplexity on the first
``--eval-windows`` windows of 512 test tokens. Phases:

1. dense perplexity;
2. one-shot baselines at every ``--densities``: ``magnitude`` and
   ``wanda_per_output`` (calibration: the first 32 windows of valid.txt);
3. iCBS at every ``--icbs-densities`` with the task's preset (the settings of
   ``icbs-opt prune --task smollm2-135m``: Wanda per-output init, blocks of 1024,
   one window per forward/backward, the paper's settings: gradient selection,
   empirical Fisher, grad multiplier 0.75, ridge 1e-3, tabu 0.4, fix fractions
   0.42/0.35) and batches of 8 x 512 valid tokens, evaluated every
   ``--eval-every`` steps; a run stops early once its pruning time passes
   ``--max-minutes``. ``--steps``, ``--block-size`` and ``--max-batch-size``
   replace single fields of the preset.

Prints the tables and the mean per-step time split; ``--json`` keeps everything.

    python benchmarks/llm.py                                  # issue 4's figures
    python benchmarks/llm.py --steps 300 --eval-every 50 --icbs-densities 0.5 0.7
    python benchmarks/llm.py --steps 0 --densities 0.5 0.7    # baselines only
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import torch

from icbs_opt.pruning import Pruner, nonzero_density
from icbs_opt.tasks import get_task, task_spec

TASK = "smollm2-135m"
PRESET = task_spec(TASK).preset  # what `icbs-opt prune --task smollm2-135m` uses

PHASES = ("forward_backward", "select", "gradient", "hessian", "q_build", "solve")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def evaluate(task) -> tuple[float, float]:
    start = time.perf_counter()
    ppl = task.evaluate(task.model)["metric"]
    return ppl, time.perf_counter() - start


def make_pruner(task, density: float, init: str, args) -> Pruner:
    """A pruner with the task's preset, the given fields replaced."""
    preset = PRESET.replace(
        density=density,
        init=init,
        block_size=args.block_size,
        max_batch_size=args.max_batch_size,
        seed=args.seed,
    )
    return Pruner(
        task.model,
        task.loss_fn,
        backend=args.backend,
        layers=task.layers,
        calibration=task.calibration,
        config=preset.config,
    )


def baseline(task, density: float, init: str, args) -> dict:
    start = time.perf_counter()
    make_pruner(task, density, init, args)
    seconds = time.perf_counter() - start
    ppl, _ = evaluate(task)
    density_now = nonzero_density(task.model, task.layers)
    print(
        f"  {init:<18} density {density_now:.4f}  perplexity {ppl:9.2f}  "
        f"(init {seconds:.0f} s)",
        flush=True,
    )
    return {"init": init, "density": density, "perplexity": ppl, "seconds": seconds}


def icbs(task, density: float, args, save=lambda run: None) -> dict:
    """One iCBS run; ``save(run)`` is called with the partial run at every eval."""
    start = time.perf_counter()
    pruner = make_pruner(task, density, PRESET.config.init, args)
    init_seconds = time.perf_counter() - start
    ppl, _ = evaluate(task)
    curve = [{"step": 0, "perplexity": ppl, "seconds": 0.0}]
    print(f"  step {0:>4}  perplexity {ppl:8.2f}  (init {init_seconds:.0f} s)")
    batches = task.batches(args.seed)
    seconds, steps = 0.0, []
    for s in range(1, args.steps + 1):
        X, y = next(batches)
        record = pruner.step(X, y)
        seconds += record.seconds.total
        steps.append(
            {
                "layer": record.layer,
                "accepted": record.accepted,
                "flips": record.flips,
                "dl": record.dl,
                **{p: getattr(record.seconds, p) for p in (*PHASES, "total")},
            }
        )
        out_of_time = seconds > 60 * args.max_minutes
        if s % 10 == 0:
            recent = np.mean([r["total"] for r in steps[-10:]])
            print(f"  step {s:>4}  last 10 steps {recent:.1f} s each", flush=True)
        if s == args.steps or s % args.eval_every == 0 or out_of_time:
            ppl, eval_seconds = evaluate(task)
            curve.append({"step": s, "perplexity": ppl, "seconds": seconds})
            accepted = sum(r["accepted"] for r in steps)
            print(
                f"  step {s:>4}  perplexity {ppl:8.2f}  pruning {seconds / 60:6.1f} "
                f"min  accepted {accepted:>4}  (eval {eval_seconds:.0f} s, "
                f"peak RSS {peak_rss_gb():.2f} GiB)",
                flush=True,
            )
            save({"density": density, "curve": curve, "steps": steps})
        if out_of_time:
            print(f"  stopped: pruning time passed --max-minutes {args.max_minutes}")
            break
    split = {p: float(np.mean([r[p] for r in steps])) for p in (*PHASES, "total")}
    print(
        "  mean step: "
        + ", ".join(f"{p} {split[p]:.2f} s" for p in (*PHASES, "total")),
        flush=True,
    )
    return {
        "density": density,
        "init_seconds": init_seconds,
        "final_density": nonzero_density(task.model, task.layers),
        "curve": curve,
        "mean_step_seconds": split,
        "steps": steps,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--densities", type=float, nargs="*", default=[0.5, 0.7])
    p.add_argument("--icbs-densities", type=float, nargs="*", default=[0.5])
    p.add_argument("--steps", type=int, default=PRESET.run.steps)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--max-minutes", type=float, default=float("inf"))
    p.add_argument("--block-size", type=int, default=PRESET.config.block_size)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batch-size", type=int, default=PRESET.config.max_batch_size)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--backend", default="native")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int)
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    task = get_task(
        TASK,
        eval_windows=args.eval_windows,
        calib_windows=args.calib_windows,
        batch_size=args.batch_size,
    )
    load_seconds = time.perf_counter() - start
    dense_ppl, eval_seconds = evaluate(task)
    print(
        f"SmolLM2-135M: loaded in {load_seconds:.0f} s; dense perplexity "
        f"{dense_ppl:.2f} on {task.info['eval_tokens']} test tokens "
        f"(eval {eval_seconds:.0f} s); torch threads {torch.get_num_threads()}",
        flush=True,
    )
    modules = dict(task.model.named_modules())
    dense = {name: modules[name].weight.detach().clone() for name in task.layers}

    def restore() -> None:
        with torch.no_grad():
            for name, w in dense.items():
                modules[name].weight.copy_(w)

    report = {
        "load_seconds": load_seconds,
        "dense_perplexity": dense_ppl,
        "eval_seconds": eval_seconds,
        "baselines": [],
        "icbs": [],
        "settings": {**vars(args), "max_minutes": str(args.max_minutes)},
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

    for density in args.densities:
        print(f"one-shot, density {density}:", flush=True)
        for init in ("magnitude", "wanda_per_output"):
            report["baselines"].append(baseline(task, density, init, args))
            restore()
    if args.steps > 0:
        for density in args.icbs_densities:
            print(
                f"iCBS from {PRESET.config.init}, density {density}, "
                f"{args.steps} steps of block {args.block_size}:",
                flush=True,
            )
            report["icbs"].append(icbs(task, density, args, save))
            restore()
            save()
    report["peak_rss_gib"] = peak_rss_gb()
    print(f"process peak RSS {report['peak_rss_gib']:.2f} GiB")
    save()


if __name__ == "__main__":
    main()
