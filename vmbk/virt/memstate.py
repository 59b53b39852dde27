"""A running domain's memory and device state: saved beside a backup, resumed later.

How a state is saved (docs/architecture.md, "Memory and device state",
has the measurements behind it): the domain is paused through the hold
(`vmbk.virt.hold`: marker and guard, so a killed vmbk never leaves it
paused), then ``virDomainSnapshotCreateXML`` takes a *memory-only
external snapshot* -- ``<memory snapshot='external' file=SPOOL/>``, every
disk ``snapshot='no'``, ``VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA`` -- which
is libvirt's save image (header, domain XML, QEMU's migration stream)
written into a file of vmbk's while QEMU keeps the domain (`save`).  A
paused domain stays paused: ``backupBegin`` then fixes the disks' view at
the same instant and the domain is resumed.  libvirt keeps no snapshot
object, the domain and its disks are untouched.

libvirt facts that shaped this (libvirt 9.0, QEMU 7.2):

* the snapshot cannot run while a pull backup job is active (it waits 30
  s for the domain's job lock, then fails), so the state is saved *before*
  ``backupBegin``, with the vCPUs stopped in between;
* the spool is a regular file that vmbk reads while QEMU writes it (and
  punches out what it read, `vmbk.backup.memory`).  A FIFO would save the
  copy, but libvirt reopens the file after the save to rewrite the header
  and blocks in ``open()`` holding the domain's lock when nobody reads
  any more: a vmbk killed then wedges libvirtd (seen here: ``virsh list``
  hung until the FIFO was opened by hand).  A regular file never blocks,
  and the pause ends when QEMU has written the RAM into the page cache,
  whatever the speed of the compression behind it;
* a device QEMU cannot migrate makes the snapshot fail at once, naming it
  (``cannot migrate domain: non-migratable device: .../usb-mtp``), with
  the domain still paused; `unsaveable` names the kinds vmbk refuses
  before it pauses anything (host devices and the like);
* when the save completes QEMU inactivates the disks, as a migration's
  source does: the persistent dirty bitmaps are written into the images
  and unloaded until the domain runs again, so ``backupBegin`` of an
  incremental then fails ("missing or broken bitmap"): states go with
  full backups (`vmbk.backup.memory.INCREMENTAL`);
* ``virDomainAbortJob`` ends the snapshot's memory phase ("operation
  aborted: job 'snapshot' canceled by client"), the domain still paused:
  that is how the pause is bounded (`save`'s ``timeout``).

The image begins with a 92-byte header (`HEADER`): magic, version 2,
``data_len`` (the domain XML, NUL, libvirt's cookie, NUL, padding: 64 KiB
to spare for an edited XML), ``was_running``, ``compressed``,
``cookieOffset``.  libvirt writes it with the magic ``LibvirtQemudPart``
and rewrites ``LibvirtQemudSave`` once the save completed; a resume writes
the final magic itself (`image_head`), and may put another domain XML in
place (a clone's name, UUID and MACs) within ``data_len``.  A resume is
``virDomainRestoreFlags(IMAGE, XML, VIR_DOMAIN_SAVE_RUNNING)`` (`restore`):
libvirt starts QEMU with ``-incoming``, after checking that the XML keeps
the saved one's ABI (devices, addresses, MACs, UUID, CPU).

Pure: `unsaveable`, `domain_facts`, `device_ids`, `mismatches`, the
header functions.  `host_facts`, `target_host`, `save`, `restore` talk to
libvirt.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import struct
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vmbk.errors import VmError
from vmbk.virt.connection import libvirt_module

log = logging.getLogger("vmbk.virt")

#: libvirt's ``virQEMUSaveHeader``: magic[16], version, data_len, was_running,
#: compressed, cookieOffset, unused[14] (host byte order: little-endian on x86-64, arm64).
HEADER = struct.Struct("<16s5I56x")
MAGIC_PARTIAL = b"LibvirtQemudPart"
MAGIC_DONE = b"LibvirtQemudSave"
SAVE_VERSION = 2
#: ``compressed`` of a raw image (libvirt's QEMU_SAVE_FORMAT_RAW).
RAW = 0



class StateError(VmError):
    """A memory state that cannot be saved, or cannot (or may not) resume (exit 5, kind ``state``)."""

    kind = "state"


# ------------------------------------------------------------------ what cannot be saved


def unsaveable(xml: str) -> list[str]:
    """The devices of ``xml`` whose state cannot be saved and resumed, one line each.

    A host's device passed through (``<hostdev>``, an SR-IOV or vDPA
    ``<interface>``, a TPM or input device in passthrough) has state in
    the host's hardware that no save image holds, and may be absent where
    the point is resumed; virtiofs shares a host directory whose daemon
    keeps state; an ivshmem peer shares memory with another process; a
    host CPU without ``migratable='on'`` exposes features (invtsc) QEMU
    will not migrate.  QEMU's own migration blockers (devices added
    through ``<qemu:commandline>``) are found by the save itself.
    """
    root = ET.fromstring(xml)
    out: list[str] = []
    cpu = root.find("cpu")
    if cpu is not None and cpu.get("mode") == "host-passthrough" and cpu.get("migratable") == "off":
        out.append("cpu host-passthrough with migratable='off' (features QEMU does not migrate)")
    devices = root.find("devices")
    if devices is None:
        return out
    for dev in devices.findall("hostdev"):
        out.append(f"hostdev {dev.get('type') or dev.get('mode') or '?'} {_hostdev_source(dev)}: "
                   f"a host device passed through")
    for dev in devices.findall("interface"):
        if dev.get("type") in ("hostdev", "vdpa"):
            out.append(f"interface type='{dev.get('type')}' {_mac(dev)}: a host device passed through")
    for dev in devices.findall("filesystem"):
        driver = dev.find("driver")
        if driver is not None and driver.get("type") == "virtiofs":
            out.append(f"filesystem {_attr(dev, 'target', 'dir')} (virtiofs: shared with a daemon on the host)")
    for dev in devices.findall("tpm"):
        backend = dev.find("backend")
        if backend is not None and backend.get("type") == "passthrough":
            out.append(f"tpm passthrough {_attr(backend, 'device', 'path')}: the host's TPM")
    for dev in devices.findall("input"):
        if dev.get("type") == "passthrough":
            out.append(f"input passthrough {_attr(dev, 'source', 'evdev')}: a host input device")
    for dev in devices.findall("shmem"):
        model = dev.find("model")
        server = dev.find("server")
        role = dev.get("role")
        if server is not None or (model is not None and model.get("type") == "ivshmem-doorbell") or role != "master":
            out.append(f"shmem {dev.get('name') or '?'} (ivshmem {'doorbell' if server is not None else role or 'peer'}: "
                       f"memory shared with other processes)")
    return out


def _attr(el: ET.Element, child: str, attr: str) -> str:
    c = el.find(child)
    return (c.get(attr) if c is not None else None) or "?"


def _mac(el: ET.Element) -> str:
    return f"mac {_attr(el, 'mac', 'address')}"


def _hostdev_source(dev: ET.Element) -> str:
    src = dev.find("source")
    if src is None:
        return "?"
    addr = src.find("address")
    if addr is not None:
        return " ".join(f"{k}={v}" for k, v in sorted(addr.attrib.items()))
    vendor, product = src.find("vendor"), src.find("product")
    if vendor is not None and product is not None:
        return f"{vendor.get('id')}:{product.get('id')}"
    adapter = src.find("adapter")
    return adapter.get("name") or "?" if adapter is not None else (src.get("dev") or "?")


# ------------------------------------------------------------------ what a state needs


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text.strip(), 0)
    except ValueError:
        return None


_UNITS = {"b": 1, "bytes": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
          "g": 1 << 30, "gib": 1 << 30, "gb": 10**9, "t": 1 << 40, "tib": 1 << 40, "tb": 10**12}


def _kib(el: ET.Element | None) -> int | None:
    """A libvirt size element in KiB (its ``unit``, KiB by default)."""
    if el is None:
        return None
    n = _int(el.text)
    if n is None:
        return None
    return n * _UNITS.get((el.get("unit") or "KiB").lower(), 1024) // 1024


def _address(el: ET.Element) -> str:
    """A device's guest-visible address, normalised (``pci:0000:00:03.0``)."""
    addr = el.find("address")
    if addr is None:
        return ""
    kind = addr.get("type") or "?"
    if kind == "pci":
        d, b, s, f = (_int(addr.get(k)) or 0 for k in ("domain", "bus", "slot", "function"))
        return f" pci:{d:04x}:{b:02x}:{s:02x}.{f}"
    values = ",".join(f"{k}={_int(v) if _int(v) is not None else v}" for k, v in sorted(addr.attrib.items())
                      if k != "type")
    return f" {kind}:{values}"


