"""Instant access on backups of the booted test guest: --mount, --instant, --instant --no-move.

One guest for the module, booted without letting its init mount the
data disk (``vmbk.data`` empty): the test formats and mounts it through
the agent, writes a checkfile per point, unmounts it, and backs up while
the guest is paused, keeping the disk as it was then as the reference.
A guest booted from a backup mounts the disk ``ro,noload`` to read, so
it writes nothing and its moved disk can be compared byte for byte.
"""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import orjson
import pytest
from access_helpers import backup_paused, first_record, leftovers, module_guest, spawn
from contract_doc import undocumented
from guest.agent import AgentError, Guest

from vmbk.commands.restore import main as restore_main

pytestmark = [pytest.mark.libvirt, pytest.mark.guest]

BIG_MIB = 16  # a file that takes the move (at --bandwidth 1) longer than the guest takes to boot


@dataclasses.dataclass
class Backed:
    guest: Guest
    workdir: Path
    root: Path
    refs: list[Path]
    checks: list[bytes]
    big: bytes


def run(cmd, *argv: str) -> tuple[int, list[dict]]:
    out = io.StringIO()
    code = cmd(["--json", *argv], io.StringIO(""), out)
    return code, [orjson.loads(line) for line in out.getvalue().splitlines()]


def same(image: Path, ref: Path, fmt: str = "qcow2") -> bool:
    r = subprocess.run(["qemu-img", "compare", "-U", "-q", "-f", fmt, "-F", "raw", str(image), str(ref)], check=False)
    return r.returncode == 0


def read_in_guest(guest: Guest, path: str) -> bytes:
    """The file from the guest's disk, mounted read-only without journal replay: nothing is written."""
    guest.sh("mkdir -p /mnt/ro && { grep -q ' /mnt/ro ' /proc/mounts || mount -t ext4 -o ro,noload /dev/vda /mnt/ro; }")
    return guest.read_file(f"/mnt/ro/{path}")


@pytest.fixture(scope="module")
def backed(libvirt_conn, guest_image) -> Iterator[Backed]:
    with module_guest(libvirt_conn, guest_image, "restore-instant-", data=[]) as (workdir, guest, disk):
        name = guest.name
        guest.sh("mkfs.ext4 -q -F -L vda -E lazy_itable_init=0,lazy_journal_init=0 /dev/vda && mkdir -p /mnt/vda")
        root = workdir / "backups"
        root.mkdir()
        refs, checks = [], []
        big = b""
        for n in range(2):
            checks.append(f"point {n} of {name}\n".encode())
            guest.sh("mount -t ext4 -o noatime /dev/vda /mnt/vda")
            guest.write_file(f"/mnt/vda/check-{n}", checks[-1])
            if n == 0:
                guest.sh(f"dd if=/dev/urandom of=/mnt/vda/big bs=1M count={BIG_MIB} 2>/dev/null", timeout=60)
                big = guest.read_file("/mnt/vda/big")
            guest.sh("umount /mnt/vda && sync")
            refs.append(workdir / f"ref-{n}.raw")
            recs = backup_paused(guest, disk, refs[-1], root)
            assert recs[-1]["action"] == ("full" if n == 0 else "inc"), recs
        yield Backed(guest, workdir, root, refs, checks, big)


# -- --mount ---------------------------------------------------------------------------------------------

needs_fuse_and_loop = pytest.mark.skipif(
    not (os.path.exists("/dev/fuse") and os.path.exists("/dev/loop-control") and shutil.which("nbdfuse")),
    reason="--mount needs /dev/fuse, loop devices and nbdfuse (libnbd-bin)")


@needs_fuse_and_loop
def test_mount_shows_the_points_files_and_leaves_nothing(backed, tmp_path):
    name = backed.guest.name
    target = tmp_path / "mount-here"
    proc = spawn("--backup-path", str(backed.root), "--vm", name, "--mount", str(target), "--restore-point", "0")
    try:
        rec = first_record(proc)
        assert rec["type"] == "mount" and rec["restore_point"] == 0 and rec["dir"] == str(target)
        assert undocumented([rec]) == {}  # vmbk-json(7)
        (fs,) = rec["filesystems"]
        assert (fs["device"], fs["fstype"], fs["mounted"], fs["path"]) == ("vda", "ext4", True, str(target / "vda"))
        assert (target / "vda" / "check-0").read_bytes() == backed.checks[0]
        assert (target / "vda" / "big").read_bytes() == backed.big
        assert not (target / "vda" / "check-1").exists()  # point 0, not the latest
        with pytest.raises(OSError):
            (target / "vda" / "new").write_bytes(b"x")  # read-only
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not target.exists()
    assert leftovers() == ([], [], [])


