"""Issue 20: the native default schedule before and after it depended on n.

Builds real digits-MLP blocks with ``blocks.digits_blocks`` (k = n // 2, scaled to
mean ``|Q_ij| = 1``, as the pruner hands them to the solver) and times the native
backend's default options, 10 restarts, with the auto schedule's constants of
issue 14 (``AUTO_ACCEPT_LARGE`` = 0.3 like the small problems: one hot start for
every n) and with the current ones (0.1 above ``SMALL_N``), side by side. For each
n and each default: median and best wall seconds over ``--repeats`` seeds on one
thread and on all threads, the median CPU seconds of the calling thread for one
thread (the cost without other jobs' interference on a shared machine), the worst
energy of the runs and the accepted swaps per restart.

Usage::

    python benchmarks/native_schedule.py                 # n = 256, 1024, 4096
    python benchmarks/native_schedule.py --sizes 256 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from blocks import digits_blocks  # noqa: E402
from solvers import _constants, _machine  # noqa: E402

from icbs_opt import _native  # noqa: E402
from icbs_opt.backends import Solution, get_backend  # noqa: E402
from icbs_opt.problems import BlockProblem  # noqa: E402

#: Label and the ``icbs_opt.backends.native`` constants that give that default.
DEFAULTS = (
    ("issue 14 (hot start for every n)", {"AUTO_ACCEPT_LARGE": 0.3}),
    ("issue 20 (by n)", {}),
)


def _runs(
    problem: BlockProblem, constants: dict[str, float], threads: int, repeats: int
) -> tuple[list[Solution], list[float]]:
    """``repeats`` default solves (seeds 0..) and their thread's CPU seconds.

    They run in a thread of their own: from the main thread the backend runs
    the core on a helper thread (for Ctrl-C), whose CPU time the main thread's
    clock would not see.
    """
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(_timed, problem, constants, threads, repeats).result()


def _timed(
    problem: BlockProblem, constants: dict[str, float], threads: int, repeats: int
) -> tuple[list[Solution], list[float]]:
    backend = get_backend("native", num_threads=threads)
    sols, cpu = [], []
    with _constants(constants):
        for seed in range(repeats):
            start = time.thread_time()
            sols.append(backend.solve(problem, seed=seed))
            cpu.append(time.thread_time() - start)
    return sols, cpu


def table(problems: list[BlockProblem], repeats: int) -> dict[tuple[int, str], float]:
    """Print the side-by-side table; return median one-thread CPU s per (n, label)."""
    print(
        "| n | default | threads | median s | min s | median CPU s (1 thread) | "
        "energy (worst of runs) | accepted swaps per restart / n |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    cpu_by: dict[tuple[int, str], float] = {}
    for p in problems:
        for label, constants in DEFAULTS:
            for threads in sorted({1, _native.max_threads()}):
                sols, cpu = _runs(p, constants, threads, repeats)
                secs = [s.seconds for s in sols]
                accepted = statistics.mean(
                    statistics.mean(s.info["restart_accepted"]) for s in sols
                )
                if threads == 1:
                    cpu_by[p.n, label] = statistics.median(cpu)
                print(
                    f"| {p.n} | {label} | {threads} | {statistics.median(secs):.4f} "
                    f"| {min(secs):.4f} | "
                    f"{f'{statistics.median(cpu):.4f}' if threads == 1 else '-'} | "
                    f"{max(s.energy for s in sols):.4f} | {accepted / p.n:.2f} |",
                    flush=True,
                )
    return cpu_by


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--repeats", type=int, default=5, help="seeds per default")
    parser.add_argument("--seed", type=int, default=0, help="block seed")
    args = parser.parse_args()
    print(f"Machine: {_machine()}")
    start = time.perf_counter()
    problems = digits_blocks(args.sizes, seed=args.seed)
    built = time.perf_counter() - start
    print(f"Built {len(problems)} digits blocks in {built:.1f} s\n")
    cpu = table(problems, args.repeats)
    old, new = (label for label, _ in DEFAULTS)
    print("\nOne-thread CPU seconds, issue 14 default / issue 20 default:")
    for p in problems:
        ratio = cpu[p.n, old] / cpu[p.n, new]
        print(f"  n = {p.n}: {cpu[p.n, old]:.4f} / {cpu[p.n, new]:.4f} = {ratio:.1f}x")


if __name__ == "__main__":
    main()
