"""node/memory.py: glibc keeps freed instance-sized buffers once the thresholds are set."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

import pytest

from pacsnode.node.config import ConfigError, NodeConfig
from pacsnode.node.memory import MallocTuning, retain_freed_memory

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _main_arena_free_bytes() -> int:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.mallinfo2.restype = _Mallinfo2
    return int(libc.mallinfo2().fordblks)


def test_zero_leaves_the_defaults() -> None:
    assert retain_freed_memory(0) is MallocTuning.OFF


@glibc
def test_a_freed_buffer_below_the_threshold_stays_in_the_heap() -> None:
    assert retain_freed_memory(128 * 1024**2) is MallocTuning.SET
    size = 3 * 1024**2  # Above glibc's first mmap threshold (128 KB), below ours (4 MiB).
    buffer = bytearray(size)  # Allocated on this (the main) thread: the main arena.
    buffer[::4096] = b"\x01" * len(range(0, size, 4096))  # Touch every page.
    del buffer
    # Kept as free heap memory for the next buffer, not unmapped or trimmed away.
    assert _main_arena_free_bytes() >= size


def test_config_default_and_bounds() -> None:
    assert NodeConfig().malloc_trim_threshold_bytes == 128 * 1024**2
    assert NodeConfig(malloc_trim_threshold_bytes=0).malloc_trim_threshold_bytes == 0
    with pytest.raises(ConfigError, match="malloc_trim_threshold_bytes must be >= 0"):
        NodeConfig(malloc_trim_threshold_bytes=-1)
