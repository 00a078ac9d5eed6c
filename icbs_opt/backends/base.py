"""The backend contract: declared options, ``solve(problem) -> Solution``."""

from __future__ import annotations

import abc
import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
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
    start, times the call and recomputes energy and feasibility. A backend solves
    one problem at a time; batches are the executors' (:mod:`icbs_opt.executors`),
    and :meth:`batch_threads` and :meth:`in_batch` are a backend's only say in them.

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

    def batch_threads(self, count: int) -> int:
        """Threads an executor runs a batch of ``count`` problems on, if not told.

        The machine's cores; a backend that waits on a device instead of
        computing (braket) takes one thread per problem.
        """
        return os.cpu_count() or 1

    @contextlib.contextmanager
    def in_batch(self, threads: int) -> Iterator[Backend]:
        """The backend that solves one batch, from ``threads`` threads at once.

        An executor calls :meth:`solve` of what this yields for every problem of
        the batch, and leaves the block when the batch ends (an exception, Ctrl-C
        included, is raised through it). The default yields ``self``; a backend
        overrides it when a batch needs other settings than a lone solve
        (native: one thread per solve when several run side by side, and one stop
        flag that ends every running solve when the batch fails).
        """
        yield self

    @abc.abstractmethod
    def _solve(
        self, problem: BlockProblem, *, seed: int | None, x0: np.ndarray | None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Return the answer (0/1 vector) and the info dictionary."""
