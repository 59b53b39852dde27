"""What vmbk-rotate reads from and writes to the catalogue (vmbk.catalogue).

Reads: the last successful backup in each period of a VM (the age of an
orphan, `vmbk.policy.retention`), read-only, so a dry run works on a
read-only backup mount and for members of the ``backup`` group.

Writes (never in a dry run: a dry run writes nothing at all), as
vmbackup's "Database Audit Trail" does: a ``retention_events`` row for
every decision that matters (a deletion, a guard that held, a refusal),
a ``file_operations`` row per directory deleted and a ``deleted_chains``
tombstone per chain deleted; ``vm_backups`` rows of a deleted period get
``deleted_at``.  Nothing is ever dropped.  A deletion's rows are written
in two steps around the rename that commits it (`vmbk.tree.ops`):

1. `intent`, just before the rename: the event with ``success`` NULL and
   its tombstones with status ``deleting``;
2. `done`, just after: ``success`` 1, tombstones ``deleted``, the file
   operation, ``vm_backups.deleted_at``.

A kill between them leaves the rows of step 1: the next run finishes the
hidden directory the rename left and completes them (`finished`), or,
when the kill came before the rename, marks them ``abandoned`` (the
directory is still there).  The catalogue is an index: a failure to
write it is logged, never a reason to keep or stop a deletion.
"""

from __future__ import annotations

import datetime as _dt
import logging
import socket
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vmbk.catalogue import Catalogue, db_path
from vmbk.clock import now_iso
from vmbk.policy.retention import PERIOD, VM, Decision, Removal, TreeFacts, Unit

log = logging.getLogger("vmbk.rotate")


class History:
    def __init__(self, root: Path, *, write: bool) -> None:
        self.root = root
        self.write = write
        self._cat: Catalogue | None = None
        self._failed = False
        self.started: set[str] = set()

    def close(self) -> None:
        if self._cat is not None:
            self._cat.close()
            self._cat = None

    # -- reads ----------------------------------------------------------------
    def last_backups(self, vm: str) -> dict[str, float]:
        """Period -> when its last successful backup started (live rows only)."""
        path = db_path(self.root)
        if not path.exists():
            return {}
        try:
            db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        except sqlite3.Error as e:
            log.warning("catalogue %s not readable (%s): ages come from the tree", path, e)
            return {}
        try:
            cols = {r[1] for r in db.execute("PRAGMA table_info(vm_backups)")}
            live = " AND deleted_at IS NULL" if "deleted_at" in cols else ""
            rows = db.execute(
                "SELECT period, max(started_at) FROM vm_backups WHERE vm = ? AND outcome = 'ok' "
                f"AND action != 'skip' AND period IS NOT NULL{live} GROUP BY period", (vm,)).fetchall()
        except sqlite3.Error as e:
            log.warning("catalogue %s not readable (%s): ages come from the tree", path, e)
            return {}
        finally:
            db.close()
        out = {}
        for period, at in rows:
            try:
                out[str(period)] = _dt.datetime.fromisoformat(at).timestamp()
            except (TypeError, ValueError):
                continue
        return out

    # -- writes ---------------------------------------------------------------
    def _guard(self, what: str, fn: Callable[[Catalogue], Any]) -> Any:
        if not self.write or self._failed:
            return None
        try:
            if self._cat is None:
                self._cat = Catalogue.open(self.root)
            return fn(self._cat)
        except Exception as e:  # the index must not decide what is deleted
            log.warning("catalogue: cannot record %s: %s", what, e)
            if self._cat is None:
                self._failed = True
            return None

    def session(self, session: str) -> None:
        if session not in self.started:
            self.started.add(session)
            self._guard("session", lambda cat: cat.start_session(session, "vmbk-rotate", socket.gethostname()))

    def end(self, session: str, code: int) -> None:
        if session in self.started:
            self._guard("session end", lambda cat: cat.end_session(session, code))

    def decisions(self, session: str, d: Decision, triggered_by: str) -> None:
        """The guards that held and a refusal (deletions are written by `intent`/`done`)."""
        def write(cat: Catalogue) -> None:
            with cat.transaction():
                if d.refused:
                    cat.insert("retention_events", _event(session, d, "refuse", None, triggered_by, d.refused))
                for p in d.protected:
                    cat.insert("retention_events", {**_event(session, d, "protect", None, triggered_by, p.why),
                                                    "target_path": p.rel})
        if d.refused or d.protected:
            self._guard(f"the decisions for {d.vm}", write)

    def intent(self, session: str, d: Decision, r: Removal, facts: TreeFacts, triggered_by: str) -> int | None:
        """Step 1: the deletion about to happen, its chains as tombstones ``deleting``."""
        def write(cat: Catalogue) -> int:
            with cat.transaction():
                event = cat.insert("retention_events", {**_event(session, d, "delete", r, triggered_by, r.reason),
                                                        "success": None})
                for chain in _chains(r, facts):
                    cat.insert("deleted_chains", {**chain, "vm": d.vm, "status": "deleting", "reason": r.reason,
                                                  "retention_event_id": event})
            return event
        return self._guard(f"the deletion of {r.rel} of {d.vm}", write)

    def done(self, event: int | None, vm: str, rel: str, path: Path) -> None:
        """Step 2: the rename happened; the chains are gone from the tree."""
        if event is None:
            return
        self._guard(f"the deletion of {rel} of {vm}", lambda cat: _complete(cat, event, vm, path))

    def finished(self, session: str, vm: str, rel: str, path: Path) -> None:
        """A hidden directory a killed run left: complete its rows (or write them)."""
        def write(cat: Catalogue) -> None:
            row = _pending(cat, vm, rel)
            if row is not None:
                _complete(cat, int(row["id"]), vm, path)
                return
            if _latest_done(cat, vm, rel):
                return
            kind = VM if rel == "." else PERIOD if "/" not in rel else "archive"
            with cat.transaction():
                event = cat.insert("retention_events", {
                    "session_id": session, "vm": vm, "at": now_iso(), "action": "delete", "target_type": kind,
                    "target_path": rel, "target_period": rel if kind == PERIOD else None,
                    "reason": "a deletion a killed vmbk-rotate began",
                    "triggered_by": "finish", "success": None})
                cat.insert("deleted_chains", {"vm": vm, "chain": rel, "status": "deleting",
                                              "reason": "a deletion a killed vmbk-rotate began",
                                              "retention_event_id": event})
            _complete(cat, event, vm, path)
        self.session(session)
        self._guard(f"the end of the deletion of {rel} of {vm}", write)

    def abandoned(self, vm: str, exists: Callable[[str], bool]) -> None:
        """Deletions begun but never renamed (killed before): the directory stayed."""
        def write(cat: Catalogue) -> None:
            rows = cat.query("SELECT id, target_path FROM retention_events WHERE vm = ? AND action = 'delete' "
                             "AND success IS NULL", (vm,))
            with cat.transaction():
                for row in rows:
                    if exists(str(row["target_path"])):
                        cat.db.execute("UPDATE retention_events SET success = 0 WHERE id = ?", (row["id"],))
                        cat.db.execute("UPDATE deleted_chains SET status = 'abandoned' WHERE retention_event_id = ?",
                                       (row["id"],))
        self._guard(f"deletions of {vm} a killed run began", write)


