"""Extents: pure logic, no I/O, so every case can be drawn and tested.

An extent is a run of bytes with the same state.  Flags are vmbk's, not the
wire's, because the two contexts we combine both use bit 0 on the wire
(NBD_STATE_HOLE for base:allocation, NBD_STATE_DIRTY for a dirty bitmap):

    HOLE  = 1   not allocated (base:allocation NBD_STATE_HOLE)
    ZERO  = 2   reads as zeroes (base:allocation NBD_STATE_ZERO)
    DIRTY = 4   written since the bitmap began (qemu:dirty-bitmap bit 0)

Every function here takes and returns *lazy* iterables so a disk of any
size is walked with bounded memory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

HOLE = 1
ZERO = 2
DIRTY = 4


@dataclasses.dataclass(frozen=True, slots=True)
class Extent:
    offset: int
    length: int
    flags: int = 0

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def hole(self) -> bool:
        return bool(self.flags & HOLE)

    @property
    def zero(self) -> bool:
        """Reads as zeroes: nothing to copy, only a zero range to record."""
        return bool(self.flags & ZERO)

    @property
    def dirty(self) -> bool:
        return bool(self.flags & DIRTY)


def merge(extents: Iterable[Extent]) -> Iterator[Extent]:
    """Join neighbours with the same flags; keep everything else as it is.

        in:   [0 data 4)[4 data 8)[8 zero 12)[12 zero 16)[16 data 20)
        out:  [0 data      8)[8 zero       16)[16 data 20)

        in:   [0 data 4)        [6 data 8)     (gap: not touching)
        out:  [0 data 4)        [6 data 8)

        in:   [0 data 4)[4 zero 8)[8 data 12)  (same flags, not adjacent)
        out:  unchanged

    Servers split extents at their own request windows and clusters, and
    we split at ours; merging gives the backup few, long ranges to read.
    """
    cur: Extent | None = None
    for e in extents:
        if cur is not None and cur.end == e.offset and cur.flags == e.flags:
            cur = Extent(cur.offset, cur.length + e.length, cur.flags)
            continue
        if cur is not None:
            yield cur
        cur = e
    if cur is not None:
        yield cur


def clip(extents: Iterable[Extent], end: int) -> list[Extent]:
    """The extents up to ``end``: later ones dropped, the one across it cut.

        end:                         |
        in:   [0 a 4)[4 b      12)[12 c 16)
        out:  [0 a 4)[4 b   10)

    A server may describe beyond what we asked (the spec allows the last
    extent to run past the request); we never report past our range.
    """
    out = []
    for e in extents:
        if e.offset >= end:
            break
        if e.end > end:
            e = Extent(e.offset, end - e.offset, e.flags)
        out.append(e)
    return out


def intersect(a: Iterable[Extent], b: Iterable[Extent]) -> Iterator[Extent]:
    """Overlay two contiguous runs covering the same range; flags are OR-ed.

        dirty:  [0 clean    8)[8 DIRTY              24)[24 clean 32)
        alloc:  [0 data 4)[4 ZERO|HOLE  12)[12 data               32)
        out:    [0   4)[4 Z 8)[8 D|Z 12)[12 D      24)[24        32)

    Every boundary of either side is a boundary of the result, so each
    output extent is uniform in both contexts.  For an incremental backup:
    DIRTY without ZERO is data to read, DIRTY with ZERO a zero range to
    record, anything not DIRTY is unchanged.  ValueError when the two
    sides do not cover the same range or are not contiguous.
    """
    ia, ib = iter(a), iter(b)
    x, y = next(ia, None), next(ib, None)
    if x is None or y is None:
        if x is not None or y is not None:
            raise ValueError("intersect: one side is empty")
        return
    if x.offset != y.offset:
        raise ValueError(f"intersect: sides start at {x.offset} and {y.offset}")
    pos = x.offset
    while x is not None and y is not None:
        end = min(x.end, y.end)
        yield Extent(pos, end - pos, x.flags | y.flags)
        pos = end
        if x.end == end:
            x = _next_at(ia, end)
        if y.end == end:
            y = _next_at(ib, end)
    if x is not None or y is not None:
        raise ValueError(f"intersect: sides end at different offsets (near {pos})")


def _next_at(it: Iterator[Extent], offset: int) -> Extent | None:
    e = next(it, None)
    if e is not None and e.offset != offset:
        raise ValueError(f"intersect: gap or overlap at {offset} (next starts at {e.offset})")
    return e


def split(extents: Iterable[Extent | tuple[int, int]], size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) pieces of at most ``size`` bytes, in input order.

        size 4:  [0        10)[10 12)  ->  (0,4) (4,4) (8,2) (10,2)

    Pieces never join across extents: the caller chose the ranges (e.g.
    only data extents) and a piece spanning two of them would read a gap.
    """
    if size <= 0:
        raise ValueError("split size must be positive")
    for e in extents:
        offset, length = (e.offset, e.length) if isinstance(e, Extent) else e
        end = offset + length
        while offset < end:
            n = min(size, end - offset)
            yield offset, n
            offset += n


def spans(extents: Iterable[Extent], gap: int, most: int) -> Iterator[tuple[int, int]]:
    """(start, end) ranges covering ``extents``, neighbours closer than ``gap`` joined.

        gap 4:   [0 a 2)   [5 b 6)            [20 c 22)
        out:     (0,           6)             (20,   22)

    More than ``most`` ranges: one range from the first start to the last
    end instead.  For an incremental backup the extents are the dirty ones
    of one window of the bitmap, the ranges where allocation is asked: a
    few requests over what changed instead of one over all the window
    (on a thinly used qcow2 the server reads an L2 table per GiB for it),
    and never more than ``most`` per window however scattered the writes.
    """
    out: list[tuple[int, int]] = []
    for e in extents:
        if out and e.offset - out[-1][1] < gap:
            out[-1] = (out[-1][0], e.end)
        else:
            out.append((e.offset, e.end))
    if len(out) > most:
        out = [(out[0][0], out[-1][1])]
    yield from out
