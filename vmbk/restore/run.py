"""One restore, start to end: lock, plan, checks, write, commit, define, record.

Order and why:

1. the VM's lock (`vmbk.lock`, the file vmbackup/vmrestore use; guide, 2
   "Concurrency"), so a backup cannot archive or extend the chain being
   read; the tree is scanned under it.  A read-only backup mount (a
   recovery host) cannot hold a lock file and cannot be written by a
   backup either: the restore then goes on without one;
2. the plan and its checks (`vmbk.restore.preflight`), then the ones that need
   libvirt: output files that are disks of defined domains, a clone name
   already taken (`vmbk.restore.livedisks`, `vmbk.restore.clone`);
3. the ``.chksum`` of every stream the restore reads, checked while the
   disk is written (a thread beside the writer, `vmbk.restore.checker`;
   raw images: before): a flipped payload byte is otherwise invisible,
   and a mismatch fails the disk before anything is committed;
4. every disk built as ``.partial`` (`vmbk.restore.image`), the clone's
   NVRAM and XML staged the same way; any failure or signal removes all
   of them, so nothing half-written is left;
5. commit (renames; in place: `vmbk.restore.inplace.swap`, all disks or
   none), define the VM, put its TPM state back (`vmbk.restore.tpm`: a
   failure there makes the restore partial, exit 9, the disks stay), and
   refresh the storage pool that holds the files (`vmbk.restore.pools`);
6. a ``restore_sessions`` row (`vmbk.restore.history`) when the catalogue
   exists, whatever the outcome.  ``--dry-run`` takes no lock, writes
   nothing and raises the first failed check after its records.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vmbk.clock import now_iso
from vmbk.errors import StorageError, UsageError, VmbkError, VmError
from vmbk.lock import VmLock, lock_dir
from vmbk.records import Record, error_record
from vmbk.restore import (crosshost, define, domainxml, history, image, inplace, livedisks, pools, remap, remote,
                          report, resume, tpm)
from vmbk.restore.preflight import RestoreOptions, RestorePlan, check_existing, check_space, make_plan
from vmbk.restore.source import SourceRef, load
from vmbk.virt import hold
from vmbk.virt.connection import open_connection
from vmbk.virt.hostfiles import LOCAL, HostFiles, RemoteFiles, files_for
from vmbk.virt.remote import is_remote

log = logging.getLogger("vmbk.restore")

Emit = Callable[[Record], None]


def restore(ref: SourceRef, opts: RestoreOptions, *, uri: str | None, session: str | None, emit: Emit) -> None:
    """Restore as ``opts`` says, emitting ``restore_disk`` and ``restore`` records."""
    if opts.dry_run:
        _dry_run(ref, opts, uri=uri, session=session, emit=emit)
        return
    if is_remote(uri) and opts.mode == "inplace":
        raise UsageError(f"an in-place disk restore onto {uri} is not built: --restore-path DIR (on that host) "
                         "restores the disks beside")
    started_at, t0 = now_iso(), time.monotonic()
    plan: RestorePlan | None = None
    resuming: resume.Resuming | None = None
    try:
        with vm_lock(ref), _host_files(uri) as files:
            source = load(ref)
            with _connection(uri, required=opts.defines or opts.mode == "inplace", write=True) as conn:
                healed = hold.heal_named(conn, source.vm)  # the pause/freeze a killed vmbk left
                opts, verdict = _cross_host(source, opts, conn, files)
                if verdict is not None:
                    verdict.raise_if_problems(source.vm, _host_label(uri))
                plan = _on_host(_with_remaps(make_plan(source, opts, _current(conn, source.vm, opts)), verdict),
                                files, opts)
                if opts.resume:
                    resume.single_use(plan, opts)
                replace = preflight(plan, conn, opts, files)
                resuming = resume.prepare(plan, conn, _domain_xml(plan, opts, verdict)[0]) if opts.resume else None
                if isinstance(files, RemoteFiles):  # another host: its files over ssh (vmbk.restore.remote)
                    xml, warnings = _domain_xml(plan, opts, verdict)
                    outcome = remote.execute(plan, conn, opts, replace, xml, warnings, files)
                else:
                    outcome = _execute(plan, conn, opts, replace, verdict)
                outcome.warnings[:0] = healed
                _after(plan, conn, outcome, files)
                if resuming is not None:  # the disks of that point are in place: its state now (restore/resume)
                    outcome.resumed = resuming.resume(conn)
    except BaseException as e:
        if resuming is not None:
            resuming.discard()
        history.record(ref, opts, plan, started_at, t0, e)
        raise
    history.record(ref, opts, plan, started_at, t0, outcome.tpm_error)
    seconds = time.monotonic() - t0
    for job, built in zip(plan.jobs, outcome.built, strict=True):
        emit(report.disk_record(plan, job, session, "ok", built, outcome.swapped.get(job.disk)))
    emit(report.summary(plan, session, "partial" if outcome.tpm_error else "ok", outcome, seconds))
    if outcome.tpm_error is not None:
        emit(error_record(outcome.tpm_error, stage="restore", session=session, vm=plan.source.vm))


def _current(conn: Any, vm: str, opts: RestoreOptions) -> dict[str, inplace.CurrentDisk] | None:
    return inplace.current_disks(conn, vm) if opts.mode == "inplace" else None


def _dry_run(ref: SourceRef, opts: RestoreOptions, *, uri: str | None, session: str | None, emit: Emit) -> None:
    """The whole plan as records; the first failed check is raised afterwards."""
    source = load(ref)
    failed: list[VmbkError] = []
    # read-write when it can be had: a read-only connection hides the domain
    # capabilities the cross-host checks need, and the dry run must check what the restore will
    with _connection(uri, required=opts.mode == "inplace", write=True) as conn, _host_files(uri) as files:
        opts, verdict = _cross_host(source, opts, conn, files)
        if verdict is not None and verdict.problems:
            failed += [remap.PreflightError(str(p), vm=source.vm) for p in verdict.problems]
        plan = _with_remaps(make_plan(source, opts, _current(conn, source.vm, opts)), verdict)
        try:
            plan = _on_host(plan, files, opts)
            if opts.resume:
                resume.single_use(plan, opts)
            preflight(plan, conn, opts, files)
        except VmbkError as e:
            failed.append(e)
        if opts.resume:
            try:
                _st, problems = resume.check(plan, conn, _domain_xml(plan, opts, verdict)[0])
                failed += [resume.StateError(p, vm=source.vm) for p in problems]
            except VmbkError as e:
                failed.append(e)
    for job in plan.jobs:
        emit(report.disk_record(plan, job, session, "dry-run", None))
    emit(report.summary(plan, session, "dry-run", report.Outcome(), 0.0, blocked=[str(e) for e in failed]))
    if failed:
        raise failed[0]


@contextlib.contextmanager
def vm_lock(ref: SourceRef) -> Iterator[None]:
    """The VM's lock (module doc, 1); none on a read-only backup mount. --serve, --mount and --instant take it too."""
    probe = lock_dir(ref.backup_path)
    while not probe.exists() and probe != ref.backup_path:
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        log.warning("%s is not writable (a read-only backup mount?): restoring without the VM lock", probe)
        yield
        return
    with VmLock(ref.backup_path, ref.vm, purpose="restore"):
        yield


