"""How the process's C allocator (glibc malloc) keeps freed memory for reuse.

Every instance the node reads or receives passes through buffers of hundreds of KB: the
blob RocksDB returns, the bytes zstd decompresses into, the PDUs of a C-STORE. glibc
serves such a buffer from its heap only while it is below the mmap threshold (128 KB at
first, raised as big buffers are freed) and hands the top of a heap back to the kernel
once more than the trim threshold (twice that) lies free there. With the defaults, a
stream of 0.5 MB instances keeps returning memory and faulting it in again, page by page:
on this project's 2-core VM that cost more CPU than the copies themselves (rocksdict's
get of 80 CT blobs, 36 MB: 23 ms of CPU by default, 5 ms with the memory kept; the WADO-RS
study retrieve in bench/README.md, "DICOMweb").

`retain_freed_memory` sets both thresholds once (`mallopt`, glibc's public interface):
buffers below `MMAP_THRESHOLD_BYTES` come from the heap, and each heap keeps up to
`trim_threshold_bytes` free before it gives any back. The cost is resident memory: each
malloc arena (one per busy thread, at most 8 per core) may keep that much unused.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import logging
import platform

log = logging.getLogger(__name__)

# glibc's malloc.h: mallopt parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Buffers up to this size come from the heap (instances of a few MB: CT, MR, CR slices);
# larger ones are still mapped on their own, so that growing one (a big instance's
# compressed copy) is an mremap, not a copy beside the old buffer, and freeing it gives
# it back at once. At 32 MiB, a 24 MB spooled C-STORE grew the node's peak memory by 4.4x
# the instance, over the bound of tests/integration/test_large_instance.py (2x + 48 MiB).
MMAP_THRESHOLD_BYTES = 4 * 1024**2


class MallocTuning(enum.Enum):
    SET = "set"                  # Both thresholds set.
    OFF = "off"                  # trim_threshold_bytes 0: glibc's defaults kept.
    NOT_GLIBC = "not-glibc"      # Another C library (musl, macOS): nothing to set.
    REFUSED = "refused"          # mallopt answered 0 (a value it does not take).


def retain_freed_memory(trim_threshold_bytes: int) -> MallocTuning:
    """Keep up to `trim_threshold_bytes` of freed memory per malloc arena, and serve
    buffers below MMAP_THRESHOLD_BYTES from the heap (0: leave glibc's defaults)."""
    if trim_threshold_bytes <= 0:
        return MallocTuning.OFF
    if platform.libc_ver()[0] != "glibc":
        log.info("memory.malloc.unchanged reason=not-glibc")
        return MallocTuning.NOT_GLIBC
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    mmap_threshold = min(MMAP_THRESHOLD_BYTES, trim_threshold_bytes)
    trim = min(trim_threshold_bytes, 2**31 - 1)  # mallopt takes an int.
    if not (mallopt(_M_MMAP_THRESHOLD, mmap_threshold) and mallopt(_M_TRIM_THRESHOLD, trim)):
        log.warning("memory.malloc.refused trim_threshold_bytes=%d mmap_threshold_bytes=%d", trim, mmap_threshold)
        return MallocTuning.REFUSED
    log.info("memory.malloc.set trim_threshold_bytes=%d mmap_threshold_bytes=%d", trim, mmap_threshold)
    return MallocTuning.SET
