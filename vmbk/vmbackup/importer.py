"""``vmbk-status --import-vmbackup``: vmbackup's history into vmbk's catalogue.

After a switch, vmbk's catalogue knows only vmbk's runs; vmbk-status and
the reports read it.  This copies vmbackup's runs (``sessions``) and VM
backups (``vm_backups``, `vmbk.vmbackup.db.backup`) into it, once each:

* a run becomes a vmbk session ``vmbackup-<id>`` (command ``vmbackup``,
  host: its config instance), its times in UTC;
* a VM backup becomes a ``vm_backups`` row with ``source`` ``vmbackup``
  and ``source_id`` its id there (catalogue migration 4, unique): a
  second import adds only what vmbackup did since.  ``reasons`` holds
  vmbackup's ``event_detail``, ``directory`` its ``backup_path``.

vmbackup's database is only read (`VmbackupDb`).  Its ``chain_health``
is not copied: vmbk's health is the tree's (`vmbk.tree.points`), and
``--list`` shows vmbackup's own rows beside it.  One transaction: an
import that fails adds nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from vmbk.catalogue import Catalogue
from vmbk.errors import StorageError
from vmbk.vmbackup.db import VmbackupDb, parse_time

SOURCE = "vmbackup"


@dataclasses.dataclass(frozen=True, slots=True)
class Imported:
    """What one import did: rows added, rows seen before, the VMs concerned."""

    database: str
    schema: str | None
    sessions: int = 0
    backups: int = 0
    known: int = 0
    vms: tuple[str, ...] = ()


def session_id(vmbackup_session: Any) -> str:
    return f"{SOURCE}-{vmbackup_session}"


def import_history(backup_path: Path, *, dry_run: bool = False) -> Imported:
    """Copy vmbackup's history under ``backup_path`` into vmbk's catalogue.

    A `StorageError` when there is no readable ``_state/vmbackup.db``.
    ``dry_run``: count what would be added, write nothing.
    """
    with VmbackupDb(backup_path) as theirs:
        if not theirs.present:
            raise StorageError(theirs.error or f"no vmbackup catalogue at {theirs.path}")
        sessions = theirs.sessions()
        backups = [b for b in theirs.backups() if b["id"] is not None and b["vm"]]
        database, schema = str(theirs.path), theirs.version
    cat = Catalogue.open_existing(backup_path) if dry_run else Catalogue.open(backup_path)
    try:
        known = _known(cat)
        fresh = [b for b in backups if b["id"] not in known]
        runs = {b["session"] for b in fresh}
        if not dry_run and cat is not None:
            with cat.transaction():
                for s in sessions:
                    if s["id"] in runs:
                        _session(cat, s)
                for run in runs - {s["id"] for s in sessions}:  # a row whose run vmbackup did not log
                    first = next(b for b in fresh if b["session"] == run)
                    _session(cat, {"id": run, "start_time": None, "status": None}, first["started_at"])
                for b in fresh:
                    cat.insert("vm_backups", _row(b))
    finally:
        if cat is not None:
            cat.close()
    return Imported(database, schema, sessions=len(runs), backups=len(fresh), known=len(backups) - len(fresh),
                    vms=tuple(sorted({b["vm"] for b in fresh})))


def _known(cat: Catalogue | None) -> set[int]:
    if cat is None:
        return set()
    return {int(r[0]) for r in cat.query("SELECT source_id FROM vm_backups WHERE source = ?", (SOURCE,))}


def _session(cat: Catalogue, s: Mapping[str, Any], started: str | None = None) -> None:
    status = str(s.get("status") or "").lower()
    code = 0 if status == "success" else None if status in ("", "running") else 1
    cat.db.execute(
        "INSERT OR IGNORE INTO sessions (id, started_at, ended_at, command, host, exit_code) VALUES (?, ?, ?, ?, ?, ?)",
        (session_id(s["id"]), parse_time(s.get("start_time"), local=True) or started or "",
         parse_time(s.get("end_time"), local=True), SOURCE, s.get("instance"), code))


def _row(b: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "session_id": session_id(b["session"]),
        "vm": b["vm"],
        "action": b["action"] or "unknown",
        "policy": b["policy"],
        "period": b["period"],
        "directory": b["directory"],
        "outcome": b["outcome"] or "unknown",
        "error": b["error"],
        "reasons": orjson.dumps([f"vmbackup: {b['detail']}"] if b["detail"] else ["vmbackup"]).decode(),
        "started_at": b["started_at"] or "",
        "duration_s": b["duration_s"],
        "bytes": b["bytes"],
        "source": SOURCE,
        "source_id": b["id"],
    }
