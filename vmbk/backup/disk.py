"""One disk, from an NBD export into a stream file.

The stream's meta header comes first and must carry ``dataSize``, so the
extents are walked before anything is copied (virtnbdbackup does the same
from a full extent list).  The walk is kept (`_Plan`: three integers per
extent, at most `PLAN_LIMIT` extents, 6 MiB) and replayed for the copy.
Walking block status is not free: on a thinly used 1 TiB qcow2 it is
QEMU's L2 tables, ~0.7 s, most of a full backup of 64 MiB of data
(bench/README.md, "Sparse disks"), so it is done once.  A disk more
fragmented than that is walked again instead: the export is a
point-in-time image (a libvirt pull-mode backup job, or a read-only
qemu-nbd of a shut-off disk), so the second walk gives the same extents,
and memory stays bounded whatever the disk.

The second walk lays the stream out as it goes, one request ahead of the
reader: zero frames are written and every data request gets its frame
reserved (its place in the file) before it is sent.  The reader's
connection threads then fill each frame as its data arrives (checksum or
compress it), and this thread takes the frames in the order they arrive
(`Reader.read_unordered`, `StreamWriter.finish`: ~15% faster than in disk
order, bench/README.md).  Uncompressed, every frame's place is known, so
it is written there at once; a compressed frame waits until the frames
before it are written (at most `COMPRESSED_WINDOW` reads ahead).

What goes into the stream:

* full / copy: every allocated extent as data, every other range as a
  ``zero`` frame, as virtnbdbackup writes them;
* inc: the dirty bitmap over allocation: dirty data as data, dirty ranges
  that now read as zero (the guest zeroed or trimmed them) as ``zero``
  frames — vmbk's extension, so a chain restores bit-exact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path

from vmbk.cancel import Cancel
from vmbk.nbd import Address, Extent, Reader
from vmbk.nbd.extents import split
from vmbk import __version__
from vmbk.stream import StreamMeta, StreamWriter, write_stream_atomic
from vmbk.stream.format import MANIFEST_KEY, WRITTEN_BY_KEY

log = logging.getLogger("vmbk.backup")

LEVELS = ("full", "inc", "copy")
#: Compressed frames finished ahead of an older one wait in memory for it:
#: at most this many reads ahead (of <= 512 KiB each: 16 MiB per disk).
COMPRESSED_WINDOW = 32
Progress = Callable[[int, int], None]


@dataclasses.dataclass(frozen=True)
class DiskBackup:
    target: str                      # disk target, e.g. vda
    address: Address                 # the NBD export of this disk
    level: str                       # full | inc | copy
    path: Path                       # final .data path (written via .partial)
    disk_format: str = "qcow2"
    checkpoint: str = ""
    parent: str = ""
    dirty_bitmap: str | None = None  # NBD meta context name suffix for inc
    compression: int | None = None   # lz4 level, None = uncompressed
    mode: int = 0o640
    connections: int | None = None
    cancel: Cancel | None = None     # checked between chunks


@dataclasses.dataclass(frozen=True)
class DiskResult:
    target: str
    path: Path
    level: str
    virtual_size: int
    data_size: int
    stored_size: int
    checksum: int
    zero_frames: int
    seconds: float
    sha256: str = ""  # the stream digest (`vmbk.stream.digest`), for the manifest


#: Extents kept from the first walk (24 bytes each); a disk with more is walked twice.
PLAN_LIMIT = 256 * 1024


def _plan_extents(reader: Reader, level: str) -> Iterator[Extent]:
    """Extents to write, in disk order; ZERO ones become zero frames."""
    if level == "inc":
        yield from reader.dirty_extents()
    else:
        yield from reader.extents()


class _Plan:
    """The extents of one walk and their data bytes; replayed, or walked again past ``limit``."""

    def __init__(self, walk: Callable[[], Iterator[Extent]], limit: int | None = None) -> None:
        limit = PLAN_LIMIT if limit is None else limit
        self._walk = walk
        self.data_size = 0
        self._kept: array[int] | None = array("Q")  # offset, length, flags of each extent
        for e in walk():
            if not e.zero:
                self.data_size += e.length
            if self._kept is not None:
                if len(self._kept) >= 3 * limit:
                    self._kept = None  # too many: the copy walks again
                else:
                    self._kept += array("Q", (e.offset, e.length, e.flags))

    @property
    def kept(self) -> bool:
        return self._kept is not None

    def __iter__(self) -> Iterator[Extent]:
        if self._kept is None:
            yield from self._walk()
            return
        k = self._kept
        for i in range(0, len(k), 3):
            yield Extent(k[i], k[i + 1], k[i + 2])


def _lay_out(
    writer: StreamWriter, extents: Iterator[Extent], request_size: int, cancel: Cancel | None
) -> Iterator[Extent]:
    """The reads to send, one per data frame, each reserved in ``writer``.

    Zero extents become zero frames here (checking ``cancel``: a long run
    of them reaches no read); data extents are cut at the request size so
    that every read fills exactly one reserved frame.
    """
    for e in extents:
        if e.zero:
            if cancel is not None:
                cancel.check()
            writer.write_zero(e.offset, e.length)
            continue
        for offset, length in split([e], request_size):
            writer.reserve(offset, length)
            yield Extent(offset, length)


def backup_disk(job: DiskBackup, progress: Progress | None = None) -> DiskResult:
    if job.level not in LEVELS:
        raise ValueError(f"unknown backup level {job.level!r}")
    started = time.monotonic()
    kwargs = {"dirty_bitmap": job.dirty_bitmap} if job.level == "inc" else {}
    if job.connections:
        kwargs["connections"] = job.connections  # type: ignore[assignment]
    with Reader(job.address, **kwargs) as reader:  # type: ignore[arg-type]
        size = reader.size
        plan = _Plan(functools.partial(_plan_extents, reader, job.level))
        data_size = plan.data_size
        meta = StreamMeta(
            virtual_size=size,
            data_size=data_size,
            disk_name=job.target,
            disk_format=job.disk_format,
            checkpoint_name=job.checkpoint,
            parent_checkpoint=job.parent,
            incremental=job.level == "inc",
            compressed=job.compression if job.compression is not None else False,
            extra={WRITTEN_BY_KEY: f"vmbk {__version__}", MANIFEST_KEY: 1},
        )
        done = 0
        with write_stream_atomic(job.path, meta, mode=job.mode) as writer:
            reads = _lay_out(writer, iter(plan), reader.request_size, job.cancel)
            # Uncompressed, every frame's place is known: each is written as it
            # comes.  A compressed one's place is known once the frames before
            # it are compressed: it waits (window: how many may) for them.
            chunks = reader.read_unordered(
                reads, process=functools.partial(writer.fill, write=False),
                window=None if job.compression is None else COMPRESSED_WINDOW)
            # closing(): no fill may run once the writer is aborted
            with contextlib.closing(chunks):
                for chunk in chunks:
                    if job.cancel is not None:
                        job.cancel.check()
                    writer.finish(chunk.result)
                    done += chunk.length
                    if progress is not None:
                        progress(done, data_size)
        result = DiskResult(
            target=job.target,
            path=job.path,
            level=job.level,
            virtual_size=size,
            data_size=writer.data_size,
            stored_size=writer.size,
            checksum=writer.checksum,
            sha256=writer.sha256,
            zero_frames=writer.zero_frames,
            seconds=time.monotonic() - started,
        )
    log.info("%s: %s backup, %d of %d bytes in %.2f s", job.target, job.level, result.data_size, size, result.seconds)
    return result
