"""Carry out the plan of one VM: the heart of vmbk-backup.

Order (the planner's contract): take the VM's lock; resume/thaw what a
killed vmbk left paused/frozen (`hold.heal`); end the backup job a
killed vmbk-backup left running (`backupjob.clear_stale_job`); remove
leftover ``.partial`` files; archive the chain; redefine lost checkpoint metadata;
delete old checkpoints before a full; copy the disks; write the side
files; record everything.  On any failure the job is aborted, the files
this run wrote are removed, the checkpoint it created is deleted (so the
next run is not confused), and the error is raised for the stage to turn
into an ``error`` record.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import datetime as _dt
import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vmbk.backup import bitlocker, memory, sidefiles
from vmbk.backup.disk import DiskBackup, DiskResult, backup_disk
from vmbk.backup.sources import libvirt_export, qemu_nbd_export
from vmbk.cancel import Cancel, Cancelled
from vmbk.errors import StorageError, VmbkError, VmError
from vmbk.fsutil import ensure_dir, write_file_atomic
from vmbk.manifest import keys
from vmbk.manifest import write as manifest_write
from vmbk.lock import VmLock
from vmbk.policy import Plan, PlannedVm, VmFacts
from vmbk.progress import Board
from vmbk.records import Record, make
from vmbk.tree import names, ops
from vmbk.tree.scan import chain_checkpoints as scan_chain_checkpoints
from vmbk.tree.scan import scan_vm
from vmbk.virt import backupjob, domain, hold
from vmbk.virt.hostfiles import LOCAL, HostFiles
from vmbk.vmbackup import markers
from vmbk.virt.connection import libvirt_module

log = logging.getLogger("vmbk.backup")


@dataclasses.dataclass(frozen=True)
class BackupOptions:
    backup_path: Path
    compression: int | None = None
    fstrim: bool = True
    dry_run: bool = False
    cancel: Cancel | None = None
    progress: Board | None = None
    #: The configuration's default policy: vmbackup's markers are named
    #: after it (`vmbk.vmbackup.markers`); None: the VM's own.
    default_policy: str | None = None
    #: The VM's host's files (`vmbk.virt.hostfiles`): this machine's, or a
    #: ``qemu+ssh://`` host's over ssh (job directory, sockets, side files).
    files: HostFiles = LOCAL
    #: Save the guest's RAM and device state with a running VM's disks (`vmbk.backup.memory`).
    memory: bool = False
    #: The longest pause the state save may cost (``memory_pause_timeout``): past it, no state.
    memory_timeout: float = 60.0


def _copy(job: DiskBackup, board: Board | None, label: str) -> DiskResult:
    if board is None:
        return backup_disk(job)
    progress = board.callback(label)
    try:
        return backup_disk(job, progress)
    finally:
        progress.finish()


def _online_copy(job: DiskBackup, board: Board | None, label: str, cancel: Cancel) -> DiskResult:
    return _copy(dataclasses.replace(job, cancel=cancel), board, label)


def _offline_copy(target: str, image: str, fmt: str, path: Path, compression: int | None,
                  board: Board | None, label: str, files: HostFiles, cancel: Cancel) -> DiskResult:
    with qemu_nbd_export(image, fmt, files=files) as address:
        job = DiskBackup(target, address, "copy", path, disk_format=fmt, compression=compression, cancel=cancel)
        return _copy(job, board, label)


def _all_disks(jobs: Sequence[Callable[[Cancel], DiskResult]], outer: Cancel | None) -> list[DiskResult]:
    """Run one VM's disk copies in parallel; the first failure stops the rest.

    Each copy holds a small fixed buffer pool, so memory grows with the
    number of disks, not their size.  Results keep the jobs' order.
    """
    local = Cancel(parent=outer)

    def run(job: Callable[[Cancel], DiskResult]) -> DiskResult:
        try:
            return job(local)
        except BaseException:
            local.set()
            raise

    if len(jobs) == 1:
        return [run(jobs[0])]
    with cf.ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="disk") as pool:
        futures = [pool.submit(run, j) for j in jobs]
        try:
            cf.wait(futures, return_when=cf.FIRST_EXCEPTION)
        except BaseException:
            local.set()
            raise
        finally:
            cf.wait(futures)
    errors: list[BaseException] = [e for f in futures if (e := f.exception()) is not None]
    real = [e for e in errors if not isinstance(e, Cancelled)]
    if errors:
        raise (real or errors)[0]
    return [f.result() for f in futures]


@dataclasses.dataclass
class Outcome:
    consistency: str | None = None
    disks: list[DiskResult] = dataclasses.field(default_factory=list)
    files: list[Path] = dataclasses.field(default_factory=list)
    events: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    #: The record's ``memory`` (None: not asked for).
    memory: dict[str, Any] | None = None
    #: The state file and its digest, for the point's manifest.
    state: tuple[Path, str] | None = None


def _lookup(conn: Any, name: str) -> Any:
    libvirt = libvirt_module()
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError:
        raise VmError(f"VM {name!r} not found", vm=name) from None


def _prepare(plan: Plan, vm_dir: Path, dom: Any, out: Outcome) -> None:
    name = plan.name
    removed = ops.cleanup_partials(vm_dir, list(plan.cleanup), name)
    for rel in removed:
        out.events.append({"event": "cleaned", "directory": rel, "reason": "leftover .partial file"})
    if plan.archive and plan.archive_from is not None and plan.archive_to is not None:
        dst = ops.archive_chain(vm_dir, plan.archive_from, plan.archive_to, name)
        out.events.append({"event": "archived", "directory": str(dst), "reason": "; ".join(plan.reasons)})
    target_dir = ops.inside(vm_dir, plan.target or ".", name)
    if plan.action == "inc" and plan.checkpoint and plan.checkpoint in plan.delete_checkpoints:
        _remove_unfinished(plan.checkpoint, target_dir, name, plan.target, out)
    done: list[str] = []
    for cp in plan.redefine_checkpoints:
        xml = (target_dir / names.checkpoint_xml_name(cp)).read_text()
        try:
            backupjob.redefine_checkpoint(dom, xml)
        except backupjob.RedefineFailed:
            for undo in done:  # leave libvirt as we found it
                with contextlib.suppress(VmbkError):
                    backupjob.delete_checkpoint(dom, undo, metadata_only=True)
            raise
        done.append(cp)
        out.events.append({"event": "redefined", "directory": plan.target, "reason": f"checkpoint {cp}"})
    for cp in plan.delete_checkpoints:
        backupjob.delete_checkpoint(dom, cp)


def _remove_unfinished(checkpoint: str, target_dir: Path, name: str, rel: str | None, out: Outcome) -> None:
    """The files of the incremental ``checkpoint`` a killed run left, before it is taken again.

    Before its libvirt checkpoint is deleted: a crash in between leaves the
    checkpoint alone, which the next plan rolls back the same way.  The
    ``.cpt`` is read again: a point it lists is never removed.
    """
    listed = scan_chain_checkpoints(target_dir, name)
    if listed is None or checkpoint in listed:
        raise StorageError(f"refusing to remove the files of {checkpoint} in {target_dir}: its checkpoint list "
                           f"{'cannot be read' if listed is None else 'lists it'} (plan again)", vm=name)
    for f in ops.remove_unfinished(target_dir, checkpoint, name):
        out.events.append({"event": "cleaned", "directory": rel,
                           "reason": f"{f}: a file of {checkpoint}, which did not finish (the .cpt does not list it)"})


def _agent_again(dom: Any, planned: PlannedVm, event: dict[str, Any]) -> PlannedVm:
    """The VM a dead vmbk left paused was discovered paused, when its agent
    could not answer: ask again now that it runs, so that this backup
    freezes the guest's filesystems instead of pausing the VM (and saves
    what needs the agent) as any other night.  ``event`` gets a note."""
    if event.get("event") != "resumed" or planned.vm.agent or not planned.plan.online:
        return planned
    if not any(domain.agent_answers(dom) for _ in range(2)):
        return planned
    event["reason"] += "; its guest agent answers again"
    return dataclasses.replace(planned, vm=dataclasses.replace(planned.vm, agent=True))


def _copy_online(dom: Any, planned: PlannedVm, target_dir: Path, opts: BackupOptions, out: Outcome) -> None:
    plan, vm = planned.plan, planned.vm
    modes = {d.target: d.mode for d in plan.disks}
    wanted = [t for t, m in modes.items() if m != "skip"]
    skip = [t for t, m in modes.items() if m == "skip" and _device(vm, t) == "disk"]
    cp_disks = [t for t, m in modes.items() if m in ("full", "inc")]
    checkpoint = plan.checkpoint if plan.online else None
    parent = plan.parent if plan.action == "inc" else None
    agent = bool(vm.agent)
    if opts.fstrim and agent and vm.fstrim is not False:
        _fstrim(dom)
    saver = None
    if opts.memory:
        saver = memory.StateSave(dom, target_dir, names.ident(plan.action, checkpoint), checkpoint=checkpoint,
                                 timeout=opts.memory_timeout, remote=opts.files is not LOCAL, level=plan.action)
        out.memory = saver.record()
    try:
        _export_and_copy(dom, planned, target_dir, opts, out, saver if saver and saver.wanted else None,
                         wanted, skip, checkpoint, parent, cp_disks, agent)
    except BaseException:
        if saver is not None:
            saver.abandon()
        raise
    if saver is not None:
        out.memory = saver.record()


def _export_and_copy(dom: Any, planned: PlannedVm, target_dir: Path, opts: BackupOptions, out: Outcome,
                     saver: memory.StateSave | None, wanted: list[str], skip: list[str], checkpoint: str | None,
                     parent: str | None, cp_disks: list[str], agent: bool) -> None:
    plan, vm = planned.plan, planned.vm
    modes = {d.target: d.mode for d in plan.disks}
    with libvirt_export(dom, disks=wanted, skip=skip, checkpoint=checkpoint, parent=parent,
                        checkpoint_disks=cp_disks, agent=agent, files=opts.files,
                        memory=saver) as (addresses, consistency):
        out.consistency = consistency
        if checkpoint:
            out.files.append(sidefiles.write_checkpoint_xml(
                target_dir, checkpoint, dom.checkpointLookupByName(checkpoint).getXMLDesc(0)))
        jobs: list[Callable[[Cancel], DiskResult]] = []
        for target in wanted:
            level = modes[target]
            path = target_dir / names.data_name(target, level, checkpoint)
            out.files += [path, path.with_name(names.chksum_name(path.name))]
            job = DiskBackup(target, addresses[target], level, path,
                          disk_format=_format(vm, target) or "qcow2",
                          checkpoint=checkpoint or "", parent=parent or "",
                          dirty_bitmap=f"backup-{target}" if level == "inc" else None,
                          compression=opts.compression)
            jobs.append(functools.partial(_online_copy, job, opts.progress, f"{dom.name()}/{target}"))
        out.disks += _all_disks(jobs, opts.cancel)
        if saver is not None:  # still in the job's directory: the spool is there
            state = saver.finish(opts.cancel)
            out.files += state
            if state and saver.sha256:
                out.state = (saver.path, saver.sha256)


def _device(vm: VmFacts, target: str) -> str:
    d = vm.disk(target)
    return d.device if d is not None else "disk"


def _format(vm: VmFacts, target: str) -> str | None:
    d = vm.disk(target)
    return d.format if d is not None else None


def _copy_offline(planned: PlannedVm, target_dir: Path, opts: BackupOptions, out: Outcome) -> None:
    plan = planned.plan
    out.consistency = "offline"
    if opts.memory:
        out.memory = memory.not_running(plan.name)
    jobs: list[Callable[[Cancel], DiskResult]] = []
    for d in plan.disks:
        if d.mode == "skip":
            continue
        src = planned.vm.disk(d.target)
        if src is None or not src.source or src.type not in ("file", "block"):
            raise VmError(f"disk {d.target}: no file or block device to copy", vm=plan.name)
        path = target_dir / names.data_name(d.target, "copy", None)
        out.files += [path, path.with_name(names.chksum_name(path.name))]
        jobs.append(functools.partial(_offline_copy, d.target, src.source, src.format or "raw", path, opts.compression,
                                      opts.progress, f"{plan.name}/{d.target}", opts.files))
    out.disks += _all_disks(jobs, opts.cancel)


def _fstrim(dom: Any) -> None:
    libvirt = libvirt_module()
    try:
        dom.fSTrim(None, 0, 0)
    except libvirt.libvirtError as e:
        log.warning("%s: fstrim failed (backup goes on): %s", dom.name(), e.get_error_message())


def _side_files(dom: Any, planned: PlannedVm, target_dir: Path, out: Outcome, backup_path: Path,
                files: HostFiles = LOCAL) -> None:
    plan, vm = planned.plan, planned.vm
    level = plan.action
    checkpoint = plan.checkpoint if plan.online else None
    tag = names.ident(level, checkpoint)
    libvirt = libvirt_module()
    xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) if dom.isPersistent() else dom.XMLDesc(0)
    out.files.append(sidefiles.write_vmconfig(target_dir, tag, xml))
    for r in out.disks:
        src = vm.disk(r.target)
        if src is not None and src.source:
            with contextlib.suppress(VmbkError, OSError):  # informational: never fail a backup for it
                out.files.append(sidefiles.write_qemu_info(target_dir, r.target, tag, src.source, src.format,
                                                           files))
    # read on the VM's host: a remote host's files come over ssh (vmbk.virt.hostfiles)
    nvram = files.read(vm.nvram) if vm.nvram else None
    if vm.nvram and nvram is not None:
        out.files.append(sidefiles.copy_nvram(target_dir, vm.nvram, tag, level, nvram))
    tpm_state = files.read_tree(vm.tpm_state_dir) if vm.tpm_state_dir else None
    if tpm_state is not None:
        sidefiles.save_tpm_state(target_dir, tpm_state)
    if plan.online and vm.agent and (vm.windows or vm.tpm):
        bitlocker.save_recovery_keys(dom, target_dir)
    _commit(planned, target_dir, tag, checkpoint, out, backup_path)


def _commit(planned: PlannedVm, target_dir: Path, tag: str, checkpoint: str | None, out: Outcome,
            backup_path: Path) -> None:
    """The manifest, then the ``.cpt``: its rename commits the point (a copy's manifest commits it).

    `vmbk.manifest.write`: the manifest covers the ``.cpt``'s new bytes, so
    the point stays committed by one rename; a crash between the two
    leaves a point the ``.cpt`` does not list (step 8 of "Durability and
    recovery", docs/architecture.md).
    """
    plan = planned.plan
    cpt = sidefiles.next_cpt(target_dir, plan.name, checkpoint) if checkpoint else None
    signer, warning = manifest_write.signer_or_warning()
    if warning:
        log.warning("%s: %s", plan.name, warning)
    if signer is not None:
        keys.publish(backup_path, signer)
    path = target_dir / names.manifest_name(tag)
    written = [p for p in out.files if p.parent == target_dir or target_dir in p.parents]
    out.files.append(path)
    manifest_write.write_point(
        target_dir, vm=plan.name, uuid=planned.vm.uuid, level=plan.action, checkpoint=checkpoint, files=written,
        streams={**{r.path: r.sha256 for r in out.disks if r.sha256}, **dict([out.state] if out.state else [])},
        cpt=(cpt[0].name, cpt[2]) if cpt else None,
        checkpoints=cpt[1] if cpt else None, signer=signer)
    if cpt:
        write_file_atomic(cpt[0], cpt[2])


def _vmbackup_files(dom: Any, planned: PlannedVm, vm_dir: Path, target_dir: Path, opts: BackupOptions,
                    out: Outcome) -> None:
    """vmbackup's state files, so vmbackup/vmrestore go on from this backup.

    After the backup is complete: a failure here is a warning, never a
    failed backup (vmbackup treats its ``config/`` the same way).
    """
    plan, vm = planned.plan, planned.vm
    now = _plan_time(planned.record)
    try:
        stale = [c.path for c in scan_vm(opts.backup_path, plan.name).chains.values()
                 if c.period and c.rel != plan.target and c.policy == plan.policy and c.data
                 and names.same_period(c.period, c.days, now.date())]
        markers.write_all(vm_dir, target_dir, plan.name, period=plan.period, policy=plan.policy or "",
                          default_policy=opts.default_policy, level=plan.action, xml=dom.XMLDesc(0),
                          tpm=bool(vm.tpm_state_dir and (target_dir / names.TPM_STATE).is_dir()),
                          size=sum(r.stored_size for r in out.disks), now=now, stale=stale)
    except (OSError, VmbkError, libvirt_module().libvirtError) as e:
        log.warning("%s: vmbackup's state files not written (vmbackup's next backup may be a full): %s",
                    plan.name, e)


def _plan_time(rec: Any) -> _dt.datetime:
    """The plan's "now" in local time (vmbackup names from the local ``date``); else the clock."""
    now = rec.get("now") if hasattr(rec, "get") else None
    if isinstance(now, str):
        with contextlib.suppress(ValueError):
            return _dt.datetime.fromisoformat(now).astimezone()
    return _dt.datetime.now().astimezone()


def _undo(dom: Any, plan: Plan, out: Outcome, created_checkpoint: bool) -> None:
    for path in out.files:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    if created_checkpoint and plan.checkpoint:
        with contextlib.suppress(VmbkError):
            backupjob.delete_checkpoint(dom, plan.checkpoint)


def _host(planned: PlannedVm) -> str | None:
    """The host the plan's ``vm`` record names (None: a record from before hosts)."""
    vm: Any = planned.record.get("vm") if hasattr(planned.record, "get") else None
    host = vm.get("host") if isinstance(vm, Mapping) else None
    return host if isinstance(host, str) else None


def backup_vm(planned: PlannedVm, conn: Any, opts: BackupOptions, session: str) -> Record:
    """Back one VM up as its plan says; return its ``backup`` record."""
    plan = planned.plan
    name = plan.name
    started = time.monotonic()
    base = make("backup", session, name=name, host=_host(planned), action=plan.action, period=plan.period,
                target_dir=planned.target_dir, checkpoint=plan.checkpoint, parent=plan.parent,
                reasons=list(plan.reasons), policy=plan.policy or None,
                excluded=planned.vm.excluded or plan.policy == "never")
    if plan.action == "skip":
        return {**base, "outcome": "skipped", "consistency": None, "disks": [], "bytes": 0, "duration": 0.0}
    if opts.dry_run:
        return {**base, "outcome": "dry-run", "consistency": None, "disks": [dataclasses.asdict(d) for d in plan.disks],
                "bytes": 0, "duration": 0.0}
    vm_dir = opts.backup_path / name
    target_dir = ops.inside(vm_dir, plan.target, name) if plan.target else vm_dir
    out = Outcome()
    dom = _lookup(conn, name)
    with VmLock(opts.backup_path, name, purpose="backup"):
        ensure_dir(vm_dir)
        if event := hold.heal(dom):  # the pause/freeze a killed vmbk left (vmbk.virt.hold)
            planned = _agent_again(dom, planned, event)
            out.events.append({**event, "directory": plan.target})
        if plan.online and (stale := backupjob.clear_stale_job(dom, files=opts.files)):
            out.events.append({"event": "cleaned", "directory": plan.target,
                               "reason": f"backup job left running by a vmbk-backup that did not finish ({stale})"})
        _prepare(plan, vm_dir, dom, out)
        ensure_dir(target_dir)
        created = False
        try:
            if plan.online:
                if not dom.isActive():
                    raise VmError(f"VM {name!r} is not running: plan again", vm=name)
                created = bool(plan.checkpoint)
                _copy_online(dom, planned, target_dir, opts, out)
            else:
                if dom.isActive():
                    raise VmError(f"VM {name!r} is running: a copy backup needs it shut off; plan again", vm=name)
                _copy_offline(planned, target_dir, opts, out)
            _side_files(dom, planned, target_dir, out, opts.backup_path, opts.files)
        except BaseException as e:
            _undo(dom, plan, out, created)
            if isinstance(e, VmbkError) and e.vm is None:
                e.vm = name
            raise
        _vmbackup_files(dom, planned, vm_dir, target_dir, opts, out)
    disks = [{"target": r.target, "level": r.level, "path": str(r.path), "virtual_size": r.virtual_size,
              "data_size": r.data_size, "stored_size": r.stored_size, "checksum": r.checksum,
              "seconds": round(r.seconds, 3)} for r in out.disks]
    return {**base, "outcome": "ok", "consistency": out.consistency, "disks": disks,
            "bytes": sum(r.stored_size for r in out.disks), "duration": round(time.monotonic() - started, 3),
            "events": out.events, "memory": out.memory}
