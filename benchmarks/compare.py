"""Compare benchmark: harvest real digits blocks, then time `compare` over them.

Target (issue 6): `compare` over 50 harvested blocks with native, neal and
exhaustive finishes in under 2 minutes. Harvesting uses the CLI's path (a
Harvester hook on the pruning loop); the comparison is what `icbs-opt compare`
runs.

    python benchmarks/compare.py                     # 50 blocks of n = 20
    python benchmarks/compare.py --blocks 50 --block-size 64 --backends native,neal
"""

from __future__ import annotations

import argparse
import tempfile
import time

from icbs_opt.backends import get_backend
from icbs_opt.compare import Harvester, compare, find_problem_files, load_problems
from icbs_opt.pruning import PAPER_CLASSIFIER_SETTINGS, Pruner, prune
from icbs_opt.tasks import get_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=50)
    parser.add_argument("--block-size", type=int, default=20)
    parser.add_argument("--backends", default="native,neal,exhaustive")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    folder = tempfile.mkdtemp(prefix="icbs-compare-")
    task = get_task("digits-mlp")
    pruner = Pruner(
        task.model,
        task.loss_fn,
        0.1,
        backend="native",
        block_size=args.block_size,
        calibration=task.calibration,
        problem_hook=Harvester(folder, task.name),
        seed=args.seed,
        **PAPER_CLASSIFIER_SETTINGS,
    )
    start = time.perf_counter()
    prune(pruner, task.batches(args.seed), args.blocks)
    harvest_s = time.perf_counter() - start

    start = time.perf_counter()
    problems, unreadable = load_problems(find_problem_files([folder]))
    backends = {name: get_backend(name) for name in args.backends.split(",")}
    result = compare(problems, backends, repeats=args.repeats, seed=args.seed)
    compare_s = time.perf_counter() - start

    print(
        f"{len(problems)} blocks of n = {args.block_size} harvested in "
        f"{harvest_s:.1f} s; compare ({args.backends}, {args.repeats} repeat(s)) "
        f"took {compare_s:.1f} s"
    )
    print("| backend | mean gap | median gap | raw feasible | success | mean s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in result.summary():
        cells = [
            row["backend"],
            *(
                "-" if row[key] is None else f"{row[key]:.3g}"
                for key in (
                    "mean_gap",
                    "median_gap",
                    "feasible_fraction",
                    "success_rate",
                    "mean_seconds",
                )
            ),
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
