"""Typed exceptions of icbs-opt, all in one place.

Each subclasses a built-in so callers can catch either the precise type or the
built-in one (``except ValueError``).
"""


class ProblemError(ValueError):
    """A block problem (Q, k, a candidate x, or a problem file) is invalid."""


class ProblemTooLarge(ProblemError):
    """A backend cannot take a problem of this size."""


class BackendError(ValueError):
    """An unknown backend name, a duplicate registration or a bad backend option."""


class BackendUnavailable(RuntimeError):
    """A backend exists but cannot run here (missing extra, no credentials, offline)."""


class PruningError(ValueError):
    """An invalid pruning configuration or input (density, layer, block size, data)."""


class DataError(ValueError):
    """A task, model or data file is missing or unreadable."""


class ExecutorError(BackendError):
    """An unknown executor spec or a bad number of workers."""


class ExecutorUnavailable(BackendUnavailable):
    """An executor cannot run here (``distributed`` missing, scheduler unreachable)."""
