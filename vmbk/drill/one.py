"""One drill, start to end: restore a point into a throwaway VM, boot it, check it, remove it.

The order, and why (STYLE 14: a kill at any instant leaves something the
next run removes, never a half-known state):

1. the marker (`vmbk.drill.leftovers`): every name the drill may create
   -- the VM ``<vm>-drill-<stamp>`` and its UUID, the scratch directory,
   the network, the TPM state -- written and locked before any of them
   exists;
2. under the VM's lock (the file backups and restores take, so no backup
   archives or extends the chain being read; released as soon as the
   disks are built, so a drill's boot never holds a backup up): the tree
   scanned again, the plan of a clone restore into the scratch directory
   (`vmbk.restore.preflight.make_plan`: it refuses a scratch directory
   inside a backup root), then the checks ``resources`` (free memory,
   space plus 10 %) and ``disks`` (`vmbk.restore.image.build`: each
   stream's ``.chksum`` checked while the disk is written, ``qemu-img
   check``; the restore library, not a vmbk-restore process).  Nothing is
   written in the backup tree;
3. the clone's NVRAM copied into the scratch directory, its TPM state put
   under the drill's UUID (`vmbk.restore.tpm`), the domain XML made
   (`vmbk.restore.domainxml` for a clone, then `vmbk.drill.isolate`);
4. the isolated network (`vmbk.drill.network`), then the domain, started
   transient with ``VIR_DOMAIN_START_AUTODESTROY`` (no autostart, nothing
   defined, and libvirtd destroys it when this process's connection
   closes, kill -9 included): ``start``, with its live XML checked for
   any interface that is not on the isolated network;
5. the guest (`vmbk.drill.guest`): ``agent`` and the VM's own ``check``,
   or ``console`` (login prompt, else readable file systems:
   `vmbk.drill.filesystems`); then the picture (`vmbk.drill.picture`);
6. cleanup, in reverse, on every way out (a failed check, a timeout, an
   exception, SIGINT/SIGTERM, which are held meanwhile): the domain, the
   network, the TPM state, the scratch directory, the marker last;
7. the catalogue rows (`vmbk.drill.history`), the record.

Every check has its own timeout and verdict (`vmbk.drill.checks`); one
that fails ends the drill where it stops making sense (no boot without
disks) and the level says how far it got.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import shutil
import threading
import time
import uuid as _uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vmbk.cancel import Cancel, Cancelled
from vmbk.clock import now_iso
from vmbk import runmarker
from vmbk.drill import filesystems, guest, isolate, leftovers, network, picture
from vmbk.drill.checks import FAILED, PASSED, SKIPPED, Check, failed, level
from vmbk.drill.history import History
from vmbk.drill.points import Target
from vmbk.errors import Exit, StorageError, Terminated, VmbkError, VmError
from vmbk.human import human_size
from vmbk.lock import VmLock, lock_dir
from vmbk.records import Record, make
from vmbk.restore import domainxml, image, tpm
from vmbk.restore.preflight import RestoreOptions, RestorePlan, check_space, make_plan
from vmbk.restore.source import SourceRef, load
from vmbk.restore.vmconfig import point_config
from vmbk.settings import Drill, DrillVm
from vmbk.virt.connection import Link, LibvirtError, libvirt_module
from vmbk.virt.quiesce import signals_deferred

log = logging.getLogger("vmbk.drill")

POLL = 0.2
#: Memory a guest needs beyond its own: QEMU's (a measured 40-90 MiB under TCG) and some slack.
MEMORY_HEADROOM = 1.10


class DrillFailed(VmError):
    """A drill that did not pass: the ``error`` record beside its ``drill`` record."""

    kind = "drill"

    def __init__(self, message: str, *, vm: str, code: int) -> None:
        super().__init__(message, vm=vm)
        self.code = Exit(code)


class _Timeout(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class DrillOptions:
    """How every drill of a run goes (`vmbk.settings.Drill` and the command line)."""

    scratch: Path
    network: str = "isolated"
    restore_timeout: float = 3600
    start_timeout: float = 120
    boot_timeout: float = 300
    check_timeout: float = 60
    console_pattern: str = "login:"
    pictures: int = 10
    pictures_max_bytes: int = 64 << 20
    #: Backup roots the scratch directory must stay out of.
    protected: tuple[Path, ...] = ()

    @classmethod
    def from_settings(cls, d: Drill, protected: tuple[Path, ...], **override: Any) -> DrillOptions:
        opts = cls(Path(d.scratch_dir), d.network, d.restore_timeout, d.start_timeout, d.boot_timeout,
                   d.check_timeout, d.console_pattern, d.pictures, d.pictures_max_mib << 20, protected)
        return dataclasses.replace(opts, **{k: v for k, v in override.items() if v is not None})


@dataclasses.dataclass
class Result:
    record: Record
    #: The failure beside the record (None: the drill passed).
    error: DrillFailed | None


def drill(root: Path, target: Target, opts: DrillOptions, vm_cfg: DrillVm, *, uri: str, session: str,
          history: History, cancel: Cancel, restore_lock: threading.Lock | None = None) -> Result:
    """Drill ``target``; the ``drill`` record, and its failure when it failed.

    ``restore_lock``: held while the disks are built (drills of one VM in
    one run take the VM's lock in turn).  A connection to libvirt that
    cannot be had raises (no drill was made); Cancelled, SIGINT and
    SIGTERM raise after the cleanup, with the catalogue row written.
    """
    return _Drill(root, target, opts, vm_cfg, uri, cancel, restore_lock or threading.Lock()).run(session, history)


class _Drill:
    def __init__(self, root: Path, target: Target, opts: DrillOptions, vm_cfg: DrillVm, uri: str, cancel: Cancel,
                 restore_lock: threading.Lock) -> None:
        self.root, self.target, self.opts, self.vm_cfg = root, target, opts, vm_cfg
        self.uri, self.cancel, self.restore_lock = uri, cancel, restore_lock
        self.vm = target.vm
        self.started = now_iso()
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        self.uuid = str(_uuid.uuid4())
        self.name = f"{self.vm}-drill-{stamp}-{self.uuid[:4]}"
        net = f"vmbk-drill-{self.uuid[:8]}" if opts.network == "isolated" else None
        self.left = leftovers.Leftovers(self.name, self.vm, self.uuid, opts.scratch / self.name, net, self.started)
        self.network = net
        self.checks: list[Check] = []
        self.warnings: list[str] = []
        self.os: dict[str, Any] | None = None
        self.pictures: tuple[Path | None, Path | None] = (None, None)
        self.data_bytes = 0

    @property
    def scratch(self) -> Path:
        return self.left.scratch

    @property
    def mark(self) -> dict[str, str]:
        return {"uuid": self.uuid, "vm": self.vm, "point": self.target.ref, "started": self.started}

    # -- the whole drill ------------------------------------------------------------------
    def run(self, session: str, history: History) -> Result:
        t0 = time.monotonic()
        link = Link(self.uri)
        interrupted: BaseException | None = None
        try:
            marker = self._mark()
            try:
                self._steps(link)
            finally:
                self._cleanup(link, marker)
        except BaseException as e:
            interrupted = e
            raise
        finally:
            link.close()
            seconds = time.monotonic() - t0
            rec, err = self._record(session, seconds, interrupted)
            history.drill(session, self._row(rec, err), self.scratch)
            picture.prune(self.root, self.opts.pictures, self.opts.pictures_max_bytes)
        return Result(rec, err)

    def _mark(self) -> runmarker.Marker:
        try:
            return self.left.mark()
        except OSError as e:
            raise StorageError(f"cannot write the drill's marker in {leftovers.run_dir()}: {e.strerror or e}",
                               vm=self.vm) from None

    def _steps(self, link: Link) -> None:
        plan = self._restore()
        if plan is None:
            return
        if plan.config is None:
            self.checks.append(Check("start", FAILED, 0.0, "the backup holds no domain XML (vmconfig.*.xml) for "
                                     "this point: the disks restore, but there is no VM to start"))
            return
        self._network(link)
        xml = self._xml(plan)
        dom = self._start(link, xml)
        if dom is None:
            return
        self._guest(dom, xml, plan)
        self._picture(link, dom, xml)

    def _stop(self, deadline: float) -> Callable[[], None]:
        def stop() -> None:
            self.cancel.check()
            if time.monotonic() > deadline:
                raise _Timeout()
        return stop

    # -- 2: resources and disks, under the VM's lock --------------------------------------------
    def _restore(self) -> RestorePlan | None:
        t = time.monotonic()
        try:
            with self.restore_lock, self._vm_lock():
                source = load(SourceRef(self.root, self.vm, self.target.chain.path))
                config = point_config(self.target.point)
                opts = RestoreOptions(restore_path=self.scratch, restore_point=self.target.point.index,
                                      name=self.name if config is not None else None,
                                      skip_config=config is None, protected=self.opts.protected)
                plan = make_plan(source, opts)
                self.warnings += plan.warnings
                if not self._resources(plan, t):
                    return None
                return plan if self._disks(plan) else None
        except VmbkError as e:  # the point cannot be restored (or the VM's lock is held)
            self.checks.append(Check("disks", FAILED, time.monotonic() - t, e.message, code=int(e.code)))
            return None

    @contextlib.contextmanager
    def _vm_lock(self) -> Iterator[None]:
        """The VM's lock; none on a backup tree that cannot be written (a read-only replica)."""
        probe = lock_dir(self.root)
        while not probe.exists() and probe != self.root:
            probe = probe.parent
        if not os.access(probe, os.W_OK):
            self.warnings.append(f"{probe} is not writable: drilled without the VM's lock")
            yield
            return
        with VmLock(self.root, self.vm, purpose="drill"):
            yield

    def _resources(self, plan: RestorePlan, t: float) -> bool:
        need_mem = int(isolate.memory_bytes(plan.config.xml) * MEMORY_HEADROOM) if plan.config else 0
        have_mem = available_memory()
        space = f"{human_size(plan.needed_bytes)} of space (plus 10 %), {human_size(plan.free_bytes or 0)} free in " \
                f"{plan.restore_path.parent}"
        code, why = 0, ""
        if have_mem is not None and need_mem > have_mem:
            code, why = int(Exit.VM), (f"not enough free memory to boot a copy of {self.vm}: it needs "
                                       f"{human_size(need_mem)}, {human_size(have_mem)} is available")
        else:
            try:
                check_space(plan)
            except StorageError as e:
                code, why = int(e.code), f"{e.message} (scratch directory for the drill's copy)"
        mem = f"{human_size(need_mem)} of memory, {human_size(have_mem or 0)} available" if need_mem else ""
        detail = why or "; ".join(x for x in (mem, space) if x)
        self.checks.append(Check("resources", FAILED if code else PASSED, time.monotonic() - t, detail,
                                 code=code or int(Exit.VM)))
        return not code

    def _disks(self, plan: RestorePlan) -> bool:
        t = time.monotonic()
        stop = self._stop(t + self.opts.restore_timeout)
        _traversable(self.scratch)
        words, unchecked = [], 0
        try:
            for job in plan.jobs:
                built = image.build(job, verify=True, stop=stop)
                os.replace(job.partial, job.target)  # scratch: no fsync, the copy is thrown away
                self.data_bytes += job.data_bytes
                unchecked += len(built.unchecked)
                words.append(f"{job.disk} ({human_size(job.virtual_size)}, {len(job.sources)} stream"
                             f"{'s' if len(job.sources) != 1 else ''})")
        except _Timeout:
            image.discard(plan.jobs)
            self.checks.append(Check("disks", FAILED, time.monotonic() - t, f"not restored in "
                                     f"{self.opts.restore_timeout:g} s", self.opts.restore_timeout))
            return False
        except (VmbkError, OSError) as e:
            image.discard(plan.jobs)
            err = e if isinstance(e, VmbkError) else StorageError(f"{e.filename or self.scratch}: {e.strerror or e}")
            self.checks.append(Check("disks", FAILED, time.monotonic() - t, err.message, self.opts.restore_timeout,
                                     code=int(err.code)))
            return False
        note = (f"; {unchecked} stream(s) have no .chksum (a virtnbdbackup before 1.9.40): their data is not "
                "verified" if unchecked else "; every stream matches its .chksum")
        self.checks.append(Check("disks", PASSED, time.monotonic() - t, f"{', '.join(words)} restored, qemu-img "
                                 f"check clean{note}", self.opts.restore_timeout, level="disks"))
        return True

    # -- 3 and 4: the VM ---------------------------------------------------------------------------
    def _network(self, link: Link) -> None:
        if self.network is None:
            return
        try:
            network.create(link.get(), self.network, self.mark)
        except LibvirtError as e:
            self.warnings.append(f"{e.message}: the drill VM's network interfaces are removed instead")
            self.network = None

    def _xml(self, plan: RestorePlan) -> str:
        assert plan.config is not None
        if plan.nvram_source is not None and plan.nvram_target is not None:
            shutil.copyfile(plan.nvram_source, plan.nvram_target)
            os.chmod(plan.nvram_target, image.IMAGE_MODE)
        if plan.tpm_source is not None:
            try:
                tpm.restore(plan.tpm_source, self.uuid)
            except (OSError, ValueError) as e:
                self.warnings.append(f"the TPM state could not be put in place ({e}): the guest starts with an "
                                     "empty TPM (BitLocker asks for its recovery key)")
        xml, warnings = domainxml.clone_xml(plan.config.xml, name=self.name,
                                            disks={j.disk: j.target for j in plan.jobs}, nvram=plan.nvram_target)
        xml, more = isolate.drill_xml(xml, uuid=self.uuid, network=self.network, scratch=self.scratch,
                                      mark=self.mark)
        self.warnings += warnings + more
        return xml

    def _start(self, link: Link, xml: str) -> Any:
        libvirt = libvirt_module()
        t = time.monotonic()
        stop = self._stop(t + self.opts.start_timeout)
        conn = link.get()
        out: dict[str, Any] = {}

        def create() -> None:
            try:
                out["dom"] = conn.createXML(xml, libvirt.VIR_DOMAIN_START_AUTODESTROY)
            except libvirt.libvirtError as e:
                out["error"] = e.get_error_message()

        starter = threading.Thread(target=create, name="vmbk-drill-start", daemon=True)
        starter.start()
        try:
            while starter.is_alive():
                starter.join(POLL)
                stop()
        except _Timeout:
            out["error"] = f"not started in {self.opts.start_timeout:g} s"
        dom = out.get("dom")
        why = out.get("error") or (None if dom is None else self._isolated(conn, dom))
        self.checks.append(Check("start", FAILED if why else PASSED, time.monotonic() - t,
                                 why or f"{self.name} started" + (f" on network {self.network}" if self.network else
                                                                   ", no network interface"),
                                 self.opts.start_timeout, level="started"))
        return None if why else dom

    def _isolated(self, conn: Any, dom: Any) -> str | None:
        """None when every interface of the live domain is on the drill's network and it routes nowhere."""
        root = ET.fromstring(dom.XMLDesc(0))
        for iface in root.iterfind("devices/interface"):
            src = iface.find("source")
            if iface.get("type") != "network" or src is None or src.get("network") != self.network:
                return f"an interface of the live domain is not on the isolated network: {ET.tostring(iface)!r}"
        if self.network is not None and network.routes_out(conn, self.network):
            return f"network {self.network} routes out"
        return None

    # -- 5: the guest -------------------------------------------------------------------------------
    def _guest(self, dom: Any, xml: str, plan: RestorePlan) -> None:
        boot = self.vm_cfg.boot_timeout or self.opts.boot_timeout
        logs = isolate.serial_logs(xml)
        custom = bool(self.vm_cfg.file or self.vm_cfg.command)
        if isolate.has_agent(xml):
            t = time.monotonic()
            ok, _stopped, why = self._wait(dom, t + boot, agent=True, logs=logs, pattern=None)
            seconds = time.monotonic() - t
            if ok:
                self.os = guest.os_info(dom)
                named = (self.os or {}).get("name") or "not said"
                self.checks.append(Check("agent", PASSED, seconds, f"guest-ping answered after {seconds:.1f} s; OS: "
                                         f"{named}", boot, level="agent"))
                if custom:
                    self._custom(dom)
                return
            self.checks.append(Check("agent", FAILED, seconds, why, boot))
            if custom:
                self.checks.append(Check("check", SKIPPED, 0.0, "the guest agent did not answer"))
            self._console(dom, plan, logs, time.monotonic(), boot, fallback=True)  # how far it got
            return
        self._console(dom, plan, logs, time.monotonic() + boot, boot, fallback=self.vm_cfg.console_pattern is None)
        if custom:
            self.checks.append(Check("check", FAILED, 0.0, "the VM has no guest agent channel: its configured check "
                                     "cannot run"))

    def _wait(self, dom: Any, deadline: float, *, agent: bool, logs: list[Path],
              pattern: str | None) -> tuple[bool, bool, str]:
        """Until the agent answers or the console shows ``pattern``: (seen, the guest stopped, why not)."""
        libvirt = libvirt_module()
        t = time.monotonic()
        while True:
            self.cancel.check()
            if agent and guest.ping(dom):
                return True, False, ""
            if pattern is not None and re.search(pattern, guest.console_text(logs), re.M):
                return True, False, ""
            try:
                state, reason = dom.state()
            except libvirt.libvirtError:
                state, reason = 5, 0
            if state not in (1, 3):  # running, paused
                return False, True, (f"the guest stopped after {time.monotonic() - t:.1f} s (libvirt state "
                                     f"{state}, reason {reason})")
            if time.monotonic() >= deadline:
                what = "the guest agent did not answer" if agent else f"the console does not show {pattern!r}"
                waited = deadline - t
                return False, False, f"{what} in {waited:.0f} s" if waited >= 1 else what
            time.sleep(POLL)

    def _console(self, dom: Any, plan: RestorePlan, logs: list[Path], deadline: float, boot: float, *,
                 fallback: bool) -> None:
        t = time.monotonic()
        pattern = self.vm_cfg.console_pattern or self.opts.console_pattern
        # without a serial console nothing shows the boot: the screen is taken at the timeout
        ok, stopped, why = self._wait(dom, deadline, agent=False, logs=logs, pattern=pattern if logs else None)
        if not logs and not stopped:
            why = "no serial console"
        seconds = time.monotonic() - t
        if ok:
            self.checks.append(Check("console", PASSED, seconds, f"the console showed {pattern!r} after "
                                     f"{seconds:.1f} s", boot, level="console"))
            return
        if not fallback or stopped:
            self.checks.append(Check("console", FAILED, seconds, why, boot))
            return
        readable, words = filesystems.probe({j.disk: j.sources for j in plan.jobs})
        self.checks.append(Check("console", PASSED if readable else FAILED, time.monotonic() - t,
                                 f"{why}; " + (f"file systems readable: {words}" if readable else
                                               f"and no readable file system: {words}"), boot, level="filesystems"))

    def _custom(self, dom: Any) -> None:
        t = time.monotonic()
        cfg, timeout = self.vm_cfg, self.opts.check_timeout
        words, ok = [], True
        try:
            if cfg.file:
                text = guest.read_file(dom, cfg.file, int(timeout)).decode("utf-8", "replace")
                if cfg.pattern is None or re.search(cfg.pattern, text, re.M):
                    words.append(f"{cfg.file} " + (f"matches {cfg.pattern!r}" if cfg.pattern else "exists"))
                else:
                    ok = False
                    words.append(f"{cfg.file} does not match {cfg.pattern!r}")
            if cfg.command:
                code, last = guest.run(dom, cfg.command, timeout, self.cancel.check)
                ok = ok and code == 0
                words.append(f"{' '.join(cfg.command)} exited {code}" + (f": {last}" if last else ""))
        except (guest.AgentError, TimeoutError) as e:
            ok = False
            words.append(str(e))
        self.checks.append(Check("check", PASSED if ok else FAILED, time.monotonic() - t, "; ".join(words), timeout,
                                 level="check"))

    def _picture(self, link: Link, dom: Any, xml: str) -> None:
        png = picture.screenshot(link.get(), dom)
        text = guest.console_text(isolate.serial_logs(xml))
        self.pictures = picture.keep(self.root, self.vm, self.name, png,
                                     guest.console_tail(text) if text.strip() else None)

    # -- 6: cleanup --------------------------------------------------------------------------------
    def _cleanup(self, link: Link, marker: runmarker.Marker) -> None:
        with signals_deferred():
            try:
                self.left.remove(link.get())
            except Exception as e:  # the marker stays: the next run removes the rest
                runmarker.abandon(marker)
                msg = getattr(e, "message", None) or str(e)
                self.warnings.append(f"not everything of the drill could be removed ({msg}): the next vmbk-drill "
                                     f"removes it")
                log.warning("%s: %s", self.name, self.warnings[-1])
                return
            self.left.unmark(marker)

    # -- 7: what it says ---------------------------------------------------------------------------
    def _record(self, session: str, seconds: float, interrupted: BaseException | None) -> tuple[Record,
                                                                                                 DrillFailed | None]:
        bad = failed(self.checks)
        err = None
        if interrupted is not None:
            what = "interrupted" if isinstance(interrupted, (KeyboardInterrupt, Terminated, Cancelled)) else \
                f"stopped: {interrupted.__class__.__name__}: {interrupted}"
            code = {KeyboardInterrupt: Exit.SIGINT, Terminated: Exit.SIGTERM}.get(type(interrupted), Exit.GENERAL)
            err = DrillFailed(f"drill of {self.vm} ({self.target.ref}) {what}", vm=self.vm, code=int(code))
        elif bad:
            err = DrillFailed(f"drill of {self.vm} ({self.target.ref}) failed at {bad[0].name}: {bad[0].detail}",
                              vm=self.vm, code=bad[0].code)
        png, console = self.pictures
        rec = make(
            "drill", session,
            vm=self.vm,
            name=self.name,
            uuid=self.uuid,
            point=self.target.as_record(),
            why=self.target.why,
            outcome="failed" if err else "ok",
            level=level(self.checks),
            checks=[c.as_record() for c in self.checks],
            os=self.os,
            network=self.network,
            scratch=str(self.scratch),
            data_bytes=self.data_bytes,
            screenshot=str(png) if png else None,
            console=str(console) if console else None,
            started_at=self.started,
            seconds=round(seconds, 3),
            warnings=self.warnings,
            error=err.message if err else None,
        )
        return rec, err

    def _row(self, rec: Record, err: DrillFailed | None) -> dict[str, Any]:
        return {"vm": self.vm, "name": self.name, "restore_point": self.target.ref, "point_date": rec["point"]["date"],
                "reason": self.target.why, "started_at": self.started, "duration_s": rec["seconds"],
                "outcome": rec["outcome"], "level": rec["level"], "exit_code": int(err.code) if err else 0,
                "error": rec["error"], "checks": rec["checks"], "os": rec["os"], "screenshot": rec["screenshot"],
                "console": rec["console"], "chain_path": str(self.target.chain.path)}


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo, in bytes (None: not known)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _traversable(path: Path) -> None:
    """``path`` and its missing parents, 0755 whatever the umask: QEMU runs as
    libvirt-qemu and must reach the images (libvirt gives it the files, not the directories)."""
    if path.is_dir():
        return
    _traversable(path.parent)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path)
    os.chmod(path, 0o755)
