"""The throwaway VM's domain XML: the clone's, cut off from what it could reach.

The input is the XML a clone restore defines (`vmbk.restore.domainxml`:
new name, no UUID and no MACs, the restored disks and NVRAM, removable
and unrestored disks left out).  A drill must not touch anything the
production VM uses or reach anything it talks to, so here, pure text in,
text and warnings out:

* ``<uuid>`` is the drill's own: its TPM state is put under it before the
  domain starts (`vmbk.restore.tpm`), and the leftovers sweep finds the
  domain by it;
* every ``<interface>`` (network, bridge, direct/macvtap, hostdev, user,
  vhost-user ...) becomes ``type='network'`` on the drill's isolated
  network, keeping its model, guest address and boot order, or is removed
  (``network = "none"``);
* removed, each with a warning: host devices and USB redirection
  (``hostdev``, ``redirdev``, ``smartcard``), shared host directories and
  memory (``filesystem``, ``shmem``), ``vsock`` (a way to the host),
  ``parallel`` ports, ``graphics`` (VNC/SPICE listen on the host; QEMU
  takes screenshots without them), ``audio`` backends but ``none``, a pass-through or
  external TPM, an ``rng`` fed over the network, channels that are not a
  virtio unix socket or a pty (spice, tcp, udp, guest forwarding) and
  ``qemu:commandline`` arguments (they can add a network backend);
* serial ports are written to files in the scratch directory
  (``serial<N>.log``, the text console the checks read); a ``<console>``
  of a serial port is dropped (libvirt makes it the first serial port
  again), other consoles go to files too; unix channels lose their path
  (libvirt makes its own socket, the production VM keeps its);
* a UEFI VM whose XML names no NVRAM gets one in the scratch directory
  (libvirt fills it from the firmware's template), so nothing is created
  where libvirt keeps the production VM's;
* ``<metadata>`` carries the drill's mark (`MARK_NS`): the sweep of a later
  run removes a marked domain whose drill is gone, and never another.

No autostart: the domain is started transient (`vmbk.drill.one`).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path

from vmbk.virt.domain import QEMU_NS

MARK_NS = "urn:x-vmbk:drill:1"
MARK_TAG = f"{{{MARK_NS}}}drill"
ET.register_namespace("vmbkdrill", MARK_NS)

#: Devices a drill never gives its throwaway VM: they reach the host or the production VM's world.
REMOVED = ("hostdev", "redirdev", "smartcard", "filesystem", "shmem", "vsock", "parallel", "graphics")
#: Interface children kept when an interface moves to the isolated network.
KEPT_IN_INTERFACE = ("model", "address", "boot", "rom", "mtu", "alias")


def drill_xml(xml: str, *, uuid: str, network: str | None, scratch: Path,
              mark: Mapping[str, str]) -> tuple[str, list[str]]:
    """The XML to start and what was changed that a person should know.

    ``network``: the isolated network's name, or None (every NIC removed);
    ``mark``: the attributes of the drill's metadata element.
    """
    root = ET.fromstring(xml)
    warnings: list[str] = []
    for el in root.findall("uuid"):
        root.remove(el)
    uuid_el = ET.Element("uuid")
    uuid_el.text = uuid
    root.insert(_after(root, "name"), uuid_el)
    _mark(root, mark)
    _nvram(root, scratch)
    for el in root.findall(f"{{{QEMU_NS}}}commandline"):
        root.remove(el)
        warnings.append("qemu:commandline arguments left out of the drill VM")
    devices = root.find("devices")
    if devices is not None:
        _interfaces(devices, network, warnings)
        _removed(devices, warnings)
        _char_devices(devices, scratch)
    return ET.tostring(root, encoding="unicode"), warnings


def serial_logs(xml: str) -> list[Path]:
    """The files the serial ports and consoles of a drill XML write to."""
    root = ET.fromstring(xml)
    out = []
    for tag in ("serial", "console"):
        for dev in root.iterfind(f"devices/{tag}"):
            src = dev.find("source")
            if dev.get("type") == "file" and src is not None and src.get("path"):
                out.append(Path(str(src.get("path"))))
    return out


def has_agent(xml: str) -> bool:
    root = ET.fromstring(xml)
    return any(t.get("name") == "org.qemu.guest_agent.0" for t in root.iterfind("devices/channel/target"))


def memory_bytes(xml: str) -> int:
    """The guest's memory (``currentMemory``, else ``memory``) in bytes."""
    root = ET.fromstring(xml)
    el = root.find("currentMemory")
    if el is None or not (el.text or "").strip():
        el = root.find("memory")
    if el is None or not (el.text or "").strip():
        return 0
    units = {"b": 1, "bytes": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
             "g": 1 << 30, "gib": 1 << 30, "gb": 10**9, "t": 1 << 40, "tib": 1 << 40, "tb": 10**12}
    return int(el.text or 0) * units.get(el.get("unit", "KiB").lower(), 1024)


