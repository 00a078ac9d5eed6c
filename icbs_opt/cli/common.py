"""What every ``icbs-opt`` command shares: user errors, flags, outputs, interrupts."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from icbs_opt.atomic import atomic_path as atomic_path  # re-exported
from icbs_opt.atomic import atomic_write_json, is_device, json_default
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


#: Exit status of bad input, and of an output that could not be written.
EXIT_USER_ERROR = EXIT_WRITE_FAILED = 2
#: Exit status after Ctrl-C (128 + SIGINT) and after SIGTERM (128 + SIGTERM).
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
#: The executor failed mid-run; the finished steps' outputs were written.
EXIT_EXECUTOR_FAILED = 3


#: Exit status after each signal.
EXIT_STATUS = {"SIGINT": EXIT_INTERRUPTED, "SIGTERM": EXIT_TERMINATED}


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM while :class:`Interrupts` are installed.

    A ``KeyboardInterrupt``, so that everything that stops cleanly on Ctrl-C
    (native solves, ``compare``'s partial results) stops the same way.
    """


def interrupt_status(exc: BaseException) -> int:
    """The exit status for an interrupt: 143 after SIGTERM, else 130."""
    return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED


class Interrupts:
    """What SIGINT (Ctrl-C) and SIGTERM do while :meth:`installed` holds.

    A signal raises in the main thread: ``KeyboardInterrupt`` for SIGINT,
    :class:`Terminated` for SIGTERM. With ``stop_first`` the first signal only
    sets :attr:`received` and prints ``notice`` (a long loop asks and stops where
    its work is whole: ``prune`` after the step); a second one raises as above
    unless :attr:`abandonable` has been set to False.

    Args:
        stop_first: Whether the first signal asks to stop instead of raising.
        notice: Printed on stderr after the first signal (with ``stop_first``).
    """

    def __init__(self, *, stop_first: bool = False, notice: str = "") -> None:
        self.stop_first = stop_first
        self.notice = notice
        self.received: str | None = None
        self.abandonable = True

    def _handle(self, signum: int, frame: Any) -> None:
        if self.stop_first and self.received is None:
            self.received = signal.Signals(signum).name
            print(f"icbs-opt: {self.received}: {self.notice}", file=sys.stderr)
            return
        if self.stop_first and not self.abandonable:
            return
        raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self) -> Iterator[Interrupts]:
        """Handle SIGINT and SIGTERM within the block.

        The previous handlers come back on exit. Outside the main thread (where
        Python cannot set handlers) it does nothing.
        """
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        kinds = (signal.SIGINT, signal.SIGTERM)
        previous = {kind: signal.signal(kind, self._handle) for kind in kinds}
        try:
            yield self
        finally:
            for kind, handler in previous.items():
                signal.signal(kind, handler)

    @property
    def exit_status(self) -> int:
        """130 after a first SIGINT, 143 after a first SIGTERM, else 0."""
        return EXIT_STATUS.get(self.received or "", 0)


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


def write_json(path: str, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path``; ``-`` means standard output.

    A file is written atomically (see :func:`atomic_write`), so an interrupted
    write never leaves truncated JSON behind.
    """
    if path == "-":
        print(json.dumps(data, indent=2, default=json_default))
        return
    atomic_write_json(path, data)


def check_output(
    path: str, *, folder: bool, ours: Callable[[Path], bool] | None = None
) -> None:
    """Fail now, not after the run, if ``path`` cannot be written.

    Fast, and nothing it makes stays: the missing folders on the way to ``path``
    are created and a file is made in the deepest one (which proves it writable,
    even as root on a read-only mount or in ``/proc``), then all are removed.
    ``-`` (standard output) is accepted for a file, and so is a device or a pipe
    (``/dev/null``), which is written in place.

    Args:
        path: The output file or folder.
        folder: Whether ``path`` is a folder (checkpoints, harvest) or a file.
        ours: For an existing file output, whether it may be replaced; by default
            any existing regular file may.

    Raises:
        DataError: A symbolic link, a file where a folder is wanted or the other
            way round, a file that is not ours, or a folder that cannot be made
            or written.

    Example:
        >>> check_output("-", folder=False)
    """
    if path == "-" and not folder:
        return
    if not path.strip() or path == "-":
        what = "folder needs a name" if folder else "file needs a name or '-'"
        raise DataError(f"an output {what}, got {path!r}")
    target = Path(path)
    if target.is_symlink():
        raise DataError(f"output {path!r} is a symbolic link; give another path")
    if folder and target.exists() and not target.is_dir():
        raise DataError(f"output folder {path!r} is an existing file")
    if not folder and target.is_dir():
        raise DataError(f"output file {path!r} is a directory")
    if not folder and is_device(target):
        return
    if not folder and target.exists():
        if not target.is_file():
            raise DataError(f"output file {path!r} is not a regular file")
        if ours is not None and not ours(target):
            raise DataError(
                f"output file {path!r} exists and was not written by icbs-opt; "
                "give another path or remove it"
            )
    home = target if folder else target.parent
    parent = home
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise DataError(f"cannot write {path!r}: {str(parent)!r} is not writable")
    _prove_writable(path, home)


def _prove_writable(path: str, home: Path) -> None:
    """Create ``home`` and a file in it, then remove what was created."""
    made: list[Path] = []
    try:
        for part in reversed([home, *home.parents]):
            if not part.exists():
                part.mkdir()
                made.append(part)
        fd, probe = tempfile.mkstemp(prefix=".icbs-tmp-", dir=home)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        what = f"cannot create {str(exc.filename)!r}: " if exc.filename else ""
        raise DataError(f"cannot write {path!r}: {what}{os_reason(exc)}") from None
    finally:
        for part in reversed(made):
            with contextlib.suppress(OSError):
                part.rmdir()


def os_reason(exc: BaseException) -> str:
    """The reason of a failed write in one line (``No space left on device``)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def write_errors() -> tuple[type[BaseException], ...]:
    """The exceptions of a failed write: the OS's, ours and safetensors'."""
    from safetensors import SafetensorError

    return (OSError, DataError, SafetensorError)


def write_each(writes: Sequence[tuple[str, Callable[[], Any]]]) -> list[str]:
    """Do every ``(path, write)``; a failed one says so in one line naming its path.

    A failure (a full disk, say) does not stop the writes after it. The path
    named is the file that failed when the error knows it (a write of a folder's
    files), else ``path``.

    Returns:
        The paths whose write failed.
    """
    failed = []
    for path, write in writes:
        try:
            write()
        except write_errors() as exc:
            where = getattr(exc, "filename", None) or path
            print(f"icbs-opt: error: cannot write {str(where)!r}: {os_reason(exc)}",
                  file=sys.stderr)  # fmt: skip
            failed.append(path)
    return failed


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
