"""Golden cases of the planner: tests/golden/plan/*.json.

Each case describes a VM (a ``vm`` record), its backup tree and a policy
and time; the tree is materialised as real files (``.data`` files with a
valid stream meta header and nothing else, ``.cpt``, checkpoint and
vmconfig XML, ``.partial`` leftovers) and run through the real scanner
(`vmbk.tree.scan_vm`) and `vmbk.policy.decide`, through `vmbk.planner.plan_vm`.

A single case has ``expect``: the whole plan, every field compared.  A
walkthrough (vmrestore guide, section 10) has ``steps``: each step's
decision is applied to the described tree by `apply_plan` -- a tiny
simulation of vmbk-backup -- before the next step, and ``final_files``
is the guide's "Resulting Directory Structure".

Chain description (all keys optional)::

    {"base": "full"|"copy"|null,        default: full when "disks" is given
     "disks": {"vda": virtual_size},     full (or copy) disks
     "copy_disks": {"vdb": size},        copy-only disks of a full chain
     "times": [iso, ...],                one per restore point (file mtimes)
     "cpt": [...] | "corrupt" | "absent",  default: virtnbdbackup.0..N-1
     "xml": [...],                       checkpoints/*.xml (default: all)
     "uuid": "...", "name": "...",       vmconfig identity (default: the VM's)
     "partials": [...], "drop": [...],   leftover .partial files; files to delete
     "garbage": [...],                   data files whose header is broken
     "meta": {file: {key: value}},       meta overrides
     "archives": {"chain-YYYY-MM-DD": chain}}
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

from vmbk.commands import plan as plan_cmd
from vmbk.commands._common import parse_now
from vmbk.config import Config, Retention
from vmbk.errors import VmError
from vmbk.planner import plan_vm
from vmbk.policy import Plan

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "plan"
CASES = sorted(GOLDEN.glob("*.json"))


def ts(iso: str) -> float:
    return dt.datetime.fromisoformat(iso).timestamp()


# -- materialising a described tree -----------------------------------------


def stream_file(path: Path, meta: dict[str, Any], mtime: float) -> None:
    """A .data file: meta frame + stop frame, as virtnbdbackup lays them out."""
    js = json.dumps(meta, indent=4).encode()
    with open(path, "wb") as f:
        f.write(b"meta %016x %016x\r\n" % (0, len(js)) + js + b"\r\n")
        f.write(b"stop %016x %016x\r\n" % (0, 0))
    os.utime(path, (mtime, mtime))


def _meta(disk: str, size: int, cpt: str, parent: str, inc: bool, date: str) -> dict[str, Any]:
    return {"virtualSize": size, "dataSize": 0, "date": date, "diskName": disk, "diskFormat": "qcow2",
            "checkpointName": cpt, "compressed": False, "compressionMethod": "lz4",
            "parentCheckpoint": parent, "incremental": inc, "streamVersion": 2}


def vmconfig(name: str, uuid: str) -> str:
    return f"<domain type='kvm'><name>{name}</name><uuid>{uuid}</uuid></domain>\n"


def materialise_chain(d: Path, spec: dict[str, Any], vm: str, uuid: str) -> None:
    d.mkdir(parents=True, exist_ok=True)
    base = spec.get("base", "full" if "disks" in spec else None)
    times = spec.get("times", [])
    name, ident = spec.get("name", vm), spec.get("uuid", uuid)
    overrides = spec.get("meta", {})

    def write(fname: str, meta: dict[str, Any], when: str) -> None:
        meta.update(overrides.get(fname, {}))
        stream_file(d / fname, meta, ts(when))

    cpts = [f"virtnbdbackup.{i}" for i in range(len(times))]
    if base == "full":
        for disk, size in spec["disks"].items():
            write(f"{disk}.full.data", _meta(disk, size, cpts[0], "", False, times[0]), times[0])
            for i in range(1, len(times)):
                write(f"{disk}.inc.{cpts[i]}.data", _meta(disk, size, cpts[i], cpts[i - 1], True, times[i]), times[i])
        for disk, size in spec.get("copy_disks", {}).items():
            write(f"{disk}.copy.data", _meta(disk, size, cpts[0], "", False, times[0]), times[0])
        for i, c in enumerate(cpts):
            (d / f"vmconfig.{c}.xml").write_text(vmconfig(name, ident))
    elif base == "copy":
        for disk, size in {**spec["disks"], **spec.get("copy_disks", {})}.items():
            write(f"{disk}.copy.data", _meta(disk, size, "virtnbdbackup.0", "", False, times[0]), times[0])
        (d / "vmconfig.copy.xml").write_text(vmconfig(name, ident))
    cpt = spec.get("cpt", cpts if base == "full" else "absent")
    if cpt == "corrupt":
        (d / f"{name}.cpt").write_text('["virtnbdbackup.0", ')
    elif cpt != "absent":
        (d / f"{name}.cpt").write_text(json.dumps(cpt))
    xmls = spec.get("xml", cpts if base == "full" else [])
    if xmls:
        (d / "checkpoints").mkdir(exist_ok=True)
        for c in xmls:
            (d / "checkpoints" / f"{c}.xml").write_text(f"<domaincheckpoint><name>{c}</name></domaincheckpoint>\n")
    for p in spec.get("partials", []):
        (d / p).write_bytes(b"meta 0000")
    for g in spec.get("garbage", []):
        st = (d / g).stat()
        (d / g).write_bytes(b"this is not a stream header at all.....\r\n")
        os.utime(d / g, (st.st_mtime, st.st_mtime))
    for f in spec.get("drop", []):
        (d / f).unlink()
    for aname, aspec in spec.get("archives", {}).items():
        materialise_chain(d / ".archives" / aname, aspec, vm, uuid)


def materialise(root: Path, vm: str, uuid: str, tree: dict[str, Any], others: dict[str, Any] | None = None) -> None:
    (root / vm).mkdir(parents=True, exist_ok=True)
    for rel, spec in tree.items():
        materialise_chain(root / vm / rel, spec, vm, uuid)
    for other, otree in (others or {}).items():
        for rel, spec in otree.items():
            materialise_chain(root / other / rel, spec, other, uuid)


def plan_for(tmp: Path, case: dict[str, Any], vm_rec: dict[str, Any], tree: dict[str, Any], now: str) -> dict[str, Any]:
    root = tmp / "backup"
    materialise(root, vm_rec["name"], vm_rec.get("uuid", ""), tree, case.get("others"))
    cfg = Config(instance="golden", source=None, retention=Retention(**case.get("retention", {})))
    if case.get("policy"):
        vm_rec = {**vm_rec, "policy": case["policy"]}
    plan, _tree = plan_vm(vm_rec, cfg, root, dt.datetime.fromisoformat(now))
    return plan.to_dict()


# -- simulating the backup of a plan ------------------------------------------


def apply_plan(tree: dict[str, Any], vm: dict[str, Any], plan: dict[str, Any], now: str) -> None:
    """What vmbk-backup would leave behind, on the description and the VM."""
    target = plan["target"]
    if plan["action"] == "skip":
        return
    for p in plan["cleanup"]:
        rel, _, name = p.rpartition("/")
        tree[rel or "."]["partials"].remove(name)
    if plan["archive"]:
        src = plan["archive_from"]
        spec = tree.pop(src)
        kept = spec.pop("archives", {})
        kept[plan["archive_to"].rpartition("/")[2]] = spec
        tree[src] = {"archives": kept}
    sizes = {d["target"]: d.get("virtual_size") for d in vm["disks"]}
    modes = {d["target"]: d["mode"] for d in plan["disks"]}
    old = tree.get(target, {})
    if plan["action"] in ("full", "copy"):
        new: dict[str, Any] = {"base": plan["action"], "times": [now],
                               "disks": {t: sizes[t] for t, m in modes.items() if m == plan["action"]},
                               "copy_disks": {t: sizes[t] for t, m in modes.items() if m == "copy"
                                              and plan["action"] == "full"}}
        if "archives" in old:
            new["archives"] = old["archives"]
        tree[target] = new
    elif plan["action"] == "inc":
        old["times"].append(now)
    checkpoints = vm.setdefault("checkpoints", [])
    if plan["action"] == "full":
        checkpoints[:] = [c for c in checkpoints if c not in plan["delete_checkpoints"]] + [plan["checkpoint"]]
    elif plan["action"] == "inc":
        checkpoints.extend(c for c in plan["redefine_checkpoints"] if c not in checkpoints)
        checkpoints.append(plan["checkpoint"])
    for d in vm["disks"]:
        if modes.get(d["target"]) in ("full", "inc"):
            d["bitmaps"] = [{"name": c, "flags": ["in-use", "auto"]} for c in checkpoints]


def listing(root: Path) -> list[str]:
    """Data files, .cpt and checkpoint XML under ``root`` (what the guide shows)."""
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and (p.suffix in (".data", ".cpt") or p.parent.name == "checkpoints"):
            out.append(rel)
    return out


# -- the tests ----------------------------------------------------------------


def _vm(rec: dict[str, Any]) -> dict[str, Any]:
    return {"type": "vm", "v": 1, **copy.deepcopy(rec)}


@pytest.mark.parametrize("path", [p for p in CASES if "steps" not in json.loads(p.read_text())], ids=lambda p: p.stem)
def test_single_case(path: Path, tmp_path: Path) -> None:
    case = json.loads(path.read_text())
    got = plan_for(tmp_path, case, _vm(case["vm"]), case.get("tree", {}), case["now"])
    assert got == case["expect"], f"{path.name}: {case['description']}"


@pytest.mark.parametrize("path", [p for p in CASES if "steps" in json.loads(p.read_text())], ids=lambda p: p.stem)
def test_walkthrough(path: Path, tmp_path: Path) -> None:
    case = json.loads(path.read_text())
    tree: dict[str, Any] = copy.deepcopy(case.get("tree", {}))
    vm = _vm(case["vm"])
    for i, step in enumerate(case["steps"]):
        vm.update(copy.deepcopy(step.get("vm", {})))
        mtime = step.get("mtime", step["now"] if vm["state"] == "running" else None)
        if mtime is not None:
            for d in vm["disks"]:
                d["mtime"] = ts(mtime) - (60 if mtime == step["now"] else 0)
        got = plan_for(tmp_path / f"step{i}", case, vm, tree, step["now"])
        want = step["expect"]
        assert {k: got[k] for k in want} == want, f"{path.name} step {i} ({step['now']}): {got['reasons']}"
        apply_plan(tree, vm, got, step["now"])
    final = tmp_path / "final"
    materialise(final, vm["name"], vm.get("uuid", ""), tree)
    assert sorted(listing(final / vm["name"])) == sorted(case["final_files"])  # as strings: chain-D.1 before chain-D/


def test_every_case_is_checked() -> None:
    assert len(CASES) >= 20
    for p in CASES:
        case = json.loads(p.read_text())
        assert case.get("description"), p.name
        if "steps" in case:
            for step in case["steps"]:
                assert {"action", "target", "archive_to", "checkpoint"} <= set(step["expect"]), p.name
        else:
            assert set(case["expect"]) == {f.name for f in dataclasses.fields(Plan)}, p.name


def test_a_case_through_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """vmbk-plan main() in-process: stdin vm records -> stdout plan records."""
    case = json.loads((GOLDEN / "weekly-tuesday-inc.json").read_text())
    root = tmp_path / "backup"
    materialise(root, case["vm"]["name"], case["vm"]["uuid"], case["tree"])
    monkeypatch.setenv("VMBK_CONFIG_DIR", str(tmp_path / "etc"))
    monkeypatch.delenv("VMBK_INSTANCE", raising=False)
    passing = {"type": "note", "v": 1, "session": "S1", "text": "passes through"}
    stdin = io.StringIO("\n".join(json.dumps(r) for r in (passing, {**_vm(case["vm"]), "session": "S1"})) + "\n")
    stdout = io.StringIO()
    rc = plan_cmd.main(["--backup-path", str(root), "--now", case["now"], "--json"], stdin, stdout)
    assert rc == 0
    out = [json.loads(line) for line in stdout.getvalue().splitlines()]
    assert out[0] == passing
    rec = out[1]
    assert rec["type"] == "plan" and rec["session"] == "S1" and rec["name"] == "my-vm"
    assert rec["vm"]["disks"] == case["vm"]["disks"]
    assert rec["vm_dir"] == str(root / "my-vm")
    assert rec["target_dir"] == str(root / "my-vm" / "2026-W10")
    assert rec["now"] == "2026-03-03T22:00:00+00:00"
    for key, value in case["expect"].items():
        if key != "error":
            assert rec[key] == value, key
    assert "error" not in rec


def test_the_command_reports_a_vm_it_cannot_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMBK_CONFIG_DIR", str(tmp_path / "etc"))
    (tmp_path / "backup").mkdir()
    recs = [{"type": "vm", "v": 1, "name": "odd", "state": "crashed", "policy": "weekly",
             "disks": [{"target": "vda", "device": "disk", "format": "qcow2"}]},
            {"type": "vm", "v": 1, "name": "ok", "state": "shut off", "policy": "never", "disks": []}]
    stdin = io.StringIO("".join(json.dumps(r) + "\n" for r in recs))
    stdout = io.StringIO()
    rc = plan_cmd.main(["--backup-path", str(tmp_path / "backup"), "--now", "2026-03-02T22:00:00"], stdin, stdout)
    out = [json.loads(line) for line in stdout.getvalue().splitlines()]
    assert rc == 9  # partial: one VM failed, one was planned
    assert out[0]["type"] == "error" and out[0]["vm"] == "odd" and "crashed" in out[0]["message"]
    assert out[1]["type"] == "plan" and out[1]["action"] == "skip" and out[1]["reasons"] == ["policy is 'never'"]


@pytest.mark.parametrize("name", ["..", ".", "_state", "a/b"])
def test_names_that_are_not_directories_are_refused(name: str, tmp_path: Path) -> None:
    rec = {"type": "vm", "v": 1, "name": name, "state": "running", "policy": "weekly", "disks": []}
    with pytest.raises(VmError, match="backup directory name"):
        plan_vm(rec, Config(instance="t", source=None), tmp_path, dt.datetime(2026, 3, 2, tzinfo=dt.timezone.utc))


def test_plan_never_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    case = json.loads((GOLDEN / "partial-leftover.json").read_text())
    root = tmp_path / "backup"
    materialise(root, case["vm"]["name"], case["vm"]["uuid"], case["tree"])
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    monkeypatch.setenv("VMBK_CONFIG_DIR", str(tmp_path / "etc"))
    stdin = io.StringIO(json.dumps(_vm(case["vm"])) + "\n")
    assert plan_cmd.main(["--backup-path", str(root), "--now", case["now"]], stdin, io.StringIO()) == 0
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before


def test_now_must_be_iso(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMBK_CONFIG_DIR", str(tmp_path / "etc"))
    err = io.StringIO()
    rc = plan_cmd.cli.run(plan_cmd.__doc__ or "", plan_cmd.body, ["--now", "yesterday", "--backup-path", str(tmp_path)],
                          io.StringIO(""), io.StringIO(), prog=plan_cmd.PROG, stderr=err)
    assert rc == 7 and "ISO 8601" in err.getvalue()


def test_periods_follow_the_hosts_calendar(monkeypatch: pytest.MonkeyPatch) -> None:
    """01:30 on Monday in Sydney is still Sunday in UTC: vmbackup (``date``) uses Monday's week."""
    import time

    from vmbk.tree.names import period_id

    monkeypatch.setenv("TZ", "Australia/Sydney")
    time.tzset()
    try:
        now = parse_now("2026-11-23T01:30:00")  # a Monday, local time
        assert now.utcoffset() is not None and period_id("weekly", now) == "2026-W48"
        assert period_id("weekly", parse_now("2026-11-22T14:30:00+00:00")) == "2026-W48"  # same instant
        assert period_id("daily", parse_now("2026-11-30T23:30:00+00:00")) == "20261201"
        assert period_id("monthly", parse_now("2026-11-30T23:30:00+00:00")) == "202612"
    finally:
        monkeypatch.setenv("TZ", "UTC")
        time.tzset()
