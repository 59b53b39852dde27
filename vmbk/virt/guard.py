"""The guard of a hold: ``python -m vmbk.virt.guard MARKER OWNER_PID``.

Started by `vmbk.virt.hold.Hold` before vmbk pauses a domain or freezes
its guest (see that module for the whole design).  Protocol, on pipes:

* the guard writes ``ready`` on stdout once it reads its pipe, then
  closes stdout;
* it reads stdin to EOF.  ``released`` before EOF: vmbk undid the hold
  itself; the guard exits 0 without touching anything.  EOF without it:
  vmbk died (its end of the pipe closes with it), and the guard undoes
  what the marker says -- when the marker is there and was written by
  OWNER_PID -- then removes the marker and exits.  ``undone`` before EOF:
  vmbk died after it resumed/thawed: the marker is only removed.
  ``held``: the suspend returned, none is in flight in libvirtd (without
  it a guard that finds the domain running watches for a late one).

It ignores SIGINT, SIGTERM and SIGHUP (the signal that makes vmbk unwind
must not take its guard first) and runs in its own session.  Every step
after EOF is bounded (libvirt retried for `hold.GUARD_RETRY_FOR` seconds),
so it never outlives its purpose.  Messages go to stderr (inherited from
vmbk: the cron mail or journal of the run that died).  Exit codes: 0
nothing to do or done, 1 could not undo (the marker stays for the next
run), 2 usage.

libvirt and `vmbk.virt.hold` are imported only when there is something to
do (after EOF), not before ``ready``: a guard is started for every pause,
and nearly every one is released unused.  The imports took 0.05-0.1 s of
CPU per guard (0.11 s from start to ``ready`` against 0.02 s without
them), the largest fixed cost of a VM in a fleet's backup (bench/scale.py
--fleet); after a death they delay the undo by about as much.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path


def _say(msg: str) -> None:
    try:
        sys.stderr.write(f"vmbk-guard: {msg}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def _messages() -> set[str]:
    """What vmbk said, up to ``released`` or EOF."""
    data = b""
    while b"released\n" not in data:
        try:
            chunk = os.read(0, 4096)
        except OSError:
            chunk = b""
        if not chunk:
            break
        data += chunk
    return {line.decode("ascii", "replace") for line in data.split(b"\n")[:-1]}


def _act(marker_path: Path, owner: int, said: set[str]) -> int:
    from vmbk.virt import hold
    from vmbk.virt.connection import LibvirtError, libvirt_module

    libvirt = libvirt_module()
    marker = hold.read_marker(marker_path)
    if marker is None or marker.get("pid") != owner:
        return 0  # released in time, never written, or another vmbk's
    if "undone" in said:
        hold.remove_marker(marker_path)  # vmbk died after it resumed/thawed
        return 0
    name = marker.get("name") or "?"
    deadline = time.monotonic() + hold.GUARD_RETRY_FOR
    last = ""
    while True:
        conn = None
        try:
            conn = libvirt.open(marker.get("uri") or None)
            dom = conn.lookupByUUIDString(marker["uuid"])
            done = hold.undo(dom, marker, inflight="held" not in said)
            if done:
                _say(f"{name}: vmbk (pid {owner}) died holding it {marker['action']}: {done} it")
            hold.remove_marker(marker_path)
            return 0
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                hold.remove_marker(marker_path)
                return 0
            last = e.get_error_message()
        except LibvirtError as e:
            last = str(e)
        finally:
            if conn is not None:
                try:
                    conn.close()
                except libvirt.libvirtError:
                    pass
        if time.monotonic() > deadline:
            _say(f"{name}: vmbk (pid {owner}) died holding it {marker['action']} and it could not be undone "
                 f"({last}); the next vmbk run for it tries again")
            return 1
        time.sleep(1.0)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or not args[1].isdigit():
        _say("usage: python -m vmbk.virt.guard MARKER OWNER_PID")
        return 2
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    try:
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        sys.stdout.close()
    except OSError:
        pass
    said = _messages()
    if "released" in said:
        return 0
    return _act(Path(args[0]), int(args[1]), said)


if __name__ == "__main__":
    sys.exit(main())
