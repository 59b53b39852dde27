"""libvirtd restarted between two backups: the chain goes on.

The domain is made with this test's own connections (objects of a
connection die with the daemon); the session connection reopens itself.
Skipped where systemd manages libvirtd: killing it there is not ours to do.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path

import libvirt
import pytest
from backup_helpers import backup_ok
from guest.domain import make_qcow2, nos_domain_xml, remove_domain, start_domain

pytestmark = pytest.mark.libvirt
ROOT = Path(__file__).resolve().parents[2]


def restart_libvirtd() -> None:
    subprocess.run(["pkill", "-x", "libvirtd"], check=False)
    deadline = time.monotonic() + 30
    while subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "libvirtd did not stop"
        time.sleep(0.1)
    subprocess.run([str(ROOT / "scripts" / "start-libvirtd")], check=True)


@pytest.mark.skipif(Path("/run/systemd/system").exists(), reason="libvirtd is systemd's to restart here")
def test_chain_continues_across_a_libvirtd_restart(libvirt_conn, vm_workdir):
    name = f"vmbk-test-{uuid.uuid4().hex[:8]}"
    disk = make_qcow2(vm_workdir / "vda.qcow2", "64M", writes=[(0x21, 0, 1 << 20)])
    root = vm_workdir / "backups"
    root.mkdir()
    conn = libvirt.open("qemu:///system")
    start_domain(conn, nos_domain_xml(name, [disk]))
    try:
        assert backup_ok(root, name)["action"] == "full"
        restart_libvirtd()
        rec = backup_ok(root, name)
        assert (rec["action"], rec["checkpoint"]) == ("inc", "virtnbdbackup.1")
        assert libvirt_conn.lookupByName(name).isActive()  # the session connection came back
    finally:
        remove_domain(libvirt.open("qemu:///system").lookupByName(name))
