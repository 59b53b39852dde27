"""vmbk-restore end to end on backups of the booted test guest.

One guest for the module: three rounds of (write a checkfile with unique
content through the agent; back up while paused, keeping the disk as it
was then as the reference).  Then every point is restored and compared
with its reference (``qemu-img compare``), the middle point is cloned,
booted and asked for its checkfiles, and a corrupted copy of the tree is
verified and restored.
"""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from access_helpers import backup_paused, module_guest
from guest.agent import AgentError, Guest
from guest.domain import make_qcow2, nos_domain_xml

from vmbk.commands.backup import main as backup_main
from vmbk.commands.restore import main as restore_main
from vmbk.errors import Exit
from vmbk.stream import scan

pytestmark = [pytest.mark.libvirt, pytest.mark.guest]


@dataclasses.dataclass
class Backed:
    guest: Guest
    workdir: Path
    root: Path
    refs: list[Path]
    contents: list[bytes]


def failed(recs: list[dict], code: int) -> bool:
    """A failure is one ``error`` record on stdout (and its line on stderr)."""
    return [(r["type"], r["code"]) for r in recs] == [("error", int(code))]


def run(cmd, *argv: str) -> tuple[int, list[dict]]:
    out = io.StringIO()
    code = cmd(["--json", *argv], io.StringIO(""), out)
    return code, [orjson.loads(line) for line in out.getvalue().splitlines()]


def same(image: Path, ref: Path) -> bool:
    r = subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", str(image), str(ref)], check=False)
    return r.returncode == 0


@pytest.fixture(scope="module")
def backed(libvirt_conn, guest_image) -> Iterator[Backed]:
    with module_guest(libvirt_conn, guest_image, "restore-guest-", data=["vda"]) as (workdir, guest, disk):
        name = guest.name
        root = workdir / "backups"
        root.mkdir()
        refs, contents = [], []
        for n in range(3):
            contents.append(os.urandom(300_000) + f"round {n} of {name}\n".encode())
            guest.write_file(f"/mnt/vda/check-{n}", contents[-1])
            guest.sync()
            refs.append(workdir / f"ref-{n}.raw")
            recs = backup_paused(guest, disk, refs[-1], root)
            assert recs[-1]["action"] == ("full" if n == 0 else "inc"), recs
        yield Backed(guest, workdir, root, refs, contents)


def test_the_chain_lists_three_complete_points(backed):
    name = backed.guest.name
    code, recs = run(restore_main, "--backup-path", str(backed.root), "--list-restore-points", name)
    assert code == 0
    chain, *points = recs
    assert chain["complete"] and chain["restore_points"] == 3 and chain["warnings"] == []
    assert [(p["index"], p["kind"], p["disks"], p["complete"]) for p in points] == [
        (0, "FULL", ["vda"], True), (1, "Incremental", ["vda"], True), (2, "Incremental", ["vda"], True)]
    code, (vm,) = run(restore_main, "--backup-path", str(backed.root), "--list")
    assert code == 0 and vm["vm"] == name and vm["restore_points"] == 3 and vm["layout"] == "periodic"
    code, recs = run(restore_main, "--verify", str(backed.root / name))
    *files, whole = [r for r in recs if r.get("point") is None]  # a record per data file, then the chain's
    assert [(r["point"], r["integrity"]) for r in recs if r.get("point") is not None] == [
        (0, "good"), (1, "good"), (2, "good")]  # one per restore point: its signed manifest checks
    assert code == 0 and len(files) == 3 and all(r["ok"] and r["checksum"] == "ok" for r in files)
    assert whole["file"] is None and whole["ok"] and whole["restore_points"] == 3


def test_each_point_restores_to_its_reference(backed, tmp_path):
    name = backed.guest.name
    for n in range(3):
        dest = tmp_path / f"point {n}"
        t0 = time.monotonic()
        code, recs = run(restore_main, "--backup-path", str(backed.root), "--vm", name, "--restore-path", str(dest),
                         "--restore-point", str(n), "--skip-config")
        seconds = time.monotonic() - t0
        assert code == 0, recs
        disk, summary = recs
        assert summary["restore_point"] == n and summary["files"] == [str(dest / f"{name}.qcow2")]
        assert same(dest / f"{name}.qcow2", backed.refs[n]), f"restore point {n} differs from its reference"
        print(f"point {n}: {disk['data_bytes'] / 1e6:.1f} MB of data restored in {seconds:.2f} s "
              f"({disk['data_bytes'] / seconds / 1e6:.1f} MB/s end to end, {disk['mb_per_s']} MB/s image)")
    check = subprocess.run(["qemu-img", "check", str(tmp_path / "point 2" / f"{name}.qcow2")], capture_output=True,
                           check=False)
    assert check.returncode == 0


