"""Backend registry: block-problem solvers by name.

Example:
    >>> from icbs_opt.backends import get_backend
    >>> from icbs_opt.problems import random_problem
    >>> sol = get_backend("exhaustive").solve(random_problem(6, seed=0))
    >>> sol.feasible
    True
"""

from __future__ import annotations

from typing import Any

from icbs_opt.backends.base import Backend, Option, Solution
from icbs_opt.errors import BackendError, BackendUnavailable

_REGISTRY: dict[str, type[Backend]] = {}


def register_backend(name: str, factory: type[Backend]) -> None:
    """Register a backend class under ``name``.

    Raises:
        BackendError: If the name is taken or ``factory`` is not a Backend subclass.
    """
    if not (isinstance(factory, type) and issubclass(factory, Backend)):
        raise BackendError(
            f"backend {name!r} must be a Backend subclass, got {factory!r}"
        )
    if name in _REGISTRY:
        raise BackendError(f"a backend named {name!r} is already registered")
    _REGISTRY[name] = factory


def backend_class(name: str) -> type[Backend]:
    """Return the class registered under ``name``.

    Raises:
        BackendError: For an unknown name; the message lists the known ones.
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise BackendError(
            f"unknown backend {name!r}; known backends: {', '.join(_REGISTRY)}"
        )
    return _REGISTRY[name]


def get_backend(name: str, **options: Any) -> Backend:
    """Return a ready-to-run backend ``name`` configured with ``options``.

    Option values may be strings (as the command line gives them); an option
    given as ``None`` takes its default, as if it were not given.

    Raises:
        BackendError: For an unknown name or a bad option.
        BackendUnavailable: If the backend cannot run here; the message says what
            to install or configure.
    """
    backend = backend_class(name)(**options)
    reason = backend.unavailable_reason()
    if reason is not None:
        raise BackendUnavailable(f"backend {name!r} cannot run here: {reason}")
    return backend


def available_backends() -> dict[str, str | None]:
    """Map every registered backend name to ``None`` if it runs here, else why not."""
    return {name: cls().unavailable_reason() for name, cls in _REGISTRY.items()}


def registered_backends() -> list[str]:
    """Names of all registered backends, in registration order."""
    return list(_REGISTRY)


def _register_builtins() -> None:
    from icbs_opt.backends.braket import BraketBackend, BraketLocalBackend
    from icbs_opt.backends.dwave import (
        DWaveHybridBackend,
        DWaveQPUBackend,
        DWaveSimBackend,
    )
    from icbs_opt.backends.exhaustive import ExhaustiveBackend
    from icbs_opt.backends.native import NativeBackend
    from icbs_opt.backends.neal import NealBackend

    for cls in (
        NativeBackend,
        NealBackend,
        ExhaustiveBackend,
        BraketLocalBackend,
        BraketBackend,
        DWaveSimBackend,
        DWaveQPUBackend,
        DWaveHybridBackend,
    ):
        register_backend(cls.name, cls)


_register_builtins()

__all__ = [
    "Backend",
    "Option",
    "Solution",
    "available_backends",
    "backend_class",
    "get_backend",
    "register_backend",
    "registered_backends",
]
