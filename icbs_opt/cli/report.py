"""What ``prune`` and ``evaluate`` show: the tables, the stop notice, the plot."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from icbs_opt.atomic import atomic_path
from icbs_opt.errors import DataError


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


def print_stop(outputs: dict[str, str], s: dict[str, Any], failed: list[str]) -> None:
    """Say on stderr why the run stopped, what it wrote and how to go on."""
    why = {
        "interrupted": f"by {s['signal']}",
        "time_budget": "by --time-budget",
        "executor_failed": "because the executor failed (the error is above)",
    }
    lost = " (the step under way was abandoned)" if s["abandoned_step"] else ""
    print(
        f"icbs-opt: stopped {why.get(s['stopped'], s['stopped'])} after step "
        f"{s['steps_done']} of {s['settings']['run']['steps']}{lost}",
        file=sys.stderr,
    )
    unwritten = {"-", *failed}
    if not s["checkpoint"]:  # it could not be written
        unwritten.add(outputs.get("checkpoint", "-"))
    written = [f"{k} {v}" for k, v in outputs.items() if v not in unwritten]
    if written:
        print(f"icbs-opt: wrote {', '.join(written)}", file=sys.stderr)
    if s["checkpoint"]:
        folder = os.path.dirname(s["checkpoint"])
        print(f"icbs-opt: continue with: icbs-opt prune --resume {folder}",
              file=sys.stderr)  # fmt: skip


def check_plot_path(path: str) -> None:
    """Fail now if ``path`` cannot be a plot: ``-``, or a format matplotlib lacks.

    Raises:
        DataError: For ``-``, no matplotlib, or an extension matplotlib cannot
            write (the message lists those it can).
    """
    if path == "-":
        raise DataError("--plot needs a file name: standard output ('-') takes none")
    if importlib.util.find_spec("matplotlib") is None:
        raise DataError(
            "--plot needs matplotlib; install it with: pip install matplotlib"
        )
    from matplotlib.backend_bases import FigureCanvasBase

    known = FigureCanvasBase.get_supported_filetypes()
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in known:
        raise DataError(
            f"--plot {path!r}: the extension gives the format; use one of "
            f"{', '.join('.' + k for k in sorted(known))}"
        )


def plot_history(s: dict[str, Any], path: str) -> None:
    """Draw a ``prune`` summary's metric against steps and pruning seconds.

    The title names the task, density, pattern and backend; a dotted line is
    the dense model, crosses mark refits, and with ``--keep-best`` the
    validation curve is dashed and the mask kept is a star. The file's
    extension gives its format (``.png``, ``.pdf``, ``.svg``, ...).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history, metric = s["history"], s["metric"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=True)
    refits = _refit_steps(s)
    best = s.get("keep_best")
    for ax, key, label in ((axes[0], "step", "step"),
                           (axes[1], "seconds", "pruning seconds")):  # fmt: skip
        xs = [h[key] for h in history]
        ax.plot(xs, [h["metric"] for h in history], marker="o", label=metric)
        ax.axhline(s["dense"]["metric"], color="grey", linestyle=":", label="dense")
        marked = [(h[key], h["metric"]) for h in history if h["step"] in refits]
        if marked:
            ax.plot(*zip(*marked, strict=True), "kx", markersize=9, label="refit")
        if best is not None:
            val = [h.get("val_metric") for h in history]
            ax.plot(xs, val, linestyle="--", label=f"validation {metric}")
            at = next(h for h in history if h["step"] == best["step"])
            ax.plot([at[key]], [at["metric"]], "r*", markersize=13, label="kept")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(metric)
    axes[0].legend(fontsize="small")
    fig.suptitle(f"{s['task']}: density {s['density']:g} ({s['pattern']}), "
                 f"backend {s['backend']}")  # fmt: skip
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format=Path(path).suffix.lower().lstrip("."))
    plt.close(fig)


def _refit_steps(s: dict[str, Any]) -> set[int]:
    """The steps that ended with a refit (``--refit-every``, ``--refit``)."""
    config, steps = s["settings"]["config"], s["settings"]["run"]["steps"]
    every = config.get("refit_every") or 0
    done = {k for k in range(1, steps + 1) if every and k % every == 0}
    return done | ({steps} if config.get("refit") else set())
