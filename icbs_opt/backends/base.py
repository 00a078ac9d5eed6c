"""The backend contract: declared options, ``solve(problem) -> Solution``."""

from __future__ import annotations

import abc
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from icbs_opt.checks import check_float, check_int, is_integer
from icbs_opt.errors import BackendError, ProblemError, ProblemTooLarge
from icbs_opt.problems import BlockProblem


@dataclass(frozen=True)
class Option:
    """One declared backend option.

    Attributes:
        name: Option name, as given to ``get_backend(name, **{name: value})`` and
            on the command line as ``--backend-option name=value``.
        parse: Converts a value (or its command-line string) to the option's type
            and checks it. When the value is bad it raises ``BackendError`` with a
            whole message naming the option and showing the value (the helpers
            below, via :mod:`icbs_opt.checks`), or ``ValueError``/``TypeError``
            with just the reason (``"expected ..."``), which the backend completes.
        default: Value used when the option is not given or given as ``None``.
        help: One line for ``icbs-opt backends``.
        kind: Short type description shown to users, e.g. ``"int >= 1"``.
    """

    name: str
    parse: Callable[[Any], Any]
    default: Any
    help: str
    kind: str


#: Largest value of an option a backend hands to a C ``int`` (neal, scipy).
C_INT_MAX = 2**31 - 1


def int_option(
    name: str,
    default: int,
    help: str,
    *,
    minimum: int = 1,
    maximum: int | None = None,
) -> Option:
    """An integer option in ``[minimum, maximum]`` (``maximum`` None: int64)."""
    label = f"option {name!r}"

    def parse(value: Any) -> int:
        return check_int(
            value, label, minimum=minimum, maximum=maximum, error=BackendError
        )

    kind = f"int >= {minimum}" if maximum is None else f"int in [{minimum}, {maximum}]"
    return Option(name, parse, default, help, kind)


def float_option(
    name: str, default: float | None, help: str, *, minimum: float = 0.0
) -> Option:
    """A finite float option with an inclusive lower bound."""
    label = f"option {name!r}"

    def parse(value: Any) -> float:
        return check_float(value, label, minimum=minimum, error=BackendError)

    return Option(name, parse, default, help, f"float >= {minimum:g}")


def choice_option(name: str, choices: Sequence[str], default: str, help: str) -> Option:
    """A string option taking one of ``choices``."""

    def parse(value: Any) -> str:
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"expected one of {', '.join(map(repr, choices))}")
        return value

    return Option(name, parse, default, help, " | ".join(choices))


def check_seed(seed: Any) -> int:
    """``seed`` as an int >= 0 of any size (seeds are hashed, never truncated).

    Raises:
        ProblemError: If ``seed`` is not a non-negative integer (bools refused).
    """
    if not is_integer(seed) or seed < 0:
        raise ProblemError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def check_workers(workers: Any, *, error: type[ValueError] = BackendError) -> int:
    """``workers`` as an int >= 1; ``None`` means ``os.cpu_count()``.

    Example:
        >>> check_workers(2)
        2
        >>> check_workers(None) >= 1
        True
    """
    if workers is None:
        return os.cpu_count() or 1
    return check_int(workers, "workers", minimum=1, error=error)


def best_repaired(
    problem: BlockProblem, samples: np.ndarray
) -> tuple[np.ndarray, float, int]:
    """The best of the repaired samples of a penalty model, for sampling backends.

    Args:
        problem: The block problem.
        samples: ``(m, n)`` raw 0/1 samples (``m >= 1``), e.g. a sampler's reads.

    Returns:
        The best sample after :meth:`BlockProblem.repair`, its energy, and how
        many raw samples had every group's count before repair.

    Example:
        >>> x, e, ok = best_repaired(BlockProblem(np.eye(3), 1), np.ones((2, 3)))
        >>> int(x.sum()), e, ok
        (1, 1.0, 0)
    """
    # (m,) whether each raw sample has every group's count
    ok = (problem.count_ones(samples) == problem.group_counts).all(axis=1)
    best_x, best_e = None, np.inf
    for raw in samples:
        x = problem.repair(raw)
        e = problem.energy(x)
        if e < best_e:
            best_x, best_e = x, e
    return best_x, float(best_e), int(ok.sum())


#: One batch of solves: the problems, their seeds and their warm starts.
Batch = tuple[list[BlockProblem], list[int | None], list[Any]]


