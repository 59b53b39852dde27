"""vmbk-rotate in process: the stage, --vm/--all, --prune, the catalogue, the guards
that are not decisions (lock, links, depth), what a killed run left, --dry-run.

Trees are materialised as in the golden cases (test_plan_golden.materialise)
and read by the real scanner; the decisions themselves are golden-tested in
test_retention_golden.py.
"""

from __future__ import annotations

import io
import os
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest
from test_plan_golden import materialise

from vmbk.catalogue import db_path
from vmbk.commands import rotate
from vmbk.errors import Exit, StorageError
from vmbk.lock import VmLock
from vmbk.tree import ops, scan_vm

NOW = "2026-04-08T22:00:00+00:00"
HOSTILE = "web 'q' \"dq\" ü ..x"


def t(day: str, hour: int = 22) -> str:
    return f"{day}T{hour:02d}:00:00+00:00"


def chain(*days: str, **kw: Any) -> dict[str, Any]:
    return {"disks": {"vda": 1 << 30}, "times": [t(d) for d in days], **kw}


def daily_tree(first: int = 1, last: int = 8) -> dict[str, Any]:
    return {f"202604{d:02d}": chain(f"2026-04-{d:02d}") for d in range(first, last + 1)}


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "default.toml").write_text('policy = "daily"\n')
    monkeypatch.setenv("VMBK_CONFIG_DIR", str(etc))
    monkeypatch.delenv("VMBK_INSTANCE", raising=False)
    root = tmp_path / "backup"
    root.mkdir()
    return root


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def run(root: Path, *argv: str, stdin: str | io.StringIO = "", tty: bool = False) -> tuple[int, list[dict]]:
    out = TTY() if tty else io.StringIO()
    inp = stdin if isinstance(stdin, io.StringIO) else io.StringIO(stdin)
    code = rotate.main(["--backup-path", str(root), "--now", NOW, *([] if tty else ["--json"]), *argv], inp, out)
    if tty:
        return code, [{"table": out.getvalue()}]
    return code, [orjson.loads(line) for line in out.getvalue().splitlines()]


def backup_rec(root: Path, vm: str, target: str | None, outcome: str = "ok") -> dict[str, Any]:
    return {"type": "backup", "v": 1, "session": "S1", "name": vm, "action": "full", "period": target,
            "target_dir": str(root / vm / target) if target else None, "outcome": outcome}


def periods(root: Path, vm: str = "my-vm") -> list[str]:
    return sorted(p.name for p in (root / vm).iterdir())


