"""vmbk.tree: period ids, names, archive naming and the scanner's reading of odd trees."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import pytest
from test_plan_golden import materialise, stream_file

from vmbk.tree import (
    archive_name,
    find_uuid,
    next_archive_name,
    parse_data_name,
    period_id,
    policy_of_period,
    scan_vm,
)

D = dt.date.fromisoformat


@pytest.mark.parametrize(
    ("policy", "day", "expected"),
    [
        ("daily", "2026-02-06", "20260206"),
        ("weekly", "2026-02-06", "2026-W06"),
        ("monthly", "2026-02-06", "202602"),
        ("monthly", "2026-03-01", "202603"),
        # ISO week edges: the ISO year, not the calendar year
        ("weekly", "2026-12-31", "2026-W53"),
        ("weekly", "2027-01-01", "2026-W53"),
        ("weekly", "2027-01-03", "2026-W53"),
        ("weekly", "2027-01-04", "2027-W01"),
        ("weekly", "2024-12-30", "2025-W01"),
        ("weekly", "2026-03-02", "2026-W10"),
        ("weekly", "2026-03-01", "2026-W09"),
        ("accumulate", "2026-02-06", None),
        ("never", "2026-02-06", None),
    ],
)
def test_period_id(policy: str, day: str, expected: str | None) -> None:
    assert period_id(policy, D(day)) == expected
    assert period_id(policy, dt.datetime.fromisoformat(day + "T23:59:59+00:00")) == expected


def test_period_id_uses_the_date_of_the_given_time_zone() -> None:
    late = dt.datetime.fromisoformat("2026-03-01T23:30:00-02:00")  # 01:30 UTC on March 2nd
    assert period_id("daily", late) == "20260301"
    assert period_id("daily", late.astimezone(dt.timezone.utc)) == "20260302"


def test_period_id_rejects_unknown_policies() -> None:
    with pytest.raises(ValueError):
        period_id("hourly", D("2026-01-01"))


@pytest.mark.parametrize(
    ("name", "policy"),
    [("20260206", "daily"), ("2026-W06", "weekly"), ("2026-W53", "weekly"), ("202602", "monthly"),
     ("20260230", None), ("2027-W53", "weekly"), ("2025-W53", None), ("2026-W00", None), ("202613", None), ("checkpoints", None),
     (".archives", None), ("2026-02", None)],
)
def test_policy_of_period(name: str, policy: str | None) -> None:
    assert policy_of_period(name) == policy


def test_period_ids_round_trip_to_their_policy() -> None:
    day = D("2024-01-01")
    while day < D("2029-01-01"):
        for policy in ("daily", "weekly", "monthly"):
            pid = period_id(policy, day)
            assert pid is not None and policy_of_period(pid) == policy, (policy, day)
        day += dt.timedelta(days=1)


@pytest.mark.parametrize(
    ("name", "parsed"),
    [
        ("vda.full.data", ("vda", "full", None, None)),
        ("sda.copy.data", ("sda", "copy", None, None)),
        ("vda.inc.virtnbdbackup.12.data", ("vda", "inc", "virtnbdbackup.12", 12)),
        ("my.disk.inc.virtnbdbackup.3.data", ("my.disk", "inc", "virtnbdbackup.3", 3)),
        ("vda.diff.1709400000.data", ("vda", "diff", None, None)),
        ("vda.full.data.partial", None),
        ("vda.full.data.chksum", None),
        ("vmconfig.virtnbdbackup.0.xml", None),
    ],
)
def test_parse_data_name(name: str, parsed: tuple[object, ...] | None) -> None:
    got = parse_data_name(name)
    assert (None if got is None else (got.disk, got.level, got.checkpoint, got.number)) == parsed


def test_archive_names() -> None:
    today = D("2026-03-04")
    assert archive_name([], today) == "chain-2026-03-04"
    assert archive_name(["chain-2026-03-03"], today) == "chain-2026-03-04"
    assert archive_name(["chain-2026-03-04"], today) == "chain-2026-03-04.1"
    assert archive_name(["chain-2026-03-04", "chain-2026-03-04.1"], today) == "chain-2026-03-04.2"
    # a removed archive's name is not reused the same day
    assert archive_name(["chain-2026-03-04.2"], today) == "chain-2026-03-04.3"
    assert archive_name(["chain-2026-03-04.x", "chain-2026-03-040"], today) == "chain-2026-03-04"


def test_next_archive_name_reads_the_directory(tmp_path: Path) -> None:
    assert next_archive_name(tmp_path, D("2026-03-04")) == tmp_path / ".archives" / "chain-2026-03-04"
    (tmp_path / ".archives" / "chain-2026-03-04").mkdir(parents=True)
    assert next_archive_name(tmp_path, D("2026-03-04")) == tmp_path / ".archives" / "chain-2026-03-04.1"
    (tmp_path / ".archives" / "chain-2026-03-04.1").mkdir()
    assert next_archive_name(tmp_path, D("2026-03-04")).name == "chain-2026-03-04.2"
    assert not (tmp_path / ".archives" / "chain-2026-03-04.2").exists()


UUID = "6f1c2a3e-0000-4000-8000-000000000001"
T = ["2026-03-02T22:00:00+00:00", "2026-03-03T22:00:00+00:00"]


def test_scan_reads_chains_archives_and_identity(tmp_path: Path) -> None:
    materialise(tmp_path, "web", UUID, {
        "2026-W10": {"disks": {"vda": 100, "vdb": 200}, "copy_disks": {"sdc": 50}, "times": T,
                     "partials": ["vda.inc.virtnbdbackup.2.data.partial"],
                     "archives": {"chain-2026-03-02": {"base": "copy", "disks": {"vda": 100},
                                                       "times": ["2026-03-01T10:00:00+00:00"]}}},
    })
    (tmp_path / "web" / "not-a-period").mkdir()
    (tmp_path / "web" / ".agent-status").write_text("yes")
    tree = scan_vm(tmp_path, "web")
    assert tree.exists and sorted(tree.chains) == [".", "2026-W10"]
    c = tree.chains["2026-W10"]
    assert c.policy == "weekly" and c.period == "2026-W10" and c.base == "full"
    assert c.disks == {"vda": 100, "vdb": 200, "sdc": 50}
    assert c.checkpointed_disks == ("vda", "vdb")
    assert c.cpt == ("virtnbdbackup.0", "virtnbdbackup.1") == c.file_checkpoints
    assert c.checkpoint_xmls == c.cpt
    assert c.partials == ("vda.inc.virtnbdbackup.2.data.partial",)
    assert c.uuid == UUID and c.domain_name == "web"
    inc = next(f for f in c.data if f.name == "vdb.inc.virtnbdbackup.1.data")
    assert (inc.meta_checkpoint, inc.meta_parent, inc.virtual_size, inc.incremental) == \
        ("virtnbdbackup.1", "virtnbdbackup.0", 200, True)
    assert [a.rel for a in c.archives] == ["2026-W10/.archives/chain-2026-03-02"]
    assert c.archives[0].base == "copy"
    assert tree.latest() is c
    assert tree.last_backup == dt.datetime.fromisoformat(T[1]).timestamp()
    assert tree.chains["."].is_empty


def test_scan_of_a_missing_vm_is_an_empty_tree(tmp_path: Path) -> None:
    tree = scan_vm(tmp_path, "ghost")
    assert not tree.exists and tree.latest() is None and tree.last_backup is None


def test_scan_reads_a_cpt_named_after_an_old_name_and_reports_bad_ones(tmp_path: Path) -> None:
    d = tmp_path / "new" / "202603"
    d.mkdir(parents=True)
    (d / "old.cpt").write_text(json.dumps(["virtnbdbackup.0"]))
    assert scan_vm(tmp_path, "new").chains["202603"].cpt == ("virtnbdbackup.0",)
    (d / "other.cpt").write_text("[]")
    c = scan_vm(tmp_path, "new").chains["202603"]
    assert c.cpt is None and "several checkpoint lists" in (c.cpt_error or "")
    (d / "other.cpt").unlink()
    (d / "old.cpt").write_text('{"not": "a list"}')
    assert "not a JSON list" in (scan_vm(tmp_path, "new").chains["202603"].cpt_error or "")


def test_scan_reports_an_unreadable_header_without_the_path(tmp_path: Path) -> None:
    d = tmp_path / "vm" / "20260302"
    d.mkdir(parents=True)
    (d / "vda.full.data").write_bytes(b"meta 0000000000000000 00000000000000ff\r\n{")
    f = scan_vm(tmp_path, "vm").chains["20260302"].data[0]
    assert f.error and str(tmp_path) not in f.error and f.virtual_size is None


def test_scan_does_not_write(tmp_path: Path) -> None:
    materialise(tmp_path, "web", UUID, {"202603": {"disks": {"vda": 1}, "times": T}})
    before = sorted((str(p), p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    scan_vm(tmp_path, "web")
    next_archive_name(tmp_path / "web" / "202603", D("2026-03-04"))
    assert sorted((str(p), p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) == before


def test_find_uuid_finds_a_renamed_vm(tmp_path: Path) -> None:
    materialise(tmp_path, "old", UUID, {"2026-W10": {"disks": {"vda": 1}, "times": T}})
    materialise(tmp_path, "flat", UUID, {".": {"disks": {"vda": 1}, "times": T}})
    materialise(tmp_path, "other", "0aa0aa0a-1111-4111-8111-111111111111", {"2026-W10": {"disks": {"vda": 1}, "times": T}})
    (tmp_path / "_state").mkdir()
    assert find_uuid(tmp_path, UUID, exclude="new") == ("flat", "old")
    assert find_uuid(tmp_path, UUID, exclude="old") == ("flat",)


def test_stream_file_helper_writes_what_the_stream_reader_reads(tmp_path: Path) -> None:
    from vmbk.stream.scan import read_meta

    stream_file(tmp_path / "x.data", {"virtualSize": 5, "dataSize": 0, "diskName": "vda", "streamVersion": 2}, 1.0)
    assert read_meta(tmp_path / "x.data").virtual_size == 5
    assert os.stat(tmp_path / "x.data").st_mtime == 1.0


def test_cleanup_of_a_partial_takes_the_stray_chksum_a_killed_commit_left(tmp_path):
    """Killed between the .chksum rename and the data rename (stream.atomic):
    the .partial goes, and with it the .chksum whose data never came."""
    from vmbk.tree.ops import cleanup_partials

    chain = tmp_path / "vm" / "202612"
    chain.mkdir(parents=True)
    (chain / "vda.inc.virtnbdbackup.1.data.partial").write_bytes(b"x")
    (chain / "vda.inc.virtnbdbackup.1.data.chksum").write_text("1")
    (chain / "vda.full.data.partial").write_bytes(b"x")  # a full that is complete beside it keeps its .chksum
    (chain / "vda.full.data").write_bytes(b"y")
    (chain / "vda.full.data.chksum").write_text("2")
    removed = cleanup_partials(tmp_path / "vm", ["202612/vda.inc.virtnbdbackup.1.data.partial",
                                                "202612/vda.full.data.partial"], "vm")
    assert len(removed) == 2
    assert sorted(p.name for p in chain.iterdir()) == ["vda.full.data", "vda.full.data.chksum"]
