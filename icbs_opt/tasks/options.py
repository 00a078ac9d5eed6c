"""Options and presets of the built-in tasks, checked before any model loads.

Each options dataclass validates its fields on construction (numbers, files,
folders, the torch device), so a wrong ``--data-dir`` or ``--device`` fails in
well under a second instead of after a model load. Field metadata ``help`` is
the command line's help text (``icbs-opt prune --FIELD-NAME``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from icbs_opt.checks import check_float, check_int
from icbs_opt.errors import DataError
from icbs_opt.settings import (
    PAPER_CLASSIFIER_SETTINGS,
    Preset,
    PruneConfig,
    RunSettings,
)

#: Environment variable naming the WikiText-2 folder (``valid.txt``, ``test.txt``).
DATA_ENV = "ICBS_OPT_DATA"
_REPO = Path(__file__).resolve().parents[2]

#: The digits MLP: the paper's settings, density 0.1, 300 steps of 256 weights; a
#: refit reconstructs the dense model's layer outputs (97.8% against 68.9% for the
#: pruned model's, docs/pruning.md).
DIGITS_PRESET = Preset(
    PruneConfig(
        density=0.1,
        block_size=256,
        refit_target="dense",
        **PAPER_CLASSIFIER_SETTINGS,
    ),
    RunSettings(steps=300, eval_every=0, threads=1),
)
#: Causal LMs: the issue-4 recipe (Wanda per-output init, blocks of 1024, one
#: window per forward/backward) in 10 passes of 128 blocks (SmolLM2-135M: about 28
#: perplexity in 10.5 minutes here, see docs/benchmarks.md).
CAUSAL_LM_PRESET = Preset(
    PruneConfig(
        density=0.5,
        block_size=1024,
        init="wanda_per_output",
        max_batch_size=1,
        blocks_per_step=128,
        **PAPER_CLASSIFIER_SETTINGS,
    ),
    RunSettings(steps=10, eval_every=0, threads=None),
)


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


def check_device(device: Any) -> str:
    """``device`` if torch knows it and it is usable here.

    Raises:
        DataError: For a name torch does not parse or a device this torch build
            or machine lacks (``cuda`` on a CPU-only torch, say).
    """
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DataError(
            f"device must be a torch device such as cpu, cuda or cuda:1, got {device!r}"
        ) from None
    usable = {
        "cpu": lambda: True,
        "cuda": lambda: (
            torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()
        ),
        "mps": lambda: torch.backends.mps.is_available(),
    }
    if not usable.get(dev.type, lambda: False)():
        raise DataError(f"device {device!r} is not available here; use --device cpu")
    return str(device)


@dataclass(frozen=True)
class DigitsOptions:
    """Options of ``digits-mlp``."""

    cache_dir: str | None = _opt(None, "where the trained digits MLP is cached")
    batch_size: int = _opt(200, "samples per pruning batch")
    device: str = _opt("cpu", "torch device of the model and data")
    retrain: bool = _opt(False, "train the digits MLP again even if cached")
    val_fraction: float = _opt(
        0.0,
        "digits: fraction of the training set held out as the validation split "
        "of --keep-best (default 0; 0.2 with --keep-best)",
    )

    def __post_init__(self) -> None:
        check_int(self.batch_size, "batch_size", minimum=1, error=DataError)
        fraction = check_float(
            self.val_fraction, "val_fraction", minimum=0, below=1, error=DataError
        )
        object.__setattr__(self, "val_fraction", fraction)
        check_device(self.device)

    def with_validation(self) -> DigitsOptions:
        """These options, holding out 20% of the training set if none is held out."""
        return self if self.val_fraction else replace(self, val_fraction=0.2)


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The WikiText-2 folder.

    ``data_dir`` if given, else ``$ICBS_OPT_DATA``, else ``../shared/data/wikitext-2``
    beside the repository when it exists.

    Raises:
        DataError: If the folder given does not exist, or none is given and the
            default folder does not exist.
    """
    chosen = data_dir if data_dir is not None else os.environ.get(DATA_ENV)
    if chosen:
        if not Path(chosen).is_dir():
            raise DataError(f"data folder {str(chosen)!r} does not exist")
        return Path(chosen)
    default = _REPO.parent / "shared" / "data" / "wikitext-2"
    if default.is_dir():
        return default
    raise DataError(
        f"no text data folder: pass --data-dir (data_dir), set {DATA_ENV}, or give "
        f"--calib-file and --eval-file (the default {default} does not exist)"
    )


