"""The record of a pruning run: its settings and the files that hold them.

A run's settings (task and task options, backend and backend options, the
:class:`~icbs_opt.settings.Preset`, the layers asked for and the output paths) are
one :class:`RunRecord`, and it alone writes and reads them back:

- ``prune_config.json`` in the ``--out`` folder: the settings with the layers
  pruned, the task's facts and the package versions (:meth:`RunRecord.write_config`);
- ``results.json`` beside it: the run's summary and every block's record
  (:meth:`RunRecord.write_results`);
- a checkpoint's header: the settings under ``settings`` in the safetensors
  metadata (:meth:`RunRecord.write_checkpoint`), read here without torch.

Files written by earlier versions are read too: settings added since take their
defaults, settings since removed are ignored with a warning.

Example:
    >>> import dataclasses
    >>> from icbs_opt.settings import PruneConfig
    >>> record = RunRecord("digits-mlp", {}, "native", {}, Preset(PruneConfig(0.1)))
    >>> RunRecord.from_dict(record.to_dict()) == record
    True
    >>> later = record.preset.replace(steps=9, time_budget=5.0)
    >>> record.changed(dataclasses.replace(record, preset=later))
    ('steps', 300, 9)
"""

from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from icbs_opt.atomic import atomic_write_json
from icbs_opt.errors import DataError
from icbs_opt.settings import (
    CONFIG_FIELDS,
    RUN_FIELDS,
    Preset,
    PruneConfig,
    RunSettings,
)

if TYPE_CHECKING:
    from icbs_opt.pruning import Pruner
    from icbs_opt.pruning.loop import PruneResult

logger = logging.getLogger(__name__)

#: File name of a checkpoint inside its folder (see icbs_opt.pruning.checkpoint).
CHECKPOINT_FILE = "checkpoint.safetensors"
#: The settings file of an ``--out`` folder.
CONFIG_FILE = "prune_config.json"
#: The results file of an ``--out`` folder.
RESULTS_FILE = "results.json"
#: Settings a resumed run may change: they leave its results as they were.
RESUME_MAY_CHANGE = ("time_budget", "checkpoint_every", "executor", "workers")


def checkpoint_file(path: str | os.PathLike) -> str:
    """The checkpoint file of ``path``: the file itself or the one in the folder."""
    path = os.fspath(path)
    return os.path.join(path, CHECKPOINT_FILE) if os.path.isdir(path) else path


def read_checkpoint_texts(path: str | os.PathLike) -> dict[str, str]:
    """The texts in a checkpoint's (file or folder) header, without torch.

    Raises:
        DataError: If there is no readable checkpoint at ``path``.
    """
    file = checkpoint_file(path)
    if not os.path.isfile(file):
        raise DataError(
            f"cannot read the checkpoint {file!r}: no such file (give the folder "
            f"holding {CHECKPOINT_FILE}, or the file)"
        )
    try:
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{len(head)} bytes, shorter than a header")
            (size,) = struct.unpack("<Q", head)
            if size > os.fstat(f.fileno()).st_size - 8:
                raise ValueError(f"its header size {size} exceeds the file")
            texts = json.loads(f.read(size))["__metadata__"]
        if not all(isinstance(v, str) for v in texts.values()):
            raise ValueError("its metadata is not text")
        return texts
    except (OSError, ValueError, KeyError, TypeError, AttributeError,
            struct.error) as exc:  # fmt: skip
        raise DataError(
            f"cannot read the checkpoint {file!r}: not a checkpoint ({exc})"
        ) from exc


