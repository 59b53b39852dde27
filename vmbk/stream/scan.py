"""Scanning virtnbdbackup sparse streams: the extent map, no payload read.

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
from dataclasses import dataclass

from vmbk.stream.format import (
    FRAME_LEN,
    KIND_COMP,
    KIND_DATA,
    KIND_META,
    KIND_STOP,
    KIND_ZERO,
    MAX_META_LEN,
    MAX_PIECE_SIZE,
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


def pread_exact(fd: int, n: int, pos: int, path: str, what: str) -> bytes:
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
            pread_exact(fd, FRAME_LEN, comp_pos, path, "comp header"), path=path, pos=comp_pos
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
    stop_raw = pread_exact(fd, FRAME_LEN, tpos - FRAME_LEN, path, "stop header")
    if stop_raw != pack_header(KIND_STOP, 0, 0):
        raise StreamError(
            path,
            comp_pos,
            f"the comp frame's trailer length {tlen} does not lead back to a stop frame "
            f"(found {stop_raw[:24]!r} at byte {tpos - FRAME_LEN})",
        )
    raw = pread_exact(fd, tlen + len(TERM), tpos, path, "compression trailer")
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


def _stat_size(fd: int, path: str) -> int:
    try:
        return os.fstat(fd).st_size
    except OSError as e:
        raise StreamError(path, 0, f"cannot stat: {e.strerror}") from e


def _meta_fd(fd: int, path: str, size: int) -> tuple[StreamMeta, int]:
    """The meta frame and where the frames after it start."""
    head = pread_exact(fd, min(FRAME_LEN, size), 0, path, "meta header")
    kind, start, mlen = parse_header(head, path=path, pos=0)
    if kind != KIND_META:
        raise StreamError(path, 0, f"stream does not start with a meta frame (found {kind!r})")
    if start != 0:
        raise StreamError(path, 0, f"meta frame has start {start:#x}, expected 0")
    if mlen > MAX_META_LEN or FRAME_LEN + mlen + len(TERM) > size:
        raise StreamError(path, 0, f"meta frame length {mlen} does not fit the file ({size} bytes)")
    raw = pread_exact(fd, mlen + len(TERM), FRAME_LEN, path, "meta frame")
    if raw[-2:] != TERM:
        raise StreamError(path, FRAME_LEN + mlen, "meta frame not followed by CRLF")
    return StreamMeta.from_json(raw[:-2], path=path, pos=FRAME_LEN), FRAME_LEN + mlen + len(TERM)


def scan_fd(fd: int, path: str) -> StreamMap:
    size = _stat_size(fd, path)
    meta, body_start = _meta_fd(fd, path, size)

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
            hdr = pread_exact(fd, FRAME_LEN, pos, path, "frame header")
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
            tail = pread_exact(
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
    fd = _open(p)
    try:
        return scan_fd(fd, p)
    finally:
        os.close(fd)


def _open(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise StreamError(path, 0, f"cannot open: {e.strerror}") from e


def read_meta(path: str | os.PathLike[str]) -> StreamMeta:
    """Only the meta frame of a stream (what ``virtnbdrestore -o dump`` shows)."""
    p = os.fspath(path)
    fd = _open(p)
    try:
        return _meta_fd(fd, p, _stat_size(fd, p))[0]
    finally:
        os.close(fd)


def probe(path: str | os.PathLike[str]) -> tuple[StreamMeta, StreamError | None]:
    """The meta frame, and what is wrong with the stream's end (None: nothing seen).

    The cheap check of a complete stream, for listings and plans: besides
    the meta frame it reads only the last frame -- the stop header of an
    uncompressed stream, or the ``comp`` header, the trailer and the stop
    header before it -- and checks that the file's size can hold what
    they and ``dataSize`` claim.  A truncated file, a damaged tail or a
    size that does not add up are found; damage between the first and the
    last frame is :func:`scan`'s (and the ``.chksum``'s) to find.  Raises
    StreamError when the meta frame itself is unreadable.

    The size check: every data frame is a 40-byte header, its payload and
    CRLF, every zero frame a header alone, so the bytes between the meta
    frame and the stop frame minus the payloads are ``42 x data frames +
    40 x zero frames``.  Uncompressed, the payloads are ``dataSize`` bytes
    (at least one data frame when it is not 0); compressed, the trailer
    gives the count of data frames and their stored sizes.
    """
    p = os.fspath(path)
    fd = _open(p)
    try:
        size = _stat_size(fd, p)
        meta, body_start = _meta_fd(fd, p, size)
        try:
            _check_end(fd, p, size, meta, body_start)
        except StreamError as e:
            return meta, e
        return meta, None
    finally:
        os.close(fd)


def _check_end(fd: int, path: str, size: int, meta: StreamMeta, body_start: int) -> None:
    if meta.is_compressed:
        trailer, trailer_pos = _read_trailer(fd, path, size, body_start)
        stop_pos = trailer_pos - FRAME_LEN
        payloads, data_frames = sum(sum(t) for t in trailer), len(trailer)
        if data_frames > meta.data_size or (meta.data_size > 0) != (data_frames > 0):
            raise StreamError(path, trailer_pos, f"the trailer lists {data_frames} data frames "
                                                 f"for dataSize {meta.data_size}")
    else:
        stop_pos = size - FRAME_LEN
        stop = pack_header(KIND_STOP, 0, 0)
        before = min(FRAME_LEN, max(stop_pos - body_start, 0))  # a zero header, the end of a payload
        tail = pread_exact(fd, before + FRAME_LEN, stop_pos - before, path, "stop header") \
            if stop_pos >= body_start else b""
        if tail[before:] != stop:
            raise StreamError(path, max(stop_pos, 0), "stream does not end with a stop frame (truncated?)")
        if tail[:before] == stop:
            raise StreamError(path, stop_pos - before, "two stop frames at the end of the stream")
        payloads, data_frames = meta.data_size, 1 if meta.data_size else 0
    rest = stop_pos - body_start - payloads
    if rest < 42 * data_frames or rest % 2 or (meta.is_compressed and (rest - 42 * data_frames) % FRAME_LEN):
        raise StreamError(path, stop_pos, f"the stream's {size} bytes do not hold the frames its meta "
                                          f"(dataSize {meta.data_size}) and trailer claim")
