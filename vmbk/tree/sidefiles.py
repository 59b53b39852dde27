"""The small files beside a point's streams, as the restore checks them.

A backup writes, besides the data files, ``checkpoints/<name>.xml``,
``vmconfig.<ident>.xml`` and ``<dev>.<ident>.qcow.json`` for each point
(`vmbk.tree.names`).  None carries a checksum, so what can be checked is
that each one that is there is readable and says what it should: the
checkpoint XML names its checkpoint, the vmconfig is a domain, the
qcow.json is ``qemu-img info`` output.  A damaged one makes its point
incomplete (`vmbk.tree.points`): the backup that wrote it is not
sound, even where the restore would not need that file.  A missing one
is not a problem: older virtnbdbackup versions and copy backups write
fewer of them.

The qcow.json also holds the source disk's ``virtual-size`` at the
point, which a stream's meta must repeat: `SideFiles.size_problems` checks every
data file of a disk against it, and, where there is none, against the
file before it in the chain, so a flipped ``virtualSize`` (which would
restore an image of the wrong size) is found without a checksum.  A disk
resized mid-chain (virtnbdbackup allows it; vmbk starts a new chain) is
accepted where the qcow.json confirms the new size.

Each check reads one file of a few KiB: the listing stays fast.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import Any

from vmbk.tree.model import Chain, DataFile
from vmbk.tree.names import checkpoint_name, checkpoint_xml_name, qemu_info_name, vmconfig_name

MAX_XML = 16 << 20
MAX_JSON = 1 << 20


def _read(chain: Chain, rel: str, limit: int) -> bytes | None:
    """The file's bytes (None: absent); OSError for any other failure."""
    try:
        with open(chain.path / rel, "rb") as fh:
            return fh.read(limit)
    except FileNotFoundError:
        return None


def _xml_root(chain: Chain, rel: str) -> tuple[ET.Element | None, str | None]:
    """(root, problem) of an XML side file; (None, None) when it is absent."""
    try:
        raw = _read(chain, rel, MAX_XML)
        return (ET.fromstring(raw), None) if raw is not None else (None, None)
    except OSError as e:
        return None, f"{rel}: cannot read: {e.strerror}"
    except ET.ParseError as e:
        return None, f"{rel}: damaged XML ({e})"


class SideFiles:
    """The side files of one chain, each read at most once (a listing asks for them point by point)."""

    def __init__(self, chain: Chain) -> None:
        self.chain = chain
        self._infos: dict[tuple[str, str], tuple[dict[str, Any] | None, str | None]] = {}
        self._configs: dict[str, tuple[ET.Element | None, str | None]] = {}

    def checkpoint_problem(self, name: str) -> str | None:
        """``checkpoints/<name>.xml``, when the chain has it: a checkpoint of that name."""
        if name not in self.chain.checkpoint_xmls:
            return None
        rel = checkpoint_xml_name(name)
        root, problem = _xml_root(self.chain, rel)
        if root is None:
            return problem
        if root.tag != "domaincheckpoint" or (root.findtext("name") or "").strip() != name:
            return f"{rel}: not the checkpoint XML of {name}"
        return None

    def vmconfig(self, ident: str) -> tuple[ET.Element | None, str | None]:
        """(root, problem) of ``vmconfig.<ident>.xml``: a domain XML; (None, None) when the chain has none."""
        if ident not in self._configs:
            rel = vmconfig_name(ident)
            root, problem = _xml_root(self.chain, rel) if rel in self.chain.vmconfigs else (None, None)
            if root is not None and root.tag != "domain":
                root, problem = None, f"{rel}: not a domain XML"
            self._configs[ident] = root, problem
        return self._configs[ident]

    def vmconfig_problem(self, ident: str) -> str | None:
        return self.vmconfig(ident)[1]

    def vmconfig_disks(self, ident: str) -> set[str] | None:
        """Disk targets of ``vmconfig.<ident>.xml`` (cdrom, floppy, LUN excluded); None: no readable one."""
        root = self.vmconfig(ident)[0]
        if root is None:
            return None
        out: set[str] = set()
        for disk in root.iterfind("devices/disk"):
            target = disk.find("target")
            if disk.get("device", "disk") == "disk" and target is not None and target.get("dev"):
                out.add(str(target.get("dev")))
        return out

    def qemu_info(self, disk: str, ident: str) -> tuple[dict[str, Any] | None, str | None]:
        """(``qemu-img info`` of the disk at the point, problem); (None, None) when there is none."""
        key = (disk, ident)
        if key not in self._infos:
            self._infos[key] = _qemu_info(self.chain, qemu_info_name(disk, ident))
        return self._infos[key]

    def size_problems(self, disk: str, files: Sequence[DataFile]) -> dict[str, str]:
        """Data files of ``disk`` (oldest first) whose ``virtualSize`` the chain contradicts, by name."""
        out: dict[str, str] = {}
        prev: DataFile | None = None
        for f in files:
            if f.virtual_size is None:
                continue
            info, _ = self.qemu_info(disk, ident_of(f))
            confirmed = _size_of(info) if info is not None else None
            if confirmed is not None and confirmed != f.virtual_size:
                out[f.name] = (f"{f.name}: stream header says virtualSize {f.virtual_size}, "
                               f"{qemu_info_name(disk, ident_of(f))} says {confirmed}")
            elif confirmed is None and prev is not None and prev.virtual_size != f.virtual_size:
                out[f.name] = (f"{f.name}: virtualSize {f.virtual_size} differs from {prev.virtual_size} "
                               f"of {prev.name}, and no qcow.json confirms a resize")
            prev = f
        return out


def _qemu_info(chain: Chain, rel: str) -> tuple[dict[str, Any] | None, str | None]:
    try:
        raw = _read(chain, rel, MAX_JSON)
        info = json.loads(raw) if raw is not None else None
    except OSError as e:
        return None, f"{rel}: cannot read: {e.strerror}"
    except ValueError as e:
        return None, f"{rel}: damaged JSON ({e})"
    if info is not None and (not isinstance(info, dict) or not _size_of(info)):
        return None, f"{rel}: not qemu-img info output"
    return info, None


def _size_of(info: dict[str, Any]) -> int | None:
    size = info.get("virtual-size")
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def ident_of(f: DataFile) -> str:
    """The ``<ident>`` of the point a data file was written at."""
    return "copy" if f.level == "copy" else checkpoint_name(f.number or 0)
