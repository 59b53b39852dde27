"""vmbk.restore: restore points, completeness, chain/point/disk selection, --vm paths.

Trees are written with vmbk's own StreamWriter (real streams with
checksums), so the same builder serves the restore tests
(test_restore_command.py imports it).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from vmbk.errors import Exit, UsageError, VmbkError, VmError
from vmbk.tree.points import COPY, FULL, INCREMENTAL, chain_warnings, restore_points
from vmbk.restore.select import choose_chain, choose_disks, choose_point, parse_disks, parse_restore_point
from vmbk.restore.source import load, resolve, resolve_path
from vmbk.stream import StreamMeta, write_stream_atomic
from vmbk.tree import scan_chain, scan_vm

HOSTILE = "wé ird 'vm\" $(x)"
MiB = 1 << 20


def write_stream(path: Path, disk: str, vsize: int, *, data=(), zeros=(), checkpoint="virtnbdbackup.0", parent="",
                 inc=False, date="2026-03-02T22:00:01.123456", compress=False) -> None:
    frames = sorted([(o, "data", b) for o, b in data] + [(o, "zero", n) for o, n in zeros], key=lambda f: f[0])
    meta = StreamMeta(virtual_size=vsize, data_size=sum(len(b) for _, b in data), disk_name=disk,
                      checkpoint_name=checkpoint, parent_checkpoint=parent, incremental=inc,
                      compressed=2 if compress else False, date=date)
    with write_stream_atomic(path, meta, fsync=False) as w:
        for off, kind, val in frames:
            if kind == "data":
                w.write_data(off, val)
            else:
                w.write_zero(off, val)


def vmconfig(vm: str, disks: list[str], *, nvram: str | None = None, extra: str = "") -> str:
    disk_xml = "".join(
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='/var/lib/libvirt/images/{d}.qcow2'/><target dev='{d}' bus='virtio'/></disk>"
        for d in disks)
    os_xml = f"<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader><nvram>{nvram}</nvram>" \
        if nvram else ""
    from xml.sax.saxutils import escape
    return (f"<domain type='kvm'><name>{escape(vm)}</name><uuid>6b3c4a2e-1111-2222-3333-444455556666</uuid>"
            f"<memory unit='MiB'>64</memory><os><type arch='x86_64' machine='pc'>hvm</type>{os_xml}</os>"
            f"<devices>{disk_xml}<disk type='file' device='cdrom'><target dev='sda' bus='sata'/></disk>"
            f"<interface type='network'><mac address='52:54:00:11:22:33'/><source network='default'/></interface>"
            f"{extra}</devices></domain>")


class Chain:
    """Writes a full (or copy) chain and remembers what each disk holds at each point."""

    def __init__(self, path: Path, vm: str = HOSTILE, size: int = 4 * MiB) -> None:
        self.path, self.vm, self.size = path, vm, size
        path.mkdir(parents=True, exist_ok=True)
        self.images: dict[str, bytearray] = {}
        self.expected: dict[int, dict[str, bytes]] = {}
        self.cpt: list[str] = []
        self.n = 0

    def point(self, disks: dict[str, tuple], *, config: list[str] | None = None, cpt: bool = True,
              compress: bool = False, date: str | None = None) -> int:
        """``disks``: {dev: (data [(off, bytes)], zeros [(off, len)])}; returns the point's index."""
        n = self.n
        name = f"virtnbdbackup.{n}"
        for disk, (data, zeros) in disks.items():
            img = self.images.setdefault(disk, bytearray(self.size))
            for off, b in data:
                img[off:off + len(b)] = b
            for off, ln in zeros:
                img[off:off + ln] = bytes(ln)
            fname = f"{disk}.full.data" if n == 0 else f"{disk}.inc.{name}.data"
            write_stream(self.path / fname, disk, self.size, data=data, zeros=zeros, checkpoint=name,
                         parent="" if n == 0 else f"virtnbdbackup.{n - 1}", inc=n > 0, compress=compress,
                         date=date or f"2026-03-{2 + n:02d}T22:00:01.5")
        self.expected[n] = {d: bytes(img) for d, img in self.images.items() if d in disks}
        (self.path / f"vmconfig.{name}.xml").write_text(vmconfig(self.vm, config or sorted(disks)))
        (self.path / "checkpoints").mkdir(exist_ok=True)
        (self.path / "checkpoints" / f"{name}.xml").write_text(f"<domaincheckpoint><name>{name}</name>"
                                                                 "</domaincheckpoint>")
        if cpt:
            self.cpt.append(name)
            (self.path / f"{self.vm}.cpt").write_text(json.dumps(self.cpt))
        self.n += 1
        time.sleep(0.01)  # distinct mtimes: the newest chain is found by them
        return n

    def copy(self, disks: dict[str, list]) -> None:
        for disk, data in disks.items():
            img = bytearray(self.size)
            for off, b in data:
                img[off:off + len(b)] = b
            write_stream(self.path / f"{disk}.copy.data", disk, self.size, data=data)
            self.expected.setdefault(0, {})[disk] = bytes(img)
        (self.path / "vmconfig.copy.xml").write_text(vmconfig(self.vm, sorted(disks)))


