"""Exact-length socket I/O with timeouts, the only place that touches the socket.

Timeouts are the kernel's SO_RCVTIMEO/SO_SNDTIMEO on a *blocking* socket,
not Python's ``settimeout``: with ``settimeout`` CPython polls before each
recv and the socket is non-blocking, so MSG_WAITALL cannot work and filling
a 4 MiB buffer costs two syscalls per socket-buffer-full (~200 KiB).  With
a blocking socket, ``recv_into(view, n, MSG_WAITALL)`` fills the buffer in
one call that releases the GIL for the whole copy.  The timeout then means
"no progress for that long": each call may return early with what it got,
and a call that gets nothing raises EAGAIN, which becomes `NbdTimeout`.

Both ends use it: the client, and the server (`vmbk.nbd.server`) for each
connection it accepts (``peer`` names the other end in messages).  TLS
wraps the socket here (`start_tls`, after NBD_OPT_STARTTLS): an
``ssl.SSLSocket`` has no MSG_WAITALL and no ``sendmsg``, so `recv_into`
loops on plain ``recv_into`` and `send` sends buffer by buffer; the
kernel's timeouts still apply to the socket below, and OpenSSL's "want
read/write" after one of them is a timeout too.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import ssl
import struct

from .errors import NbdTimeout, ProtocolError

log = logging.getLogger("vmbk.nbd")

_TIMEVAL = struct.Struct("@ll")


class Transport:
    """A connected socket that reads and writes whole messages or fails."""

    def __init__(self, sock: socket.socket, timeout: float | None, name: str, *, peer: str = "server") -> None:
        self.sock = sock
        self.name = name
        self.peer = peer
        self.aborted = False
        self.tls = False
        sock.settimeout(None)
        self.set_timeout(timeout)

    def start_tls(self, context: ssl.SSLContext, *, server_side: bool, server_hostname: str | None = None) -> None:
        """Wrap the socket in TLS and run the TLS handshake (ProtocolError when it fails)."""
        try:
            self.sock = context.wrap_socket(self.sock, server_side=server_side, server_hostname=server_hostname)
        except OSError as e:
            raise self._error(e, "negotiating TLS") from None
        self.tls = True

    def wait_readable(self) -> None:
        """Block, without a timeout, until a message starts (or the peer is gone)."""
        if self.tls and self.sock.pending():  # type: ignore[attr-defined]
            return
        poller = select.poll()
        poller.register(self.sock, select.POLLIN | select.POLLPRI)
        while not poller.poll():
            pass

    def set_timeout(self, timeout: float | None) -> None:
        """Seconds without progress before NbdTimeout; None: wait forever."""
        self.timeout = timeout
        usec = max(1, round(timeout * 1e6)) if timeout else 0  # 0 is "forever"
        tv = _TIMEVAL.pack(usec // 1_000_000, usec % 1_000_000)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)

    def recv_into(self, view: memoryview) -> None:
        """Fill ``view`` completely; ProtocolError on EOF, NbdTimeout on silence."""
        want = len(view)
        got = 0
        while got < want:
            try:
                if self.tls:
                    n = self.sock.recv_into(view[got:], want - got)
                else:
                    n = self.sock.recv_into(view[got:], want - got, socket.MSG_WAITALL)
            except OSError as e:
                raise self._error(e, "receiving") from None
            if n == 0:
                if self.aborted:
                    raise ProtocolError(f"{self.name}: connection aborted")
                raise ProtocolError(
                    f"{self.name}: {self.peer} closed the connection "
                    f"(got {got} of {want} bytes of a message)"
                )
            got += n

    def recv(self, size: int) -> bytes:
        """Read exactly ``size`` bytes (small messages: headers, replies)."""
        buf = bytearray(size)
        self.recv_into(memoryview(buf))
        return bytes(buf)

    def send(self, *buffers: bytes | memoryview) -> None:
        """Send all buffers, gathered in one sendmsg when the socket allows.

        A request header and its write payload go out together without
        concatenating them (the payload may be megabytes).
        """
        views = [memoryview(b).cast("B") for b in buffers if len(b)]
        if self.tls:
            try:
                for v in views:
                    self.sock.sendall(v)
            except OSError as e:
                raise self._error(e, "sending") from None
            return
        while views:
            try:
                sent = self.sock.sendmsg(views)
            except OSError as e:
                raise self._error(e, "sending") from None
            while views and sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            if sent:
                views[0] = views[0][sent:]

    def shutdown(self) -> None:
        """Wake any thread blocked on this socket (close() alone does not)."""
        self.aborted = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()

    def _error(self, e: OSError, doing: str) -> ProtocolError:
        if self.aborted:
            return ProtocolError(f"{self.name}: connection aborted")
        if isinstance(e, (ssl.SSLWantReadError, ssl.SSLWantWriteError)):
            return NbdTimeout(f"{self.name}: timed out {doing} ({self.timeout} s without progress)")
        if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK) or isinstance(e, TimeoutError):
            return NbdTimeout(f"{self.name}: timed out {doing} ({self.timeout} s without progress)")
        return ProtocolError(f"{self.name}: connection failed while {doing}: {e.strerror or e}")
