"""``--instant``: the VM runs from its backup in seconds, then moves to local disks while it runs.

Each disk of the point is served (`vmbk.restore.serve`) on a socket only
QEMU's user can reach, and the VM -- the point's domain XML, disaster
recovery or a clone (``--name``) exactly as a restore makes it
(`vmbk.restore.preflight`, `vmbk.restore.domainxml`) -- gets per disk a
small qcow2 overlay in ``--restore-path`` whose backing file is the
export (``<backingStore type='network'>`` with ``protocol='nbd'``, and
the same URI in the overlay's header).  Reads of what the guest has not
written come from the backup; writes stay in the overlay; nothing of the
disk's size is copied before it boots.

Then (`vmbk.restore.move`) libvirt copies every disk under the running
VM to the file a restore would write (``NAME.qcow2``...), pivots to it
once it has caught up, and the export stops: the VM never stops, and
the record says when it was usable and when it became independent of the
backup.  ``--no-move`` keeps it on the export until SIGINT, SIGTERM or
``--timeout`` and then destroys it (a quick look): it is started with
libvirt's autodestroy, so a killed vmbk-restore takes it along, and it
gets no TPM state and no NVRAM outside ``--restore-path``.

**Transient until independent.**  The VM is started as a transient
domain and defined (made persistent, its definition written as
``NAME.xml`` too) only after the pivot: a libvirt definition never names
an overlay of an export that may be gone.  Order (`vmbk.restore.marker`
names it all first):

1. sweep what killed sessions left; under the VM's lock: the plan and the
   checks of a restore (names, collisions, free space for the copies),
   the streams' ``.chksum``, the streams opened; the lock is released;
2. the marker; the server; the overlays; the NVRAM (disaster recovery:
   the current file saved aside first, as a restore does); a shut-off
   namesake undefined (``--force``); the TPM state; the VM started;
3. the copies, the pivots, the definition; the export stops, the
   overlays go, the marker last.

A failure or signal before the pivots ends the copies, destroys the VM
and removes the overlays, the unfinished copies, the NVRAM copy and the
TPM state it put back (the saved ones return).  **If the export dies
before the pivot** -- vmbk-restore killed, the host's disk gone -- QEMU's
NBD client fails every read of the backing file, so the guest sees I/O
errors on what it had not read yet, never other data; the copy fails the
same way and is never pivoted to.  The next ``--serve``/``--mount``/
``--instant`` run destroys a VM still on overlays of a dead session and
removes its overlays and unfinished copies; a VM already pivoted is left
alone.  The copies get qemu's default qcow2 options (libvirt creates
them), not those of the backup's ``qcow.json``.  A file a copy replaces
(``--force``) waits as ``<file>.pre-instant`` until the move is done,
and is put back if it fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pwd
import shutil
import subprocess
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from vmbk.clock import now_iso
from vmbk.errors import StorageError, VmbkError, VmError
from vmbk.nbd.server import Server
from vmbk.progress import board_for
from vmbk.records import Record, make
from vmbk.restore import define, domainxml, history, livedisks, marker, mount, move, pools, tpm
from vmbk.restore.preflight import RestoreOptions, RestorePlan, make_plan
from vmbk.restore.report import point_fields
from vmbk.restore.run import make_dirs, preflight, save_aside, vm_lock
from vmbk.restore.serve import Opened, deferred_signals, until_stopped, verify_streams
from vmbk.restore.source import SourceRef, load
from vmbk.stream.chainread import ChainImage
from vmbk.virt import backupjob, hold
from vmbk.virt.connection import LibvirtError, libvirt_module, open_connection

log = logging.getLogger("vmbk.restore")

Emit = Callable[[Record], None]
Say = Callable[[str], None]
KIND = "instant"
OVERLAY_SUFFIX = ".instant"
#: An existing target (``--force``) waits here until the move is done, and comes back if it fails.
ASIDE_SUFFIX = ".pre-instant"


@dataclasses.dataclass(frozen=True)
class InstantOptions:
    #: Copy the disks to local files and pivot (False: ``--no-move``).
    move: bool = True
    bandwidth_mib: int = 0
    timeout: float | None = None


@dataclasses.dataclass
class _Made:
    """What this session created, for the way back."""

    overlays: list[Path] = dataclasses.field(default_factory=list)
    nvram: Path | None = None
    nvram_saved: list[Path] = dataclasses.field(default_factory=list)
    tpm: tuple[Path, Path | None] | None = None
    dom: Any = None
    copying: list[str] = dataclasses.field(default_factory=list)
    targets: list[Path] = dataclasses.field(default_factory=list)
    #: Files a --force replaces: (target, where it waits until the move is done).
    displaced: list[tuple[Path, Path]] = dataclasses.field(default_factory=list)


def overlay_path(target: Path) -> Path:
    return target.with_name(target.name + OVERLAY_SUFFIX)


def instant(ref: SourceRef, opts: RestoreOptions, iopts: InstantOptions, *, uri: str, session: str | None,
            emit: Emit, say: Say, sweep: Callable[[], list[str]] = lambda: [], progress: IO[str] | None = None) -> None:
    """Run the VM of the point from the backup, then move it (module doc)."""
    t0, started_at = time.monotonic(), now_iso()
    for line in sweep():
        say(f"removed what a killed session left: {line}")
    plan: RestorePlan | None = None
    conn = open_connection(uri)
    try:
        with vm_lock(ref):
            source = load(ref)
            healed = hold.heal_named(conn, source.vm)
            plan = make_plan(source, opts)
            replace = preflight(plan, conn, opts) if iopts.move else _quick_look_checks(plan, conn)
            opened = _open(plan, opts)
        try:
            _Session(plan, opts, iopts, conn, opened, replace, healed, t0).run(session, emit, say, progress)
        finally:
            opened.close()
    except BaseException as e:
        history.record(ref, opts, plan, started_at, t0, e)
        raise
    finally:
        with contextlib.suppress(Exception):
            conn.close()
    history.record(ref, opts, plan, started_at, t0, None)


def _quick_look_checks(plan: RestorePlan, conn: Any) -> bool:
    """--no-move writes no disk and replaces no VM: the name must be free, the overlays absent."""
    uuid = plan.config.uuid if plan.mode == "dr" and plan.config is not None else None
    try:
        define.check_defined(conn, plan.name, force=False, uuid=uuid)
    except VmError as e:
        raise VmError(f"{e} (--no-move never replaces a VM: give the quick look another --name)",
                      vm=plan.source.vm) from None
    for job in plan.jobs:
        if overlay_path(job.target).exists():
            raise StorageError(f"{overlay_path(job.target)} exists (another --instant of this VM?)")
    return False


def _open(plan: RestorePlan, opts: RestoreOptions) -> Opened:
    t = time.monotonic()
    streams = [(p, j.digests[i] if j.digests else None) for j in plan.jobs for i, p in enumerate(j.sources)]
    unchecked = verify_streams(streams, tolerate=opts.force) if opts.verify else []
    seconds = time.monotonic() - t
    images: dict[str, ChainImage] = {}
    try:
        for job in plan.jobs:
            images[job.disk] = ChainImage(job.sources)
    except BaseException:
        for img in images.values():
            img.close()
        raise
    return Opened(plan.source, plan.point, images, unchecked, seconds, list(plan.warnings))


class _Session:
    def __init__(self, plan: RestorePlan, opts: RestoreOptions, iopts: InstantOptions, conn: Any, opened: Opened,
                 replace: bool, healed: list[str], t0: float) -> None:
        self.plan, self.opts, self.iopts, self.conn, self.opened = plan, opts, iopts, conn, opened
        self.replace, self.t0 = replace, t0
        self.warnings = list(healed)
        config = plan.config
        assert config is not None
        self.uuid = config.uuid if plan.mode == "dr" and config.uuid else str(uuidlib.uuid4())
        self.made = _Made()
        self.usable: float | None = None
        self.usable_at: str | None = None
        self.pools: list[str] = []

    def run(self, session: str | None, emit: Emit, say: Say, progress: IO[str] | None) -> None:
        plan = self.plan
        mark = marker.Marker(KIND, {
            "vm": plan.source.vm, "name": plan.name, "uuid": self.uuid, "move": self.iopts.move,
            "overlays": [str(overlay_path(j.target)) for j in plan.jobs],
            "targets": [str(j.target) for j in plan.jobs]})
        rundir = _rundir(mark.id)
        independent: float | None = None
        try:
            rundir.mkdir(mode=0o700)
            qemu = _qemu_ids()
            if qemu is not None:
                os.chown(rundir, *qemu)
            server = Server(self.opened.exports(), unix=rundir / "nbd.sock", owner=qemu).start()
            try:
                self._start(server, say)
                if not self.iopts.move:
                    emit(self._record(session, server, None))
                    until_stopped(self.iopts.timeout, say, f"{plan.name} runs on the backup")
                    return
                self._move(progress)
                independent = time.monotonic() - self.t0
                say(f"{plan.name} is independent of the backup after {independent:.1f} s: its disks are "
                    f"{', '.join(str(j.target) for j in plan.jobs)}")
            finally:
                with deferred_signals():
                    server.stop()
            self._finish()
            emit(self._record(session, server, independent))
        finally:
            with deferred_signals():
                if independent is None:
                    self._undo()
                shutil.rmtree(rundir, ignore_errors=True)
                mark.release()

    # --- up to a running VM ---

    def _start(self, server: Server, say: Say) -> None:
        plan, made = self.plan, self.made
        make_dirs(plan.restore_path)
        disks = {}
        for job in plan.jobs:
            if self.iopts.move and (job.target.exists() or job.target.is_symlink()):
                aside = job.target.with_name(job.target.name + ASIDE_SUFFIX)  # --force: back if the move fails
                os.replace(job.target, aside)
                made.displaced.append((job.target, aside))
            overlay = overlay_path(job.target)
            _create_overlay(overlay, server.uri(job.disk), job.virtual_size)
            made.overlays.append(overlay)
            disks[job.disk] = overlay
        nvram = self._nvram()
        assert plan.config is not None
        xml, warnings = domainxml.restored_xml(plan.config.xml, disks=disks, nvram=nvram,
                                               new_name=plan.name if plan.mode == "clone" else None)
        self.warnings += warnings
        xml = backed_by_export(xml, {d: (server.unix, d) for d in disks}, uuid=self.uuid)
        if self.replace:
            define.undefine(self.conn, plan.name, keep_state=plan.mode == "dr")
        if plan.tpm_source is not None and self.iopts.move:
            made.tpm = tpm.restore(plan.tpm_source, self.uuid)
        elif plan.tpm_source is not None:
            self.warnings.append("--no-move: the backup's TPM state is not put back (a BitLocker guest asks for its "
                                 "recovery key)")
        libvirt = libvirt_module()
        flags = 0 if self.iopts.move else libvirt.VIR_DOMAIN_START_AUTODESTROY
        try:
            made.dom = self.conn.createXML(xml, flags)
        except libvirt.libvirtError as e:
            raise LibvirtError(f"cannot start {plan.name!r} on the backup: {e.get_error_message()}",
                               vm=plan.source.vm) from None
        self.usable, self.usable_at = time.monotonic() - self.t0, now_iso()
        say(f"{plan.name} runs on the backup after {self.usable:.1f} s"
            + ("; moving its disks to local files" if self.iopts.move else ""))

    def _nvram(self) -> Path | None:
        plan, made = self.plan, self.made
        src, dst = plan.nvram_source, plan.nvram_target
        if src is None or dst is None:
            return None
        if not self.iopts.move:  # a quick look touches nothing outside --restore-path
            dst = plan.restore_path / f"{plan.name}_VARS.fd{OVERLAY_SUFFIX}"
        else:
            made.nvram_saved = save_aside(tuple(a for a in plan.aside if a == dst))
        make_dirs(dst.parent)
        shutil.copyfile(src, dst)
        os.chmod(dst, 0o600)
        made.nvram = dst
        return dst

    # --- the move ---

    def _move(self, progress: IO[str] | None) -> None:
        made = self.made
        targets = {j.disk: j.target for j in self.plan.jobs}
        made.targets = list(targets.values())
        made.copying = list(targets)
        move.start(made.dom, targets, bandwidth=self.iopts.bandwidth_mib * 1024 * 1024)
        move.wait_and_pivot(made.dom, list(targets), board_for(progress) if progress is not None else None)
        made.copying = []

    def _finish(self) -> None:
        """Independent: defined persistently, NAME.xml written, overlays gone, the pool refreshed."""
        plan, made = self.plan, self.made
        libvirt = libvirt_module()
        try:
            xml = made.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
            self.conn.defineXML(xml)
        except libvirt.libvirtError as e:
            raise LibvirtError(f"{plan.name!r} runs on its local disks but could not be defined: "
                               f"{e.get_error_message()} (virsh dumpxml --inactive, then virsh define)",
                               vm=plan.source.vm) from None
        if plan.xml_target is not None:
            plan.xml_target.write_text(xml, encoding="utf-8")
            os.chmod(plan.xml_target, 0o600)
        for overlay in made.overlays:
            overlay.unlink(missing_ok=True)
        for _target, aside in made.displaced:
            aside.unlink(missing_ok=True)
        refreshed, warnings = pools.refresh(self.conn, plan.targets)
        self.pools = refreshed
        self.warnings += warnings

    # --- the way back ---

    def _undo(self) -> None:
        """Before independence: the VM, its overlays, its copies, NVRAM and TPM state (module doc)."""
        made = self.made
        libvirt = libvirt_module()
        if made.dom is not None:
            move.abort(made.dom, made.copying)
            with contextlib.suppress(libvirt.libvirtError):
                made.dom.destroy()
        for path in [*made.overlays, *made.targets]:
            path.unlink(missing_ok=True)
        for target, aside in made.displaced:
            with contextlib.suppress(OSError):
                os.replace(aside, target)
        if made.nvram is not None:
            made.nvram.unlink(missing_ok=True)
            for saved in made.nvram_saved:
                with contextlib.suppress(OSError):
                    os.replace(saved, made.nvram)
        if made.tpm is not None:
            restored, tpm_aside = made.tpm
            shutil.rmtree(restored, ignore_errors=True)
            if tpm_aside is not None:
                with contextlib.suppress(OSError):
                    os.rename(tpm_aside, restored)

    def _record(self, session: str | None, server: Server, independent: float | None) -> Record:
        plan, point = self.plan, self.plan.point
        dom = self.made.dom
        return make(
            "instant", session,
            vm=plan.source.vm,
            mode=plan.mode,
            name=plan.name,
            restore_path=str(plan.restore_path),
            **point_fields(point),
            domain={"name": dom.name(), "uuid": dom.UUIDString(), "persistent": bool(dom.isPersistent())},
            disks=[{"disk": j.disk, "target": str(j.target), "overlay": str(overlay_path(j.target)),
                    "uri": server.uri(j.disk), "virtual_size": j.virtual_size, "data_bytes": j.data_bytes}
                   for j in plan.jobs],
            moved=independent is not None,
            files=[str(j.target) for j in plan.jobs] + [str(p) for p in (self.made.nvram, plan.xml_target)
                                                         if p is not None and independent is not None],
            nvram=str(self.made.nvram) if self.made.nvram else None,
            tpm=str(self.made.tpm[0]) if self.made.tpm else None,
            usable_seconds=round(self.usable or 0.0, 3),
            usable_at=self.usable_at,
            independent_seconds=round(independent, 3) if independent is not None else None,
            independent_at=now_iso() if independent is not None else None,
            bandwidth_mib=self.iopts.bandwidth_mib or None,
            **self.opened.checked(self.opts.verify),
            pools=self.pools,
            warnings=[*self.opened.warnings, *self.warnings],
        )


def _rundir(ident: str) -> Path:
    return marker.run_dir() / f"{marker.PREFIX}{ident}.d"


def _qemu_ids() -> tuple[int, int] | None:
    """QEMU's user (it connects to the export's socket), or None when there is none or we are not root."""
    if os.geteuid() != 0:
        return None
    try:
        pw = pwd.getpwnam(backupjob.QEMU_USER)
    except KeyError:
        return None
    return pw.pw_uid, pw.pw_gid


def _create_overlay(path: Path, backing_uri: str, size: int) -> None:
    """A qcow2 of ``size`` whose header names the export (``-u``: not opened now)."""
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", backing_uri, str(path), str(size)]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise StorageError("qemu-img is not installed (apt-get install qemu-utils)") from None
    if r.returncode != 0:
        raise StorageError(f"cannot create the overlay {path}: {(r.stderr or r.stdout).strip()}")
    os.chmod(path, 0o600)


def backed_by_export(xml: str, exports: dict[str, tuple[Path | None, str]], *, uuid: str) -> str:
    """``xml`` whose disks (target dev -> (socket, export)) have the export as backing store.

    libvirt uses a ``<backingStore>`` given in the XML instead of probing
    the overlay's header; ``<uuid>`` is set (a clone's XML has none).
    """
    root = ET.fromstring(xml)
    for el in root.findall("uuid"):
        root.remove(el)
    uuid_el = ET.Element("uuid")
    uuid_el.text = uuid
    root.insert(1, uuid_el)
    for disk in root.findall("devices/disk"):
        target = disk.find("target")
        dev = target.get("dev") if target is not None else None
        if dev not in exports:
            continue
        sock, name = exports[dev]
        store = ET.SubElement(disk, "backingStore", {"type": "network"})
        ET.SubElement(store, "format", {"type": "raw"})
        source = ET.SubElement(store, "source", {"protocol": "nbd", "name": name})
        ET.SubElement(source, "host", {"transport": "unix", "socket": str(sock)})
        ET.SubElement(store, "backingStore")
    return ET.tostring(root, encoding="unicode")


# --- what killed sessions left ---

def sweep(conn: Any) -> list[str]:
    """Remove what killed ``--instant`` sessions left (module doc); what was removed, in words."""
    done: list[str] = []
    for path, data in marker.dead(KIND):
        try:
            overlays = [Path(p) for p in data.get("overlays", [])]
            if _destroy_if_on(conn, str(data["uuid"]), overlays):
                done.append(f"the VM {data.get('name')} running on the backup of a killed --instant")
            used = livedisks.files_in_use(conn)
            for p in overlays + [Path(t) for t in data.get("targets", [])]:
                if p.exists() and os.path.realpath(p) not in used:
                    p.unlink()
                    done.append(str(p))
            shutil.rmtree(_rundir(str(data["id"])), ignore_errors=True)
        except (KeyError, OSError, VmbkError) as e:
            log.warning("%s: cannot remove what a killed --instant left (%s); the next run tries again", path, e)
            continue
        path.unlink(missing_ok=True)
    return done


def _destroy_if_on(conn: Any, uuid: str, overlays: list[Path]) -> bool:
    """Destroy the domain of ``uuid`` if it still runs on one of ``overlays`` (not yet pivoted)."""
    libvirt = libvirt_module()
    try:
        dom = conn.lookupByUUIDString(uuid)
        xml = dom.XMLDesc(0)
    except libvirt.libvirtError:
        return False
    try:
        files = {el.get("file") for el in ET.fromstring(xml).iter("source")}
    except ET.ParseError:
        return False
    if not files & {str(p) for p in overlays}:
        return False
    with contextlib.suppress(libvirt.libvirtError):
        dom.destroy()
    return True


def sweep_all(uri: str | None) -> list[str]:
    """Every kind of session's leftovers: ``--mount`` (no libvirt needed), ``--instant``."""
    done = mount.sweep()
    if uri is not None and any(marker.run_dir().glob(f"{marker.PREFIX}*.json")):
        try:
            conn = open_connection(uri)
        except VmbkError as e:
            log.warning("leftovers of --instant sessions not checked: %s", e)
            return done
        try:
            done += sweep(conn)
        finally:
            with contextlib.suppress(Exception):
                conn.close()
    return done
