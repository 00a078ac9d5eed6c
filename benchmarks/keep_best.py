"""Keep-best benchmark: the figures of docs/benchmarks.md, "Keep the best mask".

Runs ``icbs-opt prune`` on digits (the preset: density 0.1, blocks of 256, the
paper's settings) with ``--keep-best`` for ``--steps`` steps, validating every
``--eval-every`` steps on the held-out validation split (``--val-fraction`` of
the training set), once per seed, and prints per seed: the test accuracy of the
kept mask, its step and validation accuracy, the test accuracy at the last step
(what the run gives without ``--keep-best``, on the same pruning data) and the
best test accuracy anywhere on the curve (which no honest rule can pick).

    python benchmarks/keep_best.py                      # 1000 steps, seeds 0,1,2
    python benchmarks/keep_best.py --steps 40 --eval-every 10 --seeds 0   # smoke
    python benchmarks/keep_best.py --check-blocks --grad-multiplier 0.25

Any other option is passed on to ``icbs-opt prune``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from icbs_opt.cli import main as cli


def run(seed: int, args: argparse.Namespace, folder: Path) -> dict:
    summary = folder / f"seed{seed}.json"
    argv = ["prune", "--steps", str(args.steps), "--eval-every", str(args.eval_every),
            "--keep-best", "--val-fraction", str(args.val_fraction),
            "--seed", str(seed), "--no-progress", "--json", str(summary),
            "--batch-size", str(args.batch_size), *args.prune_args]  # fmt: skip
    start = time.perf_counter()
    assert cli(argv) == 0
    s = json.loads(summary.read_text())
    history = s["history"]
    return {
        "seed": seed,
        "kept": s["final"]["metric"],
        "kept_step": s["keep_best"]["step"],
        "kept_val": s["keep_best"]["val_metric"],
        "last": history[-1]["metric"],
        "curve_max": max(h["metric"] for h in history),
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--batch-size", type=int, default=200, help="samples per batch")
    p.add_argument("--save", metavar="DIR", help="keep each run's JSON summary here")
    args, args.prune_args = p.parse_known_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.save or tmp)
        for seed in (int(s) for s in args.seeds.split(",")):
            rows.append(run(seed, args, folder))
            print(json.dumps(rows[-1]), flush=True)
    print(f"{'seed':>4}  {'kept %':>7}  {'step':>5}  {'val %':>6}  {'last %':>7}  "
          f"{'max %':>6}  {'s':>5}")  # fmt: skip
    for r in rows:
        print(f"{r['seed']:>4}  {r['kept']:>7.2f}  {r['kept_step']:>5}  "
              f"{r['kept_val']:>6.2f}  {r['last']:>7.2f}  {r['curve_max']:>6.2f}  "
              f"{r['seconds']:>5.0f}")  # fmt: skip
    mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    print(f"mean  {mean('kept'):>7.2f}  {'':>5}  {mean('kept_val'):>6.2f}  "
          f"{mean('last'):>7.2f}  {mean('curve_max'):>6.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