def _model(el: ET.Element, attr: str = "type") -> str:
    m = el.find("model")
    return (m.get(attr) if m is not None else None) or el.get("model") or "-"


def _device_id(dev: ET.Element) -> str | None:
    """One guest-visible device as a line; None for what the guest does not see (graphics, audio...)."""
    tag = dev.tag
    target = dev.find("target")
    if tag == "disk":
        return (f"disk {dev.get('device', 'disk')} {target.get('dev') if target is not None else '?'} "
                f"bus={target.get('bus') if target is not None else '?'}{_address(dev)}")
    if tag == "controller":
        return f"controller {dev.get('type')} index={dev.get('index', '0')} model={dev.get('model') or '-'}{_address(dev)}"
    if tag == "interface":
        return f"interface model={_model(dev)}{_address(dev)}"
    if tag in ("serial", "console", "parallel"):
        kind = target.get("type") if target is not None else None
        port = target.get("port") if target is not None else None
        return f"{tag} port={port or '0'} target={kind or '-'}{_address(dev)}"
    if tag == "channel":
        return (f"channel {target.get('type') if target is not None else '?'} "
                f"name={target.get('name') if target is not None else '-'}{_address(dev)}")
    if tag == "video":
        m = dev.find("model")
        attrs = "" if m is None else " ".join(f"{k}={m.get(k)}" for k in ("type", "vram", "ram", "vgamem", "heads")
                                             if m.get(k))
        return f"video {attrs}{_address(dev)}"
    if tag == "tpm":
        b = dev.find("backend")
        return (f"tpm model={dev.get('model') or '-'} backend={b.get('type') if b is not None else '-'} "
                f"version={b.get('version') if b is not None and b.get('version') else '-'}")
    if tag in ("input", "sound", "watchdog", "rng", "memballoon", "panic", "iommu", "vsock", "hub", "redirdev",
               "smartcard", "crypto", "shmem", "filesystem", "hostdev", "memory"):
        kind = dev.get("type") or dev.get("model") or _model(dev)
        extra = ""
        if tag == "input":
            extra = f" bus={dev.get('bus') or '-'}"
        elif tag == "memory":
            extra = f" size={_kib(dev.find('target/size'))}KiB"
        elif tag == "filesystem":
            extra = f" target={_attr(dev, 'target', 'dir')}"
        return f"{tag} {kind}{extra}{_address(dev)}"
    return None