@dataclass(frozen=True)
class RunRecord:
    """The settings of a pruning run, as its files hold them.

    Attributes:
        task: The task's registered name.
        task_options: The task's options, ``{field: value}``.
        backend: The backend's name.
        backend_options: The backend's options (its ``parameters``).
        preset: The method's and the run's settings.
        layers: The layers asked for (None: the task's).
        outputs: Output paths by flag name (``out``, ``json``, ``checkpoint``, ...).
    """

    task: str
    task_options: dict[str, Any]
    backend: str
    backend_options: dict[str, Any]
    preset: Preset
    layers: list[str] | None = None
    outputs: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-ready dictionary (a checkpoint's ``settings``)."""
        return {
            "task": self.task,
            "task_options": dict(self.task_options),
            "backend": self.backend,
            "backend_options": dict(self.backend_options),
            **self.preset.to_dict(),
            "layers": self.layers,
            "outputs": dict(self.outputs),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "settings") -> RunRecord:
        """The record of :meth:`to_dict` or of a ``prune_config.json``.

        Raises:
            DataError: If an entry is missing or of the wrong kind.
            PruningError: If a setting has a bad value.
        """
        try:
            config = _known(data["config"], CONFIG_FIELDS, source)
            run = _known(data["run"], RUN_FIELDS, source)
            return cls(
                data["task"],
                dict(data["task_options"]),
                data["backend"],
                dict(data["backend_options"]),
                Preset(PruneConfig(**config), RunSettings(**run)),
                data.get("layers"),
                dict(data.get("outputs") or {}),
            )
        except (KeyError, TypeError, AttributeError) as exc:  # not a bad value
            raise DataError(f"cannot read the run settings in {source}: {exc}") from exc

    def changed(self, other: RunRecord) -> tuple[str, Any, Any] | None:
        """The first setting ``other`` changes that a resumed run may not change.

        Returns:
            ``(name, ours, theirs)``, or None when ``other`` may resume this run.
        """
        ours, theirs = self._flat(), other._flat()
        for name, value in theirs.items():
            if name not in RESUME_MAY_CHANGE and value != ours.get(name):
                return name, ours.get(name), value
        return None

    def _flat(self) -> dict[str, Any]:
        d = self.to_dict()
        keys = ("task", "backend", "backend_options", "layers")
        return {**d["task_options"], **d["config"], **d["run"],
                **{k: d[k] for k in keys}}  # fmt: skip

    # ----------------------------------------------------------- checkpoints
    @classmethod
    def read_checkpoint(cls, path: str | os.PathLike) -> RunRecord:
        """The record in a checkpoint (file or folder), read without torch.

        Raises:
            DataError: If there is no readable checkpoint with settings at ``path``.
        """
        file = checkpoint_file(path)
        texts = read_checkpoint_texts(file)
        if "settings" not in texts:
            raise DataError(
                f"cannot read the checkpoint {file!r}: not a checkpoint of a prune "
                "run (no run settings in its header)"
            )
        try:
            settings = json.loads(texts["settings"])
        except ValueError as exc:
            raise DataError(f"cannot read the checkpoint {file!r}: {exc}") from exc
        return cls.from_dict(settings, repr(file))

    def write_checkpoint(
        self, path: str | os.PathLike, pruner: Pruner, result: PruneResult
    ) -> None:
        """Write the pruner's state and ``result`` with this record to ``path``."""
        from icbs_opt.pruning.checkpoint import save_checkpoint

        save_checkpoint(path, pruner, result, self.to_dict())

    # ------------------------------------------------------- --out folder
    def write_config(
        self, folder: str | os.PathLike, *, layers: list[str], task_info: dict
    ) -> None:
        """Write ``prune_config.json`` into ``folder``.

        Args:
            folder: The ``--out`` folder.
            layers: The layers pruned (the names ``layers`` resolved to).
            task_info: The task's facts (dense metric, sizes, ...).
        """
        d = self.to_dict()
        del d["outputs"]
        d.update(layers=layers, task_info=task_info, versions=_versions())
        atomic_write_json(Path(folder) / CONFIG_FILE, d)

    @classmethod
    def read_config(cls, folder: str | os.PathLike) -> RunRecord | None:
        """The record of an ``--out`` folder's ``prune_config.json``.

        Returns:
            The record (``layers``: the layers pruned), or None without the file.

        Raises:
            DataError: If the file is unreadable or not a run's settings.
        """
        path = Path(folder) / CONFIG_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(
                f"cannot read the run settings {str(path)!r}: {exc}"
            ) from exc
        return cls.from_dict(data, repr(str(path)))

    @staticmethod
    def write_results(
        folder: str | os.PathLike, summary: dict[str, Any], steps: list[dict]
    ) -> None:
        """Write ``results.json``: the ``summary`` and the blocks' ``steps``."""
        atomic_write_json(Path(folder) / RESULTS_FILE, {**summary, "steps": steps})

    @staticmethod
    def read_results(folder: str | os.PathLike) -> dict[str, Any]:
        """The ``results.json`` of an ``--out`` folder.

        Raises:
            DataError: If it is missing or unreadable.
        """
        path = Path(folder) / RESULTS_FILE
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read the results {str(path)!r}: {exc}") from exc


def _known(values: dict[str, Any], fields: tuple[str, ...], source: str) -> dict:
    """``values`` without the settings no longer known (a warning names them)."""
    unknown = sorted(set(values) - set(fields))
    if unknown:
        logger.warning("ignoring settings no longer known in %s: %s", source,
                       ", ".join(unknown))  # fmt: skip
    return {k: v for k, v in values.items() if k in fields}


def _versions() -> dict[str, str]:
    """The versions of Python and of the packages a run's results depend on."""
    import platform
    from importlib import metadata

    from icbs_opt import __version__

    out = {"icbs-opt": __version__, "python": platform.python_version()}
    for dist in ("torch", "numpy", "dimod", "dwave-neal", "scikit-learn",
                 "safetensors", "transformers"):  # fmt: skip
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out
