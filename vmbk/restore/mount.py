"""``--mount DIR``: a restore point's file systems, read-only under DIR, to copy files out.

The point is served as for ``--serve`` (`vmbk.restore.serve`: streams
checked first, then opened) on a socket only root can reach, and each
disk becomes files with standard tools (`vmbk.restore.blockdev`: nbdfuse,
a read-only loop device with partitions, ``mount -o ro`` with the
options that keep even a dirty journal from being replayed).  DIR gets
one directory per file system: ``DIR/vda`` for a disk that is one file
system, ``DIR/vda1``, ``DIR/vda2`` ... for partitions.

Which file systems work: what the host kernel can mount read-only --
ext2/3/4, xfs, btrfs, vfat and exfat, iso9660 and udf where the kernel has
them, NTFS through ntfs-3g when installed (else the kernel's ntfs3).  Not
mounted, each said in the ``mount`` record with why: LVM physical volumes
(not activated, see `vmbk.restore.blockdev`), LUKS, swap, RAID and ZFS
members, and anything the kernel refuses.

Order, and what a kill leaves (`vmbk.restore.marker`): the marker, naming
DIR and the session's private directory ``RUN_DIR/access-<id>.d``, is
written before anything exists; then the server, DIR (mode 0700: backups
are not for every local user), the FUSE files, the loop devices, the
mounts.  Teardown goes the other way: unmount everything under DIR (lazily
when busy), detach every loop device whose backing file lies in the
private directory, unmount its FUSE mounts, remove the empty directories
(DIR too when the session made it), the marker last.  It runs on SIGINT,
SIGTERM, ``--timeout`` and any failure, with further signals ignored
while it runs; after a kill -9 the next ``--serve``/``--mount``/
``--instant`` run finds the marker's lock free and does the same from
what the kernel lists, not from what the dead process remembered.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmbk.errors import StorageError, ToolError, UsageError, VmbkError
from vmbk.procs import reap
from vmbk.records import Record, make
from vmbk import disklabel
from vmbk.restore import blockdev, marker
from vmbk.restore.preflight import check_restore_path
from vmbk.restore.report import point_fields
from vmbk.restore.serve import Opened, ServeOptions, deferred_signals, listening, open_point, until_stopped
from vmbk.restore.source import SourceRef
from vmbk.stream.chainread import ChainImage

log = logging.getLogger("vmbk.restore")

Emit = Callable[[Record], None]
Say = Callable[[str], None]
KIND = "mount"
#: The loop devices of a session, one ``DEVICE FILE`` line each, in its private directory.
LOOPS = "loops"


@dataclasses.dataclass
class Fs:
    """One device of a disk and what became of it."""

    disk: str
    name: str
    partition: int | None
    fstype: str | None
    label: str | None = None
    path: str | None = None
    options: str | None = None
    reason: str | None = None

    def as_record(self) -> dict[str, Any]:
        return {"disk": self.disk, "device": self.name, "partition": self.partition, "fstype": self.fstype,
                "label": self.label, "path": self.path, "options": self.options, "mounted": self.path is not None,
                "reason": self.reason}


def mount(ref: SourceRef, opts: ServeOptions, target: Path, *, session: str | None, emit: Emit, say: Say,
          protected: tuple[Path, ...] = (), sweep: Callable[[], list[str]] = lambda: []) -> None:
    """Mount the point's file systems under ``target`` until SIGINT/SIGTERM/``opts.timeout``."""
    target = Path(os.path.abspath(target))
    for line in sweep():
        say(f"removed what a killed session left: {line}")
    try:
        check_restore_path(target, (ref.backup_path, *protected))
    except UsageError as e:
        raise UsageError(str(e).replace("--restore-path", "--mount", 1)) from None
    existed = target.exists()
    if existed and (not target.is_dir() or any(target.iterdir())):
        raise StorageError(f"--mount {target} exists and is not an empty directory")
    opened = open_point(ref, opts)
    try:
        mark = marker.Marker(KIND, {"vm": opened.source.vm, "dir": str(target), "created_dir": not existed})
        rundir = _rundir(mark.id)
        try:
            _session(opened, opts, target, rundir, existed, session=session, emit=emit, say=say)
        finally:
            with deferred_signals():
                done = teardown(target, rundir, created_dir=not existed)
                log.debug("teardown of %s: %s", target, done)
            mark.release()
    finally:
        opened.close()


def _rundir(ident: str) -> Path:
    return marker.run_dir() / f"{marker.PREFIX}{ident}.d"


def _session(opened: Opened, opts: ServeOptions, target: Path, rundir: Path, existed: bool, *,
             session: str | None, emit: Emit, say: Say) -> None:
    rundir.mkdir(mode=0o700)
    fuses: list[subprocess.Popen[bytes]] = []
    try:
        with listening(opened, dataclasses.replace(opts, socket=rundir / "nbd.sock", listen=None)) as server:
            try:
                if not existed:
                    target.mkdir(mode=0o700)
                os.chmod(target, 0o700)
                found: list[Fs] = []
                for disk, img in opened.images.items():
                    fusedir = rundir / f"fuse-{disk}"
                    fusedir.mkdir(mode=0o700)
                    fuses.append(blockdev.start_nbdfuse(fusedir / disk, server.uri(disk), img.virtual_size))
                    found += _mount_disk(disk, fusedir / disk, img, target)
                emit(record(opened, target, found, opts, session))
                for fs in found:
                    say(f"{fs.name}: {fs.fstype} at {fs.path}" if fs.path else f"{fs.name}: not mounted: {fs.reason}")
                if not any(fs.path for fs in found):
                    say("no file system of the point could be mounted")
                until_stopped(opts.timeout, say, f"{target} stays mounted")
            finally:
                with deferred_signals():
                    teardown(target, rundir, created_dir=False)  # while the server still answers FUSE
    finally:
        for proc in fuses:
            reap(proc, 10)


