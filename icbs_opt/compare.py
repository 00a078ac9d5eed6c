"""Harvest block problems from pruning runs and compare backends on them.

For each problem the *best known* energy is the lowest energy any run reached (an
exhaustive run makes it the exact optimum). A run's relative gap is
``(E - E_best) / max(|E_best|, 1e-12)``; a run *succeeds* when its energy is within
``1e-9`` (relative) of the best known.
"""

from __future__ import annotations

import csv
import logging
import os
import statistics
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from icbs_opt.atomic import atomic_path, atomic_write
from icbs_opt.backends import Backend, Solution
from icbs_opt.backends.base import check_seed
from icbs_opt.checks import check_int
from icbs_opt.errors import ProblemError, ProblemTooLarge
from icbs_opt.executors import Executor, ThreadExecutor
from icbs_opt.problems import BlockProblem

logger = logging.getLogger(__name__)

#: File suffixes read as problems when a folder is given.
PROBLEM_SUFFIXES = (".npz", ".ubqp", ".qubo", ".cqm")
_SUCCESS_RTOL = 1e-9


@dataclass
class Run:
    """One backend run on one problem (or a skipped pair)."""

    problem: str
    n: int
    k: int
    backend: str
    repeat: int
    seed: int
    status: str  # "ok" or "skipped"
    energy: float | None = None
    feasible: bool | None = None
    seconds: float | None = None
    raw_feasible_fraction: float | None = None
    gap: float | None = None
    success: bool | None = None
    reason: str | None = None
    groups: int = 1  # cardinality groups (N:M); 1 when ungrouped
    chain_break_fraction: float | None = None  # QPU backends (dwave-qpu, dwave-sim)


