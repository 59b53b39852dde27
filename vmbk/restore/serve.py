"""``--serve``: a restore point's disks as read-only NBD exports, until stopped.

Every disk of the point (or ``--disk``) is an export named after its
target (``vda``), read from the chain as it lies in the backup tree
(`vmbk.stream.chainread.ChainImage`: newest frame wins, zero frames and
unwritten ranges are holes) by vmbk's own server (`vmbk.nbd.server`).
Nothing is written anywhere.  Order:

1. what killed ``--mount``/``--instant`` sessions left is removed
   (`vmbk.restore.marker`);
2. under the VM's lock (a backup must not archive or extend the chain
   meanwhile): the point is chosen as a restore chooses it
   (`vmbk.restore.select`: an incomplete or unverifiable point is
   refused unless asked for), the ``.chksum`` of every stream it reads is
   checked, and the streams are opened; then the lock is released.  The
   open files keep serving whatever rotate or a backup does to the tree
   afterwards (each connection reopens them through ``/proc/self/fd``);
3. the server listens: ``--socket PATH``, ``--listen HOST:PORT`` (TLS
   required unless HOST is a loopback address), or by default a socket in
   a private directory under ``RUN_DIR``;
4. one ``serve`` record with the URIs (and a line per export on stderr),
   then it serves until SIGINT, SIGTERM or ``--timeout``: that is the
   normal end, exit 0; connections finish the reply they are sending.

**Checksums are verified before serving, not lazily per frame.** A
stream's ``.chksum`` is one adler32 over the whole file (virtnbdbackup's
format), and so is its manifest's SHA-256 stream digest: there is
nothing to check a single frame against, so "lazily" could only mean
"after the client read it".  Every stream is checked first as a restore
checks it (`vmbk.restore.checker`: the ``.chksum``, and the digest when
the point has a trusted manifest), four at once; it costs one
sequential read of the point's streams (which also warms the page cache
for the clients: bench/serve.py has the figures) and means no client
ever reads a byte that did not pass.  ``--no-verify`` skips it, as for a
restore; ``--force`` serves a point whose manifest or checksums fail,
and says so in the record's warnings.  lz4 streams are read through lz4's own block and content
checksums when they have no ``.chksum`` (`vmbk.stream.chainread`), and
a read that fails reaches the client as an NBD error (EIO), never as
data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import os
import signal
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vmbk.errors import Terminated, UsageError
from vmbk.nbd.server import Export, Server
from vmbk.records import Record, make
from vmbk.manifest.check import stream_digests
from vmbk.restore.checker import SourceCheck
from vmbk.restore.report import point_fields
from vmbk.restore.run import vm_lock
from vmbk.restore.select import choose
from vmbk.restore.source import Source, SourceRef, load
from vmbk.stream.chainread import ChainImage
from vmbk.tree.points import RestorePoint
from vmbk.virt import backupjob

log = logging.getLogger("vmbk.restore")

Emit = Callable[[Record], None]
Say = Callable[[str], None]
#: Streams checked at once (adler32 and reads release the GIL).
VERIFY_THREADS = 4


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """Which point, and where and how it is served (the command layer builds it)."""

    period: str | None = None
    restore_point: int | None = None
    disks: tuple[str, ...] | None = None
    include_incomplete: bool = False
    verify: bool = True
    #: Serve a point that fails its manifest or checksum checks (they are skipped, and said).
    force: bool = False
    socket: Path | None = None
    listen: tuple[str, int] | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: With a CA, clients must present a certificate it signed.
    tls_ca: Path | None = None
    timeout: float | None = None


@dataclasses.dataclass
class Opened:
    """A restore point with its streams checked and open, one image per disk."""

    source: Source
    point: RestorePoint
    images: dict[str, ChainImage]
    unchecked: list[Path]
    verify_seconds: float
    warnings: list[str]

    def exports(self) -> list[Export]:
        p = self.point
        what = f"restore point {p.index} ({p.checkpoint or 'copy'}, {p.date or 'no date'}) of {p.chain.rel}"
        return [Export(disk, img.virtual_size, img.reopen, f"{disk} of VM {self.source.vm}, {what}")
                for disk, img in self.images.items()]

    def checked(self, verify: bool) -> dict[str, Any]:
        """What a record says of the checksums: checked or not, how long it took, what had none."""
        return {"verified": verify, "verify_seconds": round(self.verify_seconds, 3),
                "unchecked": [str(x) for x in self.unchecked]}

    def close(self) -> None:
        for img in self.images.values():
            img.close()


def open_point(ref: SourceRef, opts: ServeOptions) -> Opened:
    """Choose the point, check its streams and open them, under the VM's lock (module doc, 2)."""
    with vm_lock(ref):
        source = load(ref)
        chain, point, disks, warnings = choose(source, period=opts.period, restore_point=opts.restore_point,
                                               disks=opts.disks, include_incomplete=opts.include_incomplete,
                                               verify=opts.verify, force=opts.force, doing="served")
        digests = stream_digests(chain.path) if point.trusted else {}
        streams = [(p, digests.get(p.name)) for d in disks for p in point.paths(d)]
        t0 = time.monotonic()
        unchecked = verify_streams(streams, tolerate=opts.force) if opts.verify else []
        seconds = time.monotonic() - t0
        images: dict[str, ChainImage] = {}
        try:
            for disk in disks:
                images[disk] = ChainImage(point.paths(disk))
        except BaseException:
            for img in images.values():
                img.close()
            raise
    return Opened(source, point, images, unchecked, seconds, warnings)


