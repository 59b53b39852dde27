"""What a ``--mount`` or ``--instant`` session creates is named before it exists.

Both leave state a dead process cannot undo: mounts, loop devices and
FUSE files (``--mount``); a guest running on overlays of an export that
is gone, and half-copied images (``--instant``).  So before the first of
them exists the session writes ``RUN_DIR/access-<id>.json``
(``VMBK_RUN_DIR``, ``/var/tmp/vmbk``) naming its kind and what it may
create, under a temporary name, fsynced, ``flock``'ed and renamed into
place, and holds the lock until everything is gone; the marker goes last.
The kernel drops the lock with the process however it dies, so a marker
whose lock can be taken belongs to a session that is gone: no PID to be
reused, and two live sessions never take each other's (the drill's
markers work the same way, `vmbk.drill.leftovers`).

`dead` yields the content of every such marker (locked meanwhile, so
two sweeps never work on one); the session kinds' own sweeps
(`vmbk.restore.mount.sweep`, `vmbk.restore.instant.sweep`) remove what
it names and then the marker.  Every ``--serve``, ``--mount`` and
``--instant`` run sweeps first.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vmbk.fsutil import fsync_dir
from vmbk.virt import backupjob

log = logging.getLogger("vmbk.restore")

PREFIX = "access-"


def run_dir() -> Path:
    return backupjob.RUN_DIR


class Marker:
    """A live session's marker; its fd holds the lock until `release`."""

    def __init__(self, kind: str, data: dict[str, Any]) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.kind = kind
        d = run_dir()
        d.mkdir(parents=True, exist_ok=True)
        self.path = d / f"{PREFIX}{self.id}.json"
        tmp = d / f".{PREFIX}{self.id}.tmp"
        body = json.dumps({"kind": kind, "id": self.id, "pid": os.getpid(), **data}).encode()
        self._fd: int | None = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            os.write(self._fd, body)
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


def dead(kind: str) -> Iterator[tuple[Path, dict[str, Any]]]:
    """``(marker, content)`` of every ``kind`` marker whose session is gone, locked while yielded.

    The caller removes the marker when it removed what it names; a marker
    left in place is tried again by the next run.
    """
    d = run_dir()
    if not d.is_dir():
        return
    for path in sorted(d.glob(f".{PREFIX}*.tmp")) + sorted(d.glob(f"{PREFIX}*.json")):
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
                data = json.loads(os.read(fd, 1 << 20) or b"{}")
            except ValueError:
                data = {}
            if not isinstance(data, dict) or data.get("kind") != kind:
                if not isinstance(data, dict) or "kind" not in data:
                    log.warning("%s: not a marker of vmbk-restore: removed", path)
                    path.unlink(missing_ok=True)
                continue
            yield path, data
        finally:
            os.close(fd)
