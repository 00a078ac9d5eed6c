"""Native cardinality-preserving simulated annealing (C core in ``native/``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from icbs_opt.backends.base import Backend
from icbs_opt.problems import BlockProblem


class NativeBackend(Backend):
    """Placeholder until the C core lands (being written now)."""

    name = "native"

    def unavailable_reason(self) -> str | None:
        """Say how to build the extension when it is missing."""
        try:
            from icbs_opt import _native  # noqa: F401
        except ImportError:
            return "the native extension is not built; run: pip install -e ."
        return None

    def _solve(
        self, problem: BlockProblem, *, seed: int | None, x0: np.ndarray | None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        raise NotImplementedError
