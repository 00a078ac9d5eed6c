"""QAOA for block problems: Braket circuits, sample bookkeeping and the angle loop.

Two ansaetze for ``min x^T Q x`` subject to ``sum(x) = k``, or for a grouped
problem to ``sum_{i in g} x_i = k_g`` in every group g:

- ``xy``: start in the Dicke state ``|D(n, k)>`` (every x with exactly k ones, in
  equal superposition), for a grouped problem the product of one ``|D(n_g, k_g)>``
  per group on that group's qubits, and mix with ``exp(+i beta (XX + YY) / 2)`` on
  the edges of a ring or of the complete graph (per group, never across groups).
  Both conserve every group's Hamming weight, so every sample is feasible and the
  cost is the plain ``x^T Q x``.
- ``x``: start in ``|+>^n`` and mix with ``exp(+i beta X)`` on every qubit; the cost
  is the penalised model ``x^T Q x + P sum_g (sum_{i in g} x_i - k_g)^2`` of
  ``problem.to_bqm(P)`` and infeasible samples are repaired (per group).

Layer i applies ``exp(-i gamma_i C)`` then ``exp(-i beta_i B)`` with the mixer
Hamiltonian ``B = -sum X`` or ``B = -sum (XX + YY) / 2``, whose ground state (or,
for the ring, a state close to it) is the initial state. With positive angles this
is a Trotterised anneal from B to C, so the linear-ramp start lowers the cost.

Bit convention: qubit i measured as ``b_i`` means ``x_i = b_i``. The problem's spin
form uses ``s = 2x - 1 = -z`` (z the Pauli-Z eigenvalue), so the cost operator is
``C = -sum_i h_i Z_i + sum_{i<j} J_ij Z_i Z_j`` (plus a constant).

Circuits come in two gate sets that prepare the same state. ``compact`` uses
Braket's ``xy`` and ``zz`` two-qubit rotations (fewer instructions, faster to
simulate); ``basic`` uses only ``x, h, rx, ry, rz, cnot``. Neither uses gate
modifiers (``ctrl @``): amazon-braket-default-simulator 1.41 applies some
controlled rotations to the wrong amplitudes (e.g. ``ry`` on qubit 0 controlled by
qubit 3 of five), so controlled rotations are decomposed into CNOTs here.

This module imports the Braket SDK at import time; the backends import it lazily.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from braket.circuits import Circuit

from icbs_opt.problems import BlockProblem

logger = logging.getLogger(__name__)

#: Gate names (as Braket devices list their supported operations) of each gate set.
GATE_SETS = {
    "compact": frozenset({"x", "h", "rx", "ry", "rz", "cnot", "xy", "zz"}),
    "basic": frozenset({"x", "h", "rx", "ry", "rz", "cnot"}),
}
#: Spread of the linear-ramp initial angles (a Trotterised anneal's time step).
RAMP_DT = 0.75
#: Infeasible samples of the ``x`` ansatz kept (lowest penalised energy) for repair.
REPAIR_POOL = 32


# ----------------------------------------------------------------- gate helpers
def _cry(circ: Circuit, control: int, target: int, theta: float) -> None:
    """Controlled ``RY(theta)``."""
    circ.ry(target, theta / 2).cnot(control, target)
    circ.ry(target, -theta / 2).cnot(control, target)


def _ccry(circ: Circuit, c1: int, c2: int, target: int, theta: float) -> None:
    """Doubly controlled ``RY(theta)``.

    A uniformly controlled RY with angles ``theta/4 * (1, -1, 1, -1)``: each CNOT
    flips the sign of the RYs after it, so the angles add up to ``theta`` only when
    both controls are 1 and cancel otherwise.
    """
    q = theta / 4
    circ.ry(target, q).cnot(c1, target)
    circ.ry(target, -q).cnot(c2, target)
    circ.ry(target, q).cnot(c1, target)
    circ.ry(target, -q).cnot(c2, target)


def _rzz(circ: Circuit, a: int, b: int, theta: float, compact: bool) -> None:
    """``exp(-i theta/2 Z_a Z_b)``."""
    if compact:
        circ.zz(a, b, theta)
    else:
        circ.cnot(a, b).rz(b, theta).cnot(a, b)


def _hop(circ: Circuit, a: int, b: int, beta: float, compact: bool) -> None:
    """``exp(+i beta (X_a X_b + Y_a Y_b) / 2)``; XX and YY commute."""
    if compact:
        circ.xy(a, b, 2.0 * beta)  # Braket's XY(t) is exp(+i t/4 (XX + YY))
        return
    circ.h(a).h(b)
    _rzz(circ, a, b, -beta, False)
    circ.h(a).h(b)
    circ.rx(a, math.pi / 2).rx(b, math.pi / 2)
    _rzz(circ, a, b, -beta, False)
    circ.rx(a, -math.pi / 2).rx(b, -math.pi / 2)


# ------------------------------------------------------------------ the pieces
def dicke_state(n: int, k: int) -> Circuit:
    """Return a circuit preparing ``|D(n, k)>`` from ``|0...0>`` on qubits 0..n-1.

    The split-and-cyclic-shift idea of Baertschi and Eidenbenz (2019), with qubits
    numbered 1..n here: start from ``|0^(n-k) 1^k>``. At stage ``m = n, ..., 2`` the
    first m qubits hold ``l <= k`` ones packed to the right, and qubit m must end up
    1 with probability ``l / m``. With amplitude ``sqrt((m - l) / m)`` the one on
    qubit m moves to qubit ``m - l`` (the zero just left of the packed block),
    which leaves the first ``m - 1`` qubits packed for the next stage. Branch l is
    told apart by qubit ``m - l + 1`` being 1 and qubit ``m - l`` being 0, so each
    move is a CNOT, an RY controlled by one or two qubits, and a CNOT: ``O(n k)``
    gates, no ancillas.

    Args:
        n: Number of qubits, ``n >= 1``.
        k: Hamming weight, ``0 <= k <= n``.

    Returns:
        The circuit (no measurements), with an instruction on every qubit so that
        Braket keeps all n of them.

    Raises:
        ValueError: If ``n < 1`` or ``k`` is outside ``0..n``.

    Example:
        >>> from braket.devices import LocalSimulator
        >>> circ = dicke_state(3, 1).probability()
        >>> probs = LocalSimulator().run(circ, shots=0).result().values[0]
        >>> [round(float(v), 3) for v in probs]
        [0.0, 0.333, 0.333, 0.0, 0.333, 0.0, 0.0, 0.0]
    """
    if n < 1 or not 0 <= k <= n:
        raise ValueError(
            f"a Dicke state needs n >= 1 and 0 <= k <= n, got n={n}, k={k}"
        )
    return _append_dicke(Circuit(), list(range(n)), k)


def _append_dicke(circ: Circuit, qubits: list[int], k: int) -> Circuit:
    """Append :func:`dicke_state` ``(len(qubits), k)`` acting on ``qubits``."""
    n = len(qubits)
    for q in range(n):
        if q >= n - k:
            circ.x(qubits[q])
        else:
            circ.rz(qubits[q], 0.0)  # identity; keeps the qubit in the circuit
    for m in range(n, 1, -1):
        last = qubits[m - 1]  # qubit m has index m - 1
        for ell in range(1, min(k, m - 1) + 1):
            theta = 2.0 * math.acos(math.sqrt(ell / m))
            target = qubits[m - 1 - ell]  # qubit m - l
            circ.cnot(target, last)
            if ell == 1:
                _cry(circ, last, target, theta)
            else:
                _ccry(circ, last, qubits[m - ell], target, theta)
            circ.cnot(target, last)
    return circ


def dicke_product(groups: Sequence[Sequence[int]], counts: Sequence[int]) -> Circuit:
    """Return a circuit preparing one Dicke state per group of qubits.

    Group g gets ``|D(len(groups[g]), counts[g])>`` on its qubits (in the order
    listed), so the state is the uniform superposition of the bit strings with
    exactly ``counts[g]`` ones in every group g.

    Args:
        groups: Disjoint, non-empty lists of qubit indices; together they must be
            ``0..n-1`` (each once), and need not be contiguous.
        counts: Ones per group, ``0 <= counts[g] <= len(groups[g])``.

    Returns:
        The circuit (no measurements), with an instruction on every qubit.

    Raises:
        ValueError: If the groups do not cover ``0..n-1`` exactly once, or
            ``counts`` has the wrong length or a count out of range.

    Example:
        >>> from braket.devices import LocalSimulator
        >>> circ = dicke_product([[0, 2], [1, 3]], [1, 1]).probability()
        >>> probs = LocalSimulator().run(circ, shots=0).result().values[0]
        >>> [format(i, "04b") for i in range(16) if probs[i] > 1e-9]
        ['0011', '0110', '1001', '1100']
    """
    qubits = sorted(int(q) for group in groups for q in group)
    if qubits != list(range(len(qubits))) or not all(len(g) for g in groups):
        raise ValueError(
            "groups must be non-empty and hold each qubit 0..n-1 exactly once, "
            f"got {[list(g) for g in groups]}"
        )
    if len(counts) != len(groups):
        raise ValueError(
            f"counts must have one entry per group ({len(groups)}), got {len(counts)}"
        )
    circ = Circuit()
    for g, (group, k) in enumerate(zip(groups, counts, strict=True)):
        if not 0 <= k <= len(group):
            raise ValueError(f"count of group {g} must be in 0..{len(group)}, got {k}")
        _append_dicke(circ, [int(q) for q in group], int(k))
    return circ


def mixer_edges(n: int, graph: str) -> list[tuple[int, int]]:
    """Edges of the XY mixer on n qubits, ``graph`` ``"ring"`` or ``"complete"``.

    The ring lists even edges ``(0,1), (2,3), ...`` before odd ones, so that each
    half is one layer of disjoint pairs.
    """
    _check_graph(graph)
    if graph == "complete":
        return [(i, j) for i in range(n) for j in range(i + 1, n)]
    if n < 3:
        return [(0, 1)] if n == 2 else []
    edges = [(i, (i + 1) % n) for i in range(n)]
    return edges[0::2] + edges[1::2]


def _check_graph(graph: str) -> None:
    """Raise ValueError naming ``graph`` unless it is ``"ring"`` or ``"complete"``."""
    if graph not in ("ring", "complete"):
        raise ValueError(f"mixer graph must be 'ring' or 'complete', got {graph!r}")


def group_mixer_edges(
    groups: Sequence[Sequence[int]], graph: str
) -> list[tuple[int, int]]:
    """Edges of the XY mixer inside each group of qubits, none across groups.

    Each group gets :func:`mixer_edges` of its size, mapped to its qubits (in the
    order listed); a group of one qubit gets none.

    Example:
        >>> group_mixer_edges([[0, 2, 4], [1, 3], [5]], "ring")
        [(0, 2), (4, 0), (2, 4), (1, 3)]
    """
    _check_graph(graph)
    edges: list[tuple[int, int]] = []
    for group in groups:
        qs = [int(q) for q in group]
        edges += [(qs[a], qs[b]) for a, b in mixer_edges(len(qs), graph)]
    return edges


def cost_layer(
    circ: Circuit, gamma: float, h: np.ndarray, J: np.ndarray, *, compact: bool
) -> Circuit:
    """Append ``exp(-i gamma C)``, ``C = -sum h_i Z_i + sum_{i<j} J_ij Z_i Z_j``.

    ``h`` and the strictly upper triangular ``J`` are a spin form with
    ``s = 2x - 1``; zero coefficients are skipped.
    """
    for i in np.flatnonzero(h):
        circ.rz(int(i), -2.0 * gamma * float(h[i]))
    rows, cols = np.nonzero(np.triu(J, 1))
    for i, j in zip(rows.tolist(), cols.tolist(), strict=True):
        _rzz(circ, i, j, 2.0 * gamma * float(J[i, j]), compact)
    return circ


def linear_ramp(p: int, dt: float = RAMP_DT) -> np.ndarray:
    """Initial angles of a discretised linear anneal.

    ``gamma_i = (i + 1/2) / p * dt`` and ``beta_i = (1 - (i + 1/2) / p) * dt``,
    returned flat as ``(gamma_0..gamma_{p-1}, beta_0..beta_{p-1})``.

    Example:
        >>> linear_ramp(2, 1.0).tolist()
        [0.25, 0.75, 0.75, 0.25]
    """
    t = (np.arange(p) + 0.5) / p
    return np.concatenate([t * dt, (1.0 - t) * dt])


def gate_counts(circ: Circuit) -> dict[str, int]:
    """Instruction counts of ``circ`` by gate name, plus ``total`` and ``two_qubit``.

    Example:
        >>> gate_counts(Circuit().h(0).cnot(0, 1))
        {'cnot': 1, 'h': 1, 'total': 2, 'two_qubit': 1}
    """
    counts: dict[str, int] = {}
    for ins in circ.instructions:
        name = ins.operator.name.lower()
        counts[name] = counts.get(name, 0) + 1
    counts = dict(sorted(counts.items()))
    counts["total"] = len(circ.instructions)
    counts["two_qubit"] = sum(1 for ins in circ.instructions if len(ins.target) == 2)
    return counts


def problem_groups(problem: BlockProblem) -> tuple[list[list[int]], list[int]]:
    """The qubits of each group of ``problem`` and each group's count of ones.

    An ungrouped problem is one group of all n qubits with count k.

    Example:
        >>> problem_groups(BlockProblem([[0.0, 0.0], [0.0, 0.0]], 1))
        ([[0, 1]], [1])
    """
    qubits = [members.tolist() for members in problem.group_indices]
    return qubits, problem.group_counts.tolist()


def _mixer_edges(problem: BlockProblem, graph: str) -> list[tuple[int, int]]:
    """XY mixer edges of ``problem``: inside the groups that can move.

    A group with no ones or all ones gets no edges: its qubits stay in a basis
    state that the XY hop leaves unchanged. (An ungrouped problem keeps all its
    edges.)
    """
    if not problem.is_grouped:
        return mixer_edges(problem.n, graph)
    groups, counts = problem_groups(problem)
    movable = [g for g, k in zip(groups, counts, strict=True) if 0 < k < len(g)]
    return group_mixer_edges(movable, graph)


class Ansatz:
    """The QAOA circuit family of one block problem.

    The Ising coefficients are divided by their largest magnitude (``scale``) so
    that angles of order one mean the same for every problem. For a grouped
    problem the ``xy`` ansatz starts in one Dicke state per group and hops only
    inside groups (:func:`dicke_product`, :func:`group_mixer_edges`).

    Args:
        problem: The block problem.
        p: Number of layers, ``p >= 1``.
        mixer: ``"xy"`` (Dicke state, XY mixer, plain cost) or ``"x"`` (``|+>^n``,
            X mixer, penalised cost).
        graph: Graph of the XY mixer, ``"ring"`` or ``"complete"``.
        penalty: Cardinality penalty of the ``x`` ansatz (``None``: the problem's
            default); ignored by ``xy``.
        gate_set: ``"compact"`` or ``"basic"``.
    """

    def __init__(
        self,
        problem: BlockProblem,
        *,
        p: int,
        mixer: str,
        graph: str = "ring",
        penalty: float | None = None,
        gate_set: str = "compact",
    ):
        if mixer not in ("xy", "x"):
            raise ValueError(f"mixer must be 'xy' or 'x', got {mixer!r}")
        if gate_set not in GATE_SETS:
            raise ValueError(f"gate_set must be 'compact' or 'basic', got {gate_set!r}")
        self.problem, self.p, self.mixer, self.gate_set = problem, p, mixer, gate_set
        self.penalty = 0.0 if mixer == "xy" else problem.default_penalty()
        if mixer == "x" and penalty is not None:
            self.penalty = float(penalty)
        h, J, _ = problem.to_ising(self.penalty)
        scale = float(max(np.abs(h).max(), np.abs(J).max(initial=0.0)))
        self.scale = scale if scale > 0 else 1.0
        self._h, self._J = h / self.scale, J / self.scale
        self._edges = _mixer_edges(problem, graph) if mixer == "xy" else []
        if mixer == "xy":
            self._prefix = dicke_product(*problem_groups(problem))
        else:
            self._prefix = Circuit()
            for q in range(problem.n):
                self._prefix.h(q)

    def circuit(self, angles: np.ndarray) -> Circuit:
        """The circuit for flat angles ``(gamma_0..gamma_{p-1}, beta_0..beta_{p-1})``.

        No measurement instructions: devices measure every qubit.
        """
        angles = np.asarray(angles, dtype=np.float64)
        if angles.shape != (2 * self.p,):
            raise ValueError(
                f"expected 2p = {2 * self.p} angles, got shape {angles.shape}"
            )
        compact = self.gate_set == "compact"
        circ = Circuit().add_circuit(self._prefix)
        for gamma, beta in zip(angles[: self.p], angles[self.p :], strict=True):
            cost_layer(circ, float(gamma), self._h, self._J, compact=compact)
            if self.mixer == "xy":
                for a, b in self._edges:
                    _hop(circ, a, b, float(beta), compact)
            else:
                for q in range(self.problem.n):
                    circ.rx(q, -2.0 * float(beta))  # exp(+i beta X)
        return circ


# ------------------------------------------------------------ sample tallying
class SampleTally:
    """Keeps the objective's mean and the best answers over all evaluations.

    ``xy`` samples are all feasible and scored by ``x^T Q x``. ``x`` samples are
    scored by the penalised energy (a penalty per group for a grouped problem);
    the best raw feasible one is kept, and the ``REPAIR_POOL`` distinct
    infeasible samples with the lowest penalised energy are repaired
    (``problem.repair``, per group) by :meth:`answer`.

    Args:
        problem: The block problem.
        penalty: Penalty strength of the objective (0 for ``xy``).
    """

    def __init__(self, problem: BlockProblem, penalty: float):
        self.problem, self.penalty = problem, penalty
        self.shots = self.feasible_shots = 0
        self.best_raw_x: np.ndarray | None = None
        self.best_raw_energy = math.inf
        self._pool: dict[bytes, float] = {}

    def violation(self, bits: np.ndarray) -> np.ndarray:
        """``sum_g (ones in group g - k_g)^2`` of each row of ``bits`` ``(m, n)``."""
        ones = self.problem.count_ones(bits)  # (m, G)
        return ((ones - self.problem.group_counts) ** 2).sum(axis=1)

    def add(self, bits: np.ndarray) -> float:
        """Record one evaluation's samples ``(shots, n)``; return the mean objective."""
        unique, counts = np.unique(bits.astype(np.int8), axis=0, return_counts=True)
        X = unique.astype(np.float64)
        energies = np.einsum("mi,mi->m", X @ self.problem.Q, X)  # (m,) x^T Q x
        violation = self.violation(unique)
        feasible = violation == 0
        objective = energies + self.penalty * violation.astype(np.float64)
        self.shots += int(counts.sum())
        self.feasible_shots += int(counts[feasible].sum())
        if feasible.any():
            j = np.flatnonzero(feasible)[np.argmin(energies[feasible])]
            if energies[j] < self.best_raw_energy:
                self.best_raw_energy, self.best_raw_x = float(energies[j]), unique[j]
        for j in np.flatnonzero(~feasible):
            self._pool[unique[j].tobytes()] = float(objective[j])
        if len(self._pool) > 4 * REPAIR_POOL:
            self._pool = dict(
                sorted(self._pool.items(), key=lambda kv: kv[1])[:REPAIR_POOL]
            )
        return float(objective @ counts / counts.sum())

    def answer(self) -> tuple[np.ndarray, bool]:
        """The best feasible answer and whether it came from a repaired sample."""
        best_x, best_e, repaired = self.best_raw_x, self.best_raw_energy, False
        pool = sorted(self._pool.items(), key=lambda kv: kv[1])[:REPAIR_POOL]
        for key, _ in pool:
            x = self.problem.repair(np.frombuffer(key, dtype=np.int8))
            e = self.problem.energy(x)
            if e < best_e:
                best_x, best_e, repaired = x, e, True
        if best_x is None:  # no samples at all: cannot happen with shots >= 1
            raise RuntimeError("QAOA produced no samples")
        return np.asarray(best_x, dtype=np.int8), repaired


