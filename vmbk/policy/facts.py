"""The VM facts the planner decides on, built from a ``vm`` record.

A ``vm`` record comes from vmbk-discover (`vmbk.virt.domain`,
`vmbk.discover`) or from a hand-edited file, so every field may be
missing: a missing fact is *unknown* (None), never a guessed default, and
the planner treats unknown as "cannot prove the chain is sound" (a full
backup with the reason said).  What the planner needs, per field:

=====================  ====================================================
``name``, ``uuid``     the tree to look at; a chain of another uuid is not
                       continued, a known uuid finds a renamed VM's past
``state``              online (running, paused, blocked, pmsuspended) or
                       offline (shut off); anything else is not backed up
``checkpoints``        libvirt's checkpoint names: is the parent there,
                       must some be redefined from ``checkpoints/*.xml``
``policy``             rotation policy (or given by the caller)
``excluded, reason``   skip, and why
``agent``              whether the guest agent answered (carried along)
``memory``             ``"full"``: every online backup is a full (each point
                       carries the memory state); true, false: no say
``fstrim``, ``windows``  for the backup: trim first; save BitLocker keys
``firmware.nvram``     for the backup: the UEFI vars file to keep
``tpm.state_dir``      for the backup: the swtpm state to keep
per disk:
``target, device``     cdrom/floppy/lun are never backed up
``format``             only qcow2 carries persistent dirty bitmaps
``checkpoint_capable`` qcow2 compat 1.1 (v3); compat 0.10 cannot
``bitmaps``            ``[{"name", "flags"}]`` from ``qemu-img info``: the
                       parent checkpoint's bitmap must be there and
                       ``auto`` (enabled) for an incremental
``virtual_size``       a resized disk starts a new chain
``mtime``              disk file mtime: a shut-off VM is copied only when a
                       disk changed after the last backup (manual, "Shut
                       Off VMs (Offline)")
=====================  ====================================================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from vmbk.errors import InputError
from vmbk.settings import MEMORY_FULL

ONLINE_STATES = frozenset({"running", "paused", "blocked", "pmsuspended"})
OFFLINE_STATES = frozenset({"shut off"})


@dataclasses.dataclass(frozen=True, slots=True)
class Bitmap:
    name: str
    #: ``in-use`` / ``auto`` as qemu-img reports them; None when not given.
    flags: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class DiskFacts:
    target: str | None
    device: str = "disk"
    type: str | None = None
    format: str | None = None
    source: str | None = None
    virtual_size: int | None = None
    checkpoint_capable: bool | None = None
    bitmaps: tuple[Bitmap, ...] | None = None
    #: ``bitmaps`` lists what a running QEMU proved through libvirt's
    #: checkpoints: a bitmap of a checkpoint libvirt lost is not in it even
    #: when QEMU still has it (redefinition with VALIDATE tells).
    bitmaps_live: bool = False
    mtime: float | None = None
    error: str | None = None

    def bitmap(self, name: str) -> Bitmap | None:
        return next((b for b in self.bitmaps or () if b.name == name), None)


@dataclasses.dataclass(frozen=True, slots=True)
class VmFacts:
    name: str
    uuid: str | None = None
    state: str | None = None
    disks: tuple[DiskFacts, ...] = ()
    checkpoints: tuple[str, ...] | None = None
    policy: str | None = None
    excluded: bool = False
    reason: str | None = None
    agent: bool | None = None
    #: ``memory`` of the VM's config (false, true, ``"full"``): ``"full"`` makes every online backup a full.
    memory: bool | str | None = None
    #: Facts only the backup uses, carried from discover.
    fstrim: bool | None = None
    windows: bool | None = None
    nvram: str | None = None
    tpm: bool = False
    tpm_state_dir: str | None = None

    @property
    def online(self) -> bool:
        return self.state in ONLINE_STATES

    @property
    def offline(self) -> bool:
        return self.state in OFFLINE_STATES

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> VmFacts:
        """Tolerant of missing fields, strict about wrong types.

        A field of the wrong type is a broken producer or a bad hand edit:
        `InputError` naming the VM, so the stage reports that VM and goes on.
        """
        name = rec.get("name")
        if not isinstance(name, str) or not name:
            raise InputError("vm record without a 'name'", vm="?")
        g = _Get(rec, name)
        disks = g.opt("disks", list)
        checkpoints = g.opt("checkpoints", list)
        if checkpoints is not None and not all(isinstance(c, str) for c in checkpoints):
            raise InputError(f"vm record of {name!r}: 'checkpoints' must be a list of names", vm=name)
        uuid = g.opt("uuid", str)
        firmware = g.opt("firmware", Mapping) or {}
        tpm = g.opt("tpm", Mapping)
        return cls(
            name=name,
            uuid=uuid.lower() if uuid else None,
            state=g.opt("state", str),
            disks=tuple(_disk(d, name) for d in disks or ()),
            checkpoints=tuple(checkpoints) if checkpoints is not None else None,
            policy=g.opt("policy", str),
            excluded=bool(g.opt("excluded", bool)),
            reason=g.opt("reason", str),
            agent=g.opt("agent", bool),
            memory=_memory(g.opt("memory", (bool, str)), name),
            fstrim=g.opt("fstrim", bool),
            windows=g.opt("windows", bool),
            nvram=_Get(firmware, name).opt("nvram", str),
            tpm=tpm is not None,
            tpm_state_dir=_Get(tpm, name).opt("state_dir", str) if tpm is not None else None,
        )

    def disk(self, target: str) -> DiskFacts | None:
        return next((d for d in self.disks if d.target == target), None)


class _Get:
    def __init__(self, rec: Mapping[str, Any], vm: str) -> None:
        self.rec = rec
        self.vm = vm

    def opt(self, key: str, kind: type | tuple[type, ...]) -> Any:
        v = self.rec.get(key)
        if v is None:
            return None
        if isinstance(v, bool) and kind in (int, float, (int, float)):
            v = object()  # a bool is not a number here
        if not isinstance(v, kind):
            raise InputError(f"vm record of {self.vm!r}: {key!r} has the wrong type ({type(v).__name__})", vm=self.vm)
        return v


def _memory(v: bool | str | None, vm: str) -> bool | str | None:
    if isinstance(v, str) and v != MEMORY_FULL:
        raise InputError(f"vm record of {vm!r}: 'memory' must be true, false or {MEMORY_FULL!r}, not {v!r}", vm=vm)
    return v


def _disk(d: Any, vm: str) -> DiskFacts:
    if not isinstance(d, Mapping):
        raise InputError(f"vm record of {vm!r}: a disk is not an object", vm=vm)
    g = _Get(d, vm)
    bitmaps = g.opt("bitmaps", list)
    mtime = g.opt("mtime", (int, float))
    return DiskFacts(
        target=g.opt("target", str),
        device=g.opt("device", str) or "disk",
        type=g.opt("type", str),
        format=g.opt("format", str),
        source=g.opt("source", str),
        virtual_size=g.opt("virtual_size", int),
        checkpoint_capable=g.opt("checkpoint_capable", bool),
        bitmaps=tuple(_bitmap(b, vm) for b in bitmaps) if bitmaps is not None else None,
        bitmaps_live=g.opt("bitmaps_source", str) == "libvirt",
        mtime=float(mtime) if mtime is not None else None,
        error=g.opt("error", str),
    )


def _bitmap(b: Any, vm: str) -> Bitmap:
    if isinstance(b, str):
        return Bitmap(b)
    if isinstance(b, Mapping) and isinstance(b.get("name"), str):
        flags = b.get("flags")
        if flags is not None and not (isinstance(flags, list) and all(isinstance(f, str) for f in flags)):
            raise InputError(f"vm record of {vm!r}: bitmap flags must be a list of strings", vm=vm)
        return Bitmap(b["name"], tuple(flags) if flags is not None else None)
    raise InputError(f"vm record of {vm!r}: a bitmap is neither a name nor {{'name', 'flags'}}", vm=vm)
