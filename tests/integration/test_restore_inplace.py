"""In-place ``--disk`` restore: the VM's own files replaced, all or nothing.

A no-OS domain with two qcow2 disks (the content is what qemu-io wrote,
so the disks at the backup instant are known exactly), backed up twice
with a change in between.  Then the disks are damaged, the VM shut off,
and ``vmbk-restore --vm VM --disk ...`` (no ``--restore-path``) puts a
restore point back where the definition says the disks are.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import libvirt
import orjson
import pytest
from backup_helpers import backup_ok
from backup_helpers import run_restore as run
from guest.domain import file_disk_xml, make_raw

from vmbk.errors import Exit

pytestmark = pytest.mark.libvirt
MiB = 1 << 20



def snapshot(image: Path, dest: Path) -> Path:
    subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(image), str(dest)], check=True)
    return dest


def same(image: Path, ref: Path, fmt: str = "qcow2") -> bool:
    r = subprocess.run(["qemu-img", "compare", "-q", "-U", "-f", fmt, "-F", "raw", str(image), str(ref)], check=False)
    return r.returncode == 0


def hmp_write(dom, dev: str, pattern: int, offset: int, length: int) -> None:
    """Write into a running domain's disk through the device (the dirty bitmap sees it)."""
    import libvirt_qemu

    index = ord(dev[-1]) - ord("a")
    cmd = f'qemu-io -d /machine/peripheral/virtio-disk{index}/virtio-backend "write -P {pattern} {offset} {length}"'
    libvirt_qemu.qemuMonitorCommand(dom, cmd, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)


def test_in_place_disk_restore_replaces_the_files_and_keeps_pre_restore_copies(nos_domain, vm_workdir):
    nd = nos_domain(2, size="64M", writes=[(0x11, 0, 4 * MiB), (0x22, 32 * MiB, 2 * MiB)])
    vda, vdb = nd.disks
    root = vm_workdir / "backups"
    root.mkdir()
    backup_ok(root, nd.name)
    ref0 = {d: snapshot(p, vm_workdir / f"ref0-{d}.raw") for d, p in (("vda", vda), ("vdb", vdb))}
    # a change both disks see through the device, then the incremental
    for dev in ("vda", "vdb"):
        hmp_write(nd.dom, dev, 0x5A, 8 * MiB, MiB)
    inc = backup_ok(root, nd.name)
    assert inc["action"] == "inc"
    ref1 = {d: snapshot(p, vm_workdir / f"ref1-{d}.raw") for d, p in (("vda", vda), ("vdb", vdb))}
    assert not same(vda, ref0["vda"])

    base = ["--backup-path", str(root), "--vm", nd.name]
    code, recs = run(*base, "--disk", "vdb")
    assert code == Exit.VM and "running" in recs[-1]["message"], recs
    nd.dom.destroy()
    damaged = {d: p.read_bytes() for d, p in (("vda", vda), ("vdb", vdb))}
    os.chmod(vdb, 0o640)
    owner = (vdb.stat().st_uid, vdb.stat().st_gid)

    code, recs = run(*base, "--disk", "vdb", "--restore-point", "0", "--dry-run")
    assert code == 0 and recs[-1]["mode"] == "inplace" and recs[-1]["outcome"] == "dry-run", recs
    assert vdb.read_bytes() == damaged["vdb"] and not Path(f"{vdb}.pre-restore").exists()

    code, recs = run(*base, "--disk", "vdb", "--restore-point", "0")
    assert code == 0, recs
    disk_rec, summary = recs
    assert (disk_rec["target"], disk_rec["pre_restore"]) == (str(vdb), f"{vdb}.pre-restore")
    assert summary["mode"] == "inplace" and summary["disks"] == ["vdb"]
    assert summary["pre_restore"] == [{"path": f"{vdb}.pre-restore", "size": len(damaged["vdb"])}]
    assert any("checkpoints" in w for w in summary["warnings"])
    assert same(vdb, ref0["vdb"])  # point 0, not the latest
    assert Path(f"{vdb}.pre-restore").read_bytes() == damaged["vdb"]
    st = vdb.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640 and (st.st_uid, st.st_gid) == owner
    assert vda.read_bytes() == damaged["vda"]  # not asked for: untouched
    assert subprocess.run(["qemu-img", "check", "-q", str(vdb)], check=False).returncode == 0

    # a second restore would overwrite the rollback copy: refused, nothing touched
    before = vdb.read_bytes()
    code, recs = run(*base, "--disk", "all")
    assert code == Exit.STORAGE and ".pre-restore" in recs[-1]["message"], recs
    assert vdb.read_bytes() == before and vda.read_bytes() == damaged["vda"]
    assert not list(vm_workdir.glob("*.partial"))

    code, recs = run(*base, "--disk", "all", "--no-pre-restore")
    assert code == 0, recs
    assert same(vda, ref1["vda"]) and same(vdb, ref1["vdb"])
    assert not Path(f"{vda}.pre-restore").exists()
    assert Path(f"{vdb}.pre-restore").read_bytes() == damaged["vdb"]  # the earlier copy is left alone
    nd.dom.create()  # the VM starts on its restored disks
    # the restored disks carry no bitmaps: the next backup heals the chain with a new full
    healed = backup_ok(root, nd.name)
    assert healed["action"] == "full" and healed["outcome"] == "ok", healed


