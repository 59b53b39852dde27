"""A restore point's saved memory and device state, as the tree holds it.

``vmbk-backup --with-memory`` (or ``memory = true`` for the VM) saves the
guest's RAM and device state at the instant the disks' point in time is
fixed (`vmbk.backup.memory`), and writes two files beside the point's
streams (names: `vmbk.tree.names`):

``vmstate.<checkpoint>.lz4``
    libvirt's save image, as lz4 frames (content checksum on): a 92-byte
    header, the domain XML the state was saved with and libvirt's cookie,
    then QEMU's migration stream.  vmbk reads the image while libvirt
    writes it, so its header keeps the magic of an unfinished image
    (``LibvirtQemudPart``); libvirt turns it into ``LibvirtQemudSave``
    once the save is complete, after vmbk read those bytes.  The state
    manifest is the proof that it completed: a resume writes the final
    magic (`vmbk.virt.memstate.image_head`).  Mode 0600, root only: guest
    RAM holds the guest's keys and passwords.
``vmstate.<checkpoint>.json``
    the *state manifest*: what the state needs to resume and how to tell
    that it is intact (below).  Covered, with the state file, by the
    point's manifest (`vmbk.manifest`), which is written after both.

State manifest (JSON, version 1)::

    {"format": "vmbk-state", "version": 1, "vm", "uuid", "checkpoint", "created", "vmbk",
     "host":   {"name", "arch", "page_size", "cpu": {"vendor", "model"}, "libvirt", "qemu"},
     "domain": {"type", "arch", "machine", "memory_kib", "vcpus", "vcpus_current",
                "cpu": {"mode", "model", "topology"}, "firmware", "features": [...], "devices": [...]},
     "state":  {"file", "compression": "lz4-frame", "size", "sha256", "image_size"},
     "pause_seconds", "save_seconds"}

``host`` is the host the state was saved on, ``domain`` what the saved
domain XML says (`vmbk.virt.memstate.domain_facts`: the device list is
one line per guest-visible device, with its bus address), ``state.size``
and ``state.sha256`` are those of the stored (compressed) bytes,
``image_size`` the size of libvirt's image once decompressed.

This module reads and writes the manifest and says what is wrong with a
point's state (`point_state`); `vmbk.tree.points` decides from it whether
a point can resume.  Pure but for reading the two files' metadata.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vmbk.tree import names

FORMAT = "vmbk-state"
VERSION = 1
#: A state manifest is a few KiB; anything this big is not one.
MAX_SIZE = 1 << 20


class StateFileError(ValueError):
    """The state manifest cannot be read or is not one."""


@dataclasses.dataclass(frozen=True)
class StateManifest:
    body: Mapping[str, Any]

    @property
    def checkpoint(self) -> str | None:
        c = self.body.get("checkpoint")
        return c if isinstance(c, str) else None

    @property
    def host(self) -> Mapping[str, Any]:
        return _mapping(self.body.get("host"))

    @property
    def domain(self) -> Mapping[str, Any]:
        return _mapping(self.body.get("domain"))

    @property
    def state(self) -> Mapping[str, Any]:
        return _mapping(self.body.get("state"))

    @property
    def file(self) -> str:
        return str(self.state.get("file") or "")

    @property
    def size(self) -> int:
        return _int(self.state.get("size"))

    @property
    def sha256(self) -> str:
        return str(self.state.get("sha256") or "")

    @property
    def image_size(self) -> int:
        return _int(self.state.get("image_size"))


def _mapping(v: Any) -> Mapping[str, Any]:
    return v if isinstance(v, Mapping) else {}


def _int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else -1


def encode(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, indent=1, sort_keys=True).encode() + b"\n"


def decode(data: bytes) -> StateManifest:
    """The manifest in ``data``; `StateFileError` when it is not one vmbk can use."""
    if len(data) > MAX_SIZE:
        raise StateFileError("too large to be a state manifest")
    try:
        body = json.loads(data)
    except ValueError as e:
        raise StateFileError(f"not JSON: {e}") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise StateFileError("not a vmbk state manifest")
    if body.get("version") != VERSION:
        raise StateFileError(f"state manifest version {body.get('version')!r}: this vmbk reads version {VERSION}")
    m = StateManifest(body)
    missing = [k for k, ok in (("checkpoint", m.checkpoint), ("state.file", m.file), ("state.size", m.size >= 0),
                               ("state.sha256", len(m.sha256) == 64), ("domain", m.domain), ("host", m.host)) if not ok]
    if missing:
        raise StateFileError(f"state manifest without {', '.join(missing)}")
    return m


def read(path: Path) -> StateManifest:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SIZE + 1)
    except OSError as e:
        raise StateFileError(f"cannot read: {e.strerror}") from None
    return decode(data)


@dataclasses.dataclass(frozen=True)
class PointState:
    """A point's saved state as the tree shows it: its files and what keeps it from resuming."""

    file: str
    manifest_file: str
    size: int | None
    manifest: StateManifest | None
    problems: tuple[str, ...] = ()

    @property
    def usable(self) -> bool:
        return self.manifest is not None and not self.problems


def point_state(chain: Path, ident: str) -> PointState | None:
    """The saved state of point ``ident`` of the chain in ``chain``; None when it has none.

    Cheap (the manifest is a few KiB, the state file is only stat'ed):
    the listing calls it for every point.  Its hashes are checked by a
    resume, which reads the whole file anyway.
    """
    data_name, manifest_name = names.state_name(ident), names.state_manifest_name(ident)
    data, man = chain / data_name, chain / manifest_name
    try:
        size: int | None = data.stat().st_size
    except OSError:
        size = None
    if size is None and not man.exists():
        return None
    problems: list[str] = []
    manifest = None
    try:
        manifest = read(man)
    except StateFileError as e:
        problems.append(f"{manifest_name}: {e}" if man.exists() else f"{manifest_name} is missing")
    if size is None:
        problems.append(f"{data_name} is missing")
    if manifest is not None:
        if manifest.checkpoint != ident:
            problems.append(f"{manifest_name} describes checkpoint {manifest.checkpoint!r}, not {ident}")
        if manifest.file != data_name:
            problems.append(f"{manifest_name} names {manifest.file!r}, not {data_name}")
        elif size is not None and size != manifest.size:
            problems.append(f"{data_name} has {size} bytes, {manifest_name} says {manifest.size}")
    return PointState(data_name, manifest_name, size, manifest, tuple(problems))
