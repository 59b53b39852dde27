"""A stream file that exists only once it is complete, with its ``.chksum``.

:func:`write_stream_atomic` wraps a :class:`~vmbk.stream.writer.StreamWriter`
in the ``.partial`` / ``.chksum`` / rename protocol.  The order of the
writes is the durability rule every reader relies on::

    1. <f>.partial          the stream, finished (stop frame, trailer), fsynced
    2. <f>.chksum.partial   its adler32, fsynced
    3. rename <f>.chksum.partial -> <f>.chksum, fsync the directory
    4. rename <f>.partial -> <f>,               fsync the directory

The rename of the data file is the commit marker: a ``<f>`` exists only
with the ``<f>.chksum`` that describes it, so a data file without its
``.chksum`` in a chain whose other files have one was damaged or tampered
with, never left by a crash (`vmbk.tree.points` then calls it
unverifiable).  A kill at any instant leaves one of:

* before 3: ``*.partial`` files only: nothing looks complete;
* between 3 and 4: ``<f>.chksum`` beside ``<f>.partial``: the partial
  marks an interrupted backup (the planner archives or cleans it, the
  listing flags it), the lone ``.chksum`` is a stray of an unfinished
  write (`vmbk.tree.scan` lists it, and the next backup of that name
  replaces it);
* after 4: the complete pair.

The directory is synced between the renames so that a power cut cannot
keep the second and lose the first.  When ``<f>`` already exists (a file
of the same name written again) its old ``.chksum`` is replaced at 3: a
crash before 4 then pairs the old data with the new checksum, which
verify and restore report as a mismatch -- loud, never silent.

virtnbdbackup (1.9.40 and later) renames the data first and then writes
``.chksum`` in place; earlier versions write no ``.chksum`` at all.
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

    Yields a :class:`StreamWriter` on ``<path>.partial``; on a clean exit
    the stream is finished and committed in the order the module
    docstring gives.  ``checksum_file=False`` writes no ``.chksum`` (and
    removes a stale one before the data is renamed).  On an exception the
    partial files, and a ``.chksum`` already renamed for the data that
    never came, are removed and the exception propagates.
    """
    final = os.fspath(path)
    partial = f"{final}{PARTIAL}"
    chk = f"{final}{CHKSUM}"
    chk_partial = f"{chk}{PARTIAL}"
    directory = Path(os.path.abspath(final)).parent
    writer = StreamWriter(partial, meta, piece_size=piece_size, mode=mode)
    stray_chk = False  # a .chksum in place whose data is not (yet)
    committed = False
    try:
        yield writer
        writer.close(fsync=fsync)
        if checksum_file:
            write_checksum_file(final, writer.checksum, suffix=PARTIAL, mode=mode, fsync=fsync)
            os.rename(chk_partial, chk)
            stray_chk = True
        else:
            _unlink_quiet(chk)
        if fsync:
            fsync_dir(directory)
        os.rename(partial, final)
        committed = True
        if fsync:
            fsync_dir(directory)
    except BaseException:
        writer.abort()
        _unlink_quiet(partial)
        _unlink_quiet(chk_partial)
        if stray_chk and not committed:
            _unlink_quiet(chk)
        raise
