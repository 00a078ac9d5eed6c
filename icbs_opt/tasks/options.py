"""Options and presets of the built-in tasks, checked before any model loads.

Each options dataclass validates its fields on construction (numbers, corpora,
folders, the torch device), so a wrong ``--calib-data`` or ``--device`` fails in
well under a second instead of after a model load. Each field is a
:func:`~icbs_opt.settings.setting`: its metadata is the command line's flag
(``icbs-opt prune --FIELD-NAME``) and help text.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from icbs_opt.checks import check_float, check_int, is_integer
from icbs_opt.errors import DataError
from icbs_opt.settings import (
    PAPER_CLASSIFIER_SETTINGS,
    Preset,
    PruneConfig,
    RunSettings,
    setting,
)
from icbs_opt.tasks.corpora import (
    CORPUS_SUFFIXES,
    DATA_ENV,
    Corpus,
    resolve_corpus,
    split_names,
)

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


def absolute_path(path: Any, name: str) -> Any:
    """A path option made absolute, so a run resumed elsewhere reads the same files.

    None (the default) and anything but a string or path stay as they are.

    Example:
        >>> absolute_path("/data/c4.jsonl", "calib_data"), absolute_path(None, "x")
        ('/data/c4.jsonl', None)

    Raises:
        DataError: For an empty path (which would mean the current folder).
    """
    if not isinstance(path, (str, os.PathLike)):
        return path
    if not os.fspath(path).strip():
        raise DataError(f"{name} must be a path, got {path!r}")
    return os.path.abspath(path)


def _absolute_corpora(text: Any) -> Any:
    """Comma-separated corpora with each file (not a corpus name) made absolute."""
    if not isinstance(text, str):
        return text
    parts = [p.strip() for p in text.split(",")]
    return ",".join(
        absolute_path(p, "corpus") if p and Path(p).suffix in CORPUS_SUFFIXES else p
        for p in parts
    )


#: The files of a model folder that may name code of its own (``auto_map``).
REMOTE_CODE_FILES = ("config.json", "tokenizer_config.json")


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

    cache_dir: str | None = setting(None, "where the trained digits MLP is cached")
    batch_size: int = setting(200, "samples per pruning batch")
    device: str = setting("cpu", "torch device of the model and data")
    retrain: bool = setting(False, "train the digits MLP again even if cached")
    val_fraction: float = setting(
        0.0,
        "fraction of the training set held out as the validation split "
        "of --keep-best (0 with --keep-best: 0.2)",
    )

    def __post_init__(self) -> None:
        cache_dir = absolute_path(self.cache_dir, "cache_dir")
        object.__setattr__(self, "cache_dir", cache_dir)
        check_int(self.batch_size, "batch_size", minimum=1, error=DataError)
        fraction = check_float(
            self.val_fraction, "val_fraction", minimum=0, below=1, error=DataError
        )
        object.__setattr__(self, "val_fraction", fraction)
        check_device(self.device)

    def with_validation(self) -> DigitsOptions:
        """These options, holding out 20% of the training set if none is held out."""
        return self if self.val_fraction else replace(self, val_fraction=0.2)


@dataclass(frozen=True)
class TextOptions:
    """Options of a causal LM on text corpora (``smollm2-135m``).

    Corpora are named (``wikitext2``, ``c4``) or files; see
    :mod:`icbs_opt.tasks.corpora`.
    """

    seq_len: int = setting(512, "tokens per window")
    data_dir: str | None = setting(
        None,
        "folder of the named corpora and zero-shot tasks (wikitext-2/, "
        f"c4/, zeroshot/; None: ${DATA_ENV}, else ../shared/data)",
    )
    calib_data: str = setting(
        "c4",
        "corpus of the calibration and pruning windows (and the "
        "--keep-best validation windows): wikitext2, c4, or a .txt/.jsonl file",
    )
    eval_data: str = setting(
        "wikitext2,c4",
        "comma-separated perplexity corpora (held-out files of "
        "wikitext2, c4, or .txt/.jsonl files); the first is the run's metric",
    )
    eval_windows: int = setting(40, "perplexity windows per corpus")
    calib_windows: int = setting(32, "calibration windows")
    pruning_windows: int = setting(
        512, "windows sampled from --calib-data for pruning batches"
    )
    data_seed: int = setting(0, "seed of the calibration window sampling")
    batch_size: int = setting(8, "windows per pruning batch")
    eval_batch_size: int = setting(4, "windows per evaluation pass")
    device: str = setting("cpu", "torch device of the model and data")
    val_windows: int = setting(
        0,
        "windows sampled from held-out documents of --calib-data as "
        "the validation split of --keep-best (0 with --keep-best: 8)",
    )
    save_dtype: str = setting(
        "bfloat16", "dtype of the --out model: bfloat16, float16, float32"
    )
    save_format: str | None = setting(
        None,
        "--out weights: compressed (bitmask, compressed-tensors "
        "sparse-bitmask or sparse-24-bitmask) or dense, both with a "
        "compressed-tensors sparsity_config (None: compressed when "
        "compressed-tensors is installed, else dense)",
    )

    def __post_init__(self) -> None:
        from icbs_opt.tasks.compressed import check_save_dtype, resolve_save_format

        object.__setattr__(self, "data_dir", absolute_path(self.data_dir, "data_dir"))
        for name in ("calib_data", "eval_data"):
            object.__setattr__(self, name, _absolute_corpora(getattr(self, name)))
        check_save_dtype(self.save_dtype)
        resolve_save_format(self.save_format)
        check_int(self.seq_len, "seq_len", minimum=2, error=DataError)
        for name in ("eval_windows", "calib_windows", "batch_size", "eval_batch_size"):
            check_int(getattr(self, name), name, minimum=1, error=DataError)
        check_int(self.val_windows, "val_windows", minimum=0, error=DataError)
        check_int(self.data_seed, "data_seed", minimum=0, error=DataError)
        check_int(
            self.pruning_windows,
            "pruning_windows",
            minimum=max(self.calib_windows, self.batch_size),
            error=DataError,
        )
        self.calib_corpus  # noqa: B018 - the files must exist before a model loads
        self.eval_corpora  # noqa: B018
        check_device(self.device)

    def with_validation(self) -> Any:
        """These options, holding out 8 windows if none are held out."""
        return self if self.val_windows else replace(self, val_windows=8)

    @property
    def calib_corpus(self) -> Corpus:
        """The calibration and pruning corpus file."""
        return resolve_corpus(self.calib_data, "calibration", self.data_dir)

    @property
    def eval_corpora(self) -> list[Corpus]:
        """The perplexity corpora, in the order given (the first is the metric)."""
        names = split_names(self.eval_data, "eval_data")
        corpora = [resolve_corpus(n, "evaluation", self.data_dir) for n in names]
        labels = [c.name for c in corpora]
        for label in labels:
            if labels.count(label) > 1:
                raise DataError(
                    f"eval_data names two corpora called {label!r}: {self.eval_data!r}"
                )
        return corpora


def check_model_dir(path: str | os.PathLike, *, hugging_face: bool = True) -> Path:
    """``path`` as a Path if it is a model folder.

    Args:
        path: The folder.
        hugging_face: Whether it must be a Hugging Face model folder (with a
            ``config.json``); else any folder (a ``prune --out`` folder, say).

    Raises:
        DataError: If it is not a folder, or not a Hugging Face model folder.
    """
    folder = Path(path)
    if not str(path).strip() or not folder.is_dir():
        raise DataError(f"model directory {str(path)!r} does not exist")
    if hugging_face and not (folder / "config.json").is_file():
        raise DataError(
            f"{str(path)!r} is not a Hugging Face model directory (no config.json)"
        )
    for name in REMOTE_CODE_FILES:
        if "auto_map" in read_json_object(folder / name):
            raise DataError(
                f"{str(folder / name)!r} names code of its own (auto_map); icbs-opt "
                "never runs code from a model folder: use a model transformers knows"
            )
    return folder


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; ``{}`` if it is missing, unreadable or not one.

    For a look at a model folder's files before a loader reads them (which then
    says what is wrong with a bad one).
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def check_positions(seq_len: int, config: dict[str, Any], source: str) -> None:
    """Refuse windows longer than a model's positions.

    Args:
        seq_len: Tokens per window.
        config: The model's config (``max_position_embeddings``; GPT-2's
            ``n_positions``); without either nothing is checked.
        source: The model, named in the message.

    Raises:
        DataError: If ``seq_len`` exceeds the model's positions.
    """
    positions = config.get("max_position_embeddings") or config.get("n_positions")
    if is_integer(positions) and seq_len > positions:
        raise DataError(
            f"seq_len must be at most the {positions} positions of {source} "
            f"(max_position_embeddings), got {seq_len}"
        )


@dataclass(frozen=True)
class CausalLMOptions(TextOptions):
    """Options of ``causal-lm``: any local Hugging Face causal LM on text files."""

    model: str | None = setting(
        None, "a local Hugging Face causal-LM folder", metavar="DIR"
    )

    def __post_init__(self) -> None:
        if self.model is None:
            raise DataError(
                "task 'causal-lm' needs a model: pass --model DIR (a local Hugging "
                "Face causal-LM folder)"
            )
        folder = check_model_dir(self.model)
        object.__setattr__(self, "model", absolute_path(self.model, "model"))
        super().__post_init__()
        config = read_json_object(folder / "config.json")
        check_positions(self.seq_len, config, f"the model in {str(folder)!r}")
