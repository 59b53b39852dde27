"""What the backup kept of the domain at a restore point: its XML and NVRAM.

Backups keep ``vmconfig.<ident>.xml`` (the inactive domain XML) and the
UEFI variables as ``<nvram basename>.<ident>`` per checkpoint (vmrestore
guide, 4.1 and 12).  The point's own files are used; the chain's newest
XML is a fallback, with a warning by the caller.
"""

from __future__ import annotations

import dataclasses
import os
import xml.etree.ElementTree as ET
from pathlib import Path

from vmbk.tree.points import RestorePoint
from vmbk.tree.names import vmconfig_name, vmconfig_order

MAX_XML = 16 << 20


@dataclasses.dataclass(frozen=True)
class DomainConfig:
    """The restore point's domain XML and the facts a restore needs from it."""

    path: Path
    xml: str
    name: str | None
    uuid: str | None
    nvram: str | None
    exact: bool  # the point's own vmconfig, not a fallback
    uefi: bool = False
    #: disk target -> basename of its image (file, block device or volume)
    sources: dict[str, str] = dataclasses.field(default_factory=dict)


def point_config(point: RestorePoint) -> DomainConfig | None:
    """``vmconfig.<ident>.xml`` of the point, else the chain's newest one."""
    chain = point.chain
    own = vmconfig_name(point.ident)
    names = [own] if own in chain.vmconfigs else sorted(chain.vmconfigs, key=lambda n: vmconfig_order(n) or (-1, n), reverse=True)
    for name in names:
        try:
            with open(chain.path / name, "rb") as fh:
                xml = fh.read(MAX_XML).decode("utf-8")
            root = ET.fromstring(xml)
        except (OSError, UnicodeDecodeError, ET.ParseError):
            continue
        os_el = root.find("os")
        uefi = os_el is not None and (os_el.get("firmware") == "efi" or os_el.find("loader") is not None)
        return DomainConfig(chain.path / name, xml, (root.findtext("name") or "").strip() or None,
                            (root.findtext("uuid") or "").strip() or None, _nvram_path(root), name == own, uefi,
                            _sources(root))
    return None


def _nvram_path(root: ET.Element) -> str | None:
    el = root.find("os/nvram")
    if el is None:
        return None
    src = el.find("source")
    if src is not None and src.get("file"):
        return src.get("file")
    return (el.text or "").strip() or None


def _sources(root: ET.Element) -> dict[str, str]:
    out = {}
    for disk in root.iterfind("devices/disk"):
        target, source = disk.find("target"), disk.find("source")
        if target is None or source is None or not target.get("dev"):
            continue
        path = source.get("file") or source.get("dev") or source.get("volume")
        if path and os.path.basename(path):
            out[str(target.get("dev"))] = os.path.basename(path)
    return out


def nvram_backup(point: RestorePoint, nvram: str | None) -> Path | None:
    """The backup's copy of the VM's NVRAM at this point.

    Saved as ``<basename>.<ident>``; a copy backup keeps it without suffix
    (`vmbk.backup.sidefiles`), which is also the "latest state" name of
    vmbackup (guide, 12).  With firmware auto-selection (``<os
    firmware='efi'>``) the inactive XML that backups keep names no
    ``<nvram>`` (libvirt fills it in only when the VM starts), so then the
    one ``*_VARS*.<ident>`` file of the chain is it (guide, 12: NVRAM is
    captured "as <vm>_VARS*.fd.virtnbdbackup.<N>").
    """
    chain = point.chain.path
    if nvram:
        base = os.path.basename(nvram)
        names = [f"{base}.{point.ident}", base]
    else:
        try:
            present = sorted(e.name for e in os.scandir(chain) if e.is_file() and "_VARS" in e.name)
        except OSError:
            return None
        own = [n for n in present if n.endswith(f".{point.ident}")]
        bare = [n for n in present if n.endswith(".fd")]
        names = own if len(own) == 1 else bare if len(bare) == 1 else []
    for name in names:
        path = chain / name
        if path.is_file():
            return path
    return None
