"""Text corpora for causal LMs: named corpora or files, cut into token windows.

A corpus is named (``wikitext2``, ``c4``) or is a file: ``.txt`` (the whole file
is one document) or ``.jsonl`` (one document per line, in its ``text`` field). A
named corpus has a calibration file and a held-out evaluation file:

=============  ==============================  ==============================
name           calibration (pruning batches)   evaluation (perplexity)
=============  ==============================  ==============================
``wikitext2``  ``wikitext-2/valid.txt``        ``wikitext-2/test.txt``
``c4``         ``c4/calibration.jsonl``        ``c4/validation.jsonl``
=============  ==============================  ==============================

under the data folder: ``--data-dir``, else ``$ICBS_OPT_DATA``, else
``../shared/data`` beside the repository. Nothing is ever downloaded.

Two ways to cut a corpus into windows of ``seq_len`` tokens:

- :func:`sample_windows` (calibration and pruning batches), as SparseGPT's C4
  loader: each window is a random document of more than ``seq_len`` tokens at a
  random offset, so no window spans two documents. Only when no document is that
  long are the documents joined (by a blank line) and windows drawn from the
  joined text, spanning documents; the result says which.
- :func:`contiguous_windows` (perplexity): the documents joined by a blank line,
  tokenised, and cut into consecutive windows from the start, as GPTQ and
  SparseGPT evaluate C4 and WikiText-2.

Resolving names and files needs no torch, so options are checked before a model
loads.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from icbs_opt.errors import DataError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

#: Environment variable naming the data folder (``wikitext-2/``, ``c4/``,
#: ``zeroshot/``).
DATA_ENV = "ICBS_OPT_DATA"
_REPO = Path(__file__).resolve().parents[2]

#: Named corpora: name -> (calibration file, evaluation file) in the data folder.
NAMED_CORPORA: dict[str, tuple[str, str]] = {
    "wikitext2": ("wikitext-2/valid.txt", "wikitext-2/test.txt"),
    "c4": ("c4/calibration.jsonl", "c4/validation.jsonl"),
}
#: Suffixes read as corpus files.
CORPUS_SUFFIXES = (".txt", ".jsonl")
#: Text between two joined documents.
DOCUMENT_SEPARATOR = "\n\n"


def default_data_dir() -> Path:
    """``../shared/data`` beside the repository (it may not exist)."""
    return _REPO.parent / "shared" / "data"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data folder: ``data_dir``, else ``$ICBS_OPT_DATA``, else the default.

    Raises:
        DataError: If the folder chosen does not exist; the message says where
            the folder is looked for.
    """
    if data_dir is not None:
        chosen, source = Path(data_dir), "--data-dir"
    elif os.environ.get(DATA_ENV):
        chosen, source = Path(os.environ[DATA_ENV]), f"${DATA_ENV}"
    else:
        chosen, source = default_data_dir(), "the default"
    if not chosen.is_dir():
        raise DataError(
            f"data folder {str(chosen)!r} ({source}) does not exist; the named "
            f"corpora are looked for in --data-dir, else ${DATA_ENV}, else "
            f"{default_data_dir()}, which must hold "
            f"{', '.join(sorted({f for pair in NAMED_CORPORA.values() for f in pair}))}"
        )
    return chosen


@dataclass(frozen=True)
class Corpus:
    """A corpus resolved to one file.

    Attributes:
        name: The corpus name (``c4``) or, for a file given by path, its stem.
        path: The file read.
    """

    name: str
    path: Path