# ----------------------------------------------------------------- the loop
@dataclass
class AngleSearch:
    """The record of one angle optimisation.

    Attributes:
        angles: Optimised flat angles ``(gammas, betas)``.
        history: Mean objective of each evaluation, in order (problem units; the
            penalised energy for the ``x`` ansatz).
        evaluations: Number of circuit runs.
        converged: scipy's ``success`` flag.
    """

    angles: np.ndarray
    history: list[float] = field(default_factory=list)
    evaluations: int = 0
    converged: bool = False


def optimise_angles(
    evaluate: Callable[[np.ndarray], float],
    x0: np.ndarray,
    *,
    optimizer: str,
    maxiter: int,
) -> AngleSearch:
    """Minimise ``evaluate(angles)`` with ``scipy.optimize.minimize``.

    Args:
        evaluate: Runs the circuit for the angles and returns the mean objective.
        x0: Initial flat angles.
        optimizer: ``"COBYLA"``, ``"Nelder-Mead"`` or ``"Powell"`` (derivative-free;
            shot noise rules out finite differences).
        maxiter: Most objective evaluations the optimiser may spend (COBYLA
            spends at least ``len(x0) + 2``).
    """
    from scipy.optimize import minimize

    record = AngleSearch(angles=np.asarray(x0, dtype=np.float64))

    def objective(angles: np.ndarray) -> float:
        value = evaluate(angles)
        record.history.append(value)
        record.evaluations += 1
        logger.debug(
            "QAOA evaluation %d: mean objective %.6g", record.evaluations, value
        )
        return value

    options: dict[str, Any]
    if optimizer == "COBYLA":  # it needs len(angles) + 2 evaluations at least
        options = {"maxiter": max(maxiter, record.angles.size + 2), "rhobeg": 0.25}
    else:
        options = {"maxfev": maxiter}
    result = minimize(objective, record.angles, method=optimizer, options=options)
    record.angles = np.asarray(result.x, dtype=np.float64)
    record.converged = bool(result.success)
    return record
