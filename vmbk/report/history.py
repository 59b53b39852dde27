"""The catalogue's backups of the last days, for the HTML report's charts
(vmbackup manual, "Query Cookbook" reports 2 and 8).  Read-only; without a
catalogue (or its table) there is no history and the page says so."""

from __future__ import annotations

import dataclasses
import datetime as _dt
from pathlib import Path

from vmbk.catalogue import connect_readonly, table_names


@dataclasses.dataclass(frozen=True)
class Backup:
    """One row of ``vm_backups``: a backup attempt, or a skip."""

    vm: str
    at: _dt.datetime
    action: str
    outcome: str  # ok | failed | skipped
    bytes: int | None
    duration: float | None

    @property
    def attempt(self) -> bool:
        """A backup that was tried (a skip copies nothing: no mark in the charts)."""
        return self.action != "skip"


def _time(text: str) -> _dt.datetime | None:
    try:
        t = _dt.datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    return t if t.tzinfo else t.replace(tzinfo=_dt.timezone.utc)


def backups(backup_path: Path | None, since: _dt.datetime, until: _dt.datetime) -> list[Backup] | None:
    """Every ``vm_backups`` row started in [since, until], oldest first; None: no catalogue."""
    if backup_path is None:
        return None
    db = connect_readonly(backup_path)
    if db is None:
        return None
    try:
        if "vm_backups" not in table_names(db):
            return None
        rows = db.execute("SELECT vm, started_at, action, outcome, bytes, duration_s FROM vm_backups "
                          "WHERE started_at >= ? ORDER BY started_at, id",
                          (since.astimezone(_dt.timezone.utc).isoformat(timespec="seconds"),)).fetchall()
    finally:
        db.close()
    out = []
    for vm, at, action, outcome, size, duration in rows:
        t = _time(at)
        if t is not None and t <= until:
            out.append(Backup(vm, t, action, outcome, size, duration))
    return out
