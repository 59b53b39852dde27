"""The day it matters: a UEFI + TPM guest with two disks and a NIC is lost
(definition, disks, NVRAM and TPM state all gone) and comes back from its
backups with the same identity; then one of its disks goes back in time
in place.

The vmbackup test plan's model (vmbackup-readme, "Testing Phases"):
checkfiles written in the guest between backups, and read back through
the agent from the restored VM, so each restore is proven to be that
point's content, not a neighbour's.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import libvirt
import pytest
from backup_helpers import backup_ok
from backup_helpers import run_restore as run
from backup_helpers import tree_files as files
from guest.agent import AgentError, Guest
from guest.domain import remove_domain

from vmbk.restore.tpm import SWTPM_ROOT
from vmbk.virt.domain import parse_domain_xml

pytestmark = [pytest.mark.libvirt, pytest.mark.guest]
MAC = "52:54:00:5a:17:c3"
NIC = f"<interface type='user'><mac address='{MAC}'/><model type='virtio'/></interface>"




def test_lost_vm_comes_back_with_its_identity_then_one_disk_goes_back_in_time(test_guest, vm_workdir,
                                                                              libvirt_conn):
    guest = test_guest(uefi=True, tpm=True, extra_disks=1, extra_devices=NIC, timeout=240)
    root = vm_workdir / "backups"
    root.mkdir()
    content = {}
    for n in range(2):
        for disk in ("vda", "vdb"):
            content[(n, disk)] = os.urandom(200_000) + f"point {n} on {disk}\n".encode()
            guest.write_file(f"/mnt/{disk}/check-{n}", content[(n, disk)])
        guest.sync()
        rec = backup_ok(root, guest.name)
        assert rec["action"] == ("full" if n == 0 else "inc")
    chain = Path(rec["target_dir"])
    facts = parse_domain_xml(guest.dom.XMLDesc(0))
    uuid, name = guest.dom.UUIDString(), guest.name
    nvram = Path(facts["firmware"]["nvram"])
    disks = {d["target"]: Path(d["source"]) for d in facts["disks"] if d["device"] == "disk"}
    saved_nvram = (chain / f"{nvram.name}.virtnbdbackup.1").read_bytes()
    saved_tpm = files(chain / "tpm-state" / "tpm2")

    # the host loses everything of the VM
    remove_domain(guest.dom)
    for p in disks.values():
        p.unlink()
    assert not nvram.exists() and not (SWTPM_ROOT / uuid).exists()

    code, recs = run("--backup-path", str(root), "--vm", name, "--restore-path", str(vm_workdir))
    assert code == 0, recs
    summary = recs[-1]
    assert summary["mode"] == "dr" and summary["domain"] == {"name": name, "uuid": uuid}
    assert summary["tpm"]["restored"] is True and summary["nvram"] == str(nvram)
    dom = libvirt_conn.lookupByName(name)
    back = parse_domain_xml(dom.XMLDesc(0))
    assert dom.UUIDString() == uuid
    assert {d["target"]: Path(d["source"]) for d in back["disks"] if d["device"] == "disk"} == disks
    assert f"<mac address='{MAC}'/>" in dom.XMLDesc(0)
    assert nvram.read_bytes() == saved_nvram
    assert files(SWTPM_ROOT / uuid / "tpm2") == saved_tpm
    dom.create()
    restored = Guest(dom, console_log=guest.console_log, disks=list(disks.values()))
    restored.wait_agent(timeout=240)
    for (n, disk), data in content.items():
        assert restored.read_file(f"/mnt/{disk}/check-{n}") == data

    # vdb goes back to point 0 in place; vda stays at point 1
    restored.shutdown()
    code, recs = run("--backup-path", str(root), "--vm", name, "--disk", "vdb", "--restore-point", "0")
    assert code == 0, recs
    assert recs[-1]["pre_restore"][0]["path"] == f"{disks['vdb']}.pre-restore"
    dom.create()
    again = Guest(dom, console_log=guest.console_log, disks=list(disks.values()))
    again.wait_agent(timeout=240)
    assert again.read_file("/mnt/vdb/check-0") == content[(0, "vdb")]
    with pytest.raises(AgentError):
        again.read_file("/mnt/vdb/check-1")
    assert again.read_file("/mnt/vda/check-1") == content[(1, "vda")]
    remove_domain(dom)
    shutil.rmtree(SWTPM_ROOT / uuid, ignore_errors=True)
    with pytest.raises(libvirt.libvirtError):
        libvirt_conn.lookupByName(name)
