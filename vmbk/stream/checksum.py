"""The adler32 of stream files and their ``.chksum`` files.

virtnbdbackup's ``<file>.chksum`` holds zlib's adler32 (seed 1) of the
whole file in decimal, no newline; computing it is a fifth of vmbk's CPU
on a full backup (bench/README.md).  zlib-ng computes the same value with
SIMD, 4-5x faster than zlib here; it is a dependency, and plain zlib is
the fallback where it is missing.

:func:`adler32_combine` joins the checksums of two pieces into the
checksum of the pieces end to end, so parts of a file can be summed on
several threads (each from seed 1) and joined in file order.
:func:`file_checksum` sums a file, :func:`read_checksum_file`,
:func:`write_checksum_file` and :func:`verify_checksum` handle the
``.chksum`` beside it (the order in which a backup writes the two is
:mod:`vmbk.stream.atomic`'s).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from typing import Any

from vmbk.stream.format import StreamError

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


# -- files ------------------------------------------------------------------

#: The suffix of a stream's checksum file.
CHKSUM = ".chksum"


def file_checksum(
    path: str | os.PathLike[str],
    *,
    buffer_size: int = 8 << 20,
    check: Callable[[], None] | None = None,
) -> int:
    """adler32 (zlib, seed 1) of the whole file, as virtnbdbackup's ``.chksum``.

    ``check`` is called before every buffer is read; it raises to stop
    the sum early (a restore that failed meanwhile).
    """
    p = os.fspath(path)
    view = memoryview(bytearray(buffer_size))
    value, pos = 1, 0
    try:
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise StreamError(p, 0, f"cannot open for the checksum: {e.strerror or e}") from None
    try:
        while True:
            if check is not None:
                check()
            try:
                n = os.readv(fd, [view])
            except OSError as e:
                raise StreamError(p, pos, f"reading for the checksum: {e.strerror or e}") from None
            if not n:
                return value
            value = adler32(view[:n], value)
            pos += n
    finally:
        os.close(fd)


def read_checksum_file(path: str | os.PathLike[str]) -> int | None:
    """The value in ``<path>.chksum``, or None if there is none."""
    chk = f"{os.fspath(path)}{CHKSUM}"
    try:
        with open(chk, "rb") as f:
            raw = f.read(64)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StreamError(chk, 0, f"cannot read checksum file: {e.strerror}") from e
    text = raw.strip()
    if not text.isdigit() or int(text) >= 1 << 32:
        raise StreamError(chk, 0, f"checksum file does not hold an adler32 value: {raw[:40]!r}")
    return int(text)


def write_checksum_file(
    path: str | os.PathLike[str],
    checksum: int,
    *,
    suffix: str = "",
    mode: int = 0o600,
    fsync: bool = False,
) -> None:
    """Write ``<path>.chksum<suffix>`` as virtnbdbackup does: the decimal adler32, no newline."""
    fd = os.open(
        f"{os.fspath(path)}{CHKSUM}{suffix}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode
    )
    try:
        os.write(fd, str(checksum).encode("ascii"))
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def verify_checksum(
    path: str | os.PathLike[str],
    *,
    required: bool = False,
    buffer_size: int = 8 << 20,
    check: Callable[[], None] | None = None,
) -> bool:
    """Check ``path`` against ``<path>.chksum``, as ``virtnbdrestore -o verify``.

    True when it matches; False when there is no ``.chksum`` (unless
    ``required``); StreamError on a mismatch.  ``buffer_size``, ``check``:
    as for :func:`file_checksum`.
    """
    stored = read_checksum_file(path)
    if stored is None:
        if required:
            raise StreamError(f"{os.fspath(path)}{CHKSUM}", 0, "checksum file is missing")
        return False
    actual = file_checksum(path, buffer_size=buffer_size, check=check)
    if actual != stored:
        size = os.path.getsize(path)
        raise StreamError(
            path,
            0,
            f"adler32 of the file's {size} bytes is {actual}, its .chksum says {stored}",
        )
    return True