def test_clone_of_the_middle_point_boots_with_that_points_checkfile(backed, libvirt_conn, cleanup_domains):
    name = backed.guest.name
    clone = f"{name}-clone"
    dest = backed.workdir / "clone"
    cleanup_domains.append(clone)
    code, recs = run(restore_main, "--backup-path", str(backed.root), "--vm", name, "--restore-path", str(dest),
                     "--restore-point", "1", "--name", clone)
    assert code == 0, recs
    summary = recs[-1]
    assert summary["mode"] == "clone" and summary["domain"]["name"] == clone
    original = backed.guest.dom
    assert summary["domain"]["uuid"] != original.UUIDString()
    dom = libvirt_conn.lookupByName(clone)
    xml = dom.XMLDesc(0)
    assert str(dest / f"{clone}.qcow2") in xml and str(backed.guest.disks[0]) not in xml
    assert f"{clone}-console.log" in xml
    dom.create()
    guest = Guest(dom, console_log=backed.workdir / f"{clone}-console.log")
    guest.wait_agent(timeout=120)
    assert guest.read_file("/mnt/vda/check-1") == backed.contents[1]
    assert guest.read_file("/mnt/vda/check-0") == backed.contents[0]
    with pytest.raises(AgentError):
        guest.read_file("/mnt/vda/check-2")
    # the original is untouched and still has all three
    assert backed.guest.read_file("/mnt/vda/check-2") == backed.contents[2]


def test_clone_name_taken_needs_force_and_live_disks_are_never_overwritten(backed, libvirt_conn, cleanup_domains,
                                                                           tmp_path):
    name = backed.guest.name
    taken = f"{name}-taken"
    dest = backed.workdir / "taken"
    dest.mkdir()
    old_disk = make_qcow2(dest / f"{taken}.qcow2", "16M")
    cleanup_domains.append(taken)
    old = libvirt_conn.defineXML(nos_domain_xml(taken, [old_disk]))
    argv = ["--backup-path", str(backed.root), "--vm", name, "--restore-path", str(dest), "--name", taken]
    code, recs = run(restore_main, *argv)
    assert code == Exit.VM and failed(recs, Exit.VM)
    code, recs = run(restore_main, *argv, "--force")
    assert code == 0, recs
    new = libvirt_conn.lookupByName(taken)
    assert new.UUIDString() != old.UUIDString() and "<kernel>" in new.XMLDesc(0)
    assert same(dest / f"{taken}.qcow2", backed.refs[2])
    # the running guest's own disk: refused even with --force
    live = backed.guest.disks[0]
    code, recs = run(restore_main, "--backup-path", str(backed.root), "--vm", name, "--restore-path",
                     str(live.parent), "--name", live.stem, "--skip-config", "--force")
    assert code == Exit.STORAGE and failed(recs, Exit.STORAGE)
    # a running domain's name
    code, _ = run(restore_main, "--backup-path", str(backed.root), "--vm", name, "--restore-path", str(tmp_path),
                  "--name", name, "--force")
    assert code == Exit.VM


