"""Memory and device state (issue #18) on the booted test guest.

The guest counts in RAM (/run/counter, +1 every 0.2 s from boot: the
initramfs root, never on a disk).  A backup with --with-memory saves the
RAM and device state at the disks' point in time; the guest runs on
(its counter advances); a disaster recovery with --resume brings back a
guest that answers with the same boot id, whose counter continues from
the value it had at the backup instant, with that point's checkfile on
its disk.  Beside it: the state manifest refused when it does not fit the
XML or the host (nothing defined), single use, a device that cannot be
saved (disks backed up, error record), kill -9 during the save (the guard
resumes the VM), virtnbdrestore restoring the disks of such a point.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import libvirt
import orjson
import pytest
from backup_helpers import ROOT, run_backup, run_restore

from vmbk.tree import names
from vmbk.tree import state as tree_state

pytestmark = [pytest.mark.libvirt, pytest.mark.guest]


def counter(guest) -> int:
    return int(guest.read_file("/run/counter").decode().strip())


def boot_id(guest) -> str:
    return guest.read_file("/proc/sys/kernel/random/boot_id").decode().strip()


def memory_backup(root: Path, name: str, *argv: str) -> tuple[int, list[dict]]:
    return run_backup(root, "--vm", name, "--with-memory", *argv)


def only_state(chain: Path) -> tuple[Path, Path]:
    (state,) = chain.glob("vmstate.*.lz4")
    (manifest,) = chain.glob("vmstate.*.json")
    return state, manifest


def test_backup_with_memory_writes_the_state_and_its_manifest(test_guest, vm_workdir):
    guest = test_guest()
    root = vm_workdir / "backups"
    root.mkdir()
    before = counter(guest)
    code, recs = memory_backup(root, guest.name)
    assert code == 0, recs
    (rec,) = recs
    mem = rec["memory"]
    assert mem["saved"] and mem["error"] is None, mem
    assert 0 < mem["pause_seconds"] < 30 and mem["size"] > 0 and mem["image_size"] > mem["size"]
    assert rec["consistency"] == "paused"
    chain = Path(rec["disks"][0]["path"]).parent
    state, manifest = only_state(chain)
    assert state.name == names.state_name("virtnbdbackup.0")
    assert (state.stat().st_mode & 0o777) == 0o600
    m = tree_state.read(manifest)
    assert m.checkpoint == "virtnbdbackup.0" and m.size == state.stat().st_size
    assert m.domain["memory_kib"] == 256 * 1024 and m.domain["vcpus"] == 1
    assert m.host["arch"] == "x86_64" and m.host["page_size"] == 4096
    assert any(d.startswith("disk disk vda bus=virtio") for d in m.domain["devices"])
    assert counter(guest) >= before  # it runs on
    print(f"pause {mem['pause_seconds']} s, save {mem['save_seconds']} s, image {mem['image_size']} bytes, "
          f"stored {mem['size']} bytes")