def three_points(path: Path, vm: str = HOSTILE, disks: tuple[str, ...] = ("vda",)) -> Chain:
    """full + 2 incrementals; inc 2 zeroes what the full wrote at 1 MiB (vmbk's zero frames)."""
    c = Chain(path, vm)
    c.point({d: ([(0, b"A" * 65536), (MiB, b"B" * 131072)], [(2 * MiB, 65536)]) for d in disks})
    c.point({d: ([(65536, b"C" * 4096), (3 * MiB, os.urandom(65536))], []) for d in disks})
    c.point({d: ([(4096, b"D" * 512)], [(MiB, 65536)]) for d in disks})
    return c


# -- restore points -----------------------------------------------------------


def test_full_chain_points_are_numbered_by_checkpoint(tmp_path):
    three_points(tmp_path / HOSTILE / "2026-W10", disks=("vda", "vdb"))
    chain = scan_vm(tmp_path, HOSTILE).chains["2026-W10"]
    points = restore_points(chain)
    assert [(p.index, p.checkpoint, p.kind) for p in points] == [
        (0, "virtnbdbackup.0", FULL), (1, "virtnbdbackup.1", INCREMENTAL), (2, "virtnbdbackup.2", INCREMENTAL)]
    assert all(p.complete for p in points) and chain_warnings(chain) == []
    assert [p.date for p in points] == ["2026-03-02T22:00:01", "2026-03-03T22:00:01", "2026-03-04T22:00:01"]
    assert [f.name for f in points[2].disks["vdb"]] == [
        "vdb.full.data", "vdb.inc.virtnbdbackup.1.data", "vdb.inc.virtnbdbackup.2.data"]
    assert points[1].own_size == sum((chain.path / f"{d}.inc.virtnbdbackup.1.data").stat().st_size
                                     for d in ("vda", "vdb"))


def test_copy_chain_has_one_copy_point(tmp_path):
    Chain(tmp_path / "vm" / "20260302", "vm").copy({"vda": [(0, b"x" * 512)], "sda": [(512, b"y" * 512)]})
    (point,) = restore_points(scan_vm(tmp_path, "vm").chains["20260302"])
    assert (point.index, point.checkpoint, point.kind, sorted(point.disks)) == (0, None, COPY, ["sda", "vda"])
    assert point.ident == "copy" and point.complete


def test_raw_copy_disk_of_a_full_chain_belongs_to_every_point(tmp_path):
    c = three_points(tmp_path / "vm" / "202603", "vm")
    write_stream(c.path / "vdb.copy.data", "vdb", MiB, data=[(0, b"r" * 512)])
    points = restore_points(scan_vm(tmp_path, "vm").chains["202603"])
    assert all([f.name for f in p.disks["vdb"]] == ["vdb.copy.data"] for p in points)
    assert all(p.complete for p in points)


def test_missing_incremental_makes_its_point_and_later_ones_incomplete(tmp_path):
    c = three_points(tmp_path / "vm" / "202603", "vm", disks=("vda", "vdb"))
    (c.path / "vdb.inc.virtnbdbackup.1.data").unlink()
    points = restore_points(scan_vm(tmp_path, "vm").chains["202603"])
    assert [p.complete for p in points] == [True, False, False]
    assert "vdb has no data file for virtnbdbackup.1" in points[1].problems
    assert any("virtnbdbackup.1, which this point needs" in p for p in points[2].problems)


