"""Restores onto a remote hypervisor from the backup server (issue #17): qemu+ssh, as a user who cannot write there.

As in test_remote_backup.py the far side is this host's libvirtd over the
test sshd as root, and vmbk runs as an unprivileged local user to whom the
domains' directory is neither readable nor writable (0711): every file
the restore makes got there over ssh (vmbk.restore.remote streams the
qcow2 into ``cat`` there), which the files' owner (root, ssh's login)
shows.  A disaster recovery (the latest point, TPM state included) and a
clone (the first point) are both restored byte-exact and defined; the
fault: the ssh connection killed while an image is sent -> a clean
failure, nothing defined, no image left that looks complete.  A UEFI
VM's clone gets its own NVRAM, read over ssh by the backup and written
on the host by the restore, and the firmware starts with it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import libvirt
import pytest
from fixtures.remote import RemoteHost, lock_out
from replicate_helpers import qemu_write, reference, same_disk

from vmbk.restore.tpm import SWTPM_ROOT

pytestmark = pytest.mark.libvirt
MiB = 1 << 20
TPM = "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"
UNDEFINE = (libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)


def _backup(remote_host: RemoteHost, work: Path, vm: str) -> dict:
    code, recs, err = remote_host.run(work, "vmbk-backup", "--json", "--connect", remote_host.uri,
                                      "--backup-path", str(work / "backup"), "--vm", vm)
    assert code == 0, (code, recs, err[-3000:])
    (rec,) = [r for r in recs if r["type"] == "backup"]
    return rec


def _state(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _gone(conn: libvirt.virConnect, name: str) -> bool:
    try:
        conn.lookupByName(name)
    except libvirt.libvirtError:
        return True
    return False


def test_dr_and_clone_onto_the_remote_host_byte_exact(remote_host, nos_domain, libvirt_conn, cleanup_domains):
    before = set(remote_host.masters())
    nd = nos_domain(1, size="64M", writes=[(0x31, 0, 4 * MiB), (0x32, 40 * MiB, 2 * MiB)], extra_devices=TPM)
    uuid = nd.dom.UUIDString()
    disk = nd.disks[0]
    lock_out(nd.disks)
    work = remote_host.workdir("restore")
    _backup(remote_host, work, nd.name)
    ref0 = reference(disk, work / "ref0.raw")
    qemu_write(nd.dom, 0x41, 8)
    rec = _backup(remote_host, work, nd.name)
    assert rec["action"] == "inc"
    ref1 = reference(disk, work / "ref1.raw")
    tpm_saved = _state(Path(rec["target_dir"]) / "tpm-state" / "tpm2")
    assert tpm_saved

    # the host lost the VM: its definition, disk and TPM state
    nd.dom.destroy()
    nd.dom.undefineFlags(UNDEFINE | libvirt.VIR_DOMAIN_UNDEFINE_TPM)
    disk.unlink()
    assert not (SWTPM_ROOT / uuid).exists()

    code, recs, err = remote_host.run(work, "vmbk-restore", "--json", "--connect", remote_host.uri,
                                      "--backup-path", str(work / "backup"), "--vm", nd.name)
    assert code == 0, (recs, err[-3000:])
    summary = recs[-1]
    assert summary["type"] == "restore" and summary["mode"] == "dr" and summary["outcome"] == "ok", summary
    assert summary["domain"]["uuid"] == uuid and summary["free_bytes"] > 0 and summary["host"] == "127.0.0.1"
    assert summary["tpm"]["restored"] is True
    assert Path(summary["files"][0]) == disk
    assert disk.stat().st_uid == 0, "the image was not written over ssh"
    assert same_disk(disk, ref1)
    dom = libvirt_conn.lookupByUUIDString(uuid)
    assert dom.name() == nd.name and not dom.isActive()
    assert _state(SWTPM_ROOT / uuid / "tpm2") == tpm_saved
    assert not list(disk.parent.glob("*.partial"))

    clone = f"{nd.name}-clone"
    cleanup_domains.append(clone)
    code, recs, err = remote_host.run(work, "vmbk-restore", "--json", "--connect", remote_host.uri,
                                      "--backup-path", str(work / "backup"), "--vm", nd.name,
                                      "--restore-point", "0", "--name", clone, "--skip-tpm")
    assert code == 0, (recs, err[-3000:])
    summary = recs[-1]
    assert summary["mode"] == "clone" and summary["domain"]["uuid"] != uuid
    target = disk.parent / f"{clone}.qcow2"
    assert summary["files"][0] == str(target) and target.stat().st_uid == 0
    assert same_disk(target, ref0)
    assert (disk.parent / f"{clone}.xml").is_file()
    libvirt_conn.lookupByName(clone).create()  # the clone's definition runs on its restored disk

    # the disks alone, into a directory of the host that does not exist yet
    there = disk.parent / "data-only"
    code, recs, err = remote_host.run(work, "vmbk-restore", "--json", "--connect", remote_host.uri,
                                      "--backup-path", str(work / "backup"), "--vm", nd.name, "--skip-config",
                                      "--restore-path", str(there))
    assert code == 0 and recs[-1]["mode"] == "data", (recs, err[-3000:])
    (target,) = [Path(r["target"]) for r in recs if r["type"] == "restore_disk"]
    assert target.parent == there and target.stat().st_uid == 0 and same_disk(target, ref1)
    assert set(remote_host.masters()) <= before, "a control master outlived vmbk"


def test_ssh_dropped_mid_restore_fails_cleanly_nothing_defined(remote_host, nos_domain, libvirt_conn):
    nd = nos_domain(1, size="512M", writes=[(0x51, 0, 448 * MiB)])
    disk = nd.disks[0]
    lock_out(nd.disks)
    work = remote_host.workdir("restore-drop")
    _backup(remote_host, work, nd.name)
    nd.dom.destroy()
    nd.dom.undefineFlags(UNDEFINE)
    disk.unlink()
    partial = disk.with_name(disk.name + ".partial")

    p = remote_host.popen(work, "vmbk-restore", "--json", "--connect", remote_host.uri,
                          "--backup-path", str(work / "backup"), "--vm", nd.name)
    remote_host.drop_ssh_when(p, lambda: partial.exists() and partial.stat().st_size > 0)  # mid-image
    out, err = p.communicate(timeout=180)
    assert p.returncode != 0, err.decode()[-2000:]
    assert b"Traceback" not in err, err.decode()[-3000:]
    recs = [json.loads(line) for line in out.splitlines()]
    (error,) = [r for r in recs if r["type"] == "error"]
    assert error["vm"] == nd.name and error["kind"] == "ssh", error
    assert not [r for r in recs if r["type"] == "restore"]
    assert _gone(libvirt_conn, nd.name), "a VM was defined"
    assert not disk.exists(), "an image under its final name"
    # the cleanup went over a new master: nothing of the restore is left there
    assert not partial.exists(), "the .partial was left"
    assert not list(disk.parent.glob("*.partial")) and not (disk.parent / f"{nd.name}.xml").exists()
    time.sleep(0.5)
    assert remote_host.masters() == []  # the killed ones, and the one the cleanup made


def _nvram(xml: str) -> Path:
    return Path(xml.split("<nvram")[1].split(">", 1)[1].split("</nvram>")[0])


@pytest.mark.guest
def test_remote_clone_of_a_uefi_vm_gets_its_own_nvram_over_ssh(remote_host, test_guest, libvirt_conn,
                                                               cleanup_domains):
    """The NVRAM is a file of the host: read over ssh by the backup, written there by the clone's restore."""
    guest = test_guest(uefi=True)
    lock_out(guest.disks)
    work = remote_host.workdir("uefi")
    rec = _backup(remote_host, work, guest.name)
    nvram = _nvram(guest.dom.XMLDesc(0))
    saved = Path(rec["target_dir"]) / f"{nvram.name}.virtnbdbackup.0"
    assert saved.is_file() and saved.stat().st_size > 0

    clone = f"{guest.name}-clone"
    cleanup_domains.append(clone)
    code, recs, err = remote_host.run(work, "vmbk-restore", "--json", "--connect", remote_host.uri,
                                      "--backup-path", str(work / "backup"), "--vm", guest.name, "--name", clone)
    assert code == 0, (recs, err[-3000:])
    assert recs[-1]["mode"] == "clone" and recs[-1]["outcome"] == "ok", recs[-1]
    dom = libvirt_conn.lookupByName(clone)
    theirs = _nvram(dom.XMLDesc(0))
    assert theirs != nvram, "the clone shares the original's NVRAM"
    assert theirs.stat().st_uid == 0 and theirs.read_bytes() == saved.read_bytes()  # written there, over ssh
    assert not list(theirs.parent.glob("*.partial"))
    dom.create()  # the firmware takes it
    assert dom.isActive()
    dom.destroy()
