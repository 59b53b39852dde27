"""The domain XML of a restored VM: the point's XML with the restored files.

Both kinds of restore (vmrestore guide, 6) point every restored disk at
its new image (``type='file'``, qcow2, no backing chain) and leave out what
the restore does not bring back: removable and pass-through devices
(cdrom, floppy, LUN; virtnbdrestore drops them too, guide 14.3) and disks
that were not restored, which must never be opened by a VM they no longer
belong to.  The NVRAM element names the restored copy.

**Disaster recovery** keeps the identity: name, UUID, MAC addresses and
everything else as it was, so that to the rest of the infrastructure the
VM is the one that was lost.

**Clone** gets a new one (guide, 6 "Clone Restore"): the new name, no
``<uuid>`` and no ``<mac>`` (libvirt makes new ones on define), an emptied
``<genid>`` (a new VM generation id), no ``<sysinfo>`` uuid entry (libvirt
refuses one that differs from ``<uuid>``), and the files its character
devices write or bind (console logs, ``<log>`` files, unix sockets it
listens on) get the new name: in place of the original name where the
file name holds it, else before it (``console.log`` ->
``<new>-console.log``).  Two VMs appending to one console log, or binding
one socket, collide as surely as on a shared disk: the clone would not
start.  A socket the VM connects to (``mode='connect'``) and a host
device (``type='dev'``) are shared on purpose and kept.

Pure: text in, text and warnings out.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path

from vmbk.virt.domain import LIBOSINFO_NS, QEMU_NS

ET.register_namespace("qemu", QEMU_NS)
ET.register_namespace("libosinfo", LIBOSINFO_NS)

CHAR_DEVICES = ("serial", "console", "channel", "parallel")


def restored_xml(xml: str, *, disks: Mapping[str, Path], nvram: Path | None,
                 new_name: str | None = None) -> tuple[str, list[str]]:
    """The XML to define and the warnings about what was left out.

    ``disks``: target -> restored image; ``nvram``: the restored NVRAM
    (None: none from the backup, libvirt makes fresh variables from the
    firmware's template); ``new_name``: a clone's name (None: disaster
    recovery, same identity).
    """
    root = ET.fromstring(xml)
    warnings: list[str] = []
    if new_name is not None:
        _new_identity(root, new_name)
    _nvram(root, nvram, warnings)
    devices = root.find("devices")
    if devices is not None:
        _disks(devices, disks, warnings)
    return ET.tostring(root, encoding="unicode"), warnings


def clone_xml(xml: str, *, name: str, disks: Mapping[str, Path], nvram: Path | None) -> tuple[str, list[str]]:
    return restored_xml(xml, disks=disks, nvram=nvram, new_name=name)


def _new_identity(root: ET.Element, name: str) -> None:
    name_el = root.find("name")
    old = (name_el.text or "") if name_el is not None else ""
    if name_el is None:
        name_el = ET.SubElement(root, "name")
    name_el.text = name
    for el in root.findall("uuid"):
        root.remove(el)
    genid = root.find("genid")
    if genid is not None:
        genid.text = None
    for system in root.findall("sysinfo/system"):
        for entry in system.findall("entry"):
            if entry.get("name") == "uuid":
                system.remove(entry)
    devices = root.find("devices")
    if devices is None:
        return
    for iface in devices.findall("interface"):
        for mac in iface.findall("mac"):
            iface.remove(mac)
    for tag in CHAR_DEVICES:
        for dev in devices.findall(tag):
            owned = [el for el in dev.findall("source")
                     if dev.get("type") == "file" or (dev.get("type") == "unix" and el.get("mode") != "connect")]
            for el in (*owned, *dev.findall("log")):
                for attr in ("path", "file"):
                    if el.get(attr):
                        el.set(attr, _own_name(str(el.get(attr)), old, name))


def _own_name(path: str, old: str, new: str) -> str:
    """``path`` with the clone's name in its file name (see the module doc)."""
    head, base = os.path.split(path)
    return os.path.join(head, base.replace(old, new) if old and old in base else f"{new}-{base}")


def _nvram(root: ET.Element, nvram: Path | None, warnings: list[str]) -> None:
    os_el = root.find("os")
    if os_el is None:
        return
    nv = os_el.find("nvram")
    if nv is None:
        if nvram is not None:  # firmware auto-selection: the inactive XML had none
            ET.SubElement(os_el, "nvram").text = str(nvram)
        return
    if nvram is None:
        os_el.remove(nv)
        warnings.append("the backup holds no NVRAM for this point: the VM gets fresh UEFI variables")
        return
    src = nv.find("source")
    if src is not None:
        src.set("file", str(nvram))
    else:
        nv.text = str(nvram)


def _disks(devices: ET.Element, disks: Mapping[str, Path], warnings: list[str]) -> None:
    for disk in devices.findall("disk"):
        target = disk.find("target")
        dev = target.get("dev") if target is not None else None
        device = disk.get("device", "disk")
        if device != "disk" or dev not in disks:
            devices.remove(disk)
            what = f"{device} {dev}" if device != "disk" else f"disk {dev} (not restored)"
            warnings.append(f"{what} left out of the restored VM")
            continue
        disk.set("type", "file")
        for child in list(disk):
            if child.tag in ("source", "backingStore", "auth"):
                disk.remove(child)
        disk.insert(0, ET.Element("source", {"file": str(disks[str(dev)])}))
        driver = disk.find("driver")
        if driver is None:
            driver = ET.Element("driver")
            disk.insert(0, driver)
        driver.set("name", "qemu")
        driver.set("type", "qcow2")