def test_a_failing_disk_leaves_every_file_of_the_vm_as_it_was(nos_domain, vm_workdir):
    nd = nos_domain(2, size="64M", writes=[(0x33, 0, 2 * MiB)])
    root = vm_workdir / "backups"
    root.mkdir()
    rec = backup_ok(root, nd.name)
    nd.dom.destroy()
    for d in nd.disks:
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -q -P 0x66 0 1M", str(d)], check=True)
    before = {d: d.read_bytes() for d in nd.disks}
    # vdb's stream is damaged: its checksum fails before anything is written ...
    vdb_data = Path(rec["target_dir"]) / "vdb.full.data"
    blob = bytearray(vdb_data.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    vdb_data.write_bytes(bytes(blob))
    code, recs = run("--backup-path", str(root), "--vm", nd.name, "--disk", "all")
    assert code == Exit.STORAGE, recs
    assert {d: d.read_bytes() for d in nd.disks} == before
    # ... and without the checksum pass a truncated stream is refused before anything is
    # built: the point is incomplete (exit 5), vda is left alone too
    vdb_data.write_bytes(bytes(blob[: len(blob) // 3]))
    code, recs = run("--backup-path", str(root), "--vm", nd.name, "--disk", "all", "--no-verify")
    assert code == Exit.VM and "truncated" in recs[-1]["message"], recs
    assert {d: d.read_bytes() for d in nd.disks} == before
    assert not [p for p in nd.disks[0].parent.iterdir() if p.name.endswith((".partial", ".pre-restore"))]


def test_in_place_needs_a_defined_vm_and_refuses_misuse(nos_domain, vm_workdir, libvirt_conn):
    nd = nos_domain(1, size="32M", writes=[(0x44, 0, MiB)])
    root = vm_workdir / "backups"
    root.mkdir()
    backup_ok(root, nd.name)
    base = ["--backup-path", str(root), "--vm", nd.name]
    code, recs = run(*base, "--no-pre-restore")
    assert code == Exit.USAGE
    code, _ = run(*base, "--disk", "vda", "--name", "x")
    assert code == Exit.USAGE
    nd.dom.destroy()
    code, recs = run(*base, "--disk", "vdb")
    assert code == Exit.VM and "disk 'vdb' is not in restore point" in recs[-1]["message"], recs
    nd.dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)  # the files stay
    code, recs = run(*base, "--disk", "vda")
    assert code == Exit.VM and "not defined" in recs[-1]["message"], recs


def test_a_raw_disk_is_restored_raw_in_place(nos_domain, vm_workdir):
    raw = make_raw(vm_workdir / "data.raw", "32M", writes=[(0x77, 4 * MiB, MiB)])
    extra = file_disk_xml(raw, "vdb")
    nd = nos_domain(1, size="32M", writes=[(0x11, 0, MiB)], extra_devices=extra)
    root = vm_workdir / "backups"
    root.mkdir()
    backup_ok(root, nd.name)
    ref = vm_workdir / "ref.raw"
    subprocess.run(["cp", "--sparse=always", str(raw), str(ref)], check=True)
    nd.dom.destroy()
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -q -P 0x99 0 8M", str(raw)], check=True)
    code, recs = run("--backup-path", str(root), "--vm", nd.name, "--disk", "vdb")
    assert code == 0, recs
    assert recs[0]["format"] == "raw"
    info = orjson.loads(subprocess.run(["qemu-img", "info", "--output=json", str(raw)], check=True,
                                       capture_output=True).stdout)
    assert info["format"] == "raw" and raw.read_bytes() == ref.read_bytes()
    assert raw.stat().st_blocks * 512 < 4 * MiB  # thin: only the data written
    nd.dom.create()
