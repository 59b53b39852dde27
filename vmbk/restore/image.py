"""One restored disk: the merged chain written thin into a checked qcow2.

DESIGN, "Restore of one disk": the extent maps of the chain are merged
first (`vmbk.stream.merge_chain`, newest frame wins), so every byte of the
target is written once whatever the length of the chain; zeroes become
holes, so the image stays thin.  The steps, each file beside the target:

1. ``<target>.partial``: the qcow2, written directly (`write_qcow2`:
   `vmbk.stream.chainread` assembles the chain's non-zero clusters in
   disk order, `vmbk.restore.qcow2` lays them out and writes the
   metadata), with the source image's qcow2 options when the backup kept
   them in ``<dev>.<ident>.qcow.json`` (compat, cluster size, lazy
   refcounts: what virtnbdrestore's ``getQcowConfig`` applies).  One pass
   over the data: the former ``.raw.partial`` + ``qemu-img convert`` wrote
   the disk twice and took 2.5-3x as long (bench/restore.py);
2. with ``build(verify=True)`` the streams' ``.chksum`` are checked by a
   thread meanwhile (`vmbk.restore.checker`) instead of in a pass of their
   own before (`verify_sources`); the build fails if one does not match;
3. ``qemu-img check`` of the ``.partial`` (vmrestore guide, 14: a failed
   check aborts the restore, exit 4).

The rename to the final name is `commit`, done by the caller once every
disk of the restore is ready, so a failure leaves no half-restored set:
`discard` removes whatever this module wrote.  Nothing is ever written
next to the source streams.  `write_raw` is the raw variant (in-place
restore of a raw disk).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from vmbk.errors import DependencyError, StorageError, ToolError, VmbkError
from vmbk.fsutil import fsync_dir, pwrite_all
from vmbk.restore import qcow2
from vmbk.restore.checker import SourceCheck
from vmbk.stream import merge_chain, verify_checksum
from vmbk.stream.chainread import ChainImage, scan_cached
from vmbk.stream.format import KIND_DATA
from vmbk.tree import names

log = logging.getLogger("vmbk.restore")

IMAGE_MODE = 0o600
MAX_QCOW_JSON = 1 << 20
RAW_UNIT = 64 << 10  # write_raw leaves holes of this granularity


@dataclasses.dataclass(frozen=True)
class DiskRestore:
    """What to build for one disk: its streams (oldest first) and its target."""

    disk: str
    sources: tuple[Path, ...]
    target: Path
    virtual_size: int
    data_bytes: int
    qcow_options: tuple[str, ...] = ()
    #: The sources' stream digests from their manifests (None: none), checked with their .chksum.
    digests: tuple[str | None, ...] = ()
    #: --force: a source that fails its checks is restored all the same (and named).
    tolerate: bool = False

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
    unchecked: tuple[Path, ...] = ()  # sources without a .chksum (build with verify=True)


def measure(sources: Sequence[Path]) -> tuple[int, int]:
    """(virtual size, bytes of data the merged chain writes), from headers only."""
    maps = [scan_cached(p) for p in sources]
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
        path = chain_dir / names.qemu_info_name(disk, cand)
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
    """The merged chain as a sparse raw file; returns the bytes written.

    Runs of 64 KiB units that hold data (`ChainImage.runs`) are written at
    their offsets into a fresh file of the disk's size; everything else,
    zero frames and data that is all zeroes included, stays a hole.
    """
    with ChainImage(sources) as img:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, IMAGE_MODE)
        try:
            os.ftruncate(fd, img.virtual_size)
            written = 0
            for off, view in img.runs(RAW_UNIT):
                view = view[:img.virtual_size - off]
                pwrite_all(fd, view, off)
                written += view.nbytes
        finally:
            os.close(fd)
    return written


def write_qcow2(sources: Sequence[Path], target: Path, options: Sequence[str] = (),
                check: Callable[[], None] | None = None) -> int:
    """The merged chain as a new qcow2 (`vmbk.restore.qcow2`); returns the bytes of data written.

    ``options``: as `qcow_options` returns them; ``check`` is called
    between windows (it raises to stop the write).
    """
    opts = qcow2.ImageOptions.parse(options)
    with ChainImage(sources) as img:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, IMAGE_MODE)
        try:
            out = qcow2.Writer(fd, img.virtual_size, opts)
            for off, view in img.runs(opts.cluster_size, check=check):
                out.write(off, view)
            out.finish()
        finally:
            os.close(fd)
    return out.data_clusters * opts.cluster_size


def _qemu_img(argv: list[str], what: str, error: type[VmbkError] = ToolError) -> None:
    try:
        r = subprocess.run(["qemu-img", *argv], capture_output=True, check=False)
    except FileNotFoundError:
        raise DependencyError("qemu-img is not installed (apt-get install qemu-utils)") from None
    if r.returncode != 0:
        lines = (r.stderr or r.stdout).decode("utf-8", "replace").strip().splitlines()
        raise error(f"qemu-img {what} failed ({r.returncode}): {lines[-1] if lines else 'no message'}")


def build(job: DiskRestore, *, verify: bool = False, stop: Callable[[], None] | None = None) -> Built:
    """Write ``job.partial``: a checked qcow2 of the merged chain (not yet renamed).

    ``verify``: check the sources' ``.chksum`` meanwhile (`SourceCheck`),
    instead of `verify_sources` before; a mismatch fails the build (and
    wins over the error it may have caused in the writer), the streams
    without a ``.chksum`` are `Built.unchecked`.  ``stop`` is called
    between windows and raises to end the build (a drill's timeout, a
    cancelled worker): the ``.partial`` is removed as on any failure.
    """
    started = time.monotonic()
    checker = SourceCheck(job.sources, job.digests, tolerate=job.tolerate) if verify else None

    def check() -> None:
        if checker is not None:
            checker.raise_if_failed()
        if stop is not None:
            stop()

    try:
        try:
            write_qcow2(job.sources, job.partial, writable_options(job), check=check)
        except Exception:
            if checker is not None:  # a corrupt stream: say what its checksum says
                checker.result()
            raise
        unchecked = tuple(checker.result()) if checker is not None else ()
        _qemu_img(["check", "-q", "-f", "qcow2", "--", str(job.partial)], f"check of the restored {job.disk}",
                  StorageError)
        os.chmod(job.partial, IMAGE_MODE)
    except BaseException:
        if checker is not None:
            checker.stop()
        discard([job])
        raise
    return Built(job.disk, time.monotonic() - started, job.data_bytes, unchecked)


def writable_options(job: DiskRestore) -> tuple[str, ...]:
    """job.qcow_options without the ones the writer cannot make (warned about)."""
    keep = []
    for opt in job.qcow_options:
        try:
            qcow2.ImageOptions.parse([opt])
        except ValueError as e:
            log.warning("%s: %s; qemu-img's default is used", job.disk, e)
            continue
        keep.append(opt)
    return tuple(keep)


def commit(jobs: Sequence[DiskRestore]) -> None:
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


def discard(jobs: Iterable[DiskRestore]) -> None:
    """Remove the temporary files of ``jobs`` (never a committed target)."""
    for job in jobs:
        for path in (job.raw, job.partial):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
