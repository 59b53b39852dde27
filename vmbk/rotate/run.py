"""vmbk-rotate: retention over a stream of backup records, or for VMs named.

Per VM (`RotateRun.rotate`): take its lock (a backup or restore of it
holds the same one: an ``error`` record, exit 3, and the other VMs go
on), finish what a killed run left (`vmbk.rotate.delete`), scan its tree,
gather the facts (`vmbk.rotate.facts`), let the pure rules decide
(`vmbk.policy.retention`), delete, say so in one ``rotate`` record.  A
decision that refuses everything (clock skew) fails the VM: an ``error``
record (exit 1) that says why.
A dry run takes no lock and writes nothing: neither the tree nor the
catalogue.

As a stage (`handle`) a ``backup`` record is passed on first, then its
VM rotated when the backup went well (``ok``), had nothing to do
(``skipped``) or was itself a dry run (``dry-run``: so is the rotation);
the directory it wrote is guarded.  ``--prune`` is `vmbk.rotate.prune`.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vmbk.errors import StorageError, VmbkError, VmError
from vmbk.lock import VmLock
from vmbk.policy import retention
from vmbk.policy.retention import Decision, Removal, TreeFacts
from vmbk.records import Record, error_record, make
from vmbk.rotate.delete import Deleter, test_hook
from vmbk.rotate.facts import gather
from vmbk.rotate.history import History
from vmbk.settings import Config
from vmbk.tree import names, scan_vm

log = logging.getLogger("vmbk.rotate")

PROG = "vmbk-rotate"
#: Backup outcomes rotate acts on (a failed backup is an ``error`` record).
ACTS_ON = ("ok", "skipped", "dry-run")


class RotateRun:
    """One vmbk-rotate run: the configuration, the backup root, "now", the catalogue."""

    def __init__(self, cfg: Config, root: Path, now: _dt.datetime, *, dry_run: bool) -> None:
        self.cfg = cfg
        self.root = root
        self.now = now
        self.dry_run = dry_run
        self.history = History(root, write=not dry_run)
        self.deleter = Deleter(root, self.history, test_hook())
        self._swept = False

    def close(self) -> None:
        self.history.close()

    def end(self, session: str, code: int) -> None:
        self.history.end(session, code)

    # -- the stage --------------------------------------------------------------
    def handle(self, rec: Record, session: str) -> Iterator[Record]:
        """A ``backup`` record: passed on unchanged, then its VM's ``rotate`` record."""
        yield rec  # a ReadRecord: run_stage passes it on as read
        if rec.get("outcome") not in ACTS_ON:
            return
        name = rec.get("name")
        if not isinstance(name, str) or not name:
            raise VmError("backup record without a 'name': nothing to rotate", vm="?")
        dry_run = self.dry_run or rec.get("outcome") == "dry-run"
        yield self.rotate(name, session, target=self._target(name, rec.get("target_dir")), dry_run=dry_run)

    def _target(self, vm: str, target_dir: Any) -> str | None:
        """The directory the backup wrote, relative to the VM's (None: not inside it)."""
        if not isinstance(target_dir, str):
            return None
        vm_dir = os.path.normpath(self.root / vm)
        target = os.path.normpath(target_dir)
        if target == vm_dir:
            return "."
        if not target.startswith(vm_dir + os.sep):
            return None
        return Path(os.path.relpath(target, vm_dir)).as_posix()

    # -- one VM -----------------------------------------------------------------
    def rotate(self, vm: str, session: str, *, target: str | None = None, dry_run: bool | None = None) -> Record:
        """Apply the VM's retention policy to its tree; its ``rotate`` record."""
        dry_run = self.dry_run if dry_run is None else dry_run
        policy = self.cfg.policy_for(vm)[0]
        with self.locked(vm, session, dry_run) as finished:
            facts = self.facts(vm)
            d = retention.decide(facts, policy, self.cfg.retention, self.now, target=target)
            if d.refused:  # not rotated: a failure of this VM, said in an error record
                if not dry_run:
                    self.history.decisions(session, d, "rotate")
                raise VmbkError(d.refused, vm=vm)
            done = self.carry_out(session, facts, d, dry_run, "rotate")
        return self.record(session, d, done, dry_run, finished=finished)

    def facts(self, vm: str) -> TreeFacts:
        return gather(scan_vm(self.root, vm), self.history.last_backups(vm))

    def carry_out(self, session: str, facts: TreeFacts, d: Decision, dry_run: bool, by: str) -> list[Removal]:
        if dry_run:
            return list(d.removed)
        self.history.decisions(session, d, by)
        return self.deleter.apply(session, facts, d, by)

    def locked(self, vm: str, session: str, dry_run: bool) -> _Locked:
        check_vm(self.root, vm)
        if not dry_run:
            self.history.session(session)
            self.sweep(session)
        return _Locked(self, vm, session, dry_run)

    def sweep(self, session: str) -> list[dict[str, Any]]:
        """Once per run: whole VM directories a killed ``--prune all`` left."""
        if self._swept:
            return []
        self._swept = True
        return self.deleter.finish_vms(session)

    def record(self, session: str, d: Decision, done: list[Removal], dry_run: bool, *,
               finished: list[dict[str, Any]] | None = None, prune: str | None = None) -> Record:
        vm_dir = self.root / d.vm

        def path(rel: str) -> str:
            return str(vm_dir if rel == "." else vm_dir / rel)

        free = free_percent(self.root)
        warnings = list(d.warnings)
        low = retention.low_space(free, self.cfg.retention)
        if low:
            log.warning("%s", low)
            warnings.append(low)
        return make(
            "rotate", session,
            name=d.vm,
            policy=d.policy,
            keep=d.keep,
            kept=[{"path": path(k.rel), "why": k.why} for k in d.kept],
            removed=[{"path": path(r.rel), "kind": r.kind, "tier": r.tier, "bytes": r.bytes, "reason": r.reason}
                     for r in done],
            protected=[{"path": path(p.rel), "why": p.why} for p in d.protected],
            freed_bytes=sum(r.bytes for r in done),
            dry_run=dry_run,
            prune=prune,
            finished=finished or [],
            free_percent=free,
            low_space=low is not None,
            warnings=warnings,
        )


