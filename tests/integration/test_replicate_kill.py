"""kill -9 of vmbk-replicate in the middle of a copy, on each transport.

A VM's replica holds points 0 and 1; the VM gets a new incremental with
16 MiB of changes, and vmbk-replicate, slowed to 4 MiB/s, is killed -9
while that stream is on its way.  Its copier dies with it (pdeathsig);
``vmbk-restore --list-restore-points`` of the replica then shows points
0 and 1 complete and point 2 absent or incomplete -- never complete --
and the next run completes it.  Transports: local, ssh, append-only ssh
(through ``vmbk-replicate --receive``) and rclone sftp.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from backup_helpers import backup_ok
from fixtures.replication import receive_command
from replicate_helpers import configure, copiers, only, points, qemu_write, replicate, replicate_process

pytestmark = pytest.mark.libvirt
MiB = 1 << 20


def status(tree: Path, vm: str) -> dict[int, bool]:
    return {p["index"]: p["complete"] for p in points(tree, vm)}


def test_a_killed_replication_never_shows_a_point_complete_and_the_next_run_completes_it(
        nos_domain, vm_workdir, sshd, rclone_remotes, replica_dirs, tmp_path):
    nd = nos_domain(1, size="64M", writes=[(0x11, 0, MiB)])
    root = vm_workdir / "backups"
    root.mkdir()
    backup_ok(root, nd.name)
    qemu_write(nd.dom, 0x22, 2, "1M")
    backup_ok(root, nd.name)

    dests = {}
    for name in ("local", "ssh", "append-only", "sftp"):
        far = replica_dirs / name
        far.mkdir()
        if name == "local":
            dests[name] = ({"name": name, "transport": "local", "path": str(far)}, far)
        elif name == "ssh":
            dests[name] = (sshd.destination(name, far), far)
        elif name == "append-only":
            key = sshd.key("append-only", receive_command(far))
            dests[name] = (sshd.destination(name, Path("/"), key=key, sync_mode="append-only"), far)
        else:
            dests[name] = (rclone_remotes.destination(name, "sftp:", str(far)), far)
    cfg = configure(tmp_path / "etc", [d for d, _ in dests.values()])
    code, recs = replicate(cfg, root, "--all")
    assert code == 0, recs
    for _, far in dests.values():
        assert status(far, nd.name) == {0: True, 1: True}

    for offset in range(8, 24, 2):  # 16 MiB of random-looking changes: an incremental that takes a while
        qemu_write(nd.dom, 0x30 + offset, offset, "2M")
    assert backup_ok(root, nd.name)["action"] == "inc"

    for name, (dest, far) in dests.items():
        slow = configure(tmp_path / f"etc-{name}", [{**dest, "bwlimit_kbps": 4096}])
        p = replicate_process(slow, root, "--all")
        deadline = time.monotonic() + 30
        while not copiers(str(far) if name != "append-only" else "--receive") or not _copying(far, name):
            assert p.poll() is None, p.communicate()
            assert time.monotonic() < deadline, f"{name}: the copy never started"
            time.sleep(0.1)
        time.sleep(1.0)  # a few MiB of the 16 are across
        os.kill(p.pid, signal.SIGKILL)
        p.communicate()
        deadline = time.monotonic() + 30
        while copiers(str(far)):
            assert time.monotonic() < deadline, f"{name}: a copier outlived vmbk-replicate"
            time.sleep(0.1)
        after = status(far, nd.name)
        assert after.get(0) and after.get(1), (name, after)
        assert not after.get(2), f"{name}: point 2 is shown complete after a killed copy: {after}"

        code, recs = replicate(slow.parent / "etc", root, "--all", "--dest", name)
        assert code == 0, (name, recs)
        assert status(far, nd.name) == {0: True, 1: True, 2: True}, name
        assert only(recs, "replicate")[0]["bytes"] > 0


def _copying(far: Path, name: str) -> bool:
    """Has the stream begun to arrive?  rsync writes a hidden ``.<name>.XXXXXX``
    beside its target, rclone into its staging directory."""
    return any(p.name.startswith((".vda.inc", ".vmbk-partial")) for p in far.rglob(".*"))
