"""Realistic iCBS block problems, built by the real pruner on the digits-mlp task.

``digits_blocks(sizes, seed)`` loads the built-in ``digits-mlp`` task (its trained,
cached 64-256-256-10 MLP), and for each requested n runs one real
``icbs_opt.pruning.Pruner`` step on a copy of the dense model: layer ``"0"``
(64 x 256 = 16384 weights) pruned to density 0.5 by magnitude, a random block of
``k = n // 2`` pruned and ``n - k`` kept weights, the empirical Fisher on one task
batch, ``grad_multiplier`` 0.75 and ``ridge_multiplier`` 1e-3 (the paper's runs).
The pruner's ``problem_hook`` captures the block problem the step builds (the QUBO
of DESIGN.md section 1, computed by ``icbs_opt.pruning``, not here), which is
returned scaled by ``1 / mean(|Q_ij|)`` as the solvers see it. Nothing is cached
here (the task caches its trained model). Other benchmark scripts import this::

    from blocks import digits_blocks            # with benchmarks/ on sys.path
    problems = digits_blocks([16, 256], seed=0)

Run it directly to print a summary of the blocks.
"""

from __future__ import annotations

import argparse
import copy
import functools
import logging
from collections.abc import Sequence

import numpy as np

from icbs_opt.problems import BlockProblem
from icbs_opt.pruning import Pruner
from icbs_opt.tasks import Task, get_task

log = logging.getLogger(__name__)

#: The layer the blocks come from: the first Linear, 64 x 256 = 16384 weights.
LAYER = "0"


@functools.lru_cache(maxsize=2)
def _digits_task(batch_size: int) -> Task:
    """The digits-mlp task (its dense model is copied, never pruned in place)."""
    return get_task("digits-mlp", batch_size=batch_size)


def _block_problem(
    task: Task, n: int, block_seed: int, density: float, **step_options: float
) -> BlockProblem:
    """One Pruner step on a copy of the dense model; the problem it builds."""
    captured: list[BlockProblem] = []
    pruner = Pruner(
        copy.deepcopy(task.model),
        task.loss_fn,
        density=density,
        backend="native",  # the step solves the block too; one restart is enough
        backend_options={"num_restarts": 1},
        layers=[LAYER],
        calibration=task.calibration,
        problem_hook=captured.append,
        init="magnitude",
        selection="random",
        block_size=n,
        seed=block_seed,
        **step_options,
    )
    X, y = next(task.batches(block_seed))
    pruner.step(X, y, layer=LAYER)
    (problem,) = captured
    scaled, scale = problem.scaled()
    meta = {"source": "digits", "layer": LAYER, "n": n, "batch": len(X)}
    return BlockProblem(scaled.Q, scaled.k, meta={**meta, "scale": scale})


def digits_blocks(
    sizes: Sequence[int],
    seed: int = 0,
    *,
    density: float = 0.5,
    batch_size: int = 512,
    grad_multiplier: float = 0.75,
    ridge_multiplier: float = 1e-3,
) -> list[BlockProblem]:
    """Return one scaled iCBS block problem per size, with ``k = n // 2``.

    Args:
        sizes: Block sizes n, each in ``2 .. 16384`` (the first layer's weights);
            the block takes ``n // 2`` pruned and the rest kept weights, so n is at
            most twice the smaller of the pruned and kept sets. A size given
            again yields another block; each block depends only on ``seed``, n
            and how often n came before in ``sizes``.
        seed: Seeds the batch and the block choice (the model is the task's).
        density: Fraction of the layer's weights kept by magnitude pruning.
        batch_size: Samples N of the batch (per-sample gradients, Fisher).
        grad_multiplier: The pruner's ``grad_multiplier`` (``lambda_g``).
        ridge_multiplier: The pruner's ``ridge_multiplier`` (``lambda_r``).

    Returns:
        ``BlockProblem``s scaled by ``1 / mean(|Q_ij|)``; ``meta["scale"]`` holds
        the factor.

    Raises:
        TypeError: If a size is not an integer.
        ValueError: If a size is out of range.
    """
    task = _digits_task(batch_size)
    numel = dict(task.model.named_modules())[LAYER].weight.numel()
    keep = round(density * numel)
    limit = 2 * min(keep, numel - keep)
    problems = []
    seen: dict[int, int] = {}
    for n in sizes:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise TypeError(f"block sizes must be integers, got {n!r}")
        if not 2 <= n <= limit:
            raise ValueError(f"block size n must be in 2..{limit}, got {n}")
        seen[n] = seen.get(n, -1) + 1  # a repeated size gets a different block
        state = np.random.SeedSequence([seed, int(n), seen[n]]).generate_state(1)
        problems.append(
            _block_problem(
                task,
                int(n),
                int(state[0]),
                density,
                grad_multiplier=grad_multiplier,
                ridge_multiplier=ridge_multiplier,
            )
        )
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 256, 1024])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for p in digits_blocks(args.sizes, args.seed):
        Q = p.Q
        print(
            f"n={p.n:5d} k={p.k:5d} scale={p.meta['scale']:.3g} "
            f"diag mean={np.diag(Q).mean():+.3g} |offdiag| max={np.abs(Q).max():.3g} "
            f"nonzero={np.count_nonzero(Q) / Q.size:.2f}"
        )


if __name__ == "__main__":
    main()
