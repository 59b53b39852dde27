"""vmbackup/vmrestore on vmbk's tree (issue #14), against fixtures written from
what the real tools write and read (vmbackup 0.5.3, vmrestore 0.5.4, read
for facts and run by hand on this host: docs/vmbackup-interop.md).

* names: vmbackup's ``%Y-W%V`` weekly names read as the ISO weeks they cover;
* markers: ``.full-backup-month`` holds what vmbackup compares it with, so
  its next backup is an incremental (`vmbackup_level`, its rule); the
  ``config/`` files vmrestore takes a clone's names from; the manifest;
* the archive leaves vmbackup's directory state in place;
* the backup root's mode;
* mixed chains (Debian's virtnbdbackup 1.9.15 writes no ``.chksum``);
* vmbackup's catalogue: schema 2.0 and an old one, ``--list``, the import.
"""

from __future__ import annotations

import datetime as dt
import grp
import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from test_plan_golden import materialise, materialise_chain
from vmbackup_helpers import vmbackup_level

from vmbk.catalogue import Catalogue
from vmbk.fsutil import ensure_root
from vmbk.restore.listing import list_vms
from vmbk.status.history import History as StatusHistory
from vmbk.tree import names, ops, scan_vm
from vmbk.tree.points import restore_points
from vmbk.vmbackup import markers
from vmbk.vmbackup.db import VmbackupDb
from vmbk.vmbackup.importer import import_history

VM = "my-vm"
UUID = "6f1c2a3e-0000-4000-8000-000000000001"
D = dt.date.fromisoformat
XML = "<domain type='kvm'>\n  <name>my-vm</name>\n</domain>\n"


def local(day: str, hms: str = "01:00:00") -> dt.datetime:
    return dt.datetime.fromisoformat(f"{day}T{hms}").astimezone()


# -- names -----------------------------------------------------------------------


@pytest.mark.parametrize(("name", "weeks"), [
    ("2027-W53", [(2026, 53)]),               # vmbackup's 2027-01-01..03; 2027 has 52 ISO weeks
    ("2026-W53", [(2026, 53)]),
    ("2024-W01", [(2024, 1), (2025, 1)]),     # January 2024, or vmbackup's 2024-12-30/31
    ("2022-W52", [(2021, 52), (2022, 52)]),   # vmbackup's 2022-01-01/02, or December 2022
    ("2025-W53", []), ("2026-W00", []), ("2026-W54", []),
])
def test_weekly_names_of_both_tools(name: str, weeks: list[tuple[int, int]]) -> None:
    assert list(names.week_candidates(name)) == weeks
    assert names.policy_of_period(name) == ("weekly" if weeks else None)


def test_every_day_of_2020_2030_is_read_back_as_its_iso_week() -> None:
    day = D("2019-12-20")
    while day < D("2031-01-10"):
        theirs, ours = day.strftime("%Y-W%V"), day.strftime("%G-W%V")
        assert names.vmbackup_period_id("weekly", day) == theirs and names.period_id("weekly", day) == ours
        week = names.period_days(ours)
        assert names.period_days(theirs, [day]) == week and week[0] <= day < week[1]
        day += dt.timedelta(days=1)


def test_an_ambiguous_name_is_decided_by_its_backups() -> None:
    assert names.period_days("2024-W01", [D("2024-01-03")]) == (D("2024-01-01"), D("2024-01-08"))
    assert names.period_days("2024-W01", [D("2024-12-30"), D("2024-12-31")]) == (D("2024-12-30"), D("2025-01-06"))
    assert names.period_days("2024-W01") == (D("2024-01-01"), D("2024-01-08"))  # no backups: the ISO reading


