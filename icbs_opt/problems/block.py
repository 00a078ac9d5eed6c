"""The block subproblem of iCBS: ``min x^T Q x`` subject to ``sum(x) = k``."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from typing import Any

import dimod
import numpy as np

from icbs_opt.errors import ProblemError

#: Entries with ``|Q_ij|`` at or below this are set to zero by :meth:`scaled`.
ZERO_CUTOFF = 1e-12


class BlockProblem:
    """A cardinality-constrained binary quadratic problem.

    ``x_i = 1`` means weight ``i`` of the block is pruned. The objective is
    ``x^T Q x`` with ``Q`` symmetric (a non-symmetric input is replaced by
    ``(Q + Q^T) / 2``, which leaves every energy unchanged); a feasible ``x`` has
    exactly ``k`` ones.

    Args:
        Q: Square, finite ``(n, n)`` matrix, ``n >= 1``.
        k: Number of ones, ``0 <= k <= n``.
        meta: Optional extra information kept with the problem and written to
            ``.npz`` files (numbers, strings or arrays), e.g. the layer it came from.

    Raises:
        ProblemError: If ``Q`` is not square and finite or ``k`` is out of range.

    Example:
        >>> p = BlockProblem([[1.0, -2.0], [-2.0, 1.0]], k=1)
        >>> p.energy([1, 0])
        1.0
        >>> p.is_feasible([1, 1])
        False
    """

    __slots__ = ("_Q", "_k", "_meta")

    def __init__(self, Q: Any, k: int, *, meta: Mapping[str, Any] | None = None):
        try:
            Q = np.array(Q, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ProblemError(f"Q must be a numeric matrix, got {type(Q)!r}") from exc
        if Q.ndim != 2 or Q.shape[0] != Q.shape[1]:
            raise ProblemError(f"Q must be a square matrix, got shape {Q.shape}")
        if Q.shape[0] < 1:
            raise ProblemError("Q must have at least one row (n >= 1), got n = 0")
        if not np.isfinite(Q).all():
            bad = np.argwhere(~np.isfinite(Q))[0]
            raise ProblemError(
                f"Q must be finite, got {Q[tuple(bad)]} at index ({bad[0]}, {bad[1]})"
            )
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise ProblemError(f"k must be an integer, got {k!r}")
        n = Q.shape[0]
        if not 0 <= k <= n:
            raise ProblemError(f"k must satisfy 0 <= k <= n = {n}, got k = {k}")
        Q = (Q + Q.T) / 2.0
        Q.flags.writeable = False
        self._Q = Q
        self._k = int(k)
        self._meta = dict(meta or {})

    # ------------------------------------------------------------------ basics
    @property
    def Q(self) -> np.ndarray:  # noqa: N802 - the matrix is called Q in the paper
        """The symmetric ``(n, n)`` float64 matrix (read-only)."""
        return self._Q

    @property
    def k(self) -> int:
        """The required number of ones."""
        return self._k

    @property
    def n(self) -> int:
        """The number of variables."""
        return self._Q.shape[0]

    @property
    def meta(self) -> dict[str, Any]:
        """Extra information stored with the problem (a copy)."""
        return dict(self._meta)

    def __repr__(self) -> str:
        return f"BlockProblem(n={self.n}, k={self.k})"

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

    def is_feasible(self, x: Any) -> bool:
        """Return whether ``x`` is a 0/1 vector of length ``n`` with exactly k ones."""
        arr = np.asarray(x)
        if arr.shape != (self.n,):
            raise ProblemError(f"x must have shape ({self.n},), got {arr.shape}")
        return bool(np.isin(arr, (0, 1)).all() and int(arr.sum()) == self._k)

    def random_feasible(self, seed: int | None = None) -> np.ndarray:
        """Return a uniformly random 0/1 vector with exactly k ones."""
        x = np.zeros(self.n, dtype=np.int8)
        x[np.random.default_rng(seed).choice(self.n, self._k, replace=False)] = 1
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
        closer to ``sum(x) = k`` with lower penalised energy, so every ground state
        of the penalised model is feasible. This safe strength flattens the
        landscape for heuristic samplers; backends search smaller strengths first.
        """
        return 1.01 * self.max_flip_delta() or 1.0

    def _penalised_terms(
        self, penalty: float | None
    ) -> tuple[np.ndarray, np.ndarray, float]:
        """Linear terms, strictly upper quadratic terms and offset (binary)."""
        P = self.default_penalty() if penalty is None else float(penalty)
        if not np.isfinite(P) or P < 0:
            raise ProblemError(f"penalty must be a finite number >= 0, got {penalty}")
        k = self._k
        linear = np.diag(self._Q) + P * (1 - 2 * k)
        quad = np.triu(2.0 * self._Q + 2.0 * P, 1)
        return linear, quad, P * k * k

    def to_bqm(self, penalty: float | None = None) -> dimod.BinaryQuadraticModel:
        """Return the binary BQM ``x^T Q x + penalty * (sum(x) - k)^2``.

        Args:
            penalty: Strength of the cardinality penalty; ``None`` takes
                :meth:`default_penalty`, ``0`` gives the unconstrained objective.

        Returns:
            A BINARY ``dimod.BinaryQuadraticModel`` on variables ``0 .. n-1`` whose
            energy equals ``x^T Q x`` on every feasible x.
        """
        linear, quad, offset = self._penalised_terms(penalty)
        rows, cols = np.nonzero(quad)
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

        First flips greedily (the cheapest removal or addition each time) until x
        has exactly k ones, then applies best-improvement swaps (one ``1 -> 0`` and
        one ``0 -> 1``) until none lowers the energy or ``max_swaps`` (default n)
        swaps were made.
        """
        x = self.decode(x).astype(np.int8)
        Q, d = self._Q, np.diag(self._Q)
        field = Q @ x.astype(np.float64)  # (n,) local fields Q x
        while int(x.sum()) > self._k:
            ones = np.flatnonzero(x)
            i = ones[np.argmin(d[ones] - 2.0 * field[ones])]
            x[i] = 0
            field -= Q[:, i]
        while int(x.sum()) < self._k:
            zeros = np.flatnonzero(x == 0)
            j = zeros[np.argmin(d[zeros] + 2.0 * field[zeros])]
            x[j] = 1
            field += Q[:, j]
        tol = 1e-12 * float(np.abs(Q).max())
        if 0 < self._k < self.n:
            for _ in range(self.n if max_swaps is None else max_swaps):
                ones, zeros = np.flatnonzero(x), np.flatnonzero(x == 0)
                # (k, n-k) energy change of removing ones[a] and adding zeros[b]
                delta = (
                    (d[ones] - 2.0 * field[ones])[:, None]
                    + (d[zeros] + 2.0 * field[zeros])[None, :]
                    - 2.0 * Q[np.ix_(ones, zeros)]
                )
                a, b = np.unravel_index(np.argmin(delta), delta.shape)
                if delta[a, b] >= -tol:
                    break
                i, j = ones[a], zeros[b]
                x[i], x[j] = 0, 1
                field += Q[:, j] - Q[:, i]
        return x

    # ------------------------------------------------------------------ scaling
    def scaled(self) -> tuple[BlockProblem, float]:
        """Return the problem scaled for solvers, and the scale factor.

        Q is multiplied by ``1 / mean(|Q_ij|)`` over its non-zero entries, then
        entries with ``|Q_ij| <= 1e-12`` are set to zero. Energies of the scaled
        problem are ``scale`` times the original ones (up to the cut-off).
        """
        A = np.abs(self._Q)
        nz = A[A > 0]
        scale = 1.0 / float(nz.mean()) if nz.size else 1.0
        Qs = self._Q * scale
        Qs[np.abs(Qs) <= ZERO_CUTOFF] = 0.0
        return BlockProblem(Qs, self._k, meta=self._meta), scale

    # ---------------------------------------------------------------------- I/O
    def save(self, path: str | os.PathLike) -> None:
        """Write the problem to an ``.npz`` file (arrays ``Q``, ``k`` and meta)."""
        reserved = {"Q", "k"} & set(self._meta)
        if reserved:
            raise ProblemError(f"meta keys {sorted(reserved)} clash with Q and k")
        np.savez(os.fspath(path), Q=self._Q, k=np.int64(self._k), **self._meta)

    def to_ubqp(self, path: str | os.PathLike) -> None:
        """Write the problem in the UBQP text format.

        A comment line ``# k = K``, a header ``n m`` and then ``m`` lines ``i j q``
        (1-based, ``i <= j``) such that ``x^T Q x = sum q x_i x_j``.
        """
        upper = np.triu(2.0 * self._Q, 1) + np.diag(np.diag(self._Q))
        rows, cols = np.nonzero(upper)
        with open(path, "w", encoding="ascii") as f:
            f.write(f"# k = {self._k}\n{self.n} {rows.size}\n")
            np.savetxt(
                f,
                np.column_stack([rows + 1, cols + 1, upper[rows, cols]]),
                fmt=("%d", "%d", "%.17g"),
            )

    @classmethod
    def load(cls, path: str | os.PathLike, *, k: int | None = None) -> BlockProblem:
        """Read a problem from ``.npz`` or UBQP text (``.ubqp``, ``.txt``, ``.qubo``).

        Args:
            path: The file.
            k: The cardinality; overrides the file's. Required for UBQP files
                without a ``# k = K`` comment.

        Raises:
            ProblemError: If the file is missing, unreadable or malformed.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ProblemError(f"cannot read problem file {path!r}: no such file")
        if path.endswith(".npz"):
            return cls._load_npz(path, k)
        return cls._load_ubqp(path, k)

    @classmethod
    def _load_npz(cls, path: str, k: int | None) -> BlockProblem:
        if not zipfile.is_zipfile(path):
            raise ProblemError(
                f"cannot read problem file {path!r}: not an .npz archive"
            )
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
        except Exception as exc:  # numpy raises many types for a corrupt file
            raise ProblemError(f"cannot read problem file {path!r}: {exc}") from exc
        if "Q" not in arrays or ("k" not in arrays and k is None):
            raise ProblemError(
                f"problem file {path!r} must hold arrays 'Q' and 'k', "
                f"found {sorted(arrays)}"
            )
        Q = arrays.pop("Q")
        k_file = arrays.pop("k", None)
        meta = {
            key: (val.item() if val.ndim == 0 else val) for key, val in arrays.items()
        }
        return cls(Q, int(k_file) if k is None else k, meta=meta)

    @classmethod
    def _load_ubqp(cls, path: str, k: int | None) -> BlockProblem:
        k_file = None
        rows: list[str] = []
        try:
            with open(path, encoding="ascii") as f:
                for line in f:
                    text = line.strip()
                    if text.startswith("#"):
                        key, _, value = text.lstrip("# ").partition("=")
                        if key.strip() == "k":
                            k_file = int(value)
                    elif text:
                        rows.append(text)
            n, m = (int(v) for v in rows[0].split())
            body = np.loadtxt(rows[1:], ndmin=2) if m else np.zeros((0, 3))
        except (UnicodeDecodeError, ValueError, IndexError) as exc:
            raise ProblemError(
                f"cannot read problem file {path!r}: not an .npz or UBQP text file "
                f"({exc})"
            ) from exc
        if body.shape != (m, 3):
            raise ProblemError(
                f"UBQP file {path!r} announces {m} entries but has {body.shape[0]} "
                "rows of 'i j q'"
            )
        i, j = body[:, 0].astype(int) - 1, body[:, 1].astype(int) - 1
        if m and (min(i.min(), j.min()) < 0 or max(i.max(), j.max()) >= n):
            raise ProblemError(f"UBQP file {path!r} has an index outside 1..{n}")
        Q = np.zeros((n, n))
        np.add.at(Q, (i, j), body[:, 2] / 2.0)
        np.add.at(Q, (j, i), body[:, 2] / 2.0)
        k = k if k is not None else k_file
        if k is None:
            raise ProblemError(
                f"UBQP file {path!r} has no '# k = K' line; give k explicitly"
            )
        return cls(Q, k)


def random_problem(
    n: int, k: int | None = None, *, seed: int | None = None
) -> BlockProblem:
    """Return a seeded random dense problem with ``k`` (default ``n // 2``) ones.

    Q has the structure of an iCBS block: ``1/2 W H W`` for a random PSD ``H``
    plus a random diagonal, so both signs occur.
    """
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((max(2 * n, 4), n))
    w = rng.standard_normal(n)
    Q = 0.5 * (w[:, None] * (G.T @ G / G.shape[0]) * w[None, :])
    Q[np.diag_indices(n)] += rng.standard_normal(n)
    return BlockProblem(Q, n // 2 if k is None else k)
