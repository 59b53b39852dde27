"""Two configuration instances (vmbackup-readme, testing phase 11).

Each instance resolves to its own backup path, lists only its own VMs,
and restores from it (``--config-instance`` or ``VMBK_INSTANCE``) give the
right identities; no restore may write into either instance's backup
path, whichever instance it reads from.
"""

from __future__ import annotations

import io

import pytest
from backup_helpers import run_restore as restore
from guest.domain import remove_domain

from vmbk.commands.backup import main as backup_main
from vmbk.errors import Exit

pytestmark = pytest.mark.libvirt
MiB = 1 << 20


def test_each_instance_has_its_own_backups_and_restores_from_them(nos_domain, vm_workdir, tmp_path, monkeypatch,
                                                                 libvirt_conn, cleanup_domains):
    prod_vm = nos_domain(1, size="32M", writes=[(0x11, 0, MiB)])
    lab_vm = nos_domain(1, size="32M", writes=[(0x22, 0, MiB)])
    etc = tmp_path / "etc"
    etc.mkdir()
    roots = {}
    for inst in ("prod", "lab"):
        roots[inst] = vm_workdir / f"backups-{inst}"
        roots[inst].mkdir()
        (etc / f"{inst}.toml").write_text(f'backup_path = "{roots[inst]}"\npolicy = "monthly"\n')
    monkeypatch.setenv("VMBK_CONFIG_DIR", str(etc))
    monkeypatch.delenv("VMBK_INSTANCE", raising=False)

    out = io.StringIO()
    assert backup_main(["--json", "--config-instance", "prod", "--vm", prod_vm.name], io.StringIO(""), out) == 0, \
        out.getvalue()
    monkeypatch.setenv("VMBK_INSTANCE", "lab")
    assert backup_main(["--json", "--vm", lab_vm.name], io.StringIO(""), out) == 0, out.getvalue()
    assert (roots["lab"] / lab_vm.name).is_dir() and not (roots["prod"] / lab_vm.name).exists()

    code, recs = restore("--list")  # VMBK_INSTANCE=lab
    assert code == 0 and [r["vm"] for r in recs] == [lab_vm.name]
    monkeypatch.delenv("VMBK_INSTANCE")
    code, recs = restore("--list", "--config-instance", "prod")
    assert code == 0 and [r["vm"] for r in recs] == [prod_vm.name]

    # reading from prod, writing into lab's backup path: refused like prod's own
    code, recs = restore("--config-instance", "prod", "--vm", prod_vm.name, "--restore-path",
                         str(roots["lab"] / "x"), "--name", "nope")
    assert code == Exit.USAGE and "backup root" in recs[-1]["message"], recs

    # a clone from lab, a DR of prod: identities as they should be
    clone = f"{lab_vm.name}-c"
    cleanup_domains.extend([clone, prod_vm.name])
    code, recs = restore("--config-instance", "lab", "--vm", lab_vm.name, "--restore-path",
                         str(vm_workdir / "clone"), "--name", clone)
    assert code == 0, recs
    assert recs[-1]["domain"]["name"] == clone and recs[-1]["domain"]["uuid"] != lab_vm.dom.UUIDString()
    uuid = prod_vm.dom.UUIDString()
    remove_domain(prod_vm.dom)
    prod_vm.disks[0].unlink()
    code, recs = restore("--config-instance", "prod", "--vm", prod_vm.name, "--restore-path",
                         str(prod_vm.disks[0].parent))
    assert code == 0, recs
    assert recs[-1]["domain"] == {"name": prod_vm.name, "uuid": uuid}
    assert libvirt_conn.lookupByName(prod_vm.name).UUIDString() == uuid
