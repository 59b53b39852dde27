"""Damage that used to pass: the listing, ``--verify`` and the restore find it (issue #11, items 2, 3, 8).

Each case damages a three-point chain (full + 2 incrementals, written by
vmbk's own writer) the way a disk, a person or a crash can, then asks the
three readers: ``--list-restore-points`` must not call an affected point
complete (where its cheap check can see the damage), ``--verify`` must
exit non-zero, and a restore of an affected point must be refused; the
points the damage does not touch restore bit-exact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_restore_command import raw_of, restore, run
from test_restore_points import HOSTILE, three_points

from vmbk.errors import Exit
from vmbk.stream import StreamError, StreamMeta, StreamWriter, file_checksum, scan
from vmbk.stream.chainread import ChainImage

INC1 = "vda.inc.virtnbdbackup.1.data"
INC2 = "vda.inc.virtnbdbackup.2.data"


@pytest.fixture
def chain(tmp_path):
    root = tmp_path / "backups"
    return root, three_points(root / HOSTILE / "2026-W10", HOSTILE)


def complete(root: Path) -> list[bool]:
    code, recs = run("--backup-path", str(root), "--list-restore-points", HOSTILE)
    assert code == 0, recs
    return [r["complete"] for r in recs if r["type"] == "restore_point"]


def verify(root: Path) -> tuple[int, list[dict]]:
    return run("--backup-path", str(root), "--verify", HOSTILE)


def flip(path: Path, pos: int, bit: int = 0x01) -> None:
    raw = bytearray(path.read_bytes())
    raw[pos] ^= bit
    path.write_bytes(bytes(raw))


def restores(root: Path, c, tmp: Path, point: int, *extra: str) -> int:
    dest = tmp / f"p{point}-{len(list(tmp.iterdir()))}"
    code, recs = restore(root, HOSTILE, dest, "--restore-point", str(point), "--skip-config", *extra)
    if code == 0:
        assert raw_of(dest / f"{HOSTILE}.qcow2", tmp) == c.expected[point]["vda"], f"point {point} is wrong"
    return code


def test_flipped_data_whose_chksum_was_deleted_is_unverifiable(chain, tmp_path):
    """The issue's case: payload bytes flipped and the .chksum deleted (or lost to a crash of old vmbk)."""
    root, c = chain
    flip(c.path / INC1, scan(c.path / INC1).data_frames[0].file_pos + 100)
    (c.path / f"{INC1}.chksum").unlink()
    assert complete(root) == [True, False, False]
    code, recs = verify(root)
    assert code == Exit.PARTIAL, recs
    by_file = {r["file"]: r for r in recs if r["type"] == "verify"}
    assert by_file[INC1]["status"] == "unverifiable" and not by_file[INC1]["ok"]
    assert by_file[None]["unverifiable_points"] == [1, 2]
    assert restores(root, c, tmp_path, 0) == 0
    for point in (1, 2):
        assert restores(root, c, tmp_path, point) == Exit.VM
    # --no-verify: the operator's call, it restores (the flipped byte comes back)
    code, recs = restore(root, HOSTILE, tmp_path / "nv", "--restore-point", "2", "--skip-config", "--no-verify")
    assert code == 0 and any("restored unchecked" in w for w in recs[-1]["warnings"])


def test_a_deleted_middle_incremental_fails_verify(chain, tmp_path):
    root, c = chain
    (c.path / INC1).unlink()
    (c.path / f"{INC1}.chksum").unlink()
    assert complete(root) == [True, False, False]
    code, recs = verify(root)
    assert code == Exit.STORAGE, recs
    (chain_rec,) = [r for r in recs if r["type"] == "verify" and r["file"] is None and r.get("point") is None]
    assert chain_rec["incomplete_points"] == [1, 2] and not chain_rec["ok"]
    assert any("no data file for virtnbdbackup.1" in p for p in chain_rec["problems"])
    assert restores(root, c, tmp_path, 0) == 0 and restores(root, c, tmp_path, 2) == Exit.VM


@pytest.mark.parametrize("cut", [1, 40, 300])
def test_a_truncated_stream_is_seen_by_the_listing(chain, tmp_path, cut):
    root, c = chain
    raw = (c.path / INC2).read_bytes()
    (c.path / INC2).write_bytes(raw[:-cut])
    assert complete(root) == [True, True, False]
    assert verify(root)[0] == Exit.STORAGE
    assert restores(root, c, tmp_path, 1) == 0 and restores(root, c, tmp_path, 2) == Exit.VM