@contextlib.contextmanager
def _connection(uri: str | None, *, required: bool, write: bool) -> Iterator[Any]:
    """libvirt: read-write when the restore needs it, else optional.

    ``write``: read-write if it can be had (a storage pool refresh needs
    it), read-only else; ``required``: no connection is an error.
    """
    conn = None
    if uri is not None:
        if required:
            conn = open_connection(uri, readonly=not write)
        else:
            for readonly in (False, True) if write else (True,):
                try:
                    conn = open_connection(uri, readonly=readonly)
                    break
                except VmbkError as e:
                    if readonly:
                        log.warning("%s: files of defined domains are not checked", e)
    try:
        yield conn
    finally:
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()


def preflight(plan: RestorePlan, conn: Any, opts: RestoreOptions, files: HostFiles = LOCAL) -> bool:
    """All checks; True when a shut-off namesake must be undefined first.

    The VM's name first (a VM problem), then files of domains, then files
    that exist, then space (storage problems).
    """
    replace = False
    if conn is not None:
        if opts.defines:
            uuid = plan.config.uuid if plan.mode == "dr" and plan.config is not None else None
            replace = define.check_defined(conn, plan.name, force=opts.force, uuid=uuid)
        replaceable = plan.name if opts.defines else plan.source.vm
        livedisks.check_targets(plan.targets, livedisks.files_in_use(conn), replaceable=replaceable,
                                force=opts.force or plan.mode == "inplace")
    if not isinstance(files, RemoteFiles):  # else _on_host checked the host's files
        check_existing(plan, force=opts.force)
        check_space(plan)
    return replace


