"""Carry out the plan of one VM: the heart of vmbk-backup.

Order (the planner's contract): take the VM's lock; end the backup job a
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
import functools
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vmbk.backup import bitlocker, sidefiles
from vmbk.backup.disk import DiskJob, DiskResult, backup_disk
from vmbk.backup.sources import libvirt_export, qemu_nbd_export
from vmbk.cancel import Cancel, Cancelled
from vmbk.errors import InputError, VmbkError, VmError
from vmbk.fsutil import ensure_dir
from vmbk.lock import VmLock
from vmbk.progress import Board
from vmbk.records import Record, make
from vmbk.tree import names, ops
from vmbk.virt import backupjob
from vmbk.virt.connection import libvirt_module

log = logging.getLogger("vmbk.backup")


@dataclasses.dataclass(frozen=True)
class Options:
    backup_path: Path
    compression: int | None = None
    fstrim: bool = True
    dry_run: bool = False
    cancel: Cancel | None = None
    progress: Board | None = None


def _copy(job: DiskJob, board: Board | None, label: str) -> DiskResult:
    if board is None:
        return backup_disk(job)
    progress = board.callback(label)
    try:
        return backup_disk(job, progress)
    finally:
        progress.finish()


def _online_copy(job: DiskJob, board: Board | None, label: str, cancel: Cancel) -> DiskResult:
    return _copy(dataclasses.replace(job, cancel=cancel), board, label)


def _offline_copy(target: str, image: str, fmt: str, path: Path, compression: int | None,
                  board: Board | None, label: str, cancel: Cancel) -> DiskResult:
    with qemu_nbd_export(image, fmt) as address:
        job = DiskJob(target, address, "copy", path, disk_format=fmt, compression=compression, cancel=cancel)
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


def _lookup(conn: Any, plan: Record) -> Any:
    libvirt = libvirt_module()
    name = plan["name"]
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError:
        raise VmError(f"VM {name!r} not found", vm=name) from None


def _prepare(plan: Record, vm_dir: Path, dom: Any, out: Outcome) -> None:
    name = plan["name"]
    removed = ops.cleanup_partials(vm_dir, list(plan.get("cleanup") or []), name)
    for rel in removed:
        out.events.append({"event": "cleaned", "directory": rel, "reason": "leftover .partial file"})
    if plan.get("archive"):
        dst = ops.archive_chain(vm_dir, plan["archive_from"], plan["archive_to"], name)
        out.events.append({"event": "archived", "directory": str(dst), "reason": "; ".join(plan.get("reasons") or [])})
    target_dir = ops.inside(vm_dir, plan["target"], name)
    done: list[str] = []
    for cp in plan.get("redefine_checkpoints") or []:
        xml = (target_dir / names.checkpoint_xml_name(cp)).read_text()
        try:
            backupjob.redefine_checkpoint(dom, xml)
        except backupjob.RedefineFailed:
            for undo in done:  # leave libvirt as we found it
                with contextlib.suppress(VmbkError):
                    backupjob.delete_checkpoint(dom, undo, metadata_only=True)
            raise
        done.append(cp)
        out.events.append({"event": "redefined", "directory": plan["target"], "reason": f"checkpoint {cp}"})
    for cp in plan.get("delete_checkpoints") or []:
        backupjob.delete_checkpoint(dom, cp)


def _disk_sources(plan: Record) -> dict[str, dict[str, Any]]:
    vm = plan.get("vm") or {}
    return {d["target"]: d for d in vm.get("disks") or [] if d.get("target")}


def _copy_online(dom: Any, plan: Record, target_dir: Path, opts: Options, out: Outcome) -> None:
    modes = {d["target"]: d["mode"] for d in plan["disks"]}
    wanted = [t for t, m in modes.items() if m != "skip"]
    sources = _disk_sources(plan)
    skip = [t for t, m in modes.items() if m == "skip" and sources.get(t, {}).get("device", "disk") == "disk"]
    cp_disks = [t for t, m in modes.items() if m in ("full", "inc")]
    checkpoint = plan.get("checkpoint") if plan["action"] in ("full", "inc") else None
    parent = plan.get("parent") if plan["action"] == "inc" else None
    agent = bool((plan.get("vm") or {}).get("agent"))
    if opts.fstrim and agent and (plan.get("vm") or {}).get("fstrim", True):
        _fstrim(dom)
    with libvirt_export(dom, disks=wanted, skip=skip, checkpoint=checkpoint, parent=parent,
                        checkpoint_disks=cp_disks, agent=agent) as (addresses, consistency):
        out.consistency = consistency
        if checkpoint:
            out.files.append(sidefiles.write_checkpoint_xml(
                target_dir, checkpoint, dom.checkpointLookupByName(checkpoint).getXMLDesc(0)))
        jobs: list[Callable[[Cancel], DiskResult]] = []
        for target in wanted:
            level = modes[target]
            path = target_dir / names.data_name(target, level, checkpoint)
            out.files += [path, path.with_name(names.chksum_name(path.name))]
            job = DiskJob(target, addresses[target], level, path,
                          disk_format=sources.get(target, {}).get("format") or "qcow2",
                          checkpoint=checkpoint or "", parent=parent or "",
                          dirty_bitmap=f"backup-{target}" if level == "inc" else None,
                          compression=opts.compression)
            jobs.append(functools.partial(_online_copy, job, opts.progress, f"{dom.name()}/{target}"))
        out.disks += _all_disks(jobs, opts.cancel)


def _copy_offline(plan: Record, target_dir: Path, opts: Options, out: Outcome) -> None:
    sources = _disk_sources(plan)
    out.consistency = "offline"
    jobs: list[Callable[[Cancel], DiskResult]] = []
    for d in plan["disks"]:
        if d["mode"] == "skip":
            continue
        src = sources.get(d["target"], {})
        if not src.get("source") or src.get("type") not in ("file", "block"):
            raise VmError(f"disk {d['target']}: no file or block device to copy", vm=plan["name"])
        fmt = src.get("format") or "raw"
        path = target_dir / names.data_name(d["target"], "copy", None)
        out.files += [path, path.with_name(names.chksum_name(path.name))]
        jobs.append(functools.partial(_offline_copy, d["target"], src["source"], fmt, path, opts.compression,
                                      opts.progress, f"{plan['name']}/{d['target']}"))
    out.disks += _all_disks(jobs, opts.cancel)


def _fstrim(dom: Any) -> None:
    libvirt = libvirt_module()
    try:
        dom.fSTrim(None, 0, 0)
    except libvirt.libvirtError as e:
        log.warning("%s: fstrim failed (backup goes on): %s", dom.name(), e.get_error_message())


def _side_files(dom: Any, plan: Record, target_dir: Path, out: Outcome) -> None:
    name = plan["name"]
    level = plan["action"]
    checkpoint = plan.get("checkpoint") if level in ("full", "inc") else None
    tag = names.ident(level, checkpoint)
    libvirt = libvirt_module()
    xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) if dom.isPersistent() else dom.XMLDesc(0)
    out.files.append(sidefiles.write_vmconfig(target_dir, tag, xml))
    sources = _disk_sources(plan)
    for r in out.disks:
        src = sources.get(r.target, {})
        if src.get("source"):
            with contextlib.suppress(VmbkError):  # informational: never fail a backup for it
                out.files.append(sidefiles.write_qemu_info(target_dir, r.target, tag, src["source"], src.get("format")))
    vm = plan.get("vm") or {}
    nvram = (vm.get("firmware") or {}).get("nvram")
    if nvram and os.path.exists(nvram):
        out.files.append(sidefiles.copy_nvram(target_dir, nvram, tag, level))
    tpm = vm.get("tpm") or {}
    if tpm.get("state_dir") and os.path.isdir(tpm["state_dir"]):
        sidefiles.save_tpm_state(target_dir, Path(tpm["state_dir"]))
    if level in ("full", "inc") and vm.get("agent") and (vm.get("windows") or vm.get("tpm")):
        bitlocker.save_recovery_keys(dom, target_dir)
    if checkpoint:
        sidefiles.append_cpt(target_dir, name, checkpoint)


def _undo(dom: Any, plan: Record, out: Outcome, created_checkpoint: bool) -> None:
    for path in out.files:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    if created_checkpoint and plan.get("checkpoint"):
        with contextlib.suppress(VmbkError):
            backupjob.delete_checkpoint(dom, plan["checkpoint"])


ACTIONS = ("full", "inc", "copy", "skip")
DISK_MODES = ("full", "inc", "copy", "skip")


def check_plan(plan: Record) -> str:
    """The VM name of a plan record that has what a backup needs.

    Plans may be saved and hand-edited (vmbk-json(7)); a broken one fails
    its VM with an ``input`` error, not the stage.
    """
    name = plan.get("name")
    vm = name if isinstance(name, str) and name else None
    def bad(why: str) -> InputError:
        return InputError(f"plan record{' of ' + repr(vm) if vm else ''}: {why}", vm=vm or "?")
    if vm is None:
        raise bad("'name' must be a non-empty string")
    if plan.get("action") not in ACTIONS:
        raise bad(f"'action' must be one of {', '.join(ACTIONS)}")
    if plan["action"] == "skip":
        return vm
    if not isinstance(plan.get("target"), str):
        raise bad("'target' (the chain directory, relative to the VM's) is missing")
    disks = plan.get("disks")
    if not isinstance(disks, list) or not all(
        isinstance(d, dict) and isinstance(d.get("target"), str) and d.get("mode") in DISK_MODES for d in disks
    ):
        raise bad("'disks' must be a list of {target, mode}")
    if plan["action"] in ("full", "inc") and not isinstance(plan.get("checkpoint"), str):
        raise bad("a full or incremental backup needs 'checkpoint'")
    if plan["action"] == "inc" and not isinstance(plan.get("parent"), str):
        raise bad("an incremental backup needs 'parent'")
    return vm


def backup_vm(plan: Record, conn: Any, opts: Options, session: str) -> Record:
    """Back one VM up as ``plan`` says; return its ``backup`` record."""
    name = check_plan(plan)
    started = time.monotonic()
    base = make("backup", session, name=name, action=plan["action"], period=plan.get("period"),
                target_dir=plan.get("target_dir"), checkpoint=plan.get("checkpoint"), parent=plan.get("parent"),
                reasons=plan.get("reasons") or [])
    if plan["action"] == "skip":
        return {**base, "outcome": "skipped", "consistency": None, "disks": [], "bytes": 0, "duration": 0.0}
    if opts.dry_run:
        return {**base, "outcome": "dry-run", "consistency": None, "disks": plan["disks"], "bytes": 0, "duration": 0.0}
    vm_dir = opts.backup_path / name
    target_dir = ops.inside(vm_dir, plan["target"], name) if plan.get("target") else vm_dir
    out = Outcome()
    dom = _lookup(conn, plan)
    online = plan["action"] in ("full", "inc")
    with VmLock(opts.backup_path, name, purpose="backup"):
        ensure_dir(vm_dir)
        if online and (stale := backupjob.clear_stale_job(dom)):
            out.events.append({"event": "cleaned", "directory": plan.get("target"),
                               "reason": f"backup job left running by a vmbk-backup that did not finish ({stale})"})
        _prepare(plan, vm_dir, dom, out)
        ensure_dir(target_dir)
        created = False
        try:
            if online:
                if not dom.isActive():
                    raise VmError(f"VM {name!r} is not running: plan again", vm=name)
                created = bool(plan.get("checkpoint"))
                _copy_online(dom, plan, target_dir, opts, out)
            else:
                if dom.isActive():
                    raise VmError(f"VM {name!r} is running: a copy backup needs it shut off; plan again", vm=name)
                _copy_offline(plan, target_dir, opts, out)
            _side_files(dom, plan, target_dir, out)
        except BaseException as e:
            _undo(dom, plan, out, created)
            if isinstance(e, VmbkError) and e.vm is None:
                e.vm = name
            raise
    disks = [{"target": r.target, "level": r.level, "path": str(r.path), "virtual_size": r.virtual_size,
              "data_size": r.data_size, "stored_size": r.stored_size, "checksum": r.checksum,
              "seconds": round(r.seconds, 3)} for r in out.disks]
    return {**base, "outcome": "ok", "consistency": out.consistency, "disks": disks,
            "bytes": sum(r.stored_size for r in out.disks), "duration": round(time.monotonic() - started, 3),
            "events": out.events}