def test_an_unreadable_cpt_makes_every_point_incomplete(chain, tmp_path):
    root, c = chain
    (c.path / f"{HOSTILE}.cpt").write_text('["virtnbdbackup.0", "virtnbdbackup.1", "virtnbd')
    assert complete(root) == [False, False, False]
    assert verify(root)[0] == Exit.STORAGE
    assert restores(root, c, tmp_path, 0) == Exit.VM
    assert restores(root, c, tmp_path, 0, "--include-incomplete") == 0


@pytest.mark.parametrize("damage", ["<domaincheckpoint><name>virtnbdbackup.1</nam", "<domaincheckpoint><name>"
                                    "virtnbdbackup.7</name></domaincheckpoint>"])
def test_a_damaged_checkpoint_xml_makes_its_point_incomplete(chain, tmp_path, damage):
    root, c = chain
    (c.path / "checkpoints" / "virtnbdbackup.1.xml").write_text(damage)
    assert complete(root) == [True, False, True]
    assert verify(root)[0] == Exit.STORAGE
    assert restores(root, c, tmp_path, 1) == Exit.VM and restores(root, c, tmp_path, 2) == 0


def test_a_damaged_vmconfig_makes_its_point_incomplete(chain, tmp_path):
    root, c = chain
    (c.path / "vmconfig.virtnbdbackup.2.xml").write_text("<domain><name>x</name><devices>")
    assert complete(root) == [True, True, False]
    assert verify(root)[0] == Exit.STORAGE


def test_a_flipped_virtual_size_is_found_without_a_checksum(chain, tmp_path):
    """A digit of virtualSize flipped (still a number) and the .chksum gone with it: the image would have the wrong size."""
    root, c = chain
    raw = (c.path / INC1).read_bytes()
    at = raw.index(b'"virtualSize": ') + len(b'"virtualSize": ')
    flip(c.path / INC1, at)  # 4194304 -> 5194304
    (c.path / f"{INC1}.chksum").unlink()
    assert complete(root) == [True, False, False]
    code, recs = verify(root)
    assert code == Exit.STORAGE and any("virtualSize" in p for r in recs for p in r["problems"])
    assert restores(root, c, tmp_path, 1, "--no-verify") == Exit.VM


def test_a_stray_checksum_of_an_unfinished_backup_is_a_chain_warning(chain, tmp_path):
    """vmbk killed between its two renames (stream.atomic): the .chksum is in place, the data is not."""
    root, c = chain
    (c.path / INC2).rename(c.path / f"{INC2}.partial")
    (c.path / f"{HOSTILE}.cpt").write_text(json.dumps(["virtnbdbackup.0", "virtnbdbackup.1"]))
    code, recs = run("--backup-path", str(root), "--list-restore-points", HOSTILE)
    chain_rec = recs[0]
    assert not chain_rec["complete"] and any(f"{INC2}.chksum" in w for w in chain_rec["warnings"])
    assert [r["complete"] for r in recs[1:]] == [True, True]
    (c.path / f"{INC2}.partial").unlink()  # the next backup's cleanup: the lone .chksum stays, harmless
    code, recs = run("--backup-path", str(root), "--list-restore-points", HOSTILE)
    assert any("without their data file" in w for w in recs[0]["warnings"])
    assert restores(root, c, tmp_path, 1) == 0


def test_a_compressed_stream_without_chksum_is_read_through_lz4_s_own_checksums(tmp_path, monkeypatch):
    """Stored (incompressible) lz4 blocks are copied unchecked only where a .chksum covers them.

    Frames as virtnbdbackup writes them, with lz4's xxh32 checksums (vmbk's own have none).
    """
    import lz4.frame

    from vmbk.stream import writer as writer_mod

    monkeypatch.setattr(writer_mod, "compress_piece", lambda data, level: lz4.frame.compress(
        data, compression_level=level, content_checksum=True, block_checksum=True, store_size=True))
    p = tmp_path / "vda.full.data"
    payload = os.urandom(300_000)
    meta = StreamMeta(virtual_size=1 << 20, data_size=len(payload), disk_name="vda", compressed=2)
    with StreamWriter(p, meta) as w:
        w.write_data(0, payload)
    frame = scan(p).data_frames[0]
    flip(p, frame.file_pos + frame.stored_len // 2)

    def image() -> bytes:
        out = bytearray(1 << 20)
        with ChainImage([p]) as img:
            for off, view in img.runs(65536):
                out[off:off + len(view)] = view
        return bytes(out)

    with pytest.raises(StreamError, match="lz4"):
        image()
    Path(f"{p}.chksum").write_text(str(file_checksum(p)))  # a .chksum (here: of the damaged file) takes over
    assert image()[:len(payload)] != payload
