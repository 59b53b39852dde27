"""The SHA-256 *stream digest* of a ``.data`` file, for the manifests.

A manifest (`vmbk.manifest`) names every file of a restore point with its
SHA-256.  For a stream file that digest must be taken on the pass that
writes it (issue #16: at most 10 % off the backup's throughput), but an
uncompressed backup writes its frames out of order, from the NBD
workers, and frees each buffer as soon as it is written
(`vmbk.stream.writer`, `Reader.read_unordered`): a plain SHA-256 over
the file, which must see the bytes in file order, would have to keep
every buffer until the frames before it came (measured: 3.2-3.9 s
instead of 2.1-2.4 s for the bench's 3.5 GiB, bench/README.md).  So the
digest of a stream is defined over its frames::

    stream digest = SHA-256 of the file's bytes in file order, with the
                    payload of every ``data`` frame (the stored bytes
                    between its 40-byte header and its CRLF: compressed
                    or not) replaced by the 32-byte SHA-256 of that payload

Every other byte (meta frame, zero and stop headers, CRLFs, the
compression trailer and its ``comp`` header) goes in as it is.  The
workers hash each payload as it arrives (`StreamWriter.fill`), in
parallel; the thread that commits frames in disk order feeds the small
rest and the payload digests (`StreamWriter.commit`), so the digest
costs one SHA-256 pass over the data, spread over the cores, and no
memory.  A reader parses the frames (for a compressed stream the
payload sizes come from the trailer) and computes the same value in one
sequential read (`file_digest`), the adler32 of the ``.chksum`` on the
same read.  Any change of a byte changes the value: a header decides
where a payload ends and is hashed itself, and the trailer that sizes
compressed payloads is hashed too.  man/vmbk-format.5 has the rule for
an independent implementation (`contrib/vmbk-extract` is one).

Files that are not streams get a plain SHA-256 (`plain_digest`): what
``sha256sum`` prints.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import hashlib
import os
import queue
from collections.abc import Callable, Iterator, Sequence

from vmbk.stream.checksum import adler32, adler32_combine
from vmbk.stream.format import StreamError
from vmbk.stream.scan import StreamMap, scan_fd

#: Bytes read at a time.
BUFFER = 8 << 20


def payload_digest(pieces: Sequence[bytes | bytearray | memoryview]) -> bytes:
    """SHA-256 of one data frame's stored payload (its lz4 pieces end to end)."""
    h = hashlib.sha256()
    for p in pieces:
        h.update(p)
    return h.digest()


