"""In-place disk restore: the VM's own disk files replaced by a restore point.

vmrestore guide, 9.10 "Mode 1: In-Place Replacement": ``--disk`` without
``--restore-path`` puts the restored disks where the VM's definition says
its disks are; the definition, UUID, NVRAM and TPM state are untouched.
The VM must be defined (to know the paths) and shut off.  Each replaced
file is kept as ``<file>.pre-restore`` unless ``--no-pre-restore``; one
that exists already (an earlier restore not cleaned up) refuses the
restore (exit 4): it may be someone's only rollback copy.

Where vmbk differs from vmrestore, on purpose: every disk is built first,
as ``<file>.partial`` beside its final name (same file system, so the
swap is a rename), and only when all of them are built and checked are
the files swapped, one rename pair per disk.  A failing disk therefore
never touches any file of the VM, and a failure during the swap (a rename
refused) puts back every file already swapped from its ``.pre-restore``:
the VM ends either fully restored or as it was.  vmrestore replaces disk
by disk and rolls back only the failing one.

The new file gets the owner, group and mode of the file it replaces
(libvirt's dynamic ownership gives it back to QEMU at the next start
either way; a host that runs without it keeps working), and the format
the definition names: a disk the VM opens as ``raw`` is restored raw, not
as a qcow2 it could not read.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vmbk.errors import StorageError, VmError
from vmbk.fsutil import fsync_dir, fsync_path
from vmbk.restore import image
from vmbk.virt.connection import libvirt_module
from vmbk.virt.domain import parse_domain_xml

log = logging.getLogger("vmbk.restore")

SUFFIX = ".pre-restore"


@dataclasses.dataclass(frozen=True)
class CurrentDisk:
    """One disk of the VM as libvirt defines it now."""

    path: Path | None
    fmt: str  # the driver type: qcow2, raw, ...
    kind: str  # file, block, network, volume


@dataclasses.dataclass(frozen=True)
class Swapped:
    disk: str
    target: Path
    pre_restore: Path | None
    pre_restore_size: int | None


def pre_restore_path(target: Path) -> Path:
    return target.with_name(target.name + SUFFIX)


def current_disks(conn: Any, vm: str) -> dict[str, CurrentDisk]:
    """The disks of the defined, shut-off VM ``vm``; VmError (5) otherwise."""
    libvirt = libvirt_module()
    if conn is None:
        raise VmError(f"an in-place disk restore needs libvirt to find the disks of {vm!r}: "
                      "check --connect, or extract the disks with --restore-path", vm=vm)
    try:
        dom = conn.lookupByName(vm)
        active = bool(dom.isActive())
        xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    except libvirt.libvirtError:
        raise VmError(f"VM {vm!r} is not defined: an in-place disk restore replaces the files its definition "
                      "names; extract the disks with --restore-path, or restore the whole VM", vm=vm) from None
    if active:
        raise VmError(f"VM {vm!r} is running: shut it off for an in-place disk restore, or extract the disks "
                      "with --restore-path while it runs", vm=vm)
    out = {}
    for d in parse_domain_xml(xml)["disks"]:
        if d["device"] != "disk":
            continue
        out[d["target"]] = CurrentDisk(Path(d["source"]) if d["source"] else None, d.get("format") or "raw",
                                       d["type"])
    return out


def targets(vm: str, disks: Sequence[str], current: dict[str, CurrentDisk]) -> dict[str, CurrentDisk]:
    """The files the restore replaces; VmError for a disk it cannot replace in place."""
    out = {}
    for disk in disks:
        now = current.get(disk)
        if now is None:
            raise VmError(f"VM {vm!r} has no disk {disk} in its definition now: extract it with --restore-path",
                          vm=vm)
        if now.kind != "file" or now.path is None:
            raise VmError(f"disk {disk} of VM {vm!r} is a {now.kind} disk, not a file: extract it with "
                          "--restore-path and copy it into place yourself", vm=vm)
        if now.fmt not in ("qcow2", "raw"):
            raise VmError(f"disk {disk} of VM {vm!r} is {now.fmt}; vmbk restores qcow2 or raw: extract it with "
                          "--restore-path", vm=vm)
        out[disk] = now
    return out


def check_pre_restore(paths: Sequence[Path]) -> None:
    """StorageError (4) when a rollback copy of an earlier restore is still there."""
    for target in paths:
        pre = pre_restore_path(target)
        if pre.exists() or pre.is_symlink():
            raise StorageError(f"{pre} exists (left by an earlier restore): delete it once that restore is "
                               "confirmed good, or use --no-pre-restore")


def build_raw(job: image.DiskRestore) -> image.Built:
    """A raw disk: the merged chain written thin into ``job.partial`` itself."""
    started = time.monotonic()
    try:
        image.write_raw(job.sources, job.partial)
    except BaseException:
        image.discard([job])
        raise
    return image.Built(job.disk, time.monotonic() - started, job.data_bytes)


def swap(jobs: Sequence[image.DiskRestore], *, keep: bool) -> list[Swapped]:
    """Put every built ``.partial`` in place of its target; all or nothing.

    ``keep``: the replaced file becomes ``<target>.pre-restore``; a failure
    renames every one back.  Without it the replaced files are gone as
    soon as they are replaced, and a failure leaves the disks already
    swapped restored (the others untouched).
    """
    done: list[Swapped] = []
    try:
        for job in jobs:
            _take_over_ownership(job.partial, job.target)
            fsync_path(job.partial)
            pre = pre_restore_path(job.target) if keep and job.target.exists() else None
            if pre is not None:
                if pre.exists():  # appeared since the check: never overwrite a rollback copy
                    raise StorageError(f"{pre} exists: not overwritten")
                os.rename(job.target, pre)
                try:
                    os.rename(job.partial, job.target)
                except BaseException:
                    os.rename(pre, job.target)
                    raise
            else:
                os.replace(job.partial, job.target)
            done.append(Swapped(job.disk, job.target, pre, pre.stat().st_size if pre else None))
    except BaseException as e:
        rolled = _roll_back(done)
        image.discard(jobs)
        if isinstance(e, OSError):
            raise StorageError(f"replacing {e.filename or 'a disk'}: {e.strerror or e}"
                               + (f"; {', '.join(rolled)} put back" if rolled else "")) from None
        raise
    for parent in {job.target.parent for job in jobs}:
        fsync_dir(parent)
    return done


def _roll_back(done: list[Swapped]) -> list[str]:
    rolled = []
    for s in reversed(done):
        if s.pre_restore is None:
            continue
        try:
            os.replace(s.pre_restore, s.target)
            rolled.append(str(s.target))
        except OSError as err:
            log.error("cannot put %s back from %s: %s", s.target, s.pre_restore, err.strerror)
    return rolled


def _take_over_ownership(new: Path, old: Path) -> None:
    """Owner, group and mode of the file being replaced (if there is one)."""
    try:
        st = os.stat(old)
    except FileNotFoundError:
        return
    if os.geteuid() == 0:
        os.chown(new, st.st_uid, st.st_gid)
    os.chmod(new, st.st_mode & 0o7777)