def test_the_scanner_reads_vmbackup_s_names_with_their_days(tmp_path: Path) -> None:
    materialise(tmp_path, VM, UUID, {
        "2024-W01": {"disks": {"vda": 1 << 30}, "times": ["2024-12-30T01:00:00+00:00"]},
        "2024-W52": {"disks": {"vda": 1 << 30}, "times": ["2024-12-23T01:00:00+00:00"]},
    })
    tree = scan_vm(tmp_path, VM)
    assert tree.chains["2024-W01"].days == (D("2024-12-30"), D("2025-01-06"))
    assert tree.chains["2024-W52"].days == (D("2024-12-23"), D("2024-12-30"))
    rec = next(list_vms(tmp_path))
    assert rec["periods"] == ["2024-W52", "2024-W01"]  # by their days, not their names


# -- markers ---------------------------------------------------------------------


def write(d: Path, level: str, now: dt.datetime, *, period: str | None, policy: str = "weekly",
          default: str | None = "weekly", xml: str = XML, stale: tuple[Path, ...] = ()) -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    return markers.write_all(d.parent if period else d, d, VM, period=period, policy=policy, default_policy=default,
                             level=level, xml=xml, tpm=False, size=10, now=now, stale=stale)


@pytest.mark.parametrize(("policy", "full", "nxt"), [
    ("weekly", "2027-01-04", "2027-01-05"),
    ("weekly", "2026-12-28", "2026-12-31"),
    ("daily", "2027-01-01", "2027-01-01"),
    ("monthly", "2026-12-01", "2026-12-31"),
    ("accumulate", "2026-12-01", "2027-03-01"),
])
def test_vmbackup_continues_a_chain_vmbk_started(tmp_path: Path, policy: str, full: str, nxt: str) -> None:
    period = names.period_id(policy, D(full))
    d = tmp_path / VM / period if period else tmp_path / VM
    write(d, "full", local(full), period=period, policy=policy, default=policy)
    assert vmbackup_level(d, policy, local(nxt, "02:00:00")) == "auto"
    assert (d / ".full-backup-month").read_text() == f"{period or 'accumulate'}\n"


def test_the_marker_of_a_default_policy_that_is_not_the_vm_s(tmp_path: Path) -> None:
    d = tmp_path / VM / "2026-W53"
    write(d, "full", local("2026-12-29"), period="2026-W53", policy="weekly", default="monthly")
    assert (d / ".full-backup-month").read_text() == "202612\n"
    assert vmbackup_level(d, "monthly", local("2026-12-31")) == "auto"


def test_an_incremental_keeps_vmbackup_s_marker_and_fills_a_missing_one(tmp_path: Path) -> None:
    d = tmp_path / VM / "2027-W53"
    d.mkdir(parents=True)
    (d / ".full-backup-month").write_text("2027-W53\n")
    assert write(d, "inc", local("2027-01-02"), period="2027-W53") == [d / "config" / f"{VM}_config_20270102_010000.xml",
                                                                       d / "config" / f"{VM}_config_2027-W53_FIRST.xml"]
    assert (d / ".full-backup-month").read_text() == "2027-W53\n"
    e = tmp_path / VM / "2026-W52"
    write(e, "inc", local("2026-12-22"), period="2026-W52")  # a chain vmbk began before it wrote markers
    assert vmbackup_level(e, "weekly", local("2026-12-23")) == "auto"


def test_config_files_as_vmbackup_keeps_them(tmp_path: Path) -> None:
    """First of the period: a timestamped copy and _FIRST; later: kept only when changed."""
    d = tmp_path / VM / "2027-W01"
    write(d, "full", local("2027-01-04"), period="2027-W01")
    assert sorted(p.name for p in (d / "config").iterdir()) == [f"{VM}_config_2027-W01_FIRST.xml",
                                                                f"{VM}_config_20270104_010000.xml"]
    assert (d / "config" / f"{VM}_config_2027-W01_FIRST.xml").read_text() == XML + "\n"  # as virsh dumpxml prints
    assert write(d, "inc", local("2027-01-05"), period="2027-W01") == []
    changed = XML.replace("my-vm", "my-vm2")
    assert write(d, "inc", local("2027-01-06"), period="2027-W01", xml=changed) == [
        d / "config" / f"{VM}_config_20270106_010000.xml"]
    # vmrestore takes the newest (ls -t) config/*.xml for a clone's names and definition
    newest = max((d / "config").iterdir(), key=lambda p: (p.stat().st_mtime_ns, p.name))
    assert newest.read_text() == changed + "\n"


