"""Reading virtnbdbackup sparse streams.

:func:`scan` builds the extent map of a stream file without reading any
payload: it reads the headers and seeks over the data.  For a compressed
stream the payload sizes are not in the frame headers (they carry the
uncompressed length), so the scan first reads the trailer at the end of
the file, the way virtnbdrestore does::

    ... stop 0000000000000000 0000000000000000\\r\\n
        [4408, 298, {"175408": [140312, 35096]}]\\r\\n      <- trailer json
        comp 0000000000000000 0000000000000028\\r\\n        <- last 40 bytes

The last 40 bytes of the file are the ``comp`` header, whose length
field is the size of the trailer JSON; the JSON ends 2 bytes (CRLF)
before that header.  Entry *i* of the trailer belongs to the *i*-th data
frame: an int is the compressed size of a single lz4 frame, a one-key
object ``{"<total>": [sizes]}`` lists the lz4 pieces of a frame that was
split at the NBD request size.  (virtnbdrestore reads the ``comp`` header
at ``EOF-42`` and so sees ``b"\\r\\ncomp"`` as its kind; it never checks it.
vmbk reads it where it is and checks it.)

Everything a header or the trailer claims is checked against the file
size, the meta's ``virtualSize`` and the other frames *before* anything
is read or allocated, so a corrupt or hostile file yields a
:class:`StreamError` naming the file and byte offset, never a huge
allocation, a hang or another exception.

vmbk extension: incremental streams may carry ``zero`` frames for ranges
that read as zero now but did not in the parent (discarded/trimmed or
zeroed in the guest).  virtnbdrestore ignores zero frames; the scan just
reports them and :mod:`vmbk.stream.chain` decides.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import lz4.frame

from vmbk.stream.checksum import adler32
from vmbk.stream.format import (
    FRAME_LEN,
    KIND_COMP,
    KIND_DATA,
    KIND_META,
    KIND_STOP,
    KIND_ZERO,
    MAX_META_LEN,
    MAX_PIECE_SIZE,
    MAX_REQUEST_SIZE,
    TERM,
    StreamError,
    StreamMeta,
    pack_header,
    parse_header,
)

#: Largest compression trailer vmbk reads (about 10 bytes per data frame).
MAX_TRAILER_LEN = 256 * 1024 * 1024


def _lz4_bound(n: int) -> int:
    """A generous upper bound of the lz4 frame size for ``n`` input bytes."""
    return n + n // 255 + (n // 65536 + 1) * 8 + 64


_MAX_PIECE_STORED = _lz4_bound(MAX_PIECE_SIZE)


@dataclass(frozen=True, slots=True)
class Frame:
    """One ``data`` or ``zero`` frame of a stream.

    ``offset``/``length``: the disk range it covers.  ``file_pos``: where
    its payload starts in the file (for a zero frame: just after its
    header).  ``stored_len``: payload bytes in the file (0 for zero
    frames, ``length`` uncompressed, the compressed size otherwise).
    ``pieces``: stored sizes of the lz4 frames of a compressed payload,
    ``()`` when not compressed.  ``header_pos``: where its header starts.
    """

    kind: str
    offset: int
    length: int
    file_pos: int
    stored_len: int
    pieces: tuple[int, ...] = ()
    header_pos: int = 0

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def is_data(self) -> bool:
        return self.kind == KIND_DATA


@dataclass(frozen=True, slots=True)
class StreamMap:
    """The extent map of one stream file, as :func:`scan` found it."""

    path: str
    meta: StreamMeta
    frames: tuple[Frame, ...]
    file_size: int
    stop_pos: int
    trailer_pos: int | None = None

    @property
    def compressed(self) -> bool:
        return self.meta.is_compressed

    @property
    def data_frames(self) -> list[Frame]:
        return [f for f in self.frames if f.kind == KIND_DATA]

    @property
    def zero_frames(self) -> list[Frame]:
        return [f for f in self.frames if f.kind == KIND_ZERO]

    @property
    def data_size(self) -> int:
        return sum(f.length for f in self.frames if f.kind == KIND_DATA)

    @property
    def stored_size(self) -> int:
        return sum(f.stored_len for f in self.frames)


# -- scanning ---------------------------------------------------------------


def _pread_exact(fd: int, n: int, pos: int, path: str, what: str) -> bytes:
    chunks = []
    got = 0
    while got < n:
        try:
            b = os.pread(fd, n - got, pos + got)
        except OSError as e:
            raise StreamError(path, pos + got, f"reading {what}: {e.strerror or e}") from e
        if not b:
            break
        chunks.append(b)
        got += len(b)
    data = b"".join(chunks)
    if len(data) != n:
        raise StreamError(path, pos, f"truncated {what}: {len(data)} of {n} bytes")
    return data


def _parse_trailer_entry(entry: object) -> tuple[int, ...] | None:
    """Pieces of one trailer entry, or None if it is malformed."""
    if isinstance(entry, int) and not isinstance(entry, bool):
        return (entry,) if entry > 0 else None
    if isinstance(entry, dict) and len(entry) == 1:
        ((key, sizes),) = entry.items()
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 20):
            return None
        if not isinstance(sizes, list) or not sizes:
            return None
        if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
            return None
        if sum(sizes) != int(key):
            return None
        return tuple(sizes)
    return None


def _read_trailer(
    fd: int, path: str, size: int, body_start: int
) -> tuple[list[tuple[int, ...]], int]:
    """Trailer entries and the file position of the trailer JSON."""
    comp_pos = size - FRAME_LEN
    # smallest possible tail: stop header + "[]" + CRLF + comp header
    if comp_pos < body_start + FRAME_LEN + 2 + 2:
        raise StreamError(
            path, max(comp_pos, 0), "compressed stream too short to hold a stop frame and a trailer"
        )
    try:
        kind, start, tlen = parse_header(
            _pread_exact(fd, FRAME_LEN, comp_pos, path, "comp header"), path=path, pos=comp_pos
        )
    except StreamError as e:
        raise StreamError(
            path,
            comp_pos,
            f"compressed stream does not end with a comp frame (truncated?): {e.detail}",
        ) from None
    if kind != KIND_COMP:
        raise StreamError(
            path, comp_pos, f"compressed stream does not end with a comp frame (found {kind!r})"
        )
    if start != 0:
        raise StreamError(path, comp_pos, f"comp frame has start {start:#x}, expected 0")
    tpos = comp_pos - len(TERM) - tlen
    if tlen > MAX_TRAILER_LEN or tpos - FRAME_LEN < body_start:
        raise StreamError(
            path, comp_pos, f"comp frame claims a {tlen}-byte trailer that does not fit the file"
        )
    # the stop frame sits just before the trailer: check before reading it
    stop_raw = _pread_exact(fd, FRAME_LEN, tpos - FRAME_LEN, path, "stop header")
    if stop_raw != pack_header(KIND_STOP, 0, 0):
        raise StreamError(
            path,
            comp_pos,
            f"the comp frame's trailer length {tlen} does not lead back to a stop frame "
            f"(found {stop_raw[:24]!r} at byte {tpos - FRAME_LEN})",
        )
    raw = _pread_exact(fd, tlen + len(TERM), tpos, path, "compression trailer")
    if raw[-2:] != TERM:
        raise StreamError(path, comp_pos - 2, "compression trailer not followed by CRLF")
    try:
        obj = json.loads(raw[:-2].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise StreamError(path, tpos, f"compression trailer is not valid JSON: {e}") from None
    if not isinstance(obj, list):
        raise StreamError(path, tpos, "compression trailer is not a JSON list")
    entries = []
    for i, entry in enumerate(obj):
        pieces = _parse_trailer_entry(entry)
        if pieces is None:
            raise StreamError(
                path, tpos, f"compression trailer entry {i} is malformed: {entry!r:.80}"
            )
        entries.append(pieces)
    return entries, tpos


def _scan_fd(fd: int, path: str) -> StreamMap:
    try:
        size = os.fstat(fd).st_size
    except OSError as e:
        raise StreamError(path, 0, f"cannot stat: {e.strerror}") from e
    head = _pread_exact(fd, min(FRAME_LEN, size), 0, path, "meta header")
    kind, start, mlen = parse_header(head, path=path, pos=0)
    if kind != KIND_META:
        raise StreamError(path, 0, f"stream does not start with a meta frame (found {kind!r})")
    if start != 0:
        raise StreamError(path, 0, f"meta frame has start {start:#x}, expected 0")
    if mlen > MAX_META_LEN or FRAME_LEN + mlen + len(TERM) > size:
        raise StreamError(path, 0, f"meta frame length {mlen} does not fit the file ({size} bytes)")
    raw = _pread_exact(fd, mlen + len(TERM), FRAME_LEN, path, "meta frame")
    if raw[-2:] != TERM:
        raise StreamError(path, FRAME_LEN + mlen, "meta frame not followed by CRLF")
    meta = StreamMeta.from_json(raw[:-2], path=path, pos=FRAME_LEN)
    body_start = FRAME_LEN + mlen + len(TERM)

    trailer: list[tuple[int, ...]] | None = None
    trailer_pos: int | None = None
    end = size  # where the stop frame must end
    if meta.is_compressed:
        trailer, trailer_pos = _read_trailer(fd, path, size, body_start)
        end = trailer_pos

    frames: list[Frame] = []
    prev_end = 0
    data_count = 0
    data_sum = 0
    pos = body_start
    # header bytes already read together with the previous payload's CRLF
    cached: tuple[int, bytes] | None = None
    while True:
        if pos + FRAME_LEN > end:
            raise StreamError(path, pos, "stream ends without a stop frame (truncated?)")
        if cached is not None and cached[0] == pos and len(cached[1]) == FRAME_LEN:
            hdr = cached[1]
        else:
            hdr = _pread_exact(fd, FRAME_LEN, pos, path, "frame header")
        kind, start, length = parse_header(hdr, path=path, pos=pos)
        if kind == KIND_STOP:
            if start or length:
                raise StreamError(path, pos, f"stop frame with start {start:#x} length {length:#x}")
            stop_pos = pos
            pos += FRAME_LEN
            break
        if kind not in (KIND_DATA, KIND_ZERO):
            raise StreamError(path, pos, f"unexpected {kind!r} frame inside the stream")
        if length == 0:
            raise StreamError(path, pos, f"empty {kind} frame at disk offset {start}")
        if start < prev_end:
            raise StreamError(
                path,
                pos,
                f"{kind} frame at disk offset {start} overlaps or precedes the previous "
                f"frame, which ends at {prev_end} (frames must be in increasing order)",
            )
        if start + length > meta.virtual_size:
            raise StreamError(
                path,
                pos,
                f"{kind} frame {start}+{length} ends past virtualSize {meta.virtual_size}",
            )
        payload_pos = pos + FRAME_LEN
        if kind == KIND_DATA:
            if trailer is not None:
                if data_count >= len(trailer):
                    raise StreamError(
                        path,
                        pos,
                        f"data frame {data_count} has no compression trailer entry "
                        f"(the trailer has {len(trailer)})",
                    )
                pieces = trailer[data_count]
                stored = sum(pieces)
                if (
                    len(pieces) > length
                    or len(pieces) * MAX_PIECE_SIZE < length
                    or max(pieces) > _MAX_PIECE_STORED
                    or stored > _lz4_bound(length) + 64 * len(pieces)
                ):
                    raise StreamError(
                        path,
                        pos,
                        f"trailer entry {data_count} ({len(pieces)} pieces, {stored} bytes) "
                        f"does not fit a data frame of {length} bytes",
                    )
            else:
                pieces = ()
                stored = length
            term_pos = payload_pos + stored
            if term_pos + len(TERM) > end:
                raise StreamError(
                    path,
                    pos,
                    f"payload of {stored} bytes runs past the end of the stream ({end} bytes)",
                )
            # read the CRLF and, in the same call, the next header
            tail = _pread_exact(
                fd, min(len(TERM) + FRAME_LEN, end - term_pos), term_pos, path, "CRLF"
            )
            if tail[:2] != TERM:
                raise StreamError(path, term_pos, "data payload not followed by CRLF")
            cached = (term_pos + 2, tail[2:])
            next_pos = term_pos + len(TERM)
            data_count += 1
            data_sum += length
        else:
            pieces = ()
            stored = 0
            next_pos = payload_pos
        frames.append(Frame(kind, start, length, payload_pos, stored, pieces, pos))
        prev_end = start + length
        pos = next_pos

    if trailer is not None and data_count != len(trailer):
        raise StreamError(
            path,
            trailer_pos or 0,
            f"compression trailer has {len(trailer)} entries for {data_count} data frames",
        )
    if pos != end:
        if trailer is not None:
            raise StreamError(path, pos, "stop frame is not followed by the compression trailer")
        raise StreamError(path, pos, f"{end - pos} bytes of unexpected data after the stop frame")
    if data_sum != meta.data_size:
        raise StreamError(
            path,
            FRAME_LEN,
            f"meta says dataSize {meta.data_size} but the data frames hold {data_sum} bytes",
        )
    return StreamMap(path, meta, tuple(frames), size, stop_pos, trailer_pos)


def scan(path: str | os.PathLike[str]) -> StreamMap:
    """The extent map of the stream file at ``path``; payloads are not read."""
    p = os.fspath(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise StreamError(p, 0, f"cannot open: {e.strerror}") from e
    try:
        return _scan_fd(fd, p)
    finally:
        os.close(fd)


def read_meta(path: str | os.PathLike[str]) -> StreamMeta:
    """Only the meta frame of a stream (what ``virtnbdrestore -o dump`` shows)."""
    p = os.fspath(path)
    try:
        with open(p, "rb", buffering=0) as f:
            head = f.read(FRAME_LEN)
            kind, start, mlen = parse_header(head, path=p, pos=0)
            if kind != KIND_META or mlen > MAX_META_LEN:
                raise StreamError(p, 0, "stream does not start with a sane meta frame")
            raw = f.read(mlen)
    except OSError as e:
        raise StreamError(p, 0, f"cannot read: {e.strerror}") from e
    if len(raw) != mlen:
        raise StreamError(p, FRAME_LEN, f"truncated meta frame: {len(raw)} of {mlen} bytes")
    return StreamMeta.from_json(raw, path=p, pos=FRAME_LEN)


# -- reading payloads -------------------------------------------------------

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
            self.map = smap if smap is not None else _scan_fd(self._fd, self.path)
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
        head = _pread_exact(fd, min(stored, 19), pos, self.path, f"lz4 piece {i} header")
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
        data = _pread_exact(fd, stored, pos, self.path, f"lz4 piece {i}")
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


# -- checksums --------------------------------------------------------------


def file_checksum(path: str | os.PathLike[str], *, buffer_size: int = 8 << 20) -> int:
    """adler32 (zlib, seed 1) of the whole file, as virtnbdbackup's ``.chksum``."""
    p = os.fspath(path)
    buf = bytearray(buffer_size)
    view = memoryview(buf)
    value = 1
    pos = 0
    try:
        with open(p, "rb", buffering=0) as f:
            while True:
                n = f.readinto(view)
                if not n:
                    return value
                value = adler32(view[:n], value)
                pos += n
    except OSError as e:
        raise StreamError(p, pos, f"reading for checksum: {e.strerror or e}") from e


def read_checksum_file(path: str | os.PathLike[str]) -> int | None:
    """The value in ``<path>.chksum``, or None if there is none."""
    chk = f"{os.fspath(path)}.chksum"
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


def verify_checksum(path: str | os.PathLike[str], *, required: bool = False) -> bool:
    """Check ``path`` against ``<path>.chksum``, as ``virtnbdrestore -o verify``.

    True when it matches; False when there is no ``.chksum`` (unless
    ``required``); StreamError on a mismatch.
    """
    stored = read_checksum_file(path)
    if stored is None:
        if required:
            raise StreamError(f"{os.fspath(path)}.chksum", 0, "checksum file is missing")
        return False
    actual = file_checksum(path)
    if actual != stored:
        size = os.path.getsize(path)
        raise StreamError(
            path,
            0,
            f"adler32 of the file's {size} bytes is {actual}, its .chksum says {stored}",
        )
    return True
