"""The heap setting that returns freed tensor memory (icbs_opt.memory)."""

import subprocess
import sys

import pytest

from icbs_opt.memory import release_freed_memory

#: Whether a fresh 6 MiB tensor lies on glibc's heap (printed 1) or in a mapping
#: of its own (0), which is unmapped when the tensor is freed. The threshold starts
#: where glibc's own adjustment takes it after large frees (32 MiB); "set" then
#: applies ours (4 MiB).
CODE = """
import ctypes, sys
from icbs_opt.memory import release_freed_memory
assert ctypes.CDLL("libc.so.6").mallopt(-3, 32 << 20)
if sys.argv[1] == "set":
    assert release_freed_memory()
import torch
t = torch.ones(6 << 18)
ptr = t.data_ptr()
with open("/proc/self/maps") as f:
    heap = [line.split()[0] for line in f if line.rstrip().endswith("[heap]")]
lo, hi = (int(x, 16) for x in heap[0].split("-")) if heap else (0, 0)
print(int(lo <= ptr < hi))
"""


def on_heap(flag: str) -> bool:
    run = subprocess.run(
        [sys.executable, "-c", CODE, flag], capture_output=True, text=True, check=True
    )
    return run.stdout.strip() == "1"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_large_tensors_get_their_own_mapping():
    assert on_heap("raised")  # what glibc does once it has raised its threshold
    assert not on_heap("set")


def test_returns_whether_it_took_effect():
    assert isinstance(release_freed_memory(), bool)
