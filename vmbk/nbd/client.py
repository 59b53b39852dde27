"""NBD client: connect, negotiate, and the commands of one connection.

Synchronous calls (`readinto`, `write`...) are a start plus a wait on the
`Connection`, so a large read or write is split at the maximum payload
and its pieces are pipelined; the multi-connection reader
(`vmbk.nbd.reader`) uses `start_read` and `wait` directly.

A Client is not thread safe: one thread drives it (another may only call
`abort`).  Arguments are checked before anything is sent (range inside
the export, alignment to the minimum block size, payload at most the
maximum), because a server may drop a client that breaks those rules.
"""

from __future__ import annotations

import logging

from . import wire
from .address import Address
from .connection import NO_BUFFER, Command, Connection
from .errors import HandshakeError, NbdError, ProtocolError, Unsupported
from .extents import DIRTY, Extent, clip
from .handshake import negotiate
from .status import ExtentQueries
from .transport import Transport

log = logging.getLogger("vmbk.nbd")


class Client(ExtentQueries):
    """A connected, negotiated NBD export.

    ``dirty_bitmap`` names a qemu dirty bitmap to negotiate as
    ``qemu:dirty-bitmap:NAME`` beside ``base:allocation``; if the server
    does not offer it, HandshakeError.  ``allocation=False`` leaves
    ``base:allocation`` out: every BLOCK_STATUS reply carries every
    negotiated context, and the server works out allocation for the whole
    range asked (`ExtentQueries.dirty_extents` walks the bitmap alone).  ``timeout`` bounds every wait for
    the server (seconds without progress), ``connect_timeout`` the connect
    and handshake (default: ``timeout``).
    """

    def __init__(
        self,
        address: Address | str,
        *,
        dirty_bitmap: str | None = None,
        allocation: bool = True,
        timeout: float | None = 60.0,
        connect_timeout: float | None = None,
        max_in_flight: int = 16,
    ) -> None:
        self.address = Address.parse(address) if isinstance(address, str) else address
        self._dirty_bitmap = wire.DIRTY_BITMAP_PREFIX + dirty_bitmap if dirty_bitmap else None
        contexts = ([wire.ALLOCATION] if allocation else []) + ([self._dirty_bitmap] if self._dirty_bitmap else [])
        ctimeout = connect_timeout if connect_timeout is not None else timeout
        self._closed = False
        sock = self.address.connect(ctimeout)
        try:
            self._t = Transport(sock, ctimeout, str(self.address))
            self._info = negotiate(self._t, self.address.export, contexts, tls=self.address.tls,
                                   server_name=self.address.host)
            self._t.set_timeout(timeout)
        except BaseException:
            sock.close()
            raise
        limit = min(self._info.max_block, wire.DEFAULT_MAX_BLOCK)
        self._max_payload = max(limit - limit % self._info.min_block, self._info.min_block)
        self._conn = Connection(self._t, self._info.contexts.values(), max_in_flight)
        if self._dirty_bitmap and self._dirty_bitmap not in self._info.contexts:
            self.close()
            raise HandshakeError(f"{self.address}: server does not export {self.dirty_bitmap}")
        log.debug(
            "%s: connected size=%d flags=%#x blocks=%d/%d/%d contexts=%s",
            self.address, self.size, self.flags, self.min_block_size,
            self.preferred_block_size, self.max_block_size, list(self.contexts),
        )

    # --- what the server told us ---

    @property
    def size(self) -> int:
        return self._info.size

    @property
    def flags(self) -> int:
        return self._info.flags

    def _flag(bit: int, doc: str) -> property:  # type: ignore[misc]
        return property(lambda self: bool(self._info.flags & bit), doc=doc)

    read_only = _flag(wire.FLAG_READ_ONLY, "Writes will fail (NBD_FLAG_READ_ONLY).")
    can_multi_conn = _flag(wire.FLAG_CAN_MULTI_CONN, "Several connections see one consistent disk.")
    can_flush = _flag(wire.FLAG_SEND_FLUSH, "NBD_CMD_FLUSH is supported.")
    can_fua = _flag(wire.FLAG_SEND_FUA, "NBD_CMD_FLAG_FUA is supported.")
    can_trim = _flag(wire.FLAG_SEND_TRIM, "NBD_CMD_TRIM is supported.")
    can_zero = _flag(wire.FLAG_SEND_WRITE_ZEROES, "NBD_CMD_WRITE_ZEROES is supported.")
    can_fast_zero = _flag(wire.FLAG_SEND_FAST_ZERO, "NBD_CMD_FLAG_FAST_ZERO is supported.")
    del _flag

    @property
    def min_block_size(self) -> int:
        return self._info.min_block

    @property
    def preferred_block_size(self) -> int:
        return self._info.preferred_block

    @property
    def max_block_size(self) -> int:
        """As advertised (32 MiB when not); see `max_payload`."""
        return self._info.max_block

    @property
    def structured_replies(self) -> bool:
        return self._info.structured_replies

    @property
    def contexts(self) -> tuple[str, ...]:
        """Metadata contexts the server granted."""
        return tuple(self._info.contexts)

    @property
    def dirty_bitmap(self) -> str | None:
        """``qemu:dirty-bitmap:NAME`` when one was negotiated."""
        return self._dirty_bitmap

    @property
    def max_payload(self) -> int:
        """Largest READ/WRITE we send: max block size capped at 32 MiB."""
        return self._max_payload

    @property
    def in_flight(self) -> int:
        """Requests sent whose reply has not been processed yet."""
        return self._conn.in_flight

    # --- synchronous commands ---

    def read(self, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        self.readinto(offset, memoryview(buf))
        return buf

    def readinto(self, offset: int, buf: memoryview | bytearray) -> None:
        """Fill ``buf`` from ``offset``; holes arrive as zeroes."""
        view = memoryview(buf).cast("B")
        step = self._max_payload
        cmds = [self.start_read(offset + i, view[i : i + step]) for i in range(0, len(view), step)]
        self._conn.wait_all(cmds)

    def write(self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False) -> None:
        view = memoryview(data).cast("B")
        step = self._max_payload
        cmds = [self.start_write(offset + i, view[i : i + step], fua=fua) for i in range(0, len(view), step)]
        self._conn.wait_all(cmds)

    def write_zeroes(self, offset: int, length: int, *, fast: bool = False, fua: bool = False) -> None:
        """Zero a range, letting the server punch holes (no NBD_CMD_FLAG_NO_HOLE).

        ``fast``: fail with RequestError(ENOTSUP) instead of writing zeroes
        slowly, so a restore can skip ranges it knows are already zero.
        """
        if not self.can_zero:
            raise Unsupported(f"{self.address}: server does not support WRITE_ZEROES")
        if fast and not self.can_fast_zero:
            raise Unsupported(f"{self.address}: server does not support FAST_ZERO")
        flags = (wire.CMD_FLAG_FAST_ZERO if fast else 0) | self._fua(fua)
        self._ranged(wire.CMD_WRITE_ZEROES, offset, length, flags)

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        if not self.can_trim:
            raise Unsupported(f"{self.address}: server does not support TRIM")
        self._ranged(wire.CMD_TRIM, offset, length, self._fua(fua))

    def flush(self) -> None:
        if not self.can_flush:
            raise Unsupported(f"{self.address}: server does not support FLUSH")
        self._conn.wait(self._start(wire.CMD_FLUSH, 0, 0))

    # --- extents ---

    def block_status(self, offset: int, length: int) -> dict[str, list[Extent]]:
        """One BLOCK_STATUS request: context name -> extents from ``offset``.

        Each list is contiguous from ``offset``, clipped to the request, and
        may stop short of ``offset + length`` (servers may answer short).
        """
        if not self._info.contexts:
            raise Unsupported(f"{self.address}: no metadata context negotiated")
        length = min(length, self.size - offset, wire.MAX_LENGTH - wire.MAX_LENGTH % self.min_block_size)
        cmd = self._start(wire.CMD_BLOCK_STATUS, offset, length)
        self._conn.wait(cmd)
        result = {}
        for name, ctx in self._info.contexts.items():
            if ctx not in cmd.status:
                self._conn.broken = ProtocolError(f"{self.address}: BLOCK_STATUS reply lacks context {name}")
                raise self._conn.broken
            result[name] = clip(self._extents(name, offset, cmd.status[ctx]), offset + length)
        return result

    def _extents(self, name: str, offset: int, descriptors: list[tuple[int, int]]) -> list[Extent]:
        dirty = name.startswith(wire.DIRTY_BITMAP_PREFIX)
        out = []
        for length, state in descriptors:
            if dirty:
                flags = DIRTY if state & wire.STATE_DIRTY else 0
            else:
                flags = state & (wire.STATE_HOLE | wire.STATE_ZERO)
            out.append(Extent(offset, length, flags))
            offset += length
        return out

    # --- pipelining ---

    def start_read(self, offset: int, buf: memoryview) -> Command:
        """Send a READ whose reply will land in ``buf``; `wait` for it.

        ``buf`` must stay alive and untouched until the command is done.
        """
        if len(buf) > self._max_payload:
            raise ValueError(f"read of {len(buf)} bytes exceeds max payload {self._max_payload}")
        return self._start(wire.CMD_READ, offset, len(buf), buf=buf)

    def start_write(self, offset: int, data: memoryview, *, fua: bool = False) -> Command:
        """Send a WRITE; ``data`` may be reused as soon as this returns.

        Waits for in-flight reads first: a server blocked sending us a read
        reply stops reading our write payload, and both sides would hang.
        """
        if len(data) > self._max_payload:
            raise ValueError(f"write of {len(data)} bytes exceeds max payload {self._max_payload}")
        if self.read_only:
            raise Unsupported(f"{self.address}: export is read-only")
        while self._conn.reads:
            self._conn.pump()
        return self._start(wire.CMD_WRITE, offset, len(data), self._fua(fua), payload=data)

    def wait(self, cmd: Command) -> None:
        """Process replies until ``cmd`` is done; raise its RequestError.

        Replies to other commands are processed on the way: their
        buffers fill and they are done when their turn comes.
        """
        self._conn.wait(cmd)

    def _ranged(self, type: int, offset: int, length: int, flags: int) -> None:
        """TRIM/WRITE_ZEROES have no payload: split only at 32-bit lengths."""
        step = wire.MAX_LENGTH - wire.MAX_LENGTH % max(self.min_block_size, 1024**2)
        end = offset + length
        cmds = [self._start(type, o, min(step, end - o), flags) for o in range(offset, end, step)]
        self._conn.wait_all(cmds)

    def _fua(self, fua: bool) -> int:
        if fua and not self.can_fua:
            raise Unsupported(f"{self.address}: server does not support FUA")
        return wire.CMD_FLAG_FUA if fua else 0

    def _start(
        self, type: int, offset: int, length: int, flags: int = 0, *,
        buf: memoryview = NO_BUFFER, payload: memoryview | None = None,
    ) -> Command:
        if self._closed:
            raise NbdError(f"{self.address}: client is closed")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"range {offset}+{length} outside export of {self.size} bytes")
        align = self.min_block_size
        if (offset % align or length % align) and type != wire.CMD_FLUSH:
            raise ValueError(f"range {offset}+{length} not aligned to {align}")
        return self._conn.start(type, offset, length, flags, buf=buf, payload=payload)

    # --- lifetime ---

    def abort(self) -> None:
        """Break the connection now, waking a thread blocked on it."""
        self._conn.abort()

    def close(self) -> None:
        """Wait for requests in flight, send NBD_CMD_DISC, close the socket."""
        if self._closed:
            return
        try:
            if self._conn.broken is None:
                self._conn.drain()  # the spec: no DISC with requests in flight
                self._t.send(wire.REQUEST.pack(wire.REQUEST_MAGIC, 0, wire.CMD_DISC, 0, 0, 0))
        except NbdError as e:
            log.debug("%s: unclean disconnect: %s", self.address, e)
        finally:
            self._closed = True
            self._t.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

