"""Solvers on realistic iCBS blocks: native SA, neal (penalty BQM) and exhaustive.

Builds digits-MLP blocks with ``blocks.digits_blocks`` (k = n // 2) and prints three
tables for ``docs/benchmarks.md``:

1. Default options, per n: energy and seconds of each backend, the gap of neal to
   native, neal's raw feasible fraction (reads with exactly k ones before repair),
   and, for n <= 20 where exhaustive runs, whether native hit the optimum. Small
   sizes get several blocks (``--small-blocks``).
2. Equal total sweeps: neal gets as many sweeps, over all its reads and penalty
   strengths, as native used (its restarts stop early), and then as many as
   native's whole schedule budget (restarts x betas x sweeps per beta). Sweeps
   are counted in n proposals for both: swaps for native (whose own sweeps are
   ``max(n, MIN_SWEEP_SIZE)`` proposals), single flips for neal.
3. Native timing: median and best wall seconds over ``--repeats`` seeds for the
   auto (default) schedule, the auto schedule with the constants it had before
   issue 14 (``OLD_AUTO``: mean uphill acceptance 0.1 at beta_min, sweeps of n
   proposals) and the fixed reference schedule, on 1 and on all threads, and for
   one thread the median CPU seconds of that thread: on a shared machine they show
   the cost without the other jobs' interference.

Usage::

    python benchmarks/solvers.py                       # the figures in the docs
    python benchmarks/solvers.py --sizes 16 256 --neal-max-n 256 --repeats 1
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from blocks import digits_blocks  # noqa: E402

from icbs_opt import _native  # noqa: E402
from icbs_opt.backends import Solution, get_backend  # noqa: E402
from icbs_opt.backends import native as native_module  # noqa: E402
from icbs_opt.problems import BlockProblem  # noqa: E402

EXHAUSTIVE_MAX_N = 20

#: The auto schedule's constants before issue 14, to time the old default.
OLD_AUTO = {"AUTO_ACCEPT_SMALL": 0.1, "AUTO_ACCEPT_LARGE": 0.1, "MIN_SWEEP_SIZE": 1}
#: Timed schedules: label, backend options, native module constants to set.
SCHEDULES = (
    ("auto", {"schedule": "auto"}, {}),
    ("auto (old)", {"schedule": "auto"}, OLD_AUTO),
    ("fixed", {"schedule": "fixed"}, {}),
)


@contextlib.contextmanager
def _constants(values: dict[str, float]):
    """Set schedule constants of ``icbs_opt.backends.native`` for a while."""
    saved = {name: getattr(native_module, name) for name in values}
    for name, value in values.items():
        setattr(native_module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(native_module, name, value)


def timed_solves(
    backend: Any, problem: BlockProblem, constants: dict[str, float], seeds: Any
) -> tuple[list[Solution], list[float]]:
    """One solve per seed with ``constants`` set, and each one's CPU seconds.

    A one-thread solve runs in the solving thread, so its CPU time is the cost
    without other jobs' interference (process time would also count idle
    torch/OpenMP pool threads spinning). The solves run in a thread of their own:
    from the main thread the backend runs the core on a helper thread (so that
    Ctrl-C stops it), whose CPU time the main thread's clock would not see.
    """

    def run() -> tuple[list[Solution], list[float]]:
        sols, cpu = [], []
        with _constants(constants):
            for seed in seeds:
                start = time.thread_time()
                sols.append(backend.solve(problem, seed=seed))
                cpu.append(time.thread_time() - start)
        return sols, cpu

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(run).result()


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            names = [
                line.split(":", 1)[1].strip() for line in f if "model name" in line
            ]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return (
        f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"OpenMP {'on' if _native.openmp else 'off'} "
        f"({_native.max_threads()} threads); load average {load}"
    )


def default_table(problems: list[BlockProblem], neal_max_n: int, seed: int) -> None:
    print("\n## Default options (native: auto schedule, 10 restarts; neal: penalty")
    print("## auto, 10 reads x 1000 sweeps per strength)\n")
    print(
        "| n | k | native E | native s | neal E | neal s | neal - native | "
        "neal raw feasible | exhaustive E | exhaustive s | native optimal |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|")
    for p in problems:
        nat = get_backend("native").solve(p, seed=seed)
        row = [str(p.n), str(p.k), f"{nat.energy:.4f}", f"{nat.seconds:.4f}"]
        if p.n <= neal_max_n:
            neal = get_backend("neal").solve(p, seed=seed)
            row += [
                f"{neal.energy:.4f}",
                f"{neal.seconds:.2f}",
                f"{neal.energy - nat.energy:+.4f}",
                f"{neal.info['raw_feasible_fraction']:.2f}",
            ]
        else:
            row += ["-", "-", "-", "-"]
        if p.n <= EXHAUSTIVE_MAX_N:
            exact = get_backend("exhaustive").solve(p)
            hit = abs(nat.energy - exact.energy) <= 1e-9 * max(1.0, abs(exact.energy))
            row += [
                f"{exact.energy:.4f}",
                f"{exact.seconds:.3f}",
                "yes" if hit else "NO",
            ]
        else:
            row += ["-", "-", "-"]
        print("| " + " | ".join(row) + " |", flush=True)


def _neal_within(p: BlockProblem, total: int, seed: int) -> tuple[Solution, int]:
    """neal (auto penalty, 10 reads per strength) with at most ``total`` sweeps.

    Its auto penalty may try several strengths of 10 reads each: the sweeps per
    read are sized so that all reads together stay within ``total`` (retrying
    with the read count the previous try needed).
    """
    reads = 10
    for _ in range(4):
        sweeps = max(1, total // reads)
        neal = get_backend("neal", num_reads=10, num_sweeps=sweeps).solve(p, seed=seed)
        if neal.info["reads"] * sweeps <= total or sweeps == 1:
            break
        reads = neal.info["reads"]
    return neal, sweeps


def equal_sweeps_table(
    problems: list[BlockProblem], neal_max_n: int, seed: int
) -> None:
    print("\n## Equal total sweeps: neal at native's sweeps used, and at its budget\n")
    print(
        "| n | native sweeps used / budget | native E | neal reads x sweeps (used) | "
        "neal - native | raw feasible | neal reads x sweeps (budget) | "
        "neal - native | raw feasible |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for p in problems:
        if p.n > neal_max_n:
            continue
        nat = get_backend("native").solve(p, seed=seed)
        info = nat.info
        # In sweeps of n proposals: native's sweeps are max(n, MIN_SWEEP_SIZE).
        size = info["sweep_size"] / p.n
        budget = round(
            size
            * len(info["restart_sweeps"])
            * info["num_betas"]
            * info["sweeps_per_beta"]
        )
        used = round(size * sum(info["restart_sweeps"]))
        row = [str(p.n), f"{used} / {budget}", f"{nat.energy:.4f}"]
        for total in (used, budget):
            neal, sweeps = _neal_within(p, total, seed)
            row += [
                f"{neal.info['reads']} x {sweeps}",
                f"{neal.energy - nat.energy:+.4f}",
                f"{neal.info['raw_feasible_fraction']:.2f}",
            ]
        print("| " + " | ".join(row) + " |", flush=True)


def timing_table(problems: list[BlockProblem], repeats: int, seed: int) -> None:
    print(f"\n## Native timing ({repeats} runs with seeds {seed}.., 10 restarts)\n")
    print(
        "| n | schedule | threads | median s | min s | median CPU s (1 thread) | "
        "energy (worst of runs) | sweeps per restart | accepted swaps per restart / n |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    threads_all = _native.max_threads()
    for p in problems:
        if p.n < 256:
            continue
        for label, options, constants in SCHEDULES:
            for threads in sorted({1, threads_all}):
                backend = get_backend("native", **options, num_threads=threads)
                seeds = range(seed, seed + repeats)
                sols, cpu = timed_solves(backend, p, constants, seeds)
                secs = [s.seconds for s in sols]
                sweeps = statistics.mean(
                    statistics.mean(s.info["restart_sweeps"]) for s in sols
                )
                accepted = statistics.mean(
                    statistics.mean(s.info["restart_accepted"]) for s in sols
                )
                print(
                    f"| {p.n} | {label} | {threads} | {statistics.median(secs):.4f} "
                    f"| {min(secs):.4f} | "
                    f"{f'{statistics.median(cpu):.4f}' if threads == 1 else '-'} | "
                    f"{max(s.energy for s in sols):.4f} | "
                    f"{sweeps:.1f} | {accepted / p.n:.2f} |",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[16, 20, 64, 256, 1024, 4096]
    )
    parser.add_argument(
        "--small-blocks",
        type=int,
        default=5,
        help="blocks per size for sizes <= 20 (checked against exhaustive)",
    )
    parser.add_argument(
        "--neal-max-n",
        type=int,
        default=1024,
        help="largest n given to neal (dense BQMs beyond this take minutes)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timing repeats")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["default", "sweeps", "timing"]
    )
    args = parser.parse_args()

    print(f"Machine: {_machine()}")
    start = time.perf_counter()
    sizes = []
    for n in args.sizes:
        sizes += [n] * (args.small_blocks if n <= EXHAUSTIVE_MAX_N else 1)
    problems = digits_blocks(sizes, seed=args.seed)
    print(f"Built {len(problems)} digits blocks in {time.perf_counter() - start:.1f} s")
    if "default" not in args.skip:
        default_table(problems, args.neal_max_n, args.seed)
    if "sweeps" not in args.skip:
        equal_sweeps_table(problems, args.neal_max_n, args.seed)
    if "timing" not in args.skip:
        timing_table(problems, args.repeats, args.seed)
    print(
        f"\nLoad average at the end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )


if __name__ == "__main__":
    main()
