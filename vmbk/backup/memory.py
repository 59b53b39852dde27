"""A running VM's RAM and device state saved with its backup (``--with-memory``).

The order, inside `vmbk.backup.sources.libvirt_export` (the pause is the
hold's: `vmbk.virt.quiesce` with ``memory=True``, so a killed vmbk never
leaves the VM paused):

1. before anything, the domain's devices: one whose state cannot be
   saved (`memstate.unsaveable`: passthrough, virtiofs, ivshmem peers...)
   refuses the state for this VM (``StateSave.refused``); the disks are
   backed up as usual (freeze or pause), and the stage adds an ``error``
   record naming the device;
2. the domain is paused (marker first, ``memory_save`` in it: the guard
   aborts a save in flight before it resumes);
3. `save`: libvirt writes its save image (a memory-only external
   snapshot, `memstate.save`) into ``memory.spool`` in the backup job's
   directory; a thread (`_Follower`) reads the spool as QEMU writes it,
   compresses it into ``vmstate.<ident>.lz4.partial`` in the chain
   directory (lz4 frames, content checksum on, 4 MiB at a time) and
   punches out of the spool what it read, so the spool holds no more than
   the compression is behind.  Bounded by ``memory_pause_timeout``: past
   it the save is aborted and the backup goes on without the state;
4. ``backupBegin`` fixes the disks' view at the same instant, and the
   domain is resumed: the guest's pause is (3) + (4), reported as
   ``memory.pause_seconds``;
5. while the disks are copied the follower drains the spool; `finish`
   fsyncs the state and renames it, then writes the state manifest
   (`vmbk.tree.state`), both before the point's manifest and ``.cpt``,
   which commit them with the point.  A kill before leaves ``.partial``
   files (the next run removes them) or state files of a point the
   ``.cpt`` does not list (never resumable: `vmbk.tree.points`).

Memory use is one 4 MiB buffer and lz4's frame state, whatever the RAM.

Full backups only (`INCREMENTAL`): when the save completes, QEMU 7.2
inactivates the disks (as for a migration: the destination would take
them over), which writes the persistent dirty bitmaps into the images and
unloads them until the VM runs again; ``backupBegin`` of an incremental
then finds its parent checkpoint's bitmap "missing or broken".  A full
creates its checkpoint's bitmap there, which survives the reactivation
(tested: the next incremental, without memory, works).  The alternative,
libvirt's managed save and a start from it (QEMU restarts, disks active),
was tried and dropped: the restarted guest's agent channel reports itself
connected while the backup job holds the domain, libvirt's single event
worker then waits 30 s for the job and gives up, and the agent stays
disconnected for good (and every domain's events wait meanwhile).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import lz4.frame

import vmbk
from vmbk.cancel import Cancelled
from vmbk.clock import now_iso
from vmbk.fsutil import SECRET_FILE_MODE, fsync_dir, write_file_atomic
from vmbk.tree import names
from vmbk.tree import state as tree_state
from vmbk.virt import memstate

log = logging.getLogger("vmbk.backup")

CHUNK = 4 << 20
SPOOL = "memory.spool"
#: Why an incremental point gets no state (docs/architecture.md, "Memory and device state").
INCREMENTAL = ("the state is saved with full backups only: saving it makes QEMU 7.2 write out and unload the "
               "disks' dirty bitmaps until the VM runs again, and libvirt then refuses the incremental backup job "
               '(memory = "full" in the VM\'s section makes every backup a full)')
#: How long `finish` waits for the follower to drain the spool after the save.
DRAIN_TIMEOUT = 3600.0

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc: Any = None


def _punch(fd: int, offset: int, length: int) -> None:
    """Free ``length`` bytes of the spool at ``offset`` (best effort: the spool is removed anyway)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)


