"""Where an NBD export lives, as NBD URIs name it.

Follows https://github.com/NetworkBlockDevice/nbd/blob/master/doc/uri.md:

    nbd+unix:///EXPORT?socket=/run/sock     unix socket
    nbd://HOST[:PORT]/EXPORT                TCP (port 10809 by default)

The export name is the URI path without its first "/".  TLS: an Address
made with ``tls=`` (an `ssl.SSLContext`: the CA, and the client's own
certificate when the server asks for one) starts with NBD_OPT_STARTTLS
(`vmbk.nbd.handshake`); ``nbds://`` URIs are refused with a clear
message, since a URI cannot carry the certificates.
"""

from __future__ import annotations

import dataclasses
import socket
import ssl
import urllib.parse

from .errors import NbdError, NbdTimeout

DEFAULT_PORT = 10809

_Socket = socket.socket  # the field "socket" hides the module in the class


@dataclasses.dataclass(frozen=True)
class Address:
    """An export: a unix socket path or a TCP host/port, plus its name."""

    socket: str | None = None
    host: str | None = None
    port: int = DEFAULT_PORT
    export: str = ""
    #: TLS (NBD_OPT_STARTTLS) with this context; the server's name is checked against ``host``.
    tls: ssl.SSLContext | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if (self.socket is None) == (self.host is None):
            raise ValueError("an NBD address needs exactly one of socket and host")

    @classmethod
    def unix(cls, path: str, export: str = "") -> Address:
        return cls(socket=str(path), export=export)

    @classmethod
    def tcp(cls, host: str, port: int = DEFAULT_PORT, export: str = "", *,
            tls: ssl.SSLContext | None = None) -> Address:
        return cls(host=host, port=port, export=export, tls=tls)

    @classmethod
    def parse(cls, url: str) -> Address:
        """An Address from an NBD URI; NbdError when it is not one we speak."""
        u = urllib.parse.urlsplit(url)
        export = urllib.parse.unquote(u.path[1:] if u.path.startswith("/") else u.path)
        if u.scheme in ("nbds", "nbds+unix"):
            raise NbdError(f"NBD over TLS needs certificates a URI cannot name (Address.tcp(..., tls=)): {url}")
        if u.scheme == "nbd+unix":
            query = urllib.parse.parse_qs(u.query)
            if u.netloc or "socket" not in query:
                raise NbdError(f"bad NBD unix URI (need nbd+unix:///EXPORT?socket=PATH): {url}")
            return cls.unix(query["socket"][0], export)
        if u.scheme == "nbd":
            if not u.hostname:
                raise NbdError(f"bad NBD URI, no host: {url}")
            try:
                port = u.port or DEFAULT_PORT
            except ValueError:
                raise NbdError(f"bad NBD URI port: {url}") from None
            return cls.tcp(u.hostname, port, export)
        raise NbdError(f"not an NBD URI: {url}")

    @property
    def url(self) -> str:
        path = "/" + urllib.parse.quote(self.export)
        if self.socket is not None:
            return f"nbd+unix://{path}?socket={urllib.parse.quote(self.socket)}"
        host = f"[{self.host}]" if ":" in (self.host or "") else self.host
        return f"{'nbds' if self.tls is not None else 'nbd'}://{host}:{self.port}{path}"

    def connect(self, timeout: float | None) -> _Socket:
        """A connected stream socket; TCP gets TCP_NODELAY.

        NODELAY because our requests are 28-byte headers that must leave at
        once: Nagle would hold a pipelined request back waiting for an ACK.
        """
        try:
            if self.socket is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.settimeout(timeout)
                    sock.connect(self.socket)
                except BaseException:
                    sock.close()
                    raise
                return sock
            assert self.host is not None
            sock = socket.create_connection((self.host, self.port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except TimeoutError:
            raise NbdTimeout(f"timed out connecting to {self.url}") from None
        except OSError as e:
            raise NbdError(f"cannot connect to {self.url}: {e.strerror or e}") from None

    def __str__(self) -> str:
        return self.url
