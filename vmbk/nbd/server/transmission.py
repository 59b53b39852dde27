"""The transmission phase of one connection: requests in, replies out.

One thread per connection takes requests in order and answers each
before reading the next; clients that pipeline (qemu, nbdcopy, vmbk's
reader) keep their requests queued in the socket, and parallelism comes
from their several connections (NBD_FLAG_CAN_MULTI_CONN: the image never
changes, so every connection sees the same bytes).  Spec:
https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md#transmission

Commands:

* READ: with structured replies, a hole chunk for every run the image
  says reads as zero and data chunks of at most `PIECE` bytes for the
  rest, each read *before* its header is sent, so a failed read becomes
  an error chunk, never a short or wrong chunk; the last chunk carries
  NBD_REPLY_FLAG_DONE.  With NBD_CMD_FLAG_DF one data chunk holds it all
  (zeroes included).  Without structured replies: the simple reply, read
  whole first when it fits `PIECE`, else streamed piece by piece, where a
  failure after the header is a hard disconnect (the spec's only way);
* BLOCK_STATUS (``base:allocation``): the image's runs, data as 0, the
  rest as NBD_STATE_HOLE | NBD_STATE_ZERO, at most `MAX_DESCRIPTORS`
  per reply (the client asks again from where it stopped);
* WRITE, WRITE_ZEROES, TRIM: NBD_EPERM, the export is read-only (a
  WRITE's payload is read and dropped to keep the stream in step, or
  the connection is dropped when it is larger than any client may send);
* DISC: the connection ends; anything else: NBD_EINVAL.

Every range is checked against the export's size before the image is
touched, so nothing is read outside it whatever a request says; a request
with a bad magic number is a hard disconnect (the stream cannot be
resynchronised).  Between requests the connection waits without a
timeout (a guest's disk may idle for hours); once a request has begun,
every byte must come within the transport's timeout.
"""

from __future__ import annotations

import dataclasses
import logging

from vmbk.nbd import wire
from vmbk.nbd.server.export import Handle
from vmbk.nbd.server.handshake import MAX_PAYLOAD, Hangup, Session
from vmbk.nbd.transport import Transport

log = logging.getLogger("vmbk.nbd")

#: Largest data chunk sent, and the largest buffer a connection holds.
PIECE = 4 * 1024 * 1024
#: Descriptors in one block status reply (the spec's SHOULD is at most 2^20).
MAX_DESCRIPTORS = 1 << 16
_HOLE_ZERO = wire.STATE_HOLE | wire.STATE_ZERO
_DONE = wire.REPLY_FLAG_DONE


@dataclasses.dataclass
class Stats:
    """What one connection did (summed by the server)."""

    requests: int = 0
    bytes_read: int = 0
    errors: int = 0


class Failed(Exception):
    """A request that gets an NBD error reply; the connection goes on."""

    def __init__(self, error: int, message: str) -> None:
        super().__init__(message)
        self.error = error