def test_disk_removed_mid_chain_is_not_a_hole(tmp_path):
    """Guide 9.4: a disk the later vmconfigs no longer list is simply gone from later points."""
    c = Chain(tmp_path / "vm" / "202603", "vm")
    c.point({"vda": ([(0, b"a" * 512)], []), "vdb": ([(0, b"b" * 512)], [])})
    c.point({"vda": ([(512, b"c" * 512)], []), "vdb": ([(512, b"d" * 512)], [])})
    c.point({"vda": ([(1024, b"e" * 512)], [])}, config=["vda"])
    chain = scan_vm(tmp_path, "vm").chains["202603"]
    points = restore_points(chain)
    assert [sorted(p.disks) for p in points] == [["vda", "vdb"], ["vda", "vdb"], ["vda"]]
    assert all(p.complete for p in points)
    with pytest.raises(VmError, match=r"last backed up at restore point 1 \(--restore-point 1\)") as e:
        choose_disks(points[2], ("vdb",), vm="vm")
    assert e.value.code == Exit.VM


def test_interrupted_backup_partial_and_cpt_flag_the_point(tmp_path):
    c = three_points(tmp_path / "vm" / "202603", "vm", disks=("vda", "vdb"))
    # a fourth backup died: vdb's data is complete, vda's is a .partial, the .cpt was not updated
    write_stream(c.path / "vdb.inc.virtnbdbackup.3.data", "vdb", c.size, data=[(0, b"z" * 512)],
                 checkpoint="virtnbdbackup.3", parent="virtnbdbackup.2", inc=True)
    (c.path / "vda.inc.virtnbdbackup.3.data.partial").write_bytes(b"meta 00")
    chain = scan_vm(tmp_path, "vm").chains["202603"]
    points = restore_points(chain)
    assert [p.complete for p in points] == [True, True, True, False]
    problems = " | ".join(points[3].problems)
    assert "not in vm.cpt" in problems and "vda.inc.virtnbdbackup.3.data.partial" in problems
    assert any("partial" in w for w in chain_warnings(chain)) and any(".cpt" in w or "checkpoint list" in w
                                                                       for w in chain_warnings(chain))
    with pytest.raises(VmError, match="newest complete point is --restore-point 2") as e:
        choose_point(chain, None, include_incomplete=False, vm="vm")
    assert e.value.code == Exit.VM
    assert choose_point(chain, None, include_incomplete=True, vm="vm").index == 3
    assert choose_point(chain, 2, include_incomplete=False, vm="vm").index == 2


def test_cpt_naming_a_checkpoint_without_data_is_an_incomplete_point(tmp_path):
    c = three_points(tmp_path / "vm" / "202603", "vm")
    (c.path / "vm.cpt").write_text(json.dumps([f"virtnbdbackup.{n}" for n in range(4)]))
    points = restore_points(scan_vm(tmp_path, "vm").chains["202603"])
    assert len(points) == 4 and not points[3].complete
    assert points[3].problems == ("vda has no data file for virtnbdbackup.3",)


def test_unreadable_stream_header_makes_points_incomplete(tmp_path):
    c = three_points(tmp_path / "vm" / "202603", "vm")
    (c.path / "vda.inc.virtnbdbackup.1.data").write_bytes(b"garbage, not a stream header.............\r\n")
    points = restore_points(scan_vm(tmp_path, "vm").chains["202603"])
    assert [p.complete for p in points] == [True, False, False]
    assert "unreadable stream header" in points[1].problems[0]


def test_stream_header_naming_another_checkpoint_is_flagged(tmp_path):
    c = three_points(tmp_path / "vm" / "202603", "vm")
    write_stream(c.path / "vda.inc.virtnbdbackup.2.data", "vda", c.size, data=[(0, b"q" * 512)],
                 checkpoint="virtnbdbackup.7", parent="virtnbdbackup.1", inc=True)
    points = restore_points(scan_vm(tmp_path, "vm").chains["202603"])
    assert "names checkpoint 'virtnbdbackup.7'" in points[2].problems[0]


# -- selection ------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "value"), [(None, None), ("latest", None), ("full", 0), ("0", 0), ("12", 12)])
def test_parse_restore_point(raw, value):
    assert parse_restore_point(raw) == value


@pytest.mark.parametrize("raw", ["-1", "x", "1.5", "", " 2", "٣"])
def test_bad_restore_point_is_a_usage_error(raw):
    with pytest.raises(UsageError) as e:
        parse_restore_point(raw)
    assert e.value.code == Exit.USAGE


