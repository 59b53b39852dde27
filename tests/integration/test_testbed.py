"""The test bed itself works: test guest, agent, no-OS domain, pull backup.

These tests exercise the fixtures that the engine tests rely on, against
the real libvirtd/QEMU on this host, and check things that would make
later failures confusing:

* the guest boots, its agent runs guest-exec with stdin/stdout, file
  writes reach the ext4 data disk, and fsfreeze really freezes (the agent
  refuses guest-exec while frozen);
* a clean agent shutdown leaves a clean ext4 holding the data in the qcow2;
* a no-OS domain keeps running and libvirt's pull-mode backup exports
  the disk over NBD with the content it had when the job began, even
  after the disk is overwritten (copy-before-write into the scratch file).
  The export is read with ``qemu-img convert`` from ``nbd+unix://``, not
  with vmbk's own NBD client, so this test checks only the test bed.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import subprocess
import time
import uuid

import libvirt
import libvirt_qemu
import pytest
from fixtures.guest import AgentError, make_qcow2, qemu_user_ids

MiB = 1 << 20
# QOM path of vda's virtio-blk device (libvirt names the PCI proxy
# virtio-disk0; the BlockBackend belongs to its virtio-backend child).
VDA_BACKEND = "/machine/peripheral/virtio-disk0/virtio-backend"


@pytest.mark.libvirt
@pytest.mark.guest
def test_guest_agent_write_freeze_thaw_read(test_guest):
    guest = test_guest()
    content = f"vmbk checkfile {uuid.uuid4()}\n".encode() + secrets.token_bytes(
        256 * 1024
    )
    path = "/mnt/vda/checkfile"

    assert guest.exec(["/bin/cat"], input=b"stdin reaches the guest") == (
        0,
        b"stdin reaches the guest",
        b"",
    )
    mounts = guest.read_file("/proc/mounts").decode()
    assert "/dev/vda /mnt/vda ext4 rw,noatime,noinit_itable" in mounts

    guest.write_file(path, content)
    guest.sync()
    out = guest.sh(f"sha256sum {path}")
    assert out.split()[0].decode() == hashlib.sha256(content).hexdigest()

    frozen = guest.freeze()
    try:
        assert frozen >= 1
        assert guest.freeze_status() == "frozen"
        with pytest.raises(AgentError, match="frozen"):
            guest.exec(["/bin/true"])
    finally:
        thawed = guest.thaw()
    assert thawed == frozen
    assert guest.freeze_status() == "thawed"

    guest.sync()
    assert guest.read_file(path) == content
    assert guest.exec(["/bin/sh", "-c", "exit 3"])[0] == 3


@pytest.mark.libvirt
@pytest.mark.guest
def test_guest_shutdown_leaves_clean_fs_with_data(test_guest, vm_workdir):
    guest = test_guest(data_size="64M")
    content = f"persisted {uuid.uuid4()}\n".encode()
    guest.write_file("/mnt/vda/persisted", content)
    guest.shutdown(timeout=60)
    assert not guest.is_active()

    raw = vm_workdir / "vda.raw"
    subprocess.run(
        [
            "qemu-img",
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            str(guest.disks[0]),
            str(raw),
        ],
        check=True,
    )
    fsck = subprocess.run(
        ["e2fsck", "-fn", str(raw)], check=False, capture_output=True, text=True
    )
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    cat = subprocess.run(
        ["debugfs", "-R", "cat /persisted", str(raw)], capture_output=True, check=True
    )
    assert cat.stdout == content


def _hmp(dom: libvirt.virDomain, command: str) -> str:
    return libvirt_qemu.qemuMonitorCommand(
        dom, command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
    )


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.libvirt
def test_nos_domain_pull_backup_exports_point_in_time(nos_domain, vm_workdir):
    size = 4 * MiB
    disk = make_qcow2(vm_workdir / "vda.qcow2", size, writes=[(0xAB, 0, MiB)])
    nd = nos_domain([disk])

    # QEMU (libvirt-qemu) creates the NBD socket: the directory must be its.
    sockdir = vm_workdir / "nbd"
    sockdir.mkdir(mode=0o755)
    os.chown(sockdir, *qemu_user_ids())
    sock = sockdir / "backup.sock"
    scratch = vm_workdir / "vda.scratch.qcow2"
    backup_xml = f"""<domainbackup mode='pull'>
  <server transport='unix' socket='{sock}'/>
  <disks>
    <disk name='vda' backup='yes' type='file'>
      <scratch file='{scratch}'/>
    </disk>
  </disks>
</domainbackup>"""

    nd.dom.backupBegin(backup_xml, None, 0)
    try:
        stats = nd.dom.jobStats()
        assert stats["operation"] == libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP
        assert f"socket='{sock}'" in nd.dom.backupGetXMLDesc(0)
        _wait_for(sock.exists, 10, f"NBD socket {sock}")

        # Overwrite the start of the live disk after the backup point, as
        # the guest would: through the device's BlockBackend (the node name
        # would bypass the copy-before-write filter).  qemu-io's own output
        # goes to QEMU's log, so the write is checked on the image below.
        reply = _hmp(nd.dom, f'qemu-io -d {VDA_BACKEND} "write -P 0xcd 0 64k"')
        assert reply.strip() == "", reply
        check = subprocess.run(
            [
                "qemu-io",
                "-U",
                "-r",
                "-f",
                "qcow2",
                "-c",
                "read -P 0xcd 0 64k",
                str(disk),
            ],
            check=False,
            capture_output=True,
            text=True,
        )
        assert check.returncode == 0 and "failed" not in check.stdout, check.stdout

        exported = vm_workdir / "export.raw"
        subprocess.run(
            [
                "qemu-img",
                "convert",
                "-f",
                "raw",
                "-O",
                "raw",
                f"nbd+unix:///vda?socket={sock}",
                str(exported),
            ],
            check=True,
            capture_output=True,
        )
        data = exported.read_bytes()
        assert len(data) == size
        assert data[:MiB] == b"\xab" * MiB, "export does not show the backup-time data"
        assert data[MiB:] == bytes(size - MiB)
    finally:
        nd.dom.abortJob()

    _wait_for(
        lambda: nd.dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE, 10, "the job to end"
    )
    assert nd.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
