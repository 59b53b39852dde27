"""UEFI NVRAM and TPM state travel with every backup.

NVRAM: one copy per checkpoint (``<basename>.virtnbdbackup.<N>``), equal to
the VM's file at that backup.  TPM state: ``tpm-state/``, root only
(0700 directory without SGID, 0600 files): the backup group must not read
TPM keys; unchanged state is not written again.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from backup_helpers import backup_ok

pytestmark = [pytest.mark.libvirt, pytest.mark.guest]


def test_nvram_per_checkpoint_and_private_tpm_state(test_guest, vm_workdir):
    guest = test_guest(uefi=True, tpm=True)
    root = vm_workdir / "backups"
    root.mkdir()
    first = backup_ok(root, guest.name)
    chain = Path(first["target_dir"])
    vm = guest.dom.XMLDesc(0)
    nvram = vm.split("<nvram")[1].split(">", 1)[1].split("</nvram>")[0]
    copy0 = chain / f"{os.path.basename(nvram)}.virtnbdbackup.0"
    assert copy0.read_bytes() == Path(nvram).read_bytes()

    tpm = chain / "tpm-state"
    st = tpm.stat()
    assert stat.S_IMODE(st.st_mode) == 0o700 and (st.st_uid, st.st_gid) == (0, 0)
    files = [p for p in tpm.rglob("*") if p.is_file()]
    assert files, "swtpm state was not saved"
    for f in files:
        fst = f.stat()
        assert stat.S_IMODE(fst.st_mode) == 0o600 and (fst.st_uid, fst.st_gid) == (0, 0), f
    before = {f: f.stat().st_mtime_ns for f in files}

    second = backup_ok(root, guest.name)
    assert second["action"] == "inc"
    assert (chain / f"{os.path.basename(nvram)}.virtnbdbackup.1").exists()
    assert {f: f.stat().st_mtime_ns for f in files} == before  # unchanged state not stored twice
