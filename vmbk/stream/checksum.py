"""The adler32 of stream files, as fast as the machine allows.

virtnbdbackup's ``.chksum`` is zlib's adler32 (seed 1) of the whole file;
computing it is a fifth of vmbk's CPU on a full backup (bench/README.md).
zlib-ng computes the same value with SIMD, 4-5x faster than zlib here;
it is a dependency, and plain zlib is the fallback where it is missing.

:func:`adler32_combine` joins the checksums of two pieces into the
checksum of the pieces end to end, so parts of a file can be summed on
several threads (each from seed 1) and joined in file order.
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

_MOD = 65521  # the largest prime below 2**16


def adler32_combine(first: int, second: int, second_len: int) -> int:
    """adler32 of X + Y from ``first`` = adler32(X), ``second`` = adler32(Y).

    Both sums seeded with 1, as zlib's.  adler32 keeps A = 1 + the sum of
    the bytes and B = the sum of the A values after each byte (mod 65521).
    Over X + Y, every A after a byte of Y is larger by A(X) - 1 than Y's own,
    so::

        A = A(X) + A(Y) - 1
        B = B(X) + B(Y) + len(Y) * (A(X) - 1)

    The same arithmetic as zlib's adler32_combine(), which Python does not
    expose.
    """
    a1, b1 = first & 0xFFFF, first >> 16
    a2, b2 = second & 0xFFFF, second >> 16
    a = (a1 + a2 - 1) % _MOD
    b = (b1 + b2 + second_len * (a1 - 1)) % _MOD
    return (b << 16) | a