def _implicit(line: str) -> bool:
    """A device the machine type always has, which libvirt leaves out of a save image's
    (migratable) XML but writes in a defined domain's: the PCI root, the PS/2 keyboard and mouse."""
    return line.startswith(("controller pci index=0 model=pci-root", "controller pci index=0 model=pcie-root",
                            "input keyboard bus=ps2", "input mouse bus=ps2"))


def device_ids(devices: ET.Element | None) -> list[str]:
    """Every guest-visible device of a ``<devices>`` element, one line each, sorted."""
    if devices is None:
        return []
    return sorted(d for d in (_device_id(el) for el in devices) if d is not None and not _implicit(d))


def _firmware(root: ET.Element) -> str:
    os_el = root.find("os")
    if os_el is None:
        return "bios"
    loader = os_el.find("loader")
    efi = os_el.get("firmware") == "efi" or (loader is not None and loader.get("type") == "pflash")
    secure = loader is not None and loader.get("secure") == "yes"
    return ("uefi" + (" secure-boot" if secure else "")) if efi else "bios"


def domain_facts(xml: str) -> dict[str, Any]:
    """What of a domain XML a saved state depends on (the state manifest's ``domain``)."""
    root = ET.fromstring(xml)
    os_type = root.find("os/type")
    vcpu = root.find("vcpu")
    cpu = root.find("cpu")
    topology = cpu.find("topology") if cpu is not None else None
    model = cpu.find("model") if cpu is not None else None
    count = _int(vcpu.text) if vcpu is not None else None
    features = root.find("features")
    return {
        "type": root.get("type"),
        "arch": os_type.get("arch") if os_type is not None else None,
        "machine": os_type.get("machine") if os_type is not None else None,
        "memory_kib": _kib(root.find("memory")),
        "vcpus": count,
        "vcpus_current": _int(vcpu.get("current")) if vcpu is not None and vcpu.get("current") else count,
        "cpu": {
            "mode": (cpu.get("mode") or "custom") if cpu is not None else None,
            "model": (model.text or "").strip() or None if model is not None else None,
            "topology": ",".join(f"{k}={topology.get(k)}" for k in sorted(topology.attrib)) if topology is not None
            else None,
        },
        "firmware": _firmware(root),
        "features": sorted(el.tag for el in features) if features is not None else [],
        "devices": device_ids(root.find("devices")),
    }