def test_parse_disks():
    assert parse_disks(None) is None and parse_disks("all") is None
    assert parse_disks("vda, vdb,vda") == ("vda", "vdb")
    for bad in ("", ",", "vda,all"):
        with pytest.raises(UsageError):
            parse_disks(bad)


def test_restore_point_out_of_range_is_a_usage_error(tmp_path):
    three_points(tmp_path / "vm" / "202603", "vm")
    chain = scan_vm(tmp_path, "vm").chains["202603"]
    with pytest.raises(UsageError, match=r"no restore point 3 \(points: 0, 1, 2\)"):
        choose_point(chain, 3, include_incomplete=False, vm="vm")


def test_newest_chain_wins_across_policies_and_period_selects(tmp_path):
    three_points(tmp_path / "vm" / "2026-W10", "vm")
    three_points(tmp_path / "vm" / "202603", "vm")  # written later: a policy change
    source = load(resolve("vm", lambda: tmp_path))
    assert choose_chain(source, None).rel == "202603"
    assert choose_chain(source, "2026-W10").rel == "2026-W10"
    with pytest.raises(VmError, match=r"no period '20260101' \(periods: 2026-W10, 202603\)"):
        choose_chain(source, "20260101")


def test_accumulate_layout_is_detected(tmp_path):
    three_points(tmp_path / HOSTILE, HOSTILE)
    source = load(resolve(HOSTILE, lambda: tmp_path))
    chain = choose_chain(source, None)
    assert chain.rel == "." and chain.policy == "accumulate"
    assert len(restore_points(chain)) == 3


def test_period_with_only_archives_points_at_them(tmp_path):
    three_points(tmp_path / "vm" / "202603" / ".archives" / "chain-2026-03-05", "vm")
    (tmp_path / "vm" / "202603" / ".archives").mkdir(exist_ok=True)
    source = load(resolve("vm", lambda: tmp_path))
    with pytest.raises(VmError, match="chain-2026-03-05"):
        choose_chain(source, "202603")


def test_unknown_vm_is_a_vm_problem(tmp_path):
    with pytest.raises(VmError) as e:
        load(resolve("nope", lambda: tmp_path))
    assert e.value.code == Exit.VM


# -- --vm as a path ---------------------------------------------------------------


def test_vm_path_gives_name_and_backup_path(tmp_path):
    three_points(tmp_path / "root" / HOSTILE / "202603", HOSTILE)
    ref = resolve(str(tmp_path / "root" / HOSTILE) + "/", lambda: pytest.fail("no config needed"))
    assert (ref.backup_path, ref.vm, ref.chain_dir) == (tmp_path / "root", HOSTILE, None)


@pytest.mark.parametrize("period", ["2026-W10", None])
def test_archive_path_selects_that_chain(tmp_path, period):
    vm_dir = tmp_path / HOSTILE
    owner = vm_dir / period if period else vm_dir
    three_points(owner, HOSTILE)
    archive = owner / ".archives" / "chain-2026-03-04.1"
    Chain(archive, HOSTILE).point({"vda": ([(0, b"old" * 100)], [])})
    ref = resolve_path(str(archive))
    assert (ref.backup_path, ref.vm) == (tmp_path, HOSTILE)
    source = load(ref)
    chain = choose_chain(source, None)
    assert chain.path == archive and len(restore_points(chain)) == 1
    assert chain.rel.endswith(".archives/chain-2026-03-04.1")


def test_period_directory_path_selects_that_chain(tmp_path):
    three_points(tmp_path / "vm" / "2026-W10", "vm")
    three_points(tmp_path / "vm" / "2026-W11", "vm")
    source = load(resolve_path(str(tmp_path / "vm" / "2026-W10")))
    assert source.vm == "vm" and choose_chain(source, None).rel == "2026-W10"


def test_missing_path_is_a_vm_problem(tmp_path):
    with pytest.raises(VmbkError) as e:
        resolve_path(str(tmp_path / "gone"))
    assert e.value.code == Exit.VM


def test_scan_chain_of_copy_beside_full_is_full_base(tmp_path):
    c = three_points(tmp_path / "c", "vm")
    write_stream(c.path / "vdb.copy.data", "vdb", MiB, data=[(0, b"r" * 512)])
    assert scan_chain(c.path, ".", period=None, policy="accumulate", vm="vm").base == "full"
