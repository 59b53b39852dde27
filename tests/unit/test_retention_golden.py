"""Golden cases of retention: tests/golden/retention/*.json.

As the planner's (test_plan_golden.py): each case describes a VM's tree
(the same chain descriptions, materialised as real files and read by the
real scanner), optionally catalogue rows, a policy, settings and a time;
`vmbk.rotate.facts.gather` and the pure rules of `vmbk.policy.retention`
decide, and the whole `Decision` is compared.

A single case has ``expect``.  A case with ``prune`` runs
`retention.prune` on that target (``expect_error``: the message it fails
with).  A walkthrough (``days``) simulates a VM backed up every day:
the planner plans on the tree (`apply_plan` does what vmbk-backup would),
then retention decides on the tree the backup left and its removals are
applied; ``policies`` changes the policy on given days, ``expect`` lists
the chain directories on given days, and invariants are checked after
every day.

``catalogue``: {period: iso} -> a real catalogue with one successful
backup of that period starting then.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from test_plan_golden import _vm, apply_plan, listing, materialise, materialise_chain, ts

from vmbk.catalogue import Catalogue
from vmbk.config import Config, Retention
from vmbk.errors import VmbkError
from vmbk.planner import plan_vm
from vmbk.policy import retention
from vmbk.policy.retention import ARCHIVE, PERIOD, Decision
from vmbk.rotate.facts import gather
from vmbk.rotate.history import History
from vmbk.tree import scan_vm
from vmbk.tree.names import archive_date, period_days

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "retention"
CASES = sorted(GOLDEN.glob("*.json"))
VM = "my-vm"
UUID = "6f1c2a3e-0000-4000-8000-000000000001"
REGEN = os.environ.get("VMBK_GOLDEN_REGEN") == "1"


def catalogue(root: Path, rows: dict[str, str]) -> None:
    with Catalogue.open(root) as cat:
        cat.start_session("golden", "vmbk-backup")
        for period, at in rows.items():
            cat.insert("vm_backups", {"session_id": "golden", "vm": VM, "action": "full", "outcome": "ok",
                                      "period": period, "started_at": at})


def facts_of(root: Path) -> retention.TreeFacts:
    return gather(scan_vm(root, VM), History(root, write=False).last_backups(VM))


def as_dict(d: Decision) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(d)))


def decide(tmp: Path, case: dict[str, Any]) -> dict[str, Any]:
    root = tmp / "backup"
    materialise(root, VM, UUID, case.get("tree", {}))
    if case.get("catalogue"):
        catalogue(root, case["catalogue"])
    now = dt.datetime.fromisoformat(case["now"])
    ret = Retention(**case.get("retention", {}))
    facts = facts_of(root)
    if "prune" in case:
        return as_dict(retention.prune(facts, retention.parse_target(case["prune"]), case["policy"], ret, now))
    return as_dict(retention.decide(facts, case["policy"], ret, now, target=case.get("target")))


def _regen(path: Path, case: dict[str, Any], key: str, value: Any) -> None:
    case[key] = value
    path.write_text(json.dumps(case, indent=2, ensure_ascii=False) + "\n")


@pytest.mark.parametrize("path", [p for p in CASES if "days" not in json.loads(p.read_text())], ids=lambda p: p.stem)
def test_single_case(path: Path, tmp_path: Path) -> None:
    case = json.loads(path.read_text())
    if "expect_error" in case:
        with pytest.raises(VmbkError) as e:
            decide(tmp_path, case)
        assert str(e.value) == case["expect_error"], path.name
        return
    got = decide(tmp_path, case)
    if REGEN and got != case.get("expect"):
        _regen(path, case, "expect", got)
    assert got == case["expect"], f"{path.name}: {case['description']}"


# -- walkthroughs ---------------------------------------------------------------


def remove(tree: dict[str, Any], rel: str) -> None:
    """Apply one removal to a tree description."""
    period, sep, name = rel.rpartition("/.archives/")
    if rel.startswith(".archives/"):
        del tree["."]["archives"][rel.split("/", 1)[1]]
    elif sep:
        del tree[period]["archives"][name]
    else:
        del tree[rel]


def dirs(tree: dict[str, Any]) -> list[str]:
    """The chain directories of a description that hold data, archives included."""
    out = []
    for rel, spec in tree.items():
        if spec.get("times"):
            out.append(rel)
        for name, a in spec.get("archives", {}).items():
            if a.get("times"):
                out.append(f"{rel}/.archives/{name}" if rel != "." else f".archives/{name}")
    return sorted(out)


@pytest.mark.parametrize("path", [p for p in CASES if "days" in json.loads(p.read_text())], ids=lambda p: p.stem)
def test_walkthrough(path: Path, tmp_path: Path) -> None:
    case = json.loads(path.read_text())
    ret = Retention(**case.get("retention", {}))
    cfg = Config(instance="golden", source=None, retention=ret)
    tree: dict[str, Any] = copy.deepcopy(case.get("tree", {}))
    vm = _vm(case["vm"])
    root = tmp_path / "backup"
    materialise(root, VM, UUID, tree)
    start = dt.datetime.fromisoformat(case["start"])
    got: dict[str, list[str]] = {}
    removed_log: dict[str, list[str]] = {}
    policy = None
    for day in range(case["days"]):
        now = start + dt.timedelta(days=day)
        date = now.date().isoformat()
        policy = case["policies"].get(date, policy)
        for d in vm["disks"]:
            d["mtime"] = ts(now.isoformat()) - 60
        plan = plan_vm({**vm, "policy": policy}, cfg, root, now)[0].to_dict()
        apply_plan(tree, vm, plan, now.isoformat())
        sync(root, tree, {plan["target"], plan["archive_from"]} - {None})
        facts = facts_of(root)
        d = retention.decide(facts, policy, ret, now, target=plan["target"])
        check_invariants(d, facts, policy, ret, now, plan["target"])
        for r in d.removed:
            remove(tree, r.rel)
            shutil.rmtree(root / VM / r.rel)
        if d.removed:
            removed_log[date] = [r.rel for r in d.removed]
        if date in case["expect"]:
            got[date] = dirs(tree)
    # restore points of each archived chain of the VM directory (where the accumulate limit falls)
    points = {f".archives/{n}": len(a["times"]) for n, a in tree.get(".", {}).get("archives", {}).items()}
    if REGEN and (got != case["expect"] or removed_log != case.get("removed")
                  or points != case.get("archive_points", points)):
        case["expect"], case["removed"] = got, removed_log
        if "archive_points" in case:
            case["archive_points"] = points
        _regen(path, case, "expect", got)
    assert got == case["expect"], path.name
    assert removed_log == case["removed"], path.name
    assert points == case.get("archive_points", points), path.name
    final = tmp_path / "final"
    materialise(final, VM, UUID, tree)
    assert listing(root) == listing(final), "the tree kept in step is the tree described"


def sync(root: Path, tree: dict[str, Any], rels: set[str]) -> None:
    """Write the chains ``rels`` of the description again (what a backup changed)."""
    for rel in rels:
        d = root / VM / rel
        if rel == ".":
            for p in d.iterdir():
                if p.is_file():
                    p.unlink()
                elif p.name in ("checkpoints", ".archives"):
                    shutil.rmtree(p)
        else:
            shutil.rmtree(d, ignore_errors=True)
        materialise_chain(d, tree.get(rel, {}), VM, UUID)


def check_invariants(d: Decision, facts: retention.TreeFacts, policy: str, ret: Retention, now: dt.datetime,
                     target: str) -> None:
    """What must hold whatever the day: the rules and guards, restated simply."""
    units = {u.rel: u for u in (*facts.periods, *facts.archives)}
    assert sorted(units) == sorted([k.rel for k in d.kept] + [r.rel for r in d.removed]
                                   + [p.rel for p in d.protected]), "every directory has one decision"
    newest = facts.newest_complete()
    for r in d.removed:
        u = units[r.rel]
        assert r.rel != target and not target.startswith(r.rel + "/")
        assert u.newest_complete is None or newest is None or u.newest_complete < newest
        if r.tier == retention.ORPHAN:
            assert u.policy != policy
            assert now.timestamp() - last_backup(u, now) >= ret.orphan_max_age * 86400
        else:
            assert r.tier == retention.COUNT and (u.policy == policy or u.kind == ARCHIVE)
    keep = ret.keep(policy)
    if policy in ("daily", "weekly", "monthly"):
        mine = [u for u in facts.periods if u.policy == policy and u.backups and u.rel not in {r.rel for r in d.removed}]
        assert len(mine) <= keep + len([p for p in d.protected if units[p.rel].policy == policy])
    if policy == "never":
        assert not d.removed
    assert all(r.kind in (PERIOD, ARCHIVE) for r in d.removed)


def test_every_case_is_checked() -> None:
    assert len(CASES) >= 15
    for p in CASES:
        case = json.loads(p.read_text())
        assert case.get("description"), p.name
        if "days" in case:
            assert case["expect"] and "removed" in case, p.name
        elif "expect_error" not in case:
            assert set(case["expect"]) == {f.name for f in dataclasses.fields(Decision)}, p.name


def last_backup(u: retention.Unit, now: dt.datetime) -> float:
    """The unit's last backup, never after the end of its period (or its archive's day)."""
    if u.kind == PERIOD:
        end = period_days(u.rel)[1]  # type: ignore[index]
    else:
        end = archive_date(u.name) + dt.timedelta(days=1)  # type: ignore[operator]
    bound = dt.datetime(end.year, end.month, end.day, tzinfo=now.tzinfo).timestamp()
    return bound if u.last_backup is None else min(u.last_backup, bound)
