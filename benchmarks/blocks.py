"""Realistic iCBS block problems from a small MLP trained on scikit-learn's digits.

``digits_blocks(sizes, seed)`` trains a 64-256-128-10 MLP (seeded, about a second on
two cores), prunes its first layer (16384 weights) to density 0.5 by magnitude, and
for each requested n builds the block QUBO of DESIGN.md section 1: a random block of
k = n // 2 currently pruned and n - k currently kept weights, the block gradient g and
the empirical Fisher ``H = G^T G / N`` from per-sample gradients on a batch, and

    Q = 1/2 W0 H W0 + diag(W0 H dw) - lambda_g diag(W0 g)
        + lambda_r diag(w0 * (2 dw + w0))

with lambda_g = 0.75 and lambda_r = 1e-3, returned as ``BlockProblem(Q, k).scaled()``.
Nothing is cached on disk. Other benchmark scripts import this module::

    from blocks import digits_blocks            # with benchmarks/ on sys.path
    problems = digits_blocks([16, 256], seed=0)

Run it directly to print a summary of the blocks.
"""

from __future__ import annotations

import argparse
import functools
import logging
import time
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.datasets import load_digits

from icbs_opt.problems import BlockProblem

log = logging.getLogger(__name__)

HIDDEN = (256, 128)
#: Prunable weights of the first layer, the largest block size available.
LAYER_SIZE = 64 * HIDDEN[0]


@functools.lru_cache(maxsize=4)
def _trained_mlp(seed: int, epochs: int = 30) -> tuple[torch.nn.Sequential, tuple]:
    """Train the MLP on the digits training split; memoised in-process only."""
    digits = load_digits()
    X = torch.tensor(digits.data / 16.0, dtype=torch.float32)  # (1797, 64)
    y = torch.tensor(digits.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(X), generator=gen)
    train = perm[:1437]
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, HIDDEN[0]),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN[0], HIDDEN[1]),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN[1], 10),
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra threads only contend
    try:
        for _ in range(epochs):
            order = train[torch.randperm(len(train), generator=gen)]
            for batch in order.split(128):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(X[batch]), y[batch]).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        test = perm[1437:]
        acc = (model(X[test]).argmax(1) == y[test]).float().mean().item()
    log.info(
        "trained digits MLP (seed %d): test accuracy %.3f in %.1f s",
        seed,
        acc,
        time.perf_counter() - start,
    )
    return model, (X[train], y[train])


def _block_problem(
    model: torch.nn.Sequential,
    data: tuple[torch.Tensor, torch.Tensor],
    n: int,
    rng: np.random.Generator,
    *,
    density: float,
    batch_size: int,
    grad_multiplier: float,
    ridge_multiplier: float,
) -> BlockProblem:
    layer = model[0]
    w0 = layer.weight.detach().double().flatten()  # (numel,) dense weights
    numel = w0.numel()
    keep = round(density * numel)
    order = torch.argsort(w0.abs(), descending=True)
    pruned = torch.ones(numel, dtype=torch.bool)
    pruned[order[:keep]] = False  # magnitude pruning: keep the largest |w0|
    k = n // 2
    pruned_idx = torch.nonzero(pruned).flatten().numpy()
    kept_idx = torch.nonzero(~pruned).flatten().numpy()
    block = np.concatenate(
        [
            rng.choice(pruned_idx, k, replace=False),
            rng.choice(kept_idx, n - k, replace=False),
        ]
    )
    block_t = torch.from_numpy(block)

    X, y = data
    rows = torch.from_numpy(rng.choice(len(X), min(batch_size, len(X)), replace=False))
    Xb, yb = X[rows].double(), y[rows]
    w = (w0 * (~pruned)).reshape(layer.weight.shape)  # current (pruned) weights
    with torch.enable_grad():
        z1 = Xb @ w.T + layer.bias.detach().double()  # (N, 256) first-layer outputs
        z1.requires_grad_(True)
        h = z1
        for m in model[1:]:
            if isinstance(m, torch.nn.Linear):
                h = torch.nn.functional.linear(
                    h, m.weight.detach().double(), m.bias.detach().double()
                )
            else:
                h = m(h)
        loss = torch.nn.functional.cross_entropy(h, yb, reduction="sum")
        (dz,) = torch.autograd.grad(loss, z1)  # (N, 256) per-sample dl_s/dz1_s
    out_row, in_col = block_t // 64, block_t % 64
    G = dz[:, out_row] * Xb[:, in_col]  # (N, n) per-sample gradients of the block
    N = G.shape[0]
    g = G.mean(0)  # (n,) gradient of the mean loss
    H = G.T @ G / N  # (n, n) empirical Fisher

    w0b = w0[block_t]
    dw = -w0b * pruned[block_t]  # w_B - w0_B
    Q = 0.5 * w0b[:, None] * H * w0b[None, :]
    diag = (
        w0b * (H @ dw)
        - grad_multiplier * w0b * g
        + ridge_multiplier * w0b * (2 * dw + w0b)
    )
    Q += torch.diag(diag)
    problem = BlockProblem(
        Q.numpy(), k, meta={"source": "digits", "layer": 0, "n": n, "batch": N}
    )
    scaled, scale = problem.scaled()
    return BlockProblem(scaled.Q, k, meta={**scaled.meta, "scale": scale})


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
        seed: Seeds the training, the batch and the block choice.
        density: Fraction of the layer's weights kept by magnitude pruning.
        batch_size: Samples N in the per-sample gradient batch.
        grad_multiplier: ``lambda_g`` of the Q formula.
        ridge_multiplier: ``lambda_r`` of the Q formula.

    Returns:
        ``BlockProblem``s scaled by ``1 / mean(|Q_ij|)``; ``meta["scale"]`` holds
        the factor.

    Raises:
        TypeError: If a size is not an integer.
        ValueError: If a size is out of range.
    """
    model, data = _trained_mlp(seed)
    limit = 2 * min(
        round(density * LAYER_SIZE), LAYER_SIZE - round(density * LAYER_SIZE)
    )
    problems = []
    seen: dict[int, int] = {}
    for n in sizes:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise TypeError(f"block sizes must be integers, got {n!r}")
        if not 2 <= n <= limit:
            raise ValueError(f"block size n must be in 2..{limit}, got {n}")
        seen[n] = seen.get(n, -1) + 1  # a repeated size gets a different block
        rng = np.random.default_rng([seed, n, seen[n]])
        problems.append(
            _block_problem(
                model,
                data,
                n,
                rng,
                density=density,
                batch_size=batch_size,
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
