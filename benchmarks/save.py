"""Saved SmolLM2-135M: weight size, save and load time, perplexity (issue 22).

For each of ``--sparsities`` (a density such as ``0.5`` or an N:M pattern such as
``2:4``) SmolLM2-135M-Instruct is pruned by the task's Wanda init (per output row,
no iCBS steps) and saved three ways with ``save_causal_lm``: float32 as before
issue 22 (the baseline), ``--save-dtype`` dense and ``--save-dtype`` compressed
(compressed-tensors bitmask formats). Each folder's ``*.safetensors`` bytes, its
save and load seconds (``load_causal_lm``, float32) and the WikiText-2
perplexity after loading (first ``--eval-windows`` windows of 512 test tokens)
are printed beside the in-memory model's perplexity in float32, with its
parameters rounded to the saved dtype (float32 arithmetic, as the folders load),
and in the saved dtype itself (the same folder loaded with ``dtype=``).

    python benchmarks/save.py                        # 0.5 and 2:4, bfloat16
    python benchmarks/save.py --eval-windows 2 --calib-windows 2 --sparsities 2:4
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from smollm2 import TASK, add_task_args, make_pruner

from icbs_opt.pruning import nonzero_density
from icbs_opt.tasks.causal_lm import (
    causal_lm_task,
    load_causal_lm,
    load_smollm2,
    save_causal_lm,
)
from icbs_opt.tasks.compressed import cast_parameters, read_sparsity_config
from icbs_opt.tasks.options import TextOptions


def megabytes(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e6


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def measure(task, tokenizer, sparsity: str, root: Path, dtype: str) -> list[dict]:
    """The three saved forms of the pruned model, each saved, loaded, scored."""
    saved_dtype = getattr(torch, dtype)
    ppl = {
        "float32": task.evaluate(task.model)["metric"],
        "rounded": task.evaluate(
            cast_parameters(cast_parameters(task.model, saved_dtype), torch.float32)
        )["metric"],
    }
    print(f"{sparsity}: in memory, float32 {ppl['float32']:.4f}; parameters in "
          f"{dtype}, float32 arithmetic {ppl['rounded']:.4f}")  # fmt: skip
    rows = []
    forms = [("float32", None, None), (dtype, dtype, "dense"),
             (dtype, dtype, "compressed")]  # fmt: skip
    for label, save_dtype, save_format in forms:
        folder = root / f"{sparsity.replace(':', '-')}-{label}-{save_format}"
        _, save_s = timed(
            save_causal_lm, task.model, tokenizer, folder, save_dtype, save_format
        )
        (model, _), load_s = timed(load_causal_lm, folder)
        sparse = read_sparsity_config(folder) or {"format": "(none)"}
        out = {
            "sparsity": sparsity,
            "dtype": label,
            "format": sparse["format"],
            "megabytes": megabytes(folder),
            "save_s": save_s,
            "load_s": load_s,
            "perplexity": task.evaluate(model)["metric"],
        }
        del model
        if save_format == "compressed":  # the folder in its own dtype
            model, _ = load_causal_lm(folder, dtype=saved_dtype)
            out["perplexity_in_dtype"] = task.evaluate(model)["metric"]
            in_memory = cast_parameters(task.model, saved_dtype)
            out["in_memory_in_dtype"] = task.evaluate(in_memory)["metric"]
            del model, in_memory
        out["in_memory"] = ppl["rounded" if save_dtype else "float32"]
        out["in_memory_float32"] = ppl["float32"]
        print(f"  {out['dtype']:>8} {out['format']:<17} {out['megabytes']:7.1f} MB  "
              f"save {save_s:5.1f} s  load {load_s:5.1f} s  perplexity "
              f"{out['perplexity']:.4f}", flush=True)  # fmt: skip
        rows.append(out)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_task_args(p)
    p.add_argument("--sparsities", nargs="+", default=["0.5", "2:4"])
    p.add_argument("--save-dtype", default="bfloat16")
    p.add_argument("--out-dir", help="keep the folders here (default: a temp dir)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_smollm2()  # as the smollm2-135m task loads it
    options = TextOptions(
        eval_data="wikitext2",
        eval_windows=args.eval_windows,
        calib_windows=args.calib_windows,
        batch_size=args.batch_size,
    )
    task = causal_lm_task(TASK, model, tokenizer, "SmolLM2 (GGUF)", options)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.out_dir) as tmp:
        for sparsity in args.sparsities:
            fields = {"pattern": sparsity} if ":" in sparsity else {
                "density": float(sparsity)}  # fmt: skip
            pruner = make_pruner(task, args, init="wanda_per_output", **fields)
            print(f"{sparsity}: density {nonzero_density(task.model, task.layers):.4f}")
            rows += measure(task, tokenizer, sparsity, Path(tmp), args.save_dtype)
            pruner.restore_dense()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
