"""Parallel backups: the disks of one VM, several VMs (--jobs), and an
interrupt while several are in flight."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
from backup_helpers import finish, run_backup, slow_backup, wait_for_partials

from vmbk.catalogue import Catalogue
from vmbk.stream import reconstruct_raw

pytestmark = pytest.mark.libvirt
MiB = 1 << 20


def same(raw: Path, image: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-q", "-U", "-f", "raw", "-F", "qcow2", str(raw), str(image)]).returncode == 0


def test_disks_of_one_vm_in_parallel(nos_domain, vm_workdir, tmp_path):
    nd = nos_domain(3, size="64M", writes=[(0x61, 0, 4 * MiB), (0x62, 32 * MiB, 2 * MiB)])
    root = vm_workdir / "b"
    root.mkdir()
    code, (rec,) = run_backup(root, "--vm", nd.name)
    assert code == 0 and rec["outcome"] == "ok"
    assert [d["target"] for d in rec["disks"]] == ["vda", "vdb", "vdc"]
    for d, image in zip(rec["disks"], nd.disks):
        raw = tmp_path / f"{d['target']}.raw"
        reconstruct_raw([Path(d["path"])], raw)
        assert same(raw, image), d["target"]


def test_one_failing_disk_fails_the_vm_and_leaves_nothing(nos_domain, vm_workdir, monkeypatch):
    import vmbk.backup.vm as vm

    nd = nos_domain(2, size="64M", writes=[(0x61, 0, 4 * MiB)])
    root = vm_workdir / "b"
    root.mkdir()
    real = vm.backup_disk

    def flaky(job, *a, **k):
        if job.target == "vdb":
            raise vm.VmError("vdb: simulated read failure")
        return real(job, *a, **k)

    monkeypatch.setattr(vm, "backup_disk", flaky)
    code, (rec,) = run_backup(root, "--vm", nd.name)
    assert code == 5 and rec["type"] == "error" and "vdb" in rec["message"]
    assert [f for f in (root / nd.name).rglob("*") if f.is_file()] == []
    assert nd.dom.listAllCheckpoints(0) == []


def test_jobs_backs_up_several_vms(nos_domain, vm_workdir):
    a = nos_domain(1, size="64M", writes=[(0x71, 0, MiB)])
    b = nos_domain(1, size="64M", writes=[(0x72, 0, MiB)])
    root = vm_workdir / "b"
    root.mkdir()
    code, recs = run_backup(root, "--jobs", "2", "--vm", f"{a.name},{b.name}")
    assert code == 0
    assert sorted(r["name"] for r in recs) == sorted([a.name, b.name])
    assert all(r["outcome"] == "ok" and r["action"] == "full" for r in recs)
    assert len({r["session"] for r in recs}) == 1
    with Catalogue.open(root) as cat:
        rows = cat.query("SELECT vm, outcome FROM vm_backups")
    assert sorted((r["vm"], r["outcome"]) for r in rows) == sorted([(a.name, "ok"), (b.name, "ok")])


def test_sigterm_with_jobs_cleans_up_every_vm(nos_domain, vm_workdir, tmp_path):
    vms = [nos_domain(1, size="1G", writes=[(0x5A, 0, 300 * MiB)]) for _ in range(2)]
    root = vm_workdir / "b"
    root.mkdir()
    p = slow_backup(root, [v.name for v in vms], tmp_path / "etc", "--jobs", "2")
    wait_for_partials(p, root, count=2)
    p.send_signal(signal.SIGTERM)
    assert finish(p) == 143
    for v in vms:
        assert [f for f in (root / v.name).rglob("*") if f.is_file()] == []
        assert v.dom.listAllCheckpoints(0) == []
        assert v.dom.state()[0] == 1
    assert not list((root / "_state" / "locks").iterdir())


def test_catalogue_records_when_the_backup_started(nos_domain, vm_workdir, monkeypatch):
    """vm_backups.started_at is the start, not the end (it was the end time)."""
    import datetime as dt
    import time

    import vmbk.backup.vm as vm

    nd = nos_domain(1, size="64M", writes=[(0x61, 0, MiB)])
    root = vm_workdir / "b"
    root.mkdir()
    real = vm.backup_disk

    def slow(job, *a, **k):
        time.sleep(3)
        return real(job, *a, **k)

    monkeypatch.setattr(vm, "backup_disk", slow)
    before = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    code, (rec,) = run_backup(root, "--vm", nd.name)
    assert code == 0 and rec["duration"] >= 3
    with Catalogue.open(root) as cat:
        (row,) = cat.query("SELECT started_at FROM vm_backups")
    started = dt.datetime.fromisoformat(row["started_at"])
    assert before <= started <= before + dt.timedelta(seconds=2), (before, started)
