"""Writes to the backup tree that are not data: clean, archive, confine.

The backup makes them before it copies data, in the order the planner asks
for them: remove leftover ``.partial`` files, then move the current chain
into ``.archives/chain-YYYY-MM-DD[.N]``.  Both are recorded as chain
events.  Every path comes from a plan record, which may be hand-edited:
each one must resolve inside the VM's directory (`inside`).  Rotate and
replicate use the same helpers, so nothing outside ``tree/`` spells a
name of the tree.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from vmbk.errors import StorageError
from vmbk.fsutil import PARTIAL, ensure_dir, fsync_dir
from vmbk.tree.names import ARCHIVES, policy_of_period

log = logging.getLogger("vmbk.tree")


def inside(vm_dir: Path, rel: str, vm: str) -> Path:
    """``vm_dir/rel``, refusing anything that escapes ``vm_dir``."""
    path = (vm_dir / rel).resolve()
    root = vm_dir.resolve()
    if path != root and root not in path.parents:
        raise StorageError(f"plan path {rel!r} is outside {vm_dir}", vm=vm)
    return path


def cleanup_partials(vm_dir: Path, rels: list[str], vm: str) -> list[str]:
    removed = []
    for rel in rels:
        path = inside(vm_dir, rel, vm)
        if not path.name.endswith(PARTIAL):
            raise StorageError(f"refusing to clean {rel!r}: not a .partial file", vm=vm)
        try:
            path.unlink()
            removed.append(rel)
        except FileNotFoundError:
            pass
    return removed


def archive_chain(vm_dir: Path, rel_from: str, rel_to: str, vm: str) -> Path:
    """Move the chain files of ``rel_from`` into ``rel_to`` (an archive dir).

    Everything in the chain directory moves (data, checksums, vmconfig,
    NVRAM, checkpoints/, .cpt, tpm-state/) so an archived chain restores on
    its own; ``.archives`` and, at the VM root (accumulate), period
    directories stay.
    """
    src = inside(vm_dir, rel_from, vm)
    dst = inside(vm_dir, rel_to, vm)
    if dst.exists():
        raise StorageError(f"archive {dst} already exists", vm=vm)
    ensure_dir(dst.parent)
    os.mkdir(dst)
    ensure_dir(dst)  # mode and group as the tree wants
    at_root = src == vm_dir.resolve()
    moved = 0
    for entry in sorted(os.listdir(src)):
        if entry == ARCHIVES or (at_root and policy_of_period(entry)):
            continue
        os.rename(src / entry, dst / entry)
        moved += 1
    fsync_dir(src)
    fsync_dir(dst)
    log.info("%s: archived %d entries of %s to %s", vm, moved, src, dst)
    return dst