def snapshot(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*")}


# -- the stage ------------------------------------------------------------------


def test_a_backup_record_is_passed_on_as_read_then_its_vm_rotated(root: Path) -> None:
    materialise(root, "my-vm", "u1", daily_tree())
    line = orjson.dumps(backup_rec(root, "my-vm", "20260408")).decode().replace(",", ", ") + "\n"
    note = '{"type":"note","v":1,"session":"S1"}\n'
    out = io.StringIO()
    code = rotate.main(["--json", "--backup-path", str(root), "--now", NOW], io.StringIO(note + line), out)
    lines = out.getvalue().splitlines(keepends=True)
    assert code == 0
    assert lines[:2] == [note, line]  # passed on first, byte for byte
    rec = orjson.loads(lines[2])
    assert (rec["type"], rec["session"], rec["name"], rec["policy"], rec["keep"]) == ("rotate", "S1", "my-vm", "daily", 7)
    assert [(r["path"], r["kind"], r["tier"]) for r in rec["removed"]] == [
        (str(root / "my-vm" / "20260401"), "period", "count")]
    assert rec["freed_bytes"] == rec["removed"][0]["bytes"] > 0
    assert rec["dry_run"] is False and rec["prune"] is None and rec["finished"] == []
    assert len(rec["kept"]) == 7 and all(k["why"] for k in rec["kept"])
    assert periods(root) == [f"202604{d:02d}" for d in range(2, 9)]


def test_skipped_and_dry_run_backups_are_rotated_other_outcomes_not(root: Path) -> None:
    materialise(root, "my-vm", "u1", daily_tree())
    recs = [backup_rec(root, "my-vm", None, "dry-run"), backup_rec(root, "my-vm", None, "frobnicated")]
    code, out = run(root, stdin="".join(orjson.dumps(r).decode() + "\n" for r in recs))
    assert code == 0
    assert [r["type"] for r in out] == ["backup", "rotate", "backup"]
    assert out[1]["dry_run"] is True and out[1]["removed"] and out[1]["freed_bytes"]
    assert len(periods(root)) == 8  # a dry-run backup's rotation is a dry run
    code, out = run(root, stdin=orjson.dumps(backup_rec(root, "my-vm", None, "skipped")).decode() + "\n")
    assert code == 0 and out[1]["type"] == "rotate" and not out[1]["dry_run"] and len(periods(root)) == 7


def test_dry_run_writes_nothing_at_all(root: Path) -> None:
    materialise(root, "my-vm", "u1", {**daily_tree(), "2025-W01": chain("2025-01-01")})
    before = snapshot(root)
    code, out = run(root, "--dry-run", stdin=orjson.dumps(backup_rec(root, "my-vm", "20260408")).decode() + "\n")
    assert code == 0
    assert {r["path"].rsplit("/", 1)[1] for r in out[1]["removed"]} == {"20260401", "2025-W01"}
    assert out[1]["dry_run"] is True
    assert snapshot(root) == before and not (root / "_state").exists()  # no catalogue, no lock file either


def test_a_held_lock_is_an_error_record_and_the_other_vms_go_on(root: Path) -> None:
    materialise(root, "my-vm", "u1", daily_tree())
    materialise(root, "other", "u2", daily_tree())
    with VmLock(root, "my-vm"):
        recs = [backup_rec(root, "my-vm", "20260408"), backup_rec(root, "other", "20260408")]
        code, out = run(root, stdin="".join(orjson.dumps(r).decode() + "\n" for r in recs))
    assert code == Exit.PARTIAL
    assert [(r["type"], r.get("name") or r.get("vm")) for r in out] == [
        ("backup", "my-vm"), ("error", "my-vm"), ("backup", "other"), ("rotate", "other")]
    assert out[1]["kind"] == "lock" and out[1]["code"] == 3 and out[1]["stage"] == "vmbk-rotate"
    assert len(periods(root, "my-vm")) == 8 and len(periods(root, "other")) == 7


def test_standalone_vm_and_all(root: Path) -> None:
    materialise(root, HOSTILE, "u1", daily_tree())
    materialise(root, "b", "u2", daily_tree(3, 8))
    (root / "lost+found").mkdir()
    code, out = run(root, "--vm", HOSTILE)
    assert code == 0 and [(r["type"], r["name"], len(r["removed"])) for r in out] == [("rotate", HOSTILE, 1)]
    materialise(root, HOSTILE, "u1", {"20260331": chain("2026-03-31")})
    code, out = run(root, "--all", "--dry-run")
    assert code == 0 and [(r["name"], len(r["removed"])) for r in out] == [("b", 0), (HOSTILE, 1)]
    code, out = run(root, "--vm", "typo,b")
    assert code == Exit.PARTIAL and [(r["type"], r.get("kind")) for r in out] == [("error", "vm"), ("rotate", None)]
    assert out[0]["message"] == f"no backups of VM 'typo' under {root}" and not (root / "typo").exists()


def test_a_vm_name_that_is_not_a_directory_name_or_a_link_is_refused(root: Path, tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (root / "link").symlink_to(tmp_path / "elsewhere")
    code, out = run(root, "--vm", "_state,link")
    assert code == Exit.GENERAL  # two different failures
    assert [(r["vm"], r["kind"]) for r in out] == [("_state", "vm"), ("link", "storage")]
    assert "symbolic link" in out[1]["message"]


def test_the_catalogue_records_decisions_deletions_and_tombstones(root: Path) -> None:
    tree = daily_tree()
    tree["20260401"]["archives"] = {"chain-2026-04-01": chain("2026-03-31", "2026-04-01", hour=1)}
    materialise(root, "my-vm", "u1", tree)
    code, out = run(root, "--vm", "my-vm")
    assert code == 0 and [r["path"] for r in out[0]["removed"]] == [str(root / "my-vm" / "20260401")]
    db = sqlite3.connect(db_path(root))
    events = db.execute("SELECT action, tier, target_type, target_path, rotation_policy, retention_limit, "
                        "triggered_by, success FROM retention_events").fetchall()
    assert events == [("delete", "count", "period", "20260401", "daily", 7, "rotate", 1)]
    tombs = db.execute("SELECT chain, period, restore_points, status, deleted_at IS NOT NULL FROM deleted_chains "
                       "ORDER BY chain").fetchall()
    assert tombs == [("20260401", "20260401", 1, "deleted", 1),
                     ("20260401/.archives/chain-2026-04-01", "20260401", 2, "deleted", 1)]
    ops_ = db.execute("SELECT operation, path, file_type, success FROM file_operations").fetchall()
    assert ops_ == [("delete", str(root / "my-vm" / "20260401"), "directory", 1)]
    assert db.execute("SELECT command, exit_code FROM sessions").fetchall()[-1] == ("vmbk-rotate", 0)


def test_vm_backups_of_a_deleted_period_are_marked_and_no_longer_age_it(root: Path) -> None:
    from vmbk.catalogue import Catalogue

    materialise(root, "my-vm", "u1", daily_tree())
    with Catalogue.open(root) as cat:
        cat.start_session("s0", "vmbk-backup")
        for d in (1, 2):
            cat.insert("vm_backups", {"session_id": "s0", "vm": "my-vm", "action": "full", "outcome": "ok",
                                      "period": f"2026040{d}", "started_at": t(f"2026-04-0{d}")})
    assert run(root, "--vm", "my-vm")[0] == 0
    db = sqlite3.connect(db_path(root))
    rows = db.execute("SELECT period, deleted_at IS NOT NULL FROM vm_backups ORDER BY period").fetchall()
    assert rows == [("20260401", 1), ("20260402", 0)]
    from vmbk.rotate.history import History

    assert set(History(root, write=False).last_backups("my-vm")) == {"20260402"}


def test_low_space_is_said_in_the_record_and_on_stderr(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    (Path(os.environ["VMBK_CONFIG_DIR"]) / "default.toml").write_text(
        'policy = "daily"\n[retention]\nmin_free_percent = 100\n')
    materialise(root, "my-vm", "u1", daily_tree(1, 3))
    code, out = run(root, "--vm", "my-vm")
    assert code == 0 and out[0]["low_space"] is True and out[0]["removed"] == []
    assert 0 <= out[0]["free_percent"] < 100
    assert "below min_free_percent (100%)" in out[0]["warnings"][0]
    assert "below min_free_percent" in caplog.text


def test_clock_skew_refuses_and_says_why(root: Path) -> None:
    materialise(root, "my-vm", "u1", {**daily_tree(), "20270101": chain("2026-04-05")})
    materialise(root, "other", "u2", daily_tree())
    code, out = run(root, "--vm", "my-vm,other")
    assert code == Exit.PARTIAL
    assert [(r["type"], r.get("kind"), r.get("code")) for r in out] == [("error", "general", 1), ("rotate", None, None)]
    assert out[0]["message"].startswith("clock skew: 20270101 is dated after now")
    assert len(periods(root)) == 9 and len(periods(root, "other")) == 7
    db = sqlite3.connect(db_path(root))
    assert db.execute("SELECT vm, action, reason LIKE 'clock skew%' FROM retention_events "
                      "WHERE action != 'delete'").fetchall() == [("my-vm", "refuse", 1)]


def test_on_a_terminal_a_table(root: Path) -> None:
    materialise(root, "my-vm", "u1", daily_tree())
    code, out = run(root, "--vm", "my-vm", "--dry-run", tty=True)
    table = out[0]["table"]
    assert code == 0 and "NAME" in table and "FREED_BYTES" in table and "{" not in table
    assert "my-vm" in table and "daily" in table


# -- what a killed run left -------------------------------------------------------


def test_a_half_deleted_directory_is_invisible_and_finished_by_the_next_run(root: Path) -> None:
    materialise(root, "my-vm", "u1", daily_tree(2, 8))
    hidden = root / "my-vm" / ".deleting-20260401"
    materialise(root, "my-vm", "u1", {".deleting-20260401": chain("2026-04-01")})
    materialise(root, "my-vm", "u1", {"20260405": chain("2026-04-05", archives={
        ".deleting-chain-2026-04-05": chain("2026-04-05", hour=1), "chain-2026-04-05.1": chain("2026-04-05", hour=2)})})
    assert "20260401" not in scan_vm(root, "my-vm").chains  # no scan sees it
    assert [a.rel for a in scan_vm(root, "my-vm").chains["20260405"].archives] == ["20260405/.archives/chain-2026-04-05.1"]
    code, out = run(root, "--vm", "my-vm")
    assert code == 0
    assert out[0]["finished"] == [{"path": str(root / "my-vm" / "20260401")},
                                  {"path": str(root / "my-vm" / "20260405" / ".archives" / "chain-2026-04-05")}]
    assert not hidden.exists() and not (root / "my-vm" / "20260405" / ".archives" / ".deleting-chain-2026-04-05").exists()
    db = sqlite3.connect(db_path(root))
    rows = db.execute("SELECT target_path, triggered_by, success FROM retention_events ORDER BY id").fetchall()
    assert rows == [("20260401", "finish", 1), ("20260405/.archives/chain-2026-04-05", "finish", 1)]


def test_an_accumulate_archive_leaves_a_hidden_directory_where_it_is(root: Path) -> None:
    materialise(root, "acc", "u1", {".": chain("2026-04-01", "2026-04-02"), ".deleting-20260301": chain("2026-03-01")})
    ops.archive_chain(root / "acc", ".", ".archives/chain-2026-04-03", "acc")
    assert (root / "acc" / ".deleting-20260301").is_dir()
    assert not (root / "acc" / ".archives" / "chain-2026-04-03" / ".deleting-20260301").exists()


def test_rows_of_a_deletion_killed_before_its_rename_are_abandoned(root: Path) -> None:
    from vmbk.policy.retention import Decision, Removal, TreeFacts
    from vmbk.rotate.history import History

    materialise(root, "my-vm", "u1", daily_tree(1, 2))
    h = History(root, write=True)
    h.session("S0")
    d = Decision("my-vm", "daily", 7, removed=(Removal("20260401", "period", "count", 10, "why"),))
    assert h.intent("S0", d, d.removed[0], TreeFacts("my-vm"), "rotate")
    h.close()
    assert run(root, "--vm", "my-vm")[0] == 0
    db = sqlite3.connect(db_path(root))
    assert db.execute("SELECT success FROM retention_events WHERE target_path = '20260401'").fetchall() == [(0,)]


# -- the deleter's own guards -------------------------------------------------------


def test_remove_dir_refuses_links_the_vm_directory_and_escapes(root: Path, tmp_path: Path) -> None:
    materialise(root, "my-vm", "u1", daily_tree(1, 1))
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "my-vm" / "20260402").symlink_to(outside)
    (root / "linked").symlink_to(root / "my-vm")
    for vm, rel in (("my-vm", "20260402"), ("my-vm", "."), ("my-vm", ""), ("my-vm", "../other"),
                    ("my-vm", "/etc"), ("linked", "20260401"), ("_state", "locks"), ("..", "x")):
        with pytest.raises(StorageError):
            ops.remove_dir(root, vm, rel)
    with pytest.raises(StorageError):
        ops.remove_vm_dir(root, "linked")
    assert outside.exists() and (root / "my-vm" / "20260401").is_dir()
    ops.remove_dir(root, "my-vm", "20260401")
    assert not (root / "my-vm" / "20260401").exists() and not list((root / "my-vm").glob(".deleting-*"))


def test_finish_removes_links_as_links(root: Path, tmp_path: Path) -> None:
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "precious").write_text("x")
    hidden = root / "vm" / ".deleting-20260401"
    (hidden / "sub").mkdir(parents=True)
    (hidden / "sub" / "to-dir").symlink_to(keep)
    (hidden / "to-file").symlink_to(keep / "precious")
    ops.finish(hidden)
    assert not hidden.exists() and (keep / "precious").read_text() == "x"
    with pytest.raises(StorageError):
        ops.finish(keep)


# -- --prune ------------------------------------------------------------------------


def prune_tree() -> dict[str, Any]:
    return {"202602": chain("2026-02-01", archives={"chain-2026-02-10": chain("2026-02-05")}),
            "202603": chain("2026-03-01", archives={"chain-2026-03-05": chain("2026-03-02")}),
            "202604": chain("2026-04-01")}


def test_prune_list_shows_sizes_and_commands_to_paste(root: Path) -> None:
    materialise(root, HOSTILE, "u1", prune_tree())
    materialise(root, "b", "u2", {"202604": chain("2026-04-01")})
    code, out = run(root, "--prune", "list")
    assert code == 0 and not (root / "_state").exists()
    assert [(r["type"], r["name"], r["target"]) for r in out] == [
        ("prune_target", "b", "all"), ("prune_target", HOSTILE, "all"), ("prune_target", HOSTILE, "archives")]
    assert out[1]["periods"] == 3 and out[1]["archives"] == 2 and out[1]["bytes"] > out[2]["bytes"] > 0
    code, out = run(root, "--prune", "list", "--vm", HOSTILE)
    targets = [r["target"] for r in out]
    assert targets == ["all", "archives", "period:202602", "archives:202602", "period:202603", "archives:202603",
                       "period:202604", "chain:chain-2026-02-10", "chain:chain-2026-03-05"]
    assert out[2]["command"] == ("vmbk-rotate --backup-path " + str(root) + " --prune period:202602 --vm "
                                 "'web '\"'\"'q'\"'\"' \"dq\" ü ..x'")


def test_prune_in_a_pipe_needs_yes(root: Path) -> None:
    materialise(root, "my-vm", "u1", prune_tree())
    err = io.StringIO()
    code = rotate.cli.run(rotate.__doc__ or "", rotate.body, ["--backup-path", str(root), "--prune", "archives",
                                                            "--vm", "my-vm"], io.StringIO(""), io.StringIO(),
                          prog=rotate.PROG, stderr=err)
    assert code == Exit.USAGE and "--yes" in err.getvalue()
    assert len(list(root.rglob("chain-*"))) == 2
    code, out = run(root, "--prune", "archives", "--vm", "my-vm", "--yes")
    assert code == 0 and [r["tier"] for r in out[0]["removed"]] == ["prune", "prune"]
    assert out[0]["prune"] == "archives" and not list(root.rglob("chain-*"))


def test_prune_asks_on_a_terminal(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    materialise(root, "my-vm", "u1", prune_tree())
    code, _ = run(root, "--prune", "period:202602", "--vm", "my-vm", stdin=TTY("n\n"))
    assert code == 0 and (root / "my-vm" / "202602").is_dir()
    err = capsys.readouterr().err
    assert "removes:\n  my-vm: 202602" in err and "[y/N]" in err and "nothing removed" in err
    code, out = run(root, "--prune", "period:202602", "--vm", "my-vm", stdin=TTY("yes\n"))
    assert code == 0 and not (root / "my-vm" / "202602").exists()
    assert out[0]["removed"][0]["reason"] == "--prune period:202602: the period directory"


def test_prune_refusals(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    materialise(root, "my-vm", "u1", {"202603": chain("2026-03-01")})
    for argv, code, msg in (
        (["--prune", "period:202603", "--vm", "my-vm", "--yes"], Exit.VM, "the VM's last period"),
        (["--prune", "period:202501", "--vm", "my-vm", "--yes"], Exit.VM, "has no period '202501'"),
        (["--prune", "period:202603", "--yes"], Exit.USAGE, "needs exactly one --vm"),
        (["--prune", "archives", "--vm", "a,b", "--yes"], Exit.USAGE, "at most one --vm"),
        (["--prune", "bogus"], Exit.USAGE, "the target must be one of"),
        (["--prune", "archives", "--vm", "my-vm", "--yes"], Exit.VM, "has no archived chains"),
        (["--yes"], Exit.USAGE, "--yes"),
        (["--all", "--vm", "x"], Exit.USAGE, ""),
    ):
        got, _ = run(root, *argv)
        assert got == code, (argv, capsys.readouterr().err)
        assert msg in capsys.readouterr().err, argv
    assert (root / "my-vm" / "202603").is_dir()


def test_prune_all_removes_the_vm_directory(root: Path) -> None:
    materialise(root, "my-vm", "u1", prune_tree())
    code, out = run(root, "--prune", "all", "--vm", "my-vm", "--yes")
    assert code == 0 and [(r["path"], r["kind"]) for r in out[0]["removed"]] == [(str(root / "my-vm"), "vm")]
    assert not (root / "my-vm").exists() and not list(root.glob(".deleting-*"))
    db = sqlite3.connect(db_path(root))
    assert db.execute("SELECT count(*) FROM deleted_chains WHERE status = 'deleted'").fetchone()[0] == 5


def test_prune_archives_of_every_vm(root: Path) -> None:
    materialise(root, "a", "u1", prune_tree())
    materialise(root, "b", "u2", {"202604": chain("2026-04-01")})
    code, out = run(root, "--prune", "archives", "--dry-run")
    assert code == 0 and [(r["name"], len(r["removed"]), r["dry_run"]) for r in out] == [("a", 2, True)]
    assert len(list(root.rglob("chain-*"))) == 2


def test_restore_list_counts_only_live_chains_after_rotation(root: Path) -> None:
    from backup_helpers import run_restore

    tree = daily_tree()
    tree["20260402"]["archives"] = {"chain-2026-04-02": chain("2026-04-01", "2026-04-02", hour=1)}
    materialise(root, "my-vm", "u1", tree)
    materialise(root, "my-vm", "u1", {".deleting-20260331": chain("2026-03-31")})  # a killed run's
    assert run(root, "--vm", "my-vm", "--dry-run")[0] == 0
    code, recs = run_restore("--backup-path", str(root), "--list")
    assert code == 0 and (recs[0]["chains_active"], recs[0]["chains_broken"]) == (8, 0)
    assert run(root, "--vm", "my-vm")[0] == 0
    code, recs = run_restore("--backup-path", str(root), "--list")
    assert code == 0 and (recs[0]["chains_active"], recs[0]["chains_broken"], recs[0]["archived_chains"]) == (7, 0, 1)
    assert recs[0]["health"].startswith("Chains: 7 active, 0 broken")
    assert recs[0]["periods"] == [f"202604{d:02d}" for d in range(2, 9)]


def test_the_names_retention_reads() -> None:
    import datetime as dt

    from vmbk.tree import names

    d = dt.date
    assert names.period_days("20261231") == (d(2026, 12, 31), d(2027, 1, 1))
    assert names.period_days("2026-W53") == (d(2026, 12, 28), d(2027, 1, 4))  # the ISO year's last week
    assert names.period_days("202612") == (d(2026, 12, 1), d(2027, 1, 1))
    assert names.period_days("202602") == (d(2026, 2, 1), d(2026, 3, 1))
    assert names.period_days("chain-2026-01-01") is None and names.period_days("2026-W54") is None
    assert names.archive_date("chain-2026-04-01.3") == d(2026, 4, 1) and names.archive_date("chain-2026-02-30") is None
    assert sorted(["chain-2026-04-01.10", "chain-2026-04-01.2", "chain-2026-04-01", "chain-2026-03-31"],
                  key=names.archive_order) == ["chain-2026-03-31", "chain-2026-04-01", "chain-2026-04-01.2",
                                               "chain-2026-04-01.10"]
    assert names.deleted_name(names.deleting_name("2026-W14")) == "2026-W14"
    assert names.deleted_name(".deleting-") is None and names.deleted_name("2026-W14") is None
    assert not names.is_vm_dir_name(names.deleting_name("web"))


def test_rotation_goes_on_when_its_reader_goes_away(root: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    for vm in ("a", "b"):
        materialise(root, vm, "u-" + vm, daily_tree())
    src = tmp_path / "in.jsonl"
    src.write_text("".join(orjson.dumps(backup_rec(root, vm, "20260408")).decode() + "\n" for vm in ("a", "b")))
    env = {**os.environ, "PYTHONPATH": str(repo)}
    # The next stage died before rotate wrote anything: its pipe has no reader
    # (closed before the start, so the race of a small record fitting in the
    # pipe's buffer before the reader goes cannot make this pass or fail).
    r, w = os.pipe()
    os.close(r)
    with open(src, "rb") as stdin:
        p = subprocess.Popen([sys.executable, str(repo / "bin" / "vmbk-rotate"), "--json", "--backup-path", str(root),
                              "--now", NOW], stdin=stdin, stdout=w, stderr=subprocess.PIPE, env=env)
        os.close(w)
        assert p.stderr is not None
        err = p.stderr.read().decode()
        assert p.wait(60) == Exit.GENERAL, err
    assert len(periods(root, "a")) == 7 and len(periods(root, "b")) == 7  # both rotated all the same
    assert "not delivered, standard output was closed" in err
    assert "rotate of 'a'" in err and "rotate of 'b'" in err
