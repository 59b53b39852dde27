"""Writing virtnbdbackup sparse streams.

:class:`StreamWriter` produces the exact bytes virtnbdbackup produces for
the same extents (meta JSON aside: its ``date`` differs), so virtnbdrestore
restores vmbk's files and vice versa.  It is built for speed:

* an uncompressed data frame is one ``os.writev(header, payload)``: the
  payload memoryview goes to the kernel untouched, no copy, no join; the
  CRLF that ends the frame and small headers (``zero`` frames) are queued
  and go out with the next writev;
* the adler32 of the file is kept as a running value over everything
  written, so the ``.chksum`` file (virtnbdbackup >= 1.9.40 writes one,
  ``virtnbdrestore -o verify`` checks it) costs no second pass; for large
  payloads it is computed on a helper thread while the kernel copies the
  same buffer.

Compressed frames follow virtnbdbackup exactly (the details are part of
the format, since virtnbdrestore depends on them):

* each piece is one ``lz4.frame`` frame with content and block checksums
  and the content size stored in its header;
* a frame shorter than :data:`MAX_REQUEST_SIZE` is one piece and its
  trailer entry is the compressed size, an int;
* a frame of :data:`MAX_REQUEST_SIZE` or more is cut into pieces of
  ``piece_size`` (at most MAX_REQUEST_SIZE, since virtnbdrestore writes
  each decompressed piece in one NBD request) and its trailer entry is
  ``{"<total compressed size>": [piece sizes]}``.  virtnbdrestore picks the
  entry's form from the frame length with the same ``>=`` test, so the
  threshold cannot be changed.

Frames must be written in increasing, non-overlapping disk order and
``dataSize`` of the meta must equal the bytes given to :meth:`write_data`:
the meta goes first in the file, so it cannot be fixed up afterwards.
Breaking either rule raises ``ValueError`` (a programming error, not bad
input).

:func:`write_stream_atomic` adds the ``.partial`` / rename / ``.chksum``
protocol, see its docstring for the order of operations.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import lz4.frame

from vmbk.errors import StorageError
from vmbk.fsutil import fsync_dir
from vmbk.stream.checksum import adler32
from vmbk.stream.format import (
    KIND_COMP,
    KIND_DATA,
    KIND_META,
    KIND_STOP,
    KIND_ZERO,
    MAX_REQUEST_SIZE,
    TERM,
    StreamMeta,
    pack_header,
)

Buffer = bytes | bytearray | memoryview

#: Flush queued small writes (headers, CRLFs) past this many bytes / items.
_PENDING_BYTES = 64 * 1024
_PENDING_ITEMS = 256
#: Payloads from this size on are checksummed on a helper thread.
_PARALLEL_CHECKSUM_MIN = 256 * 1024

_STOP_HEADER = pack_header(KIND_STOP, 0, 0)


def _as_bytes_view(data: Buffer) -> memoryview:
    mv = memoryview(data)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")  # raises TypeError for non-contiguous buffers
    return mv


def compress_piece(data: Buffer, level: int) -> bytes:
    """One lz4 frame, with virtnbdbackup's settings."""
    out: bytes = lz4.frame.compress(
        data,
        compression_level=level,
        content_checksum=True,
        block_checksum=True,
        store_size=True,
    )
    return out


