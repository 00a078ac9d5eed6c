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

Those blocks (a random block of the dense model after magnitude pruning) are
easy: every restart ends at the same energy. A second table takes the blocks of a
real run, harvested with ``icbs-opt prune --task digits-mlp --harvest DIR
--block-size n --steps S --seed n`` (gradient selection, blocks of the model as it
is pruned), solves each once with seed 0 under both defaults on one thread and
counts where the energies differ.

Usage::

    python benchmarks/native_schedule.py                 # n = 256, 1024, 4096
    python benchmarks/native_schedule.py --sizes 256 --repeats 3 --harvest-steps 0
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from annealing import harvest  # noqa: E402
from blocks import digits_blocks  # noqa: E402
from solvers import _machine, timed_solves  # noqa: E402

from icbs_opt import _native  # noqa: E402
from icbs_opt.backends import Solution, get_backend  # noqa: E402
from icbs_opt.compare import find_problem_files, load_problems  # noqa: E402
from icbs_opt.problems import BlockProblem  # noqa: E402

#: Label and the ``icbs_opt.backends.native`` constants that give that default.
DEFAULTS = (
    ("issue 14 (hot start for every n)", {"AUTO_ACCEPT_LARGE": 0.3}),
    ("issue 20 (by n)", {}),
)


def _runs(
    problem: BlockProblem, constants: dict[str, float], threads: int, repeats: int
) -> tuple[list[Solution], list[float]]:
    """``repeats`` default solves (seeds 0..) and their CPU seconds."""
    backend = get_backend("native", num_threads=threads)
    return timed_solves(backend, problem, constants, range(repeats))


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


def harvested_table(sizes: list[int], steps: int, folder: Path) -> None:
    """Both defaults on the blocks of a real digits run, one solve each (seed 0)."""
    files = {
        n: [str(f) for f in find_problem_files([folder / f"n{n}"])]
        for n in sizes
        if (folder / f"n{n}").is_dir()
    }
    todo = [n for n in sizes if n not in files]
    files.update(harvest(folder, todo, steps) if todo else {})
    print(
        f"\nHarvested blocks in {folder} (seed 0, one thread): total CPU s and "
        "energies, issue 14 default against issue 20 default; relative difference "
        "(issue 20 - issue 14) / |issue 14|\n"
    )
    print(
        "| block size | blocks (n) | CPU s issue 14 | CPU s issue 20 | "
        "issue 20 lower | equal | issue 20 higher | mean relative difference | "
        "largest |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for size in sizes:
        problems, _ = load_problems(Path(f) for f in files[size])
        ns = ", ".join(map(str, sorted({p.n for p in problems.values()})))
        print(f"| {size} | {len(problems)} ({ns}) | {_side_by_side(problems)} |")


def _side_by_side(problems: dict[str, BlockProblem]) -> str:
    """CPU seconds, energy counts and relative differences of the two defaults."""
    (_, old), (_, new) = (
        (label, [_runs(p, c, 1, 1) for p in problems.values()]) for label, c in DEFAULTS
    )
    e_old = [sols[0].energy for sols, _ in old]
    diff = [
        (sols[0].energy - e) / max(1.0, abs(e))
        for (sols, _), e in zip(new, e_old, strict=True)
    ]
    largest = max(diff, key=abs)
    return (
        f"{sum(sum(c) for _, c in old):.3f} | {sum(sum(c) for _, c in new):.3f} | "
        f"{sum(d < -1e-9 for d in diff)} | {sum(abs(d) <= 1e-9 for d in diff)} | "
        f"{sum(d > 1e-9 for d in diff)} | {statistics.mean(diff):+.2e} | "
        f"{largest:+.2e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--repeats", type=int, default=5, help="seeds per default")
    parser.add_argument("--seed", type=int, default=0, help="block seed")
    parser.add_argument(
        "--harvest-steps", type=int, default=40, help="real-run blocks per n (0: none)"
    )
    parser.add_argument(
        "--harvest-dir",
        type=Path,
        help="harvest here (n<size>/ folders already there are reused); "
        "default: a new temporary folder",
    )
    parser.add_argument("--skip-timing", action="store_true", help="no first table")
    args = parser.parse_args()
    print(f"Machine: {_machine()}")
    if not args.skip_timing:
        timing(args.sizes, args.seed, args.repeats)
    if args.harvest_steps:
        folder = args.harvest_dir or Path(
            tempfile.mkdtemp(prefix="icbs-native-schedule-")
        )
        harvested_table(args.sizes, args.harvest_steps, folder)


def timing(sizes: list[int], seed: int, repeats: int) -> None:
    """The first table, on the blocks of ``digits_blocks``, and the CPU ratios."""
    start = time.perf_counter()
    problems = digits_blocks(sizes, seed=seed)
    built = time.perf_counter() - start
    print(f"Built {len(problems)} digits blocks in {built:.1f} s\n")
    cpu = table(problems, repeats)
    old, new = (label for label, _ in DEFAULTS)
    print("\nOne-thread CPU seconds, issue 14 default / issue 20 default:")
    for p in problems:
        ratio = cpu[p.n, old] / cpu[p.n, new]
        print(f"  n = {p.n}: {cpu[p.n, old]:.4f} / {cpu[p.n, new]:.4f} = {ratio:.1f}x")


if __name__ == "__main__":
    main()
