"""Merging the extent maps of a backup chain: the newest frame wins.

A chain is a full (or copy) stream followed by incrementals, oldest
first.  Restoring it naively writes every frame of every stream in turn,
rewriting the bytes that changed several times.  :func:`merge_chain`
computes, without reading any payload, which frame provides each byte in
the end, so a restore writes every byte once.

Pictures: one character per byte (or per ``unit``).  In a stream, a
letter is data, a digit is a zero frame, ``.`` is not in the stream; runs
of the same character are one frame.  In the merged result, data shows as
``A``, ``B``, ``C``... for stream 0, 1, 2... and zero as the stream's
digit:

    full    AAAAAAAA0000AAAA........
    inc 1   ..BBBB....BB......BB....
    inc 2   .CC.......2222..........
    merged  ACCBBBAA002222AA..BB....

>>> chain = [frames_from_picture(p) for p in (
...     "AAAAAAAA0000AAAA........",
...     "..BBBB....BB......BB....",
...     ".CC.......2222..........",
... )]
>>> picture(merge_chain(chain), 24)
'ACCBBBAA002222AA..BB....'

The segments say where their bytes come from: the full's first frame
provides byte 0 and, from its offset 6, bytes 6 and 7:

>>> for s in merge_chain(chain)[:4]:
...     print(s.offset, s.length, s.kind, s.source, s.frame.offset, s.frame_offset)
0 1 data 0 0 0
1 2 data 2 1 0
3 3 data 1 2 1
6 2 data 0 0 6

virtnbdrestore ignores zero frames; ``zero_frames=False`` merges the same
way, which shows what it restores from the same chain: inc 2's zero frame
does not hide inc 1's data or the full's:

>>> picture(merge_chain(chain, zero_frames=False), 24)
'ACCBBBAA..BBAAAA..BB....'

A later frame may cover several older ones and cut others at both ends:

>>> picture(merge_chain([frames_from_picture(p) for p in (
...     "AA.AA.AA",
...     ".BBBBBB.",
... )]), 8)
'ABBBBBBA'

The result covers exactly the bytes some stream wrote, with
non-overlapping segments in disk order.  The ``offset``, ``length`` and
``kind`` of a segment are those of the winning frame, clipped.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from vmbk.stream.format import KIND_DATA, KIND_ZERO
from vmbk.stream.reader import StreamReader
from vmbk.stream.scan import Frame, StreamMap, scan

ChainSource = StreamMap | Sequence[Frame]


@dataclass(frozen=True, slots=True)
class Segment:
    """Bytes ``[offset, offset+length)`` come from ``frame`` of stream ``source``.

    ``frame_offset`` is where they start within the frame:
    ``frame.offset + frame_offset == offset``.
    """

    offset: int
    length: int
    kind: str
    source: int
    frame: Frame
    frame_offset: int

    @property
    def end(self) -> int:
        return self.offset + self.length


def _frames_of(src: ChainSource, index: int) -> Sequence[Frame]:
    frames = src.frames if isinstance(src, StreamMap) else src
    prev = 0
    for f in frames:
        if f.length <= 0 or f.offset < prev:
            raise ValueError(
                f"stream {index}: frames must be non-empty, increasing and non-overlapping "
                f"(frame at {f.offset}+{f.length} after {prev})"
            )
        prev = f.end
    return frames


def _union(a: list[tuple[int, int]], frames: Sequence[Frame]) -> list[tuple[int, int]]:
    """Union of sorted disjoint intervals ``a`` with the (sorted) frames."""
    out: list[tuple[int, int]] = []
    i = j = 0
    while i < len(a) or j < len(frames):
        if j >= len(frames) or (i < len(a) and a[i][0] <= frames[j].offset):
            s, e = a[i]
            i += 1
        else:
            s, e = frames[j].offset, frames[j].end
            j += 1
        if out and s <= out[-1][1]:
            if e > out[-1][1]:
                out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def merge_chain(chain: Sequence[ChainSource], *, zero_frames: bool = True) -> list[Segment]:
    """The segments that make up the chain's final image, in disk order.

    ``chain``: the extent maps (or frame lists) oldest first.  For every
    byte written by some stream, the newest frame covering it wins.
    ``zero_frames=False`` ignores zero frames, as virtnbdrestore does.
    Pure: reads nothing, cost O(frames x chain length).
    """
    covered: list[tuple[int, int]] = []  # bytes already owned by newer streams
    segments: list[Segment] = []
    for index in range(len(chain) - 1, -1, -1):
        frames = _frames_of(chain[index], index)
        if not zero_frames:
            frames = [f for f in frames if f.kind != KIND_ZERO]
        j = 0
        for fr in frames:
            s, e = fr.offset, fr.end
            while j < len(covered) and covered[j][1] <= s:
                j += 1
            k = j
            cur = s
            while cur < e:
                if k < len(covered) and covered[k][0] <= cur:
                    cur = max(cur, covered[k][1])
                    k += 1
                    continue
                gap_end = min(covered[k][0], e) if k < len(covered) else e
                segments.append(Segment(cur, gap_end - cur, fr.kind, index, fr, cur - s))
                cur = gap_end
        covered = _union(covered, frames)
    segments.sort(key=lambda seg: seg.offset)
    return segments


# -- applying a chain to a plain file -----------------------------------------


def reconstruct_raw(
    paths: Sequence[str | os.PathLike[str]],
    target: str | os.PathLike[str],
    *,
    zero_frames: bool = True,
) -> list[Segment]:
    """Write the image a chain of stream files describes to a raw file.

    ``target`` is created (truncated) at the newest stream's virtualSize,
    sparse, and every data segment is written once; zero segments are
    holes already.  Returns the segments.  For tests, verification and
    restores without NBD.
    """
    maps = [scan(p) for p in paths]
    if not maps:
        raise ValueError("empty chain")
    segments = merge_chain(maps, zero_frames=zero_frames)
    readers = [StreamReader(p, m) for p, m in zip(paths, maps, strict=True)]
    try:
        fd = os.open(os.fspath(target), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, maps[-1].meta.virtual_size)
            for seg in segments:
                if seg.kind != KIND_DATA:
                    continue
                for off, chunk in readers[seg.source].iter_chunks(
                    seg.frame, seg.frame_offset, seg.length
                ):
                    view = chunk
                    while view.nbytes:
                        n = os.pwrite(fd, view, off)
                        view = view[n:]
                        off += n
        finally:
            os.close(fd)
    finally:
        for r in readers:
            r.close()
    return segments


# -- pictures (documentation and tests) ---------------------------------------


def frames_from_picture(picture_text: str, unit: int = 1) -> list[Frame]:
    """Frames drawn as text: letter = data, digit = zero, ``.`` = absent."""
    frames: list[Frame] = []
    i = 0
    while i < len(picture_text):
        ch = picture_text[i]
        j = i
        while j < len(picture_text) and picture_text[j] == ch:
            j += 1
        if ch != ".":
            kind = KIND_ZERO if ch.isdigit() else KIND_DATA
            off, length = i * unit, (j - i) * unit
            frames.append(
                Frame(kind, off, length, off, length if kind == KIND_DATA else 0, (), off)
            )
        i = j
    return frames


def picture(segments: Sequence[Segment], size: int, unit: int = 1) -> str:
    """Draw merged segments: ``A``.. for data of stream 0.., digits for zero."""
    out = ["."] * size
    for seg in segments:
        if seg.kind == KIND_DATA:
            ch = chr(ord("A") + seg.source) if seg.source < 26 else "?"
        else:
            ch = str(seg.source) if seg.source < 10 else "#"
        for p in range(seg.offset // unit, seg.end // unit):
            out[p] = ch
    return "".join(out)
