"""vmbk-status without libvirt: trees the restore tests build, a catalogue
with a history, the lock read without taking it, the Prometheus file
parsed back with prometheus_client's parser, and human numbers in the
terminal tables of every command (the real-backup cases are in
tests/integration/test_status_tree.py)."""

from __future__ import annotations

import datetime as _dt
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from report_helpers import history, run_cmd
from test_restore_points import three_points

from vmbk.catalogue import Catalogue
from vmbk.commands.status import main as status_main
from vmbk.errors import Exit
from vmbk.lock import VmLock, lock_path, probe
from vmbk.table import render

NOW = _dt.datetime.now(_dt.timezone.utc)


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("VMBK_CONFIG_DIR", str(tmp_path / "etc"))
    (tmp_path / "etc").mkdir()
    r = tmp_path / "backups"
    r.mkdir()
    return r


def status(root: Path, *argv: str) -> tuple[int, list[dict]]:
    code, recs, _ = run_cmd(status_main, ["--json", "--backup-path", str(root), *argv])
    return code, recs


def test_periods_by_date_junk_left_out_a_broken_chain_and_stale_by_now(root, capsys):
    three_points(root / "web" / "202602", "web")
    three_points(root / "web" / "2026-W11", "web")
    (root / "web" / "checkpoints").mkdir()  # not a period
    (root / "notes").mkdir()  # a directory without backups: not a VM's
    (root / "lost+found").mkdir()
    code, recs = status(root)
    assert code == 0 and [r["vm"] for r in recs] == ["web"]
    (r,) = recs
    assert r["periods"] == ["202602", "2026-W11"] and [c["chain"] for c in r["chains"]] == ["202602", "2026-W11"]
    assert (r["state"], r["restore_points"], r["complete_points"], r["chains_active"]) == ("ok", 6, 6, 2)
    assert r["bytes"] > 0 and r["newest_point_age_s"] < 600 and r["last_success"] is None  # no catalogue

    code, recs = status(root, "--now", (NOW + _dt.timedelta(hours=30)).isoformat())
    assert code == Exit.VM and recs[0]["state"] == "stale"
    assert "web: newest complete restore point is 30 h old (limit 26 h)" in capsys.readouterr().err
    assert status(root, "--now", (NOW + _dt.timedelta(hours=30)).isoformat(), "--stale", "48")[0] == 0

    next((root / "web" / "2026-W11").glob("*.inc.virtnbdbackup.2.data")).unlink()
    three_points(root / "db" / "202603", "db")
    code, recs = status(root)
    assert code == Exit.PARTIAL  # one VM of two
    web = next(r for r in recs if r["vm"] == "web")
    assert web["state"] == "broken" and web["chains_broken"] == 1 and web["complete_points"] == 5
    assert "virtnbdbackup.2" in " ".join(web["chains"][1]["reasons"])
    assert "web: chain 2026-W11 is broken:" in capsys.readouterr().err


