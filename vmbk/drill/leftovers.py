"""What a drill creates is written down before it exists, and removed by
whoever outlives it.

A drill creates, in this order: its marker, the scratch directory, TPM
state under its UUID, the isolated network, the domain.  The domain is
transient and started with ``VIR_DOMAIN_START_AUTODESTROY``: libvirtd
destroys it as soon as the connection of the vmbk that started it
closes, which a kill -9 closes too, so a killed drill does not leave a
guest running until the next run.  Cleanup goes the other way round
(`Leftovers.remove`), each step idempotent, the marker last; it runs on
success, failure, timeout and SIGINT/SIGTERM (`vmbk.drill.one`).

**The marker**, ``RUN_DIR/drill-<uuid>.json`` (``VMBK_RUN_DIR``,
``/var/tmp/vmbk``), names everything the drill may create: a locked
`vmbk.runmarker` written before the first of them exists and held until
the drill removes it.  A marker whose lock can be taken belongs to a
drill that is gone, however it died.

**The sweep** (`sweep`, at the start of every vmbk-drill run):

1. every marker whose lock is free: remove what it names, then it;
2. every libvirt domain and network carrying the drill mark in its
   metadata (`vmbk.drill.isolate.MARK_NS`) whose marker is gone or free:
   the same (a marker lost with ``/var/tmp``, a libvirtd restarted while
   the drill ran, which forgets the autodestroy).

Nothing without the mark is ever touched: a domain named ``*-drill-*``
by someone else stays, and a scratch directory is removed only when its
name is the drill's.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from vmbk import runmarker
from vmbk.drill.isolate import MARK_TAG
from vmbk.restore import tpm
from vmbk.virt.connection import libvirt_module

log = logging.getLogger("vmbk.drill")

PREFIX = "drill-"
#: The part every drill VM's name has (``<vm>-drill-<stamp>``).
INFIX = "-drill-"


run_dir = runmarker.run_dir


@dataclasses.dataclass(frozen=True)
class Leftovers:
    """Everything one drill may create, named before any of it exists."""

    name: str
    vm: str
    uuid: str
    scratch: Path
    network: str | None
    started: str

    @property
    def marker(self) -> Path:
        return runmarker.path_of(PREFIX, self.uuid)

    @property
    def tpm_dir(self) -> Path:
        return tpm.state_dir(self.uuid)

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "vm": self.vm, "uuid": self.uuid, "scratch": str(self.scratch),
                "network": self.network, "started": self.started}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Leftovers:
        net = data.get("network")
        return cls(str(data["name"]), str(data["vm"]), str(data["uuid"]), Path(str(data["scratch"])),
                   str(net) if net else None, str(data.get("started") or ""))

    # -- the marker -------------------------------------------------------------------
    def mark(self) -> runmarker.Marker:
        """Write the marker and lock it (`unmark` removes it)."""
        return runmarker.Marker(PREFIX, self.uuid, self.as_json())

    def unmark(self, marker: runmarker.Marker) -> None:
        """Remove the marker (everything it names is gone), then let go of its lock."""
        marker.release()

    # -- removal ------------------------------------------------------------------------
    def remove(self, conn: Any) -> list[str]:
        """Remove the domain, the network, the TPM state and the scratch
        directory, whichever exist; what was removed, in words.  Raises
        when one could not be removed (the marker must then stay)."""
        done = []
        if conn is not None and destroy_domain(conn, self.uuid):
            done.append(f"domain {self.name}")
        if conn is not None and self.network and destroy_network(conn, self.network):
            done.append(f"network {self.network}")
        if self.tpm_dir.exists():
            shutil.rmtree(self.tpm_dir)
            done.append(f"TPM state {self.tpm_dir}")
        if self.scratch.exists() and self.scratch.name == self.name and INFIX in self.name:
            shutil.rmtree(self.scratch)
            done.append(str(self.scratch))
        return done


def _marked(xml: str) -> dict[str, str] | None:
    """The drill mark of a domain's or network's XML, None when it has none."""
    try:
        el = ET.fromstring(xml).find(f"metadata/{MARK_TAG}")
    except ET.ParseError:
        return None
    return dict(el.attrib) if el is not None else None


def destroy_domain(conn: Any, uuid: str) -> bool:
    """Destroy (and undefine) the drill domain of ``uuid``; False when there is none."""
    libvirt = libvirt_module()
    try:
        dom = conn.lookupByUUIDString(uuid)
        if _marked(dom.XMLDesc(0)) is None:
            log.warning("domain %s has the UUID %s but no drill mark: left alone", dom.name(), uuid)
            return False
        persistent = dom.isPersistent()  # a transient one is gone once destroyed
        if dom.isActive():
            dom.destroy()
        if persistent:
            dom.undefineFlags(getattr(libvirt, "VIR_DOMAIN_UNDEFINE_NVRAM", 0))
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return False
        raise
    return True


def destroy_network(conn: Any, name: str) -> bool:
    libvirt = libvirt_module()
    try:
        net = conn.networkLookupByName(name)
        if _marked(net.XMLDesc(0)) is None:
            log.warning("network %s has no drill mark: left alone", name)
            return False
        persistent = net.isPersistent()  # a transient one is gone once destroyed
        if net.isActive():
            net.destroy()
        if persistent:
            net.undefine()
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_NETWORK:
            return False
        raise
    return True


def sweep(conn: Any) -> list[str]:
    """Remove what drills that are gone left; what was removed, in words."""
    done: list[str] = []
    for path, data in runmarker.dead(PREFIX):
        try:
            left = Leftovers.from_json(data)
        except (KeyError, TypeError):
            log.warning("%s: not a drill marker: removed", path)
            path.unlink(missing_ok=True)
            continue
        done += _remove(conn, left, path)
    if conn is not None:
        done += _unmarked(conn)
    for line in done:
        log.warning("removed what a killed drill left: %s", line)
    return done


def _remove(conn: Any, left: Leftovers, marker: Path) -> list[str]:
    try:
        removed = left.remove(conn)
    except Exception as e:  # the marker stays: the next run tries again
        log.warning("%s: cannot remove what the drill of %s left (%s); the next run tries again", marker,
                    left.vm, e)
        return []
    marker.unlink(missing_ok=True)
    return removed


def _unmarked(conn: Any) -> list[str]:
    """Domains and networks with the drill mark whose drill is gone."""
    libvirt = libvirt_module()
    done: list[str] = []
    try:
        doms = conn.listAllDomains(0)
        nets = conn.listAllNetworks(0)
    except libvirt.libvirtError as e:
        log.warning("cannot list libvirt domains and networks for drill leftovers: %s", e.get_error_message())
        return done
    for obj, kind in [(d, "domain") for d in doms] + [(n, "network") for n in nets]:
        try:
            name = obj.name()
            if INFIX not in name:
                continue
            mark = _marked(obj.XMLDesc(0))
            if mark is None or not mark.get("uuid"):
                continue
            if runmarker.held(runmarker.path_of(PREFIX, mark["uuid"])):
                continue  # its drill runs
            if kind == "domain" and destroy_domain(conn, obj.UUIDString()):
                done.append(f"domain {name}")
            elif kind == "network" and destroy_network(conn, name):
                done.append(f"network {name}")
        except libvirt.libvirtError as e:
            log.warning("drill leftover %s: %s", kind, e.get_error_message())
    return done
