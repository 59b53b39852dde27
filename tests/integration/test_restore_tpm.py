"""TPM state comes back with the VM: under its UUID (DR) or the clone's.

A no-OS domain with an emulated TPM (swtpm makes its state when the
domain starts), backed up; the state the backup kept is then what
``/var/lib/libvirt/swtpm/<UUID>/tpm2`` must hold after a restore, owned by
swtpm's user, with whatever was there before kept aside.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from backup_helpers import backup_ok
from backup_helpers import run_restore as run
from backup_helpers import tree_files as files

from vmbk.restore.tpm import SWTPM_ROOT, swtpm_owner

pytestmark = pytest.mark.libvirt
MiB = 1 << 20
TPM = "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"




def test_tpm_state_is_restored_for_a_clone_and_for_disaster_recovery(nos_domain, vm_workdir, libvirt_conn,
                                                                     cleanup_domains):
    nd = nos_domain(1, size="32M", writes=[(0x11, 0, MiB)], extra_devices=TPM)
    uuid = nd.dom.UUIDString()
    live = SWTPM_ROOT / uuid / "tpm2"
    assert files(live), "swtpm made no state"
    root = vm_workdir / "backups"
    root.mkdir()
    rec = backup_ok(root, nd.name)
    saved = files(Path(rec["target_dir"]) / "tpm-state" / "tpm2")
    assert saved
    uid, gid = swtpm_owner()

    clone = f"{nd.name}-c"
    cleanup_domains.append(clone)
    code, recs = run("--backup-path", str(root), "--vm", nd.name, "--restore-path", str(vm_workdir / "clone"),
                     "--name", clone)
    assert code == 0, recs
    summary = recs[-1]
    new_uuid = summary["domain"]["uuid"]
    assert new_uuid != uuid
    state = SWTPM_ROOT / new_uuid / "tpm2"
    assert summary["tpm"]["restored"] is True and summary["tpm"]["path"] == str(state)
    assert files(state) == saved
    for p in (state, *state.rglob("*")):
        st = p.stat()
        assert (st.st_uid, st.st_gid) == (uid, gid), p
        assert stat.S_IMODE(st.st_mode) == (0o700 if p.is_dir() else 0o600), p
    assert stat.S_IMODE((SWTPM_ROOT / new_uuid).stat().st_mode) == 0o711
    dom = libvirt_conn.lookupByName(clone)
    dom.create()  # swtpm accepts the state it is given
    assert dom.isActive()
    dom.destroy()

    # --skip-tpm: a clone without the state, said so
    bare = f"{nd.name}-s"
    cleanup_domains.append(bare)
    code, recs = run("--backup-path", str(root), "--vm", nd.name, "--restore-path", str(vm_workdir / "bare"),
                     "--name", bare, "--skip-tpm")
    assert code == 0 and recs[-1]["tpm"] is None, recs
    assert any("--skip-tpm" in w for w in recs[-1]["warnings"])
    assert not (SWTPM_ROOT / recs[-1]["domain"]["uuid"] / "tpm2").exists()

    # disaster recovery: the VM's current state (changed since) is moved aside
    nd.dom.destroy()
    current = next(p for p in live.rglob("*") if p.is_file())
    current.write_bytes(b"changed since the backup")
    changed = files(live)
    code, recs = run("--backup-path", str(root), "--vm", nd.name, "--restore-path", str(nd.disks[0].parent),
                     "--force")
    assert code == 0, recs
    tpm = recs[-1]["tpm"]
    assert tpm["restored"] is True and tpm["path"] == str(live)
    assert files(live) == saved
    aside = Path(tpm["saved_aside"])
    assert aside.parent == live.parent and aside.name.startswith("tpm2.pre-restore-")
    assert files(aside) == changed
    assert os.path.isdir(live)
