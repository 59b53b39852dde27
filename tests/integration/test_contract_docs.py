"""Every field the commands really write is in vmbk-json(7).

A run of every command on a real domain with two disks -- discover, plan,
a full and an incremental backup, a backup of an archived chain, the
listings, verify, dump, a restore, a clone, status, errors -- and every
field path of every record checked against the page (tests/contract_doc.py).
A field added in code without its line in the page fails here.
"""

from __future__ import annotations

import importlib
import io
from typing import Any

import libvirt
import orjson
import pytest
from contract_doc import undocumented

pytestmark = pytest.mark.libvirt
MiB = 1 << 20


def run(cmd: str, *argv: str, stdin: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    main = importlib.import_module(f"vmbk.commands.{cmd}").main
    out = io.StringIO()
    lines = "".join(orjson.dumps(r).decode() + "\n" for r in stdin or [])
    main(["--json", *argv], io.StringIO(lines), out)
    return [orjson.loads(line) for line in out.getvalue().splitlines()]


def test_every_field_of_every_record_is_documented(nos_domain, vm_workdir, tmp_path, monkeypatch, libvirt_conn):
    nd = nos_domain(2, size="32M", writes=[(0x11, 0, MiB)])
    root = vm_workdir / "backups"
    root.mkdir()
    monkeypatch.setenv("VMBK_CONFIG_DIR", str(tmp_path))
    (tmp_path / "default.toml").write_text('policy = "weekly"\n')
    bp = ["--backup-path", str(root)]
    seen: list[dict[str, Any]] = []

    for day in ["2026-11-16T01:30:00Z", "2026-11-17T01:30:00Z"]:  # a full, an incremental
        vms = run("discover", "--vm", f"{nd.name},no-such-vm-{nd.name}")
        plans = run("plan", *bp, "--now", day, stdin=vms)
        seen += vms + plans + run("backup", *bp, stdin=plans)
    assert [r["action"] for r in seen if r["type"] == "backup"] == ["full", "inc"]
    nd.dom.destroy()  # shut off: a copy backup archives the chain
    seen += run("backup", *bp, "--vm", nd.name, "--now", "2026-11-18T01:30:00Z")
    seen += run("backup", *bp, "--vm", nd.name, "--now", "2026-11-18T01:30:00Z", "--dry-run")
    seen += run("status", *bp)
    seen += run("restore", *bp, "--list")
    seen += run("restore", *bp, "--list-restore-points", nd.name)
    seen += run("restore", *bp, "--verify", nd.name, "--all-chains")
    seen += run("restore", *bp, "--dump", nd.name)
    seen += run("restore", *bp, "--vm", nd.name, "--restore-path", str(tmp_path / "dry"), "--dry-run")
    seen += run("restore", *bp, "--vm", nd.name, "--restore-path", str(tmp_path / "data"), "--skip-config")
    clone = f"{nd.name}-clone"
    try:
        seen += run("restore", *bp, "--vm", nd.name, "--restore-path", str(vm_workdir / "clone"), "--name", clone)
    finally:
        try:
            libvirt_conn.lookupByName(clone).undefine()
        except libvirt.libvirtError:
            pass  # the clone failed before it was defined: the assertions below say why
    seen += run("restore", *bp, "--vm", "no-such-vm", "--restore-path", str(tmp_path / "x"))

    types = {r["type"] for r in seen}
    assert {"vm", "plan", "backup", "error", "status", "backup_vm", "chain", "restore_point", "verify", "dump",
            "restore_disk", "restore"} <= types, types
    assert undocumented(seen) == {}
