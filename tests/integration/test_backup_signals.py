"""SIGTERM/SIGINT in the middle of a real backup: clean exit, nothing left.

The backup is slowed down with heavy LZ4-HC compression so the signal
lands while a stream is being written.  Afterwards: exit 128+N, no
.partial or data file, no checkpoint in libvirt, the lock released, the
domain running (not paused), and the next run does a normal full.
"""

from __future__ import annotations

import signal

import orjson
import pytest
from backup_helpers import backup_ok, finish, slow_backup, wait_for_partials

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