def _after(root: ET.Element, tag: str) -> int:
    children = list(root)
    for i, child in enumerate(children):
        if child.tag == tag:
            return i + 1
    return 0


def _mark(root: ET.Element, mark: Mapping[str, str]) -> None:
    meta = root.find("metadata")
    if meta is None:
        meta = ET.Element("metadata")
        root.insert(_after(root, "uuid"), meta)
    for el in meta.findall(MARK_TAG):
        meta.remove(el)
    ET.SubElement(meta, MARK_TAG, dict(mark))


def _nvram(root: ET.Element, scratch: Path) -> None:
    os_el = root.find("os")
    if os_el is None:
        return
    uefi = os_el.get("firmware") == "efi" or os_el.find("loader") is not None
    if uefi and os_el.find("nvram") is None:
        ET.SubElement(os_el, "nvram").text = str(scratch / "VARS.fd")


def _interfaces(devices: ET.Element, network: str | None, warnings: list[str]) -> None:
    nics = devices.findall("interface")
    for iface in nics:
        if network is None:
            devices.remove(iface)
            continue
        kept = [c for c in iface if c.tag in KEPT_IN_INTERFACE]
        if iface.get("type") == "hostdev":  # its model and ROM are the host card's
            kept = [c for c in kept if c.tag in ("address", "boot", "alias")]
        for child in list(iface):
            iface.remove(child)
        iface.attrib.clear()
        iface.set("type", "network")
        iface.append(ET.Element("source", {"network": network}))
        iface.extend(kept)
    if nics:
        warnings.append(f"{len(nics)} network interface(s) " + (
            f"moved to the isolated network {network}" if network else "removed"))


def _removed(devices: ET.Element, warnings: list[str]) -> None:
    gone: dict[str, int] = {}
    for dev in list(devices):
        if dev.tag in REMOVED or _reaches_out(dev):
            devices.remove(dev)
            gone[dev.tag] = gone.get(dev.tag, 0) + 1
    for tag, n in sorted(gone.items()):
        warnings.append(f"{n} {tag} device(s) left out of the drill VM")


def _reaches_out(dev: ET.Element) -> bool:
    if dev.tag == "audio":  # a backend on the host (spice, pulseaudio, a file ...); 'none' stays
        return dev.get("type") != "none"
    if dev.tag == "tpm":
        backend = dev.find("backend")
        return backend is None or backend.get("type") != "emulator"
    if dev.tag == "rng":
        backend = dev.find("backend")
        return backend is not None and backend.get("model") != "random"
    if dev.tag == "channel":
        target = dev.find("target")
        virtio = target is not None and target.get("type") == "virtio"
        return not (dev.get("type") == "pty" or (dev.get("type") == "unix" and virtio))
    return False


def _char_devices(devices: ET.Element, scratch: Path) -> None:
    serials = devices.findall("serial")
    n = 0
    for dev in list(devices):
        if dev.tag == "channel" and dev.get("type") == "unix":
            for src in dev.findall("source"):
                dev.remove(src)
            continue
        if dev.tag == "console" and serials:
            target = dev.find("target")
            if target is None or target.get("type", "serial") == "serial":
                devices.remove(dev)  # libvirt makes it the first serial port again
                continue
        if dev.tag in ("serial", "console"):
            for child in list(dev):
                if child.tag not in ("target", "alias", "address"):
                    dev.remove(child)
            dev.attrib.clear()
            dev.set("type", "file")
            dev.insert(0, ET.Element("source", {"path": str(scratch / f"{dev.tag}{n}.log")}))
            n += 1
