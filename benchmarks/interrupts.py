"""Interrupt benchmark: the figures of docs/benchmarks.md, "Interrupts and resume".

Starts ``--runs`` digits runs of ``icbs-opt prune`` (each a fresh process, the
preset with ``--steps`` steps, ``--checkpoint-every``, ``--out`` and ``--json``)
and kills each at a random moment with SIGINT or SIGTERM (a third of them get a
second SIGINT 5 ms later, which abandons the step under way if one still runs).
A quarter of the moments are drawn over the whole life of the process (start-up
included, where nothing is kept yet), the rest over its steps (after its first
checkpoint). Then it checks
that every output file that exists parses, resumes every run that left a
checkpoint (``icbs-opt prune --resume``, a fresh process) and compares the
final masks, step records and history with those of an uninterrupted run.

    python benchmarks/interrupts.py                  # 20 runs
    python benchmarks/interrupts.py --runs 3 --steps 30   # smoke
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

CODE = "import sys; from icbs_opt.cli import main; sys.exit(main(sys.argv[1:]))"


def cli(*argv: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CODE, *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def prune_args(out: Path, args: argparse.Namespace) -> list[str]:
    summary = str(out.parent / f"{out.name}.json")
    return ["prune", "--steps", str(args.steps), "--eval-every", "10",
            "--checkpoint-every", str(args.checkpoint_every), "--no-progress",
            "--out", str(out), "--json", summary]  # fmt: skip


def parses(out: Path) -> tuple[int, int]:
    """(outputs found, outputs that do not parse) of a run."""
    found = bad = 0
    for path in [*out.glob("*"), out.parent / f"{out.name}.json"]:
        if not path.is_file():
            continue
        found += 1
        try:
            if path.suffix == ".json":
                json.loads(path.read_text())
            else:
                load_file(str(path))
        except Exception as exc:  # any failure to parse counts
            print(f"  does not parse: {path}: {exc}")
            bad += 1
    return found, bad


def outcome(out: Path) -> tuple:
    """Masks, records and history without timings."""
    results = json.loads((out / "results.json").read_text())
    drop = lambda d: {k: v for k, v in d.items() if k != "seconds"}  # noqa: E731
    masks = load_file(str(out / "masks.safetensors"))
    return (
        masks,
        [drop(r) for r in results["steps"]],
        [drop(h) for h in results["history"]],
    )


def same(a: tuple, b: tuple) -> bool:
    masks_same = a[0].keys() == b[0].keys() and all(
        torch.equal(a[0][k], b[0][k]) for k in a[0]
    )
    return masks_same and a[1:] == b[1:]


def kill_one(i: int, root: Path, args: argparse.Namespace, rng) -> dict:
    out = root / f"run{i:02d}"
    kind = [signal.SIGINT, signal.SIGTERM][int(rng.integers(2))]
    twice = bool(rng.random() < 1 / 3)
    from_start = bool(rng.random() < 1 / 4)
    delay = float(rng.uniform(0.5, args.span if from_start else args.loop))
    proc = cli(*prune_args(out, args))
    started = out / "checkpoint.safetensors"
    while not from_start and proc.poll() is None and not started.exists():
        time.sleep(0.01)
    time.sleep(delay)
    proc.send_signal(kind)
    if twice:
        time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
    _, err = proc.communicate()
    found, bad = parses(out)
    row = {"run": i, "signal": kind.name, "twice": twice, "from_start": from_start,
           "delay": delay, "rc": proc.returncode, "outputs": found,
           "bad": bad}  # fmt: skip
    summary = out.parent / f"{out.name}.json"
    if summary.exists():
        row["abandoned"] = json.loads(summary.read_text())["abandoned_step"]
    if (out / "checkpoint.safetensors").exists():
        resume = cli("prune", "--resume", str(out))
        _, err = resume.communicate()
        row["resumed_rc"] = resume.returncode
        row["identical"] = resume.returncode == 0 and same(outcome(out), args.ref)
        if resume.returncode:
            print(f"  resume of run {i} failed: {err.strip()}")
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--checkpoint-every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.monotonic()
        ref = cli(*prune_args(root / "reference", args))
        while (
            ref.poll() is None
            and not (root / "reference/checkpoint.safetensors").exists()
        ):
            time.sleep(0.01)
        first = time.monotonic() - t  # start-up and the steps to the first checkpoint
        assert ref.wait() == 0, ref.stderr.read() if ref.stderr else ""
        args.span = time.monotonic() - t  # start-up and the whole run
        args.loop = args.span - first
        args.ref = outcome(root / "reference")
        print(f"uninterrupted run: {args.span:.1f} s, first checkpoint at "
              f"{first:.1f} s")  # fmt: skip
        rows = []
        for i in range(args.runs):
            rows.append(kill_one(i, root, args, rng))
            print("  " + json.dumps(rows[-1]))
    report(rows)


def report(rows: list[dict]) -> None:
    resumed = [r for r in rows if "identical" in r]
    print(
        f"runs killed: {len(rows)} "
        f"({sum(r['signal'] == 'SIGINT' for r in rows)} SIGINT, "
        f"{sum(r['signal'] == 'SIGTERM' for r in rows)} SIGTERM, "
        f"{sum(r['twice'] for r in rows)} with a second SIGINT, "
        f"{sum(r['from_start'] for r in rows)} timed from the process start)"
    )
    print(f"steps abandoned by the second SIGINT: "
          f"{sum(r.get('abandoned', False) for r in rows)}")  # fmt: skip
    print(f"exit status: {sorted({r['rc'] for r in rows})}")
    print(f"outputs found: {sum(r['outputs'] for r in rows)}, "
          f"not parsing: {sum(r['bad'] for r in rows)}")  # fmt: skip
    print(f"finished before the signal: {sum(r['rc'] == 0 for r in rows)}; "
          f"nothing to resume (killed while starting up): "
          f"{len(rows) - len(resumed)}")  # fmt: skip
    print(f"resumed: {len(resumed)}, identical to the uninterrupted run: "
          f"{sum(r['identical'] for r in resumed)}")  # fmt: skip


if __name__ == "__main__":
    main()
