"""The block QUBO (DESIGN.md section 1, steps 4-5): build it, then prepare its solve.

``x_i = 1`` means weight i of the block is pruned after the step. The weight change
is ``delta = -(dw + W0 x)`` with ``dw = w - w0``; the second-order loss change
``dL = lambda_g g^T delta + 1/2 delta^T H delta + lambda_r |delta|^2`` becomes
``x^T Q x + const`` subject to ``sum(x) = k``; with an N:M pattern, one such
constraint per group of the block (:func:`block_problem`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from icbs_opt.backends import Solution
from icbs_opt.problems import BlockProblem


def block_qubo(
    w0: torch.Tensor,
    w: torch.Tensor,
    g: torch.Tensor,
    H: torch.Tensor | None,
    grad_multiplier: float = 1.0,
    ridge_multiplier: float = 0.0,
    *,
    factor: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """The block QUBO of DESIGN step 4: ``dL(x) = x^T Q x + const``.

    Args:
        w0: ``(n,)`` the block's values if kept: the original weights, or
            after a SparseGPT init or refit their ``keep_values`` (DESIGN
            section 1, "Restore values").
        w: ``(n,)`` current weights (``0`` where pruned, ``w0`` where kept).
        g: ``(n,)`` loss gradient at ``w``.
        H: ``(n, n)`` Hessian model, or None with ``factor``.
        grad_multiplier: ``lambda_g``.
        ridge_multiplier: ``lambda_r``.
        factor: ``(m, n)`` ``F`` of a low-rank Hessian model ``H = F^T F`` (the
            empirical Fisher), used instead of ``H``: Q is then one product.

    Returns:
        ``Q`` ``(n, n)`` float64 and ``const``.
    """
    w0, w, g = (t.to(torch.float64) for t in (w0, w, g))
    dw = w - w0  # (n,) = -w0 where pruned, 0 where kept
    if factor is None:
        H = H.to(torch.float64)  # type: ignore[union-attr]
        Q = H * w0[:, None]  # (n, n) 1/2 W0 H W0, built in place
        Q *= w0[None, :]
        H_dw = H @ dw  # (n,)
    else:
        F = factor.to(torch.float64)  # (m, n)
        A = F * w0  # (m, n) F W0
        Q = A.T @ A  # (n, n) W0 H W0
        F_dw = F @ dw  # (m,)
        H_dw = F.T @ F_dw
    Q *= 0.5
    Q.diagonal().add_(
        w0 * H_dw  # diag(W0 H dw)
        - grad_multiplier * w0 * g  # -lambda_g diag(W0 g)
        + ridge_multiplier * w0 * (2 * dw + w0)  # lambda_r diag(w0 (2 dw + w0))
    )
    const = 0.5 * dw @ H_dw - grad_multiplier * g @ dw + ridge_multiplier * dw @ dw
    return Q, float(const)


def block_problem(
    Q: torch.Tensor, x_cur: torch.Tensor, group_of: torch.Tensor | None = None
) -> BlockProblem:
    """The block problem: ``Q`` with the current mask's pruned count kept.

    Args:
        Q: ``(n, n)`` the block QUBO.
        x_cur: ``(n,)`` bool current mask of the block, True = pruned.
        group_of: ``(n,)`` the group of each variable (pattern N:M: its flat
            index // M); None: the whole block is one group.

    Returns:
        ``BlockProblem(Q, k)`` with ``k = sum(x_cur)``, or with groups:
        ``BlockProblem(Q, k, groups=ids)`` with ``ids`` the groups numbered
        0..G-1 and ``k[g]`` the pruned count of group g, so each group keeps its
        count (N:M: ``M - N`` of a group without frozen weights).
    """
    Q_np = Q.detach().cpu().numpy()
    if group_of is None:
        return BlockProblem(Q_np, int(x_cur.sum()))
    _, ids = torch.unique(group_of, return_inverse=True)  # (n,) in 0..G-1
    counts = torch.zeros(int(ids.max()) + 1, dtype=torch.long, device=ids.device)
    counts.scatter_add_(0, ids, x_cur.long())  # (G,) pruned per group
    return BlockProblem(Q_np, counts.cpu().numpy(), groups=ids.cpu().numpy())


def with_constraint(
    problem: BlockProblem,
    Q: np.ndarray,
    keep: np.ndarray | None = None,
    counts: np.ndarray | None = None,
    meta: dict[str, Any] | None = None,
) -> BlockProblem:
    """A problem on ``Q`` with ``problem``'s constraint (its groups, if any).

    Args:
        problem: The problem whose constraint is taken.
        Q: The new matrix, over the variables ``keep``.
        keep: Indices of the variables kept (None: all).
        counts: ``(G,)`` ones per group of ``problem`` (None: its own);
            groups with no variable kept are dropped.
        meta: The new problem's meta.
    """
    counts = problem.group_counts if counts is None else counts
    if not problem.is_grouped:
        return BlockProblem(Q, int(counts[0]), meta=meta)
    groups = problem.groups if keep is None else problem.groups[keep]
    used, ids = np.unique(groups, return_inverse=True)
    return BlockProblem(Q, counts[used], groups=ids, meta=meta)


@dataclass
class PreparedSolve:
    """A block problem made ready for a backend (DESIGN step 5).

    Attributes:
        x: ``(n,)`` int8 answer so far (zero rows already pruned).
        rest: Indices of the variables left to the backend.
        scaled: The scaled problem over ``rest``; None when nothing is left to
            choose (k = 0 or k = n after removing zero rows).
        warm: Feasible warm start of ``scaled``.
        seed: The backend's seed.
    """

    x: np.ndarray
    rest: np.ndarray
    scaled: BlockProblem | None = None
    warm: np.ndarray | None = None
    seed: int | None = None


def prepare_solve(
    problem: BlockProblem,
    x0: np.ndarray,
    rng: np.random.Generator,
    *,
    remove_zero_rows: bool = False,
) -> PreparedSolve:
    """Scale the problem and warm-start it at ``x0`` (the current mask).

    With ``remove_zero_rows``, variables whose Q row is all zero are pruned first
    (pruning them changes nothing), each group's count shrinking accordingly.
    Groups left with nothing to choose (a count of 0 or of all their variables)
    are decided here. The backend's seed is drawn from ``rng`` only when a
    backend is needed.
    """
    x = np.zeros(problem.n, dtype=np.int8)
    groups, counts = problem.groups, problem.group_counts.copy()
    rest = np.arange(problem.n)
    if remove_zero_rows:
        zero = np.flatnonzero(~(problem.Q != 0).any(axis=1))  # rows (= columns)
        free = _first_per_group(zero, groups, counts)
        x[free] = 1
        counts -= np.bincount(groups[free], minlength=counts.size)
        rest = np.setdiff1d(rest, zero)
    left = np.bincount(groups[rest], minlength=counts.size)  # per group
    decided = (counts == 0) | (counts == left)  # (G,) nothing left to choose
    x[rest] = (decided & (counts > 0))[groups[rest]]  # all pruned, or none
    rest = rest[~decided[groups[rest]]]
    if rest.size == 0:
        return PreparedSolve(x, rest)
    sub = (
        problem
        if rest.size == problem.n
        else with_constraint(problem, problem.Q[np.ix_(rest, rest)], rest, counts)
    )
    scaled, _ = sub.scaled()
    warm = x0[rest]
    if not scaled.is_feasible(warm):
        warm = scaled.repair(warm)
    return PreparedSolve(x, rest, scaled, warm, int(rng.integers(2**31)))


def _first_per_group(
    idx: np.ndarray, groups: np.ndarray, counts: np.ndarray
) -> np.ndarray:
    """The first ``counts[g]`` of the ascending ``idx`` in each group g."""
    g = groups[idx]
    order = np.argsort(g, kind="stable")  # by group, ascending within
    start = np.searchsorted(g[order], g[order])  # where each one's group begins
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size) - start
    return idx[rank < counts[g]]


def finish_solve(
    prep: PreparedSolve, problem: BlockProblem, solution: Solution | None
) -> tuple[np.ndarray, bool, dict[str, Any]]:
    """The answer on the whole block, whether it is feasible, and the info."""
    x = prep.x.copy()
    if solution is None:
        return x, problem.is_feasible(x), {}
    x[prep.rest] = solution.x
    feasible = bool(solution.feasible) and problem.is_feasible(x)
    return x, feasible, dict(solution.info)
