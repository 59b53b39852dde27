"""Weekly periods across every New Year of 2020-2030, vmbk and vmbackup alternating.

vmbk names a week ``%G-W%V`` (the ISO week), vmbackup ``%Y-W%V`` (the
calendar year with the ISO week number: ``2027-W53`` for 2027-01-01,
``2024-W01`` for 2024-12-30), issue #14.  For each New Year from 2019/20
to 2030/31 and both directions of a switch (vmbackup backs up the odd
days and vmbk the even ones, then the other way round), a weekly VM is
backed up every night from 26 December to 10 January:

* vmbk's night: the real scanner and planner on a tree of real files
  (`test_plan_golden.materialise`), the plan applied as vmbk-backup would;
* vmbackup's night: what vmbackup 0.5.3 does, from its code and a run on
  this host (docs/vmbackup-interop.md): its directory is
  ``date +%Y-W%V``; the chain there is continued when it is the one
  libvirt's checkpoints follow (vmbk writes the ``.full-backup-month``
  vmbackup checks and removes that of a stale chain of the period,
  tests/unit/test_vmbackup_markers.py); else a full (a stale chain
  archived first).

Checked every vmbk night, by a rule stated apart from the code: when the
previous night's backup lies in today's ISO week, vmbk continues that
chain (an incremental in that directory, whatever its name); otherwise a
full in vmbk's own name for today.  At the end retention keeps the 2
newest weeks: the directories whose backups lie in the 2 newest ISO
weeks, never by name.  The golden file
(tests/golden/boundaries/weeks-2020-2030.json) holds every decision;
``VMBK_GOLDEN_REGEN=1`` rewrites it.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

import pytest
from test_plan_golden import _vm, apply_plan, materialise

from vmbk.config import Config, Retention
from vmbk.planner import plan_vm
from vmbk.policy import retention
from vmbk.rotate.facts import gather
from vmbk.tree import scan_vm

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "boundaries" / "weeks-2020-2030.json"
REGEN = os.environ.get("VMBK_GOLDEN_REGEN") == "1"
VM = "my-vm"
UUID = "6f1c2a3e-0000-4000-8000-000000000001"
SIZE = 10737418240
YEARS = range(2019, 2031)  # New Year Y/Y+1
DIRECTIONS = ("vmbackup-first", "vmbk-first")


def vm_record() -> dict[str, Any]:
    return _vm({"name": VM, "uuid": UUID, "state": "running", "persistent": True, "agent": True,
                "checkpoints": [], "policy": "weekly",
                "disks": [{"target": "vda", "device": "disk", "type": "file", "format": "qcow2",
                           "source": "/var/lib/libvirt/images/my-vm.qcow2", "virtual_size": SIZE,
                           "checkpoint_capable": True, "bitmaps": []}]})


def at(day: dt.date) -> str:
    return f"{day.isoformat()}T01:00:00+00:00"


def vmbackup_night(tree: dict[str, Any], vm: dict[str, Any], day: dt.date, live: str | None) -> dict[str, Any]:
    """vmbackup's backup of ``day`` in its own directory name.

    It continues the chain there when its ``.full-backup-month`` says so:
    the chain libvirt's checkpoints follow (``live``, last night's).  vmbk
    removes the marker of every other chain of the period it does not
    write (`vmbk.vmbackup.markers.forget_stale`), so vmbackup takes such a
    directory for new: it archives what is there and makes a full.
    """
    folder = day.strftime("%Y-W%V")
    chain = tree.get(folder)
    if chain and chain.get("times") and folder == live:
        chain["times"].append(at(day))
        vm["checkpoints"].append(f"virtnbdbackup.{len(chain['times']) - 1}")
        action = "inc"
    else:
        new: dict[str, Any] = {"disks": {"vda": SIZE}, "times": [at(day)]}
        if chain and chain.get("times"):
            old = {k: v for k, v in chain.items() if k != "archives"}
            new["archives"] = {**chain.get("archives", {}), f"chain-{day.isoformat()}": old}
        tree[folder] = new
        vm["checkpoints"][:] = ["virtnbdbackup.0"]
        action = "full"
    vm["disks"][0]["bitmaps"] = [{"name": c, "flags": ["in-use", "auto"]} for c in vm["checkpoints"]]
    return {"tool": "vmbackup", "action": action, "target": folder}


def run_boundary(tmp: Path, year: int, direction: str) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    vm = vm_record()
    cfg = Config(instance="golden", source=None, retention=Retention(weekly=2))
    nights: dict[str, Any] = {}
    previous: tuple[dt.date, str] | None = None
    first = dt.date(year, 12, 26)
    for i in range(16):
        day = first + dt.timedelta(days=i)
        vmbk_turn = (i % 2 == 1) if direction == "vmbackup-first" else (i % 2 == 0)
        if not vmbk_turn:
            step = vmbackup_night(tree, vm, day, previous[1] if previous else None)
        else:
            root = tmp / f"{day}"
            materialise(root, VM, UUID, tree)
            plan = plan_vm(copy.deepcopy(vm), cfg, root, dt.datetime.fromisoformat(at(day)))[0].to_dict()
            expect_rule(plan, day, previous)
            apply_plan(tree, vm, plan, at(day))
            step = {"tool": "vmbk", "action": plan["action"], "target": plan["target"], "checkpoint": plan["checkpoint"]}
        previous = (day, step["target"])
        nights[day.isoformat()] = step
    last = first + dt.timedelta(days=15)
    root = tmp / "final"
    materialise(root, VM, UUID, tree)
    facts = gather(scan_vm(root, VM))
    d = retention.decide(facts, "weekly", cfg.retention, dt.datetime.fromisoformat(at(last)))
    removed = sorted(r.rel for r in d.removed)
    expect_retention(tree, removed, last)
    return {"year": year, "direction": direction, "nights": nights, "directories": sorted(tree),
            "retention_removed": removed}


def expect_rule(plan: dict[str, Any], day: dt.date, previous: tuple[dt.date, str] | None) -> None:
    """vmbk continues the chain of the previous night when it is in today's ISO week."""
    same_week = previous is not None and previous[0].isocalendar()[:2] == day.isocalendar()[:2]
    if same_week:
        assert previous is not None
        assert (plan["action"], plan["target"]) == ("inc", previous[1]), (day, plan["reasons"])
    else:
        assert (plan["action"], plan["target"]) == ("full", day.strftime("%G-W%V")), (day, plan["reasons"])


