"""The block subproblem of iCBS: ``min x^T Q x`` subject to ``sum(x) = k``.

With groups (N:M sparsity) the constraint is one count per group:
``sum_{i in g} x_i = k_g`` for every group ``g``.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from icbs_opt.atomic import atomic_write
from icbs_opt.checks import check_int, is_integer
from icbs_opt.errors import ProblemError

if TYPE_CHECKING:
    import dimod

#: Entries with ``|Q_ij|`` at or below this are set to zero by :meth:`scaled`.
ZERO_CUTOFF = 1e-12


def _symmetric_matrix(Q: Any) -> np.ndarray:
    """``(Q + Q^T) / 2`` as float64, after checking Q is square and finite.

    Refuses entries so large that ``(Q + Q^T) / 2``, an energy ``x^T Q x`` or the
    cardinality penalty forms (below ``8 n^2 sum |Q_ij|``) would overflow float64.
    """
    if np.iscomplexobj(Q):
        raise ProblemError("Q must be real, got complex entries")
    try:
        Q = np.asarray(Q, dtype=np.float64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProblemError(f"Q must be a numeric matrix, got {type(Q)!r}") from exc
    if Q.ndim != 2 or Q.shape[0] != Q.shape[1]:
        raise ProblemError(f"Q must be a square matrix, got shape {Q.shape}")
    n = Q.shape[0]
    if n < 1:
        raise ProblemError("Q must have at least one row (n >= 1), got n = 0")
    S = _symmetrised(Q)
    with np.errstate(over="ignore", invalid="ignore"):
        total = float(np.abs(S).sum())  # bounds |x^T Q x| over every 0/1 x
    if not np.isfinite(total) and not np.isfinite(Q).all():
        bad = np.argwhere(~np.isfinite(Q))[0]
        raise ProblemError(
            f"Q must be finite, got {Q[tuple(bad)]} at index ({bad[0]}, {bad[1]})"
        )
    limit = np.finfo(np.float64).max / (8.0 * n * n)
    if not total <= limit:  # also catches inf
        raise ProblemError(
            f"Q is too large for float64: sum |Q_ij| = {total:.3g} after "
            f"symmetrising, above {limit:.3g} for n = {n}; scale Q down"
        )
    return S


def _symmetrised(Q: np.ndarray) -> np.ndarray:
    """A new array ``(Q + Q^T) / 2``, through torch's cache-blocked transpose.

    (Four times numpy's speed at n = 1024, with the same bits.)
    """
    import torch

    if not (Q.flags.c_contiguous and Q.flags.writeable):
        Q = np.array(Q, order="C")  # torch reads neither
    Qt = torch.from_numpy(Q)
    S = Qt.T.contiguous()
    S += Qt
    S *= 0.5  # exactly / 2
    return S.numpy()


def _check_groups(groups: Any, n: int) -> np.ndarray:
    """``groups`` as a new ``(n,)`` int64 array of ids ``0 .. G-1``, all used."""
    if isinstance(groups, str):
        raise ProblemError(f"groups must be a sequence of n = {n} ids, got {groups!r}")
    try:
        arr = np.asarray(groups)
    except (TypeError, ValueError) as exc:  # ragged nested sequences
        raise ProblemError(f"groups must be a sequence of n = {n} ids: {exc}") from exc
    if arr.shape != (n,):
        raise ProblemError(
            f"groups must hold one group id per variable, shape ({n},), "
            f"got shape {arr.shape}"
        )
    values = arr.tolist()
    # bools and integral floats are refused; huge ints (an object array) pass here
    bad = [i for i, v in enumerate(values) if not is_integer(v)]
    if bad:
        # show a fractional id when there is one: it is the likelier mistake
        fractional = (i for i in bad if isinstance(values[i], float))
        i = next((i for i in fractional if not values[i].is_integer()), bad[0])
        raise ProblemError(
            f"groups must hold integer group ids, got {values[i]!r} at index {i}"
        )
    bad = np.flatnonzero((arr < 0) | (arr >= n))  # ids >= n leave some id unused
    if bad.size:
        i = int(bad[0])
        raise ProblemError(
            f"groups must hold ids 0..G-1 with G <= n = {n}, got {arr[i]} at index {i}"
        )
    arr = arr.astype(np.int64)
    unused = np.flatnonzero(np.bincount(arr) == 0)
    if unused.size:
        raise ProblemError(
            f"groups must use every id 0..{int(arr.max())}, but id {unused[0]} has "
            "no variable"
        )
    return arr


def _check_counts(k: Any, sizes: np.ndarray) -> np.ndarray:
    """The ones per group, ``(G,)`` int64, from one count for all or one per group."""
    if isinstance(k, str):  # check_int parses strings; a problem takes numbers
        raise ProblemError(f"k must be an integer or one per group, got {k!r}")
    try:
        ndim = np.ndim(k)
    except ValueError:  # a ragged nested sequence
        ndim = -1
    if ndim == 0:
        values = [k] * sizes.size
    elif ndim == 1 and len(k) == sizes.size:
        values = list(k)
    else:
        raise ProblemError(
            f"k must be one integer or one count per group ({sizes.size} groups), "
            f"got {k!r}"
        )
    return np.array(
        [
            check_int(
                value,
                f"k for group {g} ({size} variable{'s' if size != 1 else ''})",
                minimum=0,
                maximum=int(size),
                error=ProblemError,
            )
            for g, (value, size) in enumerate(zip(values, sizes, strict=True))
        ],
        dtype=np.int64,
    )


def _check_constraints(k: Any, groups: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Group ids ``(n,)`` and counts ``(G,)``; an ungrouped problem is one group."""
    if groups is None:
        if isinstance(k, str):  # check_int parses strings; a problem takes numbers
            raise ProblemError(f"k must be an integer, got {k!r}")
        k = check_int(k, "k", minimum=0, maximum=n, error=ProblemError)
        return np.zeros(n, dtype=np.int64), np.array([k], dtype=np.int64)
    groups = _check_groups(groups, n)
    return groups, _check_counts(k, np.bincount(groups))


def _cqm_group_order(cqm: Any, index: Mapping[Any, int]) -> list[tuple[Any, Any]]:
    """The constraints of a CQM in group order, the same after a file round trip.

    dimod's CQM files do not keep the order of constraints, so group ``g`` is the
    constraint labelled ``group_g`` when the labels are those :meth:`to_cqm`
    writes, and otherwise groups follow the lowest index of their variables.
    """
    items = list(cqm.constraints.items())
    ours = {f"group_{g}": g for g in range(len(items))}
    if all(label in ours for label, _ in items):
        return sorted(items, key=lambda item: ours[item[0]])
    return sorted(
        items,
        key=lambda item: min((index[v] for v in item[1].lhs.variables), default=-1),
    )


def _cqm_count(label: Any, comparison: Any) -> int:
    """``k`` of a CQM constraint ``sum(x) == k``; refuses any other constraint."""
    import dimod

    lhs = comparison.lhs
    if lhs.is_soft():
        raise ProblemError(
            f"constraint {label!r} is soft (weighted); only hard constraints "
            "sum(x) == k are accepted"
        )
    if comparison.sense is not dimod.sym.Sense.Eq:
        raise ProblemError(
            f"constraint {label!r} must be an equality '==', got "
            f"'{comparison.sense.value}'"
        )
    if lhs.num_interactions:
        raise ProblemError(
            f"constraint {label!r} must be linear sum(x) == k, got "
            f"{lhs.num_interactions} quadratic term(s)"
        )
    for v, bias in lhs.iter_linear():
        if bias != 1:
            raise ProblemError(
                f"constraint {label!r} must have every coefficient 1, got {bias:g} "
                f"on variable {v!r}"
            )
    if not lhs.num_variables:
        raise ProblemError(f"constraint {label!r} has no variables")
    k = comparison.rhs - lhs.offset
    if not (float(k).is_integer() and 0 <= k <= lhs.num_variables):
        raise ProblemError(
            f"constraint {label!r} must have an integer right-hand side k in "
            f"[0, {lhs.num_variables}] (its variables), got {k:g}"
        )
    return int(k)


def _cqm_groups(
    cqm: Any, labels: list[Any], index: Mapping[Any, int]
) -> tuple[np.ndarray, list[int]]:
    """``(n,)`` group of each variable and the count of each group, of a CQM."""
    groups = np.full(len(labels), -1, dtype=np.int64)
    counts = []
    constraints = _cqm_group_order(cqm, index)
    for g, (label, comparison) in enumerate(constraints):
        counts.append(_cqm_count(label, comparison))
        for v in comparison.lhs.variables:
            if groups[index[v]] >= 0:
                other = constraints[groups[index[v]]][0]
                raise ProblemError(
                    f"constraint {label!r}: variable {v!r} is also in constraint "
                    f"{other!r}; the groups of sum(x) == k must be disjoint"
                )
            groups[index[v]] = g
    free = np.flatnonzero(groups < 0)
    if free.size:
        raise ProblemError(
            f"variable {labels[free[0]]!r} is in no constraint; every variable "
            "must be in exactly one constraint sum(x) == k"
        )
    return groups, counts


def _cqm_matrix(
    objective: Any, labels: list[Any], index: Mapping[Any, int]
) -> np.ndarray:
    """The symmetric Q of a CQM objective with no offset."""
    if objective.offset != 0:
        raise ProblemError(
            f"the objective x^T Q x has no offset, got offset {objective.offset}"
        )
    Q = np.zeros((len(labels), len(labels)))
    Q[np.diag_indices(len(labels))] = [objective.get_linear(v) for v in labels]
    for u, v, bias in objective.iter_quadratic():
        Q[index[u], index[v]] += bias / 2.0
        Q[index[v], index[u]] += bias / 2.0
    return Q


def _short(values: np.ndarray, limit: int = 6) -> str:
    """``[a, b, c]``, or ``[a, b, c, ..., z]`` for more than ``limit`` values."""
    items = [str(v) for v in values.tolist()]
    if len(items) > limit:
        items = [*items[: limit - 1], "...", items[-1]]
    return f"[{', '.join(items)}]"


class BlockProblem:
    """A cardinality-constrained binary quadratic problem, optionally grouped.

    ``x_i = 1`` means weight ``i`` of the block is pruned. The objective is
    ``x^T Q x`` with ``Q`` symmetric (a non-symmetric input is replaced by
    ``(Q + Q^T) / 2``, which leaves every energy unchanged). Without ``groups`` a
    feasible ``x`` has exactly ``k`` ones. With ``groups`` (N:M sparsity), each
    variable belongs to a group and a feasible ``x`` has exactly ``k_g`` ones in
    every group ``g``.

    Args:
        Q: Square, finite ``(n, n)`` matrix, ``n >= 1``.
        k: Without groups: the number of ones, ``0 <= k <= n``. With groups: one
            count for every group, or a sequence of ``G`` counts (``k[g]`` ones in
            group ``g``), each between 0 and the size of its group.
        groups: Optional group id per variable, ``n`` integers using every id
            ``0 .. G-1`` (groups need not be contiguous). A single group (``G = 1``)
            is the ungrouped problem.
        meta: Optional extra information kept with the problem and written to
            ``.npz`` files (numbers, strings or arrays), e.g. the layer it came from.

    Raises:
        ProblemError: If ``Q`` is not square and finite, so large that energies
            would overflow float64, ``groups`` is not a valid id per variable, or
            a count is not an integer in ``[0, size of its group]``.

    Example:
        >>> p = BlockProblem([[1.0, -2.0], [-2.0, 1.0]], k=1)
        >>> p.energy([1, 0])
        1.0
        >>> p.is_feasible([1, 1])
        False
        >>> g = BlockProblem(np.eye(4), k=[1, 2], groups=[0, 1, 0, 1])
        >>> g.k, g.group_counts.tolist(), g.is_feasible([1, 1, 0, 1])
        (3, [1, 2], True)
    """

    __slots__ = ("_Q", "_k", "_groups", "_counts", "_members", "_meta")

    def __init__(
        self,
        Q: Any,
        k: int | Sequence[int] | np.ndarray,
        *,
        groups: Sequence[int] | np.ndarray | None = None,
        meta: Mapping[str, Any] | None = None,
    ):
        Q = _symmetric_matrix(Q)
        groups, counts = _check_constraints(k, groups, Q.shape[0])
        Q.flags.writeable = False
        self._Q = Q
        self._set_constraints(groups, counts)
        self._meta = dict(meta or {})

    @classmethod
    def _derived(
        cls,
        Q: np.ndarray,
        k: int | np.ndarray,
        meta: Mapping[str, Any] | None = None,
        *,
        groups: np.ndarray | None = None,
    ) -> BlockProblem:
        """A problem from a valid one's symmetric, finite float64 Q (no checks).

        ``k`` and ``groups`` are a valid problem's: an int and ``None``, or its
        ``group_counts`` and ``groups``.
        """
        problem = cls.__new__(cls)
        Q.flags.writeable = False
        problem._Q, problem._meta = Q, dict(meta or {})
        if groups is None:
            groups = np.zeros(Q.shape[0], dtype=np.int64)
        problem._set_constraints(
            np.asarray(groups, dtype=np.int64), np.atleast_1d(np.asarray(k, np.int64))
        )
        return problem

    def _set_constraints(self, groups: np.ndarray, counts: np.ndarray) -> None:
        """Store the checked ids and counts, read-only, with each group's members."""
        order = np.argsort(groups, kind="stable")
        members = np.split(order, np.cumsum(np.bincount(groups))[:-1])
        for arr in (groups, counts, *members):
            arr.flags.writeable = False
        self._groups, self._counts, self._members = groups, counts, tuple(members)
        self._k = int(counts.sum())

    # ------------------------------------------------------------------ basics
    @property
    def Q(self) -> np.ndarray:  # noqa: N802 - the matrix is called Q in the paper
        """The symmetric ``(n, n)`` float64 matrix (read-only)."""
        return self._Q

    @property
    def k(self) -> int:
        """The total number of ones of a feasible x (the sum of the group counts)."""
        return self._k

    @property
    def n(self) -> int:
        """The number of variables."""
        return self._Q.shape[0]

    @property
    def groups(self) -> np.ndarray:
        """The ``(n,)`` int64 group id per variable (read-only; zeros if ungrouped)."""
        return self._groups

    @property
    def group_counts(self) -> np.ndarray:
        """The ``(G,)`` int64 ones per group (read-only; ``[k]`` if ungrouped)."""
        return self._counts

    @property
    def num_groups(self) -> int:
        """The number of groups ``G`` (1 when ungrouped)."""
        return self._counts.size

    @property
    def group_indices(self) -> tuple[np.ndarray, ...]:
        """The variables of each group, ascending int64 arrays (read-only)."""
        return self._members

    @property
    def is_grouped(self) -> bool:
        """Whether the problem has more than one group."""
        return self._counts.size > 1

    @property
    def meta(self) -> dict[str, Any]:
        """Extra information stored with the problem (a copy)."""
        return dict(self._meta)

    def __repr__(self) -> str:
        if not self.is_grouped:
            return f"BlockProblem(n={self.n}, k={self.k})"
        return (
            f"BlockProblem(n={self.n}, k={self.k}, groups={self.num_groups}, "
            f"group_counts={_short(self._counts)})"
        )

    def _as_x(self, x: Any) -> np.ndarray:
        arr = np.asarray(x)
        if arr.shape != (self.n,):
            raise ProblemError(f"x must have shape ({self.n},), got {arr.shape}")
        if not np.isin(arr, (0, 1)).all():
            raise ProblemError("x must contain only 0 and 1")
        return arr.astype(np.float64)

    def energy(self, x: Any) -> float:
        """Return ``x^T Q x`` for a 0/1 vector ``x`` of length ``n``."""
        xf = self._as_x(x)
        return float(xf @ self._Q @ xf)

    def count_ones(self, x: Any) -> np.ndarray:
        """The number of ones in each group of ``x``.

        Args:
            x: A 0/1 vector ``(n,)`` or a batch of them ``(m, n)``.

        Returns:
            ``(G,)`` int64 counts, or ``(m, G)`` for a batch.

        Example:
            >>> p = BlockProblem(np.eye(4), k=1, groups=[0, 0, 1, 1])
            >>> p.count_ones([[1, 1, 0, 1], [0, 0, 0, 1]]).tolist()
            [[2, 1], [0, 1]]
        """
        arr = np.asarray(x)
        if arr.ndim not in (1, 2) or arr.shape[-1] != self.n:
            raise ProblemError(
                f"x must have shape ({self.n},) or (m, {self.n}), got {arr.shape}"
            )
        rows = arr.reshape(-1, self.n)
        G = self.num_groups
        bins = (np.arange(rows.shape[0])[:, None] * G + self._groups).ravel()
        counts = np.bincount(bins, weights=rows.ravel(), minlength=rows.shape[0] * G)
        return np.rint(counts).astype(np.int64).reshape(arr.shape[:-1] + (G,))

    def is_feasible(self, x: Any) -> bool:
        """Whether ``x`` is 0/1 of length ``n`` with the right ones in every group."""
        arr = np.asarray(x)
        if arr.shape != (self.n,):
            raise ProblemError(f"x must have shape ({self.n},), got {arr.shape}")
        return bool(
            np.isin(arr, (0, 1)).all()
            and np.array_equal(self.count_ones(arr), self._counts)
        )

    def check_feasible(self, x: Any, name: str = "x") -> np.ndarray:
        """Return ``x`` decoded to 0/1, or raise saying which count is wrong.

        Raises:
            ProblemError: ``"x0 must have exactly k = 2 ones, got 3"``, or for a
                grouped problem ``"x0 must have exactly 2 ones in group 1, got 3"``.
        """
        arr = self.decode(x)
        ones = self.count_ones(arr)
        wrong = np.flatnonzero(ones != self._counts)
        if wrong.size and not self.is_grouped:
            raise ProblemError(
                f"{name} must have exactly k = {self.k} ones, got {int(ones[0])}"
            )
        if wrong.size:
            g = int(wrong[0])
            raise ProblemError(
                f"{name} must have exactly {self._counts[g]} ones in group {g}, "
                f"got {ones[g]}"
            )
        return arr

    def random_feasible(self, seed: int | None = None) -> np.ndarray:
        """Return a random feasible 0/1 vector, uniform within each group."""
        rng = np.random.default_rng(seed)
        x = np.zeros(self.n, dtype=np.int8)
        for members, count in zip(self._members, self._counts, strict=True):
            x[members[rng.choice(members.size, count, replace=False)]] = 1
        return x

    # ----------------------------------------------------------- penalty forms
    def max_flip_delta(self) -> float:
        """Largest ``|change of x^T Q x|`` a single bit flip can cause, over all x.

        Equal to ``max_i |Q_ii| + 2 sum_{j != i} |Q_ij|``.
        """
        A = np.abs(self._Q)
        return float((2.0 * A.sum(axis=1) - np.diag(A)).max())

    def default_penalty(self) -> float:
        """The cardinality penalty strength used when none is given.

        With ``P > max_flip_delta()``, every infeasible x has a neighbour one flip
        closer to its group's count with lower penalised energy (the penalty drops
        by at least P), so every ground state of the penalised model is feasible.
        This safe strength flattens the landscape for heuristic samplers; backends
        search smaller strengths first.
        """
        return 1.01 * self.max_flip_delta() or 1.0

    def _penalised_terms(
        self, penalty: float | None
    ) -> tuple[np.ndarray, np.ndarray, float]:
        """Linear terms, strictly upper quadratic terms and offset (binary).

        ``P (sum_{i in g} x_i - k_g)^2`` expands, with ``x_i^2 = x_i``, into
        ``P (1 - 2 k_g)`` per variable, ``2 P`` per pair inside the group and
        ``P k_g^2``.
        """
        P = self.default_penalty() if penalty is None else float(penalty)
        if not np.isfinite(P) or P < 0:
            raise ProblemError(f"penalty must be a finite number >= 0, got {penalty}")
        k_of = self._counts[self._groups].astype(np.float64)  # (n,) k_g of each i
        linear = np.diag(self._Q) + P * (1 - 2 * k_of)
        same = self._groups[:, None] == self._groups[None, :]  # (n, n) same group
        quad = np.triu(2.0 * self._Q + 2.0 * P * same, 1)
        return linear, quad, float((P * self._counts * self._counts).sum())

    def to_bqm(self, penalty: float | None = None) -> dimod.BinaryQuadraticModel:
        """Return the BQM ``x^T Q x + penalty * sum_g (sum_{i in g} x_i - k_g)^2``.

        Ungrouped, the sum has the one term ``(sum(x) - k)^2``. Each term is the
        ``dimod.generators.combinations`` penalty of its group, built directly.

        Args:
            penalty: Strength of the cardinality penalty; ``None`` takes
                :meth:`default_penalty`, ``0`` gives the unconstrained objective.

        Returns:
            A BINARY ``dimod.BinaryQuadraticModel`` on variables ``0 .. n-1`` whose
            energy equals ``x^T Q x`` on every feasible x.
        """
        linear, quad, offset = self._penalised_terms(penalty)
        rows, cols = np.nonzero(quad)
        import dimod  # lazily: it takes half a second to import

        return dimod.BinaryQuadraticModel.from_numpy_vectors(
            linear, (rows, cols, quad[rows, cols]), offset, dimod.BINARY
        )

    def to_ising(
        self, penalty: float | None = None
    ) -> tuple[np.ndarray, np.ndarray, float]:
        """Return the spin form ``(h, J, offset)`` of :meth:`to_bqm`.

        With ``x = (1 + s) / 2`` and spins ``s in {-1, +1}``, the energy is
        ``h @ s + s @ J @ s + offset`` where ``J`` is strictly upper triangular.
        """
        linear, quad, offset = self._penalised_terms(penalty)
        h = linear / 2.0 + (quad.sum(axis=0) + quad.sum(axis=1)) / 4.0
        J = quad / 4.0
        return h, J, float(offset + linear.sum() / 2.0 + quad.sum() / 4.0)

    def to_cqm(self) -> dimod.ConstrainedQuadraticModel:
        """Return the problem as a dimod ``ConstrainedQuadraticModel``.

        The objective is ``x^T Q x`` (``to_bqm(0)``) on BINARY variables
        ``0 .. n-1``, with one constraint ``sum_{i in g} x_i == k_g`` per group,
        labelled ``"cardinality"`` when ungrouped and ``"group_0"``, ``"group_1"``,
        ... otherwise.

        Example:
            >>> cqm = BlockProblem([[1.0, -2.0], [-2.0, 1.0]], k=1).to_cqm()
            >>> list(cqm.constraints), float(cqm.objective.energy({0: 1, 1: 1}))
            (['cardinality'], -2.0)
        """
        import dimod

        cqm = dimod.ConstrainedQuadraticModel()
        cqm.set_objective(self.to_bqm(0.0))
        for g, (members, count) in enumerate(
            zip(self._members, self._counts, strict=True)
        ):
            label = f"group_{g}" if self.is_grouped else "cardinality"
            terms = [(int(i), 1) for i in members]
            cqm.add_constraint_from_iterable(terms, "==", rhs=int(count), label=label)
        return cqm

    @classmethod
    def from_cqm(cls, cqm: dimod.ConstrainedQuadraticModel) -> BlockProblem:
        """Read a problem from a CQM of the form :meth:`to_cqm` writes.

        Variable ``i`` of the problem is the ``i``-th of ``cqm.variables``. Group
        ``g`` is the constraint labelled ``group_g`` (as :meth:`to_cqm` writes),
        or for other labels the constraints are numbered in the order of their
        lowest variable (dimod's files do not keep constraint order).

        Accepted: BINARY variables, an objective without offset, and hard
        equality constraints ``sum(x) == k`` with all coefficients 1 over
        disjoint sets of variables that together hold every variable.

        Raises:
            ProblemError: Naming the first constraint or variable that breaks
                the form, e.g. ``constraint 'c1' must be an equality '==', got
                '<='``.
        """
        import dimod

        if not isinstance(cqm, dimod.ConstrainedQuadraticModel):
            raise ProblemError(
                f"expected a dimod ConstrainedQuadraticModel, got {type(cqm).__name__}"
            )
        labels = list(cqm.variables)
        if not labels:
            raise ProblemError("the CQM has no variables; a problem needs n >= 1")
        index = {v: i for i, v in enumerate(labels)}
        for v in labels:
            if cqm.vartype(v) is not dimod.BINARY:
                raise ProblemError(
                    f"variable {v!r} must be BINARY, got {cqm.vartype(v).name}"
                )
        groups, counts = _cqm_groups(cqm, labels, index)
        Q = _cqm_matrix(cqm.objective, labels, index)
        grouped = len(counts) > 1
        return cls(
            Q, counts if grouped else counts[0], groups=groups if grouped else None
        )

    # ------------------------------------------------------- samples and repair
    def decode(self, sample: Any) -> np.ndarray:
        """Turn a sample (mapping ``i -> value`` or a sequence) into a 0/1 vector.

        Spin values ``-1/+1`` are mapped to ``0/1``. The result need not be feasible.
        """
        if isinstance(sample, Mapping):
            missing = [i for i in range(self.n) if i not in sample]
            if missing or len(sample) != self.n:
                raise ProblemError(
                    f"sample must assign exactly the variables 0..{self.n - 1}, "
                    f"got {len(sample)} variables (missing e.g. {missing[:3]})"
                )
            arr = np.array([sample[i] for i in range(self.n)])
        else:
            arr = np.asarray(sample)
        if arr.shape != (self.n,):
            raise ProblemError(
                f"sample must have {self.n} values, got shape {arr.shape}"
            )
        if np.isin(arr, (-1, 1)).all() and (arr == -1).any():
            arr = (arr + 1) // 2
        if not np.isin(arr, (0, 1)).all():
            raise ProblemError("sample values must be 0/1 or -1/+1")
        return arr.astype(np.int8)

    def repair(self, x: Any, *, max_swaps: int | None = None) -> np.ndarray:
        """Return a feasible vector close to ``x`` with energy no worse than greedy.

        First, group by group, flips greedily (the cheapest removal or addition
        each time) until the group has its count of ones; then applies
        best-improvement swaps (one ``1 -> 0`` and one ``0 -> 1`` of the same
        group, so every count is kept) until none lowers the energy or
        ``max_swaps`` (default n) swaps were made.
        """
        x = self.decode(x)
        field = self._Q @ x.astype(np.float64)  # (n,) local fields Q x
        for members, count in zip(self._members, self._counts, strict=True):
            self._greedy_count(x, field, members, int(count))
        self._swap_descent(x, field, self.n if max_swaps is None else max_swaps)
        return x

    def _greedy_count(
        self, x: np.ndarray, field: np.ndarray, members: np.ndarray, count: int
    ) -> None:
        """Flip the cheapest bits of ``members`` until they hold ``count`` ones.

        Updates ``x`` and its local fields ``field`` in place.
        """
        Q, d = self._Q, np.diag(self._Q)
        while int(x[members].sum()) > count:
            ones = members[x[members] == 1]
            i = ones[np.argmin(d[ones] - 2.0 * field[ones])]
            x[i] = 0
            field -= Q[:, i]
        while int(x[members].sum()) < count:
            zeros = members[x[members] == 0]
            j = zeros[np.argmin(d[zeros] + 2.0 * field[zeros])]
            x[j] = 1
            field += Q[:, j]

    def _swap_descent(self, x: np.ndarray, field: np.ndarray, max_swaps: int) -> None:
        """Best-improvement swaps inside groups, in place, until none helps."""
        Q = self._Q
        tol = 1e-12 * float(np.abs(Q).max())
        pairs = self._group_pairs() if self.is_grouped else None
        for _ in range(max_swaps):
            best = self._best_swap(x, field, pairs)
            if best is None or best[2] >= -tol:
                break
            i, j, _ = best
            x[i], x[j] = 0, 1
            field += Q[:, j] - Q[:, i]

    def _group_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """All ordered pairs ``(i, j)``, ``i != j``, of variables in one group."""
        grids = [np.meshgrid(m, m, indexing="ij") for m in self._members]
        first = np.concatenate([a.ravel() for a, _ in grids])
        second = np.concatenate([b.ravel() for _, b in grids])
        distinct = first != second
        return first[distinct], second[distinct]

    def _best_swap(
        self,
        x: np.ndarray,
        field: np.ndarray,
        pairs: tuple[np.ndarray, np.ndarray] | None,
    ) -> tuple[int, int, float] | None:
        """The swap (remove ``i``, add ``j``) that lowers the energy most.

        ``pairs`` are the allowed ``(i, j)`` of a grouped problem (a list, cheap
        for small N:M groups); ``None`` allows every pair (a dense matrix).
        Returns ``None`` when no swap is possible.
        """
        Q, d = self._Q, np.diag(self._Q)
        if pairs is None:
            ones, zeros = np.flatnonzero(x), np.flatnonzero(x == 0)
            if not (ones.size and zeros.size):
                return None
            # (|ones|, |zeros|) energy change of removing ones[a] and adding zeros[b]
            delta = (
                (d[ones] - 2.0 * field[ones])[:, None]
                + (d[zeros] + 2.0 * field[zeros])[None, :]
                - 2.0 * Q[np.ix_(ones, zeros)]
            )
            a, b = np.unravel_index(np.argmin(delta), delta.shape)
            return int(ones[a]), int(zeros[b]), float(delta[a, b])
        movable = (x[pairs[0]] == 1) & (x[pairs[1]] == 0)
        ones, zeros = pairs[0][movable], pairs[1][movable]
        if not ones.size:
            return None
        delta = (
            d[ones]
            - 2.0 * field[ones]
            + d[zeros]
            + 2.0 * field[zeros]
            - 2.0 * Q[ones, zeros]
        )  # (pairs,) energy change of each allowed swap
        best = int(np.argmin(delta))
        return int(ones[best]), int(zeros[best]), float(delta[best])

    # ------------------------------------------------------------------ scaling
    def scaled(self) -> tuple[BlockProblem, float]:
        """Return the problem scaled for solvers, and the scale factor.

        Q is multiplied by ``1 / mean(|Q_ij|)`` over its non-zero entries, then
        entries with ``|Q_ij| <= 1e-12`` are set to zero. Energies of the scaled
        problem are ``scale`` times the original ones (up to the cut-off); the
        counts and groups are kept.
        """
        A = np.abs(self._Q)
        nonzero = A > 0
        count = int(np.count_nonzero(nonzero))
        if count == A.size:  # a dense Q: its mean, without gathering it
            scale = 1.0 / float(A.mean())
        else:
            scale = 1.0 / float(A[nonzero].mean()) if count else 1.0
        Qs = self._Q * scale
        A *= scale  # |Qs|
        np.putmask(Qs, A <= ZERO_CUTOFF, 0.0)
        return self._derived(Qs, self._counts, self._meta, groups=self._groups), scale

    # ---------------------------------------------------------------------- I/O
    def save(self, path: str | os.PathLike) -> None:
        """Write the problem to an ``.npz`` file (arrays ``Q``, ``k`` and meta).

        ``k`` is a scalar when ungrouped. A grouped problem also writes the
        ``(n,)`` array ``groups`` and ``k`` is then the ``(G,)`` counts. As
        :func:`numpy.savez`, ``.npz`` is appended to a path without it. The write
        is atomic (:func:`icbs_opt.atomic.atomic_write`).

        A path ending in ``.cqm`` is written in dimod's CQM file format instead
        (:meth:`to_cqm`, ``ConstrainedQuadraticModel.to_file``); it keeps Q, the
        counts and the groups, not ``meta``.
        """
        path = os.fspath(path)
        if path.endswith(".cqm"):
            atomic_write(
                path,
                lambda f: shutil.copyfileobj(self.to_cqm().to_file(), f),
                binary=True,
            )
            return
        arrays = self.to_arrays()
        target = path if path.endswith(".npz") else path + ".npz"
        atomic_write(target, lambda f: np.savez(f, **arrays), binary=True)

    def to_arrays(self) -> dict[str, Any]:
        """The problem as named arrays: ``Q``, ``k``, ``groups`` and the meta.

        ``k`` is a scalar when ungrouped; a grouped problem has the ``(n,)`` array
        ``groups`` and ``k`` is the ``(G,)`` counts. This is the one form of
        ``.npz`` files and of problems sent to Dask workers;
        :meth:`from_arrays` reads it back.

        Raises:
            ProblemError: If a meta key is ``Q``, ``k`` or ``groups``.

        Example:
            >>> p = BlockProblem(np.eye(3), [1, 0], groups=[0, 0, 1])
            >>> BlockProblem.from_arrays(p.to_arrays()).group_counts.tolist()
            [1, 0]
        """
        reserved = {"Q", "k", "groups"} & set(self._meta)
        if reserved:
            raise ProblemError(
                f"meta keys {sorted(reserved)} clash with the arrays Q, k and groups"
            )
        arrays: dict[str, Any] = {"Q": self._Q, "k": np.int64(self._k)}
        if self.is_grouped:
            arrays.update(k=self._counts, groups=self._groups)
        arrays.update(self._meta)
        return arrays

    @classmethod
    def from_arrays(
        cls, arrays: Mapping[str, Any], *, k: int | Sequence[int] | None = None
    ) -> BlockProblem:
        """The problem of :meth:`to_arrays`'s form; ``k`` replaces the stored one.

        Raises:
            ProblemError: If ``Q`` or ``k`` is missing, or ``k`` is an array
                without ``groups``.
        """
        arrays = dict(arrays)
        if "Q" not in arrays or ("k" not in arrays and k is None):
            raise ProblemError(f"must hold arrays 'Q' and 'k', found {sorted(arrays)}")
        Q = arrays.pop("Q")
        k_stored = np.asarray(arrays.pop("k", 0))
        groups = arrays.pop("groups", None)
        if k is None and groups is None and k_stored.ndim != 0:
            raise ProblemError(
                f"k must be a single integer, got an array of shape {k_stored.shape}"
            )
        if k is None:
            k = k_stored.item() if k_stored.ndim == 0 else k_stored
        meta = {
            key: (val.item() if isinstance(val, np.ndarray) and val.ndim == 0 else val)
            for key, val in arrays.items()
        }
        return cls(Q, k, groups=groups, meta=meta)

    def to_ubqp(self, path: str | os.PathLike) -> None:
        """Write the problem in the UBQP text format.

        A comment line ``# k = K``, a header ``n m`` and then ``m`` lines ``i j q``
        (1-based, ``i <= j``) such that ``x^T Q x = sum q x_i x_j``. A grouped
        problem starts with ``# groups = g_1 ... g_n`` (0-based group id of each
        variable) and its ``k`` line lists the counts, ``# k = k_1 ... k_G``. The
        write is atomic (:func:`icbs_opt.atomic.atomic_write`).
        """
        upper = np.triu(2.0 * self._Q, 1) + np.diag(np.diag(self._Q))
        rows, cols = np.nonzero(upper)
        comments = f"# k = {self._k}\n"
        if self.is_grouped:
            comments = (
                f"# groups = {' '.join(map(str, self._groups.tolist()))}\n"
                f"# k = {' '.join(map(str, self._counts.tolist()))}\n"
            )

        def write(f: Any) -> None:
            f.write(f"{comments}{self.n} {rows.size}\n")
            np.savetxt(
                f,
                np.column_stack([rows + 1, cols + 1, upper[rows, cols]]),
                fmt=("%d", "%d", "%.17g"),
            )

        atomic_write(os.fspath(path), write)

    @classmethod
    def load(
        cls, path: str | os.PathLike, *, k: int | Sequence[int] | None = None
    ) -> BlockProblem:
        """Read a problem from ``.npz``, UBQP text or a dimod CQM file.

        UBQP text is any other suffix (``.ubqp``, ``.txt``, ``.qubo``); ``.cqm``
        is read by :meth:`from_cqm`. Groups stored in the file (see :meth:`save`
        and :meth:`to_ubqp`) are read with it.

        Args:
            path: The file.
            k: The cardinality; overrides the file's (for a grouped problem, one
                count for every group or one per group). Required for UBQP files
                without a ``# k = K`` comment.

        Raises:
            ProblemError: If the file is missing, unreadable or malformed, or holds
                an invalid problem; the message starts with the file's name.
        """
        path = os.fspath(path)
        try:
            return cls._read(path, k)
        except ProblemError as exc:
            raise ProblemError(f"problem file {path!r}: {exc}") from exc
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise ProblemError(
                f"problem file {path!r}: cannot read it: {reason}"
            ) from exc

    @classmethod
    def _read(cls, path: str, k: Any) -> BlockProblem:
        if os.path.isdir(path):
            raise ProblemError("is a directory, not a problem file")
        if not os.path.exists(path):
            raise ProblemError("no such file")
        with open(path, "rb"):  # an unreadable file raises OSError here
            pass
        if path.endswith(".npz"):
            return cls._load_npz(path, k)
        if path.endswith(".cqm"):
            return cls._load_cqm(path, k)
        return cls._load_ubqp(path, k)

    @classmethod
    def _load_cqm(cls, path: str, k: Any) -> BlockProblem:
        import dimod

        try:
            with open(path, "rb") as f:
                cqm = dimod.ConstrainedQuadraticModel.from_file(f)
        except OSError:
            raise
        except Exception as exc:  # dimod raises many types on a bad file
            raise ProblemError(f"not a dimod CQM file ({exc})") from exc
        problem = cls.from_cqm(cqm)
        if k is None:
            return problem
        return cls(problem.Q, k, groups=problem.groups if problem.is_grouped else None)

    @classmethod
    def _load_npz(cls, path: str, k: Any) -> BlockProblem:
        if not zipfile.is_zipfile(path):
            raise ProblemError("not an .npz archive (not a zip file)")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
        except Exception as exc:  # numpy and zipfile raise many types
            raise ProblemError(f"not a readable .npz archive ({exc})") from exc
        others = [name for name, v in arrays.items() if not isinstance(v, np.ndarray)]
        if others:
            raise ProblemError(
                f"not an .npz archive: member {others[0]!r} is not a .npy array"
            )
        return cls.from_arrays(arrays, k=k)

    @classmethod
    def _load_ubqp(cls, path: str, k: Any) -> BlockProblem:
        try:
            with open(path, encoding="ascii") as f:
                comments, lines = _ubqp_lines(f)
        except UnicodeDecodeError as exc:
            raise ProblemError(
                f"not an .npz or UBQP text file (not ASCII text: {exc.reason} at "
                f"byte {exc.start})"
            ) from exc
        if not lines:
            raise ProblemError("not an .npz or UBQP text file: no header line 'n m'")
        n, m = _ubqp_header(*lines[0])
        i, j, q = _ubqp_entries(lines[1:], n, m)
        groups = comments.get("groups")
        if k is None:
            k = _ubqp_counts(comments.get("k"), grouped=groups is not None)
        Q = np.zeros((n, n))
        np.add.at(Q, (i, j), q / 2.0)
        np.add.at(Q, (j, i), q / 2.0)
        return cls(Q, k, groups=groups)


#: Largest n read from UBQP text: the dense Q takes 8 n^2 bytes (8 GiB here).
MAX_UBQP_N = 1 << 15

#: The comment lines of UBQP text that carry the constraints, and their form.
_UBQP_COMMENTS = {
    "k": "'# k = K' or '# k = k_1 ... k_G'",
    "groups": "'# groups = g_1 ... g_n'",
}


def _ubqp_lines(f: Any) -> tuple[dict[str, list[int]], list[tuple[int, str]]]:
    """The ``# k = ...`` and ``# groups = ...`` values, and the other non-empty lines.

    Other comment lines are ignored.
    """
    comments: dict[str, list[int]] = {}
    lines: list[tuple[int, str]] = []
    for number, line in enumerate(f, start=1):
        text = line.strip()
        if text.startswith("#"):
            key, _, value = text.lstrip("# ").partition("=")
            key = key.strip()
            if key in _UBQP_COMMENTS:
                label = f"{key} on line {number} ({_UBQP_COMMENTS[key]})"
                comments[key] = [
                    check_int(token, label, minimum=0, error=ProblemError)
                    for token in value.split() or [value.strip()]
                ]
        elif text:
            lines.append((number, text))
    return comments, lines


def _ubqp_counts(values: list[int] | None, *, grouped: bool) -> int | list[int]:
    """The ``k`` of a UBQP file's ``# k = ...`` line: one count, or one per group."""
    if values is None:
        raise ProblemError("UBQP text has no '# k = K' line; give k explicitly")
    if len(values) > 1 and not grouped:
        raise ProblemError(
            f"the '# k = ...' line gives {len(values)} counts {values[:4]} but "
            "there is no '# groups = g_1 ... g_n' line"
        )
    return values[0] if len(values) == 1 else values


def _ubqp_header(number: int, text: str) -> tuple[int, int]:
    """``n`` and ``m`` from the header line, refusing an n too large to allocate."""
    tokens = text.split()
    if len(tokens) != 2:
        raise ProblemError(
            f"not an .npz or UBQP text file: line {number} should be the header "
            f"'n m' (two integers), got {text!r}"
        )
    n = check_int(tokens[0], "n in the header 'n m'", minimum=1, error=ProblemError)
    m = check_int(tokens[1], "m in the header 'n m'", minimum=0, error=ProblemError)
    if n > MAX_UBQP_N:
        raise ProblemError(
            f"n = {n} in the header is too large: a dense Q would take "
            f"{8 * n * n / 2**30:.3g} GiB; UBQP files are read up to n = {MAX_UBQP_N}"
        )
    return n, m


def _ubqp_entries(
    lines: list[tuple[int, str]], n: int, m: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """0-based ``i``, ``j`` and the values ``q`` of the ``m`` lines ``i j q``."""
    if len(lines) != m:
        raise ProblemError(
            f"the header announces m = {m} entries but {len(lines)} lines follow"
        )
    if not m:
        return np.zeros(0, np.intp), np.zeros(0, np.intp), np.zeros(0)
    try:
        body = np.loadtxt([text for _, text in lines], ndmin=2)
    except ValueError as exc:
        raise ProblemError(
            f"entry lines must be 'i j q' (three numbers): {exc}"
        ) from exc
    if body.shape[1] != 3:
        raise ProblemError(
            f"entry lines must be 'i j q' (three numbers), got {body.shape[1]} columns"
        )
    for col, name in ((0, "i"), (1, "j")):
        values = body[:, col]
        bad = ~((values >= 1) & (values <= n) & (values == np.floor(values)))
        if bad.any():
            row = int(np.argmax(bad))
            number, text = lines[row]
            raise ProblemError(
                f"line {number}: index {name} must be an integer in [1, {n}], "
                f"got {text.split()[col]!r}"
            )
    bad = ~np.isfinite(body[:, 2])
    if bad.any():
        number, text = lines[int(np.argmax(bad))]
        raise ProblemError(f"line {number}: q must be finite, got {text.split()[2]!r}")
    return body[:, 0].astype(np.intp) - 1, body[:, 1].astype(np.intp) - 1, body[:, 2]


def random_problem(
    n: int,
    k: int | Sequence[int] | None = None,
    *,
    seed: int | None = None,
    group_size: int | None = None,
) -> BlockProblem:
    """Return a seeded random dense problem.

    Q has the structure of an iCBS block: ``1/2 W H W`` for a random PSD ``H``
    plus a random diagonal, so both signs occur; the same ``n`` and ``seed`` give
    the same Q with or without groups.

    Args:
        n: Number of variables.
        k: Without ``group_size``: the number of ones (default ``n // 2``). With
            it: the count per group (default ``group_size // 2``), or one per group.
        seed: Seed of the random matrix.
        group_size: Put the variables in consecutive groups of this many (N:M
            sparsity with ``M = group_size``); ``n`` must be a multiple of it.

    Example:
        >>> random_problem(8, 2, seed=0, group_size=4)
        BlockProblem(n=8, k=4, groups=2, group_counts=[2, 2])
    """
    groups = None
    if group_size is not None:
        group_size = check_int(group_size, "group_size", minimum=1, error=ProblemError)
        if n % group_size:
            raise ProblemError(
                f"n = {n} must be a multiple of group_size = {group_size}"
            )
        groups = np.arange(n) // group_size
        k = group_size // 2 if k is None else k
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((max(2 * n, 4), n))
    w = rng.standard_normal(n)
    Q = 0.5 * (w[:, None] * (G.T @ G / G.shape[0]) * w[None, :])
    Q[np.diag_indices(n)] += rng.standard_normal(n)
    return BlockProblem(Q, n // 2 if k is None else k, groups=groups)
