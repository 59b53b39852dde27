"""Writes to the backup tree that are not data: clean, archive, confine, delete.

The backup makes them before it copies data, in the order the planner asks
for them: remove leftover ``.partial`` files, then move the current chain
into ``.archives/chain-YYYY-MM-DD[.N]``.  Both are recorded as chain
events.  Every path comes from a plan record, which may be hand-edited:
each one must resolve inside the VM's directory (`inside`).  Rotate and
replicate use the same helpers, so nothing outside ``tree/`` spells a
name of the tree.

vmbk-rotate deletes a period, an archived chain or a whole VM directory
with `remove_dir` / `remove_vm_dir`, in this order, so that a kill at any
instant leaves either the directory whole or gone from every listing:

1. rename it to ``.deleting-<name>`` in the same directory and fsync that
   directory -- the commit: one rename, so no scan (the planner,
   vmbk-restore's listings) ever sees half a chain; the hidden name is
   no period, archive or VM name;
2. ``committed()``: the caller records the deletion (the catalogue);
3. remove the hidden directory, depth first, never following a link.

A kill after step 1 leaves the hidden directory: `leftovers` and
`vm_leftovers` find it and `finish` removes it (the next vmbk-rotate does).
Only directories at depth 2 or more below the backup root (a VM's period
or archive) are removed this way, and the whole VM directory (depth 1) only
by `remove_vm_dir`; never a link, the root, or anything outside it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from vmbk.errors import StorageError
from vmbk.fsutil import PARTIAL, ensure_dir, fsync_dir
from vmbk.tree.names import ARCHIVES, CHECKPOINTS, STAYS, chksum_name, deleted_name, deleting_name, is_vm_dir_name, policy_of_period

#: Told each step of a deletion: ``renamed``, then ``removing`` before each entry.
Step = Callable[[str], None]

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
        # A backup killed between its two renames leaves the data's .chksum
        # beside the .partial (stream.atomic): without its data it goes too.
        final = path.with_name(path.name[: -len(PARTIAL)])
        if final.name.endswith(".data") and not final.exists():
            with contextlib.suppress(FileNotFoundError):
                final.with_name(chksum_name(final.name)).unlink()
    return removed


def remove_unfinished(chain_dir: Path, checkpoint: str, vm: str) -> list[str]:
    """Remove the files of point ``checkpoint`` from ``chain_dir`` and its ``checkpoints/``.

    For an incremental killed before its ``.cpt`` listed it (the caller
    checks that it does not): streams of disks already renamed with their
    ``.chksum``, side files, the checkpoint's XML, a manifest, a memory
    state -- every one carries the checkpoint's name as dot-separated parts
    (`names.ident`).  The ``.cpt`` and vmbackup's files are never touched
    (a VM may be called anything).  Returns the paths removed, relative to
    ``chain_dir``.
    """
    want = checkpoint.split(".")

    def of_point(name: str) -> bool:
        parts = name.split(".")
        return any(parts[i:i + len(want)] == want for i in range(len(parts) - len(want) + 1))

    removed: list[str] = []
    for d, prefix in ((chain_dir, ""), (chain_dir / CHECKPOINTS, f"{CHECKPOINTS}/")):
        try:
            entries = list(os.scandir(d))
        except FileNotFoundError:
            continue
        gone = False
        for e in entries:
            if (not e.is_file(follow_symlinks=False) or e.name.endswith(".cpt") or e.name in STAYS
                    or not of_point(e.name)):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(e.path)
                removed.append(prefix + e.name)
                gone = True
        if gone:
            fsync_dir(d)
    if removed:
        log.info("%s: removed the files of %s, which did not finish: %s", vm, checkpoint, ", ".join(removed))
    return removed


def archive_chain(vm_dir: Path, rel_from: str, rel_to: str, vm: str) -> Path:
    """Move the chain files of ``rel_from`` into ``rel_to`` (an archive dir).

    Everything in the chain directory moves (data, checksums, vmconfig,
    NVRAM, checkpoints/, .cpt, tpm-state/) so an archived chain restores on
    its own; ``.archives``, vmbackup's state of the directory
    (`names.STAYS`: ``.full-backup-month``, ``config/``,
    ``chain-manifest.json``, which vmbackup leaves where they are too)
    and, at the VM root (accumulate), period directories stay.
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
        if entry in (ARCHIVES, *STAYS) or (at_root and policy_of_period(entry)) or deleted_name(entry) is not None:
            continue
        os.rename(src / entry, dst / entry)
        moved += 1
    fsync_dir(src)
    fsync_dir(dst)
    log.info("%s: archived %d entries of %s to %s", vm, moved, src, dst)
    return dst


# -- deleting (vmbk-rotate) ------------------------------------------------------


def remove_dir(root: Path, vm: str, rel: str, *, committed: Callable[[], None] | None = None,
               step: Step | None = None) -> None:
    """Delete the period or archived chain ``rel`` of ``vm``, crash-safe (module doc)."""
    path = _real_dir(root, vm, rel)
    _remove(path, committed, step)


def remove_vm_dir(root: Path, vm: str, *, committed: Callable[[], None] | None = None,
                  step: Step | None = None) -> None:
    """Delete the whole directory of ``vm`` (``--prune all``), crash-safe."""
    _remove(_real_dir(root, vm, None), committed, step)