@contextlib.contextmanager
def _host_files(uri: str | None) -> Iterator[HostFiles]:
    """The files of the host the restore writes to: here, or over ssh (one control master per restore)."""
    files = files_for(uri) if uri is not None and is_remote(uri) else LOCAL
    try:
        yield files
    finally:
        files.close()


def _on_host(plan: RestorePlan, files: HostFiles, opts: RestoreOptions) -> RestorePlan:
    """Another host's: its files and free space checked there (`vmbk.restore.remote`)."""
    return remote.on_host(plan, files, force=opts.force) if isinstance(files, RemoteFiles) else plan


def _cross_host(source: Any, opts: RestoreOptions, conn: Any,
                files: HostFiles) -> tuple[RestoreOptions, crosshost.Verdict | None]:
    """The target's preflight (`vmbk.restore.crosshost`); the options with the disks' places."""
    if conn is None or not opts.defines:
        if opts.restore_path is None and opts.mode in ("dr", "clone"):
            raise UsageError("--restore-path is required without a libvirt connection (the disks' places "
                             "are looked up on the host)")
        return opts, None
    verdict = crosshost.check(source, opts, conn, files)
    if verdict is not None and verdict.placements:
        opts = dataclasses.replace(opts, placements=tuple(verdict.placements.items()))
    elif verdict is not None and opts.restore_path is None and not verdict.problems:
        raise UsageError("--restore-path is required: the backup does not say where the disks were")
    return opts, verdict


def _with_remaps(plan: RestorePlan, verdict: crosshost.Verdict | None) -> RestorePlan:
    return dataclasses.replace(plan, remaps=verdict.remaps) if verdict is not None else plan


def _host_label(uri: str | None) -> str:
    return uri if uri and is_remote(uri) else "this host"


def _execute(plan: RestorePlan, conn: Any, opts: RestoreOptions, replace: bool,
             verdict: crosshost.Verdict | None = None) -> report.Outcome:
    out = report.Outcome()
    if opts.verify:  # raw images first; qcow2 ones are checked while they are written
        out.unchecked = image.verify_sources(p for j in plan.jobs if j.disk in plan.raw for p in j.sources)
    staged: list[tuple[Path, Path]] = []
    xml = ""
    try:
        if plan.mode != "inplace":
            make_dirs(plan.restore_path)
        for job in plan.jobs:
            built = inplace.build_raw(job) if job.disk in plan.raw else image.build(job, verify=opts.verify)
            out.built.append(built)
            out.unchecked += [p for p in built.unchecked if p not in out.unchecked]
        nvram_src, nvram_dst = plan.nvram_source, plan.nvram_target
        if nvram_src is not None and nvram_dst is not None:
            make_dirs(nvram_dst.parent)
            _stage(staged, nvram_dst, lambda p: shutil.copyfile(nvram_src, p))
        if opts.defines and plan.config is not None and plan.xml_target is not None:
            xml, out.warnings = _domain_xml(plan, opts, verdict)
            _stage(staged, plan.xml_target, lambda p: p.write_text(xml, encoding="utf-8"))
        out.saved = save_aside(plan.aside)
        if replace:
            define.undefine(conn, plan.name, keep_state=plan.mode == "dr")
    except BaseException as e:
        image.discard(plan.jobs)
        for partial in [p for p, _final in staged] + out.saved:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
        if isinstance(e, OSError):
            raise StorageError(f"{e.filename or plan.restore_path}: {e.strerror or e}") from None
        raise
    if plan.mode == "inplace":
        out.swapped = {s.disk: s for s in inplace.swap(plan.jobs, keep=plan.pre_restore)}
        return out
    try:
        image.commit(plan.jobs)
        for partial, final in staged:
            os.replace(partial, final)
    except OSError as e:
        raise StorageError(f"renaming the restored files in {plan.restore_path}: {e.strerror or e}") from None
    if opts.defines:
        out.domain = define.define(conn, xml, plan.name,
                                   kept=f"in {plan.restore_path} (virsh define {plan.xml_target})")
    return out


