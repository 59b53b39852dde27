"""Host block devices for ``--mount``: an NBD export as a file, a loop device, file systems.

The path from an export to files (each step a standard tool, argv lists,
never a shell):

1. ``nbdfuse -r DIR/vda URI`` (libnbd-bin) shows the export as a file of
   a private FUSE mount.  Chosen over ``qemu-nbd --connect /dev/nbdX``,
   which needs the ``nbd`` kernel module: many hosts and containers (this
   test host too) have none, while FUSE is everywhere;
2. ``losetup --read-only`` gives that file a block device, one per
   partition with ``--offset``/``--sizelimit`` where the disk has a table
   (`vmbk.restore.partitions` reads it: no kernel partition scan, no
   kpartx);
3. ``blkid -p`` (a low-level probe, no cache) says what each device holds;
   file systems are mounted read-only with the options that keep a dirty
   file system from being written even by its own log replay
   (`MOUNT_OPTIONS`: ext2/3/4 ``noload``, xfs ``norecovery,nouuid``,
   btrfs ``rescue=nologreplay``);
4. the way back is the reverse: ``umount`` (``-l`` when busy), ``losetup
   -d``, ``umount`` of the FUSE mount (nbdfuse then exits).

What is not mounted, and why, is said per device: LVM physical volumes
are not activated (``vgchange`` would change the host's LVM state, and a
volume group of the same name or UUID as one of the host's -- a clone of
the host's own template -- would clash); LUKS is not opened; swap, RAID
members and ZFS are skipped.  The leftovers of a killed session are
found by what the kernel says: mounts under a directory
(``/proc/self/mountinfo``) and loop devices whose backing file lies
under one (``/sys/block/loop*/loop/backing_file``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from vmbk.errors import DependencyError, ToolError

log = logging.getLogger("vmbk.restore")

#: fstype (blkid) -> (mount -t, options); anything else is tried with plain "ro".
MOUNT_OPTIONS: dict[str, tuple[str, str]] = {
    "ext2": ("ext4", "ro,noload"),
    "ext3": ("ext4", "ro,noload"),
    "ext4": ("ext4", "ro,noload"),
    "xfs": ("xfs", "ro,norecovery,nouuid"),
    "btrfs": ("btrfs", "ro,rescue=nologreplay"),
    "vfat": ("vfat", "ro"),
    "exfat": ("exfat", "ro"),
    "iso9660": ("iso9660", "ro"),
    "udf": ("udf", "ro"),
}
#: Contents that are never mounted, and what to say instead.
NOT_MOUNTED: dict[str, str] = {
    "LVM2_member": "an LVM physical volume: not activated (vgchange would change the host's LVM state; "
                   "see vmbk-restore(1))",
    "crypto_LUKS": "LUKS-encrypted: open it by hand (cryptsetup open --readonly DEVICE NAME)",
    "swap": "swap space",
    "linux_raid_member": "an MD RAID member: not assembled",
    "zfs_member": "a ZFS pool member: not imported",
}
NBDFUSE_START = 30.0


@dataclasses.dataclass(frozen=True)
class Probe:
    """What ``blkid -p`` found on a device (empty strings when nothing)."""

    device: str
    fstype: str
    label: str
    pttype: str


def tool(argv: Sequence[str], what: str, *, timeout: float = 120.0) -> str:
    """Run a host tool; its stdout, or ToolError with the last line it printed."""
    try:
        r = subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=timeout)
    except FileNotFoundError:
        raise DependencyError(f"{argv[0]} is not installed ({_package(argv[0])})") from None
    except subprocess.TimeoutExpired:
        raise ToolError(f"{what}: {argv[0]} did not finish in {timeout:.0f} s") from None
    if r.returncode != 0:
        lines = (r.stderr or r.stdout).strip().splitlines()
        raise ToolError(f"{what}: {argv[0]} failed ({r.returncode}): {lines[-1] if lines else 'no message'}")
    return r.stdout


def _package(program: str) -> str:
    return {"nbdfuse": "apt-get install libnbd-bin", "ntfs-3g": "apt-get install ntfs-3g"}.get(
        program, "apt-get install util-linux mount")


def start_nbdfuse(file: Path, uri: str, size: int) -> subprocess.Popen[bytes]:
    """``file`` (in a fresh directory, the FUSE mountpoint) shows the export read-only.

    nbdfuse runs in the foreground as our child, in a session of its own
    (a Ctrl-C at the terminal is vmbk's to handle), its messages in
    ``<dir>.log`` beside the mountpoint (a pipe nobody reads would stop it
    once full), and exits when its mount is unmounted.  It is not killed
    with us (no ``--pdeathsig``): after a kill -9 it keeps the FUSE mount
    where the sweep finds it, with the loop devices over it naming their
    backing file by its full path (an nbdfuse that dies detaches the
    mount, and those paths then read ``/vda``).  Returns once the file
    has the export's size.
    """
    if shutil.which("nbdfuse") is None:
        raise DependencyError(f"nbdfuse is not installed ({_package('nbdfuse')})")
    log_path = file.parent.with_name(file.parent.name + ".log")
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(["nbdfuse", "-r", str(file), uri], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=log_file, start_new_session=True)
    deadline = time.monotonic() + NBDFUSE_START
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            lines = log_path.read_text(errors="replace").strip().splitlines()
            raise ToolError(f"nbdfuse {file} exited with {proc.returncode}: {lines[-1] if lines else ''}")
        try:
            if os.stat(file).st_size == size:
                return proc
        except OSError:
            pass
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise ToolError(f"nbdfuse did not show {file} within {NBDFUSE_START:.0f} s")


def loop_attach(file: Path, offset: int = 0, size: int | None = None) -> str:
    """A read-only loop device over ``file`` (from ``offset``, ``size`` bytes: a partition)."""
    argv = ["losetup", "--find", "--show", "--read-only"]
    if offset:
        argv += ["--offset", str(offset)]
    if size is not None:
        argv += ["--sizelimit", str(size)]
    return tool([*argv, str(file)], f"loop device for {file}").strip()


def loop_detach(device: str) -> None:
    tool(["losetup", "--detach", device], f"detaching {device}")


def probe(device: str) -> Probe:
    """``blkid -p`` of ``device``: its file system type, label and partition table type."""
    try:
        r = subprocess.run(["blkid", "-p", "-o", "export", device], capture_output=True, text=True, check=False,
                           timeout=60)
    except FileNotFoundError:
        raise DependencyError(f"blkid is not installed ({_package('blkid')})") from None
    values: dict[str, str] = {}
    for line in r.stdout.splitlines():
        key, _, value = line.partition("=")
        values[key] = value
    return Probe(device, values.get("TYPE", ""), values.get("LABEL", ""), values.get("PTTYPE", ""))


def mount_ro(device: str, fstype: str, target: Path) -> str:
    """Mount ``device`` read-only at ``target``; the ``-t`` and options used."""
    kind, options = MOUNT_OPTIONS.get(fstype, (fstype, "ro"))
    if fstype == "ntfs":
        kind = "ntfs-3g" if shutil.which("ntfs-3g") or shutil.which("mount.ntfs-3g") else "ntfs3"
    tool(["mount", "-t", kind, "-o", options, device, str(target)], f"mounting {device} ({fstype})")
    return f"{kind} {options}"


def unmount(target: str | Path) -> None:
    """``umount``, retried while busy, then detached lazily (``-l``): it never stays mounted."""
    for attempt in range(10):
        try:
            tool(["umount", str(target)], f"unmounting {target}", timeout=60)
            return
        except ToolError as e:
            if not is_mounted(target):
                return
            if attempt == 9:
                log.warning("%s; detaching it lazily", e)
            time.sleep(0.2)
    tool(["umount", "-l", str(target)], f"unmounting {target} lazily", timeout=60)


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path``, deepest first (``/proc/self/mountinfo``)."""
    base = os.path.realpath(path)
    found = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split(" ")
        if len(fields) > 4:
            point = _unescape(fields[4])
            if point == base or point.startswith(base.rstrip("/") + "/"):
                found.append(point)
    return sorted(set(found), key=lambda p: (-p.count("/"), p))


def is_mounted(path: str | Path) -> bool:
    return os.path.realpath(path) in mounts_under(Path(path))


def loops_backed_by(path: Path, recorded: Sequence[tuple[str, str]] = ()) -> list[str]:
    """Loop devices whose backing file lies at or below ``path``.

    ``recorded``: ``(device, file)`` pairs a session wrote down as it made
    them; such a device also counts while its backing file reads as the
    file's bare name (its FUSE mount was detached under it).
    """
    base = os.path.realpath(path).rstrip("/") + "/"
    known = {dev: "/" + os.path.basename(file) for dev, file in recorded}
    found = []
    for entry in sorted(Path("/sys/block").glob("loop*")):
        try:
            backing = (entry / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue
        dev = f"/dev/{entry.name}"
        if backing.startswith(base) or known.get(dev) == backing:
            found.append(dev)
    return found


def wait_detached(path: Path, recorded: Sequence[tuple[str, str]] = (), timeout: float = 10.0) -> None:
    """Wait until no loop device is backed by a file under ``path`` any more (a detach is asynchronous)."""
    deadline = time.monotonic() + timeout
    while busy := loops_backed_by(path, recorded):
        if time.monotonic() > deadline:
            log.warning("loop devices %s still hold files under %s", ", ".join(busy), path)
            return
        time.sleep(0.05)


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (``\\040``)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)
