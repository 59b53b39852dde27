"""What the catalogue remembers of each VM, read-only (vmbackup manual,
"Query Cookbook": reports 1, 2, 4, 6, 10; vmrestore guide, "Restore
Tracking").

Every query of vmbk-status is here.  The catalogue is opened read-only
and never migrated (`vmbk.catalogue.connect_readonly`), so status works
on a read-only backup mount, for the ``backup`` group, and against a
catalogue of an older schema: a table that is not there (no rotation or
replication yet) answers nothing.  Without a catalogue every answer is
empty: the tree alone still says what can be restored.
"""

from __future__ import annotations

import datetime as _dt
import sqlite3
from pathlib import Path
from typing import Any

from vmbk.catalogue import connect_readonly, table_names

#: The planner's reason for skipping a shut-off VM whose disks did not change
#: (`vmbk.policy.backup`): its newest restore point is still current.
UNCHANGED = "no disk changed since the last backup"
#: A VM known only to the catalogue (no backup in the tree) is reported while
#: its newest attempt failed within this many days: a VM that never got a
#: first backup; older ones are VMs that are gone.
RECENT_FAILURE_DAYS = 7


def parse_time(text: Any) -> _dt.datetime | None:
    """A catalogue time stamp (UTC ISO 8601; vmbackup's without an offset is UTC)."""
    if not isinstance(text, str) or not text:
        return None
    try:
        t = _dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=_dt.timezone.utc)


def iso(t: _dt.datetime) -> str:
    return t.astimezone(_dt.timezone.utc).isoformat(timespec="seconds")


