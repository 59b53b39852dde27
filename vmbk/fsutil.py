"""Files and directories of the backup tree: permissions and atomic writes.

Permission model (vmbackup README, "SGID and permissions"): directories
2750 owned root:backup, files 640, so members of the ``backup`` group can
browse and read the tree and nobody else can.  The SGID bit makes every
new file inherit the group, whoever writes it (vmbk, qemu-nbd, rsync).
Secrets (TPM state, BitLocker keys) are the exception: root-only, 0600 /
0700 without SGID (`ensure_secret_dir`).

Nothing in the tree ever looks complete before it is: data goes to
``<name>.partial`` and is renamed into place after fsync (`atomic_write`).
"""

from __future__ import annotations

import contextlib
import grp
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

Buffer = bytes | bytearray | memoryview

DIR_MODE = 0o2750
FILE_MODE = 0o640
SECRET_DIR_MODE = 0o700
SECRET_FILE_MODE = 0o600
UMASK = 0o027
BACKUP_GROUP = "backup"
PARTIAL = ".partial"


def backup_gid() -> int | None:
    """gid of the ``backup`` group when we may give files to it (root)."""
    if os.geteuid() != 0:
        return None
    try:
        return grp.getgrnam(BACKUP_GROUP).gr_gid
    except KeyError:
        return None


def ensure_dir(path: Path, mode: int = DIR_MODE) -> Path:
    """Create ``path`` and missing parents with the tree's mode and group."""
    path = Path(path)
    if path.is_dir():
        return path
    if not path.parent.exists():
        ensure_dir(path.parent, mode)
    try:
        os.mkdir(path, mode & 0o777)
    except FileExistsError:
        if not path.is_dir():
            raise
        return path
    gid = backup_gid()
    if gid is not None:
        os.chown(path, -1, gid)
    os.chmod(path, mode)  # mkdir ignores the SGID bit and obeys the umask
    return path


def ensure_root(path: Path) -> bool:
    """Give an existing backup root vmbackup's owner and mode; True when changed.

    vmbackup (``ensure_backup_path_sgid``, at the start of every run) sets
    the root to ``root:backup 2750`` when the ``backup`` group exists and
    the root is not in it or lacks the SGID bit; a root made by hand
    (``mkdir``, 755) is fixed so.  vmbk does the same, as root only (it
    cannot give files away otherwise) and only when the group exists; a
    root that already has the group and SGID keeps its mode (an admin's
    2770 stays).  The tree below is left alone: vmbk creates it right.
    """
    path = Path(path)
    gid = backup_gid()
    if gid is None or not path.is_dir() or path.is_symlink():
        return False
    st = path.stat()
    if st.st_gid == gid and st.st_mode & 0o2000:
        return False
    os.chown(path, 0, gid)
    os.chmod(path, DIR_MODE)
    return True


def ensure_secret_dir(path: Path) -> Path:
    """A root-only directory (no SGID, no group access) for key material."""
    path = Path(path)
    path.mkdir(mode=SECRET_DIR_MODE, parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(path, 0, 0)
    os.chmod(path, SECRET_DIR_MODE)
    return path


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + PARTIAL)


def fsync_dir(path: Path) -> None:
    fsync_path(path, os.O_DIRECTORY)


def pwritev_all(fd: int, bufs: Sequence[Buffer], pos: int) -> None:
    """Write every buffer at ``pos`` onwards, however short the kernel's writes."""
    views = [memoryview(b).cast("B") for b in bufs if len(memoryview(b))]
    while views:
        n = os.pwritev(fd, views, pos)
        if n <= 0:
            raise OSError(0, "write returned 0")
        pos += n
        while n:
            first = views[0]
            if n >= first.nbytes:
                n -= first.nbytes
                views.pop(0)
            else:
                views[0] = first[n:]
                n = 0


def pwrite_all(fd: int, buf: Buffer, pos: int) -> None:
    pwritev_all(fd, [buf], pos)


def fsync_path(path: Path, flags: int = 0) -> None:
    """fsync a file (or, with ``os.O_DIRECTORY``, a directory) by its name."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: Path, mode: int = FILE_MODE, binary: bool = True) -> Iterator[IO[bytes]]:
    """Write ``path`` through ``path.partial``; rename only on success.

    On any exception (signals included) the partial file is removed and the
    target is left as it was.
    """
    path = Path(path)
    tmp = partial_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb" if binary else "w", closefd=True) as f:
            fd = -1
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_file_atomic(path: Path, data: bytes, mode: int = FILE_MODE) -> None:
    with atomic_write(path, mode) as f:
        f.write(data)


def dir_size(path: Path) -> int:
    """Bytes of the regular files below ``path`` (``du -sb``), links not followed."""
    total = 0
    stack = [Path(path)]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(Path(e.path))
                    elif e.is_file(follow_symlinks=False):
                        total += e.stat(follow_symlinks=False).st_size
        except OSError:
            continue
    return total
