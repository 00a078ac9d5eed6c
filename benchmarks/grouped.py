"""Native SA on grouped (N:M) problems against the same Q ungrouped.

One random Q of size n (``random_problem``, default n = 1024) is solved three
ways by the native backend with the same options: ungrouped with k = n / 2, and
grouped 2:4 (groups of 4 with 2 ones) and 4:8 (groups of 8 with 4 ones), which
have the same total k. Restarts end early when a temperature changes nothing, so
the sweeps run can differ; the table gives medians over the seeds of a solve's
wall seconds and CPU seconds (``time.process_time``, all threads), the sweeps it
ran (all restarts), the swaps it accepted per sweep and its finishing-descent
swaps (from ``info``), the CPU milliseconds per sweep, and both as a ratio to
the ungrouped solve. The cases take turns seed by seed. Issue 12's target:
grouped no slower than ungrouped per sweep.

The ratios use CPU time: wall time also counts the time a solve waits for a CPU,
which on a loaded machine (a niced run beside a busy process in the same
scheduler group) can grow many times over and differ from case to case. A note
under the table names the cases whose median CPU / wall share is below 0.9.

An accepted swap costs O(n) (a row update of the fields), a rejected one O(1),
so the CPU per sweep follows the accepted swaps per sweep.

Usage::

    python benchmarks/grouped.py                         # n = 1024, 5 repeats
    python benchmarks/grouped.py --n 64 --repeats 1 --restarts 2   # a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import NamedTuple

import numpy as np

from icbs_opt.backends import get_backend
from icbs_opt.problems import BlockProblem, random_problem

#: label, group size M, ones per group N (None: ungrouped, k = n / 2).
CASES = (("ungrouped", None, None), ("2:4", 4, 2), ("4:8", 8, 4))

#: Below this CPU / wall share (one thread) the table gets a note on waiting.
MIN_CPU_SHARE = 0.9


class Timing(NamedTuple):
    """Medians over the seeds of one case."""

    seconds: float  # wall
    cpu: float  # process CPU seconds, all threads
    sweeps: int
    accepted: int  # accepted swaps, all restarts
    descent: int  # finishing-descent swaps, all restarts
    share: float  # median CPU / wall of a solve


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


def solve_row(backend, problem: BlockProblem, seed: int) -> tuple:
    """Wall and CPU seconds, sweeps, accepted and descent swaps of one solve."""
    cpu0 = time.process_time()
    sol = backend.solve(problem, seed=seed)
    cpu = time.process_time() - cpu0
    info = sol.info
    return (
        sol.seconds,
        cpu,
        sum(info["restart_sweeps"]),
        sum(info["restart_accepted"]),
        sum(info["restart_descent_swaps"]),
    )


def time_cases(
    cases: list[tuple[str, BlockProblem]], options: dict, repeats: int
) -> list[Timing]:
    """Medians over ``repeats`` seeds of each case, the cases taken in turn for
    each seed (so that a change of load on the machine hits them alike)."""
    backend = get_backend("native", **options)
    for _, problem in cases:
        backend.solve(problem, seed=10**6)  # warm-up: threads, caches
    rows: list[list[tuple]] = [[] for _ in cases]
    for seed in range(repeats):
        for c, (_, problem) in enumerate(cases):
            rows[c].append(solve_row(backend, problem, seed))
    out = []
    for case_rows in rows:
        med = [statistics.median(column) for column in zip(*case_rows, strict=True)]
        share = statistics.median(r[1] / r[0] if r[0] > 0 else 1.0 for r in case_rows)
        out.append(Timing(med[0], med[1], int(med[2]), int(med[3]), int(med[4]), share))
    return out


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
    print(
        "| case | seconds | CPU seconds | sweeps | accepted / sweep | descent swaps "
        "| CPU ms / sweep | CPU ratio | per-sweep ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    ref = None
    waited = []
    cases = problems(args.n, args.seed)
    for (label, _), t in zip(
        cases, time_cases(cases, options, args.repeats), strict=True
    ):
        sweeps = max(t.sweeps, 1)
        per = t.cpu / sweeps
        ref = ref or (t.cpu, per)
        print(
            f"| {label} | {t.seconds:.4f} | {t.cpu:.4f} | {t.sweeps} | "
            f"{t.accepted / sweeps:.1f} | {t.descent} | {1e3 * per:.4f} | "
            f"{t.cpu / ref[0]:.2f} | {per / ref[1]:.2f} |",
            flush=True,
        )
        if args.threads == 1 and t.share < MIN_CPU_SHARE:
            waited.append(f"{label} (median CPU / wall {t.share:.2f})")
    if waited:
        print(
            "\nnote: solves waited for a CPU, so their wall seconds overstate the "
            "work: " + ", ".join(waited)
        )


if __name__ == "__main__":
    main()
