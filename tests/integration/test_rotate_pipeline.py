"""The proof of vmbk-rotate (#13): 100 nights of the whole pipeline on a real domain.

``vmbk-discover | vmbk-plan | vmbk-backup | vmbk-rotate`` (in process, each
stage reading the previous one's records) with ``--now`` stepping one day
at a time over 100 days, on a no-OS domain whose 8 MiB disk changes only
when the test writes to it (HMP ``qemu-io``), one write a day.  Policies:
daily (keeps 3) for 40 days, weekly (keeps 2) for 30, then accumulate
(chains of 6 restore points, 2 archived chains kept), orphans protected 2
days and deleted after 10.  After every night:

* the tree holds exactly what the policy says: the test keeps its own
  simple model of which directories must be there (`Model`) and compares;
* the catalogue agrees with the tree: the periods with live backup rows
  are the period directories, every deletion is done (``success`` 1,
  tombstones ``deleted``), nothing is under way;
* every restore point ``vmbk-restore --list-restore-points`` lists is
  complete, and the new one restores byte-exact (``qemu-img compare``)
  against the disk copied when it was made.  On the last day of each
  policy and at the end, every point listed is restored again; so every
  point is restored at least once after a rotation ran over its chain.

The catalogue's times are the wall clock, later than the simulated days:
an orphan's age then counts from the end of its period (the rule that a
directory takes backups only during its period, `vmbk.policy.retention`).
"""

from __future__ import annotations

import datetime as _dt
import io
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt_qemu
import orjson
import pytest
from backup_helpers import run_restore

from vmbk.catalogue import db_path
from vmbk.commands import backup, discover, plan, rotate
from vmbk.tree.names import archive_order, period_days, period_id, policy_of_period

pytestmark = [pytest.mark.libvirt]

DAYS = 100
START = _dt.datetime(2026, 6, 1, 1, 30, tzinfo=_dt.UTC)  # a Monday; the wall clock is later
SCHEDULE = [(0, "daily"), (40, "weekly"), (70, "accumulate")]
RETENTION = {"daily": 3, "weekly": 2, "accumulate_limit": 6, "archives": 2, "orphan_min_age": 2,
             "orphan_max_age": 10}
VDA = "/machine/peripheral/virtio-disk0/virtio-backend"
MiB = 1 << 20


def stage(main: Any, argv: list[str], records: list[dict[str, Any]]) -> tuple[int, list[dict[str, Any]]]:
    out = io.StringIO()
    code = main(["--json", *argv], io.StringIO("".join(orjson.dumps(r).decode() + "\n" for r in records)), out)
    return code, [orjson.loads(line) for line in out.getvalue().splitlines()]


def pipeline(name: str, root: Path, now: str) -> list[dict[str, Any]]:
    """discover | plan | backup | rotate: the last stage's records."""
    common = ["--backup-path", str(root), "--now", now]
    recs: list[dict[str, Any]] = []
    for main, argv in ((discover.main, ["--vm", name]), (plan.main, common), (backup.main, common),
                       (rotate.main, common)):
        code, recs = stage(main, argv, recs)
        assert code == 0, [r for r in recs if r["type"] == "error"]
    return recs


class Model:
    """Which directories of the VM must exist, by the rules restated simply."""

    def __init__(self) -> None:
        self.periods: dict[str, str] = {}  # period -> the policy whose format it is
        self.archives: list[str] = []  # archived chains of the VM directory (accumulate)

    def backup(self, rec: dict[str, Any], policy: str, vm_dir: Path) -> None:
        if rec["period"]:
            self.periods[rec["period"]] = policy
        for ev in rec.get("events") or []:
            if ev["event"] == "archived" and Path(ev["directory"]).parent == vm_dir / ".archives":
                self.archives.append(Path(ev["directory"]).name)

    def rotate(self, policy: str, now: _dt.datetime) -> None:
        keep = RETENTION.get(policy)
        if policy == "accumulate":
            self.archives = sorted(self.archives, key=archive_order)[-RETENTION["archives"]:]
        else:
            mine = sorted(p for p, pol in self.periods.items() if pol == policy)
            for p in mine[:-keep]:
                del self.periods[p]
        for p, pol in list(self.periods.items()):
            if pol == policy:
                continue
            end = period_days(p)[1]  # type: ignore[index]
            ended = _dt.datetime(end.year, end.month, end.day, tzinfo=now.tzinfo)
            if (now - ended).total_seconds() >= RETENTION["orphan_max_age"] * 86400:
                del self.periods[p]

    def dirs(self) -> list[str]:
        return sorted([*self.periods, *(f".archives/{a}" for a in self.archives)])


def tree_dirs(vm_dir: Path) -> list[str]:
    out = [p.name for p in vm_dir.iterdir() if p.is_dir() and policy_of_period(p.name)]
    archives = vm_dir / ".archives"
    if archives.is_dir():
        out += [f".archives/{a.name}" for a in archives.iterdir()]
    return sorted(out)


def listed_points(root: Path, name: str) -> Iterator[dict[str, Any]]:
    code, recs = run_restore("--backup-path", str(root), "--list-restore-points", name)
    assert code == 0, recs
    for r in recs:
        if r["type"] == "restore_point":
            assert r["complete"], r
            yield r


