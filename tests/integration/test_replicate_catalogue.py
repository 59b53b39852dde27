"""What vmbk-replicate writes in the catalogue, and what vmbk-status makes of it.

One run row per destination (push, verify, pull) with its outcome, totals
and the tool's exit status; one row per VM with the newest stream the
replica then held -- from which vmbk-status tells each VM's replication
lag per destination.
"""

from __future__ import annotations

import io
import sqlite3

import orjson
from replicate_helpers import configure, replicate, synthetic_tree

from vmbk.catalogue import db_path
from vmbk.commands.status import main as status_main


def rows(root, sql):
    db = sqlite3.connect(db_path(root))
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute(sql)]
    finally:
        db.close()


def test_runs_and_vm_rows_and_the_lag_vmbk_status_shows(replica_dirs, tmp_path):
    root = tmp_path / "src"
    synthetic_tree(root, "web")
    cfg = configure(tmp_path / "etc", [
        {"name": "near", "transport": "local", "path": str(replica_dirs)},
        {"name": "gone", "transport": "local", "path": str(tmp_path / "not-mounted")},
    ])
    code, recs = replicate(cfg, root, "--all")
    assert code == 9, recs
    replicate(cfg, root, "--verify-only", "--dest", "near")
    replicate(cfg, root, "--pull", "--dest", "near", "--vm", "web", "--to", str(tmp_path / "back"))

    runs = rows(root, "SELECT destination, transport, action, sync_mode, outcome, files, bytes, deleted, verified, "
                      "mismatches, error FROM replication_runs ORDER BY id")
    near, gone, verify = runs
    assert (near["destination"], near["action"], near["outcome"], near["files"], near["verified"]) == (
        "near", "push", "ok", 11, "size")
    assert near["bytes"] > 1 << 20 and near["error"] is None
    assert (gone["outcome"], gone["files"]) == ("failed", 0) and "does not exist" in gone["error"]
    assert (verify["action"], verify["outcome"], verify["verified"], verify["mismatches"]) == (
        "verify", "ok", "checksum", 0)
    vms = rows(root, "SELECT r.destination, v.vm, v.outcome, v.files, v.last_backup FROM replication_vms v "
                     "JOIN replication_runs r ON r.id = v.run_id WHERE r.action = 'push' ORDER BY v.id")
    assert [(v["destination"], v["vm"], v["outcome"]) for v in vms] == [("near", "web", "ok")]
    assert vms[0]["last_backup"] is not None
    # the pull's run is in the catalogue of where it pulled to (which came along from the replica)
    pulled = rows(tmp_path / "back", "SELECT destination, action, outcome FROM replication_runs ORDER BY id")
    assert pulled[-1] == {"destination": "near", "action": "pull", "outcome": "ok"}

    out = io.StringIO()
    status_main(["--json", "--backup-path", str(root)], io.StringIO(""), out)
    (rec,) = [orjson.loads(line) for line in out.getvalue().splitlines() if '"status"' in line]
    assert [(r["destination"], r["last_outcome"]) for r in rec["replication"]] == [("near", "ok")]
