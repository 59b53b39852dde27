"""vmbk-backup end to end on the booted test guest.

Rounds of (write a checkfile with unique content through the agent; back
up; take a reference copy of the disk while the guest is paused).  Then
every restore point is rebuilt from the tree — with vmbk's chain merge and
with Debian's virtnbdrestore — and compared byte for byte with its
reference.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import orjson
import pytest
from backup_helpers import released, run_backup

from vmbk.stream import reconstruct_raw, scan, verify_checksum

pytestmark = [pytest.mark.libvirt, pytest.mark.guest]


def backup(backup_path: Path, name: str, *extra: str) -> tuple[int, list[dict]]:
    return run_backup(backup_path, "--vm", name, *extra)


def paused_backup(guest, backup_path: Path, dest: Path) -> tuple[int, list[dict]]:
    """Back up while the guest is paused, with the disk as it is then.

    The reference must be the disk at the backup's instant: a running ext4
    rewrites its superblock after a thaw, so a copy taken after the backup
    is not what the backup saw.
    """
    guest.dom.suspend()
    try:
        subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(guest.disks[0]), str(dest)],
                       check=True, capture_output=True)
        return backup(backup_path, guest.name)
    finally:
        guest.dom.resume()


def same(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(a), str(b)]).returncode == 0


def virtnbdrestore(chain_dir: Path, until: str, out: Path) -> Path:
    out.mkdir()
    subprocess.run(["virtnbdrestore", "-i", str(chain_dir), "-o", str(out), "-u", until, "-n",
                    "-L", str(out / "restore.log"), "-f", str(out / "nbd.sock")], check=True, capture_output=True)
    (image,) = [p for p in out.iterdir() if p.suffix == ".qcow2"]
    raw = out / "image.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(released(image)), str(raw)], check=True)
    return raw


@pytest.fixture
def backup_root(vm_workdir: Path) -> Path:
    root = vm_workdir / "backups"
    root.mkdir()
    return root


def test_full_and_incrementals_restore_to_each_point(test_guest, backup_root, vm_workdir, tmp_path):
    guest = test_guest()
    refs: list[Path] = []
    records: list[dict] = []
    for n in range(3):
        guest.write_file(f"/mnt/vda/check-{n}", os.urandom(200_000) + f"round {n}\n".encode())
        guest.sync()
        refs.append(tmp_path / f"ref-{n}.raw")
        code, recs = paused_backup(guest, backup_root, refs[-1])
        assert code == 0, recs
        (rec,) = recs
        assert rec["type"] == "backup" and rec["outcome"] == "ok"
        assert rec["action"] == ("full" if n == 0 else "inc")
        assert rec["checkpoint"] == f"virtnbdbackup.{n}"
        records.append(rec)

    chain = Path(records[0]["target_dir"])
    files = [chain / "vda.full.data"] + [chain / f"vda.inc.virtnbdbackup.{n}.data" for n in (1, 2)]
    for f in files:
        assert verify_checksum(f, required=True)
    assert orjson.loads((chain / f"{guest.name}.cpt").read_bytes()) == [f"virtnbdbackup.{n}" for n in range(3)]
    for n in range(3):
        assert (chain / "checkpoints" / f"virtnbdbackup.{n}.xml").exists()
        assert (chain / f"vmconfig.virtnbdbackup.{n}.xml").exists()
    assert not list(chain.rglob("*.partial"))
    assert oct(chain.stat().st_mode & 0o7777) == "0o2750"

    for n in range(3):
        raw = tmp_path / f"vmbk-{n}.raw"
        reconstruct_raw(files[: n + 1], raw)
        assert same(raw, refs[n]), f"restore point {n} differs from its reference"

    # Debian's virtnbdrestore reads vmbk's streams.  It ignores zero frames,
    # so it must equal vmbk's merge without them; and the source itself
    # when the incrementals carry none.
    for n in (0, 2):
        theirs = virtnbdrestore(chain, f"virtnbdbackup.{n}", tmp_path / f"virtnbdrestore-{n}")
        ours = tmp_path / f"nozero-{n}.raw"
        reconstruct_raw(files[: n + 1], ours, zero_frames=False)
        assert same(theirs, ours)
        if not any(scan(f).zero_frames for f in files[1 : n + 1]):
            assert same(theirs, refs[n])


def test_running_guest_is_frozen_for_the_backup_instant(test_guest, backup_root):
    guest = test_guest()
    code, (rec,) = backup(backup_root, guest.name)
    assert code == 0 and rec["consistency"] == "frozen"
    assert guest.freeze_status() == "thawed" and guest.dom.state()[0] == 1  # running


def test_shut_off_vm_gets_a_copy_backup(test_guest, backup_root, tmp_path):
    guest = test_guest()
    guest.write_file("/mnt/vda/offline", b"written before shutdown\n")
    guest.shutdown()
    code, (rec,) = backup(backup_root, guest.name)
    assert code == 0 and rec["action"] == "copy" and rec["consistency"] == "offline"
    data = Path(rec["target_dir"]) / "vda.copy.data"
    assert data.exists() and (Path(rec["target_dir"]) / "vmconfig.copy.xml").exists()
    raw = tmp_path / "copy.raw"
    reconstruct_raw([data], raw)
    src = tmp_path / "src.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(guest.disks[0]), str(src)], check=True)
    assert same(raw, src)
    # nothing changed since: the next run skips
    code, (rec,) = backup(backup_root, guest.name)
    assert code == 0 and rec["action"] == "skip"


def test_dry_run_writes_nothing(test_guest, backup_root):
    guest = test_guest()
    code, (rec,) = backup(backup_root, guest.name, "--dry-run")
    assert code == 0 and rec["outcome"] == "dry-run" and rec["action"] == "full"
    assert [p.name for p in backup_root.iterdir()] == []
    assert guest.dom.listAllCheckpoints(0) == []


def test_failed_backup_leaves_no_files_and_no_checkpoint(test_guest, backup_root, monkeypatch):
    guest = test_guest()
    import vmbk.backup.vm as vm

    def broken(*a, **k):
        raise vm.VmError("simulated failure while copying", vm=guest.name)

    monkeypatch.setattr(vm, "backup_disk", broken)
    code, (rec,) = backup(backup_root, guest.name)
    assert code == 5 and rec["type"] == "error" and "simulated" in rec["message"]
    chain_files = [p for p in (backup_root / guest.name).rglob("*") if p.is_file()]
    assert chain_files == []
    assert guest.dom.listAllCheckpoints(0) == []
    assert guest.dom.isActive() and guest.freeze_status() == "thawed"
    monkeypatch.undo()
    code, (rec,) = backup(backup_root, guest.name)
    assert code == 0 and rec["action"] == "full" and rec["checkpoint"] == "virtnbdbackup.0"


def test_lock_conflict_is_an_error_record_with_code_3(test_guest, backup_root):
    from vmbk.lock import VmLock

    guest = test_guest()
    with VmLock(backup_root, guest.name):
        code, (rec,) = backup(backup_root, guest.name)
    assert code == 3 and rec["kind"] == "lock"
    shutil.rmtree(backup_root / guest.name, ignore_errors=True)