def expect_retention(tree: dict[str, Any], removed: list[str], today: dt.date) -> None:
    """The directories removed are those whose backups are not in the 2 newest ISO weeks."""
    week = {rel: max(dt.date.fromisoformat(t[:10]) for c in (spec, *spec.get("archives", {}).values())
                     for t in c.get("times", [])).isocalendar()[:2]
            for rel, spec in tree.items() if spec.get("times")}
    newest = sorted(set(week.values()))[-2:]
    assert removed == sorted(rel for rel, w in week.items() if w not in newest)
    assert today.isocalendar()[:2] in newest or not any(w == today.isocalendar()[:2] for w in week.values())


def cases() -> list[tuple[int, str]]:
    return [(y, d) for y in YEARS for d in DIRECTIONS]


@pytest.fixture(scope="module")
def golden() -> dict[str, Any]:
    return json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}


@pytest.mark.parametrize(("year", "direction"), cases(), ids=lambda v: str(v))
def test_new_year(year: int, direction: str, tmp_path: Path, golden: dict[str, Any]) -> None:
    got = run_boundary(tmp_path, year, direction)
    key = f"{year}/{year + 1} {direction}"
    if REGEN:
        golden[key] = got
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(dict(sorted(golden.items())), indent=1) + "\n")
    assert got == golden[key], key


def test_the_golden_file_covers_every_boundary_date() -> None:
    """Every day of 2019-12-26..2031-01-10 whose two names differ is a vmbk night in one direction."""
    data = json.loads(GOLDEN.read_text())
    assert len(data) == len(cases())
    vmbk_nights = {d for case in data.values() for d, n in case["nights"].items() if n["tool"] == "vmbk"}
    differing = [d for y in YEARS for i in range(16)
                 if (d := dt.date(y, 12, 26) + dt.timedelta(days=i)).strftime("%Y-W%V") != d.strftime("%G-W%V")]
    assert len(differing) == 21
    assert {d.isoformat() for d in differing} <= vmbk_nights
