"""Quiescing a running guest for the instant a backup job begins.

The best level reached is reported: ``frozen`` (guest filesystems frozen
through the agent: application-consistent), ``paused`` (vCPUs stopped: no
I/O in flight, crash-consistent at one instant across all disks) or
``crash`` (neither was possible).  The instant is short: a pull backup's
point in time is fixed by ``backupBegin``, after which the guest runs on
while we read.

A guest must never be left frozen or paused.  The undo runs in ``finally``
and SIGINT/SIGTERM are blocked from the freeze until the undo is done, so
a signal arriving in that window is delivered after the guest runs again.
SIGKILL cannot be blocked: for it, each suspend/fsFreeze is preceded by a
durable marker and a guard process (`vmbk.virt.hold`): the guard undoes
the hold at once when vmbk dies, and the next vmbk run for the VM when
the guard died too.  The marker is removed only after the undo
succeeded; an undo that failed leaves it, so the next run tries again.

A domain already paused when we come is someone else's (no marker of a
dead vmbk: `hold.heal` ran before): level ``paused``, and it is left
paused.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from typing import Any

from vmbk.virt.connection import libvirt_module
from vmbk.virt.hold import Hold

log = logging.getLogger("vmbk.virt")

FREEZE_TIMEOUT = 30
GUARDED = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block is done (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, GUARDED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _freeze(dom: Any, timeout: int) -> bool:
    libvirt = libvirt_module()
    try:
        with contextlib.suppress(libvirt.libvirtError, AttributeError):
            dom.agentSetResponseTimeout(timeout, 0)
        count = dom.fsFreeze(None, 0)
        log.info("%s: froze %d filesystems", dom.name(), count)
        if count == 0:  # nothing mounted that can freeze: no better than pausing
            _thaw(dom)
        return count > 0
    except libvirt.libvirtError as e:
        log.warning("%s: fsfreeze failed: %s", dom.name(), e.get_error_message())
        return False


def _thaw(dom: Any) -> bool:
    libvirt = libvirt_module()
    for attempt in range(3):
        try:
            dom.fsThaw(None, 0)
            return True
        except libvirt.libvirtError as e:
            log.warning("%s: fsthaw attempt %d failed: %s", dom.name(), attempt + 1, e.get_error_message())
    log.error("%s: could not thaw the guest filesystems: run 'virsh domfsthaw %s'", dom.name(), dom.name())
    return False


def _pause(dom: Any) -> bool:
    libvirt = libvirt_module()
    try:
        dom.suspend()
        return True
    except libvirt.libvirtError as e:
        log.warning("%s: pause failed: %s", dom.name(), e.get_error_message())
        return False


def _resume(dom: Any) -> bool:
    libvirt = libvirt_module()
    try:
        dom.resume()
        return True
    except libvirt.libvirtError as e:
        log.error("%s: could not resume the guest: %s: run 'virsh resume %s'", dom.name(), e.get_error_message(), dom.name())
        return False


@contextlib.contextmanager
def quiesced(dom: Any, *, agent: bool, allow_pause: bool = True, timeout: int = FREEZE_TIMEOUT,
             memory: bool = False) -> Iterator[str]:
    """Freeze (or pause) the guest for the body; yield the level reached.

    ``memory``: the body saves the guest's memory state (`vmbk.backup.memory`):
    always a pause (a frozen guest would be saved frozen), and the marker
    says so, so that a guard aborts a save left in flight before it resumes.
    """
    libvirt = libvirt_module()
    with signals_deferred():
        level = "crash"
        if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
            # Paused by someone else: already still, and theirs to resume.
            yield "paused"
            return
        hold = Hold(dom)
        try:
            if agent and not memory:
                hold.mark("frozen")  # durable before the freeze is asked for
                if _freeze(dom, timeout):
                    level = "frozen"
            if level == "crash" and allow_pause:
                hold.mark("paused", memory=memory)
                if _pause(dom):
                    level = "paused"
            if level != "crash":
                hold.held()
        finally:
            if level == "crash":
                hold.release()  # nothing held (or an error: nothing held either)
        undone = False
        try:
            yield level
        finally:
            if level == "frozen":
                undone = _thaw(dom)
            elif level == "paused":
                undone = _resume(dom)
            hold.release(keep=not undone)
