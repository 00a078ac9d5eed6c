"""Pass time of the SmolLM2 preset, split by phase, this tree against another.

Issue 20's measurement: SmolLM2-135M with the task's preset (``icbs-opt prune
--task smollm2-135m``: Wanda per-output init, blocks of 1024, M = 128 blocks per
pass), ``--passes`` passes from the same seed; prints the mean pass time and its
split (record = the forward/backward; select, qubo, solve, check = the time outside
it), the perplexity after the passes and a hash of the masks. With ``--baseline
DIR`` the same run first goes through the icbs-opt checkout in DIR (e.g. a git
worktree of an older commit) in a subprocess, and the two are printed side by side.

    git worktree add /tmp/old 0fa6a77 && cp icbs_opt/_native*.so /tmp/old/icbs_opt/
    python benchmarks/pass_time.py --baseline /tmp/old
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time

PHASES = ("record", "select", "qubo", "solve", "check", "total")


def run(args: argparse.Namespace) -> dict:
    """One run in this process: mean split, perplexity, mask hash."""
    import numpy as np
    import torch

    from icbs_opt.pruning import Pruner
    from icbs_opt.tasks import get_task, task_spec

    if args.threads:
        torch.set_num_threads(args.threads)
    task = get_task("smollm2-135m", eval_windows=args.eval_windows)
    preset = task_spec("smollm2-135m").preset.replace(
        seed=args.seed, blocks_per_step=args.blocks
    )
    start = time.perf_counter()
    pruner = Pruner(
        task.model,
        task.loss_fn,
        backend="native",
        layers=task.layers,
        calibration=task.calibration,
        config=preset.config,
    )
    init = time.perf_counter() - start
    batches, passes = task.batches(args.seed), []
    for _ in range(args.passes):
        X, y = next(batches)
        passes.append(pruner.run_pass(X, y).seconds)
    pruner.close()
    digest = hashlib.sha256()
    for _, mask in sorted(pruner.masks().items()):
        digest.update(mask.numpy().tobytes())
    return {
        "init_seconds": init,
        "split": {p: float(np.mean([s[p] for s in passes])) for p in PHASES},
        "perplexity": task.evaluate(task.model)["metric"],
        "mask_hash": digest.hexdigest()[:16],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--passes", type=int, default=4)
    p.add_argument("--blocks", type=int, default=128, help="blocks per pass (M)")
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int)
    p.add_argument("--baseline", metavar="DIR", help="icbs-opt checkout to compare")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args()
    if args.worker:
        print(json.dumps(run(args)))
        return
    runs = {}
    if args.baseline:
        argv = [a for a in sys.argv[1:] if a not in ("--baseline", args.baseline)]
        env = {**os.environ, "PYTHONPATH": os.path.abspath(args.baseline)}
        out = subprocess.run(
            [sys.executable, __file__, *argv, "--worker"],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        runs["baseline"] = json.loads(out.strip().splitlines()[-1])
    runs["this tree"] = run(args)
    print(f"SmolLM2-135M, M = {args.blocks}, {args.passes} passes, seed {args.seed}")
    print(f"{'':>10}" + "".join(f"{name:>14}" for name in runs))
    for phase in PHASES:
        row = "".join(f"{r['split'][phase]:>13.2f}s" for r in runs.values())
        print(f"{phase:>10}{row}")
    outside = {n: sum(r["split"][p] for p in PHASES[1:5]) for n, r in runs.items()}
    print(f"{'outside':>10}" + "".join(f"{v:>13.2f}s" for v in outside.values()))
    print(f"{'ppl':>10}" + "".join(f"{r['perplexity']:>14.2f}" for r in runs.values()))
    print(
        f"{'init':>10}" + "".join(f"{r['init_seconds']:>13.1f}s" for r in runs.values())
    )
    print(f"{'masks':>10}" + "".join(f"{r['mask_hash']:>17}" for r in runs.values()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": runs}, f, indent=2)


if __name__ == "__main__":
    main()