@needs_fuse_and_loop
def test_mount_killed_is_taken_down_by_the_next_run(backed, tmp_path):
    name = backed.guest.name
    target = tmp_path / "mount-here"
    proc = spawn("--backup-path", str(backed.root), "--vm", name, "--mount", str(target))
    rec = first_record(proc)
    assert (target / "vda" / "check-1").read_bytes() == backed.checks[1]
    proc.kill()
    proc.wait()
    loops, mounts, markers = leftovers()
    assert loops and mounts and markers  # what a kill -9 leaves: mounts, loop devices, the FUSE files
    code, recs = run(restore_main, "--backup-path", str(backed.root), "--vm", name, "--serve", "--timeout", "0")
    assert code == 0 and recs[0]["type"] == "serve", recs
    assert leftovers() == ([], [], [])
    assert not target.exists() and rec["dir"] == str(target)


@needs_fuse_and_loop
def test_mount_killed_at_any_moment_leaves_nothing_after_the_next_run(backed, tmp_path):
    """kill -9 while the session sets up (marker, server, FUSE, loop devices, mounts) or serves."""
    name = backed.guest.name
    left = []
    for delay in (0.05, 0.2, 0.3, 0.45, 0.7, 1.2, 2.0):
        target = tmp_path / f"mount-here-{delay}"
        proc = spawn("--backup-path", str(backed.root), "--vm", name, "--mount", str(target))
        time.sleep(delay)
        proc.kill()
        proc.wait()
        left.append(tuple(len(x) for x in leftovers()))  # loop devices, mounts, markers
        code, recs = run(restore_main, "--backup-path", str(backed.root), "--vm", name, "--serve", "--timeout", "0")
        assert code == 0, recs
        assert leftovers() == ([], [], []) and not target.exists(), delay
    print("left by each kill (loop devices, mounts, markers):", left)
    assert len(set(left)) >= 2  # the kills hit different steps (here: nothing yet, half set up, all mounted)


# -- --instant ---------------------------------------------------------------------------------------------


def test_instant_clone_runs_from_the_backup_then_moves_to_local_disks(backed, libvirt_conn, cleanup_domains):
    name = backed.guest.name
    clone = f"{name}-inst"
    cleanup_domains.append(clone)
    dest = backed.workdir / "instant"
    code, recs = run(restore_main, "--backup-path", str(backed.root), "--vm", name, "--instant",
                     "--restore-path", str(dest))
    assert code == 5 and "running" in recs[-1]["message"]  # disaster recovery of a VM that runs: refused
    assert not dest.exists() and leftovers() == ([], [], [])
    t0 = time.monotonic()
    code, recs = run(restore_main, "--backup-path", str(backed.root), "--vm", name, "--instant", "--name", clone,
                     "--restore-path", str(dest), "--restore-point", "0")
    took = time.monotonic() - t0
    assert code == 0, recs
    (rec,) = recs
    target = dest / f"{clone}.qcow2"
    assert rec["type"] == "instant" and rec["mode"] == "clone" and rec["moved"] is True
    assert undocumented([rec]) == {}
    assert rec["domain"]["name"] == clone and rec["domain"]["persistent"] is True
    assert 0 < rec["usable_seconds"] <= rec["independent_seconds"] <= took
    assert rec["disks"][0]["target"] == str(target) and target.exists()
    print(f"instant clone: usable after {rec['usable_seconds']} s, independent after {rec['independent_seconds']} s")
    dom = libvirt_conn.lookupByName(clone)
    assert dom.isActive() and dom.isPersistent()
    xml = dom.XMLDesc(0)
    assert str(target) in xml and "protocol='nbd'" not in xml and ".instant" not in xml
    assert not Path(rec["disks"][0]["overlay"]).exists()
    socket = Path(rec["disks"][0]["uri"].split("socket=")[1])
    assert not socket.exists() and not socket.parent.exists()  # the server is gone
    guest = Guest(dom, console_log=backed.workdir / f"{clone}-console.log")
    guest.wait_agent(timeout=120)
    assert read_in_guest(guest, "check-0") == backed.checks[0]
    assert read_in_guest(guest, "big") == backed.big
    with pytest.raises(AgentError):
        read_in_guest(guest, "check-1")
    assert same(target, backed.refs[0])  # the local disk is the point, byte for byte
    assert dom.isActive()
    assert leftovers() == ([], [], [])


