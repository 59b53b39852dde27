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
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from vmbk.backup import memory
from vmbk.backup.history import History
from vmbk.backup.vm import BackupOptions, backup_vm
from vmbk.cancel import Cancel
from vmbk.catalogue import Catalogue
from vmbk.clock import now_iso
from vmbk.discover import discover_hosts
from vmbk.errors import LockError, VmbkError
from vmbk.fsutil import ensure_root
from vmbk.lock import VmLock
from vmbk.planner import plan_record
from vmbk.policy import PlannedVm
from vmbk.progress import Board
from vmbk.records import Record, error_record
from vmbk.settings import Config, Host
from vmbk.tree import names
from vmbk.tree.ops import mark_host
from vmbk.tree.scan import host_root
from vmbk.virt import backupjob
from vmbk.virt.backupjob import RedefineFailed
from vmbk.virt.connection import Link, LibvirtError, connection_lost, libvirt_module
from vmbk.virt.hostfiles import LOCAL, HostFiles
from vmbk.virt.remote import host_name, with_keyfile

log = logging.getLogger("vmbk.backup")

PROG = "vmbk-backup"


class BackupRun:
    """One vmbk-backup run: libvirt connections (one per host), the catalogues, the options.

    Several hosts (a backup server, `vmbk.config.hosts_for`): each plan's
    ``vm`` record names its host and URI; each host gets its connection
    (and, when remote, its ssh control master, `vmbk.virt.hostfiles`) the
    first time one of its VMs comes, and its tree root
    (``<backup_path>/<host>`` when the tree has a level per host, each
    with its own locks and catalogue).  A host that cannot be reached
    fails its VMs only.
    """

    def __init__(self, cfg: Config, root: Path, hosts: Sequence[Host], now: _dt.datetime, *, dry_run: bool,
                 cancel: Cancel, progress: Board | None, with_memory: bool = False) -> None:
        self.cfg = cfg
        #: ``--with-memory``: every running VM's memory state, whatever its ``memory`` setting.
        self.with_memory = with_memory
        self.root = root
        self.hosts = tuple(hosts)
        self.now = now
        self.dry_run = dry_run
        self.cancel = cancel
        self.progress = progress
        self._links: dict[str, Link] = {}
        self._failed: dict[str, str] = {}
        self._lock = threading.Lock()
        if not dry_run and ensure_root(root):
            log.info("backup root %s set to root:backup 2750, as vmbackup sets it", root)
        self._histories: dict[Path, History] = {}
        #: VMs whose backup libvirtd's death cut short: job and checkpoint to clean up.
        self.pending: list[PlannedVm] = []

    @property
    def uri(self) -> str:
        return self.hosts[0].uri

    def close(self) -> None:
        for link in self._links.values():
            link.close()

    def host_of(self, planned: PlannedVm) -> Host:
        """The host of a plan: its ``vm`` record's (configured, or as the record says), else the first."""
        vm: Any = planned.record.get("vm") if hasattr(planned.record, "get") else None
        name = vm.get("host") if isinstance(vm, Mapping) else None
        uri = vm.get("uri") if isinstance(vm, Mapping) else None
        for h in self.hosts:
            if name == h.name or (uri and uri == h.uri):
                return h
        known = self.cfg.host(str(name)) if name else None
        if known is not None:
            return known
        if isinstance(uri, str) and uri:
            return Host(name=str(name or host_name(uri)), uri=uri)
        return self.hosts[0]

    def link(self, host: Host) -> Link:
        """The host's connection, made once; LibvirtError (for each of its VMs) when it cannot be reached."""
        with self._lock:
            if host.name in self._failed:
                raise LibvirtError(self._failed[host.name])
            if host.name not in self._links:
                try:
                    self._links[host.name] = Link(with_keyfile(host.uri, host.ssh_key), nbd_tcp=host.nbd_tcp)
                except LibvirtError as e:
                    self._failed[host.name] = f"host {host.name} cannot be reached: {e}"
                    raise LibvirtError(self._failed[host.name]) from None
            return self._links[host.name]

    def root_of(self, host: Host) -> Path:
        """The host's backup root (`vmbk.tree.scan.host_root`), marked as a host's directory when it is one."""
        path = host_root(self.root, host.name, layered=self.cfg.host_level)
        if path != self.root and not self.dry_run:
            with self._lock:
                mark_host(self.root, host.name, host.uri)
        return path

    def history(self, root: Path, session: str) -> History:
        with self._lock:
            if root not in self._histories:
                self._histories[root] = History(None if self.dry_run else Catalogue.open(root))
                self._histories[root].session(session)
            return self._histories[root]

    def options(self, vm: str, root: Path | None = None, files: HostFiles = LOCAL) -> BackupOptions:
        lz4 = self.cfg.compression_for(vm) == "lz4"
        return BackupOptions(backup_path=root or self.root, compression=self.cfg.compression_level if lz4 else None,
                       fstrim=self.cfg.fstrim_for(vm), dry_run=self.dry_run, cancel=self.cancel,
                       progress=self.progress, default_policy=self.cfg.policy, files=files,
                       memory=self.with_memory or self.cfg.memory_for(vm),
                       memory_timeout=float(self.cfg.memory_pause_timeout))

    def handle(self, rec: Record, session: str) -> Iterator[Record]:
        """The ``backup`` record of one ``plan`` record."""
        planned = PlannedVm.from_record(rec)
        host = self.host_of(planned)
        history = self.history(self.root_of(host), session)
        started_at = now_iso()
        try:
            try:
                out = self._backup(planned, session, host)
            except RedefineFailed as e:
                planned = self.replan_without_bitmaps(planned, str(e))
                out = self._backup(planned, session, host)
        except VmbkError as e:
            if e.vm is None:
                e.vm = planned.name
            history.backup(session, planned, {"outcome": "failed"}, started_at, error=str(e))
            raise
        history.backup(session, planned, out, started_at)
        yield out
        if (refused := memory.error_of(out)) is not None:  # the disks are backed up, the state is not
            yield error_record(refused, stage=PROG, session=session, vm=planned.name)

    def _backup(self, planned: PlannedVm, session: str, host: Host) -> Record:
        root = self.root_of(host)
        if planned.plan.action == "skip" or self.dry_run:
            return backup_vm(planned, None, self.options(planned.name, root), session)
        try:
            link = self.link(host)
            conn = link.get()
        except LibvirtError as e:
            raise LibvirtError(f"not backed up: {e}", vm=planned.name) from None
        self.clean_pending()
        libvirt = libvirt_module()
        try:
            return backup_vm(planned, conn, self.options(planned.name, root, link.files), session)
        except BaseException as e:
            lost = connection_lost(e) or not link.alive()
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
            host = self.host_of(planned)
            try:
                link = self.link(host)
                conn = link.get()
            except LibvirtError:
                return
            self.pending.pop(0)
            try:
                self._clean(conn, planned, self.root_of(host), link.files)
            except (VmbkError, OSError) as e:
                log.warning("%s: cleaning up after libvirtd came back failed (the next run does it): %s",
                            planned.name, e)
            except libvirt_module().libvirtError as e:
                log.warning("%s: cleaning up after libvirtd came back failed (the next run does it): %s",
                            planned.name, e.get_error_message())

    def _clean(self, conn: Any, planned: PlannedVm, root: Path, files: HostFiles) -> None:
        plan = planned.plan
        dom = conn.lookupByName(plan.name)
        lock = VmLock(root, plan.name, purpose="backup")
        try:
            lock.acquire()
        except LockError:
            return  # someone else backs it up now: theirs to clean
        try:
            job = backupjob.clear_stale_job(dom, files=files)
            cpt = root / plan.name / (plan.target or ".") / names.cpt_name(plan.name)
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
        for rec in discover_hosts(self.hosts, self.cfg, names=names, session=session):
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
            for history in self._histories.values():
                history.end(session, code)
