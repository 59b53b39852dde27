"""What a drill leaves in the catalogue: a ``drills`` row and a ``restore_sessions`` row.

Both in one transaction, once the drill is over (whatever its outcome,
an interrupted one too): ``drills`` holds the checks, the level and the
pictures (vmbk-status's ``last_drill``); the ``restore_sessions`` row,
mode ``drill``, puts the drill among the restores of ``vmbk-status
--restores``, as vmrestore's restore tracking does.  The session row is
the run's, as every stage writes it (`Catalogue.start_session`,
``end_session``).  The catalogue is an index: it is created when there
is none (as vmbk-rotate does), and a failure to write it is a warning,
never the drill's outcome; a read-only backup mount records nothing.
"""

from __future__ import annotations

import json
import logging
import socket
import sqlite3
import threading
from pathlib import Path
from typing import Any

from vmbk.catalogue import Catalogue
from vmbk.errors import VmbkError

log = logging.getLogger("vmbk.drill")


class History:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._cat: Catalogue | None = None
        self._failed = False
        self._sessions: set[str] = set()
        self._lock = threading.Lock()

    def _catalogue(self) -> Catalogue | None:
        if self._cat is None and not self._failed:
            try:
                self._cat = Catalogue.open(self.root)
            except (VmbkError, OSError, sqlite3.Error) as e:
                self._failed = True
                log.warning("drills are not recorded in the catalogue: %s", e)
        return self._cat

    def _write(self, what: str, fn: Any) -> None:
        with self._lock:
            cat = self._catalogue()
            if cat is None:
                return
            try:
                fn(cat)
            except (VmbkError, OSError, sqlite3.Error) as e:
                log.warning("%s not recorded in %s: %s", what, cat.path, e)

    def session(self, session: str) -> None:
        if session not in self._sessions:
            self._sessions.add(session)
            self._write("the session", lambda cat: cat.start_session(session, "vmbk-drill", socket.gethostname()))

    def end(self, session: str, code: int) -> None:
        if session in self._sessions:
            self._write("the session's end", lambda cat: cat.end_session(session, code))

    def drill(self, session: str, row: dict[str, Any], scratch: Path) -> None:
        """The drill's rows; ``row`` has the ``drills`` columns."""
        row = {**row, "session_id": session, "checks": json.dumps(row["checks"]),
               "os": json.dumps(row["os"]) if row.get("os") is not None else None}
        restore = {"session_id": session, "vm": row["vm"], "mode": "drill", "source": row.pop("chain_path"),
                   "target": str(scratch), "restore_point": row["restore_point"], "started_at": row["started_at"],
                   "duration_s": row["duration_s"], "outcome": row["outcome"], "exit_code": row["exit_code"],
                   "error": row["error"]}

        def write(cat: Catalogue) -> None:
            with cat.transaction():
                cat.insert("drills", row)
                cat.insert("restore_sessions", restore)

        self.session(session)
        self._write(f"the drill of {row['vm']}", write)

    def close(self) -> None:
        if self._cat is not None:
            self._cat.close()
            self._cat = None