def version_text(n: int) -> str:
    """libvirt's version numbers (major * 1,000,000 + minor * 1,000 + micro) as text."""
    return f"{n // 1_000_000}.{n // 1000 % 1000}.{n % 1000}"


def _version(text: Any) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in str(text).split("."))
    except ValueError:
        return ()


@dataclasses.dataclass(frozen=True)
class TargetHost:
    """The host a state would resume on, as `mismatches` needs it."""

    arch: str | None
    page_size: int | None
    cpu_vendor: str | None
    cpu_model: str | None
    qemu: str | None
    #: Machine types (and their aliases) QEMU offers per (arch, domain type); None: unknown.
    machines: frozenset[str] | None = None
    #: Domain types (kvm, qemu) the host runs for the arch.
    domain_types: frozenset[str] | None = None
    #: CPU models usable for the domain's type, and the modes supported; None: unknown.
    cpu_models: frozenset[str] | None = None
    cpu_modes: frozenset[str] | None = None


def _caps_host(caps: ET.Element) -> dict[str, Any]:
    pages = [int(p.get("size") or 0) * _UNITS.get((p.get("unit") or "KiB").lower(), 1024)
             for p in caps.findall("host/cpu/pages")]
    return {
        "arch": caps.findtext("host/cpu/arch"),
        "page_size": min((p for p in pages if p > 0), default=None),
        "cpu": {"vendor": caps.findtext("host/cpu/vendor"), "model": caps.findtext("host/cpu/model")},
    }


def host_facts(conn: Any) -> dict[str, Any]:
    """The state manifest's ``host``: where the state is saved (libvirt's capabilities, versions)."""
    caps = ET.fromstring(conn.getCapabilities())
    out = _caps_host(caps)
    if out["page_size"] is None:
        out["page_size"] = os.sysconf("SC_PAGE_SIZE")
    try:
        name = conn.getHostname()
    except libvirt_module().libvirtError:
        name = socket.gethostname()
    return {"name": name, **out, "libvirt": version_text(conn.getLibVersion()), "qemu": version_text(conn.getVersion())}


