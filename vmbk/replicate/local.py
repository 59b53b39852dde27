"""The ``local`` transport: rsync to a mounted path (a disk, NFS, virtiofs, CIFS).

The destination directory must exist: a mount point whose file system is
not mounted is an empty directory or none at all, and copying a backup
tree onto the root file system instead is what this check prevents.
Renames and deletions are plain file-system calls (a rename is atomic; a
deleted ``.cpt`` is synced away before the data it listed).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from vmbk.fsutil import ensure_dir, ensure_secret_dir, fsync_dir, fsync_path
from vmbk.replicate import files
from vmbk.replicate.rsync import PARTIAL_DIR, Rsync
from vmbk.replicate.transport import Batch, Space, Transport, Unreachable, failure
from vmbk.settings import Replication


def durable(root: Path, rels: Sequence[str]) -> None:
    """fsync the files a phase wrote, then their directories: on disk before
    the next phase begins, so the order of the phases survives a power cut.

    After the copy rather than during it (rsync's ``--fsync`` flushes each
    file before writing the next: 7% of a 3 GiB copy here), and per file
    rather than syncfs(2), which also waits for every other writer of the
    file system.
    """
    for rel in rels:
        with contextlib.suppress(FileNotFoundError):
            fsync_path(root / rel)
    for d in sorted({(root / rel).parent for rel in rels}):
        with contextlib.suppress(FileNotFoundError):
            fsync_dir(d)


class LocalTransport(Transport):
    kind = "local"
    #: rsync keeps nanoseconds, os.stat reads them back.
    tolerance = 0.001

    def __init__(self, dest: Replication, workdir: Path) -> None:
        super().__init__(dest, workdir)
        self.root = Path(dest.path)
        self.rsync = Rsync(str(self.root), rsh=None, bwlimit_kbps=dest.bwlimit_kbps, workdir=workdir)

    def space(self) -> Space:
        if not self.root.is_dir():
            raise failure(Unreachable, f"{self.root} does not exist or is not a directory (not mounted?)", None)
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise failure(Unreachable, f"{self.root} is not writable", None)
        st = os.statvfs(self.root)
        return Space(st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize)

    def listing(self, vms: Sequence[str] | None = None) -> files.Listing:
        out: files.Listing = {}
        for vm in files.source_vms(self.root) if vms is None else vms:
            out.update(files.walk(self.root, vm))
        if vms is None and (self.root / files.CATALOGUE).is_file():
            st = (self.root / files.CATALOGUE).stat()
            out[files.CATALOGUE] = files.Entry(st.st_size, st.st_mtime)
        return out

    def send(self, src_root: Path, phases: Sequence[Batch]) -> None:
        for new, updates in phases:
            batch = sorted({*new, *updates})
            self.rsync.push(src_root, batch, what=f"copy to {self.root}")
            durable(self.root, batch)

    def move(self, moves: Sequence[tuple[str, str]]) -> None:
        touched: set[Path] = set()
        for a, b in moves:
            src, dst = self.root / a, self.root / b
            if files.is_secret(b):
                ensure_secret_dir(dst.parent)
            else:
                ensure_dir(dst.parent)
            with contextlib.suppress(FileNotFoundError):
                os.rename(src, dst)
            touched |= {src.parent, dst.parent}
        for d in touched:
            with contextlib.suppress(FileNotFoundError):
                fsync_dir(d)

    def remove(self, rels: Sequence[str], dirs: Sequence[str]) -> None:
        for i, rel in enumerate(rels):
            path = self.root / rel
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            if i == 0 or rel.endswith(".cpt"):
                # the commit marker is gone for good before the data it listed
                with contextlib.suppress(FileNotFoundError):
                    fsync_dir(path.parent)
        for d in dirs:
            path = self.root / d
            shutil.rmtree(path / PARTIAL_DIR, ignore_errors=True)
            try:
                path.rmdir()
            except FileNotFoundError:
                pass
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise

    def mismatches(self, local_root: Path, rels: Sequence[str]) -> list[str]:
        return self.rsync.differing(local_root, rels, what=f"checksums against {self.root}")

    def fetch(self, rels: Sequence[str], local_root: Path) -> None:
        self.rsync.pull(rels, local_root, what=f"copy from {self.root}")