def check_batch(problems: Any, seeds: Any, x0s: Any = None) -> Batch:
    """The arguments of ``solve_many`` as three lists of equal length.

    Args:
        problems: A sequence of :class:`BlockProblem`.
        seeds: One seed (non-negative int or ``None``) per problem.
        x0s: ``None``, or one warm start (or ``None``) per problem.

    Raises:
        ProblemError: If a problem is not a BlockProblem, a seed is bad, or
            ``seeds`` or ``x0s`` has not one entry per problem.

    Example:
        >>> from icbs_opt.problems import random_problem
        >>> problems, seeds, x0s = check_batch([random_problem(4, seed=0)], [7])
        >>> seeds, x0s
        ([7], [None])
    """
    problems, seeds = list(problems), list(seeds)
    for i, problem in enumerate(problems):
        if not isinstance(problem, BlockProblem):
            raise ProblemError(
                f"problems[{i}] must be a BlockProblem, got {type(problem).__name__}"
            )
    x0s = [None] * len(problems) if x0s is None else list(x0s)
    for label, values in (("seeds", seeds), ("x0s", x0s)):
        if len(values) != len(problems):
            raise ProblemError(
                f"{label} must have one entry per problem ({len(problems)}), "
                f"got {len(values)}"
            )
    seeds = [None if s is None else check_seed(s) for s in seeds]
    return problems, seeds, x0s


