"""SIGTERM/SIGINT in the middle of a real backup: clean exit, nothing left.

The backup is slowed down with heavy LZ4-HC compression so the signal
lands while a stream is being written.  Afterwards: exit 128+N, no
.partial or data file, no checkpoint in libvirt, the lock released, the
domain running (not paused), and the next run does a normal full.
SIGKILL leaves everything behind; the next run must clean it up.
"""

from __future__ import annotations

import shutil
import signal

import orjson
import pytest
from backup_helpers import backup_ok, finish, run_backup, slow_backup, wait_for_partials

from vmbk.virt.backupjob import RUN_DIR

pytestmark = pytest.mark.libvirt
MiB = 1 << 20


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_mid_backup_cleans_up(nos_domain, vm_workdir, tmp_path, sig, code):
    nd = nos_domain(1, size="1G", writes=[(0x5A, 0, 400 * MiB)])
    backups = vm_workdir / "backups"
    backups.mkdir()
    p = slow_backup(backups, [nd.name], tmp_path / "etc")
    wait_for_partials(p, backups)
    p.send_signal(sig)
    assert finish(p) == code
    assert p.stdout.read() == b""  # no half record, no backup record
    vm_dir = backups / nd.name
    assert [f for f in vm_dir.rglob("*") if f.is_file()] == []
    assert nd.dom.listAllCheckpoints(0) == []
    assert not list((backups / "_state" / "locks").iterdir())
    assert nd.dom.state()[0] == 1  # running
    assert backup_ok(backups, nd.name)["action"] == "full"


def test_vm_destroyed_mid_backup_fails_cleanly_and_the_next_run_works(nos_domain, vm_workdir, tmp_path):
    nd = nos_domain(1, size="1G", writes=[(0x5A, 0, 400 * MiB)])
    backups = vm_workdir / "backups"
    backups.mkdir()
    p = slow_backup(backups, [nd.name], tmp_path / "etc")
    wait_for_partials(p, backups)
    nd.dom.destroy()
    code = finish(p)
    (rec,) = [orjson.loads(line) for line in p.stdout.read().splitlines()]
    assert rec["type"] == "error" and code == rec["code"] and code in (5, 6), rec
    assert [f for f in (backups / nd.name).rglob("*") if f.is_file()] == []
    assert nd.dom.listAllCheckpoints(0) == []
    assert backup_ok(backups, nd.name)["action"] == "copy"  # shut off now: a copy


def test_sigkill_mid_backup_the_next_run_ends_the_job_left_running(nos_domain, vm_workdir, tmp_path):
    """libvirt keeps a pull job until it is aborted and refuses new ones: every
    later backup failed (after a 30 s libvirt timeout) until someone ran
    virsh domjobabort."""
    import libvirt

    nd = nos_domain(1, size="1G", writes=[(0x5A, 0, 400 * MiB)])
    backups = vm_workdir / "backups"
    backups.mkdir()
    before = set(RUN_DIR.glob("backup-*"))
    p = slow_backup(backups, [nd.name], tmp_path / "etc")
    wait_for_partials(p, backups)
    p.kill()
    finish(p)
    assert nd.dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE  # what kill -9 leaves
    left = set(RUN_DIR.glob("backup-*")) - before
    assert len(left) == 1
    rec = backup_ok(backups, nd.name)
    assert rec["action"] == "full" and rec["consistency"] in ("crash", "paused")
    assert any("did not finish" in e.get("reason", "") for e in rec["events"]), rec["events"]
    assert nd.dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE
    assert [c.getName() for c in nd.dom.listAllCheckpoints(0)] == ["virtnbdbackup.0"]
    assert not [d for d in left if d.exists()], left  # the dead run's socket and scratch file
    assert not list(backups.rglob("*.partial"))


def test_a_backup_job_of_another_tool_is_left_alone(nos_domain, vm_workdir):
    """A pull job whose socket is not in vmbk's run directory is someone
    else's (virtnbdbackup run by hand): the VM fails, clearly, and the job runs on."""
    import os
    import pwd

    import libvirt

    from vmbk.virt.backupjob import BackupJob

    nd = nos_domain(1)
    backups = vm_workdir / "backups"
    backups.mkdir()
    theirs = vm_workdir / "other-tool"
    theirs.mkdir()
    qemu = pwd.getpwnam("libvirt-qemu")
    os.chown(theirs, qemu.pw_uid, qemu.pw_gid)
    job = BackupJob(nd.dom, socket=theirs / "nbd.sock", disks=["vda"], scratch_dir=theirs, checkpoint=None,
                    parent=None)
    job.begin()
    try:
        code, recs = run_backup(backups, "--vm", nd.name)
        (rec,) = recs
        assert rec["type"] == "error" and code == rec["code"] == 5, rec
        assert "another tool" in rec["message"] and "domjobabort" in rec["message"]
        assert nd.dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE  # still theirs, still running
        assert nd.dom.listAllCheckpoints(0) == []
    finally:
        job.end()


def test_sigkill_mid_copy_backup_leaves_no_qemu_nbd_holding_the_disk(nos_domain, vm_workdir, tmp_path):
    """qemu-nbd serves a shut-off VM's disk (--persistent): it must not outlive
    a killed vmbk-backup, or its lock on the image keeps the VM from starting."""
    import subprocess
    import time

    nd = nos_domain(1, size="1G", writes=[(0x5A, 0, 400 * MiB)])
    nd.dom.destroy()
    backups = vm_workdir / "backups"
    backups.mkdir()
    before = set(RUN_DIR.glob("copy-*"))
    p = slow_backup(backups, [nd.name], tmp_path / "etc")
    wait_for_partials(p, backups)
    image = str(nd.disks[0])

    def servers() -> list[str]:
        ps = subprocess.run(["pgrep", "-a", "qemu-nbd"], capture_output=True, text=True).stdout
        return [line for line in ps.splitlines() if image in line]

    assert servers()
    p.kill()
    finish(p)
    deadline = time.monotonic() + 10
    while servers() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert servers() == []
    nd.dom.create()  # the image is free: the VM starts
    assert nd.dom.isActive()
    for left in set(RUN_DIR.glob("copy-*")) - before:  # its socket file; a later run sweeps such after 10 min
        shutil.rmtree(left)
