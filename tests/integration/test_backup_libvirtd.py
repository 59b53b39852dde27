"""libvirtd dies while vmbk-backup runs (#11, item 4).

QEMU, and with it the pull backup's NBD export, outlives libvirtd; every
libvirt call on the old connection fails ("client socket is closed").
What must hold: the VM that was hit fails with an ``error`` record (exit
6, never a traceback), the VMs after it are backed up once libvirtd is
back, the job and checkpoint of the failed backup are cleaned up then
(or by the next run when libvirtd stays away), and the next run of every
VM succeeds, its chain going on.

Domains are made and removed with this test's own connections: objects
of a connection die with the daemon.  Skipped where systemd manages
libvirtd: killing it there is not ours to do.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path

import libvirt
import orjson
import pytest
from backup_helpers import backup_ok, finish, slow_backup, wait_for_partials
from guest.domain import make_qcow2, nos_domain_xml, remove_domain, start_domain

from vmbk.stream import reconstruct_raw

pytestmark = [
    pytest.mark.libvirt,
    pytest.mark.skipif(Path("/run/systemd/system").exists(), reason="libvirtd is systemd's to restart here"),
]
ROOT = Path(__file__).resolve().parents[2]
URI = "qemu:///system"
MiB = 1 << 20


def kill_libvirtd() -> None:
    subprocess.run(["pkill", "-9", "-x", "libvirtd"], check=False)
    deadline = time.monotonic() + 30
    while subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "libvirtd did not die"
        time.sleep(0.05)


def start_libvirtd() -> None:
    subprocess.run([str(ROOT / "scripts" / "start-libvirtd")], check=True)


@pytest.fixture
def two_vms(vm_workdir):
    """Two running no-OS domains with 300 MiB of data each (slow enough to kill mid-copy)."""
    names = [f"vmbk-test-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    disks = {}
    conn = libvirt.open(URI)
    for n in sorted(names):
        disks[n] = make_qcow2(vm_workdir / f"{n}.qcow2", "1G", writes=[(0x5A, 0, 300 * MiB)])
        start_domain(conn, nos_domain_xml(n, [disks[n]]))
    yield sorted(names), disks
    start_libvirtd()
    conn = libvirt.open(URI)
    for n in names:
        try:
            remove_domain(conn.lookupByName(n))
        except libvirt.libvirtError:
            pass


def records(p: subprocess.Popen[bytes]) -> list[dict]:
    assert p.stdout is not None
    return [orjson.loads(line) for line in p.stdout.read().splitlines()]


def domain_state(name: str) -> tuple[int, int, list[str]]:
    """(state, job type, checkpoint names) through a fresh connection."""
    dom = libvirt.open(URI).lookupByName(name)
    return dom.state()[0], dom.jobInfo()[0], sorted(c.getName() for c in dom.listAllCheckpoints(0))


def same_as_disk(rec: dict, disk: Path, tmp_path: Path) -> bool:
    raw = tmp_path / f"{rec['name']}.raw"
    reconstruct_raw([Path(d["path"]) for d in rec["disks"]], raw)
    return subprocess.run(["qemu-img", "compare", "-q", "-U", "-f", "raw", "-F", "qcow2", str(raw), str(disk)]).returncode == 0


def test_libvirtd_restarted_mid_backup(two_vms, vm_workdir, tmp_path):
    (a, b), disks = two_vms
    root = vm_workdir / "b"
    root.mkdir()
    p = slow_backup(root, [a, b], tmp_path / "etc")
    wait_for_partials(p, root)  # vmbk copies a's disk: libvirtd dies under it
    kill_libvirtd()
    time.sleep(2)
    start_libvirtd()
    code = finish(p, 300)
    recs = records(p)
    err = p.stderr.read().decode() if p.stderr else ""
    assert "Traceback" not in err, err
    by = {r.get("name") or r.get("vm"): r for r in recs}
    assert by[a]["type"] == "error" and by[a]["code"] == 6 and "libvirt" in by[a]["message"], by[a]
    assert by[b]["type"] == "backup" and by[b]["outcome"] == "ok", by[b]
    assert code == 9
    # libvirtd is back: a's job ended and the checkpoint of its failed backup is gone, now.
    assert domain_state(a) == (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_JOB_NONE, [])
    assert domain_state(b) == (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_JOB_NONE, ["virtnbdbackup.0"])
    assert not list(root.rglob("*.partial")) and not list((root / a).rglob("*.data"))
    assert same_as_disk(by[b], disks[b], tmp_path)
    # The next run: a starts its chain, b's goes on.
    ra, rb = backup_ok(root, a), backup_ok(root, b)
    assert (ra["action"], rb["action"], rb["checkpoint"]) == ("full", "inc", "virtnbdbackup.1")
    assert same_as_disk(ra, disks[a], tmp_path)


def test_libvirtd_gone_for_the_rest_of_the_run(two_vms, vm_workdir, tmp_path, monkeypatch):
    (a, b), disks = two_vms
    root = vm_workdir / "b"
    root.mkdir()
    monkeypatch.setenv("VMBK_LIBVIRT_WAIT", "3")
    p = slow_backup(root, [a, b], tmp_path / "etc")
    wait_for_partials(p, root)
    kill_libvirtd()
    try:
        code = finish(p, 300)
    finally:
        start_libvirtd()
    recs = records(p)
    err = p.stderr.read().decode() if p.stderr else ""
    assert "Traceback" not in err, err
    by = {r.get("name") or r.get("vm"): r for r in recs}
    assert by[a]["type"] == "error" and by[a]["code"] == 6, by[a]
    assert by[b]["type"] == "error" and by[b]["code"] == 6 and "does not answer" in by[b]["message"], by[b]
    assert code == 6
    assert "left to the next run" in err
    assert not list(root.rglob("*.partial")) and not list(root.rglob("*.data"))
    # a's job and checkpoint outlived the run; the next run ends the job and starts the chain.
    ra = backup_ok(root, a)
    assert ra["action"] == "full"
    assert any(e["event"] == "cleaned" for e in ra["events"]), ra["events"]
    assert same_as_disk(ra, disks[a], tmp_path)
    assert backup_ok(root, b)["action"] == "full"
    assert domain_state(a) == (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_JOB_NONE, ["virtnbdbackup.0"])


def test_discover_goes_on_after_libvirtd_restart(two_vms, tmp_path):
    """vmbk-discover --vm a,b with libvirtd restarted between them: both are discovered."""
    (a, b), _disks = two_vms
    from vmbk import discover as disc
    from vmbk.config import Config

    gen = disc.discover(URI, Config(instance="default", source=None), names=[a, b])
    first = next(gen)
    kill_libvirtd()
    start_libvirtd()
    second = next(gen)
    assert (first["type"], first["name"], second["type"], second["name"]) == ("vm", a, "vm", b), second
    gen.close()
