"""Self-healing of vmbk-backup, each case on a real domain.

No-OS domains (cheap under TCG); the "guest" writes are made through
QEMU's block layer with HMP qemu-io, so dirty bitmaps see them.  Every
case checks what the plan decided, what the tree holds afterwards, and
that the newest restore point equals the disk.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import libvirt
import libvirt_qemu
import orjson
import pytest
from backup_helpers import backup_ok, chain_files

from vmbk.stream import reconstruct_raw

pytestmark = pytest.mark.libvirt

VDA = "/machine/peripheral/virtio-disk0/virtio-backend"
MiB = 1 << 20


def write(dom, cmd: str) -> None:
    for c in (cmd, "flush"):
        libvirt_qemu.qemuMonitorCommand(dom, f'qemu-io -d {VDA} "{c}"', libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)


def latest_point_equals_disk(rec: dict, disk: Path, tmp: Path) -> bool:
    raw = tmp / "restored.raw"
    reconstruct_raw(chain_files(Path(rec["target_dir"])), raw)
    return subprocess.run(["qemu-img", "compare", "-q", "-U", "-f", "raw", "-F", "qcow2", str(raw), str(disk)]).returncode == 0


@pytest.fixture
def vm(nos_domain, vm_workdir):
    nd = nos_domain(1, size="64M", writes=[(0x11, 0, MiB), (0x22, 8 * MiB, MiB)])
    root = vm_workdir / "backups"
    root.mkdir()
    first = backup_ok(root, nd.name)
    assert first["action"] == "full"
    return nd, root, first


def test_lost_checkpoint_metadata_is_redefined_and_the_chain_goes_on(vm, tmp_path):
    nd, root, first = vm
    nd.dom.checkpointLookupByName("virtnbdbackup.0").delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
    write(nd.dom, "write -P 0x33 2M 256k")
    rec = backup_ok(root, nd.name)
    assert rec["action"] == "inc" and rec["checkpoint"] == "virtnbdbackup.1"
    assert any(e["event"] == "redefined" for e in rec["events"])
    assert rec["disks"][0]["data_size"] == 256 * 1024
    assert latest_point_equals_disk(rec, nd.disks[0], tmp_path)


def test_lost_metadata_and_bitmap_falls_back_to_a_full_in_the_same_run(vm, tmp_path):
    nd, root, first = vm
    nd.dom.checkpointLookupByName("virtnbdbackup.0").delete(0)  # metadata and bitmap
    write(nd.dom, "write -P 0x44 3M 64k")
    rec = backup_ok(root, nd.name)
    assert rec["action"] == "full" and rec["checkpoint"] == "virtnbdbackup.0"
    assert "redefining the chain's checkpoints failed" in rec["reasons"][0]
    assert any(e["event"] == "archived" for e in rec["events"])
    assert latest_point_equals_disk(rec, nd.disks[0], tmp_path)


def test_bitmap_removed_while_off_means_archive_and_full(vm, tmp_path):
    nd, root, first = vm
    nd.dom.destroy()
    subprocess.run(["qemu-img", "bitmap", "--remove", str(nd.disks[0]), "virtnbdbackup.0"], check=True)
    nd.dom.create()
    rec = backup_ok(root, nd.name)
    assert rec["action"] == "full"
    assert any("bitmap" in r for r in rec["reasons"])
    archived = [e for e in rec["events"] if e["event"] == "archived"]
    assert archived and Path(archived[0]["directory"], "vda.full.data").exists()
    assert latest_point_equals_disk(rec, nd.disks[0], tmp_path)


def test_corrupt_cpt_means_archive_and_full(vm):
    nd, root, first = vm
    (Path(first["target_dir"]) / f"{nd.name}.cpt").write_text("{garbage")
    rec = backup_ok(root, nd.name)
    assert rec["action"] == "full" and any(e["event"] == "archived" for e in rec["events"])


def test_leftover_partial_is_cleaned_and_recorded(vm):
    nd, root, first = vm
    leftover = Path(first["target_dir"]) / "vda.inc.virtnbdbackup.1.data.partial"
    leftover.write_bytes(b"half a backup")
    rec = backup_ok(root, nd.name)
    assert not leftover.exists()
    assert any(e["event"] == "cleaned" for e in rec["events"])
    # the partial of the next incremental, nothing else amiss: rolled back, the chain goes on
    assert rec["action"] == "inc" and not any(e["event"] == "archived" for e in rec["events"])
    assert any("partial" in r for r in rec["reasons"])


def test_resized_disk_means_a_new_full(vm, tmp_path):
    nd, root, first = vm
    nd.dom.blockResize("vda", 96 * MiB, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
    write(nd.dom, "write -P 0x55 80M 64k")
    rec = backup_ok(root, nd.name)
    assert rec["action"] == "full" and any("resized" in r for r in rec["reasons"])
    assert rec["disks"][0]["virtual_size"] == 96 * MiB
    assert latest_point_equals_disk(rec, nd.disks[0], tmp_path)


def _point_equals(chain: Path, n: int, reference: Path, tmp: Path) -> bool:
    raw = tmp / f"point{n}.raw"
    reconstruct_raw(chain_files(chain, until=n), raw)
    return subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(raw), str(reference)]).returncode == 0


def _reference(dom, disk: Path, out: Path) -> Path:
    """The disk as it is now (the VM paused for the copy: a no-OS guest writes nothing)."""
    dom.suspend()
    try:
        subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(disk), str(out)], check=True)
    finally:
        dom.resume()
    return out


def test_an_incremental_killed_mid_stream_is_rolled_back_not_archived(nos_domain, vm_workdir, tmp_path):
    """kill -9 while incremental 1 is written: its .partial and libvirt's checkpoint
    virtnbdbackup.1 are left.  The next run removes both and the chain goes on
    with incremental 1 (vmbackup archives and starts a full); the bitmap of the
    deleted checkpoint was merged into virtnbdbackup.0's, so nothing written
    since the full is missed: every point restores byte for byte."""
    from backup_helpers import finish, slow_backup, wait_for_partials

    nd = nos_domain(1, size="1G", writes=[(0x11, 0, MiB)])
    root = vm_workdir / "backups"
    root.mkdir()
    full = backup_ok(root, nd.name)
    chain = Path(full["target_dir"])
    ref0 = _reference(nd.dom, nd.disks[0], tmp_path / "ref0.raw")
    write(nd.dom, "write -P 0x44 16M 300M")  # enough for the slowed incremental to be caught mid-stream
    p = slow_backup(root, [nd.name], tmp_path / "etc")
    wait_for_partials(p, root)
    p.kill()
    finish(p)
    assert sorted(c.getName() for c in nd.dom.listAllCheckpoints(0)) == ["virtnbdbackup.0", "virtnbdbackup.1"]
    write(nd.dom, "write -P 0x55 600M 1M")  # after the dead run's checkpoint: must be in the next point too
    rec = backup_ok(root, nd.name)
    assert (rec["action"], rec["checkpoint"], rec["parent"]) == ("inc", "virtnbdbackup.1", "virtnbdbackup.0"), rec
    assert "did not finish" in rec["reasons"][0], rec["reasons"]
    assert not list(chain.glob("*.partial")) and not list(chain.parent.glob("*/.archives"))
    assert not (chain / ".archives").exists()
    ref1 = _reference(nd.dom, nd.disks[0], tmp_path / "ref1.raw")
    assert _point_equals(chain, 0, ref0, tmp_path) and _point_equals(chain, 1, ref1, tmp_path)
    write(nd.dom, "write -P 0x66 8M 1M")
    rec = backup_ok(root, nd.name)
    assert rec["action"] == "inc" and rec["checkpoint"] == "virtnbdbackup.2"
    assert _point_equals(chain, 2, _reference(nd.dom, nd.disks[0], tmp_path / "ref2.raw"), tmp_path)


def _point_of(chain: Path, n: int, disk: str, reference: Path, tmp: Path) -> bool:
    raw = tmp / f"point{n}-{disk}.raw"
    reconstruct_raw(chain_files(chain, until=n, disk=disk), raw)
    return subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(raw), str(reference)]).returncode == 0


def test_an_incremental_killed_after_one_disk_was_renamed_is_rolled_back(nos_domain, vm_workdir, tmp_path):
    """A VM's disks are copied side by side and each stream is renamed when
    it is done: kill -9 once vda's incremental 1 is renamed while vdb's is
    still written.  The .cpt does not list 1 and libvirt has checkpoint 1:
    the next run removes every file of 1 and the checkpoint, and takes
    incremental 1 again (before: the chain was archived and every disk
    copied in full).  Every point of both disks restores byte for byte."""
    from backup_helpers import finish, slow_backup

    nd = nos_domain(2, size="1G", writes=[(0x11, 0, MiB)])
    root = vm_workdir / "backups"
    root.mkdir()
    full = backup_ok(root, nd.name)
    chain = Path(full["target_dir"])
    refs0 = {d: _reference(nd.dom, p, tmp_path / f"ref0-{d}.raw") for d, p in zip(("vda", "vdb"), nd.disks)}
    write(nd.dom, "write -P 0x44 16M 1M")  # vda: a small incremental, renamed at once
    libvirt_qemu.qemuMonitorCommand(nd.dom, 'qemu-io -d /machine/peripheral/virtio-disk1/virtio-backend '
                                    '"write -P 0x45 16M 300M"', libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
    p = slow_backup(root, [nd.name], tmp_path / "etc")
    renamed = chain / "vda.inc.virtnbdbackup.1.data"
    deadline = time.monotonic() + 120
    while not (renamed.exists() and (chain / "vdb.inc.virtnbdbackup.1.data.partial").exists()):
        assert p.poll() is None and time.monotonic() < deadline, "the window was never seen"
        time.sleep(0.02)
    p.kill()
    finish(p)
    assert renamed.exists() and orjson.loads((chain / f"{nd.name}.cpt").read_bytes()) == ["virtnbdbackup.0"]
    write(nd.dom, "write -P 0x55 600M 1M")  # after the dead run's checkpoint: must be in the next point too
    rec = backup_ok(root, nd.name)
    assert (rec["action"], rec["checkpoint"], rec["parent"]) == ("inc", "virtnbdbackup.1", "virtnbdbackup.0"), rec
    assert "did not finish" in rec["reasons"][0] and "vda.inc.virtnbdbackup.1.data" in rec["reasons"][0], rec
    assert any(e["event"] == "cleaned" and "vda.inc.virtnbdbackup.1.data" in e["reason"] for e in rec["events"])
    assert not list(chain.glob("*.partial")) and not (chain / ".archives").exists()
    refs1 = {d: _reference(nd.dom, p, tmp_path / f"ref1-{d}.raw") for d, p in zip(("vda", "vdb"), nd.disks)}
    for d in ("vda", "vdb"):
        assert _point_of(chain, 0, d, refs0[d], tmp_path) and _point_of(chain, 1, d, refs1[d], tmp_path), d
    write(nd.dom, "write -P 0x66 8M 1M")
    rec = backup_ok(root, nd.name)
    assert rec["action"] == "inc" and rec["checkpoint"] == "virtnbdbackup.2"
    assert _point_of(chain, 2, "vda", _reference(nd.dom, nd.disks[0], tmp_path / "ref2.raw"), tmp_path)
