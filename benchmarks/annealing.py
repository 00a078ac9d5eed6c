"""Annealing benchmark (issue 21): the simulated D-Wave QPU against the classical
backends on harvested digits blocks.

Harvests blocks with `icbs-opt prune --task digits-mlp --harvest DIR --block-size n`
for each n, then runs `compare` with native, neal, exhaustive (n <= 24),
braket-local (n <= 16) and dwave-sim (n <= 180, its largest clique embedding) and
prints one Markdown table: gap to the best known energy, feasibility of the raw
reads before repair, chain breaks and seconds, and the simulated QPU's gap to
native at each n.

    python benchmarks/annealing.py                  # n = 16, 32, 64, 180; 4 blocks
    python benchmarks/annealing.py --sizes 16 32 --blocks 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from icbs_opt.backends import get_backend
from icbs_opt.backends.dwave import SIM_MAX_CLIQUE
from icbs_opt.cli import main as cli
from icbs_opt.compare import compare, find_problem_files, load_problems

BACKENDS = {
    "native": {},
    "neal": {},
    "exhaustive": {},
    "braket-local": {"p": 1, "maxiter": 20, "shots": 500},
    "dwave-sim": {},
}


def harvest(folder: Path, sizes: list[int], blocks: int) -> dict[int, list[str]]:
    """Problem files per block size, from `icbs-opt prune --harvest`."""
    files = {}
    for n in sizes:
        out = folder / f"n{n}"
        argv = ["prune", "--task", "digits-mlp", "--block-size", str(n)]
        argv += ["--steps", str(blocks), "--seed", str(n), "--no-progress"]
        if cli([*argv, "--harvest", str(out)]) != 0:
            raise SystemExit(f"harvesting n = {n} failed")
        files[n] = [str(p) for p in find_problem_files([out])]
    return files


def _mean(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    return f"{statistics.fmean(values):.3g}" if values else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64, 180])
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    assert max(args.sizes) <= SIM_MAX_CLIQUE, "dwave-sim embeds n <= 180"

    folder = Path(tempfile.mkdtemp(prefix="icbs-annealing-"))
    start = time.perf_counter()
    files = harvest(folder, args.sizes, args.blocks)
    problems, _ = load_problems(Path(f) for n in args.sizes for f in files[n])
    backends = {name: get_backend(name, **o) for name, o in BACKENDS.items()}
    result = compare(problems, backends, seed=args.seed)
    print(f"{len(problems)} blocks, {time.perf_counter() - start:.0f} s in all\n")

    print(
        "| n | backend | runs | mean gap | success | raw feasible | chain breaks "
        "| mean s |"
    )
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n in args.sizes:
        for name in backends:
            ok = [
                r
                for r in result.runs
                if r.n == n and r.backend == name and r.status == "ok"
            ]
            if not ok:
                continue
            cells = [
                str(n),
                name,
                str(len(ok)),
                _mean([r.gap for r in ok]),
                _mean([float(r.success) for r in ok]),
                _mean([r.raw_feasible_fraction for r in ok]),
                _mean([r.chain_break_fraction for r in ok]),
                _mean([r.seconds for r in ok]),
            ]
            print("| " + " | ".join(cells) + " |")

    print("\n| n | dwave-sim gap to native (mean) | worst |")
    print("| ---: | ---: | ---: |")
    energy = {(r.problem, r.backend): r.energy for r in result.runs if r.energy}
    for n in args.sizes:
        gaps = [
            (energy[p, "dwave-sim"] - energy[p, "native"])
            / max(abs(energy[p, "native"]), 1e-12)
            for p in files[n]
            if (p, "dwave-sim") in energy and (p, "native") in energy
        ]
        print(f"| {n} | {_mean(gaps)} | {max(gaps):.3g} |")


if __name__ == "__main__":
    main()