def test_the_catalogue_adds_history_replication_restores_and_sessions(root, capsys):
    three_points(root / "web" / "202612", "web")
    rows = history(root, NOW, {"web": 1 << 20}, days=10)
    with Catalogue.open(root) as cat:
        run = cat.insert("replication_runs", {"session_id": None, "destination": "nas", "transport": "local",
                                              "action": "push", "started_at": NOW.isoformat(), "outcome": "ok"})
        cat.insert("replication_vms", {"run_id": run, "vm": "web", "outcome": "ok",
                                       "last_backup": (NOW - _dt.timedelta(hours=3)).isoformat()})
        for mode, outcome in (("clone", "ok"), ("drill", "failed")):
            cat.insert("restore_sessions", {"vm": "web", "mode": mode, "started_at": NOW.isoformat(),
                                            "outcome": outcome, "exit_code": 0 if outcome == "ok" else 5})
        cat.insert("vm_backups", {"session_id": rows[-1]["session_id"], "vm": "gone-wrong", "action": "full",
                                  "outcome": "failed", "error": "VM has no disk", "started_at": NOW.isoformat()})
    code, recs = status(root)
    assert code == Exit.PARTIAL and [r["vm"] for r in recs] == ["gone-wrong", "web"]
    gone, web = recs
    assert gone["state"] == "missing" and gone["path"] is None and gone["last_attempt"]["error"] == "VM has no disk"
    ok = [r for r in rows if r["outcome"] == "ok" and r["action"] != "skip"]
    assert web["last_success"]["at"] == ok[-1]["started_at"] and web["last_success"]["bytes"] == ok[-1]["bytes"]
    (rep,) = web["replication"]
    assert rep["destination"] == "nas" and rep["last_outcome"] == "ok" and rep["lag_s"] >= 0
    assert web["last_restore"]["mode"] == "clone" and web["last_drill"]["outcome"] == "failed"

    code, hist = status(root, "--sessions", "--days", "3")
    assert code == 0 and [r["type"] for r in hist] == ["session_history"] * 3
    assert [r["backed_up"] + r["failed"] + r["skipped"] for r in hist] == [1, 1, 2]  # + gone-wrong
    with Catalogue.open(root) as cat:  # a copy a signal stopped did not go well either
        for outcome in ("ok", "interrupted", "failed", "partial"):
            cat.insert("replication_runs", {"session_id": rows[-1]["session_id"], "destination": "nas",
                                            "transport": "local", "action": "push",
                                            "started_at": NOW.isoformat(), "outcome": outcome})
    code, hist = status(root, "--sessions", "--days", "3")
    assert [(r["replicated"], r["replication_failed"]) for r in hist][-1] == (1, 3)
    code, hist = status(root, "--restores")
    assert [(r["mode"], r["outcome"]) for r in hist] == [("clone", "ok"), ("drill", "failed")]
    assert status(root, "--days", "3")[0] == Exit.USAGE


def test_prometheus_file_parsed_back(root, tmp_path):
    three_points(root / "web" / "202612", "web")
    three_points(root / "db" / "202612", "db")
    next((root / "db" / "202612").glob("*.full.data")).unlink()
    history(root, NOW, {"web": 1 << 20}, days=3)
    prom = tmp_path / "textfile" / "vmbk.prom"
    prom.parent.mkdir()
    code, recs = status(root, "--prometheus", str(prom))
    assert code == Exit.PARTIAL
    assert os.listdir(prom.parent) == ["vmbk.prom"]  # written aside and renamed: nothing else left
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(prom.read_text()) for s in fam.samples}
    web, db = ("vm", "web"), ("vm", "db")
    assert [r["state"] for r in recs] == ["missing", "ok"], recs
    assert samples[("vmbk_status_ok", (web,))] == 1 and samples[("vmbk_status_ok", (db,))] == 0
    assert samples[("vmbk_state", (("state", "missing"), db))] == 1
    assert samples[("vmbk_chains", (("kind", "broken"), db))] == 1
    assert samples[("vmbk_restore_points", (web,))] == 3
    assert samples[("vmbk_backup_size_bytes", (web,))] == next(r["bytes"] for r in recs if r["vm"] == "web")
    last = next(r for r in recs if r["vm"] == "web")["last_success"]
    assert samples[("vmbk_last_success_timestamp_seconds", (web,))] == \
        _dt.datetime.fromisoformat(last["at"]).timestamp()
    assert samples[("vmbk_lock", (("state", "free"), web))] == 1
    assert ("vmbk_last_success_timestamp_seconds", (db,)) not in samples  # unknown: absent, not 0


def test_the_lock_is_read_without_taking_it(root):
    assert probe(root, "web").state == "free"
    path = lock_path(root, "web")
    path.parent.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    path.write_text(f"{dead}\nbackup\n")
    assert (probe(root, "web").state, probe(root, "web").pid) == ("stale", int(dead))
    # a live vmbk holding it: held, and the probe did not get in its way
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.argv[0] = 'vmbk-backup'; "
                               "from vmbk.lock import VmLock; l = VmLock(__import__('pathlib').Path(sys.argv[1]), "
                               "'web').acquire(); print('held', flush=True); time.sleep(30)", str(root)],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        state = probe(root, "web")
        assert state.state == "held" and state.pid == holder.pid
        path.write_text("")  # no PID (yet): the kernel's flock says held
        assert probe(root, "web").state == "held"
    finally:
        holder.kill()
        holder.wait()
    path.write_text("")
    assert probe(root, "web").state == "stale"
    with VmLock(root, "web"):
        pass  # the probe left it takeable