class _Locked:
    """``with run.locked(vm, ...) as finished:`` the VM's lock (none in a dry
    run) and the deletions a killed run left, finished."""

    def __init__(self, run: RotateRun, vm: str, session: str, dry_run: bool) -> None:
        self.run = run
        self.vm = vm
        self.session = session
        self.lock = None if dry_run else VmLock(run.root, vm, purpose="rotate")

    def __enter__(self) -> list[dict[str, Any]]:
        if self.lock is None:
            return []
        self.lock.acquire()
        try:
            return self.run.deleter.finish(self.session, self.vm)
        except BaseException:
            self.lock.release()
            raise

    def __exit__(self, *exc: object) -> None:
        if self.lock is not None:
            self.lock.release()


def check_vm(root: Path, vm: str) -> None:
    """A VM name is a directory name right below the backup root, never a link."""
    if not names.is_vm_dir_name(vm) or "/" in vm or "\0" in vm or vm in (".", ".."):
        raise VmError(f"VM name {vm!r} cannot be a backup directory name", vm=vm)
    if (root / vm).is_symlink():
        raise StorageError(f"{root / vm} is a symbolic link: not followed", vm=vm)


def free_percent(root: Path) -> float | None:
    """Free space of the backup file system, in percent of its size (for unprivileged users)."""
    try:
        st = os.statvfs(root)
    except OSError:
        return None
    if not st.f_blocks:
        return None
    return round(100.0 * st.f_bavail / st.f_blocks, 1)


def standalone(run: RotateRun, vms: list[str], session: str) -> Iterator[Record]:
    """``--vm NAMES`` / ``--all``: one ``rotate`` record (or ``error``) per VM, in order."""
    for vm in vms:
        try:
            check_vm(run.root, vm)
            if not (run.root / vm).is_dir():
                raise VmError(f"no backups of VM {vm!r} under {run.root}", vm=vm)
            yield run.rotate(vm, session)
        except VmbkError as e:
            yield error_record(e, stage=PROG, session=session, vm=e.vm or vm)