def test_corrupt_copy_fails_verify_and_restore_writes_nothing(backed, tmp_path):
    name = backed.guest.name
    copy = tmp_path / "copy"
    shutil.copytree(backed.root / name, copy / name)
    (chain,) = [p for p in (copy / name).iterdir() if p.is_dir()]
    victim = chain / "vda.inc.virtnbdbackup.1.data"
    frame = scan(victim).data_frames[-1]
    with open(victim, "r+b") as f:
        f.seek(frame.file_pos + frame.stored_len // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x5A]))
    code, recs = run(restore_main, "--verify", str(copy / name))
    assert code == Exit.STORAGE and recs[-1]["type"] == "error"
    assert [(r["file"], r["checksum"]) for r in recs[:-1] if r["file"] and not r["ok"]] == [(victim.name, "bad")]
    # the points that need the file: its hash is not the one their manifests signed; the full is intact
    assert [(r["point"], r["integrity"]) for r in recs[:-1] if r.get("point") is not None and not r["ok"]] == \
        [(1, "tampered"), (2, "tampered")]
    dest = tmp_path / "out"
    code, recs = run(restore_main, "--vm", str(copy / name), "--restore-path", str(dest), "--skip-config")
    assert code == Exit.STORAGE and failed(recs, Exit.STORAGE)
    assert not dest.exists() or list(dest.iterdir()) == []
    code, _ = run(restore_main, "--vm", str(copy / name), "--restore-path", str(dest), "--skip-config",
                  "--restore-point", "full")
    assert code == 0 and same(dest / f"{name}.qcow2", backed.refs[0])


def test_uefi_clone_gets_its_own_copy_of_the_points_nvram_and_boots(test_guest, vm_workdir, libvirt_conn,
                                                                     cleanup_domains):
    guest = test_guest(uefi=True)
    root = vm_workdir / "backups"
    root.mkdir()
    guest.write_file("/mnt/vda/check-uefi", b"uefi round 0\n")
    guest.sync()
    code, recs = run(backup_main, "--backup-path", str(root), "--vm", guest.name)
    assert code == 0, recs
    nvram = Path(guest.dom.XMLDesc(0).split("<nvram")[1].split(">", 1)[1].split("</nvram>")[0])
    saved = Path(recs[-1]["target_dir"]) / f"{nvram.name}.virtnbdbackup.0"
    assert saved.exists()
    clone = f"{guest.name}-uefi"
    cleanup_domains.append(clone)
    dest = vm_workdir / "clone"
    code, recs = run(restore_main, "--backup-path", str(root), "--vm", guest.name, "--restore-path", str(dest),
                     "--name", clone)
    assert code == 0, recs
    copied = dest / f"{clone}_VARS.fd"
    assert recs[-1]["nvram"] == str(copied) and copied.read_bytes() == saved.read_bytes()
    dom = libvirt_conn.lookupByName(clone)
    xml = dom.XMLDesc(0)
    assert f">{copied}</nvram>" in xml and str(nvram) not in xml
    dom.create()
    booted = Guest(dom, console_log=vm_workdir / f"{clone}-console.log")
    booted.wait_agent(timeout=180)
    assert booted.read_file("/mnt/vda/check-uefi") == b"uefi round 0\n"
    assert nvram.exists()  # the original's NVRAM is untouched


def test_disaster_recovery_in_place_brings_back_the_same_vm(test_guest, vm_workdir, libvirt_conn):
    guest = test_guest()
    root = vm_workdir / "backups"
    root.mkdir()
    for n in range(2):
        guest.write_file(f"/mnt/vda/check-{n}", f"dr round {n}\n".encode())
        guest.sync()
        code, recs = run(backup_main, "--backup-path", str(root), "--vm", guest.name)
        assert code == 0, recs
    uuid, disk = guest.dom.UUIDString(), guest.disks[0]
    argv = ["--backup-path", str(root), "--vm", guest.name, "--restore-path", str(disk.parent),
            "--restore-point", "0"]
    code, recs = run(restore_main, *argv, "--force")
    assert code == Exit.VM and failed(recs, Exit.VM) and "running" in recs[0]["message"]
    guest.shutdown()
    code, recs = run(restore_main, *argv)
    assert code == Exit.VM and "--force" in recs[0]["message"]
    code, recs = run(restore_main, *argv, "--force")
    assert code == 0, recs
    summary = recs[-1]
    assert summary["mode"] == "dr" and summary["domain"] == {"name": guest.name, "uuid": uuid}
    assert summary["files"][0] == str(disk)  # the original file name, in place
    dom = libvirt_conn.lookupByName(guest.name)
    assert dom.UUIDString() == uuid and str(disk) in dom.XMLDesc(0)
    dom.create()
    back = Guest(dom, console_log=guest.console_log)
    back.wait_agent(timeout=120)
    assert back.read_file("/mnt/vda/check-0") == b"dr round 0\n"
    with pytest.raises(AgentError):
        back.read_file("/mnt/vda/check-1")
    # the next backup sees the chain no longer matches the disk and starts a new one
    code, recs = run(backup_main, "--backup-path", str(root), "--vm", guest.name)
    assert code == 0 and recs[-1]["action"] == "full" and recs[-1]["outcome"] == "ok", recs