def target_host(conn: Any, arch: str | None, virt_type: str | None, machine: str | None) -> TargetHost:
    """The facts of the host ``conn`` runs on that a resume depends on."""
    libvirt = libvirt_module()
    caps = ET.fromstring(conn.getCapabilities())
    host = _caps_host(caps)
    machines: set[str] = set()
    types: set[str] = set()
    for guest in caps.findall("guest"):
        a = guest.find("arch")
        if a is None or a.get("name") != arch:
            continue
        types.update(d.get("type") or "" for d in a.findall("domain"))
        for m in a.iter("machine"):
            machines.update(x for x in (m.text, m.get("canonical")) if x)
    models: frozenset[str] | None = None
    modes: frozenset[str] | None = None
    try:
        dc = ET.fromstring(conn.getDomainCapabilities(None, arch, machine, virt_type, 0))
        modes = frozenset(m.get("name") or "" for m in dc.findall("cpu/mode") if m.get("supported") == "yes")
        models = frozenset((m.text or "").strip() for m in dc.findall("cpu/mode[@name='custom']/model")
                           if m.get("usable") != "no")
    except (libvirt.libvirtError, ET.ParseError) as e:
        log.info("domain capabilities of %s/%s/%s unknown: %s", arch, virt_type, machine, e)
    return TargetHost(
        arch=host["arch"], page_size=host["page_size"] or os.sysconf("SC_PAGE_SIZE"),
        cpu_vendor=host["cpu"]["vendor"], cpu_model=host["cpu"]["model"], qemu=version_text(conn.getVersion()),
        machines=frozenset(machines), domain_types=frozenset(types), cpu_models=models, cpu_modes=modes)


def mismatches(saved_host: Mapping[str, Any], saved: Mapping[str, Any], xml: str, target: TargetHost) -> list[str]:
    """Why a state saved on ``saved_host`` from a domain of ``saved`` (`domain_facts`)
    cannot resume as the domain ``xml`` on ``target``; empty: it can.

    The XML must describe the same machine (type, memory, vCPUs, CPU,
    firmware, features, every guest-visible device at its address), and
    the host must run it: same architecture and page size, a QEMU no
    older than the one that saved it (an older QEMU cannot read a newer
    migration stream), the machine type, the domain type and the CPU.
    """
    out: list[str] = []
    want = domain_facts(xml)

    def differ(what: str, a: Any, b: Any) -> None:
        if a != b:
            out.append(f"{what}: the saved state has {_show(a)}, the XML to define has {_show(b)}")

    if target.arch and saved_host.get("arch") and target.arch != saved_host.get("arch"):
        out.append(f"architecture: the state was saved on {saved_host.get('arch')}, this host is {target.arch}")
    if target.page_size and saved_host.get("page_size") and target.page_size != saved_host.get("page_size"):
        out.append(f"page size: the state was saved with {saved_host.get('page_size')}-byte pages, this host "
                   f"has {target.page_size}")
    old, new = _version(saved_host.get("qemu")), _version(target.qemu)
    if old and new and new[:2] < old[:2]:
        out.append(f"QEMU: the state was saved by QEMU {saved_host.get('qemu')}, this host has {target.qemu}, "
                   f"which cannot load a newer QEMU's state")
    differ("domain type", saved.get("type"), want["type"])
    differ("architecture of the domain", saved.get("arch"), want["arch"])
    differ("machine type", saved.get("machine"), want["machine"])
    if target.domain_types is not None and want["type"] and want["type"] not in target.domain_types:
        out.append(f"domain type {want['type']!r} is not available on this host (it has "
                   f"{', '.join(sorted(target.domain_types)) or 'none'} for {want['arch']})")
    if target.machines is not None and want["machine"] and want["machine"] not in target.machines:
        out.append(f"machine type {want['machine']!r} is not available on this host's QEMU {target.qemu}")
    differ("memory (KiB)", saved.get("memory_kib"), want["memory_kib"])
    differ("vCPUs", saved.get("vcpus"), want["vcpus"])
    differ("vCPUs online", saved.get("vcpus_current"), want["vcpus_current"])
    differ("CPU", saved.get("cpu"), want["cpu"])
    differ("firmware", saved.get("firmware"), want["firmware"])
    differ("features", saved.get("features"), want["features"])
    cpu = want["cpu"] or {}
    if cpu.get("mode") == "host-passthrough":
        raw_cpu = saved_host.get("cpu")
        host_cpu: Mapping[str, Any] = raw_cpu if isinstance(raw_cpu, Mapping) else {}
        then = (host_cpu.get("vendor"), host_cpu.get("model"))
        if then != (target.cpu_vendor, target.cpu_model):
            out.append(f"CPU host-passthrough: the state was saved on a {' '.join(str(x) for x in then)} host, this "
                       f"one is {target.cpu_vendor} {target.cpu_model} (the guest's CPU would change under it)")
    elif cpu.get("mode") == "custom" and cpu.get("model") and target.cpu_models is not None \
            and cpu["model"] not in target.cpu_models:
        out.append(f"CPU model {cpu['model']!r} is not usable on this host")
    if cpu.get("mode") and target.cpu_modes is not None and target.cpu_modes and cpu["mode"] not in target.cpu_modes:
        out.append(f"CPU mode {cpu['mode']!r} is not supported on this host")
    have, need = set(saved.get("devices") or []), set(want["devices"])
    for line in sorted(have - need):
        out.append(f"device only in the saved state: {line}")
    for line in sorted(need - have):
        out.append(f"device only in the XML to define: {line}")
    return out