def _mount_disk(disk: str, file: Path, img: ChainImage, target: Path) -> list[Fs]:
    """Every file system of one disk: the whole disk, or each partition (`vmbk.restore.partitions`)."""
    table, parts = disklabel.read_table(img.pread, img.virtual_size)
    if table is None:
        found = blockdev.probe(_attach(file))
        if not found.fstype:
            return [Fs(disk, disk, None, None, reason="no file system or partition table found")]
        return [_mount_one(disk, disk, None, found, target)]
    if not parts:
        return [Fs(disk, disk, None, None, reason=f"an empty {table} partition table")]
    return [_mount_one(disk, f"{disk}{p.number}", p.number, blockdev.probe(_attach(file, p.start, p.size)), target)
            for p in parts]


def _attach(file: Path, offset: int = 0, size: int | None = None) -> str:
    """A loop device, written down in the session's directory at once (`teardown` reads it)."""
    dev = blockdev.loop_attach(file, offset, size)
    fd = os.open(file.parent.parent / LOOPS, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, f"{dev} {file}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return dev


def _recorded(rundir: Path) -> list[tuple[str, str]]:
    """The ``(device, file)`` pairs `_attach` wrote (a line cut short by a kill is skipped)."""
    try:
        text = (rundir / LOOPS).read_text()
    except OSError:
        return []
    return [(dev, file) for dev, _, file in (line.partition(" ") for line in text.split("\n")[:-1]) if file]


def _mount_one(disk: str, name: str, partition: int | None, found: blockdev.Probe, target: Path) -> Fs:
    fs = Fs(disk, name, partition, found.fstype or None, found.label or None)
    if not found.fstype:
        fs.reason = "no file system found"
        return fs
    if found.fstype in blockdev.NOT_MOUNTED:
        fs.reason = blockdev.NOT_MOUNTED[found.fstype]
        return fs
    point = target / name
    point.mkdir(mode=0o755)
    try:
        fs.options = blockdev.mount_ro(found.device, found.fstype, point)
    except (ToolError, VmbkError) as e:
        point.rmdir()
        fs.reason = str(e)
        return fs
    fs.path = str(point)
    return fs


def record(opened: Opened, target: Path, found: list[Fs], opts: ServeOptions, session: str | None) -> Record:
    return make(
        "mount", session,
        vm=opened.source.vm,
        **point_fields(opened.point),
        dir=str(target),
        filesystems=[fs.as_record() for fs in found],
        **opened.checked(opts.verify),
        timeout=opts.timeout,
        pid=os.getpid(),
        warnings=opened.warnings,
    )


def teardown(target: Path, rundir: Path, *, created_dir: bool) -> list[str]:
    """Unmount, detach and remove what a session made (module doc); what was done, in words.

    Works from what the kernel lists, so it serves the live session and the
    sweep alike; every step is idempotent.  Raises ToolError when something
    stays (the marker then stays for the next run).
    """
    done = []
    for point in blockdev.mounts_under(target):
        blockdev.unmount(point)
        done.append(f"unmounted {point}")
    recorded = _recorded(rundir)
    for loop in blockdev.loops_backed_by(rundir, recorded):
        blockdev.loop_detach(loop)
        done.append(f"detached {loop}")
    blockdev.wait_detached(rundir, recorded)  # the kernel lets go of the FUSE file a moment after the detach
    for point in blockdev.mounts_under(rundir):
        blockdev.unmount(point)
        done.append(f"unmounted {point}")
    if blockdev.mounts_under(target) or blockdev.mounts_under(rundir):
        raise ToolError(f"{target} or {rundir} still has mounts")
    if target.is_dir():
        for entry in target.iterdir():
            with contextlib.suppress(OSError):
                entry.rmdir()  # only the empty mount points; a file someone left stays
        if created_dir:
            with contextlib.suppress(OSError):
                target.rmdir()
                done.append(f"removed {target}")
    if rundir.is_dir():
        for entry in rundir.iterdir():
            with contextlib.suppress(OSError):
                entry.rmdir() if entry.is_dir() else entry.unlink()
        rundir.rmdir()
    return done


def sweep() -> list[str]:
    """Take down what killed ``--mount`` sessions left (`vmbk.restore.marker`)."""
    done: list[str] = []
    for path, data in marker.dead(KIND):
        try:
            rundir = _rundir(str(data["id"]))
            target = Path(str(data["dir"]))
            done += teardown(target, rundir, created_dir=bool(data.get("created_dir")))
        except (KeyError, OSError, VmbkError) as e:
            log.warning("%s: cannot remove what a killed --mount left (%s); the next run tries again", path, e)
            continue
        path.unlink(missing_ok=True)
        done.append(f"--mount of {data.get('vm')} at {target}")
    return done

