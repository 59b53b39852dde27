"""Reading lz4-compressed payloads fast: stored blocks are copied, not decompressed.

A compressed stream's data frame is one or more lz4 frames ("pieces",
`vmbk.stream.scan`).  Data that does not compress (most of a real disk:
already compressed files, encrypted or random data) sits in an lz4 frame
as *stored* blocks, the raw bytes behind a 4-byte length with its high
bit set.  ``lz4.frame.decompress`` still copies them through two fresh
buffers and checks the xxh32 block and content checksums vmbk's writer
adds: ~0.8 GB/s here, the whole cost of restoring a compressed full
(bench/restore.py).  This module parses the lz4 frame format (lz4's
doc/lz4_Frame_format.md) itself: a piece whose blocks are all stored is
read with one ``preadv`` into a reused buffer and its blocks are copied out
of it; a piece with any compressed block goes to ``lz4.frame`` whole (its
checksums checked).  Stored blocks are then as trustworthy as an
uncompressed payload: the stream's adler32 ``.chksum`` covers both.

Anything unexpected -- no content size in the header, a malformed block
list -- falls back to `StreamReader`, which reports it properly.
"""

from __future__ import annotations

import os
import struct

import lz4.frame

from vmbk.stream.format import MAX_PIECE_SIZE, StreamError
from vmbk.stream.reader import StreamReader
from vmbk.stream.scan import Frame

LZ4_MAGIC = 0x184D2204
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_HEAD_MAX = 19  # magic, FLG, BD, content size, dict id, HC


class Lz4Reader:
    """Random access to the compressed frames of one stream (`StreamReader` does the rest)."""

    def __init__(self, reader: StreamReader) -> None:
        self.reader = reader
        self.path = reader.path
        self._fd = os.open(reader.path, os.O_RDONLY | os.O_CLOEXEC)
        self._offsets: tuple[int, tuple[int, ...] | None] = (-1, None)  # frame -> piece raw offsets
        self._scratch = bytearray(0)
        self._piece = -1  # file position of the cached piece
        self._stored: list[tuple[int, int, int]] | None = None  # (raw offset, length, scratch offset)
        self._data: bytes | None = None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def read_into(self, frame: Frame, start: int, out: memoryview) -> None:
        """``out`` gets the frame's bytes ``[start, start + len(out))``."""
        offsets = self._piece_offsets(frame)
        if offsets is None:
            self.reader.read_frame_into(frame, out, start)
            return
        end = start + out.nbytes
        pos = frame.file_pos
        for i, stored in enumerate(frame.pieces):
            lo, hi = offsets[i], offsets[i + 1]
            if hi > start and lo < end:
                a, b = max(lo, start), min(hi, end)
                if not self._copy(pos, stored, hi - lo, a - lo, out[a - start:b - start]):
                    self.reader.read_frame_into(frame, out[a - start:b - start], a)
            elif lo >= end:
                break
            pos += stored

    def _piece_offsets(self, frame: Frame) -> tuple[int, ...] | None:
        """Where each piece starts in the frame's bytes (and the end), from the lz4 headers."""
        if self._offsets[0] == frame.file_pos:
            return self._offsets[1]
        offsets = [0]
        pos = frame.file_pos
        for stored in frame.pieces:
            head = os.pread(self._fd, min(stored, _HEAD_MAX), pos)
            size = _content_size(head)
            if size is None or not 0 < size <= MAX_PIECE_SIZE:
                offsets = []
                break
            offsets.append(offsets[-1] + size)
            pos += stored
        result = tuple(offsets) if offsets and offsets[-1] == frame.length else None
        self._offsets = (frame.file_pos, result)
        return result

    def _copy(self, pos: int, stored: int, size: int, start: int, out: memoryview) -> bool:
        """The piece at ``pos``, bytes ``[start, start + len(out))``, into ``out``; False: use the fallback."""
        if self._piece != pos:
            self._piece, self._stored, self._data = -1, None, None
            if len(self._scratch) < stored:
                self._scratch = bytearray(stored)
            view = memoryview(self._scratch)[:stored]
            got = os.preadv(self._fd, [view], pos)
            if got != stored:
                raise StreamError(self.path, pos + got, f"file ends inside an lz4 piece of {stored} bytes")
            blocks = _stored_blocks(view, size)
            if blocks is None:
                return False
            if blocks:
                self._stored = blocks
            else:  # a compressed block: lz4 decompresses and checks the whole piece
                try:
                    data = lz4.frame.decompress(view)
                except RuntimeError:
                    return False
                if len(data) != size:
                    return False
                self._data = data
            self._piece = pos
        end = start + out.nbytes
        if self._data is not None:
            out[:] = memoryview(self._data)[start:end]
            return True
        src = memoryview(self._scratch)
        assert self._stored is not None
        for raw, n, at in self._stored:
            if raw + n > start and raw < end:
                a, b = max(raw, start), min(raw + n, end)
                out[a - start:b - start] = src[at + a - raw:at + b - raw]
        return True


def _content_size(head: bytes) -> int | None:
    """The content size an lz4 frame header declares, None when it has none (or is not one)."""
    if len(head) < 7 or _U32.unpack_from(head)[0] != LZ4_MAGIC:
        return None
    flg = head[4]
    if flg >> 6 != 1 or not flg & 0x08 or len(head) < 14:
        return None
    size: int = _U64.unpack_from(head, 6)[0]
    return size


def _stored_blocks(piece: memoryview, size: int) -> list[tuple[int, int, int]] | None:
    """Stored blocks of a whole lz4 frame: [(raw offset, length, offset in piece)].

    ``[]`` when some block is compressed, None when the frame is not what
    its header and ``size`` say (the fallback reports it).
    """
    flg = piece[4]
    pos = 6 + (8 if flg & 0x08 else 0) + (4 if flg & 0x01 else 0) + 1
    block_sum = 4 if flg & 0x10 else 0
    blocks = []
    raw = 0
    n = len(piece)
    while True:
        if pos + 4 > n:
            return None
        word = _U32.unpack_from(piece, pos)[0]
        pos += 4
        if word == 0:
            break
        length = word & 0x7FFFFFFF
        if not word & 0x80000000:
            return []
        if pos + length + block_sum > n:
            return None
        blocks.append((raw, length, pos))
        raw += length
        pos += length + block_sum
    pos += 4 if flg & 0x04 else 0
    if pos != n or raw != size:
        return None
    return blocks
