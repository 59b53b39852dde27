"""Killing vmbk-backup at chosen moments (issue #11: a VM left paused or frozen).

* `Lifecycle` -- libvirt lifecycle events of one domain (SUSPENDED,
  RESUMED, ...), delivered on a thread that runs libvirt's default event
  loop (`event_connection`), to a handler that may kill a process at once.
* `spawn_backup` -- ``bin/vmbk-backup`` as a real process (stdout and
  stderr to files: the guard inherits stderr, and a pipe would keep the
  reader waiting for it too).
* `kill_when` -- poll a condition and SIGKILL the process as soon as it
  holds (the marker file appears, a libvirt job starts, N bytes of the
  ``.data.partial`` are on disk, a delay has passed).
* `wait_released` -- after a kill: the domain running again, no marker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Self

import libvirt

from vmbk.virt import hold
from vmbk.virt.backupjob import RUN_DIR

ROOT = Path(__file__).resolve().parents[1]
URI = "qemu:///system"

_loop_lock = threading.Lock()
_loop_started = False


def _run_loop() -> None:
    while True:
        libvirt.virEventRunDefaultImpl()


def event_connection() -> libvirt.virConnect:
    """A new connection that receives events (the loop runs on a daemon thread).

    The default event implementation must be registered before the
    connection that wants events is opened; it is, once per process.
    """
    global _loop_started
    with _loop_lock:
        if not _loop_started:
            libvirt.virEventRegisterDefaultImpl()
            threading.Thread(target=_run_loop, name="libvirt-events", daemon=True).start()
            _loop_started = True
    return libvirt.open(URI)


class Lifecycle:
    """Lifecycle events of one domain, handed to ``handler(event, detail)``.

    The handler runs on the event thread: it should be quick (a kill).
    """

    def __init__(self, uuid: str) -> None:
        self.conn = event_connection()
        self.dom = self.conn.lookupByUUIDString(uuid)
        self.handler: Callable[[int, int], None] | None = None
        self.seen: list[tuple[float, int, int]] = []
        self._id = self.conn.domainEventRegisterAny(
            self.dom, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._event, None)

    def _event(self, _conn: Any, _dom: Any, event: int, detail: int, _opaque: Any) -> None:
        self.seen.append((time.monotonic(), event, detail))
        handler = self.handler
        if handler is not None:
            handler(event, detail)

    def close(self) -> None:
        try:
            self.conn.domainEventDeregisterAny(self._id)
        finally:
            self.conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def kill_on_event(lifecycle: Lifecycle, proc: subprocess.Popen[bytes], event: int,
                  before: Callable[[], None] | None = None) -> threading.Event:
    """SIGKILL ``proc`` at the first ``event`` (e.g. VIR_DOMAIN_EVENT_SUSPENDED).

    ``before`` runs first (e.g. stop the guard).  The returned flag is set
    once the kill was sent.
    """
    done = threading.Event()

    def handler(ev: int, _detail: int) -> None:
        if ev != event or done.is_set():
            return
        if before is not None:
            before()
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        done.set()

    lifecycle.handler = handler
    return done


def spawn_backup(root: Path, name: str, logs: Path, *argv: str,
                 config_dir: Path | None = None) -> subprocess.Popen[bytes]:
    """``vmbk-backup --json --backup-path ROOT --vm NAME ARGV...`` as a process.

    Its stdout and stderr go to ``logs.out`` and ``logs.err``.
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if config_dir is not None:
        env["VMBK_CONFIG_DIR"] = str(config_dir)
    with open(logs.with_suffix(".out"), "wb") as out, open(logs.with_suffix(".err"), "wb") as err:
        return subprocess.Popen(
            [sys.executable, str(ROOT / "bin" / "vmbk-backup"), "--json", "--backup-path", str(root),
             "--vm", name, *argv], stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env)


def kill_when(proc: subprocess.Popen[bytes], condition: Callable[[], bool], *, timeout: float = 60,
              interval: float = 0.002) -> bool:
    """SIGKILL ``proc`` as soon as ``condition()``; False when it ended first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if condition():
            proc.kill()
            proc.wait()
            return True
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError("the kill condition never came true")
        time.sleep(interval)
    return False


def domain_state(dom: libvirt.virDomain) -> str:
    state, reason = dom.state()
    if state == libvirt.VIR_DOMAIN_RUNNING:
        return "running"
    if state == libvirt.VIR_DOMAIN_PAUSED:
        return f"paused (reason {reason})"
    return f"state {state} (reason {reason})"


def marker_of(dom: libvirt.virDomain) -> Path:
    return hold.marker_path(dom.UUIDString())


def wait_released(dom: libvirt.virDomain, timeout: float = 10.0) -> float:
    """Until the domain runs and its hold marker is gone; the seconds it took."""
    t0 = time.monotonic()
    while domain_state(dom) != "running" or marker_of(dom).exists():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{dom.name()}: {domain_state(dom)}, marker "
                                 f"{'left' if marker_of(dom).exists() else 'gone'} {timeout:g} s after the kill")
        time.sleep(0.02)
    return time.monotonic() - t0


def no_job(dom: libvirt.virDomain) -> bool:
    return dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE


def wait_no_job(dom: libvirt.virDomain, timeout: float = 10.0) -> float:
    """Until libvirt has no job for the domain (an aborted pull job takes a
    moment to go); the seconds it took."""
    t0 = time.monotonic()
    while not no_job(dom):
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{dom.name()}: a libvirt job is left: {dom.jobInfo()}")
        time.sleep(0.02)
    return time.monotonic() - t0


def scratch_files() -> set[Path]:
    """Scratch files of pull jobs in vmbk's run directory: libvirt makes them
    at the start of ``backupBegin``.  Other runs remove their directories
    meanwhile: a glob that trips over one counts as nothing new."""
    try:
        return set(RUN_DIR.glob("backup-*/scratch.*"))
    except OSError:
        return set()


def allocated(paths: Iterable[Path]) -> int:
    """Bytes allocated to the files that still exist (a .partial is renamed at any moment)."""
    total = 0
    for path in paths:
        try:
            total += path.stat().st_blocks * 512
        except FileNotFoundError:
            pass
    return total


def job_started(dom: libvirt.virDomain) -> bool:
    """A job runs, or is being set up (libvirt then says "backup job data missing")."""
    try:
        return not no_job(dom)
    except libvirt.libvirtError:
        return True


def proc_stat_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2:].split()[0]
