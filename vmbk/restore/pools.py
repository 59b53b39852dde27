"""Refresh the libvirt storage pool that holds the restored files.

vmrestore guide, 7 "Storage pools": after a restore the pool whose target
directory contains the restore path (longest prefix wins) is refreshed,
so the new volumes show in virt-manager, Cockpit or ``virsh vol-list``
at once.  Files outside every pool restore just the same; a refresh that
fails is a warning, never a failed restore (the data is in place).
"""

from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vmbk.virt.connection import libvirt_module

log = logging.getLogger("vmbk.restore")


def pool_dirs(conn: Any) -> dict[str, tuple[Any, str]]:
    """Active pools with a target directory: real path -> (pool, name)."""
    libvirt = libvirt_module()
    out = {}
    try:
        pools = conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE)
    except libvirt.libvirtError as e:
        log.warning("cannot list storage pools: %s", e.get_error_message())
        return {}
    for pool in pools:
        try:
            path = ET.fromstring(pool.XMLDesc(0)).findtext("target/path")
            if path:
                out[os.path.realpath(path)] = (pool, pool.name())
        except (libvirt.libvirtError, ET.ParseError):
            continue
    return out


def containing(dirs: Iterable[str], path: Path) -> str | None:
    """The longest pool directory that contains ``path``."""
    real = os.path.realpath(path)
    best = None
    for d in dirs:
        if (real == d or real.startswith(d.rstrip("/") + "/")) and (best is None or len(d) > len(best)):
            best = d
    return best


def refresh(conn: Any, files: Iterable[Path]) -> tuple[list[str], list[str]]:
    """Refresh the pools holding ``files``: (names refreshed, warnings)."""
    if conn is None:
        return [], []
    libvirt = libvirt_module()
    pools = pool_dirs(conn)
    refreshed, warnings = [], []
    wanted = {d for f in files if (d := containing(pools, f.parent)) is not None}
    for d in sorted(wanted):
        pool, name = pools[d]
        try:
            pool.refresh(0)
            refreshed.append(name)
        except libvirt.libvirtError as e:
            warnings.append(f"storage pool {name!r} not refreshed: {e.get_error_message()}")
    return refreshed, warnings