def _domain_xml(plan: RestorePlan, opts: RestoreOptions, verdict: crosshost.Verdict | None) -> tuple[str, list[str]]:
    """The XML to define and its warnings ("" when the restore defines nothing)."""
    if not opts.defines or plan.config is None or plan.xml_target is None:
        return "", []
    xml, warnings = domainxml.restored_xml(
        plan.config.xml, disks={j.disk: j.target for j in plan.jobs}, nvram=plan.nvram_target,
        new_name=plan.name if plan.mode == "clone" else None)
    if verdict is not None:  # onto the host's networks, firmware, machine types (crosshost)
        xml = verdict.apply(xml, tpm=not opts.skip_tpm)
    return xml, warnings


def _after(plan: RestorePlan, conn: Any, out: report.Outcome, files: HostFiles = LOCAL) -> None:
    """Once the files are in place: TPM state, then the storage pool."""
    if plan.tpm_source is not None:
        uuid = (out.domain or {}).get("uuid") or (plan.config.uuid if plan.config else None)
        try:
            if not uuid:
                raise VmError("the restored VM's UUID is unknown", vm=plan.source.vm)
            out.tpm, out.tpm_saved = (remote.put_tpm(files, plan.tpm_source, uuid) if isinstance(files, RemoteFiles)
                                      else tpm.restore(plan.tpm_source, uuid))
        except (OSError, ValueError, VmbkError) as e:
            why = getattr(e, "strerror", None) or str(e)
            out.tpm_error = StorageError(
                f"the disks are restored but the TPM state is not ({why}): a guest with BitLocker will ask for "
                f"its recovery key (tpm-state/bitlocker-recovery-keys.txt in the backup, if it was saved)",
                vm=plan.source.vm)
    refreshed, warnings = pools.refresh(conn, plan.targets)
    out.pools, out.warnings = refreshed, out.warnings + warnings


def save_aside(paths: tuple[Path, ...]) -> list[Path]:
    """Copy each existing file to ``<file>.before-restore.<timestamp>`` (guide, 12)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    saved = []
    for path in paths:
        if path.exists():
            copy = path.with_name(f"{path.name}.before-restore.{stamp}")
            shutil.copy2(path, copy)
            saved.append(copy)
    return saved


def make_dirs(path: Path) -> None:
    """Create the restore path, traversable (0755) whatever the umask.

    QEMU runs as another user (libvirt-qemu) and must reach the images;
    libvirt's dynamic ownership gives it the 0600 images themselves when
    the domain starts, but not the directories above them.
    """
    missing = []
    probe = Path(os.path.abspath(path))
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(d, 0o755)
            os.chmod(d, 0o755)


def _stage(staged: list[tuple[Path, Path]], final: Path, write: Callable[[Path], object]) -> None:
    """Write ``final.partial`` (listed first, so a failed write is cleaned up too)."""
    partial = final.with_name(final.name + ".partial")
    staged.append((partial, final))
    write(partial)
    os.chmod(partial, image.IMAGE_MODE)
