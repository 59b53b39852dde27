"""vmbk holding a domain still (paused or frozen), so that it is never left so.

`vmbk.virt.quiesce` pauses a domain or freezes its guest's filesystems
for the instant ``backupBegin`` takes.  SIGINT/SIGTERM are deferred over
that window, but SIGKILL (kill -9, the OOM killer, a systemd stop timeout)
cannot be: a vmbk-backup killed there left the VM paused, or its guest
frozen, for good.  And the next run took the pause for someone else's
(consistency "paused", no resume): an outage nobody was told about.
Three things make it safe:

1. **The marker.**  Before ``suspend``/``fsFreeze`` is called, vmbk
   writes ``RUN_DIR/held-<domain uuid>.json`` (`marker_path`) and fsyncs
   it and its directory: what it does (``paused`` or ``frozen``), the
   domain's name, UUID and libvirt ID (which changes when the domain is
   restarted), the libvirt URI, and who holds it (PID, the PID's start
   time, the boot ID; the guard's the same).  It is removed once the
   resume/thaw succeeded.  It is created complete or not at all (written
   under a temporary name, hard-linked into place: the link fails when
   another vmbk holds the domain), so a reader never sees half of one.
2. **The guard.**  Before the first marker, vmbk starts ``python -m
   vmbk.virt.guard MARKER PID`` (`Hold`; argv, never a shell), a small
   process that reads a pipe from vmbk.  vmbk writes ``released`` when it
   has undone the hold; EOF without it means vmbk died, and the guard
   undoes the hold at once (`undo`), using the marker (unless vmbk had
   said ``undone``: then it only removes the marker).  It ignores
   SIGINT/SIGTERM/SIGHUP and sits in its own session, so the Ctrl-C or
   the stop that made vmbk unwind does not take it first; vmbk reaps it,
   or init does when vmbk died, and it exits as soon as it is released or
   has acted (every libvirt step is bounded).
3. **Healing by the next run.**  When the guard died too (kill -9 of the
   process group, a reboot of the host), `heal` -- called by vmbk-backup
   for the VM it backs up and by vmbk-restore for the VM it restores --
   undoes what a dead vmbk left: marker present, holder and guard dead,
   same domain ID.  The caller reports it (a ``resumed``/``thawed`` event
   in the backup record, a warning in the restore record; both on
   stderr).  A paused domain *without* a marker is someone else's and is
   never resumed (consistency ``paused``, as before).  Discovery ran while
   the domain was paused, when its guest agent could not answer; once
   healed, vmbk-backup asks the agent again, so that run freezes the
   guest as usual instead of pausing it once more.

Undo rules: ``paused`` is resumed only while the domain is paused with
reason ``user`` (libvirt's reason for ``virDomainSuspend``), and only
once a ``backupBegin`` the dead vmbk left in progress is done
(`settle_backup_begin`: resuming in the middle of it crashed QEMU); a domain
paused for another reason (I/O error, migration) or restarted since is
left alone and the marker dropped.  ``frozen`` is thawed through the
agent (``fsThaw`` is harmless on a thawed guest, and libvirt runs it
after a freeze still in flight: agent commands are serialized).  A
``suspend`` the dead vmbk sent may also still be in flight in libvirtd
when the guard looks, so a guard that finds the domain running, and was
not told ``held`` (the suspend returned), watches it for `INFLIGHT_GRACE`
seconds before it concludes there is nothing to do.  The next run does
not need to: nothing of the dead vmbk is in flight by then.

Why a file and not libvirt domain metadata: the marker must be durable
*before* the suspend, which an fsync of our own file guarantees and a
``setMetadata`` (libvirt writes its status XML without that promise, and
one more libvirt call can itself fail or hang) does not; it must not show
up in the domain XML that backups save and restores define; and the
guard reads it without a libvirt connection to decide that there is
nothing to do.  The domain ID in it ties it to one run of the domain, as
live metadata would be.  The limit either way: a domain that an admin
pauses after vmbk *and* its guard were killed, before the next run, looks
like vmbk's pause (same reason, same ID) and is resumed by that run.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import select
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import vmbk
from vmbk.errors import VmError
from vmbk.fsutil import fsync_dir
from vmbk.procs import reap
from vmbk.virt import backupjob
from vmbk.virt.connection import LibvirtError, libvirt_module
from vmbk.virt.remote import is_remote

log = logging.getLogger("vmbk.virt")

MARKER_PREFIX = "held-"
#: How long vmbk waits for its guard to come up (a Python start: a busy host can take seconds).
GUARD_START_TIMEOUT = 20.0
#: How long the guard, after vmbk died, keeps trying to undo the hold.
GUARD_RETRY_FOR = 60.0
#: How long a next run waits for a live guard of a dead holder to finish.
GUARD_WAIT = 30.0
#: The guard's look for a suspend still in flight when vmbk died.
INFLIGHT_GRACE = 2.0
#: How long a resume waits for a ``backupBegin`` in progress (`settle_backup_begin`).
BEGIN_SETTLE = 30.0
ACTIONS = ("paused", "frozen")


def marker_path(uuid: str, uri: str | None = None) -> Path:
    """The marker of a domain; a remote host's (``qemu+ssh://``) carries a hash of its URI.

    The marker of a remote domain lives here, on the backup server, with
    its guard: the guard must notice vmbk's death, which only a process
    beside vmbk can, and it undoes the hold through a libvirt connection
    of its own to the URI in the marker (ssh, like vmbk's).  Two hosts may
    run domains of one UUID (a clone of a template), hence the URI's hash.
    """
    if uri and is_remote(uri):
        tag = hashlib.sha256(uri.split("?", 1)[0].encode()).hexdigest()[:12]
        return backupjob.RUN_DIR / f"{MARKER_PREFIX}{uuid}-{tag}.json"
    return backupjob.RUN_DIR / f"{MARKER_PREFIX}{uuid}.json"


def _dom_uri(dom: Any) -> str | None:
    try:
        return str(dom.connect().getURI())
    except Exception:  # a test double or a connection gone: the local name
        return None


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _proc_start(pid: int) -> int | None:
    """The start time (clock ticks after boot) of a live, non-zombie ``pid``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    if not fields or fields[0] in ("Z", "X", "x"):
        return None  # a zombie holds nothing: its fds are closed
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _alive(pid: Any, start: Any, boot: Any) -> bool:
    """Is this the very process that wrote the marker, still running?"""
    if not isinstance(pid, int) or pid <= 0 or boot != _boot_id():
        return False
    now = _proc_start(pid)
    return now is not None and now == start


def owner_alive(marker: dict[str, Any]) -> bool:
    return _alive(marker.get("pid"), marker.get("pid_start"), marker.get("boot_id"))


def guard_alive(marker: dict[str, Any]) -> bool:
    return _alive(marker.get("guard_pid"), marker.get("guard_start"), marker.get("boot_id"))


def read_marker(path: Path) -> dict[str, Any] | None:
    """The marker at ``path``; None when there is none (or it is not one of ours)."""
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("%s: unreadable hold marker (%s): removed", path, e)
        remove_marker(path)
        return None
    if not isinstance(data, dict) or data.get("action") not in ACTIONS:
        log.warning("%s: not a hold marker: removed", path)
        remove_marker(path)
        return None
    return data


def remove_marker(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    with contextlib.suppress(OSError):
        fsync_dir(path.parent)


def _write_marker(path: Path, data: dict[str, Any], *, replace: bool) -> bool:
    """Write the marker durably; False when another one is in place (``replace=False``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            os.write(fd, json.dumps(data, indent=1).encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
        fsync_dir(path.parent)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _sweep_tmp(uuid: str) -> None:
    """Temporary marker files of holders that died while writing one."""
    for tmp in backupjob.RUN_DIR.glob(f".{MARKER_PREFIX}{uuid}*.json.*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2]
        if pid.isdigit() and _proc_start(int(pid)) is None:
            with contextlib.suppress(OSError):
                tmp.unlink()


# ------------------------------------------------------------------ undo

def undo(dom: Any, marker: dict[str, Any], *, inflight: bool = False) -> str | None:
    """Undo what ``marker`` says its dead holder did to ``dom``.

    Returns ``"resumed"`` or ``"thawed"`` when it changed something, None
    when there was nothing (left) to undo.  ``inflight``: the holder died
    a moment ago (the guard), so a suspend it sent may still be in
    libvirtd's queue.  Raises `LibvirtError` when it could not undo; the
    marker is then left for another try.
    """
    libvirt = libvirt_module()
    name = marker.get("name") or "?"
    if marker.get("memory_save") and marker["action"] == "paused" and dom.isActive():
        _end_save_job(dom, libvirt)  # a memory state save in flight: no resume gets in beside it
    if not dom.isActive() or dom.ID() != marker.get("domain_id"):
        log.info("%s: restarted or shut off since vmbk %s it: nothing to undo", name, marker["action"])
        return None
    state, reason = dom.state()
    try:
        if marker["action"] == "paused":
            if state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_USER:
                settle_backup_begin(dom)
                dom.resume()
                return "resumed"
            if state == libvirt.VIR_DOMAIN_PAUSED:
                log.warning("%s: paused now for another reason (libvirt reason %d) than vmbk's pause: left paused",
                            name, reason)
                return None
            if inflight and _late_suspend(dom, libvirt):
                return "resumed"
            return None
        if state == libvirt.VIR_DOMAIN_PAUSED:
            # The agent cannot answer while the vCPUs are stopped, and the pause is not ours.
            raise LibvirtError(f"the guest of {name!r} may be frozen, but the VM is paused (not by vmbk): "
                               f"resume it, then run 'virsh domfsthaw {name}'", vm=name)
        with contextlib.suppress(libvirt.libvirtError, AttributeError):
            dom.agentSetResponseTimeout(30, 0)
        thawed = dom.fsThaw(None, 0)
        return "thawed" if thawed > 0 else None
    except libvirt.libvirtError as e:
        raise LibvirtError(f"cannot undo the {marker['action']} state vmbk left on {name!r}: "
                           f"{e.get_error_message()}", vm=name) from None


def _end_save_job(dom: Any, libvirt: Any, timeout: float = BEGIN_SETTLE) -> None:
    """Abort a memory state save (`vmbk.backup.memory`) the dead holder left running; wait until it is gone.

    libvirt lets no resume in beside the save's job (it would wait for it,
    for as long as QEMU writes the RAM into a file nobody reads any more):
    the save is aborted, which leaves the domain paused as it was, for the
    caller to resume.
    """
    snapshot = getattr(libvirt, "VIR_DOMAIN_JOB_OPERATION_SNAPSHOT", 6)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            stats = dom.jobStats(0)
        except libvirt.libvirtError:
            return
        if stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) == libvirt.VIR_DOMAIN_JOB_NONE \
                or stats.get("operation") != snapshot:
            return
        try:
            dom.abortJob()
            log.warning("%s: aborted the memory state save of a vmbk that died", dom.name())
        except libvirt.libvirtError as e:
            log.info("%s: abort of the memory state save: %s", dom.name(), e.get_error_message())
        time.sleep(0.1)
    log.warning("%s: the memory state save did not end within %g s", dom.name(), timeout)


def _late_suspend(dom: Any, libvirt: Any) -> bool:
    """Resume a suspend the dead holder sent that libvirtd carries out late.

    Watched for `INFLIGHT_GRACE` seconds: libvirtd may still be working on
    (or not yet have read) the request.  True when it came and was resumed.
    """
    deadline = time.monotonic() + INFLIGHT_GRACE
    while True:
        state, reason = dom.state()
        if state == libvirt.VIR_DOMAIN_PAUSED:
            if reason != libvirt.VIR_DOMAIN_PAUSED_USER:
                return False
            settle_backup_begin(dom)
            dom.resume()
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def settle_backup_begin(dom: Any, timeout: float = BEGIN_SETTLE) -> None:
    """Wait until a ``backupBegin`` in progress is done: its exports are served.

    libvirt lets ``virDomainResume`` run *while* ``backupBegin`` is still
    setting the job up (it allows modify jobs beside the backup job from
    its start), and QEMU 7.2 crashed (``blk_ref``/``qcow2_get_specific_info``
    assertions) when the guard resumed a domain whose vmbk died inside
    ``backupBegin``.  vmbk itself resumes only after ``backupBegin``
    returned; the guard waits for the same point: no job, a job that is not
    a backup, a backup whose every disk is exported on its NBD socket, or
    ``timeout``.  A job still being set up answers ``jobInfo`` with an error
    ("backup job data missing").
    """
    libvirt = libvirt_module()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE:
                return
        except libvirt.libvirtError:
            time.sleep(0.05)  # being set up
            continue
        try:
            xml = dom.backupGetXMLDesc(0)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_BACKUP:
                return  # another kind of job
            time.sleep(0.05)
            continue
        if is_remote(_dom_uri(dom)) or _exports_served(xml):
            return  # a remote host's socket is not reachable here: the job answering is the sign
        time.sleep(0.05)
    log.warning("%s: the backup job being started did not settle within %g s", dom.name(), timeout)


def _exports_served(xml: str) -> bool:
    """Does the pull backup's NBD server serve every disk of ``xml``?"""
    from vmbk.nbd import Address, Client, NbdError

    root = ET.fromstring(xml)
    server = root.find("server")
    if root.get("mode") != "pull" or server is None or server.get("transport") != "unix":
        return True  # nothing of ours to wait for
    for disk in root.iter("disk"):
        if disk.get("backup") != "yes":
            continue
        try:
            Client(Address.unix(server.get("socket", ""), disk.get("exportname") or disk.get("name") or ""),
                   timeout=2.0).close()
        except (OSError, NbdError):
            return False
    return True


def _describe(marker: dict[str, Any]) -> str:
    what = "paused" if marker["action"] == "paused" else "froze the guest filesystems of"
    prog = marker.get("program") or "vmbk"
    return f"{prog} (pid {marker.get('pid')}) {what} it at {marker.get('time')} and did not finish"


def heal(dom: Any) -> dict[str, Any] | None:
    """Undo a pause/freeze a dead vmbk left on ``dom``; the event, or None.

    Call before touching the VM.  A marker of a live vmbk (another backup
    path's run) is left alone; a live guard of a dead vmbk is given
    `GUARD_WAIT` seconds to finish its work.  The event is
    ``{"event": "resumed"|"thawed", "reason": ...}``.
    """
    uuid = dom.UUIDString()
    _sweep_tmp(uuid)
    path = marker_path(uuid, _dom_uri(dom))
    marker = read_marker(path)
    if marker is None:
        return None
    if owner_alive(marker):
        log.info("%s: held by a running vmbk (pid %s)", dom.name(), marker.get("pid"))
        return None
    deadline = time.monotonic() + GUARD_WAIT
    while guard_alive(marker) and path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    marker = read_marker(path)
    if marker is None:
        return None  # the guard did it
    done = undo(dom, marker)
    remove_marker(path)
    if done is None:
        return None
    reason = f"{_describe(marker)}: {done} now"
    log.warning("%s: %s", dom.name(), reason)
    return {"event": done, "reason": reason}


def heal_named(conn: Any, name: str) -> list[str]:
    """`heal` for the domain called ``name``, if there is one; never raises.

    For commands whose job is not the running VM (vmbk-restore): what was
    done, or could not be, as warnings for their record.
    """
    if conn is None:
        return []
    libvirt = libvirt_module()
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError:
        return []
    try:
        event = heal(dom)
    except (libvirt.libvirtError, LibvirtError) as e:
        msg = e.get_error_message() if isinstance(e, libvirt.libvirtError) else str(e)
        log.warning("%s: %s", name, msg)
        return [msg]
    return [f"VM {name!r}: {event['reason']}"] if event else []


# ------------------------------------------------------------------ hold

class Hold:
    """One vmbk's hold on one domain: its marker and its guard.

    ``mark(action)`` before each suspend/fsFreeze (the guard is started on
    the first), ``held()`` once it returned; ``release()`` once undone,
    ``release(keep=True)`` when the undo failed, so that the next run
    tries again.  What the guard is told on its pipe (`vmbk.virt.guard`):
    ``held`` (no suspend in flight any more), ``undone`` (vmbk resumed or
    thawed: nothing to undo), ``released`` (the marker is gone too).
    """

    def __init__(self, dom: Any) -> None:
        self.dom = dom
        self.path = marker_path(dom.UUIDString(), _dom_uri(dom))
        self.guard: subprocess.Popen[bytes] | None = None
        self.marked = False

    def mark(self, action: str, *, memory: bool = False) -> None:
        """``memory``: the hold is for a memory state save (undone by aborting a save in flight first)."""
        assert action in ACTIONS
        if self.guard is None:
            self.guard = _start_guard(self.path)
        boot = _boot_id()
        data = {
            "action": action,
            "name": self.dom.name(),
            "uuid": self.dom.UUIDString(),
            "domain_id": self.dom.ID(),
            "uri": self.dom.connect().getURI(),
            "pid": os.getpid(),
            "pid_start": _proc_start(os.getpid()),
            "program": Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "vmbk",
            "boot_id": boot,
            "guard_pid": self.guard.pid if self.guard else None,
            "guard_start": _proc_start(self.guard.pid) if self.guard else None,
            "time": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        }
        if memory:
            data["memory_save"] = True
        if self.marked:
            _write_marker(self.path, data, replace=True)
            return
        if not _write_marker(self.path, data, replace=False):
            # A marker in place: a dead vmbk's (heal it) or a live one's (fail).
            other = read_marker(self.path)
            if other is not None and owner_alive(other):
                self.release()
                raise VmError(f"VM {self.dom.name()!r} is being {other['action']} by another vmbk "
                              f"(pid {other.get('pid')}): try again when it is done", vm=self.dom.name())
            if other is not None:
                heal(self.dom)
            if not _write_marker(self.path, data, replace=False):
                self.release()
                raise VmError(f"VM {self.dom.name()!r}: cannot take the hold marker {self.path}",
                              vm=self.dom.name())
        self.marked = True

    def held(self) -> None:
        """The suspend/fsFreeze returned: nothing of it is in flight any more."""
        self._tell(b"held\n")

    def release(self, *, keep: bool = False) -> None:
        if self.marked and not keep:
            self._tell(b"undone\n")  # from here a death needs no undo, only the marker removed
            remove_marker(self.path)
        elif self.marked:
            log.error("%s: left %s; the next vmbk run for this VM tries again", self.dom.name(), self.path)
        self.marked = False
        if self.guard is not None:
            _dismiss(self.guard)
            self.guard = None

    def _tell(self, message: bytes) -> None:
        if self.guard is not None and self.guard.stdin is not None:
            with contextlib.suppress(OSError):
                self.guard.stdin.write(message)
                self.guard.stdin.flush()


def _start_guard(marker: Path) -> subprocess.Popen[bytes] | None:
    """Start the guard and wait until it is ready; None when it would not start."""
    root = str(Path(vmbk.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    argv = [sys.executable, "-m", "vmbk.virt.guard", str(marker), str(os.getpid())]
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                start_new_session=True, close_fds=True)
    except OSError as e:
        log.warning("cannot start the hold guard (%s): a vmbk killed now leaves the VM to its next run", e)
        return None
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], GUARD_START_TIMEOUT)
    line = proc.stdout.readline() if ready else b""
    proc.stdout.close()
    if line.strip() != b"ready":
        log.warning("the hold guard did not start: a vmbk killed now leaves the VM to its next run")
        _dismiss(proc)
        return None
    return proc


def _dismiss(proc: subprocess.Popen[bytes]) -> None:
    """Tell the guard it is released and reap it."""
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.write(b"released\n")
            proc.stdin.flush()
        with contextlib.suppress(OSError):
            proc.stdin.close()
    reap(proc, 10)
