"""``--list`` adds the catalogue's health line when there is a catalogue."""

from __future__ import annotations

import io
from pathlib import Path

import orjson
import pytest
from backup_helpers import backup_ok

from vmbk.catalogue import db_path
from vmbk.commands.restore import main as restore_main

pytestmark = pytest.mark.libvirt
MiB = 1 << 20


def listing(root: Path) -> dict:
    out = io.StringIO()
    code = restore_main(["--json", "--backup-path", str(root), "--list"], io.StringIO(""), out)
    recs = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert code == 0 and len(recs) == 1, recs
    return recs[0]


def test_health_line_counts_active_and_broken_chains(nos_domain, vm_workdir):
    nd = nos_domain(1, size="32M", writes=[(0x11, 0, MiB)])
    root = vm_workdir / "backups"
    root.mkdir()
    backup_ok(root, nd.name)
    last = backup_ok(root, nd.name)
    rec = listing(root)
    h = rec["catalogue"]
    assert (h["chains_active"], h["chains_broken"], h["last_outcome"]) == (1, 0, "ok")
    assert rec["health"] == f"Chains: 1 active, 0 broken, last backup {h['last_backup']}"

    Path(last["disks"][0]["path"]).unlink()  # a data file the catalogue knows is gone
    assert listing(root)["catalogue"]["chains_broken"] == 1

    copy = vm_workdir / "copy"
    root.rename(copy)  # the tree mounted elsewhere: the catalogue's paths are followed
    h = listing(copy)["catalogue"]
    assert (h["chains_active"], h["chains_broken"]) == (1, 1)
    db_path(copy).unlink()  # a recovery host with the tree alone: no line, no failure
    rec = listing(copy)
    assert rec["health"] is None and rec["catalogue"] is None and rec["restore_points"] >= 1