def test_a_stale_chain_of_the_period_loses_its_marker(tmp_path: Path) -> None:
    """2025-W01 (vmbk, 2024-12-30) and 2024-W01 (vmbackup, 2024-12-31) are one ISO week:
    vmbk continuing 2024-W01 makes vmbackup start over in 2025-W01, not add a wrong incremental."""
    ours, theirs = tmp_path / VM / "2025-W01", tmp_path / VM / "2024-W01"
    write(ours, "full", local("2024-12-30"), period="2025-W01")
    write(theirs, "full", local("2024-12-31"), period="2024-W01")
    write(theirs, "inc", local("2025-01-01"), period="2024-W01", stale=(ours,))
    assert vmbackup_level(ours, "weekly", local("2025-01-02")) == "full"
    assert vmbackup_level(theirs, "weekly", local("2024-12-31", "23:00:00")) == "auto"


#: chain-manifest.json as vmbackup 0.5.3 wrote it here (docs/vmbackup-interop.md, day 1).
MANIFEST = {
    "version": "1.0", "vm_name": VM, "created": "2026-12-28T01:00:01+00:00", "updated": "2026-12-28T01:00:06+00:00",
    "rotation_policy": "weekly",
    "restore_points": [{"id": f"{VM}:2026-W53:chain-20261228-010006:0", "period_id": "2026-W53",
                        "chain_id": "chain-20261228-010006", "checkpoint": 0, "backup_type": "full", "backup_file": "",
                        "timestamp": "2026-12-28T01:00:06+00:00", "size_bytes": 74263325, "chain_status": "active",
                        "parent_id": None}],
    "chains": {"chain-20261228-010006": {"period_id": "2026-W53", "status": "active",
                                         "started": "2026-12-28T01:00:06+00:00", "checkpoint_count": 1,
                                         "total_bytes": 74263325, "base_backup": ""}},
}


def test_the_manifest_gets_vmbk_s_points_as_vmbackup_adds_its_own(tmp_path: Path) -> None:
    vm_dir = tmp_path / VM
    (vm_dir / "2026-W53").mkdir(parents=True)
    (vm_dir / "chain-manifest.json").write_text(json.dumps(MANIFEST))
    write(vm_dir / "2026-W53", "inc", dt.datetime(2026, 12, 29, 1, tzinfo=dt.timezone.utc), period="2026-W53")
    m = json.loads((vm_dir / "chain-manifest.json").read_text())
    assert [p["id"] for p in m["restore_points"]] == [f"{VM}:2026-W53:chain-20261228-010006:0",
                                                     f"{VM}:2026-W53:chain-20261228-010006:1"]
    assert m["restore_points"][1]["backup_type"] == "auto" and m["restore_points"][1]["chain_status"] == "active"
    assert m["chains"]["chain-20261228-010006"]["checkpoint_count"] == 2
    assert m["updated"] == "2026-12-29T01:00:00+00:00"
    other = tmp_path / "other"
    write(other / "2026-W53", "full", local("2026-12-29"), period="2026-W53")
    assert not (other / "chain-manifest.json").exists()  # vmbackup makes one where there is none


def test_an_archive_leaves_vmbackup_s_directory_state(tmp_path: Path) -> None:
    materialise(tmp_path, VM, UUID, {"2026-W53": {"disks": {"vda": 1 << 30}, "times": ["2026-12-28T01:00:00+00:00"]}})
    d = tmp_path / VM / "2026-W53"
    write(d, "full", local("2026-12-28"), period="2026-W53")
    ops.archive_chain(tmp_path / VM, "2026-W53", "2026-W53/.archives/chain-2026-12-29", VM)
    assert {p.name for p in d.iterdir()} == {".full-backup-month", "config", ".archives"}


