"""Requests in flight on one socket, and the routing of their replies.

Every request gets a handle and a `Command` in the pending table.  Replies
may come in any order, and a structured reply may come in several chunks,
interleaved with other replies: `_dispatch` reads one reply header, looks
the handle up and receives the payload straight into that command's
destination buffer (``recv_into``, no bytes concatenated on the data
path).  Whoever waits for any command drives the dispatcher, so replies
to other commands land in their buffers on the way.

After a ProtocolError (EOF, garbage, a short read, a timeout) the stream
position is unknown: the connection refuses everything from then on.

Single-threaded by design: one thread drives a Connection; another thread
may only `abort` it.  See
https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md#transmission
"""

from __future__ import annotations

import logging
from collections.abc import Collection

from . import wire
from .errors import ProtocolError, RequestError
from .transport import Transport

log = logging.getLogger("vmbk.nbd")

#: Largest BLOCK_STATUS chunk accepted (the spec's SHOULD is 8 MiB + 4).
_MAX_STATUS_CHUNK = 64 * 1024**2 + 4
#: Error chunks: 4096 bytes of message at most, plus fixed fields.
_MAX_ERROR_CHUNK = 4096 + 14

_ZEROS = memoryview(bytes(1024**2))
#: The destination of commands without a reply payload.
NO_BUFFER = memoryview(b"")


class Command:
    """One request: where its reply goes and how it ended."""

    __slots__ = ("handle", "type", "offset", "length", "buf", "done", "error", "chunks", "status")

    def __init__(self, handle: int, type: int, offset: int, length: int, buf: memoryview = NO_BUFFER) -> None:
        self.handle = handle
        self.type = type
        self.offset = offset
        self.length = length
        self.buf = buf
        self.done = False
        self.error: RequestError | None = None
        #: READ: (start, length) of the data/hole chunks received.
        self.chunks: list[tuple[int, int]] = []
        #: BLOCK_STATUS: context id -> [(length, flags), ...]
        self.status: dict[int, list[tuple[int, int]]] = {}

    @property
    def name(self) -> str:
        return wire.CMD_NAMES.get(self.type, str(self.type))