def data_file(
    explicit: str | os.PathLike | None, data_dir: str | os.PathLike | None, name: str
) -> Path:
    """``explicit``, else ``name`` in the data folder; it must be a file."""
    path = Path(explicit) if explicit is not None else resolve_data_dir(data_dir) / name
    if not path.is_file():
        raise DataError(f"text file {str(path)!r} does not exist (never downloaded)")
    return path


@dataclass(frozen=True)
class TextOptions:
    """Options of a causal LM on text files (``smollm2-135m``)."""

    seq_len: int = _opt(512, "LLM tasks: tokens per window")
    data_dir: str | None = _opt(None, "LLM tasks: folder of valid.txt and test.txt")
    calib_file: str | None = _opt(None, "LLM tasks: calibration and pruning text")
    eval_file: str | None = _opt(None, "LLM tasks: perplexity text")
    eval_windows: int = _opt(40, "LLM tasks: perplexity windows")
    calib_windows: int = _opt(32, "LLM tasks: calibration windows")
    batch_size: int = _opt(8, "windows per pruning batch")
    eval_batch_size: int = _opt(4, "LLM tasks: windows per evaluation pass")
    device: str = _opt("cpu", "torch device of the model and data")
    val_windows: int = _opt(
        0,
        "LLM tasks: the calibration text's last windows, held out as the "
        "validation split of --keep-best (default 0; 8 with --keep-best)",
    )

    def __post_init__(self) -> None:
        check_int(self.seq_len, "seq_len", minimum=2, error=DataError)
        for name in ("eval_windows", "calib_windows", "batch_size", "eval_batch_size"):
            check_int(getattr(self, name), name, minimum=1, error=DataError)
        check_int(self.val_windows, "val_windows", minimum=0, error=DataError)
        self.calib_path  # noqa: B018 - the files must exist before a model loads
        self.eval_path  # noqa: B018
        check_device(self.device)

    def with_validation(self) -> Any:
        """These options, holding out 8 windows if none are held out."""
        return self if self.val_windows else replace(self, val_windows=8)

    @property
    def calib_path(self) -> Path:
        """The calibration and pruning text (default ``valid.txt``)."""
        return data_file(self.calib_file, self.data_dir, "valid.txt")

    @property
    def eval_path(self) -> Path:
        """The perplexity text (default ``test.txt``)."""
        return data_file(self.eval_file, self.data_dir, "test.txt")


def check_model_dir(path: str | os.PathLike) -> Path:
    """``path`` as a Path if it is a folder with a ``config.json``.

    Raises:
        DataError: If it is not a Hugging Face model folder.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"model directory {str(path)!r} does not exist")
    if not (folder / "config.json").is_file():
        raise DataError(
            f"{str(path)!r} is not a Hugging Face model directory (no config.json)"
        )
    return folder


@dataclass(frozen=True)
class CausalLMOptions(TextOptions):
    """Options of ``causal-lm``: any local Hugging Face causal LM on text files."""

    model: str | None = _opt(None, "causal-lm: a local Hugging Face model folder")

    def __post_init__(self) -> None:
        if self.model is None:
            raise DataError(
                "task 'causal-lm' needs a model: pass --model DIR (a local Hugging "
                "Face causal-LM folder)"
            )
        folder = Path(self.model)
        if not folder.is_dir():
            raise DataError(f"model directory {self.model!r} does not exist")
        if not (folder / "config.json").is_file():
            raise DataError(
                f"{self.model!r} is not a Hugging Face model directory (no config.json)"
            )
        super().__post_init__()