# -- the backup root -------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="only root gives a directory to the backup group")
def test_the_backup_root_gets_vmbackup_s_owner_and_mode(tmp_path: Path) -> None:
    try:
        gid = grp.getgrnam("backup").gr_gid
    except KeyError:
        pytest.skip("no backup group")
    root = tmp_path / "backups"
    root.mkdir(mode=0o755)
    os.chmod(root, 0o755)
    assert ensure_root(root)
    st = root.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, gid, 0o2750)
    os.chmod(root, 0o2770)
    assert not ensure_root(root) and root.stat().st_mode & 0o7777 == 0o2770  # a chosen SGID mode stays


# -- mixed chains ----------------------------------------------------------------


def _chain(tmp: Path, chksums: dict[str, bool], by_vmbk: set[str]) -> list[Any]:
    times = ["2026-12-28T01:00:00+00:00", "2026-12-29T01:00:00+00:00", "2026-12-30T01:00:00+00:00"]
    files = ["vda.full.data", "vda.inc.virtnbdbackup.1.data", "vda.inc.virtnbdbackup.2.data"]
    spec = {"disks": {"vda": 1 << 30}, "times": times, "meta": {f: {"writtenBy": "vmbk 0.1.0"} for f in by_vmbk}}
    d = tmp / VM / "2026-W53"
    materialise_chain(d, spec, VM, UUID)
    for f in files:
        if chksums.get(f):
            (d / (f + ".chksum")).write_text("1")
    return restore_points(scan_vm(tmp, VM).chains["2026-W53"])


def test_a_chain_vmbackup_began_without_checksums_and_vmbk_continued_is_complete(tmp_path: Path) -> None:
    """vmbackup drives Debian's virtnbdbackup 1.9.15, which writes no .chksum; vmbk writes one."""
    inc1 = "vda.inc.virtnbdbackup.1.data"
    points = _chain(tmp_path, {inc1: True}, {inc1})
    assert [p.unverifiable for p in points] == [(), (), ()]


def test_a_vmbk_file_without_its_checksum_is_unverifiable(tmp_path: Path) -> None:
    inc1 = "vda.inc.virtnbdbackup.1.data"
    points = _chain(tmp_path, {}, {inc1})
    assert [p.unverifiable for p in points] == [(), (inc1,), (inc1,)]


def test_a_newer_virtnbdbackup_s_file_without_its_checksum_is_unverifiable(tmp_path: Path) -> None:
    full, inc1 = "vda.full.data", "vda.inc.virtnbdbackup.1.data"
    points = _chain(tmp_path, {full: True}, set())
    assert [p.unverifiable for p in points] == [(), (inc1,), (inc1, "vda.inc.virtnbdbackup.2.data")]


# -- vmbackup's catalogue --------------------------------------------------------

