"""What the host a VM is restored on has: the facts `vmbk.restore.remap.check` compares with.

From its libvirtd (networks, storage pools, the capabilities of its QEMU:
machine types, usable CPU models, the default emulator, firmware
auto-selection, TPM backends) and its files (`vmbk.virt.hostfiles`: here,
or over ssh for a ``qemu+ssh://`` target): bridges under
``/sys/class/net``, the loader, NVRAM template, emulator and the
directories the disks would go to.  Read once, before anything is
written.
"""

from __future__ import annotations

import contextlib
import logging
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from typing import Any

from vmbk.restore.remap import TargetFacts
from vmbk.virt.connection import libvirt_module
from vmbk.virt.hostfiles import HostFiles

log = logging.getLogger("vmbk.restore")


def gather(conn: Any, files: HostFiles, xml: str, paths: Iterable[str], bridges: Iterable[str] = ()) -> TargetFacts:
    """The target's facts for a VM of ``xml``; ``paths``: more paths whose existence matters."""
    libvirt = libvirt_module()
    networks: dict[str, bool] = {}
    with contextlib.suppress(libvirt.libvirtError):
        for net in conn.listAllNetworks(0):
            networks[net.name()] = bool(net.isActive())
    pools: dict[str, tuple[bool, str | None]] = {}
    with contextlib.suppress(libvirt.libvirtError):
        for pool in conn.listAllStoragePools(0):
            try:
                path = ET.fromstring(pool.XMLDesc(0)).findtext("target/path")
                pools[pool.name()] = (bool(pool.isActive()), path)
            except (libvirt.libvirtError, ET.ParseError):
                continue
    root = ET.fromstring(xml)
    os_type = root.find("os/type")
    arch = os_type.get("arch") if os_type is not None else None
    virt = root.get("type") or "kvm"
    machines: set[str] = set()
    with contextlib.suppress(libvirt.libvirtError, ET.ParseError):
        caps = ET.fromstring(conn.getCapabilities())
        for guest in caps.findall("guest"):
            a = guest.find("arch")
            if a is None or (arch and a.get("name") != arch):
                continue
            for m in a.iter("machine"):
                machines.update(x for x in (m.text, m.get("canonical")) if x)
    cpu_models: set[str] = set()
    emulator = None
    efi = False
    swtpm = True
    try:
        dom_caps = ET.fromstring(conn.getDomainCapabilities(None, arch, None, virt, 0))
    except (libvirt.libvirtError, ET.ParseError) as e:
        log.warning("no domain capabilities from the target (%s): its CPU models and firmware are not checked", e)
        dom_caps = None
    if dom_caps is not None:
        emulator = dom_caps.findtext("path")
        cpu_models = {m.text for m in dom_caps.findall("cpu/mode[@name='custom']/model")
                      if m.text and m.get("usable") != "no"}
        efi = "efi" in [v.text for v in dom_caps.findall("os/enum[@name='firmware']/value")]
        tpm = dom_caps.find("devices/tpm")
        if tpm is not None:
            swtpm = tpm.get("supported") == "yes" and "emulator" in [
                v.text for v in tpm.findall("enum[@name='backendModel']/value")]
    wanted = set(paths) | {f"/sys/class/net/{b}" for b in bridges}
    existing = files.existing(wanted)
    return TargetFacts(networks=networks, bridges=frozenset(b for b in bridges if f"/sys/class/net/{b}" in existing),
                       pools=pools, existing=frozenset(existing), machines=frozenset(machines),
                       cpu_models=frozenset(cpu_models), emulator=emulator, efi_autoselect=efi, swtpm=swtpm)


def bridges_of(xml: str) -> set[str]:
    return {s.get("bridge", "") for s in ET.fromstring(xml).findall("devices/interface[@type='bridge']/source")
            if s.get("bridge")}
