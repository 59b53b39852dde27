"""Backups of a remote hypervisor from a backup server (issue #17): qemu+ssh, as a user who cannot read the disks.

The far side is this host's libvirtd reached over the test sshd as root;
the vmbk commands run as an unprivileged local user (tests/fixtures/remote.py)
to whom the domains' disks, NVRAM and TPM state are unreadable: every byte
a backup holds came over ssh (the pull backup's export through a forwarded
unix socket, qemu-nbd of a shut-off VM, qemu-img info, the NVRAM).  Every
restore point is then restored byte-exact (qemu-img compare against the
disk at that point).  Faults: the ssh connection killed in the middle of a
backup (a clean failure: the job ended, no checkpoint left, the next run
heals); a host that cannot be reached (an error record for its VMs, the
other host goes on: exit 9); vmbk killed while it holds the remote domain
paused (the guard beside it resumes it over its own ssh).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import libvirt
import pytest
from fixtures.remote import lock_out
from kill_helpers import Lifecycle, domain_state, kill_on_event
from backup_helpers import run_restore
from replicate_helpers import qemu_write, reference, restore_point, same_disk

from vmbk.virt import hold

pytestmark = pytest.mark.libvirt
MiB = 1 << 20


def _ok(code: int, recs: list[dict], err: str) -> dict:
    assert code == 0, (code, recs, err[-3000:])
    (rec,) = [r for r in recs if r["type"] == "backup"]
    assert rec["outcome"] == "ok", rec
    return rec


def _restore(chain: Path, point: int, into: Path, disk: str) -> Path:
    code, recs = run_restore("--vm", str(chain), "--restore-point", str(point), "--restore-path", str(into),
                             "--skip-config", "--disk", disk)
    assert code == 0, recs
    (target,) = [r["target"] for r in recs if r["type"] == "restore_disk"]
    return Path(target)


def _no_checkpoints(dom: libvirt.virDomain) -> list[str]:
    return [c.getName() for c in dom.listAllCheckpoints(0)]


def test_full_inc_and_copy_over_ssh_restore_byte_exact(remote_host, nos_domain, vm_workdir):
    before = set(remote_host.masters())
    nd = nos_domain(2, size="64M", writes=[(0x31, 0, 4 * MiB), (0x32, 40 * MiB, 2 * MiB)])
    lock_out(nd.disks)
    assert not remote_host.can_read(nd.disks[0]), "the test user must not be able to read the disks"
    work = remote_host.workdir("full-inc")
    tree = work / "backup"
    refs: list[Path] = []

    rec = _ok(*remote_host.run(work, "vmbk-backup", "--json", "--connect", remote_host.uri,
                               "--backup-path", str(tree), "--vm", nd.name))
    assert rec["action"] == "full" and rec["host"] == "127.0.0.1" and rec["consistency"] == "paused"
    refs.append(reference(nd.disks[0], vm_workdir / "ref0.raw"))
    vdb = reference(nd.disks[1], vm_workdir / "ref-vdb.raw")
    qemu_write(nd.dom, 0x41, 8)
    qemu_write(nd.dom, 0x42, 60, "512K")
    rec = _ok(*remote_host.run(work, "vmbk-backup", "--json", "--connect", remote_host.uri,
                               "--backup-path", str(tree), "--vm", nd.name))
    assert rec["action"] == "inc"
    refs.append(reference(nd.disks[0], vm_workdir / "ref1.raw"))
    chain = Path(rec["target_dir"])
    assert chain.parent == tree / nd.name  # one host: vmbackup's <backup_path>/<vm>/
    assert sorted(p.name for p in chain.glob("*.qcow.json"))  # qemu-img info came over ssh
    assert sorted(_no_checkpoints(nd.dom)) == ["virtnbdbackup.0", "virtnbdbackup.1"]  # libvirt: hash order
    for i, ref in enumerate(refs):
        assert same_disk(_restore(chain, i, vm_workdir / f"restored{i}", "vda"), ref), f"point {i}"
        assert same_disk(_restore(chain, i, vm_workdir / f"restored{i}-vdb", "vdb"), vdb), f"point {i} vdb"

    # shut off: an offline copy through qemu-nbd on the far side
    nd.dom.destroy()
    lock_out(nd.disks)
    later = time.time() + 2  # changed since the inc: a shut-off VM is copied (QEMU's last write may predate the inc)
    for disk in nd.disks:
        os.utime(disk, (later, later))
    rec = _ok(*remote_host.run(work, "vmbk-backup", "--json", "--connect", remote_host.uri,
                               "--backup-path", str(tree), "--vm", nd.name))
    assert rec["action"] == "copy" and rec["consistency"] == "offline"
    copy_dir = Path(rec["target_dir"])
    ref = reference(nd.disks[1], vm_workdir / "ref-copy-vdb.raw")
    assert same_disk(_restore(copy_dir, 0, vm_workdir / "restored-copy", "vdb"), ref)
    assert not [p for p in Path("/var/tmp/vmbk").glob("copy-*") if (p / "nbd.sock").exists()
                and nd.name in " ".join(os.listdir(p))], "qemu-nbd left on the far side"
    time.sleep(0.5)
    assert set(remote_host.masters()) <= before, "a control master outlived vmbk"


def test_ssh_dropped_mid_backup_fails_cleanly_and_the_next_run_heals(remote_host, nos_domain, vm_workdir):
    nd = nos_domain(1, size="256M", writes=[(0x51, 0, 200 * MiB)])
    lock_out(nd.disks)
    work = remote_host.workdir("drop")
    tree = work / "backup"
    # slow (LZ4-HC 16): the kill lands while the stream is written
    remote_host.config(work, 'compression = "lz4"\ncompression_level = 16\n')
    p = remote_host.popen(work, "vmbk-backup", "--json", "--connect", remote_host.uri, "--backup-path", str(tree),
                          "--vm", nd.name)
    remote_host.drop_ssh_when(p, lambda: bool(list(tree.rglob("*.data.partial"))))  # every NBD connection drops
    out, err = p.communicate(timeout=180)
    assert p.returncode != 0, err.decode()[-2000:]
    recs = [json.loads(line) for line in out.splitlines()]
    (error,) = [r for r in recs if r["type"] == "error"]
    assert error["vm"] == nd.name
    assert nd.dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE, "the backup job was left running"
    assert _no_checkpoints(nd.dom) == [], "the failed full's checkpoint was left"
    assert not list(tree.rglob("*.partial")) and not list(tree.rglob("*.data"))
    assert domain_state(nd.dom) == "running"

    remote_host.config(work, "")
    rec = _ok(*remote_host.run(work, "vmbk-backup", "--json", "--connect", remote_host.uri,
                               "--backup-path", str(tree), "--vm", nd.name))
    assert rec["action"] == "full"
    ref = reference(nd.disks[0], vm_workdir / "ref.raw")
    assert same_disk(restore_point(Path(rec["target_dir"]), 0, vm_workdir / "restored"), ref)


def test_unreachable_host_fails_its_vms_the_other_goes_on(remote_host, nos_domain, vm_workdir):
    nd = nos_domain(1, size="64M", writes=[(0x61, 0, MiB)])
    lock_out(nd.disks)
    work = remote_host.workdir("two-hosts")
    tree = work / "backup"
    remote_host.config(work, f"""