#: vmbackup's tables and columns as its schema 2.0 has them (lib/sqlite_module.sh; a
#: database it wrote here), the columns vmbk reads and a few it does not.
SCHEMA_2_0 = """
CREATE TABLE schema_info (key TEXT PRIMARY KEY, value TEXT);
INSERT INTO schema_info VALUES ('version', '2.0');
CREATE TABLE sessions (id INTEGER PRIMARY KEY, instance TEXT NOT NULL, start_time TEXT NOT NULL, end_time TEXT,
    duration_sec INTEGER, vms_total INTEGER DEFAULT 0, vms_success INTEGER DEFAULT 0, vms_failed INTEGER DEFAULT 0,
    vms_skipped INTEGER DEFAULT 0, vms_excluded INTEGER DEFAULT 0, bytes_total INTEGER DEFAULT 0,
    status TEXT DEFAULT 'running', log_file TEXT, session_type TEXT);
CREATE TABLE vm_backups (id INTEGER PRIMARY KEY AUTOINCREMENT, session_id INTEGER NOT NULL, vm_name TEXT NOT NULL,
    vm_status TEXT, os_type TEXT, backup_type TEXT, backup_method TEXT, rotation_policy TEXT, status TEXT,
    bytes_written INTEGER DEFAULT 0, chain_size_bytes INTEGER DEFAULT 0, total_dir_bytes INTEGER DEFAULT 0,
    restore_points INTEGER DEFAULT 0, restore_points_before INTEGER DEFAULT 0, duration_sec INTEGER,
    backup_path TEXT, log_file TEXT, error_code TEXT, error_message TEXT, event_type TEXT, event_detail TEXT,
    retry_attempt INTEGER DEFAULT 0, archived_restore_points INTEGER DEFAULT 0, qemu_agent INTEGER DEFAULT 0,
    vm_paused INTEGER DEFAULT 0, chain_archived INTEGER DEFAULT 0, created_at TEXT DEFAULT CURRENT_TIMESTAMP);
CREATE TABLE chain_health (id INTEGER PRIMARY KEY AUTOINCREMENT, vm_name TEXT NOT NULL, period_id TEXT NOT NULL,
    chain_location TEXT NOT NULL, chain_status TEXT NOT NULL DEFAULT 'active', rotation_policy TEXT,
    total_checkpoints INTEGER DEFAULT 0, restorable_count INTEGER DEFAULT 0, broken_at INTEGER, break_reason TEXT,
    first_backup TEXT, last_backup TEXT, archived_at TEXT, deleted_at TEXT, UNIQUE(vm_name, period_id));
"""
#: Schema 1.0: no schema_info, no chain_health, vm_backups before 1.5's columns.
SCHEMA_1_0 = """
CREATE TABLE sessions (id INTEGER PRIMARY KEY, instance TEXT NOT NULL, start_time TEXT NOT NULL, end_time TEXT,
    status TEXT DEFAULT 'running');
CREATE TABLE vm_backups (id INTEGER PRIMARY KEY AUTOINCREMENT, session_id INTEGER NOT NULL, vm_name TEXT NOT NULL,
    backup_type TEXT, rotation_policy TEXT, status TEXT, bytes_written INTEGER DEFAULT 0,
    restore_points INTEGER DEFAULT 0, duration_sec INTEGER, backup_path TEXT, error_message TEXT,
    created_at TEXT DEFAULT CURRENT_TIMESTAMP);
"""


def vmbackup_db(root: Path, schema: str = SCHEMA_2_0) -> Path:
    """Rows as vmbackup wrote them here: a full, an incremental, a failure."""
    path = root / "_state" / "vmbackup.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    db.executescript(schema)
    new = "event_detail" in schema
    for sid, start, vm_status, btype, rp, err, created in [
        (1798419600, "2026-12-28 01:00:00", "success", "full", 1, None, "2026-12-28 01:00:07"),
        (1798592400, "2026-12-30 01:00:00", "success", "auto", 3, None, "2026-12-30 01:00:06"),
        (1798765201, "2027-01-01 01:00:00", "failed", "full", 0, "virtnbdbackup failed", "2027-01-01 01:00:09"),
    ]:
        db.execute("INSERT INTO sessions (id, instance, start_time, end_time, status) VALUES (?, 'default', ?, ?, ?)",
                   (sid, start, start, vm_status))
        period = "2026-W53" if start < "2027" else "2027-W53"
        cols = {"session_id": sid, "vm_name": VM, "backup_type": btype, "rotation_policy": "weekly",
                "status": vm_status, "restore_points": rp, "duration_sec": 6, "error_message": err,
                "backup_path": f"/var/tmp/vmbk-interop/backups/{VM}/{period}", "created_at": created}
        if new:
            cols |= {"restore_points_before": rp - 1 if rp else 0, "event_detail": f"{btype} +0B"}
        db.execute(f"INSERT INTO vm_backups ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", list(cols.values()))
    if "chain_health" in schema:
        db.execute("INSERT INTO chain_health (vm_name, period_id, chain_location, chain_status, rotation_policy, "
                   "total_checkpoints, restorable_count, last_backup) VALUES (?, '2026-W53', ?, 'archived', 'weekly', "
                   "3, 3, '2026-12-30 01:00:07')", (VM, f"/b/{VM}/2026-W53/.chain-20270101-010004"))
    db.commit()
    db.close()
    return path