class _Follower(threading.Thread):
    """Reads the spool while libvirt writes it; lz4 frames into ``out`` (an open fd)."""

    def __init__(self, spool: Path, out: int) -> None:
        super().__init__(name="memory-state", daemon=True)
        self.spool = spool
        self.out = out
        #: Set once the save returned (or failed): what is in the spool then is all there is.
        self.done = threading.Event()
        #: Set to stop at once (the backup failed).
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.sha = hashlib.sha256()
        self.stored = 0
        self.image_size = 0
        self.head = bytearray()

    def _write(self, data: bytes) -> None:
        if not data:
            return
        self.sha.update(data)
        view = memoryview(data)
        while view:
            n = os.write(self.out, view)
            view = view[n:]
        self.stored += len(data)

    def run(self) -> None:
        fd = -1
        try:
            while fd < 0:
                try:
                    fd = os.open(self.spool, os.O_RDWR | os.O_CLOEXEC)
                except FileNotFoundError:
                    if self.done.is_set() or self.stop.is_set():
                        return  # the save failed before libvirt made the file
                    time.sleep(0.01)
            comp = lz4.frame.LZ4FrameCompressor(block_size=lz4.frame.BLOCKSIZE_MAX4MB, content_checksum=True)
            self._write(comp.begin())
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            pos = 0
            while not self.stop.is_set():
                finished = self.done.is_set()  # before the read: all written by then is read below
                n = os.preadv(fd, [view], pos)
                if n:
                    if len(self.head) < 1 << 20:
                        self.head += view[:min(n, (1 << 20) - len(self.head))]
                    self._write(comp.compress(view[:n]))
                    with contextlib.suppress(OSError, AttributeError):
                        _punch(fd, pos, n)
                    pos += n
                    continue
                if finished:
                    break
                time.sleep(0.005)
            self._write(comp.flush())
            self.image_size = pos
        except BaseException as e:  # noqa: BLE001 -- handed to the main thread by finish()
            self.error = e
        finally:
            if fd >= 0:
                os.close(fd)