hosts = [
  {{ name = "kvm1", uri = "{remote_host.uri}", ssh_key = "{remote_host.home}/.ssh/id_ed25519" }},
  {{ name = "kvm2", uri = "qemu+ssh://root@127.0.0.1:1/system" }},
]
""")
    code, recs, err = remote_host.run(work, "vmbk-backup", "--json", "--backup-path", str(tree), "--vm", nd.name)
    assert code == 9, ([r.get("message") for r in recs], err[-2000:])
    (ok,) = [r for r in recs if r["type"] == "backup"]
    assert ok["host"] == "kvm1" and ok["outcome"] == "ok"
    (bad,) = [r for r in recs if r["type"] == "error"]
    assert bad["host"] == "kvm2" and bad["vm"] == nd.name and "kvm2" in bad["message"]
    assert (tree / "kvm1" / ".vmbk-host").is_file() and (tree / "kvm1" / nd.name).is_dir()
    assert not (tree / nd.name).exists() and not (tree / "kvm2").exists()
    # every reader follows the host level
    code, recs, err = remote_host.run(work, "vmbk-restore", "--json", "--backup-path", str(tree), "--list")
    assert code == 0, err
    assert [(r["host"], r["vm"]) for r in recs if r["type"] == "backup_vm"] == [("kvm1", nd.name)]
    code, recs, err = remote_host.run(work, "vmbk-restore", "--json", "--backup-path", str(tree),
                                      "--list-restore-points", f"kvm1/{nd.name}")
    assert code == 0 and [r for r in recs if r["type"] == "restore_point"], (recs, err)
    code, recs, err = remote_host.run(work, "vmbk-status", "--json", "--backup-path", str(tree))
    assert [(r.get("host"), r["vm"]) for r in recs if r["type"] == "status"] == [("kvm1", nd.name)], (recs, err)
    ref = reference(nd.disks[0], vm_workdir / "ref.raw")
    assert same_disk(restore_point(Path(ok["target_dir"]), 0, vm_workdir / "restored"), ref)


def test_sigkill_while_the_remote_domain_is_paused_the_guard_resumes_it(remote_host, nos_domain):
    nd = nos_domain(1, size="64M", writes=[(0x71, 0, MiB)])
    lock_out(nd.disks)
    work = remote_host.workdir("hold")
    tree = work / "backup"
    marker = hold.marker_path(nd.dom.UUIDString(), remote_host.uri)
    marker = work / "run" / marker.name  # the user's run directory, on the backup server
    with Lifecycle(nd.dom.UUIDString()) as lc:
        p = remote_host.popen(work, "vmbk-backup", "--json", "--connect", remote_host.uri, "--backup-path",
                              str(tree), "--vm", nd.name)
        killed = kill_on_event(lc, p, libvirt.VIR_DOMAIN_EVENT_SUSPENDED)
        p.wait(120)
        lc.handler = None
    assert killed.is_set(), f"vmbk-backup ended ({p.returncode}) before the pause: {p.stderr.read().decode()}"
    deadline = time.monotonic() + 30
    while domain_state(nd.dom) != "running" or marker.exists():
        assert time.monotonic() < deadline, f"{domain_state(nd.dom)}, marker {marker.exists()} 30 s after the kill"
        time.sleep(0.05)
    # the next run ends the job the dead one left and goes on
    rec = _ok(*remote_host.run(work, "vmbk-backup", "--json", "--connect", remote_host.uri,
                               "--backup-path", str(tree), "--vm", nd.name))
    assert domain_state(nd.dom) == "running" and not marker.exists()
    assert rec["outcome"] == "ok"
