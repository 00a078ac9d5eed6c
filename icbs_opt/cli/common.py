"""What every ``icbs-opt`` command shares: user errors, key=value flags, JSON."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from icbs_opt.errors import (
    BackendError,
    BackendUnavailable,
    DataError,
    ProblemError,
    PruningError,
)

#: Exceptions reported as one line with exit status 2.
USER_ERRORS = (
    BackendError,
    BackendUnavailable,
    DataError,
    ProblemError,
    PruningError,
    OSError,
)


def parse_key_values(items: Sequence[str] | None, flag: str) -> dict[str, str]:
    """Turn ``["a=1", "b=x"]`` into ``{"a": "1", "b": "x"}``.

    Raises:
        BackendError: For an item without ``=``.
    """
    out: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BackendError(f"{flag} expects key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def add_backend_option_flag(parser: argparse.ArgumentParser) -> None:
    """Add the repeatable ``--backend-option KEY=VALUE`` flag."""
    parser.add_argument(
        "--backend-option",
        action="append",
        metavar="KEY=VALUE",
        help="a backend option (repeatable); see `icbs-opt backends`",
    )


def json_default(value: Any) -> Any:
    """JSON fallback for numpy scalars and arrays in ``info``."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def write_json(path: str, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path``; ``-`` means standard output.

    A file is written atomically (a temporary file in the same folder, then a
    rename), so an interrupted write never leaves truncated JSON behind.
    """
    text = json.dumps(data, indent=2, default=json_default)
    if path == "-":
        print(text)
        return
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def add_json_flag(parser: argparse.ArgumentParser, what: str) -> None:
    """Add ``--json FILE`` (``-``: standard output), the same for every command."""
    parser.add_argument(
        "--json", metavar="FILE", help=f"write {what} as JSON to FILE ('-': stdout)"
    )


def progress_bar(total: int | None, desc: str, unit: str, *, enabled: bool) -> Any:
    """A tqdm bar on stderr, shown only when ``enabled`` and stderr is a terminal."""
    from tqdm import tqdm

    show = enabled and sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, disable=not show)


def hide_loading_bars() -> None:
    """Switch off the model-loading bars of transformers and huggingface_hub."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when they are imported
    if "transformers" in sys.modules:  # already imported: tell it directly
        sys.modules["transformers"].utils.logging.disable_progress_bar()