def test_instant_no_move_is_a_quick_look_that_leaves_nothing(backed, libvirt_conn, tmp_path):
    name = backed.guest.name
    look = f"{name}-look"
    dest = backed.workdir / "look"
    proc = spawn("--backup-path", str(backed.root), "--vm", name, "--instant", "--no-move", "--name", look,
                 "--restore-path", str(dest))
    try:
        rec = first_record(proc)
        assert rec["type"] == "instant" and rec["moved"] is False and rec["independent_seconds"] is None
        assert undocumented([rec]) == {}
        dom = libvirt_conn.lookupByName(look)
        assert not dom.isPersistent() and "protocol='nbd'" in dom.XMLDesc(0)
        guest = Guest(dom)
        t0 = time.monotonic()
        guest.wait_agent(timeout=120)
        print(f"quick look: usable after {rec['usable_seconds']} s, agent after {time.monotonic() - t0:.1f} s more")
        assert read_in_guest(guest, "check-1") == backed.checks[1]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    with pytest.raises(libvirt.libvirtError):
        libvirt_conn.lookupByName(look)
    assert not dest.exists() or list(dest.iterdir()) == []
    assert leftovers() == ([], [], [])


def test_the_export_dying_before_the_move_gives_io_errors_never_wrong_data(backed, libvirt_conn, cleanup_domains):
    name = backed.guest.name
    clone = f"{name}-dies"
    cleanup_domains.append(clone)
    dest = backed.workdir / "dies"
    proc = spawn("--backup-path", str(backed.root), "--vm", name, "--instant", "--name", clone,
                 "--restore-path", str(dest), "--bandwidth", "1")
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                dom = libvirt_conn.lookupByName(clone)
                break
            except libvirt.libvirtError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.2)
        guest = Guest(dom)
        guest.wait_agent(timeout=120)
        assert read_in_guest(guest, "check-1") == backed.checks[1]
        assert not dom.isPersistent()  # still moving (1 MiB/s)
    finally:
        proc.kill()  # the export dies with it
        proc.wait()
    guest.sh("echo 3 > /proc/sys/vm/drop_caches")
    code, out, _ = guest.exec(["/bin/sh", "-c", "cat /mnt/ro/big"], timeout=60)
    assert code != 0 or out == backed.big  # an error, or the right bytes: never others
    code, _, err = guest.exec(["/bin/sh", "-c", "dd if=/dev/vda of=/dev/null bs=1M iflag=direct"], timeout=120)
    assert code != 0 and b"error" in err.lower()  # what was neither read nor copied is gone with the export
    assert dom.isActive()  # the guest itself runs on
    # the next session's sweep destroys the guest that runs on a dead export and removes its files
    code, recs = run(restore_main, "--backup-path", str(backed.root), "--vm", name, "--serve", "--timeout", "0")
    assert code == 0, recs
    with pytest.raises(libvirt.libvirtError):
        libvirt_conn.lookupByName(clone)
    assert not dest.exists() or list(dest.iterdir()) == []
    assert leftovers() == ([], [], [])


def test_instant_disaster_recovery_replaces_the_shut_off_vm_with_its_identity(backed, libvirt_conn):
    """Last in the module: it takes the original guest's place (name, UUID), as a DR restore does."""
    dom = backed.guest.dom
    name, uuid = dom.name(), dom.UUIDString()
    dom.destroy()
    dest = backed.workdir / "dr"
    argv = ["--backup-path", str(backed.root), "--vm", name, "--instant", "--restore-path", str(dest)]
    code, recs = run(restore_main, *argv)
    assert code == 5 and "--force" in recs[-1]["message"]  # a defined namesake needs --force
    code, recs = run(restore_main, *argv, "--force")
    assert code == 0, recs
    (rec,) = recs
    assert rec["mode"] == "dr" and rec["domain"] == {"name": name, "uuid": uuid, "persistent": True}
    target = Path(rec["disks"][0]["target"])
    assert target.parent == dest and target.name == backed.guest.disks[0].name  # the original file name
    back = libvirt_conn.lookupByName(name)
    assert back.UUIDString() == uuid and back.isActive() and str(target) in back.XMLDesc(0)
    guest = Guest(back)
    guest.wait_agent(timeout=120)
    assert read_in_guest(guest, "check-1") == backed.checks[1]
    assert same(target, backed.refs[1])
    assert leftovers() == ([], [], [])
