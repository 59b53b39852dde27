"""Reading the payloads of a virtnbdbackup sparse stream.

:class:`StreamReader` gives random access to the frames a
:func:`~vmbk.stream.scan.scan` found: uncompressed payloads are read in
place, compressed ones decompressed piece by piece (whole lz4 frames,
their checksums checked by lz4); every size an lz4 header claims is
checked against the frame before anything is allocated.  The fast path
for restores, which copies stored lz4 blocks without decompressing, is
:mod:`vmbk.stream.lz4read`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import lz4.frame

from vmbk.stream.format import (
    KIND_DATA,
    KIND_ZERO,
    MAX_PIECE_SIZE,
    MAX_REQUEST_SIZE,
    StreamError,
    StreamMeta,
)
from vmbk.stream.scan import Frame, StreamMap, pread_exact, scan_fd

_ZEROES = bytes(1 << 20)


def _fill_zero(out: memoryview) -> None:
    for c in range(0, out.nbytes, len(_ZEROES)):
        e = min(c + len(_ZEROES), out.nbytes)
        out[c:e] = _ZEROES[: e - c]


class StreamReader:
    """Random access to the payloads of one stream file.

    ``smap`` defaults to :func:`scan` of the file.  Reads of a compressed
    frame decompress whole lz4 pieces; the last decompressed piece is
    cached, so reading a frame front to back in several calls
    decompresses each piece once.
    """

    def __init__(self, path: str | os.PathLike[str], smap: StreamMap | None = None) -> None:
        self.path = os.fspath(path)
        try:
            self._fd: int | None = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise StreamError(self.path, 0, f"cannot open: {e.strerror}") from e
        try:
            self.map = smap if smap is not None else scan_fd(self._fd, self.path)
            size = os.fstat(self._fd).st_size
        except BaseException:
            self.close()
            raise
        if size != self.map.file_size:
            self.close()
            raise StreamError(
                self.path,
                min(size, self.map.file_size),
                f"file is {size} bytes, the map was made for {self.map.file_size}",
            )
        self._cache: tuple[int, bytes] | None = None  # (piece file position, raw bytes)

    @property
    def meta(self) -> StreamMeta:
        return self.map.meta

    @property
    def frames(self) -> tuple[Frame, ...]:
        return self.map.frames

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        self._cache = None

    def __enter__(self) -> StreamReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int:
        """The open stream file (`vmbk.stream.chainread.ChainImage.reopen` opens it again)."""
        return self._fdn()

    def _fdn(self) -> int:
        if self._fd is None:
            raise ValueError(f"{self.path}: reader is closed")
        return self._fd

    # -- public reads --------------------------------------------------------

    def read_frame_into(self, frame: Frame, buf: bytearray | memoryview, start: int = 0) -> int:
        """Fill ``buf`` with the frame's bytes ``[start, start + len(buf))``.

        Zero frames fill zeroes.  Returns the number of bytes (``len(buf)``).
        """
        out = memoryview(buf).cast("B")
        n = out.nbytes
        if start < 0 or start + n > frame.length:
            raise ValueError(
                f"range {start}+{n} is outside the frame at {frame.offset} of {frame.length} bytes"
            )
        if n == 0:
            return 0
        if frame.kind == KIND_ZERO:
            _fill_zero(out)
            return n
        if not frame.pieces:
            self._preadv_exact(out, frame.file_pos + start)
            return n
        done = 0
        for raw_off, raw in self._iter_pieces(frame, start, n):
            lo = max(start, raw_off)
            hi = min(start + n, raw_off + len(raw))
            out[lo - start : hi - start] = memoryview(raw)[lo - raw_off : hi - raw_off]
            done += hi - lo
        if done != n:  # pragma: no cover - _iter_pieces raises first
            raise StreamError(self.path, frame.file_pos, "compressed frame is short")
        return n

    def read_frame(self, frame: Frame, start: int = 0, length: int | None = None) -> bytes:
        """The frame's bytes ``[start, start + length)`` (default: to its end)."""
        if length is None:
            length = frame.length - start
        buf = bytearray(length)
        self.read_frame_into(frame, buf, start)
        return bytes(buf)

    def iter_chunks(
        self,
        frame: Frame,
        start: int = 0,
        length: int | None = None,
        chunk_size: int = MAX_REQUEST_SIZE,
    ) -> Iterator[tuple[int, memoryview]]:
        """Yield ``(disk_offset, data)`` for the frame's ``[start, start + length)``.

        Chunks are at most ``chunk_size`` bytes, the NBD request limit by
        default, so each one can go out as one NBD write.  Each chunk is
        a fresh buffer the caller may keep.
        """
        if length is None:
            length = frame.length - start
        if start < 0 or length < 0 or start + length > frame.length:
            raise ValueError(f"range {start}+{length} is outside the frame of {frame.length} bytes")
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        if frame.kind == KIND_DATA and frame.pieces:
            for raw_off, raw in self._iter_pieces(frame, start, length):
                lo = max(start, raw_off)
                hi = min(start + length, raw_off + len(raw))
                view = memoryview(raw)
                for c in range(lo, hi, chunk_size):
                    e = min(c + chunk_size, hi)
                    yield frame.offset + c, view[c - raw_off : e - raw_off]
            return
        for c in range(start, start + length, chunk_size):
            e = min(c + chunk_size, start + length)
            buf = bytearray(e - c)
            self.read_frame_into(frame, buf, c)
            yield frame.offset + c, memoryview(buf)

    # -- internals -------------------------------------------------------------

    def _preadv_exact(self, out: memoryview, pos: int) -> None:
        fd = self._fdn()
        done = 0
        n = out.nbytes
        while done < n:
            try:
                got = os.preadv(fd, [out[done:]], pos + done)
            except OSError as e:
                raise StreamError(self.path, pos + done, f"read error: {e.strerror or e}") from e
            if got <= 0:
                raise StreamError(self.path, pos + done, "file ends inside a data payload")
            done += got

    def _iter_pieces(self, frame: Frame, start: int, length: int) -> Iterator[tuple[int, bytes]]:
        """Decompressed pieces of ``frame`` overlapping ``[start, start+length)``.

        Yields ``(offset of the piece within the frame, raw bytes)``.
        Pieces wholly before ``start`` are skipped using the content size
        in their lz4 header, without decompressing them.
        """
        fd = self._fdn()
        end = start + length
        raw_off = 0
        piece_pos = frame.file_pos
        for i, stored in enumerate(frame.pieces):
            remaining = frame.length - raw_off
            if remaining <= 0:
                raise StreamError(
                    self.path,
                    piece_pos,
                    f"lz4 piece {i} lies beyond the frame's {frame.length} bytes",
                )
            if raw_off >= end:
                return
            cached = self._cache
            if cached is not None and cached[0] == piece_pos:
                raw = cached[1]
            else:
                size_hint = self._piece_content_size(fd, piece_pos, stored, i)
                if size_hint is not None and raw_off + size_hint <= start:
                    if size_hint > remaining or size_hint == 0:
                        raise StreamError(
                            self.path,
                            piece_pos,
                            f"lz4 piece {i} claims {size_hint} bytes, the frame has "
                            f"{remaining} left",
                        )
                    raw_off += size_hint
                    piece_pos += stored
                    continue
                raw = self._decompress(fd, piece_pos, stored, min(remaining, MAX_PIECE_SIZE), i)
                self._cache = (piece_pos, raw)
            if raw_off + len(raw) > start:
                yield raw_off, raw
            raw_off += len(raw)
            piece_pos += stored
        if raw_off < end:
            raise StreamError(
                self.path,
                frame.file_pos,
                f"compressed frame decompresses to {raw_off} bytes, the header says {frame.length}",
            )

    def _piece_content_size(self, fd: int, pos: int, stored: int, i: int) -> int | None:
        head = pread_exact(fd, min(stored, 19), pos, self.path, f"lz4 piece {i} header")
        try:
            info = lz4.frame.get_frame_info(head)
        except (RuntimeError, ValueError, TypeError):
            return None  # decompression will report it properly
        size = info.get("content_size", 0)
        return size if isinstance(size, int) and size > 0 else None

    def _decompress(self, fd: int, pos: int, stored: int, limit: int, i: int) -> bytes:
        hint = self._piece_content_size(fd, pos, stored, i)
        if hint is not None:
            if hint > limit:
                raise StreamError(
                    self.path,
                    pos,
                    f"lz4 piece {i} claims {hint} bytes, at most {limit} fit the frame",
                )
            limit = hint  # lz4 checks the content size itself; allocate exactly
        data = pread_exact(fd, stored, pos, self.path, f"lz4 piece {i}")
        dec = lz4.frame.LZ4FrameDecompressor()
        try:
            raw: bytes = dec.decompress(data, max_length=limit)
        except (RuntimeError, ValueError, MemoryError) as e:
            raise StreamError(self.path, pos, f"lz4 piece {i} is corrupt: {e}") from None
        if not dec.eof:
            raise StreamError(
                self.path,
                pos,
                f"lz4 piece {i} ({stored} bytes) is not one complete lz4 frame of at most "
                f"{limit} bytes",
            )
        if dec.unused_data:
            raise StreamError(
                self.path, pos, f"lz4 piece {i} has {len(dec.unused_data)} bytes after its end"
            )
        if not raw:
            raise StreamError(self.path, pos, f"lz4 piece {i} is empty")
        return raw
