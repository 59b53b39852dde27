"""A raw disk beside a qcow2 one: copied whole at a full, left out of
incrementals (raw images cannot carry dirty bitmaps), as the planner
decides; the checkpoint covers the qcow2 disk only."""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from backup_helpers import backup_ok
from guest.domain import file_disk_xml, make_raw

from vmbk.stream import reconstruct_raw, scan

pytestmark = pytest.mark.libvirt
MiB = 1 << 20


def test_raw_disk_copied_at_full_and_skipped_by_inc(nos_domain, vm_workdir, tmp_path):
    raw = make_raw(vm_workdir / "data.raw", "32M", writes=[(0x77, 4 * MiB, MiB)])
    extra = file_disk_xml(raw, "vdb")
    nd = nos_domain(1, size="64M", writes=[(0x11, 0, MiB)], extra_devices=extra)
    root = vm_workdir / "backups"
    root.mkdir()

    full = backup_ok(root, nd.name)
    assert full["action"] == "full"
    levels = {d["target"]: d["level"] for d in full["disks"]}
    assert levels == {"vda": "full", "vdb": "copy"}
    copy = Path(full["target_dir"]) / "vdb.copy.data"
    out = tmp_path / "vdb.raw"
    reconstruct_raw([copy], out)
    assert subprocess.run(["qemu-img", "compare", "-q", "-U", "-f", "raw", "-F", "raw", str(out), str(raw)]).returncode == 0
    cp = ET.parse(Path(full["target_dir"]) / "checkpoints" / "virtnbdbackup.0.xml").getroot()
    bitmaps = {d.get("name"): d.get("checkpoint") for d in cp.find("disks")}
    assert bitmaps.get("vda") == "bitmap" and bitmaps.get("vdb") in (None, "no")

    inc = backup_ok(root, nd.name)
    assert inc["action"] == "inc"
    assert [d["target"] for d in inc["disks"]] == ["vda"]
    assert scan(Path(inc["disks"][0]["path"])).meta.incremental