class Connection:
    """The transmission phase of one socket: send requests, route replies."""

    def __init__(self, transport: Transport, context_ids: Collection[int], max_in_flight: int) -> None:
        self._t = transport
        self._context_ids = set(context_ids)
        self.max_in_flight = max(1, max_in_flight)
        self._pending: dict[int, Command] = {}
        self._handle = 0
        #: READs in flight (a WRITE must not be sent while there are any).
        self.reads = 0
        self.broken: ProtocolError | None = None
        self._hdr = memoryview(bytearray(wire.STRUCTURED_REPLY.size))

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def start(
        self, type: int, offset: int, length: int, flags: int = 0, *,
        buf: memoryview = NO_BUFFER, payload: memoryview | None = None,
    ) -> Command:
        """Send a request (and its payload); the reply is for `wait`."""
        self.check()
        while len(self._pending) >= self.max_in_flight:
            self.pump()
        self._handle += 1
        cmd = Command(self._handle, type, offset, length, buf)
        header = wire.REQUEST.pack(wire.REQUEST_MAGIC, flags, type, cmd.handle, offset, length)
        self._pending[cmd.handle] = cmd
        if type == wire.CMD_READ:
            self.reads += 1
        try:
            self._t.send(header, payload) if payload is not None else self._t.send(header)
        except ProtocolError as e:
            self._fail(e)
        return cmd

    def wait(self, cmd: Command) -> None:
        """Process replies until ``cmd`` is done; raise its RequestError."""
        while not cmd.done:
            self.pump()
        if cmd.error is not None:
            raise cmd.error

    def wait_all(self, cmds: list[Command]) -> None:
        """Wait for all, then raise the first error (no reply left behind)."""
        first: RequestError | None = None
        for cmd in cmds:
            try:
                self.wait(cmd)
            except RequestError as e:
                first = first or e
        if first is not None:
            raise first

    def drain(self) -> None:
        """Wait for every request in flight, ignoring their errors."""
        while self._pending:
            self.pump()

    def check(self) -> None:
        if self.broken is not None:
            raise ProtocolError(f"{self._t.name}: connection unusable after: {self.broken}")

    def pump(self) -> None:
        """Process one reply (or chunk)."""
        self.check()
        try:
            self._dispatch()
        except ProtocolError as e:
            self._fail(e)

    def abort(self) -> None:
        """Break the connection now, waking a thread blocked on it."""
        self.broken = self.broken or ProtocolError(f"{self._t.name}: aborted")
        self._t.shutdown()

    def _fail(self, e: ProtocolError) -> None:
        self.broken = self.broken or e
        raise e

    def _dispatch(self) -> None:
        """Read one reply (simple, or one structured chunk) and route it."""
        t, hdr = self._t, self._hdr
        t.recv_into(hdr[:16])
        magic = wire.U32.unpack_from(hdr)[0]
        if magic == wire.SIMPLE_REPLY_MAGIC:
            _, error, handle = wire.SIMPLE_REPLY.unpack_from(hdr)
            cmd = self._lookup(handle)
            if error:
                self._set_error(cmd, error, "")
            elif cmd.type == wire.CMD_READ:
                t.recv_into(cmd.buf)
                cmd.chunks.append((0, cmd.length))
            elif cmd.type == wire.CMD_BLOCK_STATUS:
                raise ProtocolError(f"{t.name}: simple reply to BLOCK_STATUS")
            self._finish(cmd)
            return
        if magic != wire.STRUCTURED_REPLY_MAGIC:
            raise ProtocolError(f"{t.name}: bad reply magic {magic:#x}")
        t.recv_into(hdr[16:20])
        _, flags, rtype, handle, length = wire.STRUCTURED_REPLY.unpack_from(hdr)
        cmd = self._lookup(handle)
        if rtype == wire.REPLY_TYPE_OFFSET_DATA and cmd.type == wire.CMD_READ and length > 8:
            t.recv_into(hdr[:8])
            start = wire.U64.unpack_from(hdr)[0] - cmd.offset
            self._check_chunk(cmd, start, length - 8)
            t.recv_into(cmd.buf[start : start + length - 8])
        elif rtype == wire.REPLY_TYPE_OFFSET_HOLE and cmd.type == wire.CMD_READ and length == 12:
            t.recv_into(hdr[:12])
            offset, size = wire.HOLE.unpack_from(hdr)
            start = offset - cmd.offset
            self._check_chunk(cmd, start, size)
            _zero(cmd.buf[start : start + size])
        elif rtype == wire.REPLY_TYPE_BLOCK_STATUS and cmd.type == wire.CMD_BLOCK_STATUS:
            self._block_status_chunk(cmd, length)
        elif rtype & wire.REPLY_TYPE_ERROR_BIT and 6 <= length <= _MAX_ERROR_CHUNK:
            self._error_chunk(cmd, rtype, t.recv(length))
        elif rtype != wire.REPLY_TYPE_NONE or length:
            raise ProtocolError(f"{t.name}: unexpected chunk type={rtype} length={length} for {cmd.name}")
        if flags & wire.REPLY_FLAG_DONE:
            self._finish(cmd)

    def _lookup(self, handle: int) -> Command:
        try:
            return self._pending[handle]
        except KeyError:
            raise ProtocolError(f"{self._t.name}: reply for unknown handle {handle}") from None

    def _check_chunk(self, cmd: Command, start: int, size: int) -> None:
        if start < 0 or size <= 0 or start + size > cmd.length:
            raise ProtocolError(
                f"{self._t.name}: chunk {cmd.offset + start}+{size} outside READ {cmd.offset}+{cmd.length}"
            )
        cmd.chunks.append((start, size))

    def _block_status_chunk(self, cmd: Command, length: int) -> None:
        if length < 12 or (length - 4) % 8 or length > _MAX_STATUS_CHUNK:
            raise ProtocolError(f"{self._t.name}: bad BLOCK_STATUS chunk length {length}")
        data = memoryview(self._t.recv(length))
        (ctx,) = wire.U32.unpack_from(data)
        if ctx not in self._context_ids:
            raise ProtocolError(f"{self._t.name}: BLOCK_STATUS for unknown context {ctx}")
        descriptors = list(wire.DESCRIPTOR.iter_unpack(data[4:]))
        if any(n == 0 for n, _ in descriptors):
            raise ProtocolError(f"{self._t.name}: BLOCK_STATUS extent of length 0")
        cmd.status[ctx] = descriptors

    def _error_chunk(self, cmd: Command, rtype: int, data: bytes) -> None:
        error, mlen = wire.ERROR.unpack_from(data)
        extra = 8 if rtype == wire.REPLY_TYPE_ERROR_OFFSET else 0
        if 6 + mlen + extra > len(data):
            raise ProtocolError(f"{self._t.name}: malformed error chunk")
        message = data[6 : 6 + mlen].decode("utf-8", "replace")
        at = wire.U64.unpack_from(data, 6 + mlen)[0] if extra else None
        self._set_error(cmd, error, message, at)

    def _set_error(self, cmd: Command, error: int, message: str, at: int | None = None) -> None:
        if cmd.error is None:  # the first error is the one to report
            errno = wire.ERRNO.get(error, wire.ERRNO[22])  # unknown -> EINVAL, as the spec asks
            cmd.error = RequestError(cmd.name, cmd.offset, cmd.length, errno, message, at)
            log.debug("%s: %s", self._t.name, cmd.error)

    def _finish(self, cmd: Command) -> None:
        del self._pending[cmd.handle]
        if cmd.type == wire.CMD_READ:
            self.reads -= 1
            if cmd.error is None and not _covers(cmd.chunks, cmd.length):
                got = sum(n for _, n in cmd.chunks)
                raise ProtocolError(
                    f"{self._t.name}: READ {cmd.offset}+{cmd.length} completed with {got} bytes"
                )
        cmd.done = True


def _covers(chunks: list[tuple[int, int]], length: int) -> bool:
    """Do the (start, size) chunks tile [0, length) exactly?"""
    if len(chunks) == 1:
        return chunks[0] == (0, length)
    pos = 0
    for start, size in sorted(chunks):
        if start != pos:
            return False
        pos += size
    return pos == length


def _zero(view: memoryview) -> None:
    for i in range(0, len(view), len(_ZEROS)):
        n = min(len(_ZEROS), len(view) - i)
        view[i : i + n] = _ZEROS[:n]