@dataclass
class Comparison:
    """The outcome of :func:`compare`."""

    problems: list[str]
    runs: list[Run]
    unreadable: dict[str, str] = field(default_factory=dict)
    best: dict[str, float] = field(default_factory=dict)
    interrupted: bool = False

    @classmethod
    def of_runs(
        cls,
        problems: Iterable[str],
        backends: Iterable[str],
        runs: Iterable[Run],
        unreadable: Mapping[str, str] | None = None,
        *,
        interrupted: bool = False,
    ) -> Comparison:
        """Order finished ``runs`` and score them against the best known energies.

        :func:`compare` ends with this; after an interrupt, it turns the runs
        finished so far (collected by a ``progress`` callback) into a partial
        result with ``interrupted=True``.
        """
        problems = list(problems)
        order = {name: i for i, name in enumerate(problems)}
        border = {name: i for i, name in enumerate(backends)}
        runs = sorted(
            runs, key=lambda run: (order[run.problem], border[run.backend], run.repeat)
        )
        best = _score(runs)
        return cls(problems, runs, dict(unreadable or {}), best, interrupted)

    def summary(self) -> list[dict[str, Any]]:
        """Per-backend aggregates over the runs that were not skipped."""
        rows = []
        for name in dict.fromkeys(r.backend for r in self.runs):
            mine = [r for r in self.runs if r.backend == name]
            ok = [r for r in mine if r.status == "ok"]
            fractions = [
                r.raw_feasible_fraction
                for r in ok
                if r.raw_feasible_fraction is not None
            ]
            gaps = [r.gap for r in ok if r.gap is not None]
            breaks = [
                r.chain_break_fraction for r in ok if r.chain_break_fraction is not None
            ]
            rows.append(
                {
                    "backend": name,
                    "runs": len(ok),
                    "skipped": len(mine) - len(ok),
                    "mean_gap": statistics.fmean(gaps) if gaps else None,
                    "median_gap": statistics.median(gaps) if gaps else None,
                    "feasible_fraction": (
                        statistics.fmean(fractions) if fractions else None
                    ),
                    "success_rate": (
                        statistics.fmean(float(r.success) for r in ok) if ok else None
                    ),
                    "mean_seconds": (
                        statistics.fmean(r.seconds for r in ok) if ok else None
                    ),
                    "chain_break_fraction": (
                        statistics.fmean(breaks) if breaks else None
                    ),
                }
            )
        return rows

    def to_dict(self) -> dict[str, Any]:
        """The JSON document written by ``icbs-opt compare --json``."""
        return {
            "problems": len(self.problems),
            "backends": self.summary(),
            "runs": [asdict(r) for r in self.runs],
            "unreadable": self.unreadable,
            "interrupted": self.interrupted,
        }

    def write_csv(self, path: str | os.PathLike) -> None:
        """Write one row per run (atomically: see :mod:`icbs_opt.atomic`)."""
        names = list(Run.__dataclass_fields__)

        def write(f: Any) -> None:
            writer = csv.DictWriter(f, fieldnames=names)
            writer.writeheader()
            writer.writerows(asdict(r) for r in self.runs)

        atomic_write(os.fspath(path), write)

    def plot(self, path: str | os.PathLike, title: str | None = None) -> None:
        """Save a figure of relative gap and seconds against n, per backend.

        The file's extension picks the format. Backends whose points coincide
        stay visible: each gets its own marker, drawn hollow and a little apart.
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax_gap, ax_time) = plt.subplots(1, 2, figsize=(10, 4))
        names = list(dict.fromkeys(r.backend for r in self.runs))
        for i, name in enumerate(names):
            ok = [r for r in self.runs if r.backend == name and r.status == "ok"]
            if not ok:
                continue
            ns = sorted({r.n for r in ok})
            gap = [statistics.fmean(r.gap for r in ok if r.n == n) for n in ns]
            sec = [statistics.fmean(r.seconds for r in ok if r.n == n) for n in ns]
            shift = [n * 1.04 ** (i - (len(names) - 1) / 2) for n in ns]  # apart
            style = {"marker": "osD^v<>p*h"[i % 10], "fillstyle": "none"}
            ax_gap.plot(shift, gap, "-", label=name, **style)
            ax_time.plot(shift, sec, "-", label=name, **style)
        ax_gap.set(xlabel="n", ylabel="mean relative gap to best known", xscale="log")
        ax_gap.set_yscale("symlog", linthresh=1e-6)
        ax_gap.set_ylim(bottom=0)
        ax_time.set(xlabel="n", ylabel="mean seconds per solve", xscale="log")
        ax_time.set_yscale("log")
        ax_gap.legend()
        fig.suptitle(title or f"{len(self.problems)} block problems")
        fig.tight_layout()
        with atomic_path(os.fspath(path)) as tmp:
            fig.savefig(tmp, dpi=120)  # tmp keeps the suffix that picks the format
        plt.close(fig)


class Harvester:
    """A ``Pruner`` problem hook that saves every block problem to a folder.

    Each step's problem is written as ``step{step:05d}_{layer}.npz`` holding the
    problem as the solver sees it (``Q`` scaled by ``scale``, ``|Q| <= 1e-12``
    cut), ``k`` (and ``groups`` for an N:M block, see :meth:`BlockProblem.save`),
    the block's current mask ``x_cur`` (1 = pruned), ``layer``, ``step``,
    ``scale``, ``const`` and ``task``. With ``fmt="cqm"`` each is written as
    ``step{step:05d}_{layer}.cqm``, dimod's CQM file of the same problem (no meta).

    Args:
        directory: Folder to write to (created when missing).
        task: Task name stored with each problem.
        fmt: ``"npz"`` or ``"cqm"``.

    Example:
        >>> import tempfile
        >>> from icbs_opt.problems import BlockProblem
        >>> folder = tempfile.mkdtemp()
        >>> hook = Harvester(folder, task="demo")
        >>> hook(BlockProblem([[1.0, 0.5], [0.5, -1.0]], 1,
        ...                   meta={"layer": "fc", "step": 1, "x_cur": [1, 0]}))
        >>> sorted(os.listdir(folder))
        ['step00001_fc.npz']
    """

    def __init__(self, directory: str | os.PathLike, task: str = "", fmt: str = "npz"):
        if fmt not in ("npz", "cqm"):
            raise ProblemError(f"fmt must be 'npz' or 'cqm', got {fmt!r}")
        self.directory = Path(directory)
        self.fmt = fmt
        self.directory.mkdir(parents=True, exist_ok=True)
        self.task = task
        self.files: list[Path] = []

    def __call__(self, problem: BlockProblem) -> None:
        """Save ``problem`` (its meta must hold ``layer`` and ``step``)."""
        scaled, scale = problem.scaled()
        meta = {**problem.meta, "scale": scale, "task": self.task}
        meta["x_cur"] = np.asarray(meta.get("x_cur", []), dtype=np.int8)
        name = f"step{int(meta['step']):05d}_{meta['layer']}.{self.fmt}"
        path = self.directory / name
        counts, groups = scaled.group_counts, scaled.groups  # one group: ungrouped
        BlockProblem(scaled.Q, counts, groups=groups, meta=meta).save(path)
        self.files.append(path)


def find_problem_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand folders into their problem files (sorted); keep files as given.

    Raises:
        ProblemError: If a path does not exist or nothing is found.
    """
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix in PROBLEM_SUFFIXES)
        elif path.exists():
            files.append(path)
        else:
            raise ProblemError(f"no such problem file or folder: {str(path)!r}")
    if not files:
        raise ProblemError(f"no problem files ({', '.join(PROBLEM_SUFFIXES)}) found")
    return files


def load_problems(
    files: Iterable[Path],
) -> tuple[dict[str, BlockProblem], dict[str, str]]:
    """Read problem files; return ``(name -> problem, name -> error)``.

    A file that cannot be read (missing, unreadable, malformed, or an invalid
    problem) is skipped with a warning naming it and the reason.
    """
    problems: dict[str, BlockProblem] = {}
    errors: dict[str, str] = {}
    for path in files:
        try:
            problems[str(path)] = BlockProblem.load(path)
        except ProblemError as exc:  # its message starts "problem file 'NAME': "
            logger.warning("skipping %s", exc)
            errors[str(path)] = str(exc)
    return problems, errors


