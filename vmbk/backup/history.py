"""What a backup run leaves in the catalogue (see vmbk.catalogue).

The catalogue is an index and a history; a failure to write it is logged,
never a reason to fail a backup whose data is safely on disk.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

import orjson

from vmbk.catalogue import Catalogue
from vmbk.clock import now_iso
from vmbk.policy import PlannedVm
from vmbk.records import Record

log = logging.getLogger("vmbk.backup")


class History:
    def __init__(self, catalogue: Catalogue | None) -> None:
        self.cat = catalogue
        self.started: set[str] = set()

    def _guard(self, what: str, fn: Callable[[Catalogue], object]) -> None:
        if self.cat is None:
            return
        try:
            fn(self.cat)
        except Exception as e:  # never let the index break a backup
            log.warning("catalogue: cannot record %s: %s", what, e)

    def session(self, session: str) -> None:
        if session not in self.started:
            self.started.add(session)
            self._guard("session", lambda cat: cat.start_session(session, "vmbk-backup", socket.gethostname()))

    def end(self, session: str, code: int) -> None:
        self._guard("session end", lambda cat: cat.end_session(session, code))

    def backup(self, session: str, planned: PlannedVm, rec: Record, started_at: str, error: str | None = None) -> None:
        """The rows of one VM's backup; ``started_at`` is when its handling began."""
        plan = planned.plan

        def write(cat: Catalogue) -> None:
            # One transaction: a VM's rows are recorded whole or not at all.
            with cat.transaction():
                vb = cat.insert("vm_backups", {
                    "session_id": session, "vm": plan.name, "vm_uuid": plan.uuid, "action": plan.action,
                    "policy": plan.policy or None, "period": plan.period, "directory": planned.target_dir,
                    "checkpoint": plan.checkpoint, "parent": plan.parent,
                    "consistency": rec.get("consistency"), "outcome": rec.get("outcome", "failed"), "error": error,
                    "reasons": orjson.dumps(list(plan.reasons)).decode(), "started_at": started_at,
                    "duration_s": rec.get("duration"), "bytes": rec.get("bytes"),
                })
                for d in rec.get("disks") or []:
                    if "path" not in d:
                        continue
                    cat.insert("data_files", {
                        "vm_backup_id": vb, "path": d["path"], "disk": d["target"], "level": d["level"],
                        "checkpoint": plan.checkpoint if d["level"] != "copy" else None,
                        "virtual_size": d["virtual_size"], "data_size": d["data_size"],
                        "stored_size": d["stored_size"], "checksum": str(d["checksum"]), "read_s": d["seconds"],
                        "write_s": None,
                    })
                for ev in rec.get("events") or []:
                    cat.insert("chain_events", {"session_id": session, "vm": plan.name, "at": now_iso(), **ev})

        self._guard("backup of " + plan.name, write)
