"""Which files the defined domains use, so a restore never writes over one.

vmrestore guide, 15 ("Disk Collision Protection"): an output file that is
the disk (or NVRAM) of another VM is always refused; of a running VM,
refused; of the VM being replaced while it is shut off, allowed with
``--force``.  Both the live and the inactive definition of each domain are
looked at (they differ after a snapshot or a hot-plug).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vmbk.errors import StorageError
from vmbk.virt.connection import libvirt_module
from vmbk.virt.domain import parse_domain_xml


@dataclasses.dataclass(frozen=True)
class Use:
    domain: str
    active: bool


def files_in_use(conn: Any) -> dict[str, list[Use]]:
    """Real path -> the domains whose disks or NVRAM it is."""
    libvirt = libvirt_module()
    out: dict[str, list[Use]] = {}
    for dom in conn.listAllDomains(0):
        try:
            name, active = dom.name(), bool(dom.isActive())
            xmls = [dom.XMLDesc(0)]
            if dom.isPersistent():
                xmls.append(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        except libvirt.libvirtError:
            continue  # went away meanwhile
        paths: set[str] = set()
        for xml in xmls:
            facts = parse_domain_xml(xml)
            paths |= {d["source"] for d in facts["disks"] if d["source"] and d["type"] in ("file", "block")}
            if facts["firmware"]["nvram"]:
                paths.add(facts["firmware"]["nvram"])
        for p in paths:
            out.setdefault(os.path.realpath(p), []).append(Use(name, active))
    return out


def check_targets(targets: Iterable[Path], used: dict[str, list[Use]], *, replaceable: str | None,
                  force: bool) -> None:
    """StorageError (4) when a target is a file a domain uses (see module doc)."""
    for target in targets:
        for use in used.get(os.path.realpath(target), []):
            if use.active:
                raise StorageError(f"{target} is in use by the running VM {use.domain!r}")
            if use.domain == replaceable:
                if not force:
                    raise StorageError(f"{target} belongs to VM {use.domain!r} (shut off): --force overwrites it")
                continue
            raise StorageError(f"{target} belongs to VM {use.domain!r}: choose another --restore-path or --name")