def point_file(p: dict[str, Any]) -> Path:
    chain = Path(p["path"])
    if p["kind"] == "COPY":
        return chain / "vda.copy.data"
    return chain / ("vda.full.data" if p["index"] == 0 else f"vda.inc.virtnbdbackup.{p['index']}.data")


def identity(f: Path) -> tuple[str, int]:
    """A point's own data file, by its checksum and size (it moves when archived)."""
    return (f.with_name(f.name + ".chksum").read_text().strip(), f.stat().st_size)


def test_a_hundred_nights_of_the_pipeline_with_rotate(nos_domain, vm_workdir, tmp_path, monkeypatch):
    started = time.monotonic()
    nd = nos_domain(1, size="8M", writes=[(0x11, 0, MiB)])
    etc = tmp_path / "etc"
    etc.mkdir()
    root = vm_workdir / "backups"
    root.mkdir()
    monkeypatch.setenv("VMBK_CONFIG_DIR", str(etc))
    vm_dir = root / nd.name
    refs: dict[tuple[str, int], Path] = {}  # a point's own data file -> the disk when it was made
    restored: set[tuple[str, int]] = set()
    model = Model()
    removed_total = 0
    policy = ""
    restores = 0

    def restore_and_compare(p: dict[str, Any], tag: str) -> None:
        nonlocal restores
        key = identity(point_file(p))
        out = vm_workdir / "restore"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        code, recs = run_restore("--vm", p["path"], "--restore-point", str(p["index"]), "--restore-path", str(out),
                                 "--skip-config")
        assert code == 0, recs
        image = recs[-1]["files"][0]
        same = subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", image, str(refs[key])])
        assert same.returncode == 0, f"{tag}: {p['chain']} point {p['index']} differs from its reference"
        restored.add(key)
        restores += 1

    for day in range(DAYS):
        now = START + _dt.timedelta(days=day)
        new_policy = [pol for first, pol in SCHEDULE if first <= day][-1]
        if new_policy != policy:
            policy = new_policy
            (etc / "default.toml").write_text(f'policy = "{policy}"\n[retention]\n'
                                              + "".join(f"{k} = {v}\n" for k, v in RETENTION.items()))
        libvirt_qemu.qemuMonitorCommand(nd.dom, f'qemu-io -d {VDA} "write -P {day % 250 + 1} {day % 7}M 64k"',
                                        libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
        ref = vm_workdir / f"ref-{day}.raw"
        subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(nd.disks[0]), str(ref)], check=True)

        recs = pipeline(nd.name, root, now.isoformat())
        (bk,) = [r for r in recs if r["type"] == "backup"]
        (rot,) = [r for r in recs if r["type"] == "rotate"]
        assert [r["type"] for r in recs] == ["backup", "rotate"]  # the backup record passed on first
        assert bk["outcome"] == "ok" and bk["period"] == period_id(policy, now), bk
        (disk,) = bk["disks"]
        refs[(str(disk["checksum"]), disk["stored_size"])] = ref
        assert rot["policy"] == policy, rot
        assert all("orphan_min_age" in p["why"] for p in rot["protected"]), rot  # only young orphans
        removed_total += len(rot["removed"])

        # the tree holds exactly what the policy says
        model.backup(bk, policy, vm_dir)
        model.rotate(policy, now)
        assert tree_dirs(vm_dir) == model.dirs(), f"day {day} ({now:%F}, {policy}): {rot['removed']}"
        assert not list(vm_dir.rglob(".deleting-*"))

        # the catalogue agrees with the tree
        db = sqlite3.connect(db_path(root))
        try:
            live = {p for (p,) in db.execute("SELECT DISTINCT period FROM vm_backups WHERE vm = ? AND outcome = 'ok' "
                                             "AND deleted_at IS NULL AND period IS NOT NULL", (nd.name,))}
            assert live == {p for p in model.periods}, day
            assert db.execute("SELECT count(*) FROM retention_events WHERE action = 'delete' "
                              "AND (success IS NOT 1)").fetchone()[0] == 0
            assert db.execute("SELECT count(*) FROM retention_events WHERE action = 'delete'").fetchone()[0] \
                == removed_total
            gone = {c for (c,) in db.execute("SELECT chain FROM deleted_chains WHERE vm = ? AND status = 'deleted'",
                                             (nd.name,))}
            assert not {c for c in gone if (vm_dir / c).exists()}, "a tombstone for a chain that is there"
            assert db.execute("SELECT count(*) FROM deleted_chains WHERE status != 'deleted'").fetchone()[0] == 0
        finally:
            db.close()

        # every listed point is complete; new points (and all of them at each policy's end) restore byte-exact
        last_of_policy = day + 1 in {first for first, _ in SCHEDULE} or day == DAYS - 1
        points = list(listed_points(root, nd.name))
        for p in points:
            key = identity(point_file(p))
            assert key in refs, p
            if last_of_policy or key not in restored:
                restore_and_compare(p, f"day {day}")
    # every point listed on any day was restored at least once after a rotation ran over its chain
    assert set(refs) >= restored and len(restored) == DAYS
    assert removed_total > 40
    took = time.monotonic() - started
    print(f"100 nights: {removed_total} directories removed, {restores} restores, {took:.0f} s")
