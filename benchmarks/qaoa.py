"""QAOA on Braket's local simulator versus native SA and exhaustive search.

Real iCBS blocks from the digits MLP (``blocks.digits_blocks``), n = 4..16 with
k = n / 2, several seeds. For each block: the ``xy`` and ``x`` ansaetze of
``braket-local`` at p = 1, 2, 3 with their default options (1000 shots per
evaluation, COBYLA, at most 50 evaluations, linear-ramp start), native SA and
exhaustive search.

Approximation ratio. Block energies have either sign, so ``E / E_opt`` means
nothing; we use the position of E between the worst and the best feasible energy,

    ratio(E) = (E_max - E) / (E_max - E_opt)   over x with sum(x) = k,

1 at the optimum, 0 at the worst feasible point, 0.5 around a random one (E_opt
and E_max by enumeration). Columns (means over the blocks of a size):

- ``ratio``: the returned answer (``x`` answers may come from repaired samples);
- ``raw``: the best raw sample with exactly k ones, before any repair;
- ``uniform``: the best of as many uniformly random feasible points as the run
  took shots, the baseline any sampler must beat;
- ``<E>``: ratio of the expected energy at the optimised angles, over the feasible
  part of the state (exact, from the statevector);
- ``P(opt)``: probability of sampling an optimum at the optimised angles (exact),
  next to ``1 / C(n, k)`` for a uniform feasible sample;
- ``feasible``: raw feasible fraction of all shots (1.0 for ``xy`` by construction);
- ``shots``: total shots; ``seconds``: wall time of the solve.

Usage: ``python benchmarks/qaoa.py [--sizes 4 8 12 16] [--seeds 0 1 2]``.
``--timing 12 16 18 20`` instead prints the seconds one circuit evaluation takes
(build the circuit, simulate, sample 1000 shots) per engine, mixer and n: the
figures behind ``braket-local``'s size limit.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from blocks import digits_blocks  # noqa: E402

from icbs_opt.backends import available_backends, get_backend  # noqa: E402
from icbs_opt.backends.braket import _bits_from_indices, _direct_probabilities  # noqa: E402
from icbs_opt.backends.qaoa import Ansatz  # noqa: E402
from icbs_opt.problems import BlockProblem  # noqa: E402


@dataclass
class Row:
    ratio: float
    raw: float = math.nan
    uniform: float = math.nan
    mean: float = math.nan
    p_opt: float = math.nan
    feasible: float = math.nan
    shots: float = math.nan
    seconds: float = math.nan


def all_energies(problem: BlockProblem) -> tuple[np.ndarray, np.ndarray]:
    """Energies of every basis state (qubit 0 most significant) and feasibility."""
    n = problem.n
    X = _bits_from_indices(np.arange(2**n), n).astype(np.float64)  # (2^n, n)
    energies = np.einsum("mi,mi->m", X @ problem.Q, X)
    return energies, X.sum(axis=1) == problem.k


def qaoa_row(problem, mixer, p, energies, feasible, ratio, seed) -> Row:
    backend = get_backend("braket-local", mixer=mixer, p=p)
    sol = backend.solve(problem, seed=seed)
    info = sol.info
    # Exact distribution at the optimised angles.
    ansatz = Ansatz(problem, p=p, mixer=mixer)
    probs = _direct_probabilities(ansatz.circuit(np.array(info["angles"])), problem.n)
    mass = probs[feasible].sum()
    e_opt = energies[feasible].min()
    optimal = feasible & np.isclose(energies, e_opt, rtol=0, atol=1e-12)
    mean = float(probs[feasible] @ energies[feasible] / mass)
    # Uniform baseline with the same number of shots.
    rng = np.random.default_rng(seed)
    pool = energies[feasible]
    uniform = pool[rng.integers(pool.size, size=info["shots"])].min()
    raw = info["best_raw_energy"]
    return Row(
        ratio=ratio(sol.energy),
        raw=ratio(raw) if raw is not None else math.nan,
        uniform=ratio(uniform),
        mean=ratio(mean),
        p_opt=float(probs[optimal].sum()),
        feasible=info["raw_feasible_fraction"],
        shots=info["shots"],
        seconds=sol.seconds,
    )


def solver_row(name, problem, ratio, seed) -> Row:
    sol = get_backend(name).solve(problem, seed=seed)
    return Row(ratio=ratio(sol.energy), seconds=sol.seconds)


def timing(sizes: list[int], layers: list[int], repeats: int = 2) -> None:
    """Print the seconds per circuit evaluation of braket-local."""
    from icbs_opt.problems import random_problem

    print("| n | mixer | p | engine | instructions | depth | seconds/evaluation |")
    print("|---" * 7 + "|")
    for n in sizes:
        problem = random_problem(n, seed=0)
        for mixer in ("xy", "x"):
            for p in layers:
                for engine in ("direct", "device"):
                    if engine == "device" and n > 16:
                        continue  # minutes of OpenQASM parsing for no new fact
                    backend = get_backend(
                        "braket-local", mixer=mixer, p=p, engine=engine
                    )
                    ansatz = Ansatz(problem, p=p, mixer=mixer)
                    rng = np.random.default_rng(0)
                    best = math.inf
                    for _ in range(repeats):
                        t0 = time.perf_counter()
                        circ = ansatz.circuit(np.full(2 * p, 0.3))
                        backend._sample(circ, n, rng)
                        best = min(best, time.perf_counter() - t0)
                    print(
                        f"| {n} | {mixer} | {p} | {engine} | {len(circ.instructions)} "
                        f"| {circ.depth} | {best:.3f} |",
                        flush=True,
                    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[4, 6, 8, 10, 12, 14, 16]
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--timing", type=int, nargs="+", metavar="N")
    args = parser.parse_args()
    if args.timing:
        timing(args.timing, args.layers)
        return

    methods = [(m, p) for m in ("xy", "x") for p in args.layers]
    have_native = available_backends().get("native") is None
    rows: dict[tuple[int, str], list[Row]] = {}
    start = time.perf_counter()
    for seed in args.seeds:
        for problem in digits_blocks(args.sizes, seed=seed):
            n = problem.n
            energies, feasible = all_energies(problem)
            e_opt, e_max = energies[feasible].min(), energies[feasible].max()

            def ratio(e, e_opt=e_opt, e_max=e_max):
                return float((e_max - e) / (e_max - e_opt))

            for mixer, p in methods:
                row = qaoa_row(problem, mixer, p, energies, feasible, ratio, seed)
                rows.setdefault((n, f"{mixer} p={p}"), []).append(row)
            if have_native:
                rows.setdefault((n, "native SA"), []).append(
                    solver_row("native", problem, ratio, seed)
                )
            rows.setdefault((n, "exhaustive"), []).append(
                solver_row("exhaustive", problem, ratio, seed)
            )
            print(
                f"# seed {seed} n {n} done at {time.perf_counter() - start:.0f} s",
                file=sys.stderr,
                flush=True,
            )

    print(
        "| n | method | ratio | raw | uniform | <E> | P(opt) | 1/C(n,k) | feasible "
        "| shots | seconds |"
    )
    print("|---" * 11 + "|")
    for (n, method), group in rows.items():

        def cell(field: str, fmt: str, group=group) -> str:
            values = [getattr(r, field) for r in group]
            values = [v for v in values if not math.isnan(v)]
            return format(float(np.mean(values)), fmt) if values else ""

        uniform_p = f"{1 / math.comb(n, n // 2):.2g}" if method[:2] == "xy" else ""
        print(
            f"| {n} | {method} | {cell('ratio', '.3f')} | {cell('raw', '.3f')} "
            f"| {cell('uniform', '.3f')} | {cell('mean', '.3f')} "
            f"| {cell('p_opt', '.2g')} | {uniform_p} "
            f"| {cell('feasible', '.3f')} | {cell('shots', '.0f')} "
            f"| {cell('seconds', '.3g')} |"
        )
    total = time.perf_counter() - start
    print(f"\n{len(args.seeds)} blocks per size; total {total:.0f} s")


if __name__ == "__main__":
    main()
