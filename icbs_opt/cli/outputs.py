"""The outputs of ``prune``: checked before the run, each written on its own after.

Every output path is checked before any model loads (:func:`check_outputs`,
:func:`stale_checkpoints`) and recorded absolute (:func:`absolute`). At the end
each output (``--json``, ``--plot``, every file of ``--out``) is written on its
own (:func:`write_outputs`): one that fails is said in one line naming it, and
the others are still written.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from icbs_opt.atomic import atomic_path
from icbs_opt.cli.common import check_output, write_each, write_json
from icbs_opt.cli.flags import flag_of
from icbs_opt.cli.report import check_plot_path, plot_history
from icbs_opt.errors import DataError
from icbs_opt.record import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    RESULTS_FILE,
    RunRecord,
    checkpoint_file,
)

if TYPE_CHECKING:
    from icbs_opt.cli.prune import PrunePlan

#: The masks file of an ``--out`` folder.
MASKS_FILE = "masks.safetensors"
#: Outputs that are folders.
FOLDER_OUTPUTS = ("out", "harvest", "checkpoint")
#: A non-empty --out or --checkpoint folder must hold one of these (icbs-opt's).
_OURS = (CONFIG_FILE, CHECKPOINT_FILE)


def absolute(path: str) -> str:
    """``path`` made absolute (``-``, standard output, as it is)."""
    return path if path == "-" else os.path.abspath(path)


def stale_checkpoints(
    outputs: dict[str, str], resume: str | None, overwrite: bool
) -> list[str]:
    """The checkpoints of other runs in the ``--out`` and ``--checkpoint`` folders.

    Args:
        outputs: The run's outputs by flag name.
        resume: The checkpoint (file or folder) the run resumes, if any: its own.
        overwrite: Whether ``--overwrite`` was given.

    Raises:
        DataError: For such a checkpoint without ``--overwrite``: a new run there
            would leave it behind, and a later ``--resume`` would continue it.
    """
    resumed = checkpoint_file(resume) if resume else None
    stale = []
    for key in ("out", "checkpoint"):
        file = os.path.join(outputs.get(key, ""), CHECKPOINT_FILE)
        if key not in outputs or not os.path.isfile(file):
            continue
        if resumed is not None and os.path.samefile(file, resumed):
            continue
        if not overwrite:
            raise DataError(
                f"{flag_of(key)} {outputs[key]!r} holds the checkpoint of another "
                f"run: continue it with --resume {outputs[key]}, or give "
                "--overwrite to start a new run there"
            )
        stale.append(file)
    return stale


def check_outputs(outputs: dict[str, str]) -> None:
    """Fail now, not after the run, on an output that cannot or must not be written.

    A folder that already holds files must be one icbs-opt wrote: it has a
    ``prune_config.json`` or a checkpoint. ``--plot`` needs matplotlib and a
    file name whose extension it can write.
    """
    for key, path in outputs.items():
        check_output(path, folder=key in FOLDER_OUTPUTS)
        folder = Path(path)
        if key not in ("out", "checkpoint") or not folder.is_dir():
            continue
        ours = any((folder / name).exists() for name in _OURS)
        if not ours and any(folder.iterdir()):
            raise DataError(
                f"output folder {path!r} holds files icbs-opt did not write (no "
                f"{' or '.join(_OURS)}); give a new or empty folder"
            )
    if "plot" in outputs:
        check_plot_path(outputs["plot"])


#: One output's write: the path a failure names, and the function that writes it.
Write = tuple[str, Callable[[], Any]]


def write_outputs(
    plan: PrunePlan, task: Any, pruner: Any, summary: dict[str, Any], result: Any
) -> list[str]:
    """The summary JSON, the plot, and each file of the ``--out`` folder.

    Each is written on its own: one that fails (a full disk) is said on stderr
    in one line naming it, and the others are still written.

    Returns:
        The paths that could not be written.
    """
    json_write, results_write = summary_writes(plan, summary, result)
    later = plan.zero_shot and not result.stopped  # the summary grows after this
    writes = [json_write] if json_write and not (later and json_write[0] == "-") else []
    if "plot" in plan.outputs:
        plot = plan.outputs["plot"]
        writes.append((plot, lambda: plot_history(summary, plot)))
    out = plan.outputs.get("out")
    if out is not None:
        writes += [
            (os.path.join(out, MASKS_FILE), lambda: _write_masks(out, pruner)),
            (out, lambda: task.save_model(task.model, out)),
            (os.path.join(out, CONFIG_FILE), lambda: plan.record.write_config(
                out, layers=summary["layers"], task_info=task.info)),
            results_write,
        ]  # fmt: skip
    return write_each(writes)


def _write_masks(out: str, pruner: Any) -> None:
    from safetensors.torch import save_file

    masks = {name: m.cpu().contiguous() for name, m in pruner.masks().items()}
    with atomic_path(os.path.join(out, MASKS_FILE)) as tmp:
        meta = {"convention": "True = kept: weight == original weight * mask"}
        save_file(masks, tmp, metadata=meta)


def summary_writes(
    plan: PrunePlan, summary: dict[str, Any], result: Any
) -> tuple[Write | None, Write | None]:
    """The writes of ``--json`` and of the ``--out`` folder's ``results.json``."""
    json_write = results_write = None
    if "json" in plan.outputs:
        path = plan.outputs["json"]
        json_write = (path, lambda: write_json(path, summary))
    if "out" in plan.outputs:
        out = plan.outputs["out"]
        steps = [r.to_dict() for r in result.records]
        results = os.path.join(out, RESULTS_FILE)
        results_write = (results, lambda: RunRecord.write_results(out, summary, steps))
    return json_write, results_write
