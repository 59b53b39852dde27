"""vmbackup's catalogue, ``_state/vmbackup.db``, read-only.

vmbk never writes it (vmbackup owns it and may run again on this tree):
it is opened ``mode=ro`` and never migrated, so reading works on a
read-only mount and while vmbackup runs.  Its schema is detected, not
assumed: ``schema_info.version`` says which vmbackup wrote it (1.0 had no
``chain_health``; 1.4 added its policy and size columns; 1.5 the
``event_*``/``restore_points_before`` columns of ``vm_backups``; 2.0,
vmbackup 0.5.x, is what `SCHEMA` describes), and every query asks only for
the columns the tables really have; a missing one reads as None.

What vmbk takes from it (facts read from vmbackup 0.5.3's
``lib/sqlite_module.sh`` and a database it wrote here):

``sessions``        one row per run: ``id`` (the run's epoch), ``instance``,
                    ``start_time``/``end_time`` (local, ``YYYY-MM-DD HH:MM:SS``),
                    ``status``, ``vms_*`` counts;
``vm_backups``      one row per VM and run: ``vm_name``, ``backup_type``
                    (full | auto | copy ...), ``status`` (success | failed |
                    skipped ...), ``backup_path`` (the period directory),
                    ``rotation_policy``, ``bytes_written``, ``restore_points``
                    (after) and ``restore_points_before``, ``duration_sec``,
                    ``error_code``/``error_message``, ``event_detail``,
                    ``created_at`` (UTC, SQLite's CURRENT_TIMESTAMP);
``chain_health``    one row per VM and period: ``chain_status`` (active |
                    archived | broken | deleted), ``total_checkpoints``,
                    ``restorable_count``, ``broken_at``, ``break_reason``,
                    ``first_backup``/``last_backup``.
"""

from __future__ import annotations

import datetime as _dt
import logging
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vmbk.tree import names

log = logging.getLogger("vmbk.vmbackup")

#: The columns vmbk reads, per table (schema 2.0); older schemas lack some.
SCHEMA: dict[str, tuple[str, ...]] = {
    "schema_info": ("key", "value"),
    "sessions": ("id", "instance", "start_time", "end_time", "duration_sec", "vms_total", "vms_success",
                 "vms_failed", "vms_skipped", "bytes_total", "status", "session_type"),
    "vm_backups": ("id", "session_id", "vm_name", "vm_status", "backup_type", "backup_method", "rotation_policy",
                   "status", "bytes_written", "restore_points", "restore_points_before", "duration_sec",
                   "backup_path", "error_code", "error_message", "event_type", "event_detail", "chain_archived",
                   "created_at"),
    "chain_health": ("id", "vm_name", "period_id", "chain_location", "chain_status", "rotation_policy",
                     "total_checkpoints", "restorable_count", "broken_at", "break_reason", "first_backup",
                     "last_backup", "archived_at", "deleted_at"),
}
#: vmbackup's VM statuses -> vmbk's outcomes (vmbk-json(7), ``backup.outcome``).
OUTCOMES = {"success": "ok", "failed": "failed", "error": "failed", "skipped": "skipped", "excluded": "skipped"}


def db_path(backup_path: Path) -> Path:
    return Path(backup_path) / names.STATE_DIR / names.VMBACKUP_DB


def parse_time(text: Any, *, local: bool) -> str | None:
    """vmbackup's ``YYYY-MM-DD HH:MM:SS`` as UTC ISO 8601 (``local``: it is the host's time)."""
    if not isinstance(text, str) or not text.strip():
        return None
    try:
        t = _dt.datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.astimezone() if local else t.replace(tzinfo=_dt.timezone.utc)
    return t.astimezone(_dt.timezone.utc).isoformat(timespec="seconds")