def resolve_corpus(
    spec: str, role: str, data_dir: str | os.PathLike | None = None
) -> Corpus:
    """The file of corpus ``spec`` for ``role`` (``calibration`` or ``evaluation``).

    Args:
        spec: A corpus name (``wikitext2``, ``c4``) or a ``.txt``/``.jsonl`` path.
        role: ``calibration`` or ``evaluation``: which of a named corpus's files.
        data_dir: The data folder holding the named corpora (see
            :func:`resolve_data_dir`).

    Raises:
        DataError: For an unknown name, a missing file or folder, or a file of
            another type.
    """
    spec = str(spec).strip()
    if spec in NAMED_CORPORA:
        calibration, evaluation = NAMED_CORPORA[spec]
        folder = resolve_data_dir(data_dir)
        path = folder / (calibration if role == "calibration" else evaluation)
        if not path.is_file():
            _refuse_old_data_dir(folder)
            raise DataError(
                f"corpus {spec!r} needs {str(path)!r}, which does not exist (the "
                f"data folder {str(folder)!r} must hold {calibration} and "
                f"{evaluation}; nothing is downloaded)"
            )
        return Corpus(spec, path)
    path = Path(spec)
    if path.suffix not in CORPUS_SUFFIXES:
        raise DataError(
            f"corpus must be one of {', '.join(NAMED_CORPORA)} or a "
            f"{'/'.join(CORPUS_SUFFIXES)} file, got {spec!r}"
        )
    if not path.is_file():
        raise DataError(f"corpus file {spec!r} does not exist")
    return Corpus(path.stem, path)


def _refuse_old_data_dir(folder: Path) -> None:
    """Name the change when ``folder`` is a WikiText-2 folder (the old meaning)."""
    if (folder / "valid.txt").is_file() and (folder / "test.txt").is_file():
        raise DataError(
            f"--data-dir now names the folder holding wikitext-2/ and c4/ (e.g. "
            f"{default_data_dir()}); {str(folder)!r} is a WikiText-2 folder itself: "
            "pass its parent, or give its files with --calib-data and --eval-data"
        )


