"""D-Wave Ocean backends: Leap hybrid CQM, a QPU and a simulated QPU that runs here.

- ``dwave-hybrid``: the block as a CQM (:meth:`BlockProblem.to_cqm`) to
  ``LeapHybridCQMSampler``; the best feasible sample is returned.
- ``dwave-qpu``: the penalty BQM (:meth:`BlockProblem.to_bqm`) on a QPU through a
  clique embedding (``DWaveCliqueSampler``) or a given embedding
  (``FixedEmbeddingComposite``); reads are unembedded and repaired.
- ``dwave-sim``: the ``dwave-qpu`` path on Ocean's ``MockDWaveSampler`` with the
  Advantage topology (Pegasus P16), sampling locally with simulated annealing.

Ocean is imported inside methods, so importing icbs_opt never needs it
(``pip install "icbs-opt[dwave]"``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import json
import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from icbs_opt.backends.base import (
    Backend,
    Option,
    best_repaired,
    float_option,
    int_option,
)
from icbs_opt.checks import check_int
from icbs_opt.errors import BackendError, BackendUnavailable, ProblemTooLarge
from icbs_opt.problems import BlockProblem

logger = logging.getLogger(__name__)

_INSTALL = (
    "the D-Wave Ocean packages are not installed; run: pip install 'icbs-opt[dwave]'"
)
#: Modules of the extra (dwave-system brings dwave-cloud-client).
_MODULES = ("dwave.system", "dwave.samplers", "dwave.cloud", "minorminer")
#: Penalty strength of the QPU's BQM when none is given, as a fraction of the safe
#: bound ``BlockProblem.default_penalty()`` (the full bound drowns Q in the QPU's
#: limited precision; docs/backends.md).
QPU_PENALTY_FRACTION = 1 / 16
#: The simulated QPU: Advantage's topology, a fully yielded Pegasus P16.
SIM_TOPOLOGY = ("pegasus", (16,))
#: Largest clique embedding on ``SIM_TOPOLOGY`` (minorminer.busclique; a test
#: checks it), so ``icbs-opt backends`` need not compute it.
SIM_MAX_CLIQUE = 180
#: Most reads of one QPU problem (Advantage's ``num_reads_range``).
MAX_READS = 10000
#: Held around each clique-embedded sample: minorminer's clique cache renames its
#: files after releasing its own locks, so two threads of one process looking up
#: a clique at once can fail (``No such file or directory: .../.lru~``).
_CLIQUE_CACHE = threading.Lock()


def _missing_extra() -> str | None:
    """The install hint when a module of the extra is missing, else None."""
    for module in _MODULES:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # its parent package is missing
            found = False
        if not found:
            return _INSTALL
    return None


def _leap_reason() -> str | None:
    """Why Leap cannot be used here (no extra, no token), checked offline."""
    missing = _missing_extra()
    if missing is not None:
        return missing
    from dwave.cloud.config import load_config

    try:
        config = load_config()  # the config file and DWAVE_* variables, no network
    except Exception as exc:  # ConfigFileReadError, ConfigFileParseError
        return (
            f"cannot read the D-Wave configuration ({exc}); run 'dwave setup' or "
            "set DWAVE_API_TOKEN"
        )
    if not config.get("token"):
        return (
            "no D-Wave Leap API token found; run 'dwave setup' (dwave-cloud-client) "
            "or set DWAVE_API_TOKEN"
        )
    return None


def _explain(exc: Exception, what: str) -> str:
    """One sentence for an error of the cloud client while using ``what``."""
    from dwave.cloud import exceptions as cloud

    if isinstance(exc, cloud.SolverAuthenticationError):
        return (
            f"Leap refused the API token for {what} ({exc}); check it with "
            "'dwave ping' or set DWAVE_API_TOKEN"
        )
    if isinstance(exc, cloud.SolverNotFoundError):
        return (
            f"no {what} is available to this token ({exc}); 'dwave solvers' lists them"
        )
    if isinstance(exc, (cloud.SolverOfflineError, cloud.Timeout, OSError)):
        return f"cannot reach {what} (offline?): {exc}"
    return f"{what} failed ({type(exc).__name__}): {exc}"


def _cloud_errors() -> tuple[type[BaseException], ...]:
    """What the cloud client raises when Leap or the network fails."""
    from dwave.cloud import exceptions as cloud
    from dwave.cloud.api import exceptions as api

    return (api.RequestError, cloud.PollingTimeout, cloud.Timeout, OSError)


def _sample_matrix(sampleset: Any) -> np.ndarray:
    """The ``(reads, n)`` samples of a sampleset on variables ``0 .. n-1``."""
    order = np.argsort(np.asarray(sampleset.variables))
    return np.asarray(sampleset.record.sample[:, order])


# ------------------------------------------------------------------- hybrid
class DWaveHybridBackend(Backend):
    """The block as a CQM to Leap's hybrid CQM solver.

    ``info``: ``raw_feasible_fraction`` (feasible samples over all returned),
    ``samples``, ``repaired`` (True only when no sample was feasible and the
    best was repaired), and Leap's ``run_time``, ``charge_time`` and
    ``qpu_access_time`` (microseconds) and ``problem_id`` when it reports them.
    ``seed`` and ``x0`` are not used by Leap.

    Args:
        sampler: Optional object with ``sample_cqm`` and ``parameters`` used
            instead of ``LeapHybridCQMSampler()`` (e.g.
            :class:`icbs_opt.ocean.BlockCQMSampler`); it gets ``time_limit`` and
            ``seed`` when its ``parameters`` list them.
        **options: See ``options``.
    """

    name = "dwave-hybrid"
    options = (
        float_option(
            "time_limit",
            None,
            "seconds the hybrid solver may run (default: its minimum for the problem)",
        ),
    )

    def __init__(self, sampler: Any = None, **options: Any):
        super().__init__(**options)
        self._sampler = sampler

    @property
    def portable(self) -> bool:
        """False when built with a ``sampler`` object (it cannot be rebuilt)."""
        return self._sampler is None

    def unavailable_reason(self) -> str | None:
        """Check offline for the extra and a Leap token (none with ``sampler``)."""
        return None if self._sampler is not None else _leap_reason()

    def _solve(
        self, problem: BlockProblem, *, seed: int | None, x0: np.ndarray | None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        if self._sampler is not None:
            sampleset = self._sample(self._sampler, problem, seed)
        else:
            from dwave.system import LeapHybridCQMSampler

            what = "the Leap hybrid CQM solver"
            try:
                with LeapHybridCQMSampler() as sampler:
                    sampleset = self._sample(sampler, problem, seed)
            except _cloud_errors() as exc:
                raise BackendUnavailable(_explain(exc, what)) from exc
        samples = _sample_matrix(sampleset)
        feasible = np.asarray(sampleset.record.is_feasible, dtype=bool)
        if feasible.any():
            energies = np.where(feasible, sampleset.record.energy, np.inf)
            x = samples[int(np.argmin(energies))]
        else:
            x, _, _ = best_repaired(problem, samples)
        info: dict[str, Any] = {
            "raw_feasible_fraction": float(feasible.mean()),
            "samples": len(samples),
            "repaired": not feasible.any(),
        }
        for key in ("run_time", "charge_time", "qpu_access_time", "problem_id"):
            if key in sampleset.info:
                info[key] = sampleset.info[key]
        return x, info

    def _sample(self, sampler: Any, problem: BlockProblem, seed: int | None) -> Any:
        """``sampler.sample_cqm`` with the parameters it declares, resolved."""
        given = {"time_limit": self._params["time_limit"], "seed": seed}
        kwargs = {
            key: value
            for key, value in given.items()
            if value is not None and key in sampler.parameters
        }
        sampleset = sampler.sample_cqm(problem.to_cqm(), **kwargs)
        sampleset.resolve()
        return sampleset


# ---------------------------------------------------------------------- QPU
def _parse_embedding(value: Any) -> str | dict[int, tuple[int, ...]]:
    """``"clique"``, or chains ``{i: (qubits)}`` for variables ``0 .. m-1``.

    A string other than ``"clique"`` is a JSON file ``{"0": [q, ...], ...}``.
    """
    if isinstance(value, str) and value.strip() == "clique":
        return "clique"
    if isinstance(value, (str, os.PathLike)):
        try:
            with open(value, encoding="utf-8") as f:
                value = json.load(f)
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"expected 'clique' or a JSON file of chains: {exc}"
            ) from exc
    if not isinstance(value, Mapping) or not value:
        raise ValueError("expected 'clique' or chains {variable: [qubits]}")
    chains = {}
    for key, chain in value.items():
        i = check_int(key, "embedding variable", minimum=0, error=ValueError)
        if isinstance(chain, (str, bytes)) or not np.iterable(chain) or not chain:
            raise ValueError(f"the chain of variable {i} must be a list of qubits")
        chains[i] = tuple(
            check_int(q, f"qubit of variable {i}", minimum=0, error=ValueError)
            for q in chain
        )
    if sorted(chains) != list(range(len(chains))):
        raise ValueError(f"expected chains for variables 0..{len(chains) - 1}")
    return dict(sorted(chains.items()))


def _qpu_options() -> tuple[Option, ...]:
    """The options of ``dwave-qpu`` and ``dwave-sim``."""
    return (
        int_option("num_reads", 100, "anneals (reads) per solve", maximum=MAX_READS),
        float_option(
            "annealing_time", None, "microseconds per anneal (default: the QPU's)"
        ),
        float_option(
            "chain_strength",
            None,
            "chain coupling in the BQM's units (default: Ocean's uniform torque "
            "compensation)",
        ),
        float_option(
            "penalty",
            None,
            "cardinality penalty (default: QPU_PENALTY_FRACTION = 1/16 of the "
            "problem's safe bound)",
        ),
        Option(
            "embedding",
            _parse_embedding,
            "clique",
            "'clique' (DWaveCliqueSampler's) or a JSON file {variable: [qubits]}",
            "clique | JSON file",
        ),
    )


@functools.cache
def _clique_sampler_class() -> type:
    """``DWaveCliqueSampler`` on a given child sampler (the class opens one)."""
    from dwave.system import DWaveCliqueSampler

    class CliqueSampler(DWaveCliqueSampler):
        def __init__(self, child: Any):
            self.child = child

    return CliqueSampler


class DWaveQPUBackend(Backend):
    """The penalty BQM on a D-Wave QPU, embedded, unembedded and repaired.

    The BQM is ``problem.to_bqm(penalty)``. With ``embedding="clique"`` it is
    sampled by ``DWaveCliqueSampler`` (minorminer's clique embedding, chains of
    even length, biases scaled to the QPU's ranges), otherwise by
    ``FixedEmbeddingComposite`` with the given chains. Reads (``answer_mode
    raw``) are unembedded by majority vote, each is repaired to every group's
    count (:meth:`BlockProblem.repair`) and the best is returned. ``x0`` is not
    used.

    ``info``: ``penalty``, ``chain_strength``, ``chain_break_fraction`` (mean
    over reads), ``raw_feasible_fraction`` (reads with every count right before
    repair), ``reads``, ``embedding`` (``clique`` or ``given``), ``qubits``
    (embedding size), ``max_chain_length`` and ``qpu_access_time``
    (microseconds, from the sampler's timing).

    Args:
        sampler: Optional structured child sampler used instead of
            ``DWaveSampler(solver=...)``, e.g. a ``MockDWaveSampler``.
        **options: See ``options``.
    """

    name = "dwave-qpu"
    options = _qpu_options() + (
        Option(
            "solver",
            lambda value: str(value),
            None,
            "QPU solver name (default: the D-Wave configuration's or Leap's)",
            "text",
        ),
    )

    def __init__(self, sampler: Any = None, **options: Any):
        super().__init__(**options)
        self._sampler = sampler
        self._qpu: Any = None  # DWaveSampler, opened at the first solve
        self._lock = threading.Lock()

    @property
    def portable(self) -> bool:
        """False when built with a ``sampler`` object (it cannot be rebuilt)."""
        return self._sampler is None

    def unavailable_reason(self) -> str | None:
        """Check offline for the extra and a Leap token (no token with ``sampler``)."""
        return _missing_extra() if self._sampler is not None else _leap_reason()

    def size_limit(self) -> int | None:
        """The given embedding's variables; ``None`` (the QPU's clique) otherwise."""
        chains = self._params["embedding"]
        return None if chains == "clique" else len(chains)

    def _child(self, seed: int | None) -> Any:
        """The structured sampler: ``sampler``, or the QPU opened once."""
        if self._sampler is not None:
            return self._sampler
        with self._lock:
            if self._qpu is None:
                from dwave.system import DWaveSampler

                what = "the D-Wave QPU"
                try:
                    self._qpu = DWaveSampler(solver=self._params["solver"])
                except _cloud_errors() as exc:
                    raise BackendUnavailable(_explain(exc, what)) from exc
            return self._qpu

    def _solve(
        self, problem: BlockProblem, *, seed: int | None, x0: np.ndarray | None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        p = self._params
        penalty = p["penalty"]
        if penalty is None:
            penalty = QPU_PENALTY_FRACTION * problem.default_penalty()
        child = self._child(seed)
        kwargs: dict[str, Any] = {
            "num_reads": p["num_reads"],
            "answer_mode": "raw",
            "chain_strength": p["chain_strength"],
            "return_embedding": True,
        }
        if p["annealing_time"] is not None:
            kwargs["annealing_time"] = p["annealing_time"]
        clique = p["embedding"] == "clique"
        with _CLIQUE_CACHE if clique else contextlib.nullcontext():
            sampler = self._embedding_sampler(child, problem.n)
            sampleset = self._sample(sampler, problem.to_bqm(penalty), kwargs)
        samples = _sample_matrix(sampleset)  # (reads, n) unembedded
        x, energy, ok = best_repaired(problem, samples)
        context = sampleset.info["embedding_context"]
        chains = [len(chain) for chain in context["embedding"].values()]
        strength = context.get("chain_strength")  # None: no coupling to scale
        info = {
            "penalty": float(penalty),
            "chain_strength": None if strength is None else float(strength),
            "chain_break_fraction": float(
                np.mean(sampleset.record.chain_break_fraction)
            ),
            "raw_feasible_fraction": ok / len(samples),
            "reads": len(samples),
            "embedding": "clique" if clique else "given",
            "qubits": int(sum(chains)),
            "max_chain_length": int(max(chains)),
            "qpu_access_time": sampleset.info.get("timing", {}).get("qpu_access_time"),
        }
        logger.info(
            "%s: n=%d k=%d on %d qubits, chain breaks %.3f, raw feasible %.3f, "
            "energy %.6g",
            self.name,
            problem.n,
            problem.k,
            info["qubits"],
            info["chain_break_fraction"],
            info["raw_feasible_fraction"],
            energy,
        )
        return x, info

    def _embedding_sampler(self, child: Any, n: int) -> Any:
        """The clique sampler on ``child``, or the given chains of ``0 .. n-1``."""
        chains = self._params["embedding"]
        if chains != "clique":
            from dwave.system import FixedEmbeddingComposite

            return FixedEmbeddingComposite(child, {i: chains[i] for i in range(n)})
        sampler = _clique_sampler_class()(child)
        if self.size_limit() is None and n > sampler.largest_clique_size:
            raise ProblemTooLarge(
                f"backend {self.name!r}: the QPU's largest clique embedding takes "
                f"n = {sampler.largest_clique_size} variables, got n = {n}; use a "
                f"smaller block size (--block-size {sampler.largest_clique_size})"
            )
        return sampler

    def _sample(self, sampler: Any, bqm: Any, kwargs: dict[str, Any]) -> Any:
        """Sample and resolve; embedding and cloud errors become one sentence."""
        from dimod.exceptions import BinaryQuadraticModelStructureError
        from dwave.embedding.exceptions import EmbeddingError

        try:
            sampleset = sampler.sample(bqm, **kwargs)
            sampleset.resolve()
        except (EmbeddingError, BinaryQuadraticModelStructureError) as exc:
            raise BackendError(
                f"option 'embedding' of backend {self.name!r} does not fit the "
                f"QPU's graph: {exc}"
            ) from exc
        except _cloud_errors() as exc:
            raise BackendUnavailable(_explain(exc, "the D-Wave QPU")) from exc
        return sampleset


class DWaveSimBackend(DWaveQPUBackend):
    """The ``dwave-qpu`` path on a simulated Advantage QPU that runs here.

    The child sampler is Ocean's ``MockDWaveSampler`` with Advantage's topology
    (Pegasus P16, 5640 qubits) whose sampling is dwave-samplers'
    ``SimulatedAnnealingSampler`` on the embedded BQM (``num_sweeps`` sweeps per
    read, seeded by ``seed``), so the embedding, chains, unembedding and repair
    all run locally. ``annealing_time`` is passed on and ignored by the mock;
    ``qpu_access_time`` is the mock's fixed demonstration value. Needs no
    token, only the extra.
    """

    name = "dwave-sim"
    options = _qpu_options() + (
        int_option("num_sweeps", 1000, "simulated-annealing sweeps per read"),
    )

    def __init__(self, **options: Any):
        super().__init__(**options)

    @property
    def portable(self) -> bool:
        """Always rebuilt from its options."""
        return True

    def unavailable_reason(self) -> str | None:
        """Say how to install the extra when it is missing."""
        return _missing_extra()

    def size_limit(self) -> int | None:
        """The given embedding's variables, or ``SIM_MAX_CLIQUE``."""
        return super().size_limit() or SIM_MAX_CLIQUE

    def _child(self, seed: int | None) -> Any:
        """A copy of the one mock QPU, annealing with this solve's seed."""
        child = copy.copy(_mock_qpu())
        child.substitute_kwargs = {"num_sweeps": self._params["num_sweeps"]}
        if seed is not None:  # SA takes seeds below 2^31: hash any seed to them
            state = np.random.SeedSequence(seed).generate_state(1)[0]
            child.substitute_kwargs["seed"] = int(state) >> 1
        return child


@functools.cache
def _mock_qpu() -> Any:
    """The simulated Advantage: a ``MockDWaveSampler`` built once per process."""
    from dwave.samplers import SimulatedAnnealingSampler
    from dwave.system.testing import MockDWaveSampler

    topology, shape = SIM_TOPOLOGY
    return MockDWaveSampler(
        topology_type=topology,
        topology_shape=list(shape),
        parameter_warnings=False,
        substitute_sampler=SimulatedAnnealingSampler(),
    )