class Connection:
    """Serves one negotiated session until the client disconnects."""

    def __init__(self, t: Transport, session: Session, handle: Handle) -> None:
        self.t = t
        self.session = session
        self.handle = handle
        self.size = session.export.size
        self.stats = Stats()
        self._buf = bytearray(0)
        self._hdr = bytearray(wire.REQUEST.size)

    def run(self) -> None:
        """Answer requests until NBD_CMD_DISC (or EOF: a ProtocolError from the transport)."""
        hdr = memoryview(self._hdr)
        while True:
            self.t.wait_readable()
            self.t.recv_into(hdr)
            magic, flags, cmd, cookie, offset, length = wire.REQUEST.unpack(hdr)
            if magic != wire.REQUEST_MAGIC:
                raise Hangup(f"bad request magic {magic:#x}")
            if cmd == wire.CMD_DISC:
                return
            self.stats.requests += 1
            try:
                self._command(cmd, flags, cookie, offset, length)
            except Failed as e:
                self.stats.errors += 1
                log.debug("%s: %s %d+%d: %s", self.t.name, wire.CMD_NAMES.get(cmd, cmd), offset, length, e)
                self._error(cookie, e.error, str(e))

    def _command(self, cmd: int, flags: int, cookie: int, offset: int, length: int) -> None:
        if cmd == wire.CMD_WRITE:
            if length > MAX_PAYLOAD:
                raise Hangup(f"a WRITE of {length} bytes (at most {MAX_PAYLOAD})")
            self._discard(length)
            raise Failed(wire.ERR_PERM, "the export is read-only")
        if cmd in (wire.CMD_WRITE_ZEROES, wire.CMD_TRIM):
            raise Failed(wire.ERR_PERM, "the export is read-only")
        if cmd == wire.CMD_READ:
            self._read(flags, cookie, offset, length)
        elif cmd == wire.CMD_BLOCK_STATUS:
            self._block_status(flags, cookie, offset, length)
        else:
            raise Failed(wire.ERR_INVAL, f"command {wire.CMD_NAMES.get(cmd, cmd)} is not supported")

    # --- READ ---

    def _read(self, flags: int, cookie: int, offset: int, length: int) -> None:
        structured = self.session.structured
        allowed = wire.CMD_FLAG_DF if structured else 0
        if flags & ~allowed:
            raise Failed(wire.ERR_INVAL, f"flags {flags:#x} are not valid for READ")
        self._check_range(offset, length)
        if length > MAX_PAYLOAD:
            raise Failed(wire.ERR_INVAL, f"a READ of {length} bytes (at most {MAX_PAYLOAD})")
        if length == 0:
            self._ok(cookie)
        elif not structured:
            self._read_simple(cookie, offset, length)
        elif flags & wire.CMD_FLAG_DF:
            self._read_whole(cookie, offset, length)
        else:
            self._read_chunks(cookie, offset, length)
        self.stats.bytes_read += length

    def _read_chunks(self, cookie: int, offset: int, length: int) -> None:
        runs = self._extents(offset, length)
        last = offset + length
        for start, n, data in runs:
            if not data:
                done = _DONE if start + n == last else 0
                self.t.send(wire.STRUCTURED_REPLY.pack(wire.STRUCTURED_REPLY_MAGIC, done,
                                                       wire.REPLY_TYPE_OFFSET_HOLE, cookie, wire.HOLE.size),
                            wire.HOLE.pack(start, n))
                continue
            for pos in range(start, start + n, PIECE):
                size = min(PIECE, start + n - pos)
                view = self._fill(pos, size)
                done = _DONE if pos + size == last else 0
                self.t.send(wire.STRUCTURED_REPLY.pack(wire.STRUCTURED_REPLY_MAGIC, done,
                                                       wire.REPLY_TYPE_OFFSET_DATA, cookie, 8 + size),
                            wire.U64.pack(pos), view)

    def _read_whole(self, cookie: int, offset: int, length: int) -> None:
        """NBD_CMD_FLAG_DF: one data chunk; a failure after its header pads it and adds an error chunk."""
        first = self._fill(offset, min(PIECE, length))  # a failure here is a plain error reply
        self.t.send(wire.STRUCTURED_REPLY.pack(wire.STRUCTURED_REPLY_MAGIC, 0, wire.REPLY_TYPE_OFFSET_DATA,
                                               cookie, 8 + length), wire.U64.pack(offset), first)
        pos = offset + len(first)
        error: Failed | None = None
        while pos < offset + length:
            size = min(PIECE, offset + length - pos)
            try:
                view = self._fill(pos, size) if error is None else self._zeroes(size)
            except Failed as e:
                error, view = e, self._zeroes(size)
            self.t.send(view)
            pos += size
        if error is not None:
            raise error
        self._ok(cookie)

    def _read_simple(self, cookie: int, offset: int, length: int) -> None:
        header = wire.SIMPLE_REPLY.pack(wire.SIMPLE_REPLY_MAGIC, 0, cookie)
        if length <= PIECE:
            self.t.send(header, self._fill(offset, length))
            return
        self.t.send(header)
        for pos in range(offset, offset + length, PIECE):
            try:
                view = self._fill(pos, min(PIECE, offset + length - pos))
            except Failed as e:
                raise Hangup(f"READ failed after its simple reply began: {e}") from None
            self.t.send(view)

    def _fill(self, offset: int, size: int) -> memoryview:
        """The image's bytes ``[offset, offset + size)`` in the connection's buffer."""
        if len(self._buf) < size:
            self._buf = bytearray(max(size, min(PIECE, 2 * len(self._buf))))
        view = memoryview(self._buf)[:size]
        try:
            self.handle.pread_into(offset, view)
        except (OSError, ValueError) as e:
            log.warning("%s: reading %d+%d of %s failed: %s", self.t.name, offset, size,
                        self.session.export.name, e)
            raise Failed(wire.ERR_IO, f"reading {offset}+{size} failed: {e}") from None
        return view

    def _zeroes(self, size: int) -> memoryview:
        view = memoryview(self._buf)[:size]
        view[:] = bytes(size)
        return view

    # --- BLOCK_STATUS ---

    def _block_status(self, flags: int, cookie: int, offset: int, length: int) -> None:
        ctx = self.session.contexts
        if not ctx:
            raise Failed(wire.ERR_INVAL, "BLOCK_STATUS without a metadata context (NBD_OPT_SET_META_CONTEXT)")
        if flags & ~wire.CMD_FLAG_REQ_ONE:
            raise Failed(wire.ERR_INVAL, f"flags {flags:#x} are not valid for BLOCK_STATUS")
        if length == 0:
            raise Failed(wire.ERR_INVAL, "BLOCK_STATUS of length 0")
        self._check_range(offset, length)
        runs = self._extents(offset, length)
        runs = runs[:1] if flags & wire.CMD_FLAG_REQ_ONE else runs[:MAX_DESCRIPTORS]
        body = b"".join(wire.DESCRIPTOR.pack(n, 0 if data else _HOLE_ZERO) for _, n, data in runs)
        for i, ctx_id in enumerate(ctx):
            done = _DONE if i == len(ctx) - 1 else 0
            self.t.send(wire.STRUCTURED_REPLY.pack(wire.STRUCTURED_REPLY_MAGIC, done, wire.REPLY_TYPE_BLOCK_STATUS,
                                                   cookie, 4 + len(body)), wire.U32.pack(ctx_id), body)

    def _extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        try:
            runs = self.handle.extents(offset, length)
        except (OSError, ValueError) as e:
            raise Failed(wire.ERR_IO, f"mapping {offset}+{length} failed: {e}") from None
        pos = offset
        for start, n, _ in runs:  # the handle's promise, checked: in order, contiguous, inside the request
            if start != pos or n <= 0:
                raise Failed(wire.ERR_IO, f"the image's map of {offset}+{length} is inconsistent at {pos}")
            pos += n
        if pos != offset + length:
            raise Failed(wire.ERR_IO, f"the image's map of {offset}+{length} ends at {pos}")
        return runs

    # --- replies ---

    def _check_range(self, offset: int, length: int) -> None:
        if offset > self.size or length > self.size - offset:
            raise Failed(wire.ERR_INVAL, f"{offset}+{length} is past the end of the export ({self.size} bytes)")

    def _discard(self, length: int) -> None:
        while length:
            n = min(length, PIECE)
            if len(self._buf) < n:
                self._buf = bytearray(n)
            self.t.recv_into(memoryview(self._buf)[:n])
            length -= n

    def _ok(self, cookie: int) -> None:
        if self.session.structured:
            self.t.send(wire.STRUCTURED_REPLY.pack(wire.STRUCTURED_REPLY_MAGIC, _DONE, wire.REPLY_TYPE_NONE,
                                                   cookie, 0))
        else:
            self.t.send(wire.SIMPLE_REPLY.pack(wire.SIMPLE_REPLY_MAGIC, 0, cookie))

    def _error(self, cookie: int, error: int, message: str) -> None:
        if not self.session.structured:
            self.t.send(wire.SIMPLE_REPLY.pack(wire.SIMPLE_REPLY_MAGIC, error, cookie))
            return
        text = message.encode("utf-8")[:wire.MAX_STRING]
        self.t.send(wire.STRUCTURED_REPLY.pack(wire.STRUCTURED_REPLY_MAGIC, _DONE, wire.REPLY_TYPE_ERROR, cookie,
                                               wire.ERROR.size + len(text)), wire.ERROR.pack(error, len(text)), text)
