"""Keep freed heap memory for reuse instead of handing it back to the kernel.

python-lz4 returns every compressed frame as a new ``bytes`` of about the
request size (512 KiB), made by copying out of a scratch buffer of the
same size.  With glibc's defaults, blocks that large come from mmap, or
from a heap whose free top is given back as soon as twice the last such
block is free; either way the next frame lands on fresh pages and pays a
page fault per 4 KiB.  In a compressed full backup of 3.5 GB that was
~0.9 s of 8 s of CPU (bench/README.md).

Fixing glibc's mmap threshold at 4 MiB and its trim threshold at 64 MiB
(both must be set: setting either one alone also stops glibc from
adapting the other, which is slower than the defaults) keeps the memory
of freed frames in the heap, where the next frames reuse it.  The process
then holds what its frames in flight need at the peak, a few MiB, plus up
to 64 MiB of free heap.  Process-wide, hence done once, and only where
compression is used.  Not glibc (musl, macOS): nothing happens.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger("vmbk.heap")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 * 1024 * 1024
TRIM_THRESHOLD = 64 * 1024 * 1024

_done = False


def keep_freed_memory() -> bool:
    """Set glibc's thresholds (once); False where that is not possible."""
    global _done
    if _done:
        return True
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _done = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not _done:
        log.debug("mallopt refused the heap thresholds")
    return _done
