"""The per-VM lock shared by backup and restore.

``$BACKUP_PATH/_state/locks/vmbackup-<vm>.lock`` — the very file vmbackup
and vmrestore use, holding the owner's PID on its first line, so that
during a migration vmbk and the bash tools exclude each other too.

vmbk holds an ``flock`` on the file for as long as it owns the lock; the
file content is for the bash tools and for people.  Taking a lock:

1. open (create) the file and try ``flock(LOCK_EX | LOCK_NB)``; failure
   means another vmbk process holds it -> conflict;
2. check the file at the path is still the inode we locked (a releasing
   owner unlinks it) or start again;
3. read the PID in it: a live process that is a vmbackup/vmrestore/vmbk
   and not us means a bash tool holds it -> conflict; a dead PID, or one
   reused by an unrelated program, is a stale lock and is taken over in
   place (no unlink, so there is no window for a third process);
4. write our PID.  Release unlinks the file while still holding the flock.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import logging
import os
import time
from pathlib import Path
from types import TracebackType

from vmbk.errors import LockError, StorageError
from vmbk.fsutil import ensure_dir

log = logging.getLogger("vmbk.lock")

OWNER_NAMES = (b"vmbackup", b"vmrestore", b"vmbk")


def lock_dir(backup_path: Path) -> Path:
    return backup_path / "_state" / "locks"


def lock_path(backup_path: Path, vm: str) -> Path:
    """The lock file of a VM; '/' and '%' are escaped so any name is safe."""
    safe = vm.replace("%", "%25").replace("/", "%2F").replace("\0", "%00")
    return lock_dir(backup_path) / f"vmbackup-{safe}.lock"


def _owner_alive(pid: int) -> bool:
    """Is ``pid`` a running process that could own a vmbackup lock?"""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # cannot tell: assume the owner
    return any(name in cmdline for name in OWNER_NAMES)


class VmLock:
    """Context manager holding the lock of one VM."""

    def __init__(self, backup_path: Path, vm: str, *, purpose: str = "backup") -> None:
        self.vm = vm
        self.purpose = purpose
        self.path = lock_path(backup_path, vm)
        self._fd: int | None = None
        self.took_over_stale: int | None = None

    def acquire(self) -> "VmLock":
        try:
            ensure_dir(self.path.parent)
        except OSError as e:
            raise StorageError(f"cannot create lock directory {self.path.parent}: {e.strerror}", vm=self.vm) from None
        for _ in range(50):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    if e.errno in (errno.EAGAIN, errno.EACCES):
                        raise LockError(self._held_message(fd), vm=self.vm) from None
                    raise
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if not same:  # the previous owner released it meanwhile
                    os.close(fd)
                    time.sleep(0.01)
                    continue
                pid = _read_pid(fd)
                if pid and pid != os.getpid() and _owner_alive(pid):
                    raise LockError(self._held_message(fd), vm=self.vm)
                if pid and pid != os.getpid():
                    self.took_over_stale = pid
                    log.warning("%s: clearing stale lock of dead process %d", self.vm, pid)
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n{self.purpose}\n".encode(), 0)
                self._fd = fd
                return self
            except BaseException:
                if self._fd != fd:
                    os.close(fd)
                raise
        raise LockError(f"could not take lock {self.path}: it keeps changing", vm=self.vm)

    def _held_message(self, fd: int) -> str:
        pid = _read_pid(fd)
        who = f" by process {pid}" if pid else ""
        return f"VM {self.vm!r} is locked{who} ({self.path}): another backup or restore is running"

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "VmLock":
        return self.acquire()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


@dataclasses.dataclass(frozen=True)
class LockState:
    """What a VM's lock file says: ``free`` (none), ``held`` (by a live
    vmbk/vmbackup/vmrestore), ``stale`` (its owner is gone: the next backup
    takes it over) or ``unknown`` (unreadable)."""

    state: str
    pid: int | None
    path: Path


def probe(backup_path: Path, vm: str) -> LockState:
    """The lock of ``vm`` as it is, read without taking it.

    Taking the flock, even for an instant, would make a backup starting at
    that instant fail with a lock conflict; so the owner is judged as
    `VmLock.acquire` judges it (the PID in the file, alive and one of
    ours), and a file without a PID yet by the kernel's list of flocks.
    """
    path = lock_path(backup_path, vm)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return LockState("free", None, path)
    except OSError:
        return LockState("unknown", None, path)
    try:
        pid = _read_pid(fd)
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if pid is not None:
        return LockState("held" if pid != os.getpid() and _owner_alive(pid) else "stale", pid, path)
    return LockState("held" if _flocked(st) else "stale", None, path)


def _flocked(st: os.stat_result) -> bool:
    """Does any process hold a flock on the file of ``st`` (/proc/locks)?"""
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        text = Path("/proc/locks").read_text()
    except OSError:
        return False
    return any(len(f) > 5 and f[1] == "FLOCK" and f[5] == ident for f in (line.split() for line in text.splitlines()))


def _read_pid(fd: int) -> int | None:
    data = os.pread(fd, 64, 0)
    first = data.split(b"\n", 1)[0].strip()
    return int(first) if first.isdigit() else None
