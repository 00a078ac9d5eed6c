"""The block QUBO (DESIGN.md section 1, steps 4-5): build it, then prepare its solve.

``x_i = 1`` means weight i of the block is pruned after the step. The weight change
is ``delta = -(dw + W0 x)`` with ``dw = w - w0``; the second-order loss change
``dL = lambda_g g^T delta + 1/2 delta^T H delta + lambda_r |delta|^2`` becomes
``x^T Q x + const`` subject to ``sum(x) = k``.
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
    H: torch.Tensor,
    grad_multiplier: float = 1.0,
    ridge_multiplier: float = 0.0,
) -> tuple[torch.Tensor, float]:
    """The block QUBO of DESIGN step 4: ``dL(x) = x^T Q x + const``.

    Args:
        w0: ``(n,)`` the block's values if kept: the original weights, or
            after a SparseGPT init or refit their ``keep_values`` (DESIGN
            section 1, "Restore values").
        w: ``(n,)`` current weights (``0`` where pruned, ``w0`` where kept).
        g: ``(n,)`` loss gradient at ``w``.
        H: ``(n, n)`` Hessian model.
        grad_multiplier: ``lambda_g``.
        ridge_multiplier: ``lambda_r``.

    Returns:
        ``Q`` ``(n, n)`` float64 and ``const``.
    """
    w0, w, g, H = (t.to(torch.float64) for t in (w0, w, g, H))
    dw = w - w0  # (n,) = -w0 where pruned, 0 where kept
    Q = 0.5 * w0[:, None] * H * w0[None, :]  # (n, n) 1/2 W0 H W0
    diag = (
        w0 * (H @ dw)  # diag(W0 H dw)
        - grad_multiplier * w0 * g  # -lambda_g diag(W0 g)
        + ridge_multiplier * w0 * (2 * dw + w0)  # lambda_r diag(w0 (2 dw + w0))
    )
    Q = Q + torch.diag(diag)
    const = 0.5 * dw @ H @ dw - grad_multiplier * g @ dw + ridge_multiplier * dw @ dw
    return Q, float(const)


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
    (pruning them changes nothing) and the rest keeps a smaller k. The backend's
    seed is drawn from ``rng`` only when a backend is needed.
    """
    x = np.zeros(problem.n, dtype=np.int8)
    rest, k = np.arange(problem.n), problem.k
    if remove_zero_rows:
        zero = ~(problem.Q != 0).any(axis=1)  # rows (= columns) of zeros
        z = np.flatnonzero(zero)
        x[z[: min(z.size, k)]] = 1
        k -= min(z.size, k)
        rest = np.flatnonzero(~zero)
    if k == 0 or k == rest.size:
        x[rest] = 1 if k else 0
        return PreparedSolve(x, rest)
    sub = (
        problem
        if rest.size == problem.n
        else BlockProblem(problem.Q[np.ix_(rest, rest)], k)
    )
    scaled, _ = sub.scaled()
    warm = x0[rest]
    if int(warm.sum()) != k:
        warm = scaled.repair(warm)
    return PreparedSolve(x, rest, scaled, warm, int(rng.integers(2**31)))


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