class StreamWriter:
    """Write one sparse stream to a path or a binary file object.

    ``target`` as a path is created/truncated and written with ``os.writev``
    (zero-copy); as a file object it is written with ``.write()`` and left
    open.  The checksum then covers only what this writer wrote.
    """

    def __init__(
        self,
        target: str | os.PathLike[str] | BinaryIO,
        meta: StreamMeta,
        *,
        piece_size: int = MAX_REQUEST_SIZE,
        mode: int = 0o600,
    ) -> None:
        if meta.stream_version not in (1, 2):
            raise ValueError(f"cannot write stream version {meta.stream_version}")
        if meta.stream_version == 1 and meta.compressed not in (False, None):
            raise ValueError("stream version 1 cannot be compressed")
        if meta.stream_version == 2 and meta.disk_format is None:
            raise ValueError("version 2 meta needs diskFormat (virtnbdrestore reads it)")
        if not 0 < piece_size <= MAX_REQUEST_SIZE:
            raise ValueError(f"piece_size must be in (0, {MAX_REQUEST_SIZE}]")
        self.meta = meta
        self.piece_size = piece_size
        self._level = meta.compression_level if meta.is_compressed else None
        self._fd: int | None = None
        self._file: BinaryIO | None = None
        if isinstance(target, (str, os.PathLike)):
            self.path = os.fspath(target)
            try:
                self._fd = os.open(
                    self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode
                )
            except OSError as e:
                raise StorageError(f"{self.path}: cannot create stream: {e.strerror}") from e
        else:
            self._file = target
            self.path = str(getattr(target, "name", "<stream>"))
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._checksum = 1  # zlib.adler32's seed, as virtnbdbackup
        self._written = 0
        self._next_offset = 0
        self._data_size = 0
        self._stored_size = 0
        self._frames = 0
        self._trailer: list[int | dict[str, list[int]]] | None = (
            [] if self._level is not None else None
        )
        self._closed = False
        self._aborted = False
        self._pool: ThreadPoolExecutor | None = None
        payload = meta.to_json()
        self._queue(pack_header(KIND_META, 0, len(payload)))
        self._queue(payload)
        self._queue(TERM)

    # -- public properties ---------------------------------------------------

    @property
    def checksum(self) -> int:
        """adler32 (seed 1) of all bytes written so far; of the file after close()."""
        if self._pending:
            raise RuntimeError("checksum read with unflushed data; call close() first")
        return self._checksum

    @property
    def data_size(self) -> int:
        """Sum of the lengths of the data frames written (the meta's dataSize)."""
        return self._data_size

    @property
    def stored_size(self) -> int:
        """Payload bytes of the data frames in the file (compressed size if so)."""
        return self._stored_size

    @property
    def size(self) -> int:
        """Bytes written to the file so far (its size after close())."""
        return self._written + self._pending_bytes

    @property
    def frames(self) -> int:
        """Number of data and zero frames written."""
        return self._frames

    @property
    def closed(self) -> bool:
        return self._closed

    # -- frames ----------------------------------------------------------------

    def _check_range(self, offset: int, length: int) -> None:
        if self._closed:
            raise ValueError(f"{self.path}: stream is closed")
        if length <= 0:
            raise ValueError(f"{self.path}: empty frame at offset {offset}")
        if offset < self._next_offset:
            raise ValueError(
                f"{self.path}: frame at offset {offset} overlaps or precedes the "
                f"previous one (which ended at {self._next_offset}); frames must be "
                "written in increasing order"
            )
        if offset + length > self.meta.virtual_size:
            raise ValueError(
                f"{self.path}: frame {offset}+{length} ends past virtualSize "
                f"{self.meta.virtual_size}"
            )
        self._next_offset = offset + length
        self._frames += 1

    def write_data(self, offset: int, data: Buffer) -> int:
        """Write a data frame for ``data`` at disk ``offset``; returns stored bytes.

        Uncompressed, ``data`` is handed to the kernel as is (a memoryview
        into an NBD read buffer costs no copy).
        """
        mv = _as_bytes_view(data)
        length = mv.nbytes
        self._check_range(offset, length)
        header = pack_header(KIND_DATA, offset, length)
        if self._level is None:
            self._queue(header)
            self._write_now(mv)
            stored = length
        else:
            self._queue(header)
            if length >= MAX_REQUEST_SIZE:
                sizes = []
                for start in range(0, length, self.piece_size):
                    piece = compress_piece(mv[start : start + self.piece_size], self._level)
                    sizes.append(len(piece))
                    self._write_now(piece)
                stored = sum(sizes)
                assert self._trailer is not None
                self._trailer.append({str(stored): sizes})
            else:
                piece = compress_piece(mv, self._level)
                stored = len(piece)
                self._write_now(piece)
                assert self._trailer is not None
                self._trailer.append(stored)
        self._queue(TERM)
        self._data_size += length
        self._stored_size += stored
        return stored

    def write_zero(self, offset: int, length: int) -> None:
        """Write a zero frame: ``length`` bytes at ``offset`` read as zeroes.

        virtnbdbackup writes them only in full/copy backups (virtnbdrestore
        skips them); vmbk also writes them in incrementals for ranges that
        became zero since the parent, and vmbk-restore applies them.
        """
        self._check_range(offset, length)
        self._queue(pack_header(KIND_ZERO, offset, length))
        if self._pending_bytes >= _PENDING_BYTES or len(self._pending) >= _PENDING_ITEMS:
            self._flush()

    def close(self, *, fsync: bool = False) -> None:
        """Write the stop frame (and the compression trailer) and close.

        Raises ``ValueError`` if the data frames do not add up to the
        meta's dataSize (the file is then left without a stop frame), and
        if the writer was aborted (by :meth:`abort` or a failed write).
        """
        if self._aborted:
            raise ValueError(f"{self.path}: stream was aborted, it is incomplete")
        if self._closed:
            return
        if self._data_size != self.meta.data_size:
            self.abort()
            raise ValueError(
                f"{self.path}: data frames sum to {self._data_size} bytes but the "
                f"meta announced dataSize {self.meta.data_size}"
            )
        self._queue(_STOP_HEADER)
        if self._trailer is not None:
            trailer = json.dumps(self._trailer).encode()
            self._queue(trailer)
            self._queue(TERM)
            self._queue(pack_header(KIND_COMP, 0, len(trailer)))
        self._flush()
        try:
            if self._fd is not None:
                if fsync:
                    os.fsync(self._fd)
            elif self._file is not None:
                self._file.flush()
                if fsync:
                    os.fsync(self._file.fileno())
        except OSError as e:
            self.abort()
            raise StorageError(f"{self.path}: finishing stream: {e.strerror or e}") from e
        self._release()

    def abort(self) -> None:
        """Stop writing and close the file as it is (an incomplete stream)."""
        if not self._closed:
            self._aborted = True
        self._pending.clear()
        self._pending_bytes = 0
        self._release()

    def _release(self) -> None:
        self._closed = True
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.shutdown(wait=True)
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> StreamWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- output ----------------------------------------------------------------

    def _queue(self, small: bytes) -> None:
        self._pending.append(small)
        self._pending_bytes += len(small)

    def _flush(self) -> None:
        if self._pending:
            self._write_now(None)

    def _write_now(self, payload: Buffer | None) -> None:
        """Write the queued small buffers, then ``payload``, in one go.

        The adler32 of a large payload runs on a helper thread while the
        kernel copies the same buffer (both release the GIL), so the
        checksum costs next to no wall time on two or more cores.
        """
        bufs: list[Buffer] = list(self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        cs = self._checksum
        total = 0
        for b in bufs:
            cs = adler32(b, cs)
            total += len(b)
        pending_sum: Future[int] | None = None
        if payload is not None:
            n = payload.nbytes if isinstance(payload, memoryview) else len(payload)
            total += n
            bufs.append(payload)
            if n >= _PARALLEL_CHECKSUM_MIN:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(1, thread_name_prefix="vmbk-adler32")
                pending_sum = self._pool.submit(adler32, payload, cs)
            else:
                cs = adler32(payload, cs)
        try:
            try:
                if self._fd is not None:
                    _writev_all(self._fd, bufs)
                elif self._file is not None:
                    for b in bufs:
                        _write_all(self._file, b)
                else:
                    raise ValueError(f"{self.path}: stream is closed")
            finally:
                if pending_sum is not None:
                    cs = pending_sum.result()  # also on error: never leave it running
        except OSError as e:
            self.abort()
            raise StorageError(
                f"{self.path}: writing at byte {self._written}: {e.strerror or e}"
            ) from e
        self._checksum = cs
        self._written += total


def _writev_all(fd: int, bufs: list[Buffer]) -> None:
    views = [memoryview(b).cast("B") for b in bufs if len(b)]
    while views:
        n = os.writev(fd, views)
        if n <= 0:
            raise OSError(0, "write returned 0")
        while n:
            first = views[0]
            if n >= first.nbytes:
                n -= first.nbytes
                views.pop(0)
            else:
                views[0] = first[n:]
                n = 0


def _write_all(f: BinaryIO, buf: Buffer) -> None:
    mv = memoryview(buf).cast("B")
    while mv.nbytes:
        n = f.write(mv)
        if n is None or n <= 0:
            raise OSError(0, "non-blocking or failed write")
        mv = mv[n:]


def _unlink_quiet(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def write_checksum_file(path: str | os.PathLike[str], checksum: int) -> None:
    """Write ``<path>.chksum`` as virtnbdbackup does: the decimal adler32, no newline."""
    with open(f"{os.fspath(path)}.chksum", "w", encoding="ascii") as f:
        f.write(str(checksum))


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
    partial = f"{final}.partial"
    chk = f"{final}.chksum"
    chk_partial = f"{chk}.partial"
    writer = StreamWriter(partial, meta, piece_size=piece_size, mode=mode)
    try:
        yield writer
        writer.close(fsync=fsync)
        if checksum_file:
            fd = os.open(chk_partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
            try:
                os.write(fd, str(writer.checksum).encode("ascii"))
                if fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
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
