"""SmolLM2-135M quality as the field measures it (issue 19).

Every method is calibrated on C4 (``calibration.jsonl``; pruning batches too) and
measured on held-out text: perplexity on WikiText-2 test and C4 validation (the
first ``--eval-windows`` windows of 512 tokens each) and zero-shot accuracy on
``--zero-shot`` tasks through lm-eval (``--limit`` examples per task; the
default, none, runs the full task sets). For each of ``--sparsities`` (a density
or an N:M pattern) the ``--methods``:

- ``dense`` (once), ``magnitude``, ``wanda`` (per output row, the LLM preset's
  init), ``sparsegpt``;
- ``icbs``: the LLM preset from Wanda, evaluated when the pruning time
  (construction included) first crosses each of ``--icbs-minutes``;
- ``icbs+refit``: the last of those masks after a refit of the kept weights;
- ``icbs-wikitext``: the same run calibrated on WikiText-2 ``valid.txt`` (as before
  issue 19), evaluated at the last budget, to show the in-domain part of its gain.

Rows are printed as they come and written to ``--json`` after each one.

    python benchmarks/quality.py --sparsities 0.5 --limit 100
    python benchmarks/quality.py --sparsities 0.5 0.7 2:4 --icbs-minutes 5 30
    python benchmarks/quality.py --sparsities 0.5 --methods dense --limit 2 \\
        --eval-windows 2      # a smoke run
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from smollm2 import PRESET, add_task_args, load_task, make_pruner

from icbs_opt.pruning import nonzero_density
from icbs_opt.zeroshot import DTYPES, format_zero_shot, resolve_zero_shot

METHODS = ("dense", "magnitude", "wanda", "sparsegpt", "icbs", "icbs+refit",
           "icbs-wikitext")  # fmt: skip
INITS = {
    "magnitude": "magnitude",
    "wanda": "wanda_per_output",
    "sparsegpt": "sparsegpt",
}


class Bench:
    """The task, the zero-shot tasks and the rows measured so far."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.zero_shot = resolve_zero_shot(args.zero_shot) if args.zero_shot else []
        self.rows: list[dict] = []
        self.task = load_task(args)

    def measure(
        self, task, sparsity: str, method: str, minutes: float, **extra
    ) -> float:
        """Evaluate the model as it is now; print and save the row.

        Returns:
            The seconds the evaluation took (not pruning time).
        """
        t = time.perf_counter()
        scores = task.evaluate(task.model)
        ppl_seconds = time.perf_counter() - t
        zs = None
        if self.zero_shot:
            zs = task.zero_shot(
                task.model,
                self.zero_shot,
                self.args.limit,
                dtype=self.args.zero_shot_dtype,
                progress=False,
            )
        row = {
            "sparsity": sparsity,
            "method": method,
            "calibration": task.info["calib_data"],
            "density": nonzero_density(task.model, task.layers),
            "wikitext2": scores["perplexity_wikitext2"],
            "c4": scores["perplexity_c4"],
            "pruning_minutes": minutes,
            "perplexity_seconds": ppl_seconds,
            "zero_shot": zs,
            **extra,
        }
        self.rows.append(row)
        mean = f"{100 * zs['mean_acc']:.2f}" if zs else "-"
        print(
            f"{sparsity:>5} {method:<24} {row['calibration']:<9} density "
            f"{row['density']:.4f}  wikitext2 {row['wikitext2']:8.2f}  c4 "
            f"{row['c4']:8.2f}  mean acc {mean}  {minutes:5.1f} min",
            flush=True,
        )
        if zs:
            print("\n".join("      " + line for line in format_zero_shot(zs)))
            print(f"      zero-shot seconds {zs['seconds']:.0f}", flush=True)
        if self.args.json:
            with open(self.args.json, "w") as f:
                json.dump({"args": vars(self.args), "rows": self.rows}, f, indent=1)
        return time.perf_counter() - t


def fields(sparsity: str) -> dict:
    return {"pattern": sparsity} if ":" in sparsity else {"density": float(sparsity)}


def one_shot(bench: Bench, sparsity: str, method: str) -> None:
    t = time.perf_counter()
    pruner = make_pruner(bench.task, bench.args, init=INITS[method], **fields(sparsity))
    bench.measure(bench.task, sparsity, method, (time.perf_counter() - t) / 60)
    pruner.restore_dense()


def icbs(bench: Bench, task, sparsity: str, budgets: list[float], methods: set,
         label: str = "iCBS") -> None:  # fmt: skip
    """Passes of the preset until each budget (minutes, construction included,
    evaluations not)."""
    args = bench.args
    start, paused = time.perf_counter(), 0.0
    pruner = make_pruner(task, args, **fields(sparsity))
    batches = task.batches(args.seed)
    passes = accepted = 0
    for budget in budgets:
        while (time.perf_counter() - start - paused) / 60 < budget:
            record = pruner.run_pass(*next(batches))
            passes, accepted = passes + 1, accepted + record.accepted
        minutes = (time.perf_counter() - start - paused) / 60
        if label != "iCBS" or "icbs" in methods:
            name = f"{label} {budget:g} min"
            paused += bench.measure(
                task, sparsity, name, minutes, passes=passes, accepted=accepted
            )
    if label == "iCBS" and "icbs+refit" in methods:
        seconds = pruner.refit()
        bench.measure(task, sparsity, f"iCBS {budgets[-1]:g} min + refit",
                      minutes + seconds / 60, passes=passes)  # fmt: skip
    pruner.close()
    pruner.restore_dense()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sparsities", nargs="+", default=["0.5", "0.7", "2:4"])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--icbs-minutes", nargs="+", type=float, default=[5.0, 30.0])
    p.add_argument("--zero-shot", default="paper", help="tasks ('' for none)")
    p.add_argument("--limit", type=int, help="zero-shot examples per task")
    p.add_argument("--zero-shot-dtype", choices=DTYPES, default="float32",
                   help="precision of the zero-shot forward passes")  # fmt: skip
    add_task_args(p)
    args = p.parse_args()
    args.icbs_minutes = sorted(args.icbs_minutes)
    return args


def main() -> None:
    args = parse_args()
    methods = set(args.methods)
    bench = Bench(args)
    print(f"SmolLM2-135M; torch threads {torch.get_num_threads()}; calibration "
          f"{bench.task.info['calib_data']}; LLM preset {PRESET.config.init}, "
          f"{PRESET.config.blocks_per_step} blocks a pass", flush=True)  # fmt: skip
    if "dense" in methods:
        bench.measure(bench.task, "1", "dense", 0.0)
    for sparsity in args.sparsities:
        for method in ("magnitude", "wanda", "sparsegpt"):
            if method in methods:
                one_shot(bench, sparsity, method)
        if methods & {"icbs", "icbs+refit"}:
            icbs(bench, bench.task, sparsity, args.icbs_minutes, methods)
        if "icbs-wikitext" in methods:
            wikitext = load_task(args, "wikitext2")
            icbs(bench, wikitext, sparsity, args.icbs_minutes[-1:], methods,
                 label="iCBS (WikiText calibration)")  # fmt: skip
            del wikitext


if __name__ == "__main__":
    main()
