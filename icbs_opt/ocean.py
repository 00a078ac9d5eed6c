"""An Ocean (dimod) sampler over any icbs-opt backend, for cardinality CQMs.

An Ocean user calls it as they call ``LeapHybridCQMSampler``::

    sampler = BlockCQMSampler("native")
    sampleset = sampler.sample_cqm(problem.to_cqm(), seed=0)

The CQM must have the form :meth:`BlockProblem.to_cqm` writes (see
:meth:`BlockProblem.from_cqm`). Needs only dimod, a core dependency.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dimod
import numpy as np

from icbs_opt.backends import Backend, get_backend
from icbs_opt.errors import BackendError
from icbs_opt.problems import BlockProblem


class BlockCQMSampler(dimod.Scoped):
    """A dimod-style CQM sampler that solves with an icbs-opt backend.

    ``sample_cqm`` reads the CQM as a :class:`BlockProblem` (variable ``i`` is
    the ``i``-th of ``cqm.variables``), solves it with the backend and returns
    a one-sample ``dimod.SampleSet`` built by ``SampleSet.from_samples_cqm``:
    ``energy`` is the objective, and ``is_satisfied`` (one entry per
    constraint) and ``is_feasible`` are the fields the Leap hybrid CQM
    sampler returns. ``info`` holds ``constraint_labels``, ``run_time`` (the
    solve's wall time in microseconds, Leap's unit), ``backend`` and
    ``backend_info`` (the backend's ``Solution.info``), and ``problem_label``
    when a ``label`` is given.

    Args:
        backend: A registered backend name or a configured :class:`Backend`.
        **options: The backend's options (with a name only).

    Raises:
        BackendError: For an unknown name or a bad option, or options given
            with a :class:`Backend`.
        BackendUnavailable: If the backend cannot run here.

    Example:
        >>> from icbs_opt.problems import random_problem
        >>> problem = random_problem(6, 2, seed=0)
        >>> sampleset = BlockCQMSampler("exhaustive").sample_cqm(problem.to_cqm())
        >>> bool(sampleset.first.is_feasible)
        True
    """

    def __init__(self, backend: str | Backend = "native", **options: Any):
        if isinstance(backend, Backend):
            if options:
                raise BackendError(
                    f"options {sorted(options)} go with a backend name, not with a "
                    f"configured backend {backend.name!r}"
                )
            self.backend = backend
        else:
            self.backend = get_backend(backend, **options)

    @property
    def parameters(self) -> dict[str, list[str]]:
        """The keyword arguments of :meth:`sample_cqm` (dimod's convention)."""
        return {"seed": [], "x0": [], "label": []}

    @property
    def properties(self) -> dict[str, Any]:
        """The backend's name, options and size limit, and the problem type."""
        return {
            "backend": self.backend.name,
            "backend_parameters": self.backend.parameters,
            "max_n": self.backend.size_limit(),
            "supported_problem_types": ["cqm"],
        }

    def sample_cqm(
        self,
        cqm: dimod.ConstrainedQuadraticModel,
        *,
        seed: int | None = None,
        x0: Any = None,
        label: str | None = None,
    ) -> dimod.SampleSet:
        """Solve ``cqm`` with the backend; the answer equals ``backend.solve``'s.

        Args:
            cqm: A CQM of the form :meth:`BlockProblem.to_cqm` writes.
            seed: The seed of the solve.
            x0: Optional feasible warm start: a mapping from the CQM's variables
                to 0/1, or a sequence in the order of ``cqm.variables``.
            label: Optional problem label, kept in ``info["problem_label"]``.

        Returns:
            A ``dimod.SampleSet`` with one sample.

        Raises:
            ProblemError: If ``cqm`` is not of that form or ``x0`` is infeasible.
        """
        problem = BlockProblem.from_cqm(cqm)
        labels = list(cqm.variables)
        if isinstance(x0, Mapping):
            x0 = [x0[v] for v in labels]
        sol = self.backend.solve(problem, seed=seed, x0=x0)
        info: dict[str, Any] = {
            "constraint_labels": list(cqm.constraints),
            "run_time": round(sol.seconds * 1e6),
            "backend": self.backend.name,
            "backend_info": sol.info,
        }
        if label is not None:
            info["problem_label"] = label
        return dimod.SampleSet.from_samples_cqm(
            (np.atleast_2d(sol.x), labels), cqm, info=info
        )

    def close(self) -> None:
        """Nothing to release: the backend holds no connection."""
