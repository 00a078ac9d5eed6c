"""The block subproblem of iCBS: ``min x^T Q x`` subject to ``sum(x) = k``."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from icbs_opt.atomic import atomic_write
from icbs_opt.checks import check_int
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
        Q = np.array(Q, dtype=np.float64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProblemError(f"Q must be a numeric matrix, got {type(Q)!r}") from exc
    if Q.ndim != 2 or Q.shape[0] != Q.shape[1]:
        raise ProblemError(f"Q must be a square matrix, got shape {Q.shape}")
    n = Q.shape[0]
    if n < 1:
        raise ProblemError("Q must have at least one row (n >= 1), got n = 0")
    if not np.isfinite(Q).all():
        bad = np.argwhere(~np.isfinite(Q))[0]
        raise ProblemError(
            f"Q must be finite, got {Q[tuple(bad)]} at index ({bad[0]}, {bad[1]})"
        )
    with np.errstate(over="ignore"):
        Q = (Q + Q.T) / 2.0
        total = float(np.abs(Q).sum())  # bounds |x^T Q x| over every 0/1 x
    limit = np.finfo(np.float64).max / (8.0 * n * n)
    if not total <= limit:  # also catches inf
        raise ProblemError(
            f"Q is too large for float64: sum |Q_ij| = {total:.3g} after "
            f"symmetrising, above {limit:.3g} for n = {n}; scale Q down"
        )
    return Q


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
        ProblemError: If ``Q`` is not square and finite, so large that energies
            would overflow float64, or ``k`` is not an integer in ``[0, n]``.

    Example:
        >>> p = BlockProblem([[1.0, -2.0], [-2.0, 1.0]], k=1)
        >>> p.energy([1, 0])
        1.0
        >>> p.is_feasible([1, 1])
        False
    """

    __slots__ = ("_Q", "_k", "_meta")

    def __init__(self, Q: Any, k: int, *, meta: Mapping[str, Any] | None = None):
        Q = _symmetric_matrix(Q)
        if isinstance(k, str):  # check_int parses strings; a problem takes numbers
            raise ProblemError(f"k must be an integer, got {k!r}")
        k = check_int(k, "k", minimum=0, maximum=Q.shape[0], error=ProblemError)
        Q.flags.writeable = False
        self._Q = Q
        self._k = k
        self._meta = dict(meta or {})

    @classmethod
    def _derived(
        cls, Q: np.ndarray, k: int, meta: Mapping[str, Any] | None = None
    ) -> BlockProblem:
        """A problem made from a valid one's symmetric, finite float64 Q (no checks)."""
        problem = cls.__new__(cls)
        Q.flags.writeable = False
        problem._Q, problem._k, problem._meta = Q, k, dict(meta or {})
        return problem

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
        return BlockProblem._derived(Qs, self._k, self._meta), scale

    # ---------------------------------------------------------------------- I/O
    def save(self, path: str | os.PathLike) -> None:
        """Write the problem to an ``.npz`` file (arrays ``Q``, ``k`` and meta).

        As :func:`numpy.savez`, ``.npz`` is appended to a path without it. The
        write is atomic (:func:`icbs_opt.atomic.atomic_write`).
        """
        reserved = {"Q", "k"} & set(self._meta)
        if reserved:
            raise ProblemError(f"meta keys {sorted(reserved)} clash with Q and k")
        path = os.fspath(path)
        arrays = {"Q": self._Q, "k": np.int64(self._k), **self._meta}
        target = path if path.endswith(".npz") else path + ".npz"
        atomic_write(target, lambda f: np.savez(f, **arrays), binary=True)

    def to_ubqp(self, path: str | os.PathLike) -> None:
        """Write the problem in the UBQP text format.

        A comment line ``# k = K``, a header ``n m`` and then ``m`` lines ``i j q``
        (1-based, ``i <= j``) such that ``x^T Q x = sum q x_i x_j``. The write
        is atomic (:func:`icbs_opt.atomic.atomic_write`).
        """
        upper = np.triu(2.0 * self._Q, 1) + np.diag(np.diag(self._Q))
        rows, cols = np.nonzero(upper)

        def write(f: Any) -> None:
            f.write(f"# k = {self._k}\n{self.n} {rows.size}\n")
            np.savetxt(
                f,
                np.column_stack([rows + 1, cols + 1, upper[rows, cols]]),
                fmt=("%d", "%d", "%.17g"),
            )

        atomic_write(os.fspath(path), write)

    @classmethod
    def load(cls, path: str | os.PathLike, *, k: int | None = None) -> BlockProblem:
        """Read a problem from ``.npz`` or UBQP text (``.ubqp``, ``.txt``, ``.qubo``).

        Args:
            path: The file.
            k: The cardinality; overrides the file's. Required for UBQP files
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
    def _read(cls, path: str, k: int | None) -> BlockProblem:
        if os.path.isdir(path):
            raise ProblemError("is a directory, not a problem file")
        if not os.path.exists(path):
            raise ProblemError("no such file")
        with open(path, "rb"):  # an unreadable file raises OSError here
            pass
        if path.endswith(".npz"):
            return cls._load_npz(path, k)
        return cls._load_ubqp(path, k)

    @classmethod
    def _load_npz(cls, path: str, k: int | None) -> BlockProblem:
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
        if "Q" not in arrays or ("k" not in arrays and k is None):
            raise ProblemError(f"must hold arrays 'Q' and 'k', found {sorted(arrays)}")
        Q = arrays.pop("Q")
        k_file = arrays.pop("k", None)
        if k is None and k_file.ndim != 0:
            raise ProblemError(
                f"k must be a single integer, got an array of shape {k_file.shape}"
            )
        meta = {
            key: (val.item() if val.ndim == 0 else val) for key, val in arrays.items()
        }
        return cls(Q, k_file.item() if k is None else k, meta=meta)

    @classmethod
    def _load_ubqp(cls, path: str, k: int | None) -> BlockProblem:
        try:
            with open(path, encoding="ascii") as f:
                k_file, lines = _ubqp_lines(f)
        except UnicodeDecodeError as exc:
            raise ProblemError(
                f"not an .npz or UBQP text file (not ASCII text: {exc.reason} at "
                f"byte {exc.start})"
            ) from exc
        if not lines:
            raise ProblemError("not an .npz or UBQP text file: no header line 'n m'")
        n, m = _ubqp_header(*lines[0])
        i, j, q = _ubqp_entries(lines[1:], n, m)
        k = k if k is not None else k_file
        if k is None:
            raise ProblemError("UBQP text has no '# k = K' line; give k explicitly")
        Q = np.zeros((n, n))
        np.add.at(Q, (i, j), q / 2.0)
        np.add.at(Q, (j, i), q / 2.0)
        return cls(Q, k)


#: Largest n read from UBQP text: the dense Q takes 8 n^2 bytes (8 GiB here).
MAX_UBQP_N = 1 << 15


def _ubqp_lines(f: Any) -> tuple[int | None, list[tuple[int, str]]]:
    """The ``# k = K`` value and the other non-empty lines with their numbers."""
    k_file = None
    lines: list[tuple[int, str]] = []
    for number, line in enumerate(f, start=1):
        text = line.strip()
        if text.startswith("#"):
            key, _, value = text.lstrip("# ").partition("=")
            if key.strip() == "k":
                label = f"k on line {number} ('# k = K')"
                k_file = check_int(value, label, minimum=0, error=ProblemError)
        elif text:
            lines.append((number, text))
    return k_file, lines


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
