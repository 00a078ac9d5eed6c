"""What ``prune`` and ``evaluate`` show: the tables, the stop notice, the plot."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

from icbs_opt.atomic import atomic_path


def per_corpus(scores: dict[str, Any]) -> dict[str, float]:
    """The ``perplexity_<corpus>`` entries of an evaluation."""
    return {k: v for k, v in scores.items() if k.startswith("perplexity_")}


def print_prune_table(s: dict[str, Any]) -> None:
    """Print a ``prune`` summary: dense, init and final scores, then the run."""
    pattern = f" ({s['pattern']})" if s["pattern"] != "unstructured" else ""
    print(
        f"{s['task']}: density {s['density']:g}{pattern}, backend {s['backend']}, "
        f"seed {s['seed']}"
    )
    corpora = list(per_corpus(s["dense"])) or ["metric"]
    names = [c.removeprefix("perplexity_") for c in corpora]
    if corpora == ["metric"]:
        names = [s["metric"]]
    head = "".join(f"  {name:>11}" for name in names)
    print(f"{'':>6}{head}  {'loss':>9}  {'density':>8}  {'seconds':>8}")
    for label in ("dense", "init", "final"):
        r = s[label]
        seconds = f"{r['seconds']:.2f}" if "seconds" in r else "-"
        values = "".join(f"  {r.get(c, float('nan')):>11.4g}" for c in corpora)
        print(f"{label:>6}{values}  {r['loss']:>9.4f}  {r['density']:>8.4f}  "
              f"{seconds:>8}")  # fmt: skip
    if corpora != ["metric"]:
        print(f"perplexity on held-out text; loss: {names[0]}")
    f = s["final"]
    print(
        f"init {s['init']['method']}; {f['steps']} steps of "
        f"{s['settings']['config']['blocks_per_step']} block(s), "
        f"{f['accepted']} of {f['blocks']} blocks accepted"
    )
    if s["keep_best"] is not None:
        b = s["keep_best"]
        print(
            f"kept the best validation mask: step {b['step']}, validation "
            f"{s['metric']} {b['val_metric']:.4g} (final is its test score)"
        )


def print_stop(outputs: dict[str, str], s: dict[str, Any]) -> None:
    """Say on stderr why the run stopped, what it wrote and how to go on."""
    why = {"interrupted": f"by {s['signal']}", "time_budget": "by --time-budget"}
    lost = " (the step under way was abandoned)" if s["abandoned_step"] else ""
    print(
        f"icbs-opt: stopped {why.get(s['stopped'], s['stopped'])} after step "
        f"{s['steps_done']} of {s['settings']['run']['steps']}{lost}",
        file=sys.stderr,
    )
    written = [f"{k} {v}" for k, v in outputs.items() if v != "-"]
    if written:
        print(f"icbs-opt: wrote {', '.join(written)}", file=sys.stderr)
    if s["checkpoint"]:
        folder = os.path.dirname(s["checkpoint"])
        print(f"icbs-opt: continue with: icbs-opt prune --resume {folder}",
              file=sys.stderr)  # fmt: skip


def plot_history(history: Sequence[dict[str, float]], metric: str, path: str) -> None:
    """Draw the metric against steps and against pruning seconds into ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    values = [h["metric"] for h in history]
    for ax, key, label in (
        (axes[0], "step", "step"),
        (axes[1], "seconds", "pruning seconds"),
    ):
        ax.plot([h[key] for h in history], values, marker="o")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(metric)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
