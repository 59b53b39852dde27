"""The catalogue's word on each VM, for ``--list`` (vmrestore guide, 9.1).

"Chains: <N> active, <N> broken, last backup <ISO>", when the catalogue
exists; without one (a recovery host with only the tree), or when it
cannot be read, the listing simply has no such line.  Read-only: the
database is opened with ``mode=ro`` and never migrated from here, so
listing works on a read-only backup mount.

A chain is a directory the catalogue recorded successful backups into;
it is *active* while that directory is still in the tree (archived chains
moved away; a tree mounted at another path is followed), and *broken* when a data file the catalogue recorded in it
is gone, or when the newest backup attempt into it failed.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path
from typing import Any

from vmbk.catalogue import db_path

log = logging.getLogger("vmbk.restore")


class Health:
    def __init__(self, backup_path: Path) -> None:
        self.db: sqlite3.Connection | None = None
        self.backup_path = backup_path
        path = db_path(backup_path)
        if not path.exists():
            return
        try:
            self.db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
            self.db.execute("SELECT 1 FROM vm_backups LIMIT 1")
        except sqlite3.Error as e:
            log.warning("catalogue %s not readable (%s): --list shows the tree alone", path, e)
            self.close()

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None

    def of(self, vm: str) -> dict[str, Any] | None:
        """The health facts of ``vm``; None without a catalogue or without rows."""
        if self.db is None:
            return None
        try:
            rows = self.db.execute(
                "SELECT id, directory, outcome, started_at FROM vm_backups "
                "WHERE vm = ? AND action != 'skip' ORDER BY started_at, id", (vm,)).fetchall()
            if not rows:
                return None
            files: dict[str, list[str]] = {}
            for directory, path in self.db.execute(
                    "SELECT b.directory, f.path FROM data_files f JOIN vm_backups b ON b.id = f.vm_backup_id "
                    "WHERE b.vm = ? AND b.outcome = 'ok'", (vm,)):
                files.setdefault(directory, []).append(path)
        except sqlite3.Error as e:
            log.warning("catalogue: %s", e)
            return None
        latest: dict[str, str] = {}
        good: set[str] = set()
        for _id, directory, outcome, _at in rows:
            if directory:
                latest[directory] = outcome
                if outcome == "ok":
                    good.add(directory)
        active = sorted(d for d in good if os.path.isdir(self._here(d, vm)))
        broken = [d for d in active
                  if latest[d] != "ok" or any(not os.path.exists(self._here(p, vm)) for p in files.get(d, []))]
        ok = [at for _id, _d, outcome, at in rows if outcome == "ok"]
        last = rows[-1]
        return {
            "chains_active": len(active),
            "chains_broken": len(broken),
            "broken": broken,
            "last_backup": ok[-1] if ok else None,
            "last_attempt": last[3],
            "last_outcome": last[2],
        }


    def _here(self, recorded: str, vm: str) -> str:
        """``recorded`` (an absolute path of the host that wrote it) in this tree.

        A recovery host mounts the tree elsewhere: the part from the VM's
        directory on is looked up under this backup path.
        """
        if os.path.exists(recorded):
            return recorded
        parts = Path(recorded).parts
        for i in range(len(parts) - 1, -1, -1):
            if parts[i] == vm:
                return str(self.backup_path.joinpath(*parts[i:]))
        return recorded


def line(h: dict[str, Any]) -> str:
    return (f"Chains: {h['chains_active']} active, {h['chains_broken']} broken, "
            f"last backup {h['last_backup'] or 'never'}")
