"""Locked markers in the run directory: what a session creates, named before it exists.

Sessions that leave state a dead process cannot undo (a drill's throwaway
VM, ``--mount``'s loop devices and FUSE files, ``--instant``'s guest on
overlays) write ``RUN_DIR/<prefix><id>.json`` (``VMBK_RUN_DIR``,
``/var/tmp/vmbk``) before the first of those things exists: under a
temporary name, ``flock``'ed, fsynced, renamed into place with its
directory fsynced.  The session holds the lock until everything is gone;
the marker goes last (`Marker.release`).

The kernel drops an ``flock`` when its process dies, however it dies: a
marker whose lock can be taken belongs to a session that is gone -- no
PID to be reused, no clock to trust, and two live sessions never take
each other's.  `dead` yields such markers, locked meanwhile so that two
sweeps never work on one; a temporary one (its session died before the
rename, having created nothing) is removed on the way.  The caller
removes what a marker names, then the marker; one left in place is tried
again by the next run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vmbk.fsutil import fsync_dir
from vmbk.virt import backupjob

log = logging.getLogger("vmbk")

#: Largest marker read back (a marker is a few hundred bytes).
MAX_MARKER = 1 << 20


def run_dir() -> Path:
    return backupjob.RUN_DIR


def path_of(prefix: str, ident: str) -> Path:
    return run_dir() / f"{prefix}{ident}.json"


class Marker:
    """A live session's marker; its fd holds the lock until `release`."""

    def __init__(self, prefix: str, ident: str, data: dict[str, Any]) -> None:
        d = run_dir()
        d.mkdir(parents=True, exist_ok=True)
        self.path = path_of(prefix, ident)
        tmp = d / f".{prefix}{ident}.tmp"
        self._fd: int | None = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            os.write(self._fd, json.dumps({**data, "pid": os.getpid()}).encode())
            os.fsync(self._fd)
            os.rename(tmp, self.path)
            fsync_dir(d)
        except BaseException:
            os.close(self._fd)
            self._fd = None
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    def release(self) -> None:
        """Everything the marker names is gone: remove it, then drop its lock."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
            fsync_dir(self.path.parent)
        finally:
            os.close(self._fd)
            self._fd = None


def held(path: Path) -> bool:
    """Is ``path`` the marker of a live session (it exists and its lock is taken)?"""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return path.exists()
    finally:
        os.close(fd)
    return False


def abandon(marker: Marker) -> None:
    """Drop the lock and keep the marker: a session that could not remove all it
    made leaves the rest to the next run's sweep (and its death does the same)."""
    if marker._fd is not None:
        os.close(marker._fd)
        marker._fd = None


def dead(prefix: str) -> Iterator[tuple[Path, dict[str, Any]]]:
    """``(marker, content)`` of every ``prefix`` marker whose session is gone, locked while yielded.

    Content that is not a JSON object yields ``{}``: the caller decides
    whether such a marker is to be removed.
    """
    d = run_dir()
    if not d.is_dir():
        return
    for path in sorted(d.glob(f".{prefix}*.tmp")) + sorted(d.glob(f"{prefix}*.json")):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its session is alive
            if not path.exists():
                continue  # released just before we locked it
            if path.name.startswith("."):  # died before the rename: it created nothing
                path.unlink(missing_ok=True)
                continue
            try:
                data = json.loads(os.read(fd, MAX_MARKER) or b"{}")
            except ValueError:
                data = {}
            yield path, data if isinstance(data, dict) else {}
        finally:
            os.close(fd)
