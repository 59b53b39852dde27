"""vmbk-backup over a stream of plan records: what the command drives.

Per ``plan`` record: type it (`PlannedVm.from_record`: a broken plan fails
its VM only), back the VM up (`vmbk.backup.vm.backup_vm`), record it in
the catalogue (`vmbk.backup.history`).  Two self-healing steps live here
because they need more than one VM's plan:

* the chain's checkpoint redefinition fails (QEMU lost the bitmaps while
  libvirt lost the metadata): the VM is planned again as if it had no
  bitmaps, so tonight makes a new chain rather than failing every night
  until someone looks;
* standalone (``--vm NAMES``): discover and plan those VMs here, as
  ``vmbk-discover | vmbk-plan`` would.

libvirtd dying mid-run (see `vmbk.virt.connection.Link`): a libvirt
failure fails the VM it hit (``error``, exit 6, never a traceback); the
files that backup wrote are removed at once, but its job and checkpoint
are libvirt's and can only be cleaned up once libvirtd is back.  So the
VM is remembered, and before the next VM (after reconnecting) or at the
end of the run its job is ended and the checkpoint it created removed,
under its lock; the next run, which ends any job vmbk left
(`backupjob.clear_stale_job`), is the fallback.  The VMs after it go on.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

from vmbk.backup.history import History
from vmbk.backup.vm import BackupOptions, backup_vm
from vmbk.cancel import Cancel
from vmbk.catalogue import Catalogue
from vmbk.clock import now_iso
from vmbk.discover import discover
from vmbk.errors import LockError, VmbkError
from vmbk.fsutil import ensure_root
from vmbk.lock import VmLock
from vmbk.planner import plan_record
from vmbk.policy import PlannedVm
from vmbk.progress import Board
from vmbk.records import Record, error_record
from vmbk.settings import Config
from vmbk.tree import names
from vmbk.virt import backupjob
from vmbk.virt.backupjob import RedefineFailed
from vmbk.virt.connection import Link, LibvirtError, connection_lost, libvirt_module

log = logging.getLogger("vmbk.backup")

PROG = "vmbk-backup"


class BackupRun:
    """One vmbk-backup run: a libvirt connection, the catalogue, the options."""

    def __init__(self, cfg: Config, root: Path, uri: str, now: _dt.datetime, *, dry_run: bool,
                 cancel: Cancel, progress: Board | None) -> None:
        self.cfg = cfg
        self.root = root
        self.uri = uri
        self.now = now
        self.dry_run = dry_run
        self.cancel = cancel
        self.progress = progress
        self.link = Link(uri)
        if not dry_run and ensure_root(root):
            log.info("backup root %s set to root:backup 2750, as vmbackup sets it", root)
        self.history = History(None if dry_run else Catalogue.open(root))
        #: VMs whose backup libvirtd's death cut short: job and checkpoint to clean up.
        self.pending: list[PlannedVm] = []

    def close(self) -> None:
        self.link.close()

    def options(self, vm: str) -> BackupOptions:
        lz4 = self.cfg.compression_for(vm) == "lz4"
        return BackupOptions(backup_path=self.root, compression=self.cfg.compression_level if lz4 else None,
                       fstrim=self.cfg.fstrim_for(vm), dry_run=self.dry_run, cancel=self.cancel,
                       progress=self.progress, default_policy=self.cfg.policy)

    def handle(self, rec: Record, session: str) -> Iterator[Record]:
        """The ``backup`` record of one ``plan`` record."""
        self.history.session(session)
        planned = PlannedVm.from_record(rec)
        started_at = now_iso()
        try:
            try:
                out = self._backup(planned, session)
            except RedefineFailed as e:
                planned = self.replan_without_bitmaps(planned, str(e))
                out = self._backup(planned, session)
        except VmbkError as e:
            if e.vm is None:
                e.vm = planned.name
            self.history.backup(session, planned, {"outcome": "failed"}, started_at, error=str(e))
            raise
        self.history.backup(session, planned, out, started_at)
        yield out

    def _backup(self, planned: PlannedVm, session: str) -> Record:
        if planned.plan.action == "skip" or self.dry_run:
            return backup_vm(planned, None, self.options(planned.name), session)
        try:
            conn = self.link.get()
        except LibvirtError as e:
            raise LibvirtError(f"not backed up: {e}", vm=planned.name) from None
        self.clean_pending()
        libvirt = libvirt_module()
        try:
            return backup_vm(planned, conn, self.options(planned.name), session)
        except BaseException as e:
            lost = connection_lost(e) or not self.link.alive()
            if lost and planned.plan.online:
                self.pending.append(planned)
            if isinstance(e, libvirt.libvirtError):
                why = e.get_error_message()
                if lost:
                    why += ("; libvirtd went away: the backup job and checkpoint are cleaned up when it is back"
                            if planned.plan.online else "; libvirtd went away")
                raise LibvirtError(f"libvirt failed during the backup: {why}", vm=planned.name) from None
            raise

    def clean_pending(self) -> None:
        """End the jobs and remove the checkpoints of backups libvirtd's death cut short."""
        while self.pending:
            planned = self.pending[0]
            try:
                conn = self.link.get()
            except LibvirtError:
                return
            self.pending.pop(0)
            try:
                self._clean(conn, planned)
            except (VmbkError, OSError) as e:
                log.warning("%s: cleaning up after libvirtd came back failed (the next run does it): %s",
                            planned.name, e)
            except libvirt_module().libvirtError as e:
                log.warning("%s: cleaning up after libvirtd came back failed (the next run does it): %s",
                            planned.name, e.get_error_message())

    def _clean(self, conn: Any, planned: PlannedVm) -> None:
        plan = planned.plan
        dom = conn.lookupByName(plan.name)
        lock = VmLock(self.root, plan.name, purpose="backup")
        try:
            lock.acquire()
        except LockError:
            return  # someone else backs it up now: theirs to clean
        try:
            job = backupjob.clear_stale_job(dom)
            cpt = self.root / plan.name / (plan.target or ".") / names.cpt_name(plan.name)
            listed: list[str] = []
            with contextlib.suppress(OSError, ValueError):
                listed = orjson.loads(cpt.read_bytes())
            checkpoint = plan.checkpoint
            created = checkpoint is not None and checkpoint not in listed and checkpoint in [
                c.getName() for c in dom.listAllCheckpoints(0)]
            if created and checkpoint is not None:
                backupjob.delete_checkpoint(dom, checkpoint)
            if job or created:
                log.warning("%s: libvirtd is back: %s", plan.name, " and ".join(
                    w for w in (f"ended the backup job ({job})" if job else "",
                                f"removed checkpoint {checkpoint}" if created else "") if w))
        finally:
            lock.release()

    def replan_without_bitmaps(self, planned: PlannedVm, why: str) -> PlannedVm:
        vm: dict[str, Any] = copy.deepcopy(dict(planned.record.get("vm") or {}))
        for disk in vm.get("disks") or []:
            if "bitmaps" in disk:
                disk["bitmaps"] = []
                disk["bitmaps_source"] = "redefine-failed"
        new = plan_record(vm, self.cfg, self.root, self.now, planned.record.get("session"))
        new["reasons"] = [f"redefining the chain's checkpoints failed ({why})", *new["reasons"]]
        return PlannedVm.from_record(new)

    def plan(self, names: Sequence[str], session: str) -> Iterator[Record]:
        """Standalone: discover and plan ``names``; other records pass as they come."""
        for rec in discover(self.uri, self.cfg, names=names, session=session):
            if rec["type"] != "vm":
                yield rec
                continue
            try:
                yield plan_record(rec, self.cfg, self.root, self.now, session)
            except VmbkError as e:
                yield error_record(e, stage=PROG, session=session, vm=rec.get("name"))

    def end(self, session: str, code: int) -> None:
        if self.pending:
            self.clean_pending()
        for planned in self.pending:
            log.warning("%s: libvirtd did not come back: its backup job and checkpoint %s are left to the next run",
                        planned.name, planned.plan.checkpoint)
        if not self.dry_run:
            self.history.end(session, code)
