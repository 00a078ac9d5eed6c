"""Checkpoints of a pruning run: one safetensors file, written atomically.

A checkpoint holds what :meth:`Pruner.state_dict` gives (masks, tabu FIFOs,
layer schedule, numpy and torch random states, counters), the
:class:`PruneResult` so far (records, passes, history, best validated mask) and
the run's settings, a JSON-ready dictionary the caller chooses (the command line
saves its :class:`~icbs_opt.record.RunRecord` there, which reads it back without
torch). The batches' position is the
number of steps done: a resumed run skips that many batches of the same seeded
sequence.

Example:
    >>> import tempfile, torch, torch.nn.functional as F
    >>> from icbs_opt.pruning import Pruner, prune
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    >>> loss = lambda m, X, y: F.cross_entropy(m(X), y)
    >>> pruner = Pruner(model, loss, 0.5, backend="exhaustive", block_size=8)
    >>> result = prune(pruner, [(torch.randn(16, 8), torch.randint(0, 4, (16,)))], 2)
    >>> path = tempfile.mkdtemp() + "/checkpoint.safetensors"
    >>> save_checkpoint(path, pruner, result, {"density": 0.5})
    >>> load_checkpoint(path).result.steps_done
    2
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from icbs_opt.atomic import atomic_path, json_default
from icbs_opt.errors import DataError
from icbs_opt.pruning.loop import PruneResult
from icbs_opt.pruning.pruner import PassRecord, Pruner, StepRecord, StepSeconds
from icbs_opt.record import CHECKPOINT_FILE, checkpoint_file, read_checkpoint_texts

__all__ = ["CHECKPOINT_FILE", "Checkpoint", "load_checkpoint", "save_checkpoint"]

FORMAT = 1


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        state: For :meth:`Pruner.load_state_dict`.
        result: For ``prune(..., resume=result)``.
        settings: The dictionary given to :func:`save_checkpoint`.
    """

    state: dict[str, Any]
    result: PruneResult
    settings: dict[str, Any]


def save_checkpoint(
    path: str | os.PathLike,
    pruner: Pruner,
    result: PruneResult,
    settings: dict[str, Any],
) -> None:
    """Write the pruner's state, the result so far and ``settings`` to ``path``.

    The file is replaced atomically: a kill leaves the previous checkpoint.
    """
    from safetensors.torch import save_file

    state = pruner.state_dict()
    tensors = {"torch_rng": state.pop("torch_rng")}
    tabu_sizes = {}
    for name, layer in state.pop("layers").items():
        tensors[f"mask/{name}"] = layer["pruned"].cpu()
        tabu = [t.cpu().to(torch.int32) for t in layer["tabu"]]
        tabu_sizes[name] = [t.numel() for t in tabu]
        tensors[f"tabu/{name}"] = torch.cat(tabu or [torch.zeros(0, dtype=torch.int32)])
        if "keep_values" in layer:
            tensors[f"keep/{name}"] = layer["keep_values"].cpu()
    for name, keep in (result.best_masks or {}).items():
        tensors[f"best/{name}"] = keep.cpu().contiguous()
    for name, values in (result.best_values or {}).items():
        tensors[f"bestkeep/{name}"] = values.cpu()
    meta = {
        "format": FORMAT,
        **state,
        "tabu_sizes": tabu_sizes,
        "result": _result_dict(result),
    }
    texts = {
        "icbs": json.dumps(meta, default=json_default),
        "settings": json.dumps(settings, default=json_default),
    }
    with atomic_path(os.fspath(path)) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, texts)


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (file or its folder).

    Raises:
        DataError: If the file is missing, unreadable or not a checkpoint.
    """
    from safetensors.torch import load_file

    file = checkpoint_file(path)
    texts = read_checkpoint_texts(file)
    try:
        meta = json.loads(texts["icbs"])
        settings = json.loads(texts["settings"])
        tensors = load_file(file)
    except Exception as exc:  # safetensors, json and KeyError alike
        raise DataError(f"cannot read the checkpoint {file!r}: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise DataError(f"{file!r} is a checkpoint of format {meta.get('format')!r}")
    layers = {}
    for name, sizes in meta.pop("tabu_sizes").items():
        tabu = tensors[f"tabu/{name}"]
        fifo = list(tabu.split(sizes)) if sizes else []
        layers[name] = {"pruned": tensors[f"mask/{name}"], "tabu": fifo}
        if f"keep/{name}" in tensors:
            layers[name]["keep_values"] = tensors[f"keep/{name}"]
    result = _result_from(meta.pop("result"))
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best/")}
    result.best_masks = best or None
    values = {k[9:]: v for k, v in tensors.items() if k.startswith("bestkeep/")}
    result.best_values = values or None
    state = {**meta, "layers": layers, "torch_rng": tensors["torch_rng"]}
    return Checkpoint(state, result, settings)


def _result_dict(result: PruneResult) -> dict[str, Any]:
    return {
        "records": [r.to_dict() for r in result.records],
        "passes": [p.to_dict() for p in result.passes],
        "history": result.history,
        "seconds": result.seconds,
        "best": result.best,
    }


def _result_from(data: dict[str, Any]) -> PruneResult:
    """The result of :func:`_result_dict` (the stop reason is not kept)."""
    records = [
        StepRecord(**{**r, "seconds": StepSeconds(**r["seconds"])})
        for r in data["records"]
    ]
    passes, start = [], 0
    for p in data["passes"]:
        blocks = records[start : start + p["blocks"]]
        start += p["blocks"]
        kept = {k: p[k] for k in ("loss_before", "loss_after", "rolled_back")}
        passes.append(PassRecord(p["pass"], blocks, **kept, seconds=p["seconds"]))
    history, seconds = data["history"], data["seconds"]
    return PruneResult(records, history, seconds, passes, best=data["best"])