def leftovers(root: Path, vm: str) -> list[tuple[str, Path]]:
    """Deletions a killed run left in ``vm``'s tree: (the rel it had, the hidden directory)."""
    vm_dir = Path(root) / vm
    places = [("", vm_dir), (ARCHIVES + "/", vm_dir / ARCHIVES)]
    for entry in _dirs(vm_dir):
        if policy_of_period(entry.name):
            places.append((f"{entry.name}/{ARCHIVES}/", Path(entry.path) / ARCHIVES))
    out = []
    for prefix, where in places:
        for entry in _dirs(where):
            name = deleted_name(entry.name)
            if name is not None:
                out.append((prefix + name, Path(entry.path)))
    return out


def vm_leftovers(root: Path) -> list[tuple[str, Path]]:
    """Whole VM directories a killed run left half deleted: (the VM, the hidden directory)."""
    out = []
    for entry in _dirs(Path(root)):
        name = deleted_name(entry.name)
        if name is not None:
            out.append((name, Path(entry.path)))
    return out


def finish(hidden: Path, step: Step | None = None) -> None:
    """Remove a ``.deleting-*`` directory, depth first, links as links.

    Entries that vanish meanwhile (another run finishing the same
    leftover) are not an error.
    """
    if deleted_name(hidden.name) is None:
        raise StorageError(f"refusing to remove {hidden}: not a directory being deleted")

    def gone(e: OSError) -> None:
        if e.errno != errno.ENOENT:
            raise StorageError(f"cannot remove {e.filename}: {e.strerror}") from None

    for dirpath, dirnames, filenames in os.walk(hidden, topdown=False, onerror=gone):
        for name in [*filenames, *dirnames]:
            p = os.path.join(dirpath, name)
            if step is not None:
                step("removing")
            try:
                if name in dirnames and not os.path.islink(p):
                    os.rmdir(p)
                else:
                    os.unlink(p)
            except OSError as e:
                gone(e)
    try:
        os.rmdir(hidden)
    except OSError as e:
        gone(e)


def _remove(path: Path, committed: Callable[[], None] | None, step: Step | None) -> None:
    hidden = path.with_name(deleting_name(path.name))
    if os.path.lexists(hidden):  # a killed run's, of an earlier directory of this name
        finish(hidden, step)
    try:
        os.rename(path, hidden)
        fsync_dir(path.parent)
    except OSError as e:
        raise StorageError(f"cannot delete {path}: {e.strerror}") from None
    log.info("deleting %s", path)
    if step is not None:
        step("renamed")
    if committed is not None:
        committed()
    finish(hidden, step)


def _real_dir(root: Path, vm: str, rel: str | None) -> Path:
    """``root/vm[/rel]``, every component a real directory (no link), at depth >= 2
    (depth 1, the VM directory, when ``rel`` is None)."""
    if not is_vm_dir_name(vm) or "/" in vm or "\0" in vm or vm in (".", ".."):
        raise StorageError(f"refusing to delete: {vm!r} is not a VM directory name", vm=vm)
    parts: tuple[str, ...] = (vm,)
    if rel is not None:
        rp = PurePosixPath(rel)
        if rp.is_absolute() or not rp.parts or any(p in (".", "..", "") for p in rp.parts) or ".." in rel.split("/"):
            raise StorageError(f"refusing to delete {rel!r} of {vm}: not a directory below the VM's", vm=vm)
        if deleted_name(rp.name) is not None:
            raise StorageError(f"refusing to delete {rel!r}: it is being deleted already", vm=vm)
        parts += rp.parts
    path = Path(root)
    for part in parts:
        path = path / part
        try:
            st = os.lstat(path)
        except OSError as e:
            raise StorageError(f"cannot delete {Path(root).joinpath(*parts)}: {path}: {e.strerror}", vm=vm) from None
        if not stat.S_ISDIR(st.st_mode):
            raise StorageError(f"refusing to delete {Path(root).joinpath(*parts)}: {path} is not a directory "
                               "(links are never followed)", vm=vm)
    if rel is not None:
        inside(Path(root) / vm, rel, vm)
    return path


def _dirs(path: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return [e for e in it if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []
    except OSError as e:
        raise StorageError(f"cannot read {path}: {e.strerror}") from None


def mark_host(backup_path: Path, host: str, uri: str) -> Path:
    """Make ``<backup_path>/<host>/`` a host's directory (`names.HOST_MARKER`); its path.

    Written before the first VM directory in it (aside, fsynced, renamed),
    so that no reader ever takes the host's directory for a VM's.
    """
    import json

    from vmbk.fsutil import write_file_atomic
    from vmbk.tree.names import HOST_MARKER

    if not is_vm_dir_name(host) or "/" in host:
        raise StorageError(f"host name {host!r} cannot be a directory of the tree")
    path = Path(backup_path) / host
    marker = path / HOST_MARKER
    if marker.is_file():
        return path
    if path.is_dir() and any(os.scandir(path)):
        # A VM of that name has backups there, or a moved tree lacks its mark (README, "backup server").
        raise StorageError(f"{path} exists, is not empty and has no {HOST_MARKER}: a VM named {host!r}? "
                           f"(give the host another 'name'), or a tree moved there (add {HOST_MARKER})")
    ensure_dir(path)
    write_file_atomic(marker, json.dumps({"host": host, "uri": uri}).encode() + b"\n")
    fsync_dir(Path(backup_path))
    return path