class History:
    """The catalogue of one backup path, for reading."""

    def __init__(self, backup_path: Path) -> None:
        self.db: sqlite3.Connection | None = connect_readonly(backup_path)
        self.tables: set[str] = table_names(self.db) if self.db is not None else set()

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def present(self) -> bool:
        return self.db is not None

    @property
    def _source(self) -> str:
        """``source``: null for vmbk's own backups, ``vmbackup`` for those
        `vmbk.vmbackup.importer` copied in (a catalogue before migration 4 has none)."""
        if self.db is None or "vm_backups" not in self.tables:
            return "NULL AS source"
        cols = {r[1] for r in self.db.execute("PRAGMA table_info(vm_backups)")}
        return "source" if "source" in cols else "NULL AS source"

    def _rows(self, table: str, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        if self.db is None or table not in self.tables:
            return []
        return [dict(r) for r in self.db.execute(sql, params)]

    def _one(self, table: str, sql: str, params: tuple[Any, ...] = ()) -> dict[str, Any] | None:
        rows = self._rows(table, sql + " LIMIT 1", params)
        return rows[0] if rows else None

    # -- VMs ------------------------------------------------------------------------
    def failing_vms(self, now: _dt.datetime) -> list[str]:
        """VMs whose newest attempt failed lately (those without a tree are
        reported too: their backups never succeeded)."""
        since = iso(now - _dt.timedelta(days=RECENT_FAILURE_DAYS))
        rows = self._rows("vm_backups", """
            SELECT vm, outcome FROM vm_backups b
            WHERE action != 'skip' AND started_at >= ? AND id = (
                SELECT id FROM vm_backups WHERE vm = b.vm AND action != 'skip'
                ORDER BY started_at DESC, id DESC LIMIT 1)""", (since,))
        return sorted(r["vm"] for r in rows if r["outcome"] == "failed")

    # -- one VM ----------------------------------------------------------------------
    def last_success(self, vm: str) -> dict[str, Any] | None:
        """Report 10: the newest backup that went well (a skip is not one)."""
        row = self._one("vm_backups", """
            SELECT started_at AS at, action, consistency, policy, period, bytes, duration_s AS duration, """
            + self._source + """
            FROM vm_backups WHERE vm = ? AND outcome = 'ok' AND action != 'skip'
            ORDER BY started_at DESC, id DESC""", (vm,))
        return row

    def last_attempt(self, vm: str) -> dict[str, Any] | None:
        """The newest backup attempt, however it ended, and its error."""
        return self._one("vm_backups", """
            SELECT started_at AS at, action, outcome, error, duration_s AS duration, """ + self._source + """
            FROM vm_backups WHERE vm = ? AND action != 'skip' ORDER BY started_at DESC, id DESC""", (vm,))

    def last_unchanged(self, vm: str) -> str | None:
        """The newest night the VM was skipped as shut off and unchanged."""
        row = self._one("vm_backups", """
            SELECT started_at FROM vm_backups WHERE vm = ? AND action = 'skip' AND outcome = 'skipped'
            AND instr(reasons, ?) > 0 ORDER BY started_at DESC, id DESC""", (vm, UNCHANGED))
        return row["started_at"] if row else None

    def last_restore(self, vm: str) -> dict[str, Any] | None:
        return self._one("restore_sessions", """
            SELECT started_at AS at, mode, target, restore_point, outcome, exit_code, error
            FROM restore_sessions WHERE vm = ? AND mode != 'drill' ORDER BY started_at DESC, id DESC""", (vm,))

    def last_drill(self, vm: str) -> dict[str, Any] | None:
        """The newest restore test: vmbk-drill's ``drills`` row (the level it reached,
        its pictures), else a ``restore_sessions`` row of mode ``drill`` (another tool's)."""
        row = self._one("drills", """
            SELECT started_at AS at, restore_point, outcome, exit_code, error, level, duration_s AS duration,
                   screenshot, console
            FROM drills WHERE vm = ? ORDER BY started_at DESC, id DESC""", (vm,))
        if row is not None:
            return row
        row = self._one("restore_sessions", """
            SELECT started_at AS at, restore_point, outcome, exit_code, error, NULL AS level,
                   duration_s AS duration, NULL AS screenshot, NULL AS console
            FROM restore_sessions WHERE vm = ? AND mode = 'drill' ORDER BY started_at DESC, id DESC""", (vm,))
        return row

    def last_verify(self, vm: str) -> dict[str, Any] | None:
        """The newest ``vmbk-restore --verify`` of the VM (its manifests, hashes and checksums)."""
        if "verifications" not in self.tables:
            return None
        row = self._one("verifications", """
            SELECT started_at AS at, outcome, exit_code, deep, points, findings, duration_s AS duration, error
            FROM verifications WHERE vm = ? ORDER BY started_at DESC, id DESC""", (vm,))
        if row is not None:
            row["deep"] = bool(row["deep"])
        return row

    def replication(self, vm: str) -> list[dict[str, Any]]:
        """Report 6 per VM: each destination's last push, its last good one and
        the newest backup the replica then held."""
        if "replication_runs" not in self.tables:
            return []
        return self._rows("replication_vms", """
            SELECT r.destination, r.transport,
              (SELECT v2.outcome FROM replication_vms v2 JOIN replication_runs r2 ON r2.id = v2.run_id
               WHERE v2.vm = v.vm AND r2.destination = r.destination AND r2.action = 'push'
               ORDER BY r2.started_at DESC, v2.id DESC LIMIT 1) AS last_outcome,
              max(CASE WHEN v.outcome = 'ok' THEN r.started_at END) AS last_ok,
              max(CASE WHEN v.outcome = 'ok' THEN v.last_backup END) AS replicated_through
            FROM replication_vms v JOIN replication_runs r ON r.id = v.run_id
            WHERE v.vm = ? AND r.action = 'push'
            GROUP BY r.destination ORDER BY r.destination""", (vm,))

    # -- history views -------------------------------------------------------------------
    def sessions(self, since: _dt.datetime) -> list[dict[str, Any]]:
        """Report 1 over days: each run with what it backed up, removed and replicated."""
        backups = ("(SELECT count(*) FROM vm_backups b WHERE b.session_id = s.id AND b.action != 'skip' "
                   "AND b.outcome = '{}')")
        extra = []
        if "vm_backups" in self.tables:
            extra += [backups.format("ok") + " AS backed_up", backups.format("failed") + " AS failed",
                      "(SELECT count(*) FROM vm_backups b WHERE b.session_id = s.id AND b.action = 'skip') AS skipped",
                      "(SELECT coalesce(sum(bytes), 0) FROM vm_backups b WHERE b.session_id = s.id) AS bytes"]
        if "retention_events" in self.tables:
            extra += ["(SELECT count(*) FROM retention_events e WHERE e.session_id = s.id AND e.action = 'delete' "
                      "AND e.success = 1) AS removed",
                      "(SELECT coalesce(sum(freed_bytes), 0) FROM retention_events e WHERE e.session_id = s.id "
                      "AND e.action = 'delete' AND e.success = 1) AS freed_bytes"]
        if "replication_runs" in self.tables:
            extra += ["(SELECT count(*) FROM replication_runs r WHERE r.session_id = s.id AND r.outcome = 'ok') "
                      "AS replicated",
                      "(SELECT count(*) FROM replication_runs r WHERE r.session_id = s.id "
                      "AND r.outcome IN ('failed', 'partial', 'interrupted')) AS replication_failed"]
        cols = ", ".join(["s.id", "s.started_at", "s.ended_at", "s.command", "s.host", "s.exit_code", *extra])
        return self._rows("sessions", f"SELECT {cols} FROM sessions s WHERE s.started_at >= ? "
                                      "ORDER BY s.started_at, s.id", (iso(since),))

    def restores(self, since: _dt.datetime) -> list[dict[str, Any]]:
        """vmrestore's ``--status --restores``: every restore since, drills included."""
        return self._rows("restore_sessions", """
            SELECT session_id, vm, mode, source, target, restore_point, started_at, duration_s, outcome,
                   exit_code, error
            FROM restore_sessions WHERE started_at >= ? ORDER BY started_at, id""", (iso(since),))