def run_seed(seed: int, problem_index: int, repeat: int) -> int:
    """The seed of one run, shared by all backends for a fair comparison."""
    return int(
        np.random.SeedSequence([seed, problem_index, repeat]).generate_state(1)[0]
    )


def compare(
    problems: Mapping[str, BlockProblem],
    backends: Mapping[str, Backend],
    *,
    repeats: int = 1,
    seed: int = 0,
    unreadable: Mapping[str, str] | None = None,
    progress: Callable[[Run], None] | None = None,
    executor: Executor | None = None,
) -> Comparison:
    """Run every backend ``repeats`` times on every problem.

    The runs of one backend and one repeat are one batch
    (:meth:`Executor.solve_many <icbs_opt.executors.Executor.solve_many>`), so
    the executor may solve them concurrently; the results do not depend on it.

    Args:
        problems: Problems by name.
        backends: Configured backends by name.
        repeats: Runs per (problem, backend); run ``r`` on problem ``i`` uses seed
            ``run_seed(seed, i, r)`` for every backend.
        seed: Base seed.
        unreadable: Files that could not be read, carried into the result.
        progress: Called after every run (e.g. to advance a progress bar), in
            the order the runs finish.
        executor: Where the batches are solved (``None``: one by one here).

    Returns:
        The runs, ordered by problem, backend and repeat, with gaps and
        successes filled in against the best known energy. A problem larger
        than a backend takes gives one ``"skipped"`` run (repeat 0).

    Raises:
        ProblemError: If ``repeats`` is not an integer >= 1 or ``seed`` is not a
            non-negative integer.
    """
    repeats = check_int(repeats, "repeats", minimum=1, error=ProblemError)
    seed = check_seed(seed)
    executor = executor or ThreadExecutor(workers=1)
    logger.info(
        "comparing %d backends on %d problems on %s",
        len(backends),
        len(problems),
        executor.description,
    )
    items = list(problems.items())
    runs: list[Run] = []
    for bname, backend in backends.items():
        runs += _compare_backend(
            items, bname, backend, repeats, seed, executor, progress
        )
    return Comparison.of_runs(problems, backends, runs, unreadable)


def _compare_backend(
    items: list[tuple[str, BlockProblem]],
    bname: str,
    backend: Backend,
    repeats: int,
    seed: int,
    executor: Executor,
    progress: Callable[[Run], None] | None,
) -> list[Run]:
    """One backend's runs: a skipped run per problem too large, a batch per repeat."""
    runs: list[Run] = []
    fits: list[int] = []
    for index, (pname, problem) in enumerate(items):
        try:
            backend.check_size(problem)
        except ProblemTooLarge as exc:
            s = run_seed(seed, index, 0)
            run = _run(pname, problem, bname, 0, s, "skipped")
            run.reason = str(exc)
            runs.append(run)
            if progress is not None:
                progress(run)
        else:
            fits.append(index)
    batch = [items[i][1] for i in fits]
    for r in range(repeats):
        mine = [
            _run(items[i][0], p, bname, r, run_seed(seed, i, r), "ok")
            for i, p in zip(fits, batch, strict=True)
        ]
        _solve_batch(executor, backend, batch, mine, progress)
        runs += mine
    return runs


def _run(
    name: str, problem: BlockProblem, backend: str, repeat: int, seed: int, status: str
) -> Run:
    """A run of ``backend`` on ``problem`` before it is solved."""
    return Run(
        name,
        problem.n,
        problem.k,
        backend,
        repeat,
        seed,
        status,
        groups=problem.num_groups,
    )


def _solve_batch(
    executor: Executor,
    backend: Backend,
    problems: list[BlockProblem],
    runs: list[Run],
    progress: Callable[[Run], None] | None,
) -> None:
    """Solve ``problems`` in one batch, filling in ``runs`` (one per problem)."""

    def finish(index: int, sol: Solution) -> None:
        run = runs[index]
        run.energy, run.feasible = sol.energy, sol.feasible
        run.seconds = sol.seconds
        run.raw_feasible_fraction = sol.info.get("raw_feasible_fraction")
        run.chain_break_fraction = sol.info.get("chain_break_fraction")
        if progress is not None:
            progress(run)

    executor.solve_many(backend, problems, [run.seed for run in runs], done=finish)


def _score(runs: list[Run]) -> dict[str, float]:
    """Fill in gaps and successes; return the best known energy per problem."""
    best: dict[str, float] = {}
    for run in runs:
        if run.status == "ok" and run.feasible:
            best[run.problem] = min(best.get(run.problem, np.inf), run.energy)
    for run in runs:
        if run.status == "ok" and run.problem in best:
            ref = best[run.problem]
            run.gap = (
                (run.energy - ref) / max(abs(ref), 1e-12) if run.feasible else None
            )
            run.success = bool(
                run.feasible and run.energy <= ref + _SUCCESS_RTOL * max(abs(ref), 1.0)
            )
    return best