def _event(session: str, d: Decision, action: str, r: Removal | None, triggered_by: str,
           reason: str | None) -> dict[str, Any]:
    row: dict[str, Any] = {"session_id": session, "vm": d.vm, "at": now_iso(), "action": action,
                           "rotation_policy": d.policy, "retention_limit": d.keep, "reason": reason,
                           "triggered_by": triggered_by}
    if r is not None:
        row.update(tier=r.tier, target_type=r.kind, target_path=r.rel, freed_bytes=r.bytes,
                   target_period=r.rel.split("/", 1)[0] if r.kind == PERIOD else None)
    return row


def _chains(r: Removal, facts: TreeFacts) -> Iterator[dict[str, Any]]:
    """The tombstones of a removal: its chain and every archived chain in it."""
    if r.kind == VM:
        units: list[Unit] = [*facts.periods, *facts.archives]
        if facts.root_points:
            yield {"chain": ".", "period": None, "restore_points": facts.root_points, "bytes": None,
                   "last_backup": None}
    else:
        units = [u for u in (*facts.periods, *facts.all_archives()) if u.rel == r.rel]
    for u in units:
        own = u.bytes - sum(a.bytes for a in u.archives)
        yield _tomb(u, own)
        for a in u.archives:
            yield _tomb(a, a.bytes)


def _tomb(u: Unit, size: int) -> dict[str, Any]:
    last = None if u.last_backup is None else _dt.datetime.fromtimestamp(u.last_backup, _dt.timezone.utc)
    return {"chain": u.rel, "period": u.period, "restore_points": u.points, "bytes": size,
            "last_backup": last.isoformat(timespec="seconds") if last else None}


def _pending(cat: Catalogue, vm: str, rel: str) -> sqlite3.Row | None:
    rows = cat.query("SELECT id FROM retention_events WHERE vm = ? AND target_path = ? AND action = 'delete' "
                     "AND success IS NULL ORDER BY id DESC LIMIT 1", (vm, rel))
    return rows[0] if rows else None


def _latest_done(cat: Catalogue, vm: str, rel: str) -> bool:
    rows = cat.query("SELECT success FROM retention_events WHERE vm = ? AND target_path = ? AND action = 'delete' "
                     "ORDER BY id DESC LIMIT 1", (vm, rel))
    return bool(rows) and rows[0]["success"] == 1


def _complete(cat: Catalogue, event: int, vm: str, path: Path) -> None:
    at = now_iso()
    with cat.transaction():
        (row,) = cat.query("SELECT * FROM retention_events WHERE id = ?", (event,))
        cat.db.execute("UPDATE retention_events SET success = 1 WHERE id = ?", (event,))
        cat.db.execute("UPDATE deleted_chains SET status = 'deleted', deleted_at = ? WHERE retention_event_id = ?",
                       (at, event))
        cat.insert("file_operations", {
            "session_id": row["session_id"], "vm": vm, "at": at, "operation": "delete", "path": str(path),
            "file_type": "directory", "bytes": row["freed_bytes"], "reason": row["reason"],
            "triggered_by": row["triggered_by"], "success": 1})
        if row["target_type"] == VM:
            cat.db.execute("UPDATE vm_backups SET deleted_at = ? WHERE vm = ? AND deleted_at IS NULL", (at, vm))
        elif row["target_type"] == PERIOD and row["target_period"]:
            cat.db.execute("UPDATE vm_backups SET deleted_at = ? WHERE vm = ? AND period = ? AND deleted_at IS NULL",
                           (at, vm, row["target_period"]))
