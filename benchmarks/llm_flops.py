"""Lower bound on one SmolLM2 block step: FLOPs of the pass over the matmul rate.

A step's cost is one forward of the batch and a backward from the loss down to the
chosen layer (activation gradients only). This script counts the FLOPs of that pass
for layers at several depths (matmuls counted by ``FlopCounterMode`` on a real
recording pass; attention, which it does not count on the CPU, from the config),
measures the best float32 matmul rate of this machine on the model's own shapes,
and prints ``FLOPs / rate``: no float32 implementation of the exact step can be
faster than that here. It also times one real recording pass per depth.

    python benchmarks/llm_flops.py               # about 1 minute
    python benchmarks/llm_flops.py --tokens 8 512
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from icbs_opt.derivatives import record_layers
from icbs_opt.tasks.causal_lm import causal_lm_loss, load_smollm2


def matmul_rate(shapes: list[tuple[int, int, int]], repeat: int) -> dict[str, float]:
    """Best GFLOP/s of ``(m, k) @ (k, n)`` float32 matmuls, per shape."""
    rates = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b  # warm up
        best = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        rates[f"{m}x{k}x{n}"] = 2 * m * k * n / best / 1e9
    return rates


def attention_flops(cfg, windows: int, seq: int, blocks: int, backward: bool) -> float:
    """FLOPs of ``QK^T`` and ``AV`` (causal half) in ``blocks`` decoder blocks.

    With ``backward`` the blocks also run their backward (twice the forward).
    """
    d = cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads)
    per_block = 2 * 2 * d * seq * (seq + 1) / 2  # two matmuls, causal pairs
    return windows * blocks * per_block * (3 if backward else 1)  # bwd: 2x fwd


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs=2, default=[8, 512], metavar=("B", "T"))
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    windows, seq = args.tokens

    model, _ = load_smollm2()
    cfg, blocks = model.config, model.model.layers
    n = len(blocks)
    print(
        f"SmolLM2-135M, {windows} x {seq} tokens, torch threads "
        f"{torch.get_num_threads()}"
    )
    d, ff, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    shapes = [(seq, d, ff), (seq, ff, d), (seq, d, vocab), (2048, 2048, 2048)]
    rates = matmul_rate(shapes, args.repeat)
    best = max(rates.values())
    print(
        "float32 matmul GFLOP/s: " + ", ".join(f"{s} {r:.0f}" for s, r in rates.items())
    )

    X = torch.randint(0, vocab, (1, seq))
    print(f"{'layer':<32} {'TFLOP':>7} {'bound s':>8} {'measured s':>10}")
    # (block, layer, blocks whose attention the backward passes through)
    for b, name, after in (
        (0, "self_attn.q_proj", n),
        (n // 2, "mlp.down_proj", n - n // 2 - 1),
        (n - 1, "mlp.down_proj", 0),
    ):
        module = blocks[b].get_submodule(name)
        with FlopCounterMode(display=False) as counter:
            record_layers(model, causal_lm_loss, X, X, [module])
        (tape,), _ = record_layers(model, causal_lm_loss, X, X, [module])  # timed
        mm = counter.get_total_flops() * windows  # one window counted, scaled
        attn = attention_flops(cfg, windows, seq, n - after, False)
        attn += attention_flops(cfg, windows, seq, after, True)
        total = mm + attn
        print(
            f"{f'{b}.{name}':<32} {total / 1e12:7.2f} {total / best / 1e9:8.1f} "
            f"{tape.seconds * windows:10.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
