"""A stream file that exists only once it is complete, with its ``.chksum``.

:func:`write_stream_atomic` wraps a :class:`~vmbk.stream.writer.StreamWriter`
in the ``.partial`` / rename / ``.chksum`` protocol; see its docstring for
the order of operations and what a crash at each step leaves behind.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from vmbk.fsutil import PARTIAL, fsync_dir
from vmbk.stream.checksum import CHKSUM, write_checksum_file
from vmbk.stream.format import MAX_REQUEST_SIZE, StreamMeta
from vmbk.stream.writer import StreamWriter


def _unlink_quiet(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


@contextlib.contextmanager
def write_stream_atomic(
    path: str | os.PathLike[str],
    meta: StreamMeta,
    *,
    piece_size: int = MAX_REQUEST_SIZE,
    checksum_file: bool = True,
    fsync: bool = True,
    mode: int = 0o600,
) -> Iterator[StreamWriter]:
    """Write the stream at ``path`` so that it exists only once complete.

    Yields a :class:`StreamWriter` on ``<path>.partial``.  On a clean exit:

    1. the stream is finished (stop frame, trailer) and fsynced;
    2. the checksum goes to ``<path>.chksum.partial``, fsynced;
    3. a stale ``<path>.chksum`` (from an older file of the same name) is
       removed, so an old checksum can never be paired with new data;
    4. ``<path>.partial`` is renamed to ``<path>``: from here on the data
       file is complete, with or without a checksum;
    5. ``<path>.chksum.partial`` is renamed to ``<path>.chksum``; the
       directory is fsynced.

    A crash before 4 leaves only ``*.partial`` files: nothing looks
    complete.  A crash between 4 and 5 leaves a complete data file without
    ``.chksum`` (verify then skips it, as virtnbdrestore does) and a
    ``.chksum.partial`` that still names the right checksum; the stray
    ``*.partial`` makes virtnbdbackup (and vmbk) treat the directory as
    having a failed backup, which errs on the safe side.  The data file is
    never renamed before it is complete and synced, and the ``.chksum``
    never exists next to a data file it does not describe.

    On an exception the partial files are removed and the exception
    propagates.  virtnbdbackup itself renames the data and then writes
    ``.chksum`` in place (not atomically).
    """
    final = os.fspath(path)
    partial = f"{final}{PARTIAL}"
    chk = f"{final}{CHKSUM}"
    chk_partial = f"{chk}{PARTIAL}"
    writer = StreamWriter(partial, meta, piece_size=piece_size, mode=mode)
    try:
        yield writer
        writer.close(fsync=fsync)
        if checksum_file:
            write_checksum_file(final, writer.checksum, suffix=PARTIAL, mode=mode, fsync=fsync)
        _unlink_quiet(chk)
        os.rename(partial, final)
        if checksum_file:
            os.rename(chk_partial, chk)
        if fsync:
            fsync_dir(Path(os.path.abspath(final)).parent)
    except BaseException:
        writer.abort()
        _unlink_quiet(partial)
        _unlink_quiet(chk_partial)
        raise