@contextlib.contextmanager
def _opened(path: str | os.PathLike[str], smap: StreamMap | None,
            ) -> Iterator[tuple[int, str, StreamMap, list[tuple[int, int]]]]:
    """(fd, path, the stream's map, its data payloads as (start, end)) of an open
    stream file; StreamError when it cannot be opened or its frames are damaged."""
    p = os.fspath(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise StreamError(p, 0, f"cannot open: {e.strerror}") from None
    try:
        if smap is None:
            smap = scan_fd(fd, p)
        yield fd, p, smap, [(f.file_pos, f.file_pos + f.stored_len) for f in smap.frames if f.is_data]
    finally:
        os.close(fd)


def sequential_digest(path: str | os.PathLike[str], *, smap: StreamMap | None = None,
                      check: Callable[[], None] | None = None, buffer_size: int = BUFFER) -> tuple[str, int, StreamMap]:
    """`file_digest` in one thread, buffer after buffer: the reference the
    parallel one is tested against (and what an independent reader does)."""
    with _opened(path, smap) as (fd, p, smap, payloads):
        top = hashlib.sha256()
        value = 1
        view = memoryview(bytearray(buffer_size))
        pos = 0
        i = 0  # the next payload
        cur: hashlib._Hash | None = None  # the payload being hashed
        while True:
            if check is not None:
                check()
            try:
                n = os.preadv(fd, [view], pos)
            except OSError as e:
                raise StreamError(p, pos, f"reading: {e.strerror or e}") from None
            if not n:
                break
            chunk = view[:n]
            value = adler32(chunk, value)
            at = 0
            while at < n:
                here = pos + at
                if cur is not None:  # inside a payload
                    end = payloads[i][1]
                    take = min(n - at, end - here)
                    cur.update(chunk[at:at + take])
                    at += take
                    if here + take == end:
                        top.update(cur.digest())
                        cur = None
                        i += 1
                    continue
                start = payloads[i][0] if i < len(payloads) else None
                if start is not None and start == here:
                    if payloads[i][1] == start:  # an empty payload: never written, but well defined
                        top.update(hashlib.sha256().digest())
                        i += 1
                    else:
                        cur = hashlib.sha256()
                    continue
                take = n - at if start is None else min(n - at, start - here)
                top.update(chunk[at:at + take])
                at += take
            pos += n
        if pos != smap.file_size or cur is not None or i != len(payloads):
            raise StreamError(p, pos, f"the file changed while it was read ({pos} of {smap.file_size} bytes)")
        return top.hexdigest(), value, smap


def file_digest(path: str | os.PathLike[str], *, smap: StreamMap | None = None,
                check: Callable[[], None] | None = None, buffer_size: int = BUFFER,
                workers: int | None = None) -> tuple[str, int, StreamMap]:
    """(stream digest, adler32, the stream's map) of a stream file, in one read.

    The frames are found with `vmbk.stream.scan` first (StreamError when
    the structure is damaged: then there is no digest to compare).
    ``check`` is called before each region (it raises to stop).

    The payloads' SHA-256 are independent of each other (the definition
    above), so the file is read in regions of about ``buffer_size`` cut
    between payloads, each hashed by one of ``workers`` threads (hashlib,
    zlib and ``preadv`` release the GIL): its adler32, its payloads'
    digests and the bytes between them.  This thread folds them in file
    order -- the adler32s with ``adler32_combine``, the rest into the top
    SHA-256 -- so the values are those of one sequential pass
    (`sequential_digest`), at the speed of the cores: a restore checks its
    streams beside the writing of the image, a verify reads at disk speed.
    At most ``workers`` + 1 regions are in memory.
    """
    with _opened(path, smap) as (fd, p, smap, payloads):
        regions = _regions(p, smap.file_size, payloads, buffer_size)
        top = hashlib.sha256()
        value = 1
        n = workers or min(4, os.cpu_count() or 1)
        # buffers used again (a fresh 8 MiB each time is a page fault per 4 KiB); a region
        # much larger than the rest (one huge frame) gets its own
        size = min(max((e - s for s, e, _, _ in regions), default=0), 4 * buffer_size)
        spare: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(n + 1):
            spare.put(bytearray(size))
        with cf.ThreadPoolExecutor(max_workers=n, thread_name_prefix="digest") as pool:
            pending: collections.deque[cf.Future[tuple[int, int, list[bytes]]]] = collections.deque()
            todo = iter(regions)
            try:
                while True:
                    while len(pending) <= n:
                        region = next(todo, None)
                        if region is None:
                            break
                        if check is not None:
                            check()
                        pending.append(pool.submit(_hash_region, fd, p, *region, payloads, spare))
                    if not pending:
                        break
                    a, length, parts = pending.popleft().result()
                    value = adler32_combine(value, a, length)
                    for part in parts:
                        top.update(part)
            finally:
                for f in pending:
                    f.cancel()
        if os.fstat(fd).st_size != smap.file_size:
            raise StreamError(p, smap.file_size, "the file changed while it was read")
        return top.hexdigest(), value, smap


def _regions(path: str, size: int, payloads: Sequence[tuple[int, int]], target: int,
             ) -> list[tuple[int, int, int, int]]:
    """``(start, end, first, last)``: byte ranges of about ``target`` bytes that
    cover the file, never cutting a payload, with the payloads they hold."""
    out: list[tuple[int, int, int, int]] = []
    start, i = 0, 0
    while start < size:
        end = min(size, start + target)
        j = i
        while j < len(payloads) and (payloads[j][0] < end or (end == size and payloads[j][0] <= size)):
            end = max(end, payloads[j][1])
            j += 1
        out.append((start, end, i, j))
        start, i = end, j
    if i != len(payloads) or start != size:
        raise StreamError(path, start, "data payloads outside the file")
    return out


def _hash_region(fd: int, path: str, start: int, end: int, first: int, last: int,
                 payloads: Sequence[tuple[int, int]], spare: queue.SimpleQueue[bytearray],
                 ) -> tuple[int, int, list[bytes]]:
    """(adler32 of the region from 1, its length, its parts for the top SHA-256 in order)."""
    own = spare.get()
    try:
        return _hash_into(own if len(own) >= end - start else bytearray(end - start), fd, path, start, end,
                          payloads[first:last])
    finally:
        spare.put(own)


def _hash_into(into: bytearray, fd: int, path: str, start: int, end: int,
               payloads: Sequence[tuple[int, int]]) -> tuple[int, int, list[bytes]]:
    buf = memoryview(into)[:end - start]
    got = 0
    while got < len(buf):
        try:
            r = os.preadv(fd, [buf[got:]], start + got)
        except OSError as e:
            raise StreamError(path, start + got, f"reading: {e.strerror or e}") from None
        if not r:
            raise StreamError(path, start + got, f"the file changed while it was read ({start + got} bytes)")
        got += r
    parts: list[bytes] = []
    at = start
    for ps, pe in payloads:
        if ps > at:
            parts.append(bytes(buf[at - start:ps - start]))
        parts.append(hashlib.sha256(buf[ps - start:pe - start]).digest())
        at = pe
    if at < end:
        parts.append(bytes(buf[at - start:]))
    return adler32(buf, 1), end - start, parts


def plain_digest(path: str | os.PathLike[str], *, buffer_size: int = 1 << 20) -> tuple[str, int]:
    """(SHA-256 hex, size) of any file: ``sha256sum``'s value."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb", buffering=0) as fh:
        view = memoryview(bytearray(buffer_size))
        while n := fh.readinto(view):
            h.update(view[:n])
            size += n
    return h.hexdigest(), size