def _show(v: Any) -> str:
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{k}={v[k]}" for k in sorted(v) if v[k] is not None) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(str(x) for x in v) + "]"
    return repr(v) if isinstance(v, str) else str(v)


# ------------------------------------------------------------------ the save image's head


@dataclasses.dataclass(frozen=True)
class ImageHead:
    """The first ``HEADER.size + data_len`` bytes of a save image, read."""

    magic: bytes
    version: int
    data_len: int
    was_running: int
    compressed: int
    cookie_offset: int
    xml: str
    cookie: bytes

    @property
    def size(self) -> int:
        return HEADER.size + self.data_len


def head_size(first: bytes) -> int:
    """How many bytes `read_head` needs, from the first `HEADER.size` of an image."""
    if len(first) < HEADER.size:
        raise StateError(f"the save image is shorter than its {HEADER.size}-byte header")
    magic, version, data_len, *_ = HEADER.unpack_from(first)
    if magic not in (MAGIC_PARTIAL, MAGIC_DONE) or version != SAVE_VERSION:
        raise StateError(f"not a libvirt save image of version {SAVE_VERSION} (magic {magic!r}, version {version})")
    if data_len > 16 << 20:
        raise StateError(f"a save image header with {data_len} bytes of XML is not one libvirt writes")
    return HEADER.size + data_len


def read_head(data: bytes) -> ImageHead:
    """The header, domain XML and cookie at the start of a save image (`head_size` bytes of it)."""
    need = head_size(data)
    if len(data) < need:
        raise StateError(f"the save image's head is cut short ({len(data)} of {need} bytes)")
    magic, version, data_len, was_running, compressed, cookie_offset = HEADER.unpack_from(data)
    body = data[HEADER.size:need]
    end = cookie_offset if 0 < cookie_offset <= data_len else data_len
    xml = body[:end].split(b"\0", 1)[0].decode("utf-8")
    cookie = body[end:].split(b"\0", 1)[0] if 0 < cookie_offset <= data_len else b""
    return ImageHead(magic, version, data_len, was_running, compressed, cookie_offset, xml, cookie)


def image_head(head: ImageHead, xml: str | None = None) -> bytes:
    """The head of a complete image: magic ``LibvirtQemudSave``, ``xml`` in place of the saved one if given.

    libvirt's ``data_len`` is kept (QEMU's stream starts right after it):
    the new XML, its NUL and the cookie must fit in it (libvirt leaves 64
    KiB to spare for exactly this).
    """
    text = (head.xml if xml is None else xml).encode("utf-8") + b"\0"
    cookie = head.cookie + b"\0" if head.cookie else b""
    if len(text) + len(cookie) > head.data_len:
        raise StateError(f"the domain XML ({len(text)} bytes) does not fit in the save image's "
                         f"{head.data_len} bytes")
    body = text + cookie
    header = HEADER.pack(MAGIC_DONE, head.version, head.data_len, head.was_running, head.compressed,
                         len(text) if cookie else 0)
    return header + body + bytes(head.data_len - len(body))


