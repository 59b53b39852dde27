"""Facts about one domain, read from libvirt into plain data.

`parse_domain_xml` is pure (XML text in, dict out) so it is tested without
libvirt; `domain_facts` adds what only a live connection knows (state,
sizes, checkpoints, whether the agent answers).
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from typing import Any

from vmbk.errors import VmbkError
from vmbk.virt import qemuimg
from vmbk.virt.hostfiles import LOCAL, HostFiles

log = logging.getLogger("vmbk.virt")

#: libvirt's virDomainState values, by the names virsh prints.
STATES = {
    0: "no state",
    1: "running",
    2: "blocked",
    3: "paused",
    4: "shutdown",
    5: "shut off",
    6: "crashed",
    7: "pmsuspended",
}
AGENT_CHANNEL = "org.qemu.guest_agent.0"
AGENT_TIMEOUT = 2
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
LIBOSINFO_NS = "http://libosinfo.org/xmlns/libvirt/domain/1.0"


def _disk(el: ET.Element) -> dict[str, Any]:
    target = el.find("target")
    source = el.find("source")
    driver = el.find("driver")
    src_path: str | None = None
    volume: dict[str, str] | None = None
    if source is not None:
        src_path = source.get("file") or source.get("dev") or source.get("name")
        if el.get("type") == "volume":
            volume = {"pool": source.get("pool", ""), "volume": source.get("volume", "")}
    return {
        "target": target.get("dev") if target is not None else None,
        "bus": target.get("bus") if target is not None else None,
        "device": el.get("device", "disk"),
        "type": el.get("type"),
        "source": src_path,
        "volume": volume,
        "format": driver.get("type") if driver is not None else None,
        "readonly": el.find("readonly") is not None,
        "shareable": el.find("shareable") is not None,
    }


def parse_domain_xml(xml: str) -> dict[str, Any]:
    """Name, uuid, disks, firmware, TPM and agent channel from domain XML."""
    root = ET.fromstring(xml)
    os_el = root.find("os")
    loader = os_el.find("loader") if os_el is not None else None
    nvram = os_el.find("nvram") if os_el is not None else None
    firmware: dict[str, Any] = {
        "type": "uefi" if (loader is not None or (os_el is not None and os_el.get("firmware") == "efi")) else "bios",
        "loader": loader.text.strip() if loader is not None and loader.text else None,
        "nvram": nvram.text.strip() if nvram is not None and nvram.text else None,
        "secure_boot": loader is not None and loader.get("secure") == "yes",
    }
    devices = root.find("devices")
    disks: list[dict[str, Any]] = []
    tpm: dict[str, Any] | None = None
    agent = False
    agent_state: str | None = None
    if devices is not None:
        disks = [_disk(d) for d in devices.findall("disk")]
        tpm_el = devices.find("tpm")
        if tpm_el is not None:
            backend = tpm_el.find("backend")
            tpm = {
                "model": tpm_el.get("model"),
                "backend": backend.get("type") if backend is not None else None,
                "version": backend.get("version") if backend is not None else None,
            }
        for ch in devices.findall("channel"):
            t = ch.find("target")
            if t is not None and t.get("name") == AGENT_CHANNEL:
                agent = True
                agent_state = t.get("state")
    windows = _is_windows(root)
    warnings: list[str] = []
    if windows and not _has_discard_granularity_override(root):
        virtio = [d["target"] for d in disks if d["bus"] == "virtio" and d["device"] == "disk"]
        if virtio:
            warnings.append(
                "Windows guest with VirtIO disks (" + ", ".join(str(t) for t in virtio) + ") and no "
                "discard_granularity override: fstrim will be very slow (see the vmbackup manual, Known Issues)"
            )
    return {
        "name": root.findtext("name"),
        "uuid": root.findtext("uuid"),
        "domain_type": root.get("type"),
        "disks": disks,
        "firmware": firmware,
        "tpm": tpm,
        "agent_channel": agent,
        "agent_channel_state": agent_state,
        "windows": windows,
        "warnings": warnings,
    }


def _is_windows(root: ET.Element) -> bool:
    """libosinfo metadata says so, or Hyper-V enlightenments suggest it."""
    for el in root.iter(f"{{{LIBOSINFO_NS}}}os"):
        if "microsoft.com/win" in (el.get("id") or ""):
            return True
    features = root.find("features")
    return features is not None and features.find("hyperv") is not None


def _has_discard_granularity_override(root: ET.Element) -> bool:
    for el in root.iter():
        tag = el.tag if isinstance(el.tag, str) else ""
        if tag.startswith(f"{{{QEMU_NS}}}") and "discard_granularity" in (el.get("name") or el.get("value") or ""):
            return True
    return False


def agent_answers(dom: Any, timeout: int = AGENT_TIMEOUT) -> bool:
    """Does the guest agent answer a ping within ``timeout`` seconds?"""
    try:
        import libvirt_qemu

        libvirt_qemu.qemuAgentCommand(dom, '{"execute":"guest-ping"}', timeout, 0)
        return True
    except Exception as e:
        log.debug("guest-ping: %s", e)
        return False


def domain_facts(dom: Any, agent_timeout: int = AGENT_TIMEOUT, files: HostFiles = LOCAL) -> dict[str, Any]:
    """`parse_domain_xml` plus the live state, persistence and checkpoints.

    ``files``: the host's files (`vmbk.virt.hostfiles`): a remote host's
    disks are looked at there, over ssh, never here.
    """
    facts = parse_domain_xml(dom.XMLDesc(0))
    state, _reason = dom.state()
    facts["state"] = STATES.get(state, str(state))
    facts["persistent"] = bool(dom.isPersistent())
    if facts["tpm"] is not None:
        facts["tpm"]["state_dir"] = f"/var/lib/libvirt/swtpm/{facts['uuid']}"
    try:
        facts["checkpoints"] = sorted(c.getName() for c in dom.listAllCheckpoints(0))
    except Exception as e:  # older libvirt or a driver without checkpoints
        log.debug("%s: cannot list checkpoints: %s", facts["name"], e)
        facts["checkpoints"] = []
    facts["agent"] = None
    if facts["agent_channel"] and facts["state"] == "running":
        # A channel libvirt reports disconnected has no agent behind it:
        # don't spend the timeout on it.
        facts["agent"] = facts["agent_channel_state"] != "disconnected" and agent_answers(dom, agent_timeout)
    for disk in facts["disks"]:
        if disk["device"] != "disk" or not disk["target"]:
            continue
        _disk_facts(dom, facts["name"], disk, files)
    if facts["state"] in ("running", "paused", "blocked", "pmsuspended"):
        _live_bitmaps(dom, facts)
    return facts


def _live_bitmaps(dom: Any, facts: dict[str, Any]) -> None:
    """Bitmaps of a running VM, as QEMU has them, through libvirt.

    A running QEMU writes new persistent bitmaps into the qcow2 only when
    it closes the image, so ``qemu-img info -U`` shows a stale set.  Asking
    libvirt for a checkpoint's size makes QEMU measure its bitmaps: the
    answer proves they exist and track writes; an error means at least one
    is missing or broken, and its bitmaps are left out.
    """
    import libvirt

    live: dict[str, list[dict[str, Any]]] = {}
    errors: list[str] = []
    flags = libvirt.VIR_DOMAIN_CHECKPOINT_XML_SIZE | libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN
    for name in facts["checkpoints"]:
        try:
            xml = dom.checkpointLookupByName(name).getXMLDesc(flags)
        except libvirt.libvirtError as e:
            errors.append(f"{name}: {e.get_error_message()}")
            continue
        for d in ET.fromstring(xml).iter("disk"):
            if d.get("checkpoint") != "bitmap":
                continue
            if d.get("size") is None:
                # libvirt answers even when QEMU lacks the bitmap, but then
                # it has no size to report: the bitmap is gone.
                errors.append(f"{name}: bitmap {d.get('bitmap') or name} of {d.get('name')} is missing")
                continue
            live.setdefault(d.get("name", ""), []).append(
                {"name": d.get("bitmap") or name, "flags": ["auto"], "granularity": None, "size": int(d.get("size", 0))}
            )
    for disk in facts["disks"]:
        if "bitmaps" in disk:
            disk["bitmaps"] = live.get(disk["target"], [])
            disk["bitmaps_source"] = "libvirt"
    facts["checkpoint_errors"] = errors


def _disk_facts(dom: Any, vm: str, disk: dict[str, Any], files: HostFiles) -> None:
    try:
        capacity, allocation, _physical = dom.blockInfo(disk["target"])
        disk["virtual_size"] = capacity
        disk["allocated_size"] = allocation
    except Exception as e:
        log.debug("%s: blockInfo(%s): %s", vm, disk["target"], e)
    path = disk.get("source")
    if not path or disk.get("type") not in ("file", "block"):
        return
    try:
        disk["mtime"], info = files.disk_info(path, disk.get("format"))
    except OSError as e:
        disk["error"] = f"cannot stat {path}: {e.strerror}"
        return
    except VmbkError as e:
        disk["error"] = str(e)
        return
    disk.update(qemuimg.image_facts(info))
