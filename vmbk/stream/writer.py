"""Writing virtnbdbackup sparse streams.

:class:`StreamWriter` produces the exact bytes virtnbdbackup produces for
the same extents (meta JSON aside: its ``date`` differs), so virtnbdrestore
restores vmbk's files and vice versa.

It is built to write from several threads at once.  A data frame goes
through three steps:

* :meth:`~StreamWriter.reserve` -- the caller's thread, in disk order:
  checks the order and gives the frame its place in the file.  An
  uncompressed frame's size is known before its data arrives
  (40-byte header + payload + CRLF), so its file offset is too;
* :meth:`~StreamWriter.fill` -- any thread, in any order: builds the
  frame's bytes (compresses the payload if the stream is compressed),
  takes their adler32, and when the frame's file offset is known writes
  them there with one ``os.pwritev`` (header and payload memoryview
  handed to the kernel as they are: no copy, no join);
* :meth:`~StreamWriter.commit` -- the caller's thread, in the order of
  reservation: writes what ``fill`` could not place (compressed frames,
  whose size is known only once compressed, and everything when the
  target is a file object), and folds the frame's adler32 into the
  file's with ``adler32_combine``.

The backup calls ``fill`` on the NBD reader's connection threads (the
``process`` hook of vmbk.nbd.Reader), so checksumming and compressing run
on every core next to receiving.  It fills with ``write=False`` and
hands each frame, in the order the data arrived, to
:meth:`~StreamWriter.finish` on its own thread, which writes it in its
place (uncompressed) and commits what is complete (writing the
compressed frames then): the connections never wait for the file
(writes to one file are serialized by the kernel anyway, and threads
queueing for its lock stop receiving).  :meth:`~StreamWriter.write_data`
does the three steps in a row.

The ``.chksum`` (virtnbdbackup >= 1.9.40 writes one, ``virtnbdrestore -o
verify`` checks it) is the adler32 of the whole file, so it costs no
second pass; so is the manifest's SHA-256 *stream digest*
(`vmbk.stream.digest`: `fill` hashes each payload where it is built,
`commit` feeds the rest and the payload digests in file order).

Small pieces (the meta, ``zero`` frame headers, the stop frame) are queued and go out, and are summed, with the next data frame,
or on their own when no data frame is on its way.

Compressed frames follow virtnbdbackup exactly (the details are part of
the format, since virtnbdrestore depends on them):

* each piece is one ``lz4.frame`` frame with the content size stored in
  its header (`compress_piece`: without lz4's xxh32 checksums, which
  virtnbdbackup writes but virtnbdrestore does not need);
* a frame shorter than :data:`MAX_REQUEST_SIZE` is one piece and its
  trailer entry is the compressed size, an int;
* a frame of :data:`MAX_REQUEST_SIZE` or more is cut into pieces of
  ``piece_size`` (at most MAX_REQUEST_SIZE, since virtnbdrestore writes
  each decompressed piece in one NBD request) and its trailer entry is
  ``{"<total compressed size>": [piece sizes]}``.  virtnbdrestore picks the
  entry's form from the frame length with the same ``>=`` test, so the
  threshold cannot be changed.

Frames must be reserved in increasing, non-overlapping disk order and
``dataSize`` of the meta must equal the bytes of the data frames: the meta
goes first in the file, so it cannot be fixed up afterwards.  Breaking
either rule raises ``ValueError`` (a programming error, not bad input).

`vmbk.stream.atomic` adds the ``.partial`` / rename / ``.chksum``
protocol around it.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
from typing import BinaryIO

import lz4.frame

from vmbk.errors import StorageError
from vmbk.fsutil import pwritev_all
from vmbk.heap import keep_freed_memory
from vmbk.stream.checksum import adler32, adler32_combine
from vmbk.stream.format import (
    FRAME_LEN,
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
TrailerEntry = int | dict[str, list[int]]

#: Write queued small pieces on their own past this many bytes.
_PENDING_BYTES = 64 * 1024

_STOP_HEADER = pack_header(KIND_STOP, 0, 0)


def _as_bytes_view(data: Buffer) -> memoryview:
    mv = memoryview(data)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")  # raises TypeError for non-contiguous buffers
    return mv


def compress_piece(data: Buffer, level: int) -> bytes:
    """One lz4 frame: virtnbdbackup's settings but the checksums, and the content size stored.

    virtnbdrestore (and vmbk-extract) decompress with ``lz4.frame.decompress``,
    which reads the frame's flags: checksums are optional in the lz4 frame
    format (doc/lz4_Frame_format.md), checked when present.  The xxh32
    content and block checksums cost more than the compression of
    incompressible data (python-lz4 4.4 here, CPU: 1.4 GB/s with both, 4.2
    GB/s without; bench/README.md, "The floor"), and guard nothing the
    stream's own checks do not: the ``.chksum`` (adler32) and the
    manifest's SHA-256 cover every stored byte, and the content size in the
    header is checked against what decompresses.  vmbk still checks the
    checksums of frames that carry them (virtnbdbackup's).
    """
    out: bytes = lz4.frame.compress(
        data,
        compression_level=level,
        content_checksum=False,
        block_checksum=False,
        store_size=True,
    )
    return out


class DataFrame:
    """A reserved data frame on its way from `reserve` through `fill` to `commit`.

    ``lead`` is the queued small pieces that go in front of it.  After
    ``fill``: ``size`` and ``checksum`` cover lead + frame, and ``bufs`` is
    what `commit` still has to write (None: written in place).
    """

    __slots__ = ("bufs", "checksum", "digest", "entry", "finished", "header", "lead", "length", "offset", "pos",
                 "size", "stored")

    def __init__(self, offset: int, length: int, pos: int | None, lead: bytes) -> None:
        self.offset, self.length, self.pos, self.lead = offset, length, pos, lead
        self.bufs: list[Buffer] | None = None
        self.size = 0
        self.checksum = 1
        self.stored = 0
        self.entry: TrailerEntry | None = None
        self.finished = False  # `finish` was called: commit when its turn comes
        self.header = b""
        self.digest = b""  # SHA-256 of the stored payload (`vmbk.stream.digest`)


class StreamWriter:
    """Write one sparse stream to a path or a binary file object.

    ``target`` as a path is created/truncated and written with
    ``os.pwritev`` (zero-copy, from any thread); as a file object it is
    written with ``.write()`` in :meth:`commit` and left open.  The checksum
    then covers only what this writer wrote.
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
        if self._level is not None:
            keep_freed_memory()  # lz4 allocates a fresh 512 KiB per frame: see vmbk.heap
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
        #: Frames are written by `fill` where they belong in the file.
        self._in_place = self._fd is not None and self._level is None
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._checksum = 1  # zlib.adler32's seed, as virtnbdbackup
        self._digest = hashlib.sha256()  # the stream digest, fed in file order
        self._written = 0  # bytes of all committed frames and flushed pieces
        self._end = 0  # where the queued pieces go: after the reserved frames
        self._reserved: dict[int, DataFrame] = {}  # offset -> reserved, not filled
        self._order: collections.deque[DataFrame] = collections.deque()  # not committed
        self._next_offset = 0
        self._data_size = 0
        self._stored_size = 0
        self._frames = 0
        self._zero_frames = 0
        self._trailer: list[TrailerEntry] | None = [] if self._level is not None else None
        self._closed = False
        self._aborted = False
        self._failed: StorageError | None = None
        payload = meta.to_json()
        self._queue(pack_header(KIND_META, 0, len(payload)))
        self._queue(payload)
        self._queue(TERM)

    # -- public properties ---------------------------------------------------

    @property
    def checksum(self) -> int:
        """adler32 (seed 1) of all bytes written so far; of the file after close()."""
        if self._pending or self._order:
            raise RuntimeError("checksum read with unflushed data; call close() first")
        return self._checksum

    @property
    def sha256(self) -> str:
        """The stream digest (`vmbk.stream.digest`) of all bytes written so far; of the file after close()."""
        if self._pending or self._order:
            raise RuntimeError("digest read with unflushed data; call close() first")
        return self._digest.hexdigest()

    @property
    def data_size(self) -> int:
        """Sum of the lengths of the data frames committed (the meta's dataSize)."""
        return self._data_size

    @property
    def stored_size(self) -> int:
        """Payload bytes of the data frames in the file (compressed size if so)."""
        return self._stored_size

    @property
    def size(self) -> int:
        """Bytes of the committed frames and queued pieces (the file's size after close())."""
        return self._written + self._pending_bytes

    @property
    def frames(self) -> int:
        """Number of data and zero frames reserved or written."""
        return self._frames

    @property
    def zero_frames(self) -> int:
        """Number of zero frames written."""
        return self._zero_frames

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
        self.reserve(offset, memoryview(data).nbytes)
        return self.commit(self.fill(offset, data))

    def reserve(self, offset: int, length: int) -> None:
        """Announce the data frame of ``length`` bytes at disk ``offset``.

        In disk order, from the thread that commits.  Its data comes with
        `fill`; frames reserved and not yet committed hold no memory but
        their queued small pieces.
        """
        self._check_range(offset, length)
        lead = b"".join(self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        frame = DataFrame(offset, length, self._end if self._in_place else None, lead)
        self._end += len(lead) + FRAME_LEN + length + len(TERM)  # exact when uncompressed
        self._reserved[offset] = frame
        self._order.append(frame)

    def fill(self, offset: int, data: Buffer, *, write: bool = True) -> DataFrame:
        """Build, checksum and, if its place is known, write a reserved frame.

        Safe from any thread and in any order, as long as each reserved
        frame is filled once and no fill runs during :meth:`close` or
        :meth:`abort`.  ``data`` is not needed any more when this returns
        unless the frame's ``bufs`` still hold it (a file-object target, or
        ``write=False``): then it must stay valid until `commit` / `finish`.
        ``write=False`` leaves the writing to `finish` on the committing
        thread, the checksum is still taken here.
        """
        if self._failed is not None:  # another frame's write failed: say why
            raise StorageError(str(self._failed))
        if self._aborted or self._closed:
            raise ValueError(f"{self.path}: stream was aborted, it is incomplete")
        frame = self._reserved.get(offset)
        if frame is None:
            raise ValueError(f"{self.path}: no data frame reserved at offset {offset}")
        mv = _as_bytes_view(data)
        if mv.nbytes != frame.length:
            raise ValueError(
                f"{self.path}: frame at {offset} reserved for {frame.length} bytes, got {mv.nbytes}"
            )
        del self._reserved[offset]
        header = pack_header(KIND_DATA, offset, frame.length)
        if self._level is None:
            bufs: list[Buffer] = [frame.lead, header, mv, TERM]
            frame.stored = frame.length
            frame.digest = hashlib.sha256(mv).digest()
        else:
            pieces, frame.entry = self._compress(mv, self._level)
            bufs = [frame.lead, header, *pieces, TERM]
            frame.stored = sum(len(p) for p in pieces)
            h = hashlib.sha256()
            for p in pieces:
                h.update(p)
            frame.digest = h.digest()
        frame.header = header
        cs = 1
        for b in bufs:
            cs = adler32(b, cs)
        frame.checksum = cs
        frame.size = len(frame.lead) + FRAME_LEN + frame.stored + len(TERM)
        if frame.pos is None or not write:
            frame.bufs = bufs
        else:
            self._put(bufs, frame.pos)
        return frame

    def _compress(self, mv: memoryview, level: int) -> tuple[list[bytes], TrailerEntry]:
        if mv.nbytes < MAX_REQUEST_SIZE:
            piece = compress_piece(mv, level)
            return [piece], len(piece)
        pieces = [
            compress_piece(mv[start : start + self.piece_size], level)
            for start in range(0, mv.nbytes, self.piece_size)
        ]
        sizes = [len(p) for p in pieces]
        return pieces, {str(sum(sizes)): sizes}

    def commit(self, frame: DataFrame) -> int:
        """Finish a filled frame: write it if `fill` did not; returns stored bytes.

        In the order the frames were reserved, from the thread that reserved.
        """
        if not self._order or self._order[0] is not frame:
            raise ValueError(f"{self.path}: data frames must be committed in the order reserved")
        if self._aborted or self._closed:
            raise ValueError(f"{self.path}: stream was aborted, it is incomplete")
        if frame.bufs is not None:
            self._put(frame.bufs, self._written)
            frame.bufs = None
        self._order.popleft()
        self._checksum = adler32_combine(self._checksum, frame.checksum, frame.size)
        d = self._digest
        d.update(frame.lead)
        d.update(frame.header)
        d.update(frame.digest)
        d.update(TERM)
        self._written += frame.size
        self._data_size += frame.length
        self._stored_size += frame.stored
        if frame.entry is not None:
            assert self._trailer is not None
            self._trailer.append(frame.entry)
        return frame.stored

    def finish(self, frame: DataFrame) -> int:
        """Take a filled frame in any order: write it now if its place is
        known, and commit every frame up to the first one not finished.

        From the thread that reserves and commits.  Returns the stored
        bytes committed by this call.  Frames of a file-object target are
        written by `commit`, in order: their ``bufs`` would hold the
        caller's data after this returns, so that target cannot finish out
        of order (``ValueError``).
        """
        if frame.pos is not None:
            if frame.bufs is not None:
                self._put(frame.bufs, frame.pos)
                frame.bufs = None
        elif self._level is None and (not self._order or self._order[0] is not frame):
            raise ValueError(f"{self.path}: frames of a file object must be finished in the order reserved")
        frame.finished = True
        stored = 0
        while self._order and self._order[0].finished:
            stored += self.commit(self._order[0])
        return stored

    def write_zero(self, offset: int, length: int) -> None:
        """Write a zero frame: ``length`` bytes at ``offset`` read as zeroes.

        virtnbdbackup writes them only in full/copy backups (virtnbdrestore
        skips them); vmbk also writes them in incrementals for ranges that
        became zero since the parent, and vmbk-restore applies them.
        """
        self._check_range(offset, length)
        self._zero_frames += 1
        self._queue(pack_header(KIND_ZERO, offset, length))
        if self._pending_bytes >= _PENDING_BYTES and not self._order:
            self._flush()

    def close(self, *, fsync: bool = False) -> None:
        """Write the stop frame (and the compression trailer) and close.

        Raises ``ValueError`` if the data frames do not add up to the
        meta's dataSize or a reserved frame was not committed (the file is
        then left without a stop frame), and if the writer was aborted (by
        :meth:`abort` or a failed write).
        """
        if self._aborted:
            raise ValueError(f"{self.path}: stream was aborted, it is incomplete")
        if self._closed:
            return
        if self._order:
            self.abort()
            raise ValueError(f"{self.path}: {len(self._order)} reserved data frame(s) not committed")
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
        """Stop writing and close the file as it is (an incomplete stream).

        No `fill` may be running (the backup lets its reads finish first).
        """
        if not self._closed:
            self._aborted = True
        self._pending.clear()
        self._pending_bytes = 0
        self._reserved.clear()
        self._order.clear()
        self._release()

    def _release(self) -> None:
        self._closed = True
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
        """Write the queued small pieces (no frame may be outstanding)."""
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        self._put([data], self._written)
        self._checksum = adler32(data, self._checksum)
        self._digest.update(data)
        self._written += len(data)
        self._end = self._written  # nothing outstanding: the layout ends here

    def _put(self, bufs: list[Buffer], pos: int) -> None:
        """Write ``bufs`` at file offset ``pos`` (a file object: at its end)."""
        try:
            if self._fd is not None:
                pwritev_all(self._fd, bufs, pos)
            elif self._file is not None:
                for b in bufs:
                    _write_all(self._file, b)
            else:
                raise ValueError(f"{self.path}: stream is closed")
        except OSError as e:
            error = StorageError(f"{self.path}: writing at byte {pos}: {e.strerror or e}")
            self._aborted = True
            self._failed = self._failed or error
            raise error from e


def _write_all(f: BinaryIO, buf: Buffer) -> None:
    mv = memoryview(buf).cast("B")
    while mv.nbytes:
        n = f.write(mv)
        if n is None or n <= 0:
            raise OSError(0, "non-blocking or failed write")
        mv = mv[n:]
