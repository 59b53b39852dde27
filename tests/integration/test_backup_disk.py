"""One disk from a real NBD export into a stream, restored and compared.

qemu-nbd serves a qcow2 read-only (as for an offline copy backup), with a
persistent dirty bitmap for the incremental; the streams are rebuilt into
raw images with vmbk's chain merge and compared byte for byte with
``qemu-img compare``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from vmbk.backup.disk import DiskBackup, backup_disk
from vmbk.stream import reconstruct_raw, scan, verify_checksum

MiB = 1 << 20


def qemu_io(image: Path, *cmds: str) -> None:
    argv = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        argv += ["-c", c]
    subprocess.run([*argv, str(image)], check=True, capture_output=True)


def same(raw: Path, image: Path) -> bool:
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(raw), str(image)], capture_output=True)
    return r.returncode == 0


@pytest.fixture
def image(tmp_path: Path) -> Path:
    img = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "64M"], check=True)
    qemu_io(img, "write -P 0x11 0 3M", "write -P 0x22 10M 1M", "write -P 0x33 63M 1M", "write -z 20M 2M")
    return img


@pytest.mark.parametrize("compression", [None, 2])
def test_full_backup_restores_to_the_same_bytes(tmp_path, image, qemu_nbd, compression):
    server = qemu_nbd(image, read_only=True, shared=4)
    out = tmp_path / "vda.full.data"
    result = backup_disk(DiskBackup("vda", server.address, "full", out, checkpoint="virtnbdbackup.0",
                                 compression=compression))
    assert out.exists() and not Path(f"{out}.partial").exists()
    assert result.virtual_size == 64 * MiB and result.data_size == 5 * MiB
    assert verify_checksum(out, required=True)
    smap = scan(out)
    assert smap.meta.checkpoint_name == "virtnbdbackup.0" and smap.meta.incremental is False
    assert smap.compressed == (compression is not None)
    assert smap.zero_frames  # holes are recorded, not stored
    assert oct(out.stat().st_mode & 0o777) == "0o640"
    raw = tmp_path / "restored.raw"
    reconstruct_raw([out], raw)
    assert same(raw, image)


def test_incremental_carries_changes_zeroes_and_discards(tmp_path, image, qemu_nbd):
    full = tmp_path / "vda.full.data"
    server = qemu_nbd(image, read_only=True, shared=4)
    backup_disk(DiskBackup("vda", server.address, "full", full))
    server.kill()
    subprocess.run(["qemu-img", "bitmap", "--add", str(image), "b0"], check=True)
    # After the full: new data, data overwritten with zeroes, data discarded.
    qemu_io(image, "write -P 0x44 30M 2M", "write -P 0x55 1M 64k", "write -z 10M 512k", "discard 63M 1M")
    server = qemu_nbd(image, read_only=True, shared=4, bitmap="b0")
    inc = tmp_path / "vda.inc.virtnbdbackup.1.data"
    result = backup_disk(DiskBackup("vda", server.address, "inc", inc, checkpoint="virtnbdbackup.1",
                                 parent="virtnbdbackup.0", dirty_bitmap="b0"))
    assert result.data_size == 2 * MiB + 64 * 1024
    assert result.zero_frames >= 2
    assert scan(inc).meta.incremental is True
    raw = tmp_path / "restored.raw"
    reconstruct_raw([full, inc], raw)
    assert same(raw, image)
    # Without the zero frames (what virtnbdrestore does) the zeroed and
    # discarded ranges keep their old content: the extension matters.
    old = tmp_path / "no-zero-frames.raw"
    reconstruct_raw([full, inc], old, zero_frames=False)
    assert not same(old, image)


def test_failure_leaves_no_file(tmp_path, image, qemu_nbd):
    server = qemu_nbd(image, read_only=True)
    out = tmp_path / "vda.inc.virtnbdbackup.1.data"
    with pytest.raises(Exception):
        # no such bitmap on the export: the incremental cannot start
        backup_disk(DiskBackup("vda", server.address, "inc", out, dirty_bitmap="missing"))
    assert list(tmp_path.glob("vda.*")) == []


def test_a_disk_more_fragmented_than_the_plan_keeps_is_walked_again(tmp_path, image, qemu_nbd, monkeypatch):
    """Past PLAN_LIMIT extents the first walk is not kept: the copy walks again, same stream."""
    from vmbk.backup import disk

    server = qemu_nbd(image, read_only=True, shared=4)
    kept, walked = tmp_path / "kept.data", tmp_path / "walked.data"
    backup_disk(DiskBackup("vda", server.address, "full", kept))
    monkeypatch.setattr(disk, "PLAN_LIMIT", 2)
    walks = []
    real = disk._plan_extents
    monkeypatch.setattr(disk, "_plan_extents", lambda *a: walks.append(1) or real(*a))
    backup_disk(DiskBackup("vda", server.address, "full", walked))
    assert len(walks) == 2
    a, b = scan(kept), scan(walked)
    assert [(f.kind, f.offset, f.length) for f in a.frames] == [(f.kind, f.offset, f.length) for f in b.frames]
    assert a.meta.data_size == b.meta.data_size == 5 * MiB
    raw = tmp_path / "walked.raw"
    reconstruct_raw([walked], raw)
    assert same(raw, image)