class StateSave:
    """One VM's memory state in one backup: refused, saved, or failed (and why)."""

    def __init__(self, dom: Any, target_dir: Path, ident: str, *, checkpoint: str | None, timeout: float,
                 remote: bool = False, level: str = "full") -> None:
        self.dom = dom
        self.vm = dom.name()
        self.target_dir = target_dir
        self.ident = ident
        self.checkpoint = checkpoint
        self.timeout = timeout
        self.path = target_dir / names.state_name(ident)
        self.manifest_path = target_dir / names.state_manifest_name(ident)
        self.partial = self.path.with_name(self.path.name + ".partial")
        #: Why no state is saved (refused before the pause, or failed): the record's ``error``.
        self.error: str | None = None
        self.refused = False
        self.follower: _Follower | None = None
        self.fd = -1
        self.paused_at: float | None = None
        self.pause_seconds: float | None = None
        self.save_seconds: float | None = None
        self.written: list[Path] = []
        #: Why no state is saved when that is no failure (an incremental backup).
        self.reason: str | None = None
        if level == "inc":
            self.refused = True
            self.reason = INCREMENTAL
            log.info("%s: no memory state with an incremental backup: %s", self.vm, INCREMENTAL)
            return
        if remote:
            self._refuse("saving the memory state of a VM on a remote host is not supported: disks only")
            return
        bad = memstate.unsaveable(dom.XMLDesc(0))
        if bad:
            self._refuse(f"its state cannot be saved, disks only: {memstate.describe(bad)}")

    def _refuse(self, why: str) -> None:
        self.refused = True
        self.error = why
        log.warning("%s: memory state refused: %s", self.vm, why)

    @property
    def wanted(self) -> bool:
        """Will the backup pause for the state (not refused before it)?"""
        return not self.refused

    # -- while paused -------------------------------------------------------

    def save(self, work: Path, consistency: str) -> None:
        """Save the state of the paused domain (`libvirt_export` calls it between pause and ``backupBegin``).

        Never raises for a failed save (a libvirt error, the timeout): the
        disks are backed up all the same, and `record` says why there is
        no state.  Cancellation and signals go through.
        """
        self.paused_at = time.monotonic()
        if consistency != "paused":
            self.error = f"the VM could not be paused (consistency {consistency}): no memory state"
            return
        spool = work / SPOOL
        self.fd = os.open(self.partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, SECRET_FILE_MODE)
        os.fchmod(self.fd, SECRET_FILE_MODE)
        self.written.append(self.partial)
        self.follower = _Follower(spool, self.fd)
        self.follower.start()
        try:
            self.save_seconds = memstate.save(self.dom, spool, timeout=self.timeout)
        except memstate.StateError as e:
            self.error = str(e)
            self._stop()
            log.warning("%s: %s; the disks are backed up without it", self.vm, e)
        finally:
            if self.follower is not None:
                self.follower.done.set()

    def resumed(self) -> None:
        """The domain runs again (`libvirt_export` calls it after the hold ended)."""
        if self.paused_at is not None:
            self.pause_seconds = time.monotonic() - self.paused_at

    # -- after the disks ----------------------------------------------------

    def finish(self, cancelled: Any = None) -> list[Path]:
        """Drain, fsync and commit the state and its manifest; the files written (for the point's manifest)."""
        f = self.follower
        if f is None or self.error is not None:
            self._stop()
            return []
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while f.is_alive():
            f.join(0.2)
            if cancelled is not None and cancelled.is_set:
                self._stop()
                raise Cancelled()
            if time.monotonic() > deadline:
                self._stop()
                self.error = "compressing the memory state did not finish in time"
                return []
        if f.error is not None:
            self._stop()
            if isinstance(f.error, OSError):
                self.error = f"writing the memory state failed: {f.error.strerror or f.error}"
                return []
            raise f.error
        try:
            head = memstate.read_head(bytes(f.head[:memstate.head_size(bytes(f.head[:memstate.HEADER.size]))]))
        except memstate.StateError as e:
            self._stop()
            self.error = f"libvirt's save image is not one vmbk can resume: {e}"
            return []
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        os.replace(self.partial, self.path)
        fsync_dir(self.target_dir)
        self.written = [self.path]
        body = {
            "format": tree_state.FORMAT, "version": tree_state.VERSION, "vm": self.vm,
            "uuid": self.dom.UUIDString(), "checkpoint": self.ident, "created": now_iso(), "vmbk": vmbk.__version__,
            "host": memstate.host_facts(self.dom.connect()),
            "domain": memstate.domain_facts(head.xml),
            "state": {"file": self.path.name, "compression": "lz4-frame", "size": f.stored,
                      "sha256": f.sha.hexdigest(), "image_size": f.image_size},
            "pause_seconds": round(self.pause_seconds, 3) if self.pause_seconds is not None else None,
            "save_seconds": round(self.save_seconds, 3) if self.save_seconds is not None else None,
        }
        write_file_atomic(self.manifest_path, tree_state.encode(body), mode=SECRET_FILE_MODE)
        self.written.append(self.manifest_path)
        log.info("%s: memory state saved: %d bytes of image in %d stored, pause %.2f s", self.vm, f.image_size,
                 f.stored, self.pause_seconds or 0.0)
        return list(self.written)

    @property
    def sha256(self) -> str | None:
        return self.follower.sha.hexdigest() if self.follower is not None and self.path in self.written else None

    def _stop(self) -> None:
        f = self.follower
        if f is not None:
            f.stop.set()
            f.done.set()
            f.join(30)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(FileNotFoundError):
            self.partial.unlink()

    def abandon(self) -> None:
        """The backup failed: stop, remove what was written."""
        self._stop()
        for p in self.written:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def record(self) -> dict[str, Any]:
        """The backup record's ``memory``."""
        f = self.follower
        saved = self.error is None and self.path in self.written
        return {
            "saved": saved,
            "file": str(self.path) if saved else None,
            "manifest": str(self.manifest_path) if saved else None,
            "size": f.stored if saved and f else None,
            "image_size": f.image_size if saved and f else None,
            "pause_seconds": round(self.pause_seconds, 3) if self.pause_seconds is not None else None,
            "save_seconds": round(self.save_seconds, 3) if self.save_seconds is not None else None,
            "error": self.error,
            "reason": self.reason,
        }


def not_running(vm: str) -> dict[str, Any]:
    """The ``memory`` of a backup of a shut-off VM: nothing is in memory."""
    return {"saved": False, "file": None, "manifest": None, "size": None, "image_size": None, "pause_seconds": None,
            "save_seconds": None, "error": None, "reason": f"{vm} is shut off: no memory to save"}


def error_of(rec: dict[str, Any]) -> memstate.StateError | None:
    """The error a ``backup`` record's ``memory`` carries, for the stage's ``error`` record."""
    mem = rec.get("memory")
    if isinstance(mem, dict) and mem.get("error"):
        return memstate.StateError(f"memory state not saved: {mem['error']}", vm=rec.get("name"))
    return None

