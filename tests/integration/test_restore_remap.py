"""Disaster recovery onto "another host": the VM's network and storage pool are gone (issue #17).

The test guest runs on a libvirt network and has its disk in a storage
pool's directory; it is backed up, then the VM, the network and the pool
are removed and a second network and pool stand in for the other host's.
Without remaps the preflight names every missing item (the network, the
disk's directory), exits 5 and defines nothing; with --remap-network and
--remap-dir (no --restore-path: the disks go back to their places, here
the other pool's) the VM is restored byte-exact, defined, boots, and its
agent answers.  The remaps are in the restore record and the catalogue.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import uuid
from pathlib import Path

import libvirt
import pytest
from access_helpers import backup_paused
from backup_helpers import run_restore
from guest.agent import Guest
from guest.domain import make_qcow2

pytestmark = [pytest.mark.libvirt, pytest.mark.guest]


def _network(conn: libvirt.virConnect, name: str) -> libvirt.virNetwork:
    bridge = "vb" + uuid.uuid4().hex[:10]
    net = conn.networkDefineXML(f"<network><name>{name}</name><bridge name='{bridge}'/></network>")
    net.create()
    return net


def _pool(conn: libvirt.virConnect, name: str, path: Path) -> libvirt.virStoragePool:
    path.mkdir()
    os.chmod(path, 0o755)  # whatever the umask (vmbk's commands, run in this process, set 027): QEMU must traverse it
    pool = conn.storagePoolDefineXML(f"<pool type='dir'><name>{name}</name><target><path>{path}</path></target></pool>")
    pool.create()
    return pool


def _gone(obj: object) -> None:
    for step in ("destroy", "undefine"):
        try:
            getattr(obj, step)()
        except libvirt.libvirtError:
            pass


def _same(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-q", "-F", "raw", str(a), str(b)]).returncode == 0


def test_dr_onto_a_host_without_the_network_and_pool(libvirt_conn, test_guest, vm_workdir, cleanup_domains):
    tag = uuid.uuid4().hex[:6]
    net_a, net_b = f"vmbk-a-{tag}", f"vmbk-b-{tag}"
    made: list[object] = []
    try:
        made.append(_network(libvirt_conn, net_a))
        made.append(_network(libvirt_conn, net_b))
        dir_a, dir_b = vm_workdir / "pool-a", vm_workdir / "pool-b"
        made.append(_pool(libvirt_conn, f"vmbk-a-{tag}", dir_a))
        made.append(_pool(libvirt_conn, f"vmbk-b-{tag}", dir_b))
        disk = make_qcow2(dir_a / "guest-vda.qcow2", "256M")
        nic = f"<interface type='network'><source network='{net_a}'/><model type='virtio'/></interface>"
        guest: Guest = test_guest(disks=[disk], extra_devices=nic)
        assert guest.exec(["/bin/sh", "-c", "echo remap-check > /mnt/vda/check.txt && sync"])[0] == 0
        tree = vm_workdir / "backups"
        tree.mkdir()
        ref = vm_workdir / "ref.raw"
        backup_paused(guest, disk, ref, tree)
        name = guest.name
        guest.dom.destroy()
        guest.dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
        disk.unlink()
        _gone(made[0])  # network a, then pool a: "the other host" has neither
        _gone(made[2])
        dir_a.rmdir()

        code, recs = run_restore("--backup-path", str(tree), "--vm", name)
        assert code == 5, recs
        (err,) = [r for r in recs if r["type"] == "error"]
        assert err["kind"] == "preflight"
        assert f"network '{net_a}'" in err["message"] and f"directory '{dir_a}'" in err["message"], err
        with pytest.raises(libvirt.libvirtError):
            libvirt_conn.lookupByName(name)
        assert list(dir_b.iterdir()) == []

        cleanup_domains.append(name)
        code, recs = run_restore("--backup-path", str(tree), "--vm", name, "--remap-network", f"{net_a}={net_b}",
                                 "--remap-dir", f"{dir_a}={dir_b}")
        assert code == 0, recs
        (rec,) = [r for r in recs if r["type"] == "restore"]
        kinds = {(m["kind"], m["from"], m["to"]) for m in rec["remaps"]}
        assert ("network", net_a, net_b) in kinds and ("disk", str(disk), str(dir_b / disk.name)) in kinds, kinds
        assert _same(dir_b / disk.name, ref)
        dom = libvirt_conn.lookupByName(name)
        assert f"network='{net_b}'" in dom.XMLDesc(0)
        db = sqlite3.connect(tree / "_state" / "vmbk.db")
        (remaps,) = db.execute("SELECT remaps FROM restore_sessions WHERE outcome = 'ok'").fetchone()
        assert net_b in remaps
        dom.create()
        back = Guest(dom, console_log=None, disks=[dir_b / disk.name])
        back.wait_agent(timeout=120)
        code, out, _err = back.exec(["cat", "/mnt/vda/check.txt"])
        assert code == 0 and out.strip() == b"remap-check"
    finally:
        for obj in reversed(made):
            _gone(obj)
