"""The listening socket, one thread per connection, and a clean stop.

A connection is accepted, negotiated (`handshake`, with a timeout on
every message) and served (`transmission`) by its own daemon thread;
whatever goes wrong in it -- a hostile client, a bug -- ends that
connection only, is logged, and never reaches the other connections or
the accept loop.  Beyond `MAX_CONNECTIONS` a new connection is closed at
once (a client that holds slots cannot exhaust the host's threads).

`Server.stop` (SIGINT, SIGTERM, ``--timeout`` or the end of an instant
recovery) closes the listener, shuts the *reading* side of every
connection so that each thread finishes the reply it is sending and
then sees EOF, waits up to ``grace`` seconds, and only then cuts what is
left.  A unix socket is created with the mode and owner asked for (QEMU
runs as another user and must be able to connect; nobody else should)
and removed at the stop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

from vmbk.nbd.errors import NbdError
from vmbk.nbd.server.export import Export
from vmbk.nbd.server.handshake import Hangup, negotiate
from vmbk.nbd.server.transmission import Connection, Stats
from vmbk.nbd.transport import Transport

log = logging.getLogger("vmbk.nbd")

MAX_CONNECTIONS = 64
#: Seconds for each message of the handshake, and for the rest of a request once it has begun.
HANDSHAKE_TIMEOUT = 30.0
REQUEST_TIMEOUT = 60.0
_ACCEPT_POLL = 0.2


class Server:
    """A read-only NBD server of ``exports`` on a unix socket or a TCP address.

    ``unix``: the socket's path (created; an existing socket nobody
    listens on is replaced), ``mode``/``owner`` applied to it; ``tcp``:
    ``(host, port)``, port 0 for any free one.  ``tls``: a server-side
    context; with one, every client must start TLS (FORCEDTLS).
    """

    def __init__(self, exports: Sequence[Export], *, unix: Path | str | None = None,
                 tcp: tuple[str, int] | None = None, tls: ssl.SSLContext | None = None, mode: int = 0o600,
                 owner: tuple[int, int] | None = None, max_connections: int = MAX_CONNECTIONS) -> None:
        if (unix is None) == (tcp is None):
            raise ValueError("a server listens on exactly one of a unix socket and a TCP address")
        if not exports or len({e.name for e in exports}) != len(exports):
            raise ValueError("exports must be named uniquely")
        self.exports = {e.name: e for e in exports}
        self.unix = Path(unix) if unix is not None else None
        self.tcp = tcp
        self.tls = tls
        self.mode, self.owner = mode, owner
        self.max_connections = max_connections
        self.stats = Stats()
        self.connections = 0
        self._sock: socket.socket | None = None
        self._accepter: threading.Thread | None = None
        self._lock = threading.Lock()
        self._live: dict[threading.Thread, socket.socket] = {}
        self._stopping = threading.Event()

    # --- addresses ---

    @property
    def port(self) -> int | None:
        return self._sock.getsockname()[1] if self._sock is not None and self.tcp is not None else None

    def uri(self, export: str) -> str:
        """The export's NBD URI (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/uri.md)."""
        path = "/" + urllib.parse.quote(export, safe="")
        if self.unix is not None:
            return f"nbd{'s' if self.tls else ''}+unix://{path}?socket={urllib.parse.quote(str(self.unix), safe='/')}"
        assert self.tcp is not None
        host = self.tcp[0]
        host = f"[{host}]" if ":" in host else host
        return f"nbd{'s' if self.tls else ''}://{host}:{self.port}{path}"

    # --- lifetime ---

    def start(self) -> Server:
        if self.unix is not None:
            sock = _unix_listener(self.unix, self.mode, self.owner)
        else:
            assert self.tcp is not None
            sock = socket.create_server(self.tcp, family=_family(self.tcp[0]), backlog=64, reuse_port=False)
        sock.settimeout(_ACCEPT_POLL)
        self._sock = sock
        self._accepter = threading.Thread(target=self._accept_loop, name="nbd-accept", daemon=True)
        self._accepter.start()
        log.debug("NBD server on %s: %s", self.unix or self.tcp, ", ".join(self.exports))
        return self

    def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, let every connection finish its reply, close everything."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._accepter is not None:
            self._accepter.join()
        if self._sock is not None:
            self._sock.close()
        if self.unix is not None:
            with contextlib.suppress(FileNotFoundError):
                self.unix.unlink()
        self._shutdown_all(socket.SHUT_RD)
        deadline = time.monotonic() + grace
        for thread in self._threads():
            thread.join(max(0.0, deadline - time.monotonic()))
        self._shutdown_all(socket.SHUT_RDWR)
        for thread in self._threads():
            thread.join(2.0)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _threads(self) -> list[threading.Thread]:
        with self._lock:
            return list(self._live)

    def _shutdown_all(self, how: int) -> None:
        with self._lock:
            socks = list(self._live.values())
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(how)

    # --- connections ---

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                conn, addr = self._sock.accept()
            except TimeoutError:
                continue
            except OSError as e:
                if not self._stopping.is_set():
                    log.warning("NBD server: accept failed: %s", e)
                    time.sleep(_ACCEPT_POLL)
                continue
            with self._lock:
                if len(self._live) >= self.max_connections:
                    log.warning("NBD server: %d connections already, refusing another", len(self._live))
                    conn.close()
                    continue
                self.connections += 1
                name = f"nbd client {self.connections}" + (f" {addr[0]}:{addr[1]}" if isinstance(addr, tuple) else "")
                thread = threading.Thread(target=self._serve, args=(conn, name), name=f"nbd-conn-{self.connections}",
                                          daemon=True)
                self._live[thread] = conn
            thread.start()

    def _serve(self, sock: socket.socket, name: str) -> None:
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t = Transport(sock, HANDSHAKE_TIMEOUT, name, peer="client")
        conn: Connection | None = None
        try:
            session = negotiate(t, self.exports, tls=self.tls)
            t.set_timeout(REQUEST_TIMEOUT)
            handle = session.export.open()
            try:
                conn = Connection(t, session, handle)
                conn.run()
            finally:
                handle.close()
            log.debug("%s: disconnected", name)
        except (Hangup, NbdError) as e:
            log.debug("%s: %s", name, e)
        except Exception:  # a bug: this connection ends, the server goes on
            log.exception("%s: internal error; the connection is closed", name)
        finally:
            with contextlib.suppress(OSError):
                t.close()
            with self._lock:
                self._live.pop(threading.current_thread(), None)
                if conn is not None:
                    self.stats.requests += conn.stats.requests
                    self.stats.bytes_read += conn.stats.bytes_read
                    self.stats.errors += conn.stats.errors


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _unix_listener(path: Path, mode: int, owner: tuple[int, int] | None) -> socket.socket:
    """Bind ``path`` with ``mode`` (set before anyone can connect) and ``owner``."""
    if path.is_socket():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # a dead server's socket
        else:
            raise NbdError(f"{path}: another server listens on it")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o777 & ~mode)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        if owner is not None:
            os.chown(path, *owner)
        sock.listen(64)
    except OSError as e:
        sock.close()
        raise NbdError(f"cannot listen on {path}: {e.strerror or e}") from None
    return sock
