"""Atomic file writes: a temporary file beside the target, fsync, then rename.

Every output file of icbs-opt goes through :func:`atomic_write` or
:func:`atomic_path`, so an interrupted or failed write leaves the previous file
(or none) behind, never a truncated one, and a symbolic link at the target is
refused rather than followed.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from icbs_opt.errors import DataError

__all__ = ["atomic_path", "atomic_write", "is_device"]


def _read_umask() -> int:
    # os.umask can only be read by setting it; done once, at import, before any
    # thread of ours could create a file while it is 0.
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


_UMASK = _read_umask()


def _file_mode(path: str) -> int:
    """The mode a new ``path`` gets: the old file's, else ``0o666`` less the umask."""
    with contextlib.suppress(OSError):
        return os.stat(path).st_mode & 0o777
    return 0o666 & ~_UMASK


def is_device(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a character device or a pipe (``/dev/null``, a FIFO).

    Such a target is written in place: it cannot be replaced by a rename.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)


def _refuse_symlink(path: str) -> None:
    if os.path.islink(path):
        raise DataError(f"output {path!r} is a symbolic link; give another path")


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path beside ``path``, renamed onto it on success.

    For writers that want a file name (``numpy.savez``, ``savefig``,
    safetensors ``save_file``). The temporary file is fsynced before the rename;
    on any exception it is removed and the previous ``path`` is left intact.
    Missing parent folders are created. A device or pipe (``/dev/null``) is
    written in place (:func:`is_device`).

    Raises:
        DataError: If ``path`` is a symbolic link (never followed or replaced).
        OSError: If the write fails (a full disk); its ``filename`` is ``path``.

    Example:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
        >>> with atomic_path(str(out)) as tmp:
        ...     _ = pathlib.Path(tmp).write_text("hi")
        >>> out.read_text()
        'hi'
    """
    _refuse_symlink(path)
    if is_device(path):
        yield path
        return
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    suffix = "".join(Path(path).suffixes[-1:])  # savez/savefig look at the suffix
    fd, tmp = tempfile.mkstemp(prefix=".icbs-tmp-", suffix=suffix, dir=parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:  # the writer may not have synced
            os.fsync(f.fileno())
        # After the writer: mkstemp's 0600, or a writer's own new file (safetensors
        # makes one), would hide the results from other users.
        os.chmod(tmp, _file_mode(path))
        _refuse_symlink(path)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename in (None, tmp):
            raise OSError(exc.errno, exc.strerror or str(exc), path) from exc
        raise


def atomic_write(
    path: str, write: Callable[[IO[Any]], Any], *, binary: bool = False
) -> None:
    """Write ``path`` atomically: ``write(f)`` into a temporary file, then rename.

    The temporary file lies in the same folder, is flushed and fsynced, then
    replaces ``path`` with :func:`os.replace`. If ``write`` raises (even
    ``KeyboardInterrupt``) the temporary file is removed and the previous
    ``path`` is left as it was.

    Args:
        path: The file to write; missing parent folders are created.
        write: Called with the open temporary file.
        binary: Open the file in binary mode instead of UTF-8 text.

    Raises:
        DataError: If ``path`` is a symbolic link (never followed or replaced).

    Example:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
        >>> atomic_write(str(out), lambda f: f.write("hi"))
        >>> out.read_text()
        'hi'
    """
    with atomic_path(path) as tmp:
        if binary:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
        else:
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                write(f)
                f.flush()


def json_default(value: Any) -> Any:
    """JSON fallback: numpy scalars and arrays as lists, anything else as text."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` with :func:`atomic_write`.

    Numpy values are written as lists and numbers (:func:`json_default`).
    """
    text = json.dumps(data, indent=2, default=json_default)
    atomic_write(os.fspath(path), lambda f: f.write(text + "\n"))
