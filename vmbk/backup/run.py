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
"""

from __future__ import annotations

import copy
import datetime as _dt
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from vmbk.backup.history import History
from vmbk.backup.vm import BackupOptions, backup_vm
from vmbk.cancel import Cancel
from vmbk.catalogue import Catalogue
from vmbk.clock import now_iso
from vmbk.discover import discover
from vmbk.errors import VmbkError
from vmbk.planner import plan_record
from vmbk.policy import PlannedVm
from vmbk.progress import Board
from vmbk.records import Record, error_record
from vmbk.settings import Config
from vmbk.virt.backupjob import RedefineFailed
from vmbk.virt.connection import open_connection

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
        self.conn = open_connection(uri)
        self.history = History(None if dry_run else Catalogue.open(root))

    def close(self) -> None:
        self.conn.close()

    def options(self, vm: str) -> BackupOptions:
        lz4 = self.cfg.compression_for(vm) == "lz4"
        return BackupOptions(backup_path=self.root, compression=self.cfg.compression_level if lz4 else None,
                       fstrim=self.cfg.fstrim_for(vm), dry_run=self.dry_run, cancel=self.cancel,
                       progress=self.progress)

    def handle(self, rec: Record, session: str) -> Iterator[Record]:
        """The ``backup`` record of one ``plan`` record."""
        self.history.session(session)
        planned = PlannedVm.from_record(rec)
        started_at = now_iso()
        try:
            try:
                out = backup_vm(planned, self.conn, self.options(planned.name), session)
            except RedefineFailed as e:
                planned = self.replan_without_bitmaps(planned, str(e))
                out = backup_vm(planned, self.conn, self.options(planned.name), session)
        except VmbkError as e:
            if e.vm is None:
                e.vm = planned.name
            self.history.backup(session, planned, {"outcome": "failed"}, started_at, error=str(e))
            raise
        self.history.backup(session, planned, out, started_at)
        yield out

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
        if not self.dry_run:
            self.history.end(session, code)