@pytest.mark.parametrize("schema", [SCHEMA_2_0, SCHEMA_1_0], ids=["2.0", "1.0"])
def test_vmbackup_s_catalogue_read_with_its_schema_detected(tmp_path: Path, schema: str) -> None:
    path = vmbackup_db(tmp_path, schema)
    before = path.read_bytes()
    with VmbackupDb(tmp_path) as db:
        assert db.version == ("2.0" if schema is SCHEMA_2_0 else "1.0")
        got = [(b["action"], b["outcome"], b["period"], b["started_at"]) for b in db.backups(VM)]
        s = db.summary(VM)
    assert got == [("full", "ok", "2026-W53", "2026-12-28T01:00:07+00:00"),
                   ("inc", "ok", "2026-W53", "2026-12-30T01:00:06+00:00"),
                   ("full", "failed", "2027-W53", "2027-01-01T01:00:09+00:00")]
    assert s is not None and s["source"] == "vmbackup" and (s["backups"], s["failed"]) == (3, 1)
    assert (s["last_backup"], s["last_outcome"], s["last_error"]) == ("2026-12-30T01:00:06+00:00", "failed",
                                                                      "virtnbdbackup failed")
    assert [c["period"] for c in s["chains"]] == (["2026-W53"] if schema is SCHEMA_2_0 else [])
    assert path.read_bytes() == before  # read-only


def test_list_shows_vmbackup_s_history_marked_as_its(tmp_path: Path) -> None:
    materialise(tmp_path, VM, UUID, {"2026-W53": {"disks": {"vda": 1 << 30}, "times": ["2026-12-28T01:00:00+00:00"]}})
    vmbackup_db(tmp_path)
    rec = next(list_vms(tmp_path))
    assert rec["vmbackup"]["source"] == "vmbackup" and rec["vmbackup"]["backups"] == 3
    assert rec["vmbackup"]["chains"][0]["status"] == "archived"
    assert rec["health"].endswith("; last attempt 2027-01-01T01:00:09+00:00 failed (vmbackup)")
    assert rec["chains_broken"] == 0  # health is the tree's


def test_import_copies_each_backup_once_and_status_says_whose(tmp_path: Path) -> None:
    vmbackup_db(tmp_path)
    with Catalogue.open(tmp_path) as cat:
        cat.start_session("s1", "vmbk-backup")
        cat.insert("vm_backups", {"session_id": "s1", "vm": VM, "action": "inc", "outcome": "ok",
                                  "started_at": "2026-12-29T01:00:00+00:00"})
    first = import_history(tmp_path)
    assert (first.backups, first.sessions, first.known, first.vms) == (3, 3, 0, (VM,))
    again = import_history(tmp_path)
    assert (again.backups, again.known) == (0, 3)
    with Catalogue.open(tmp_path) as cat:
        rows = cat.query("SELECT session_id, action, outcome, source FROM vm_backups ORDER BY started_at")
        assert [tuple(r) for r in rows] == [("vmbackup-1798419600", "full", "ok", "vmbackup"),
                                            ("s1", "inc", "ok", None),
                                            ("vmbackup-1798592400", "inc", "ok", "vmbackup"),
                                            ("vmbackup-1798765201", "full", "failed", "vmbackup")]
        assert cat.query("SELECT command FROM sessions WHERE id = 'vmbackup-1798419600'")[0][0] == "vmbackup"
    with StatusHistory(tmp_path) as hist:
        assert hist.last_success(VM)["source"] == "vmbackup"  # type: ignore[index]
        assert hist.last_attempt(VM)["outcome"] == "failed"  # type: ignore[index]
