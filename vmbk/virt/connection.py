"""Opening a libvirt connection, with libvirt's errors made ours.

libvirt-python prints every error to stderr through its default handler
before raising; we install a silent handler so the only line a person
sees is the one our wrapper prints.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from vmbk.errors import DependencyError, Exit, VmbkError


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

