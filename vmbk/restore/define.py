"""Defining the restored VM in libvirt, and what may stand in its way.

vmrestore guide, 6 and 9.9: a defined VM of the same name is replaced only
with ``--force`` and only when it is shut off (a running VM is never
touched).  Replacing undefines it with its snapshot and checkpoint
metadata (its checkpoints describe disks that are being replaced) and its
managed save.  Disaster recovery keeps the firmware state that belongs to
the identity it restores: NVRAM is handled by the restore itself (the old
file is saved first), swtpm state stays where libvirt keeps it per UUID
(BitLocker needs it, guide 11).  Replacing a clone's namesake drops both.

A VM with the restored UUID under another name (renamed since the
backup) would make libvirt refuse the define after the disks were
written, so it is refused first.
"""

from __future__ import annotations

from typing import Any

from vmbk.errors import VmError
from vmbk.virt.connection import LibvirtError, libvirt_module

_COMMON = ("VIR_DOMAIN_UNDEFINE_MANAGED_SAVE", "VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA",
           "VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA")
_KEEP = ("VIR_DOMAIN_UNDEFINE_KEEP_NVRAM", "VIR_DOMAIN_UNDEFINE_KEEP_TPM")
_DROP = ("VIR_DOMAIN_UNDEFINE_NVRAM",)


def domain_state(conn: Any, name: str) -> str | None:
    """None (no such domain), ``running`` or ``shut off`` (defined, inactive)."""
    libvirt = libvirt_module()
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError:
        return None
    return "running" if dom.isActive() else "shut off"


def check_defined(conn: Any, name: str, *, force: bool, uuid: str | None = None) -> bool:
    """May ``name`` be defined?  True when a shut-off namesake must go first."""
    libvirt = libvirt_module()
    if uuid:
        try:
            other = conn.lookupByUUIDString(uuid).name()
        except libvirt.libvirtError:
            other = None
        if other is not None and other != name:
            raise VmError(f"domain {other!r} has the UUID {uuid} of the VM being restored (renamed since the "
                          f"backup?): undefine it or restore a clone (--name)", vm=name)
    state = domain_state(conn, name)
    if state is None:
        return False
    if state == "running":
        raise VmError(f"a domain named {name!r} is running: shut it off first (and use --force), "
                      "or restore a clone under another --name", vm=name)
    if not force:
        raise VmError(f"a domain named {name!r} is already defined: --force replaces it", vm=name)
    return True


def undefine(conn: Any, name: str, *, keep_state: bool) -> None:
    """Remove the shut-off domain ``name``; its NVRAM and TPM state kept or not."""
    libvirt = libvirt_module()
    flags = 0
    for flag in (*_COMMON, *(_KEEP if keep_state else _DROP)):
        flags |= getattr(libvirt, flag, 0)
    try:
        conn.lookupByName(name).undefineFlags(flags)
    except libvirt.libvirtError as e:
        raise LibvirtError(f"cannot undefine {name!r}: {e.get_error_message()}", vm=name) from None


def define(conn: Any, xml: str, name: str, *, kept: str | None = None) -> dict[str, Any]:
    """Define the restored VM; its name and UUID as libvirt has them.

    ``kept``: where the restored files stay when the definition fails (the message says it).
    """
    libvirt = libvirt_module()
    try:
        dom = conn.defineXML(xml)
        return {"name": dom.name(), "uuid": dom.UUIDString()}
    except libvirt.libvirtError as e:
        where = f"; the restored files are kept {kept} once the cause is fixed" if kept else ""
        raise LibvirtError(f"cannot define {name!r}: {e.get_error_message()}{where}", vm=name) from None