def verify_streams(streams: list[tuple[Path, str | None]], *, tolerate: bool = False) -> list[Path]:
    """Check each stream as a restore does (`vmbk.restore.checker`: its ``.chksum``, and its
    manifest's SHA-256 stream digest when it has one), `VERIFY_THREADS` at once; those without
    a ``.chksum``.  The first failure (StreamError, exit 4) stops the others; ``tolerate``
    (``--force``) counts a failing stream as unchecked instead.
    """
    pending = list(dict.fromkeys(streams))
    running: list[SourceCheck] = []
    unchecked: list[Path] = []
    try:
        while pending or running:
            while pending and len(running) < VERIFY_THREADS:
                path, digest = pending.pop(0)
                running.append(SourceCheck([path], [digest], tolerate=tolerate))
            unchecked += running.pop(0).result()
    except BaseException:
        for check in running:
            check.stop()
        raise
    return unchecked


def tls_context(cert: Path, key: Path, ca: Path | None = None) -> ssl.SSLContext:
    """A server context (TLS 1.2 or later); UsageError when the files do not make one."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
        if ca is not None:
            ctx.load_verify_locations(ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as e:
        raise UsageError(f"--tls-cert {cert} / --tls-key {key}{f' / --tls-ca {ca}' if ca else ''}: {e}") from None
    return ctx


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@contextlib.contextmanager
def listening(opened: Opened, opts: ServeOptions, *, owner: tuple[int, int] | None = None) -> Iterator[Server]:
    """The server of ``opened``'s exports where ``opts`` says, stopped on the way out."""
    tls = tls_context(opts.tls_cert, opts.tls_key, opts.tls_ca) if opts.tls_cert and opts.tls_key else None
    if opts.listen is not None:
        if tls is None and not is_loopback(opts.listen[0]):
            raise UsageError(f"--listen {opts.listen[0]} is not a loopback address: serving backups over the "
                             "network needs --tls-cert and --tls-key")
        server = Server(opened.exports(), tcp=opts.listen, tls=tls)
        with _started(server):
            yield server
    elif opts.socket is not None:
        server = Server(opened.exports(), unix=opts.socket, tls=tls, owner=owner)
        with _started(server):
            yield server
    else:
        with backupjob.job_dir("serve-") as d:
            server = Server(opened.exports(), unix=d / "nbd.sock", tls=tls, owner=owner)
            with _started(server):
                yield server


@contextlib.contextmanager
def _started(server: Server) -> Iterator[Server]:
    try:
        server.start()
    except OSError as e:
        raise UsageError(f"cannot listen on {server.unix or server.tcp}: {e.strerror or e}") from None
    try:
        yield server
    finally:
        with deferred_signals():
            server.stop()
            s = server.stats
            log.info("NBD server stopped: %d connections, %d requests, %d bytes read, %d errors",
                     server.connections, s.requests, s.bytes_read, s.errors)


def serve(ref: SourceRef, opts: ServeOptions, *, session: str | None, emit: Emit, say: Say,
          sweep: Callable[[], list[str]] = lambda: []) -> None:
    """Serve the point until SIGINT/SIGTERM or ``opts.timeout`` (module doc)."""
    for line in sweep():
        say(f"removed what a killed session left: {line}")
    opened = open_point(ref, opts)
    try:
        with listening(opened, opts) as server:
            emit(record(opened, server, opts, session))
            for ex in opened.exports():
                say(f"serving {ex.name} ({ex.size} bytes) at {server.uri(ex.name)}")
            why = until_stopped(opts.timeout, say, "serving")
            log.info("stopping the NBD server (%s)", why)
    finally:
        opened.close()


def record(opened: Opened, server: Server, opts: ServeOptions, session: str | None) -> Record:
    return make(
        "serve", session,
        vm=opened.source.vm,
        **point_fields(opened.point),
        exports=[{"name": disk, "uri": server.uri(disk), "virtual_size": img.virtual_size,
                  "data_bytes": img.data_bytes, "sources": [s.name for s in opened.point.paths(disk)]}
                 for disk, img in opened.images.items()],
        socket=str(server.unix) if server.unix is not None else None,
        listen=f"{server.tcp[0]}:{server.port}" if server.tcp is not None else None,
        tls=server.tls is not None,
        **opened.checked(opts.verify),
        timeout=opts.timeout,
        pid=os.getpid(),
        warnings=opened.warnings,
    )


def until_stopped(timeout: float | None, say: Say, doing: str) -> str:
    """Wait for SIGINT, SIGTERM or ``timeout`` seconds: the normal end of a session; which one."""
    if timeout is None:
        say(f"{doing} until SIGINT (Ctrl-C) or SIGTERM")
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while deadline is None or time.monotonic() < deadline:
            time.sleep(1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic())))
    except KeyboardInterrupt:
        return "SIGINT"
    except Terminated:
        return "SIGTERM"
    return "timeout"


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """SIGINT and SIGTERM are ignored while a session takes down what it set up:
    the session is ending already, and a second Ctrl-C must not leave a
    mount half removed.  The steps inside are bounded in time."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
