"""Process memory: hand freed tensor memory back to the system at once.

A pass records hundreds of megabytes of layer inputs and output gradients in
tensors of one to a few tens of megabytes, frees them, and records again. glibc's
``malloc`` raises its mmap threshold as such blocks are freed and then serves them
from the heap, which it rarely gives back: on SmolLM2-135M with 210 blocks a pass
this fragmentation cost 1.4 GiB of peak RSS (5.64 against 4.25 GiB). A fixed
threshold sends every large block to its own mapping, released when it is freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

#: Allocations at least this large get their own mapping (bytes).
MMAP_THRESHOLD = 4 * 2**20

_M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h


def release_freed_memory(threshold: int = MMAP_THRESHOLD) -> bool:
    """Make glibc serve allocations of ``threshold`` bytes or more by mmap.

    Process-wide and lasting; the CLI's ``prune`` and ``evaluate`` call it. Does
    nothing on systems without glibc.

    Returns:
        Whether the setting took effect.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        ok = False
    logger.debug("mmap threshold %d bytes: %s", threshold, "set" if ok else "not set")
    return ok
