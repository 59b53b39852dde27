"""Replication in the catalogue: runs, per-VM rows, the lag per destination.

vmbackup's ``replication_runs`` and ``replication_vms`` (manual, "Report 6:
Replication Status"): one run row per destination and command (push,
pull, verify), written ``running`` when it starts and closed with its
outcome (``ok``, ``partial``, ``failed``, or ``interrupted``: a signal
stopped it), totals, the tool's exit status and the first error; one row per
VM with what was copied, deleted, moved and verified.  ``last_backup`` of
a VM row is the time of the newest data file the replica holds after it:
the replication lag of a destination is how far that trails the newest
backup (vmbk-status shows it per VM and destination, `vmbk.status`).

A dry run writes nothing.  The catalogue is optional (a replica being
verified from a host without one): then nothing is recorded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vmbk.catalogue import Catalogue
from vmbk.clock import now_iso

PROG = "vmbk-replicate"


class History:
    def __init__(self, cat: Catalogue | None) -> None:
        self.cat = cat
        self._sessions: set[str] = set()

    def session(self, session: str) -> None:
        if self.cat is not None and session not in self._sessions:
            self.cat.start_session(session, PROG)
            self._sessions.add(session)

    def start(self, session: str, dest: str, transport: str, action: str, sync_mode: str | None) -> int | None:
        if self.cat is None:
            return None
        self.session(session)
        return self.cat.insert("replication_runs", {
            "session_id": session, "destination": dest, "transport": transport, "action": action,
            "sync_mode": sync_mode, "started_at": now_iso(), "outcome": "running"})

    def vm(self, run: int | None, vm: str, row: Mapping[str, Any]) -> None:
        if self.cat is None or run is None:
            return
        cols = ("outcome", "files", "bytes", "deleted", "moved", "verified", "mismatches", "duration_s",
                "tool_exit", "last_backup", "error")
        self.cat.insert("replication_vms", {"run_id": run, "vm": vm, **{c: row.get(c) for c in cols}})

    def end(self, run: int | None, row: Mapping[str, Any]) -> None:
        if self.cat is None or run is None:
            return
        cols = ("outcome", "duration_s", "files", "bytes", "deleted", "verified", "mismatches", "tool_exit", "error")
        with self.cat.transaction() as db:
            db.execute(f"UPDATE replication_runs SET {', '.join(f'{c} = ?' for c in cols)} WHERE id = ?",
                       [row.get(c) for c in cols] + [run])

    def close_session(self, session: str, code: int) -> None:
        if self.cat is not None and session in self._sessions:
            self.cat.end_session(session, code)