def same_identity(saved_xml: str, defined_xml: str) -> str:
    """``saved_xml`` with the name, UUID, generation ID and MAC addresses of ``defined_xml``.

    A clone is defined with a new identity (`vmbk.restore.domainxml`);
    libvirt checks the XML a state is restored with against the one in
    the image (UUID and MACs included), so the image gets the clone's.
    NICs are matched in document order, as the guest enumerated them.
    """
    saved, defined = ET.fromstring(saved_xml), ET.fromstring(defined_xml)
    for tag in ("name", "uuid", "genid"):
        src, dst = defined.find(tag), saved.find(tag)
        if src is not None and dst is not None:
            dst.text = src.text
        elif src is not None:
            saved.insert(1, src)
    src_nics = defined.findall("devices/interface")
    dst_nics = saved.findall("devices/interface")
    for s, d in zip(src_nics, dst_nics):
        mac_s, mac_d = s.find("mac"), d.find("mac")
        if mac_s is not None and mac_d is not None:
            mac_d.set("address", mac_s.get("address") or "")
    return ET.tostring(saved, encoding="unicode")


# ------------------------------------------------------------------ libvirt


def disk_targets(xml: str) -> list[str]:
    root = ET.fromstring(xml)
    return [t.get("dev") or "" for t in root.findall("devices/disk/target") if t.get("dev")]


def snapshot_xml(spool: Path, disks: Sequence[str]) -> str:
    """A memory-only external snapshot into ``spool``: every disk ``snapshot='no'``."""
    top = ET.Element("domainsnapshot")
    ET.SubElement(top, "description").text = "vmbk memory state (no metadata kept)"
    ET.SubElement(top, "memory", {"snapshot": "external", "file": str(spool)})
    dis = ET.SubElement(top, "disks")
    for target in disks:
        ET.SubElement(dis, "disk", {"name": target, "snapshot": "no"})
    return ET.tostring(top, encoding="unicode")


def save(dom: Any, spool: Path, *, timeout: float) -> float:
    """Save the paused ``dom``'s RAM and device state into ``spool``; the seconds it took.

    The domain stays paused.  Past ``timeout`` seconds the save is
    aborted (`StateError`); so is a device QEMU cannot migrate, named in
    the error.
    """
    libvirt = libvirt_module()
    xml = snapshot_xml(spool, disk_targets(dom.XMLDesc(0)))
    fired = threading.Event()

    def abort() -> None:
        fired.set()
        try:
            dom.abortJob()
        except libvirt.libvirtError as e:
            log.warning("%s: could not abort the state save: %s", dom.name(), e.get_error_message())

    timer = threading.Timer(timeout, abort)
    timer.daemon = True
    t0 = time.monotonic()
    timer.start()
    try:
        dom.snapshotCreateXML(xml, libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA)
    except libvirt.libvirtError as e:
        if fired.is_set():
            raise StateError(f"saving the memory state took longer than memory_pause_timeout ({timeout:g} s): "
                             f"aborted", vm=dom.name()) from None
        raise StateError(f"libvirt could not save the memory state: {e.get_error_message()}", vm=dom.name()) from None
    finally:
        timer.cancel()
    if fired.is_set():  # the abort came as the save completed: it did complete
        log.info("%s: the state save completed as its timeout fired", dom.name())
    return time.monotonic() - t0


def restore(conn: Any, image: Path, xml: str) -> Any:
    """Start the domain of ``xml`` from the save image ``image``, running; the domain."""
    libvirt = libvirt_module()
    root = ET.fromstring(xml)
    try:
        conn.restoreFlags(str(image), xml, libvirt.VIR_DOMAIN_SAVE_RUNNING)
        uuid = root.findtext("uuid")
        return conn.lookupByUUIDString(uuid) if uuid else conn.lookupByName(root.findtext("name") or "")
    except libvirt.libvirtError as e:
        raise StateError(f"libvirt could not resume the saved state: {e.get_error_message()}",
                         vm=root.findtext("name")) from None


def describe(lines: Iterable[str]) -> str:
    return "; ".join(lines)