class VmbackupDb:
    """vmbackup's catalogue of one backup path; ``present`` is False without one.

    A database that cannot be read is reported once (``error``) and read
    as absent: the tree is the source of truth, this only adds history.
    """

    def __init__(self, backup_path: Path) -> None:
        self.path = db_path(backup_path)
        self.db: sqlite3.Connection | None = None
        self.columns: dict[str, set[str]] = {}
        self.version: str | None = None
        self.error: str | None = None
        if not self.path.is_file():
            return
        try:
            self.db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
            self.db.row_factory = sqlite3.Row
            for table in SCHEMA:
                cols = {r["name"] for r in self.db.execute(f"PRAGMA table_info({table})")}
                if cols:
                    self.columns[table] = cols
            if "vm_backups" not in self.columns:
                raise sqlite3.DatabaseError("no vm_backups table: not vmbackup's catalogue")
            if "schema_info" in self.columns:
                row = self.db.execute("SELECT value FROM schema_info WHERE key = 'version'").fetchone()
                self.version = str(row[0]) if row else None
            self.version = self.version or "1.0"
        except sqlite3.Error as e:
            self.error = f"{self.path}: {e}"
            log.warning("vmbackup's catalogue %s not readable (%s): left out", self.path, e)
            self.close()

    @property
    def present(self) -> bool:
        return self.db is not None

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None

    def __enter__(self) -> VmbackupDb:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _select(self, table: str, where: str = "", params: tuple[Any, ...] = (), order: str = "") -> list[dict[str, Any]]:
        """Rows of ``table`` with every `SCHEMA` column (None for those it lacks)."""
        if self.db is None or table not in self.columns:
            return []
        have = self.columns[table]
        cols = [c if c in have else f"NULL AS {c}" for c in SCHEMA[table]]
        sql = f"SELECT {', '.join(cols)} FROM {table}" + (f" WHERE {where}" if where else "")
        sql += f" ORDER BY {order}" if order else ""
        try:
            return [dict(r) for r in self.db.execute(sql, params)]
        except sqlite3.Error as e:
            log.warning("vmbackup's catalogue %s: %s", self.path, e)
            return []

    # -- reads ------------------------------------------------------------------------
    def sessions(self) -> list[dict[str, Any]]:
        return self._select("sessions", order="id")

    def vm_names(self) -> list[str]:
        return sorted({r["vm_name"] for r in self._select("vm_backups") if r["vm_name"]})

    def backups(self, vm: str | None = None) -> list[dict[str, Any]]:
        """`backup` dicts (see `backup`) of one VM or all, oldest first."""
        starts = {r["id"]: r["start_time"] for r in self.sessions()}
        rows = self._select("vm_backups", "vm_name = ?" if vm else "", (vm,) if vm else (), order="id")
        return [backup(r, starts.get(r["session_id"])) for r in rows]

    def chains(self, vm: str) -> list[dict[str, Any]]:
        """vmbackup's ``chain_health`` of a VM, by period (empty before schema 1.3)."""
        return [{"period": r["period_id"], "status": r["chain_status"], "policy": r["rotation_policy"],
                 "checkpoints": r["total_checkpoints"], "restorable": r["restorable_count"],
                 "broken_at": r["broken_at"], "break_reason": r["break_reason"],
                 "first_backup": parse_time(r["first_backup"], local=False),
                 "last_backup": parse_time(r["last_backup"], local=False), "location": r["chain_location"]}
                for r in self._select("chain_health", "vm_name = ?", (vm,), order="id")]

    def summary(self, vm: str) -> dict[str, Any] | None:
        """What ``--list`` and status show of a VM from vmbackup's catalogue (None: nothing)."""
        if self.db is None:
            return None
        rows = [b for b in self.backups(vm) if b["action"] != "skip"]
        chains = self.chains(vm)
        if not rows and not chains:
            return None
        ok = [b for b in rows if b["outcome"] == "ok"]
        last = rows[-1] if rows else None
        return {
            "source": "vmbackup",
            "database": str(self.path),
            "schema": self.version,
            "backups": len(rows),
            "failed": sum(1 for b in rows if b["outcome"] == "failed"),
            "last_backup": ok[-1]["started_at"] if ok else None,
            "last_attempt": last["started_at"] if last else None,
            "last_outcome": last["outcome"] if last else None,
            "last_error": last["error"] if last else None,
            "chains": chains,
        }


def backup(row: Mapping[str, Any], session_start: Any = None) -> dict[str, Any]:
    """One ``vm_backups`` row in vmbk's words.

    ``started_at``: the row's ``created_at`` (UTC, written when vmbackup
    logged the VM) or else its session's local ``start_time``.  ``action``:
    full, inc (an ``auto`` that added a point to a chain), copy or skip.
    ``period``: the period directory of ``backup_path`` (None: accumulate
    or unknown).
    """
    status = str(row.get("status") or "").lower()
    outcome = OUTCOMES.get(status, "failed" if "fail" in status else status or None)
    kind = str(row.get("backup_type") or "").lower()
    before, after = row.get("restore_points_before"), row.get("restore_points")
    if outcome == "skipped" or kind in ("", "none", "n/a") and outcome != "ok":
        action = "skip" if outcome == "skipped" else (kind or None)
    elif kind == "auto":
        action = "full" if isinstance(after, int) and after == 1 and not before else "inc"
    elif kind in ("incremental", "inc"):
        action = "inc"
    else:
        action = kind
    path = row.get("backup_path") or None
    period = Path(path).name if path else None
    return {
        "session": row.get("session_id"),
        "id": row.get("id"),
        "vm": row.get("vm_name"),
        "action": action,
        "outcome": outcome,
        "status": row.get("status"),
        "policy": row.get("rotation_policy"),
        "period": period if period and names.policy_of_period(period) else None,
        "directory": path,
        "bytes": row.get("bytes_written"),
        "restore_points": after,
        "duration_s": row.get("duration_sec"),
        "error": row.get("error_message") or row.get("error_code") or None,
        "detail": row.get("event_detail"),
        "started_at": parse_time(row.get("created_at"), local=False) or parse_time(session_start, local=True),
    }