def test_terminal_tables_say_sizes_ages_and_durations_for_people():
    now = _dt.datetime(2026, 12, 7, 12, 0, tzinfo=_dt.timezone.utc)
    text = render([{"type": "backup_vm", "vm": "web", "size": 3_650_722_201, "last_backup": "2026-12-07T07:00:00+00:00"},
                   {"type": "backup", "name": "web", "bytes": 512, "duration": 252.0, "outcome": "failed"}], now=now)
    assert "3.4 GiB" in text and "5 h ago" in text and "512 B" in text and "4 min 12 s" in text
    assert "\033[" not in text
    coloured = render([{"type": "backup", "name": "web", "outcome": "failed"}], colour=True, now=now)
    assert "\033[31mfailed" in coloured
    status = render([{"type": "status", "vm": "web", "state": "ok", "bytes": 3 << 30, "restore_points": 4,
                      "complete_points": 3, "chains_active": 1, "chains_broken": 1,
                      "newest_point": "2026-12-06T12:00:00+00:00", "lock": "stale",
                      "last_attempt": {"at": "2026-12-07T11:00:00+00:00", "outcome": "failed"},
                      "replication": [{"destination": "nas", "last_outcome": "ok", "lag_s": 7200}]}], now=now)
    assert "3.0 GiB" in status and "24 h ago" in status and "3/4" in status and "1 active, 1 broken" in status
    assert "failed 60 min ago" in status and "nas: ok, 2 h behind" in status


def test_restore_list_on_a_terminal_shows_human_sizes(root):
    three_points(root / "web" / "202612", "web")
    r = subprocess.run(["script", "-qec", f"{sys.executable} bin/vmbk-restore --backup-path {root} --list",
                        "/dev/null"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": os.getcwd(), "TERM": "dumb"})
    assert r.returncode == 0, r.stdout
    assert " KiB" in r.stdout and " ago" in r.stdout


def test_every_field_of_the_status_records_is_documented(root):
    from contract_doc import undocumented

    three_points(root / "web" / "202612", "web")
    history(root, NOW, {"web": 1 << 20}, days=3)
    with Catalogue.open(root) as cat:
        run = cat.insert("replication_runs", {"destination": "nas", "transport": "local", "action": "push",
                                              "started_at": NOW.isoformat(), "outcome": "ok"})
        cat.insert("replication_vms", {"run_id": run, "vm": "web", "outcome": "ok", "last_backup": NOW.isoformat()})
        for mode in ("clone", "drill"):
            cat.insert("restore_sessions", {"vm": "web", "mode": mode, "started_at": NOW.isoformat(), "outcome": "ok"})
    records = status(root)[1] + status(root, "--sessions")[1] + status(root, "--restores")[1]
    web = records[0]
    assert web["last_success"] and web["last_attempt"] and web["replication"] and web["last_drill"]
    assert undocumented(records) == {}


def test_the_nagios_plugin_of_examples(root, tmp_path):
    three_points(root / "web" / "202612", "web")
    plugin = Path(__file__).resolve().parents[2] / "examples" / "check_vmbk"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}

    def check(*argv: str) -> tuple[int, str]:
        r = subprocess.run([str(plugin), *argv, "--backup-path", str(root)], capture_output=True, text=True,
                           env=env, timeout=60)
        return r.returncode, r.stdout

    assert check("26") == (0, "VMBK OK - every VM has a fresh complete restore point\n")
    code, out = check("26", "--now", (NOW + _dt.timedelta(hours=40)).isoformat())
    assert code == 2 and out.startswith("VMBK CRITICAL - 1 problem(s): web: newest complete restore point is 40 h")
    code, out = check("x")
    assert code == 3 and out.startswith("VMBK UNKNOWN - vmbk-status exited 7")