def split_names(text: str, what: str) -> list[str]:
    """Comma-separated names, each once, none empty.

    Raises:
        DataError: For an empty list or an empty or repeated entry.
    """
    names = [part.strip() for part in str(text).split(",")]
    if not names or any(not name for name in names):
        raise DataError(f"{what} must be a comma-separated list, got {text!r}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise DataError(f"{what} names {repeated[0]!r} twice in {text!r}")
    return names


def read_documents(path: str | os.PathLike) -> list[str]:
    """The documents of a corpus file: the whole ``.txt``, or each ``.jsonl`` text.

    Raises:
        DataError: If the file is unreadable, a ``.jsonl`` line is not a JSON
            object with a string ``text`` field, or no document has text.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read corpus file {str(path)!r}: {exc}") from exc
    if path.suffix != ".jsonl":
        documents = [text]
    else:
        documents = [_jsonl_text(path, number, line)
                     for number, line in enumerate(text.splitlines(), 1)
                     if line.strip()]  # fmt: skip
    documents = [doc for doc in documents if doc.strip()]
    if not documents:
        raise DataError(f"corpus file {str(path)!r} holds no text")
    return documents


def _jsonl_text(path: Path, number: int, line: str) -> str:
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise DataError(f"{str(path)!r} line {number} is not JSON: {exc}") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise DataError(
            f"{str(path)!r} line {number} has no string 'text' field (a .jsonl "
            "corpus holds one JSON object with a 'text' field per line)"
        )
    return record["text"]


def _check_seq_len(seq_len: Any) -> int:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise DataError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    return seq_len


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def contiguous_windows(
    tokenizer: Any,
    path: str | os.PathLike,
    seq_len: int,
    max_windows: int | None = None,
) -> torch.Tensor:
    """Consecutive windows of the corpus file's joined documents, from the start.

    Returns:
        ``(W, seq_len)`` int64 token ids, ``W`` at most ``max_windows``; the tail
        shorter than a window is dropped.

    Raises:
        DataError: For a bad ``seq_len``, an unreadable file, or fewer tokens
            than one window.
    """
    import torch

    seq_len = _check_seq_len(seq_len)
    documents = read_documents(path)
    ids: list[int] = []
    for number, document in enumerate(documents):
        if max_windows is not None and len(ids) >= max_windows * seq_len:
            break  # enough text: later documents are not tokenised
        ids += _encode(tokenizer, (DOCUMENT_SEPARATOR if number else "") + document)
    count = len(ids) // seq_len
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise DataError(
            f"{str(path)!r} has {len(ids)} tokens, fewer than one window of "
            f"seq_len = {seq_len}"
        )
    return torch.tensor(ids[: count * seq_len], dtype=torch.long).view(count, seq_len)


@dataclass
class SampledWindows:
    """Windows drawn from a corpus file by :func:`sample_windows`.

    Attributes:
        windows: ``(count, seq_len)`` int64 token ids.
        held_out: ``(held_out, seq_len)`` windows from text none of ``windows``
            comes from (the validation split).
        documents: Documents in the file.
        eligible: Documents longer than a window (the ones drawn from).
        span_documents: True when no document was long enough and the windows
            were drawn from the joined documents.
    """

    windows: torch.Tensor
    held_out: torch.Tensor
    documents: int
    eligible: int
    span_documents: bool


def sample_windows(
    tokenizer: Any,
    path: str | os.PathLike,
    seq_len: int,
    count: int,
    seed: int,
    held_out: int = 0,
) -> SampledWindows:
    """``count`` seeded windows: a random long document each, at a random offset.

    A document is drawn from those with more than ``seq_len`` tokens, uniformly
    and with replacement, and a window starts at a uniform offset in it. When no
    document is long enough, the documents are joined by a blank line and the
    windows drawn from the joined text (they then span documents; logged).
    ``held_out`` more windows come from text the others never see: the last
    tenth of the long documents (at least one), or of a single text's tokens.

    Raises:
        DataError: For a bad ``seq_len`` or ``count``, an unreadable file, or a
            corpus shorter than one window (two with ``held_out``).
    """
    import numpy as np
    import torch

    seq_len = _check_seq_len(seq_len)
    for name, value, least in (("window count", count, 1), ("held_out", held_out, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise DataError(f"{name} must be an integer >= {least}, got {value!r}")
    documents = read_documents(path)
    encoded = [_encode(tokenizer, document) for document in documents]
    eligible = [ids for ids in encoded if len(ids) > seq_len]
    span = not eligible
    if span:
        eligible = [_encode(tokenizer, DOCUMENT_SEPARATOR.join(documents))]
        logger.warning(
            "no document of %s is longer than %d tokens: calibration windows are "
            "drawn from the joined documents and span documents",
            path,
            seq_len,
        )
    train, held = _hold_out(eligible, seq_len, bool(held_out), path)
    rng = np.random.default_rng(seed)

    def draw(sources: list[list[int]], number: int) -> torch.Tensor:
        rows = []
        for _ in range(number):
            ids = sources[int(rng.integers(len(sources)))]
            start = int(rng.integers(len(ids) - seq_len + 1))
            rows.append(ids[start : start + seq_len])
        return torch.tensor(rows, dtype=torch.long).view(number, seq_len)

    windows = draw(train, count)
    return SampledWindows(
        windows,
        draw(held, held_out),
        len(documents),
        0 if span else len(eligible),
        span,
    )


def _hold_out(
    sources: list[list[int]], seq_len: int, hold: bool, path: str | os.PathLike
) -> tuple[list[list[int]], list[list[int]]]:
    """Split token lists into drawing sources and held-out ones (or none)."""
    total = sum(len(ids) for ids in sources)
    if not hold:
        if total < seq_len:
            raise DataError(
                f"{str(path)!r} has {total} tokens, fewer than one window of "
                f"seq_len = {seq_len}"
            )
        return sources, []
    if len(sources) > 1:
        cut = len(sources) - max(1, len(sources) // 10)
        return sources[:cut], sources[cut:]
    ids = sources[0]
    cut = len(ids) - max(seq_len, len(ids) // 10)
    if cut < seq_len:
        raise DataError(
            f"{str(path)!r} has {len(ids)} tokens, fewer than two windows of "
            f"seq_len = {seq_len} (one to prune on, one held out for validation)"
        )
    return [ids[:cut]], [ids[cut:]]