@dataclass(frozen=True)
class Solution:
    """A backend's answer to a :class:`BlockProblem`.

    Attributes:
        x: The 0/1 vector (``int8``) of length n.
        energy: ``x^T Q x`` recomputed on the problem.
        feasible: Whether x has exactly k ones (in every group: the group's count).
        seconds: Wall time of the solve.
        info: Backend-specific details. Penalty-based backends report
            ``raw_feasible_fraction`` (feasible share of raw samples, before repair).
    """

    x: np.ndarray
    energy: float
    feasible: bool
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dictionary."""
        return {
            "energy": self.energy,
            "feasible": self.feasible,
            "seconds": self.seconds,
            "x": [int(v) for v in self.x],
            "info": self.info,
        }


class Backend(abc.ABC):
    """A solver for block problems.

    Subclasses set ``name``, ``options`` and optionally ``max_n``, and implement
    :meth:`_solve`. The base class validates options, the problem size and the warm
    start, times the call and recomputes energy and feasibility.

    Args:
        **options: Values for the declared options (strings are parsed, as the
            command line gives them); ``None`` stands for the option's default.
            Unknown names and bad values raise ``BackendError``.
    """

    name: ClassVar[str]
    options: ClassVar[tuple[Option, ...]] = ()
    #: Largest number of variables this backend takes (``None``: no limit).
    max_n: ClassVar[int | None] = None

    def __init__(self, **options: Any):
        declared = {opt.name: opt for opt in self.options}
        unknown = sorted(set(options) - set(declared))
        if unknown:
            known = ", ".join(declared) or "none"
            raise BackendError(
                f"unknown option {unknown[0]!r} for backend {self.name!r}; "
                f"its options are: {known}"
            )
        self._params = {
            opt.name: self._parse_option(opt, options.get(opt.name))
            for opt in self.options
        }

    def _parse_option(self, opt: Option, value: Any) -> Any:
        """``value`` parsed by ``opt``; ``None`` (or absent) means the default."""
        if value is None:
            return opt.default
        try:
            return opt.parse(value)
        except BackendError as exc:  # a whole message already
            raise BackendError(f"backend {self.name!r}: {exc}") from None
        except (TypeError, ValueError, OverflowError) as exc:
            raise BackendError(
                f"option {opt.name!r} of backend {self.name!r} got {value!r}: {exc}"
            ) from None

    @property
    def parameters(self) -> dict[str, Any]:
        """The option values this backend runs with."""
        return dict(self._params)

    @property
    def properties(self) -> dict[str, Any]:
        """Static facts about the backend (its name and size limit)."""
        return {"name": self.name, "max_n": self.size_limit()}

    def size_limit(self) -> int | None:
        """Largest n this configured backend takes (``None``: no limit)."""
        return self.max_n

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run here, as one sentence; ``None`` if it can."""
        return None

    @property
    def portable(self) -> bool:
        """Whether ``get_backend(name, **parameters)`` rebuilds this backend.

        False when it was built with something that is not an option (braket's
        ``device`` object), so it cannot be rebuilt on another machine.
        """
        return True

    def check_size(self, problem: BlockProblem) -> None:
        """Raise ``ProblemTooLarge`` if ``problem`` exceeds :meth:`size_limit`."""
        limit = self.size_limit()
        if limit is not None and problem.n > limit:
            raise ProblemTooLarge(
                f"backend {self.name!r} takes at most n = {limit} variables, got "
                f"n = {problem.n}; use a smaller block size (--block-size {limit})"
            )

    def solve(
        self, problem: BlockProblem, *, seed: int | None = None, x0: Any = None
    ) -> Solution:
        """Solve ``problem``.

        Args:
            problem: The block problem.
            seed: Seed for every random choice; the same seed gives the same answer.
            x0: Optional feasible warm start (exactly k ones, per group when
                grouped), e.g. the current mask.

        Returns:
            The best answer found, feasible for every built-in backend.

        Raises:
            ProblemTooLarge: If n exceeds :meth:`size_limit`.
            ProblemError: If ``x0`` is not a feasible point of the problem.
        """
        if not isinstance(problem, BlockProblem):
            raise ProblemError(f"expected a BlockProblem, got {type(problem).__name__}")
        self.check_size(problem)
        if seed is not None:
            seed = check_seed(seed)
        if x0 is not None:
            x0 = problem.check_feasible(x0, "x0")
        start = time.perf_counter()
        x, info = self._solve(problem, seed=seed, x0=x0)
        seconds = time.perf_counter() - start
        x = problem.decode(x)
        return Solution(x, problem.energy(x), problem.is_feasible(x), seconds, info)

    def solve_many(
        self,
        problems: Sequence[BlockProblem],
        *,
        seeds: Sequence[int | None],
        x0s: Sequence[Any] | None = None,
        workers: int | None = None,
        done: Callable[[int, Solution], None] | None = None,
    ) -> list[Solution]:
        """Solve several problems at once in a pool of threads.

        The answers equal ``[solve(p, seed=s, x0=x) for p, s, x in ...]``: each
        solve depends only on its own problem, seed and warm start. Threads give
        real speed-up where a backend releases the GIL (native) or waits on a
        device (braket).

        Args:
            problems: The block problems.
            seeds: One seed per problem.
            x0s: ``None``, or one warm start (or ``None``) per problem.
            workers: Threads; ``None``: the backend's default (``os.cpu_count()``,
                braket: one per problem); 1: serially in the calling thread.
            done: Called in the calling thread as ``done(index, solution)`` as each
                answer arrives (in completion order), e.g. for a progress bar.

        Returns:
            The solutions, in the order of ``problems``.

        Raises:
            ProblemError: If ``seeds`` or ``x0s`` has not one entry per problem, or
                for what :meth:`solve` raises (the first failure; queued solves
                are then cancelled, as they are on ``KeyboardInterrupt``).
            BackendError: If ``workers`` is not an integer >= 1.

        Example:
            >>> from icbs_opt.backends import get_backend
            >>> from icbs_opt.problems import random_problem
            >>> backend = get_backend("exhaustive")
            >>> problems = [random_problem(6, seed=i) for i in range(3)]
            >>> many = backend.solve_many(problems, seeds=[0, 1, 2], workers=2)
            >>> [s.energy for s in many] == [backend.solve(p).energy for p in problems]
            True
        """
        problems, seeds, x0s = check_batch(problems, seeds, x0s)
        if workers is None:
            workers = self._default_workers(len(problems))
        workers = min(check_workers(workers), max(len(problems), 1))
        jobs = list(zip(problems, seeds, x0s, strict=True))
        if workers == 1:
            results = []
            for i, (problem, seed, x0) in enumerate(jobs):
                results.append(self.solve(problem, seed=seed, x0=x0))
                if done is not None:
                    done(i, results[-1])
            return results
        return self._solve_in_threads(jobs, workers, done)

    def _default_workers(self, count: int) -> int:
        """Threads of :meth:`solve_many` when ``workers`` is None (``count`` jobs)."""
        return os.cpu_count() or 1

    def _solve_in_threads(
        self,
        jobs: list[tuple[BlockProblem, int | None, Any]],
        workers: int,
        done: Callable[[int, Solution], None] | None,
    ) -> list[Solution]:
        pool = ThreadPoolExecutor(workers, thread_name_prefix=f"icbs-{self.name}")
        results: list[Any] = [None] * len(jobs)
        try:
            futures = {
                pool.submit(self.solve, problem, seed=seed, x0=x0): i
                for i, (problem, seed, x0) in enumerate(jobs)
            }
            for future in as_completed(futures):
                i = futures[future]
                results[i] = future.result()
                if done is not None:
                    done(i, results[i])
        except BaseException:  # a failure or Ctrl-C: drop the queued solves
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        return results

    @abc.abstractmethod
    def _solve(
        self, problem: BlockProblem, *, seed: int | None, x0: np.ndarray | None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Return the answer (0/1 vector) and the info dictionary."""
