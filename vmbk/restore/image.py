"""One restored disk: the merged chain written thin into a checked qcow2.

DESIGN, "Restore of one disk": the extent maps of the chain are merged
first (`vmbk.stream.merge_chain`, newest frame wins), so every byte of the
target is written once whatever the length of the chain; zeroes become
holes, so the image stays thin.  The steps, each file beside the target:

1. ``<target>.raw.partial``: a sparse raw file of the disk's virtual size;
   the merged data segments are written into it at their offsets, zero
   segments and never-written ranges stay holes (`write_raw`);
2. ``qemu-img convert -W -f raw -O qcow2`` into ``<target>.partial`` (``-W``,
   out-of-order writes into the fresh image, halves the convert time), with the
   source image's qcow2 options when the backup kept them in
   ``<dev>.<ident>.qcow.json`` (compat, cluster size, lazy refcounts: what
   virtnbdrestore's ``getQcowConfig`` applies); convert skips the holes;
3. ``qemu-img check`` of the ``.partial`` (vmrestore guide, 14: a failed
   check aborts the restore, exit 4); the raw file is removed.

The rename to the final name is `commit`, done by the caller once every
disk of the restore is ready, so a failure leaves no half-restored set:
`discard` removes whatever this module wrote.  Nothing is ever written
next to the source streams.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from vmbk.errors import DependencyError, StorageError, ToolError, VmbkError
from vmbk.fsutil import fsync_dir
from vmbk.stream import StreamReader, merge_chain, scan, verify_checksum
from vmbk.stream.chain import Segment
from vmbk.stream.format import KIND_DATA

log = logging.getLogger("vmbk.restore")

IMAGE_MODE = 0o600
MAX_QCOW_JSON = 1 << 20


@dataclasses.dataclass(frozen=True)
class DiskJob:
    """What to build for one disk: its streams (oldest first) and its target."""

    disk: str
    sources: tuple[Path, ...]
    target: Path
    virtual_size: int
    data_bytes: int
    qcow_options: tuple[str, ...] = ()

    @property
    def partial(self) -> Path:
        return self.target.with_name(self.target.name + ".partial")

    @property
    def raw(self) -> Path:
        return self.target.with_name(self.target.name + ".raw.partial")


@dataclasses.dataclass(frozen=True)
class Built:
    disk: str
    seconds: float
    data_bytes: int


def measure(sources: Sequence[Path]) -> tuple[int, int]:
    """(virtual size, bytes of data the merged chain writes), from headers only."""
    maps = [scan(p) for p in sources]
    segments = merge_chain(maps)
    return maps[-1].meta.virtual_size, sum(s.length for s in segments if s.kind == KIND_DATA)


def qcow_options(chain_dir: Path, disk: str, ident: str, idents: Sequence[str]) -> tuple[str, ...]:
    """qcow2 creation options from ``<disk>.<ident>.qcow.json``.

    The restore point's own file first, else the newest one of the chain
    (``idents`` oldest first); none, or an unreadable one, means qemu-img's
    defaults.  The file is ``qemu-img info --output=json`` of the source
    image at backup time, so a raw source yields no options.
    """
    for cand in (ident, *reversed(idents)):
        path = chain_dir / f"{disk}.{cand}.qcow.json"
        try:
            with open(path, "rb") as fh:
                info = json.loads(fh.read(MAX_QCOW_JSON))
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as e:
            log.warning("%s: unreadable (%s); qemu-img defaults are used", path, e)
            return ()
        if not isinstance(info, dict) or info.get("format") != "qcow2":
            return ()
        data = (info.get("format-specific") or {}).get("data") or {}
        out = []
        if isinstance(data.get("compat"), str):
            out.append(f"compat={data['compat']}")
        if isinstance(info.get("cluster-size"), int):
            out.append(f"cluster_size={info['cluster-size']}")
        if data.get("lazy-refcounts") is True:
            out.append("lazy_refcounts=on")
        return tuple(out)
    return ()


def verify_sources(paths: Iterable[Path]) -> list[Path]:
    """Check every stream against its ``.chksum`` before anything is written.

    A flipped byte inside a data payload passes every structural check and
    would be restored silently; the adler32 of the whole file catches it.
    Returns the files that have no ``.chksum`` (older virtnbdbackup).
    StreamError (exit 4) on the first mismatch.
    """
    unchecked = []
    for path in dict.fromkeys(paths):
        if not verify_checksum(path):
            unchecked.append(path)
    return unchecked


def write_raw(sources: Sequence[Path], target: Path) -> int:
    """The merged chain as a sparse raw file; returns the data bytes written.

    Each data segment is written once (newest frame wins).  An
    uncompressed payload goes file to file with ``copy_file_range`` (no
    copy through Python; a reflink where the filesystem can); compressed
    ones, or kernels/filesystems that refuse it, go through
    `StreamReader.iter_chunks` and ``pwrite``.
    """
    maps = [scan(p) for p in sources]
    segments = merge_chain(maps)
    readers = [StreamReader(p, m) for p, m in zip(sources, maps, strict=True)]
    fds: list[int] = []
    written = 0
    try:
        fds += [os.open(p, os.O_RDONLY | os.O_CLOEXEC) for p in sources]
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, IMAGE_MODE)
        try:
            os.ftruncate(fd, maps[-1].meta.virtual_size)
            fast = True
            for seg in segments:
                if seg.kind != KIND_DATA:
                    continue
                if fast and not seg.frame.pieces:
                    fast = _copy_range(fds[seg.source], maps[seg.source].path, seg, fd)
                    if fast:
                        written += seg.length
                        continue
                for off, chunk in readers[seg.source].iter_chunks(seg.frame, seg.frame_offset, seg.length):
                    view = memoryview(chunk)
                    while view.nbytes:
                        n = os.pwrite(fd, view, off)
                        view, off = view[n:], off + n
                written += seg.length
        finally:
            os.close(fd)
    finally:
        for r in readers:
            r.close()
        for src_fd in fds:
            os.close(src_fd)
    return written


def _copy_range(src_fd: int, path: str, seg: Segment, fd: int) -> bool:
    """Copy an uncompressed segment in the kernel; False when it cannot be done."""
    src, dst, left = seg.frame.file_pos + seg.frame_offset, seg.offset, seg.length
    try:
        while left:
            n = os.copy_file_range(src_fd, fd, left, src, dst)
            if n <= 0:
                raise StorageError(f"{path}: file ends inside a data payload at byte {src}")
            src, dst, left = src + n, dst + n, left - n
    except OSError as e:
        if left != seg.length or e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise StorageError(f"copying {path} into the restored image: {e.strerror}") from None
        log.debug("copy_file_range: %s; copying through memory", e)
        return False
    return True


def _qemu_img(argv: list[str], what: str, error: type[VmbkError] = ToolError) -> None:
    try:
        r = subprocess.run(["qemu-img", *argv], capture_output=True, check=False)
    except FileNotFoundError:
        raise DependencyError("qemu-img is not installed (apt-get install qemu-utils)") from None
    if r.returncode != 0:
        lines = (r.stderr or r.stdout).decode("utf-8", "replace").strip().splitlines()
        raise error(f"qemu-img {what} failed ({r.returncode}): {lines[-1] if lines else 'no message'}")


def build(job: DiskJob) -> Built:
    """Write ``job.partial``: a checked qcow2 of the merged chain (not yet renamed)."""
    started = time.monotonic()
    try:
        write_raw(job.sources, job.raw)
        opts = ["-o", ",".join(job.qcow_options)] if job.qcow_options else []
        _qemu_img(["convert", "-q", "-W", "-f", "raw", "-O", "qcow2", *opts, "--", str(job.raw), str(job.partial)],
                  f"convert of {job.disk}")
        _qemu_img(["check", "-q", "-f", "qcow2", "--", str(job.partial)], f"check of the restored {job.disk}",
                  StorageError)
        os.chmod(job.partial, IMAGE_MODE)
    except BaseException:
        discard([job])
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(job.raw)
    return Built(job.disk, time.monotonic() - started, job.data_bytes)


def commit(jobs: Sequence[DiskJob]) -> None:
    """Rename every ``.partial`` to its final name and make it durable."""
    for job in jobs:
        fd = os.open(job.partial, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(job.partial, job.target)
    for parent in {job.target.parent for job in jobs}:
        fsync_dir(parent)


def discard(jobs: Iterable[DiskJob]) -> None:
    """Remove the temporary files of ``jobs`` (never a committed target)."""
    for job in jobs:
        for path in (job.raw, job.partial):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
