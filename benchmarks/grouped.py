"""Native SA on grouped (N:M) problems against the same Q ungrouped.

One random Q of size n (``random_problem``, default n = 1024) is solved three
ways by the native backend with the same options: ungrouped with k = n / 2, and
grouped 2:4 (groups of 4 with 2 ones) and 4:8 (groups of 8 with 4 ones), which
have the same total k. Restarts end early when a temperature changes nothing, so
the sweeps run can differ; the table gives the median wall seconds of a solve,
the sweeps it ran (all restarts), the milliseconds per sweep, and both as a
ratio to the ungrouped solve. Issue 12's target: grouped no slower than
ungrouped per sweep.

Usage::

    python benchmarks/grouped.py                         # n = 1024, 5 repeats
    python benchmarks/grouped.py --n 64 --repeats 1 --restarts 2   # a smoke run
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np

from icbs_opt.backends import get_backend
from icbs_opt.problems import BlockProblem, random_problem

#: label, group size M, ones per group N (None: ungrouped, k = n / 2).
CASES = (("ungrouped", None, None), ("2:4", 4, 2), ("4:8", 8, 4))


def problems(n: int, seed: int) -> list[tuple[str, BlockProblem]]:
    """The ungrouped problem and its N:M groupings, on one Q."""
    base = random_problem(n, n // 2, seed=seed)
    out = []
    for label, m, count in CASES:
        if m is None:
            out.append((label, base))
        elif n % m == 0:
            out.append((label, BlockProblem(base.Q, count, groups=np.arange(n) // m)))
    return out


def time_case(problem: BlockProblem, options: dict, repeats: int) -> tuple[float, int]:
    """Median wall seconds and median total sweeps over ``repeats`` seeds."""
    backend = get_backend("native", **options)
    backend.solve(problem, seed=10**6)  # warm-up: threads, caches
    seconds, sweeps = [], []
    for seed in range(repeats):
        sol = backend.solve(problem, seed=seed)
        seconds.append(sol.seconds)
        sweeps.append(sum(sol.info["restart_sweeps"]))
    return statistics.median(seconds), int(statistics.median(sweeps))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1024, help="problem size")
    parser.add_argument("--repeats", type=int, default=5, help="seeds timed per case")
    parser.add_argument("--restarts", type=int, default=10, help="num_restarts")
    parser.add_argument("--threads", type=int, default=1, help="num_threads (0: all)")
    parser.add_argument("--schedule", choices=("auto", "fixed"), default="auto")
    parser.add_argument("--seed", type=int, default=0, help="seed of Q")
    args = parser.parse_args(argv)
    options = {
        "num_restarts": args.restarts,
        "num_threads": args.threads,
        "schedule": args.schedule,
    }
    print(f"n = {args.n}, options {options}, median of {args.repeats}\n")
    print("| case | seconds | sweeps | ms / sweep | seconds ratio | per-sweep ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    ref = None
    for label, problem in problems(args.n, args.seed):
        seconds, sweeps = time_case(problem, options, args.repeats)
        per = seconds / max(sweeps, 1)
        ref = ref or (seconds, per)
        print(
            f"| {label} | {seconds:.4f} | {sweeps} | {1e3 * per:.4f} | "
            f"{seconds / ref[0]:.2f} | {per / ref[1]:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
