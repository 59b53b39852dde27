"""The adler32 of stream files, as fast as the machine allows.

virtnbdbackup's ``.chksum`` is zlib's adler32 (seed 1) of the whole file;
computing it is a fifth of vmbk's CPU on a full backup (bench/README.md).
zlib-ng computes the same value with SIMD, 4-5x faster than zlib here;
it is a dependency, and plain zlib is the fallback where it is missing.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

adler32: Callable[[Any, int], int]
try:
    from zlib_ng import zlib_ng as _ng

    adler32 = _ng.adler32
    IMPLEMENTATION = "zlib-ng"
except ImportError:  # pragma: no cover - depends on the installation
    adler32 = zlib.adler32
    IMPLEMENTATION = "zlib"
