"""vmbk-status against a tree built by real backups of a real domain (``--now``
fakes the nights): a monthly then weekly mix sorted by date, the catalogue's
last success, a healthy and a broken VM, a stale one, a stale lock file, a
junk directory, and the exit codes of ``--stale``."""

from __future__ import annotations

import datetime as _dt
import shutil
import subprocess
import sys

import pytest
from backup_helpers import backup_ok
from report_helpers import run_cmd

from vmbk.commands.status import main as status_main
from vmbk.errors import Exit
from vmbk.lock import lock_path

pytestmark = pytest.mark.libvirt
MiB = 1 << 20


def status(root, *argv):
    code, recs, _ = run_cmd(status_main, ["--json", "--backup-path", str(root), *argv])
    return code, {r["vm"]: r for r in recs}


def test_status_of_trees_made_by_real_backups(nos_domain, vm_workdir, tmp_path, monkeypatch, capsys):
    nd = nos_domain(1, size="32M", writes=[(0x11, 0, MiB)])
    root = vm_workdir / "backups"
    root.mkdir()
    etc = tmp_path / "etc"
    etc.mkdir()
    monkeypatch.setenv("VMBK_CONFIG_DIR", str(etc))
    (etc / "default.toml").write_text('policy = "monthly"\n')
    backup_ok(root, nd.name, "--now", "2026-02-10T01:30:00Z")
    (etc / "default.toml").write_text('policy = "weekly"\n')  # a policy change: a weekly period beside
    backup_ok(root, nd.name, "--now", "2026-03-10T01:30:00Z")
    inc = backup_ok(root, nd.name, "--now", "2026-03-11T01:30:00Z")
    (root / "junk").mkdir()
    (root / nd.name / "checkpoints").mkdir(exist_ok=True)

    code, recs = status(root)
    assert code == 0 and list(recs) == [nd.name]
    r = recs[nd.name]
    assert r["periods"] == ["202602", "2026-W11"] and r["state"] == "ok" and r["policy"] == "weekly"
    # the new weekly chain archived the monthly one (its checkpoints went): listed after its period
    assert [(c["chain"], c["archived"]) for c in r["chains"]] == [("202602/.archives/chain-2026-03-10", True),
                                                                  ("2026-W11", False)]
    assert (r["restore_points"], r["complete_points"], r["chains_active"], r["chains_archived"]) == (3, 3, 1, 1)
    assert r["last_success"]["action"] == "inc" and r["last_success"]["period"] == "2026-W11"
    assert r["last_success"]["consistency"] in ("frozen", "paused", "crash") and r["lock"] == "free"
    assert r["newest_point_age_s"] < 300

    later = (_dt.datetime.now(_dt.timezone.utc) + _dt.timedelta(hours=30)).isoformat()
    capsys.readouterr()
    code, recs = status(root, "--now", later)
    assert code == Exit.VM and recs[nd.name]["state"] == "stale"
    assert capsys.readouterr().err.splitlines() == [
        f"vmbk-status: {nd.name}: newest complete restore point is 30 h old (limit 26 h)"]
    assert status(root, "--now", later, "--stale", "31")[0] == 0

    # a stale lock file: said, no problem (the next backup takes it over)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    lock_path(root, nd.name).write_text(f"{dead}\nbackup\n")
    code, recs = status(root)
    assert code == 0 and (recs[nd.name]["lock"], recs[nd.name]["locked"]) == ("stale", False)
    assert "stale lock file of process" in capsys.readouterr().err

    # a healthy twin and a broken original: exit 9, one problem line
    shutil.copytree(root / nd.name, root / "twin", symlinks=True)
    (root / nd.name / "2026-W11" / inc["disks"][0]["path"].rsplit("/", 1)[1]).unlink()
    code, recs = status(root)
    assert code == Exit.PARTIAL and sorted(recs) == sorted([nd.name, "twin"])
    assert recs["twin"]["state"] == "ok" and recs[nd.name]["state"] == "broken"
    assert recs[nd.name]["chains"][1]["chain"] == "2026-W11" and not recs[nd.name]["chains"][1]["complete"]
    err = capsys.readouterr().err
    assert f"vmbk-status: {nd.name}: chain 2026-W11 is broken: " in err and "twin:" not in err
    assert status(root, "--vm", "twin")[0] == 0
