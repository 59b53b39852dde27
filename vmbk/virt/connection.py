"""Opening a libvirt connection, with libvirt's errors made ours.

libvirt-python prints every error to stderr through its default handler
before raising; we install a silent handler so the only line a person
sees is the one our wrapper prints.

libvirtd may die or restart while a run goes on (an upgrade, a crash, an
admin's restart): QEMU keeps running and so does a pull backup's export,
but every call on the old connection fails ("client socket is closed").
`Link` is a connection that is reopened when that happened, waiting up to
`RECONNECT_WAIT` seconds for libvirtd to come back, so the VMs after the
one that was hit go on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

from vmbk.errors import DependencyError, Exit, VmbkError

log = logging.getLogger("vmbk.virt")

#: Seconds to wait for libvirtd to answer again before a VM is failed
#: (``VMBK_LIBVIRT_WAIT`` overrides: tests, hosts with slow restarts).
RECONNECT_WAIT = float(os.environ.get("VMBK_LIBVIRT_WAIT", "60"))


class LibvirtError(VmbkError):
    """libvirtd refused or failed a request."""

    code = Exit.TOOL
    kind = "libvirt"


def libvirt_module() -> Any:
    """The libvirt binding, with its stderr error printing silenced."""
    try:
        import libvirt
    except ImportError:
        raise DependencyError("the libvirt Python binding is missing: pip install libvirt-python") from None
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


def open_connection(uri: str, *, readonly: bool = False) -> Any:
    libvirt = libvirt_module()
    try:
        return libvirt.openReadOnly(uri) if readonly else libvirt.open(uri)
    except libvirt.libvirtError as e:
        raise LibvirtError(f"cannot connect to libvirt at {uri}: {e.get_error_message()}") from None


@contextlib.contextmanager
def connection(uri: str, *, readonly: bool = False) -> Iterator[Any]:
    conn = open_connection(uri, readonly=readonly)
    try:
        yield conn
    finally:
        with contextlib.suppress(Exception):
            conn.close()



def connection_lost(e: BaseException) -> bool:
    """Does this libvirt error say the daemon went away (not a refusal)?"""
    libvirt = libvirt_module()
    if not isinstance(e, libvirt.libvirtError):
        return False
    return e.get_error_domain() == libvirt.VIR_FROM_RPC or e.get_error_code() in (
        libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_RPC)


def alive(conn: Any) -> bool:
    libvirt = libvirt_module()
    try:
        return bool(conn.isAlive()) and conn.getLibVersion() > 0
    except libvirt.libvirtError:
        return False


class Link:
    """A libvirt connection that comes back when libvirtd does.

    `get` returns the open connection, reopening it first when libvirtd
    went away (waiting up to ``wait`` seconds; after one wait that failed,
    later calls try once, so a run over many VMs does not wait for each).
    """

    def __init__(self, uri: str, *, wait: float | None = None, nbd_tcp: Any = None) -> None:
        self.uri = uri
        self.nbd_tcp = nbd_tcp  # vmbk.settings.NbdTcp: the backups' data path (hostfiles)
        self.wait = RECONNECT_WAIT if wait is None else wait
        self.conn: Any = open_connection(uri)
        self.reconnects = 0
        self._gave_up = False
        self._files: Any = None

    @property
    def files(self) -> Any:
        """The host's files (`vmbk.virt.hostfiles`): local, or over ssh for a ``qemu+ssh://`` URI."""
        if self._files is None:
            from vmbk.virt.hostfiles import files_for

            self._files = files_for(self.uri, nbd_tcp=self.nbd_tcp)
        return self._files

    def alive(self) -> bool:
        return alive(self.conn)

    def get(self) -> Any:
        if alive(self.conn):
            return self.conn
        with contextlib.suppress(Exception):
            self.conn.close()
        deadline = time.monotonic() + (0.0 if self._gave_up else self.wait)
        log.warning("libvirt connection to %s lost: waiting up to %.0f s for libvirtd", self.uri,
                    max(0.0, deadline - time.monotonic()))
        while True:
            try:
                self.conn = open_connection(self.uri)
                if alive(self.conn):
                    self.reconnects += 1
                    self._gave_up = False
                    log.warning("libvirt connection to %s is back", self.uri)
                    return self.conn
            except LibvirtError:
                pass
            if time.monotonic() >= deadline:
                self._gave_up = True
                raise LibvirtError(f"libvirtd at {self.uri} does not answer (waited {self.wait:g} s)")
            time.sleep(0.5)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()
        if self._files is not None:
            self._files.close()
            self._files = None
