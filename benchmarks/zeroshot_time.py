"""Time of SmolLM2-135M's zero-shot evaluation, by way of scoring (issue 19).

Runs the ``--zero-shot`` tasks (default: the paper's seven) on the dense model once
per ``--modes`` entry, in one process, and prints each mode's seconds, its speed
against the first mode, and each task's accuracy beside the first mode's:

- ``lm-eval``: lm-eval's own scoring, one row per (context, continuation);
- ``packed``: the continuations of a context behind one copy of it
  (``icbs_opt.zeroshot.packed``), float32;
- ``packed-bf16``: the same under bfloat16 autocast (``--zero-shot-dtype``).

    python benchmarks/zeroshot_time.py --limit 100 --threads 2
    python benchmarks/zeroshot_time.py --modes packed-bf16 --threads 2  # full sets
"""

from __future__ import annotations

import argparse
import json
import time

from smollm2 import add_task_args, load_task

from icbs_opt.zeroshot import resolve_zero_shot

MODES = {
    "lm-eval": {"pack": False, "dtype": "float32"},
    "packed": {"pack": True, "dtype": "float32"},
    "packed-bf16": {"pack": True, "dtype": "bfloat16"},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_task_args(p)
    p.add_argument("--zero-shot", default="paper")
    p.add_argument("--limit", type=int, help="examples per task (default: all)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    args = p.parse_args()
    args.eval_windows = 1  # perplexity is not measured here
    task = load_task(args)
    names = resolve_zero_shot(args.zero_shot)
    runs = {}
    for mode in args.modes:
        start = time.perf_counter()
        runs[mode] = task.zero_shot(
            task.model, names, args.limit, progress=False, **MODES[mode]
        )
        seconds = time.perf_counter() - start
        first = runs[args.modes[0]]
        print(
            f"{mode:<12} {seconds:8.1f} s  {first['seconds'] / seconds:5.2f}x the "
            f"{args.modes[0]} speed  mean acc {100 * runs[mode]['mean_acc']:.2f}",
            flush=True,
        )
        for name in names:
            s = runs[mode]["tasks"][name]
            print(
                f"    {name:<14} acc {100 * s['acc']:6.2f}  first mode "
                f"{100 * first['tasks'][name]['acc']:6.2f}  examples {s['examples']}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
