"""Walking block status over a whole range, one window at a time.

A mixin because two classes answer block status: `Client` on its own
socket, and `Reader`, which must route the request through the thread that
owns its first connection.  Both provide `block_status`, `size`,
`contexts` and `dirty_bitmap`; the walking is the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from . import wire
from .errors import Unsupported
from .extents import Extent, clip, intersect, merge, spans

#: BLOCK_STATUS asks this much at a time, so a 1 TiB disk is walked in
#: 1024 requests as the caller iterates, each answer small (qcow2 with
#: 64 KiB clusters: at most 16 Ki extents per GiB), never the whole disk
#: up front.
BLOCK_STATUS_WINDOW = 1024**3
#: `dirty_extents`: dirty runs of one window closer than this share an
#: allocation request, and a window has at most DIRTY_SPANS of them.
DIRTY_GAP = 64 * 1024**2
DIRTY_SPANS = 8


class ExtentQueries:
    @property
    def size(self) -> int:
        raise NotImplementedError

    @property
    def contexts(self) -> tuple[str, ...]:
        """Metadata contexts the server granted."""
        raise NotImplementedError

    @property
    def dirty_bitmap(self) -> str | None:
        """``qemu:dirty-bitmap:NAME`` when one was negotiated."""
        raise NotImplementedError

    def block_status(self, offset: int, length: int) -> dict[str, list[Extent]]:
        raise NotImplementedError

    def extents(
        self, context: str = wire.ALLOCATION, start: int = 0, length: int | None = None
    ) -> Iterator[Extent]:
        """Merged extents of one context, covering [start, start+length).

        Without base:allocation (a server without structured replies), the
        whole range is reported as data: correct, only slower to back up.
        """
        end = self._end(start, length)
        if context == wire.ALLOCATION and context not in self.contexts:
            if end > start:
                yield Extent(start, end - start, 0)
            return
        if context not in self.contexts:
            raise Unsupported(f"metadata context {context} was not negotiated")
        yield from merge(e for (run,) in self._walk([context], start, end) for e in run)

    def changed_extents(self, start: int = 0, length: int | None = None) -> Iterator[Extent]:
        """The dirty bitmap overlaid on allocation, merged, covering the range.

        DIRTY and not ZERO: data to copy; DIRTY and ZERO: a zero range to
        record; not DIRTY: unchanged since the bitmap began.
        """
        if not self.dirty_bitmap:
            raise Unsupported("changed_extents() needs dirty_bitmap=NAME when connecting")
        end = self._end(start, length)
        if wire.ALLOCATION not in self.contexts:
            yield from merge(e for (d,) in self._walk([self.dirty_bitmap], start, end) for e in d)
            return
        runs = self._walk([self.dirty_bitmap, wire.ALLOCATION], start, end)
        yield from merge(e for d, a in runs for e in intersect(d, a))

    def dirty_extents(self, start: int = 0, length: int | None = None) -> Iterator[Extent]:
        """The DIRTY extents of `changed_extents` (ZERO where they read as zeroes), in order.

        What an incremental backup copies.  Where a connection negotiated
        the bitmap alone (`bitmap_status`), the bitmap is walked there
        and allocation asked only over the dirty ranges (`spans`): on a
        thinly used 1 TiB qcow2 the combined walk costs the server an L2
        table per GiB, ~0.7 s, whatever changed (bench/README.md).
        """
        if not self.dirty_bitmap:
            raise Unsupported("dirty_extents() needs dirty_bitmap=NAME when connecting")
        end = self._end(start, length)
        only = self.bitmap_status()
        if only is None or wire.ALLOCATION not in self.contexts:
            yield from (e for e in self.changed_extents(start, end - start) if e.dirty)
            return
        ranges = (r for run in self._walk_bitmap(only, start, end)
                  for r in spans((e for e in run if e.dirty), DIRTY_GAP, DIRTY_SPANS))
        yield from merge(e for a, b in ranges for e in self.changed_extents(a, b - a) if e.dirty)

    def bitmap_status(self) -> Callable[[int, int], list[Extent]] | None:
        """Block status of the dirty bitmap alone, where a connection negotiated only it."""
        return None

    @staticmethod
    def _walk_bitmap(status: Callable[[int, int], list[Extent]], start: int, end: int) -> Iterator[list[Extent]]:
        pos = start
        while pos < end:
            run = status(pos, min(BLOCK_STATUS_WINDOW, end - pos))
            yield run
            pos = run[-1].end

    def _end(self, start: int, length: int | None) -> int:
        end = self.size if length is None else start + length
        if start < 0 or end < start or end > self.size:
            raise ValueError(f"range {start}..{end} outside export of {self.size} bytes")
        return end

    def _walk(self, names: Sequence[str], start: int, end: int) -> Iterator[list[list[Extent]]]:
        """Per window, each context's extents, clipped to where all reached.

        Servers may answer short (fewer bytes than asked, differently per
        context): the next window starts where the shortest one stopped.
        """
        pos = start
        while pos < end:
            res = self.block_status(pos, min(BLOCK_STATUS_WINDOW, end - pos))
            runs = [res[n] for n in names]
            stop = min(run[-1].end for run in runs)
            yield [clip(run, stop) for run in runs]
            pos = stop
