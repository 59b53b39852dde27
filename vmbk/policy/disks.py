"""Which disks a backup takes, and how.

virtnbdbackup skips cdrom, floppy and direct-attached LUNs, and raw
images unless ``--raw`` is given, because a raw image cannot carry a
persistent dirty bitmap (libvirt checkpoints need qcow2 v3).  vmbk keeps
the skips, but does not silently drop raw disks: they are *copy-only*,
read whole at the start of each chain (full or offline copy) and named
``<dev>.copy.data`` as virtnbdbackup ``--raw`` names them, so
virtnbdrestore restores them; an incremental leaves them out and says so.
The same holds for a qcow2 image in the old compat 0.10 format.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from vmbk.policy.facts import DiskFacts

CHECKPOINT = "checkpoint"
COPY_ONLY = "copy-only"
SKIP = "skip"


@dataclasses.dataclass(frozen=True, slots=True)
class DiskChoice:
    disk: DiskFacts
    kind: str  # checkpoint | copy-only | skip
    reason: str | None = None

    @property
    def target(self) -> str:
        return self.disk.target or "?"


def classify(disk: DiskFacts) -> DiskChoice:
    if disk.device in ("cdrom", "floppy"):
        return DiskChoice(disk, SKIP, f"{disk.device}: removable media are never backed up")
    if disk.device == "lun":
        return DiskChoice(disk, SKIP, "direct-attached LUN: no changed-block tracking, not backed up")
    if disk.device != "disk":
        return DiskChoice(disk, SKIP, f"device type {disk.device!r} is not backed up")
    if not disk.target:
        return DiskChoice(disk, SKIP, "disk without a target name")
    if disk.format is None:
        return DiskChoice(disk, COPY_ONLY, "image format unknown: copied whole at the start of each chain")
    if disk.format != "qcow2":
        return DiskChoice(
            disk, COPY_ONLY,
            f"{disk.format} image cannot carry a dirty bitmap: copied whole at the start of each chain, "
            "not in incrementals",
        )
    if disk.checkpoint_capable is False:
        return DiskChoice(
            disk, COPY_ONLY,
            "qcow2 compat 0.10 cannot carry a dirty bitmap (qemu-img amend -o compat=1.1 fixes it): "
            "copied whole at the start of each chain",
        )
    return DiskChoice(disk, CHECKPOINT)


def classify_all(disks: Iterable[DiskFacts]) -> list[DiskChoice]:
    return [classify(d) for d in disks]
