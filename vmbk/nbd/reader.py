"""Pipelined, multi-connection reading delivered in offset order.

The backup writes a stream file front to back, so data must come out in
the order the extents went in, whatever order the server answers in.

    caller thread                 worker thread k (one per connection)
    -------------                 ------------------------------------
    take a free buffer            start_read() every task queued to it
    queue task to worker i % N    wait for its oldest task, process() it,
    wait for the oldest task,       mark it done
    yield it, free its buffer     ...

Memory is the buffer pool (``buffers`` x ``request_size``), whatever the
disk size.  With several connections every one has a worker, the first
one too, so the caller's processing of one buffer overlaps receiving the
next.  Block status queries go to the first worker as calls, since only
the thread owning a connection may touch it; a `read` may thus consume a
lazy ``reader.extents()`` walk while reading.

``process``, given to `read`, runs on the worker that received the data,
right after it did: work on the data that may run in any order (the
backup's stream writer copies it into its place in the file, checksums
or compresses it there), spread over as many threads as connections.

With one connection there are no threads: the caller's thread sends the
requests and receives the replies itself, several in flight, so no
thread hand-over costs time per request.  That is faster when the caller
does little with each chunk (bench/README.md: 1 connection to null).
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any, NamedTuple

from .address import Address
from .client import Client
from .errors import HandshakeError, NbdError, ProtocolError
from .extents import Extent, split
from .status import ExtentQueries

log = logging.getLogger("vmbk.nbd")

#: Defaults measured with bench/nbd_read.py against qemu-nbd 7.2 (2 cores).
#: 512 KiB, not more: QEMU allocates a bounce buffer per request, and from
#: 1 MiB up glibc hands it fresh mmap'd pages every time, so qemu takes a
#: page fault per 4 KiB and throughput drops 3-4x (4 x 4 MiB: ~0.9 GB/s,
#: 4 x 512 KiB: ~3.5 GB/s, nbdcopy ~2.5 GB/s).  Sixteen buffers over four
#: connections keep four requests in flight on each.  A buffer is free
#: again only once its chunk is handed over, in order, and with eight a
#: backup's connections sat idle while the oldest frame was still being
#: written (bench/README.md).  The price: qemu's heap churns more (~40,000
#: page faults per 3.5 GB, ~0 with eight), which the backup more than
#: makes up for.  Handing buffers back out of order as soon as processed
#: kept eight busy but woke the caller's thread per buffer, which cost
#: more CPU than it saved.  The pool is 8 MiB whatever the disk size.
DEFAULT_CONNECTIONS = 4
DEFAULT_REQUEST_SIZE = 512 * 1024
DEFAULT_BUFFERS = 16

#: Extra connections that do not complete the handshake this fast are
#: given up: qemu-nbd --shared=N advertises multi-conn but stops accepting
#: at N clients, so client N+1 waits in the backlog, never greeted.
EXTRA_CONNECT_TIMEOUT = 5.0


class Chunk(NamedTuple):
    """A piece of the output: ``data`` is None for a range of zeroes.

    ``data`` is a view of a pooled buffer, valid until the generator is
    resumed: write or copy it, do not keep it.
    """

    offset: int
    length: int
    data: memoryview | None
    #: What `Reader.read`'s ``process`` returned for this chunk.
    result: Any = None


Process = Callable[[int, memoryview], Any]


class _Task:
    __slots__ = ("offset", "length", "buf", "view", "done", "error", "cmd", "call", "process", "result", "sink",
                 "worker", "seq")

    def __init__(
        self, offset: int, length: int, buf: memoryview | None, process: Process | None = None,
        sink: queue.SimpleQueue[_Task] | None = None,
    ) -> None:
        self.offset, self.length, self.buf = offset, length, buf
        self.view = buf[:length] if buf is not None else None
        self.done = threading.Event()
        #: Unordered reads: where the finished task is announced, and who has it.
        self.sink = sink
        self.worker = 0
        self.seq = 0
        self.error: BaseException | None = None
        self.cmd: Any = None
        self.call: Callable[[Client], Any] | None = None
        self.process = process
        self.result: Any = None

    def finish(self, error: BaseException | None = None) -> None:
        self.error = error
        self.done.set()
        if self.sink is not None:
            self.sink.put(self)


class Reader(ExtentQueries):
    """Read many extents of one export, pipelined over up to N connections.

        with Reader(url, dirty_bitmap="b0") as r:
            for c in r.read(e for e in r.changed_extents() if e.dirty):
                if c.data is None:
                    out.zero(c.offset, c.length)     # dirty and reads as zeroes
                else:
                    out.write(c.offset, c.data)      # data: a view, valid until next

    Connects several times only when the server advertises
    NBD_FLAG_CAN_MULTI_CONN, and settles for fewer connections if the
    server does not greet the extra ones.  ``dirty_bitmap`` is negotiated
    on the first connection, for `changed_extents`.  ``request_size`` is
    capped by the server's maximum payload.  One `read` at a time.
    With one connection the reader uses no threads (see the module's
    docstring).
    """

    def __init__(
        self,
        address: Address | str,
        *,
        connections: int = DEFAULT_CONNECTIONS,
        request_size: int = DEFAULT_REQUEST_SIZE,
        buffers: int = DEFAULT_BUFFERS,
        dirty_bitmap: str | None = None,
        timeout: float | None = 60.0,
        connect_timeout: float | None = None,
    ) -> None:
        first = Client(address, dirty_bitmap=dirty_bitmap, timeout=timeout, connect_timeout=connect_timeout)
        self._clients = [first]
        self._queues: list[queue.SimpleQueue[_Task | None]] = []
        self._threads: list[threading.Thread] = []
        self._broken: BaseException | None = None
        self._reading = False
        self._closed = False
        try:
            want = max(1, connections) if first.can_multi_conn else 1
            extra_timeout = min(connect_timeout or timeout or EXTRA_CONNECT_TIMEOUT, EXTRA_CONNECT_TIMEOUT)
            # the second connection of an incremental negotiates the bitmap
            # alone, for `dirty_extents` (it reads like the others); a server
            # that will not (HandshakeError) gets a plain one there
            only = dirty_bitmap
            while len(self._clients) < want:
                alone = only if len(self._clients) == 1 else None
                try:
                    extra = Client(first.address, timeout=timeout, connect_timeout=extra_timeout,
                                   dirty_bitmap=alone, allocation=alone is None)
                    self._clients.append(extra)
                except HandshakeError as e:
                    if alone is None:
                        log.warning("%s: using %d connections: %s", first.address, len(self._clients), e)
                        break
                    log.debug("%s: no connection with the dirty bitmap alone: %s", first.address, e)
                    only = None
                except NbdError as e:
                    log.warning("%s: using %d connections: %s", first.address, len(self._clients), e)
                    break
            size = min(request_size, first.max_payload)
            self.request_size = max(size - size % first.min_block_size, first.min_block_size)
            count = max(buffers, len(self._clients))
            self._pool = [memoryview(bytearray(self.request_size)) for _ in range(count)]
            #: One connection: the caller's thread drives it (no workers).
            self._inline = len(self._clients) == 1
            for i, client in enumerate([] if self._inline else self._clients):
                q: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
                th = threading.Thread(target=self._work, args=(client, q), name=f"nbd-{i}", daemon=True)
                self._queues.append(q)
                self._threads.append(th)
                th.start()
        except BaseException:
            self.close()
            raise
        #: The first connection: size, flags, block sizes.  Do not send
        #: requests on it directly while the reader is open (its worker
        #: owns it); use the reader's block_status/extents methods.
        self.client = first
        log.debug("%s: reader with %d connections, %d x %d bytes", first.address,
                  len(self._clients), count, self.request_size)

    @property
    def connections(self) -> int:
        """How many connections are open (1 unless the server allows more)."""
        return len(self._clients)

    @property
    def size(self) -> int:
        return self.client.size

    @property
    def contexts(self) -> tuple[str, ...]:
        return self.client.contexts

    @property
    def dirty_bitmap(self) -> str | None:
        return self.client.dirty_bitmap

    def block_status(self, offset: int, length: int) -> dict[str, list[Extent]]:
        """`Client.block_status` on the first connection (via its worker while a read runs)."""
        return self._call(0, lambda c: c.block_status(offset, length))

    def bitmap_status(self) -> Callable[[int, int], list[Extent]] | None:
        """The second connection's block status, when it negotiated the dirty bitmap alone."""
        if self._inline or self.client.dirty_bitmap is None or self._clients[1].contexts != (self.dirty_bitmap,):
            return None
        name = self.client.dirty_bitmap
        return lambda offset, length: self._call(1, lambda c: c.block_status(offset, length)[name])

    def _call(self, i: int, fn: Callable[[Client], Any]) -> Any:
        """fn(client i): here when no read runs (its worker is idle: nothing in flight), else
        on the worker that owns the connection.

        Here, when it can, because a hand-over to the worker and back is two
        thread wake-ups per request: a backup's walk of a 1 TiB disk is 1024
        of them, ~0.1 s of CPU on an idle machine, far more on a busy one.
        Inline (one connection), reads in flight are routed on the way.
        """
        if self._inline or not self._reading:
            self._check_usable()
            return fn(self._clients[i])
        task = _Task(0, 0, None)
        task.call = fn
        self._submit(i, task)
        task.done.wait()
        if task.error is not None:
            raise task.error
        return task.result

    def read(
        self, extents: Iterable[Extent | tuple[int, int]], process: Process | None = None
    ) -> Generator[Chunk, None, None]:
        """Chunks covering ``extents`` in their order; zero extents not read.

        Extents with the ZERO flag come out as one Chunk with data None;
        the others as Chunks of at most ``request_size`` bytes (an extent
        no longer than that is one Chunk).  Pieces of one request are read
        into one buffer, in flight on all connections.  ``process(offset,
        data)`` is called for every data Chunk, in any order, on the thread
        that received it, as soon as it arrived; what it returns is the
        Chunk's ``result``, what it raises is raised here in its turn.
        Stopping early (``close()``, or leaving a for loop) lets the reads
        in flight finish, so the reader stays usable; when the generator
        is done or closed, no ``process`` call is running.
        """
        self._begin_read()
        free = list(self._pool)
        pending: collections.deque[_Task] = collections.deque()
        rr = 0
        failed: BaseException | None = None
        try:
            for item in extents:
                e = item if isinstance(item, Extent) else Extent(*item)
                if e.zero:
                    task = _Task(e.offset, e.length, None)
                    task.done.set()
                    pending.append(task)
                for offset, length in () if e.zero else split([e], self.request_size):
                    while not free:
                        yield from self._pop(pending, free)
                    task = _Task(offset, length, free.pop(), process)
                    if self._inline:
                        self._check_usable()
                        self._start(self.client, task)
                    else:
                        self._submit(rr, task)
                        rr = (rr + 1) % len(self._queues)
                    pending.append(task)
                while pending and pending[0].done.is_set():
                    yield from self._pop(pending, free)
            while pending:
                yield from self._pop(pending, free)
        except BaseException as e:
            failed = e
            raise
        finally:
            self._end_read(failed)
            for task in pending:  # no buffer may be written after we return
                self._wait(task)
            self._reading = False

    def read_unordered(
        self, extents: Iterable[Extent | tuple[int, int]], process: Process | None = None,
        *, window: int | None = None,
    ) -> Generator[Chunk, None, None]:
        """Like `read`, but chunks come out as they arrive, in any order.

        A buffer is free again as soon as its chunk has been handed over
        (the generator resumed), not when every older chunk has: one slow
        reply no longer holds the other connections up, and the caller
        does whatever it does with a chunk (the backup: write it where it
        belongs in the file) while every connection goes on receiving.
        Each read goes to the connection holding the fewest, so a slow one
        does not collect the buffers.  ``window`` bounds how far ahead of
        the oldest chunk not yet handed over a read may be sent (in
        reads), for a caller that must keep what it got until the older
        chunks come (None: only the buffers bound it).  Zero extents come
        out first of their neighbours (they need no read).  With one
        connection this is `read`: its replies come in order anyway.
        bench/README.md has the measurements.
        """
        if self._inline:
            yield from self.read(extents, process)
            return
        if window is not None and window < 1:
            raise ValueError("window must be at least 1")
        self._begin_read()
        free = list(self._pool)
        finished: queue.SimpleQueue[_Task] = queue.SimpleQueue()
        load = [0] * len(self._queues)  # tasks each worker holds: new ones go to the least busy
        # Sent and not handed over.  A set, not a count: an interrupt may land
        # between get() and the bookkeeping, and the drain must not wait for
        # a task already taken off the queue (its ``done`` is set: no wait).
        pending: set[_Task] = set()
        sent = 0  # reads sent; the next one's number
        failed: BaseException | None = None

        def too_far_ahead() -> bool:  # of the oldest read not handed over
            return window is not None and bool(pending) and sent - min(t.seq for t in pending) >= window

        def handover() -> Iterator[Chunk]:
            task = finished.get()
            pending.discard(task)
            load[task.worker] -= 1
            return self._handover(task, free)

        try:
            for item in extents:
                e = item if isinstance(item, Extent) else Extent(*item)
                if e.zero:
                    yield Chunk(e.offset, e.length, None)
                    continue
                for offset, length in split([e], self.request_size):
                    while not free or too_far_ahead():
                        yield from handover()
                    task = _Task(offset, length, free.pop(), process, finished)
                    task.worker = i = load.index(min(load))
                    task.seq = sent
                    self._submit(i, task)
                    pending.add(task)
                    load[i] += 1
                    sent += 1
            while pending:
                yield from handover()
        except BaseException as e:
            failed = e
            raise
        finally:
            self._end_read(failed)
            for task in pending:  # no buffer may be written after we return
                task.done.wait()
            self._reading = False

    def _begin_read(self) -> None:
        if self._reading:
            raise NbdError("Reader.read() is already running: one at a time")
        if self._closed:
            raise NbdError("reader is closed")
        self._reading = True

    def _end_read(self, failed: BaseException | None) -> None:
        """A broken connection or an interrupt: fail fast.  Anything else
        (a failed read, the caller stopping early): let reads finish."""
        if isinstance(failed, ProtocolError) or (
            failed is not None and not isinstance(failed, (Exception, GeneratorExit))
        ):
            self._abort(failed)

    @staticmethod
    def _handover(task: _Task, free: list[memoryview]) -> Iterator[Chunk]:
        """Yield a finished task's data, then recycle its buffer."""
        if task.error is not None:
            assert task.buf is not None
            free.append(task.buf)
            raise task.error
        yield Chunk(task.offset, task.length, task.view, task.result)
        assert task.buf is not None
        free.append(task.buf)

    def copy(
        self, extents: Iterable[Extent | tuple[int, int]], sink: Callable[[int, memoryview], object]
    ) -> int:
        """Read ``extents`` (skipping zero ones) into ``sink(offset, data)``.

        ``data`` is valid only during the call.  Returns bytes copied.
        """
        total = 0
        for chunk in self.read(extents):
            if chunk.data is not None:
                sink(chunk.offset, chunk.data)
                total += chunk.length
        return total

    def _pop(self, pending: collections.deque[_Task], free: list[memoryview]) -> Iterator[Chunk]:
        """Yield the oldest task's data, then recycle its buffer."""
        task = pending[0]
        self._wait(task)
        if task.error is not None:
            raise task.error
        yield Chunk(task.offset, task.length, task.view, task.result)
        pending.popleft()
        if task.buf is not None:
            free.append(task.buf)

    def _wait(self, task: _Task) -> None:
        """Until ``task`` is done; inline, by receiving its reply here."""
        if self._inline and not task.done.is_set():
            self._complete(self.client, task)
        task.done.wait()

    def _check_usable(self) -> None:
        if self._closed:
            raise NbdError("reader is closed")
        if self._broken is not None:
            raise ProtocolError(f"reader unusable after: {self._broken}")

    def _submit(self, i: int, task: _Task) -> None:
        self._check_usable()
        self._queues[i].put(task)

    def _work(self, client: Client, q: queue.SimpleQueue[_Task | None]) -> None:
        """Worker loop: submit all queued reads, then complete the oldest."""
        inflight: collections.deque[_Task] = collections.deque()
        while True:
            try:
                task = q.get(block=not inflight)
            except queue.Empty:
                self._complete(client, inflight.popleft())
                continue
            if task is None:
                break
            if task.call is not None:
                try:
                    task.result = task.call(client)
                    task.finish()
                except BaseException as e:
                    task.finish(e)
                continue
            if self._start(client, task):
                inflight.append(task)
        for task in inflight:
            self._complete(client, task)

    def _start(self, client: Client, task: _Task) -> bool:
        """Send the task's READ; False if that failed (the task is done)."""
        try:
            assert task.view is not None
            task.cmd = client.start_read(task.offset, task.view)
            return True
        except BaseException as e:
            task.finish(e)
            return False

    @staticmethod
    def _complete(client: Client, task: _Task) -> None:
        """Receive the task's reply, process() it, mark it done."""
        try:
            client.wait(task.cmd)
            if task.process is not None:
                assert task.view is not None
                task.result = task.process(task.offset, task.view)
            task.finish()
        except BaseException as e:
            task.finish(e)

    def _abort(self, error: BaseException | None) -> None:
        """Fail fast: break every connection so workers stop waiting."""
        self._broken = self._broken or error
        for client in self._clients:
            client.abort()

    def close(self) -> None:
        """Stop the workers (after the reads in flight) and disconnect."""
        self._closed = True
        for q in self._queues:
            q.put(None)
        for th in self._threads:
            th.join()
        for client in self._clients:
            client.close()
        self._queues, self._threads = [], []

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
