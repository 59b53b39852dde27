"""The storage pool holding the restored files is refreshed (vmrestore guide, 7)."""

from __future__ import annotations

import io

import libvirt
import orjson
import pytest
from backup_helpers import backup_ok
from fixtures.guest import unique_name

from vmbk.commands.restore import main as restore_main

pytestmark = pytest.mark.libvirt
MiB = 1 << 20


def test_restore_into_a_pool_directory_shows_the_volume_at_once(nos_domain, vm_workdir, libvirt_conn):
    nd = nos_domain(1, size="32M", writes=[(0x11, 0, MiB)])
    root = vm_workdir / "backups"
    root.mkdir()
    backup_ok(root, nd.name)
    pooldir = vm_workdir / "pool"
    pooldir.mkdir()
    name = unique_name()
    pool = libvirt_conn.storagePoolCreateXML(
        f"<pool type='dir'><name>{name}</name><target><path>{pooldir}</path></target></pool>", 0)
    try:
        assert pool.listVolumes() == []
        out = io.StringIO()
        code = restore_main(["--json", "--backup-path", str(root), "--vm", nd.name, "--restore-path",
                             str(pooldir / "sub" / ".."), "--skip-config"], io.StringIO(""), out)
        recs = [orjson.loads(line) for line in out.getvalue().splitlines()]
        assert code == 0, recs
        assert recs[-1]["pools"] == [name]
        assert pool.listVolumes() == [f"{nd.name}.qcow2"]  # no refresh by hand
    finally:
        try:
            pool.destroy()
        except libvirt.libvirtError:
            pass
