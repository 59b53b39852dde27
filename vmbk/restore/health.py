"""Is a chain whole, and the health line of ``--list`` (vmrestore guide, 9.1).

"Chains: <N> active, <N> broken, last backup <ISO>" comes from the tree,
the one source of truth, by the rule the ``chain`` records of
``--list-restore-points`` use (`complete`), so the two listings cannot
disagree: a chain is *active* when it is a period directory (or the
accumulate chain) that the listing shows -- data or leftovers of a
backup, archives do not count -- and *broken* when it is not complete: a
restore point that cannot be restored, or a flaw of the chain as a whole
(`vmbk.tree.points.chain_warnings`).  A failed backup that was cleaned
up breaks nothing; an archived chain is no longer in its period.

The catalogue (an index, DESIGN "On-disk layout") adds what the tree
cannot know: the last attempt and how it ended, appended to the line when
the newest attempt failed.  It is read-only (``mode=ro``, never migrated
from here, so listing works on a read-only backup mount) and optional:
without one (a recovery host with the tree alone), or when it cannot be
read, the line has no such part.  vmbackup's catalogue
(`vmbk.vmbackup.db`) is read the same way; its failed attempt is named
when it is the newest, marked "(vmbackup)".
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vmbk.catalogue import db_path
from vmbk.tree.points import RestorePoint, chain_complete
from vmbk.tree import Chain

log = logging.getLogger("vmbk.restore")


def of_chains(chains: Sequence[Chain], points: Mapping[str, Sequence[RestorePoint]] | None = None) -> dict[str, Any]:
    """``chains_active``, ``chains_broken`` and ``broken_chains`` (their rel paths)
    of a VM's chains (archives are not looked at)."""
    active = [c for c in chains if c.data or c.partials]
    broken = [c.rel for c in active if not chain_complete(c, None if points is None else points.get(c.rel))]
    return {"chains_active": len(active), "chains_broken": len(broken), "broken_chains": broken}


def line(h: Mapping[str, Any], last_backup: str | None, history: Mapping[str, Any] | None = None,
         vmbackup: Mapping[str, Any] | None = None) -> str:
    """The health line; the newest attempt of either catalogue, when it failed, is named
    (vmbackup's marked so: a site that switched has both)."""
    text = (f"Chains: {h['chains_active']} active, {h['chains_broken']} broken, "
            f"last backup {last_backup or 'never'}")
    attempts = [(a.get("last_attempt") or "", a.get("last_outcome"), mark)
                for a, mark in ((history, ""), (vmbackup, " (vmbackup)")) if a]
    if attempts:
        at, outcome, mark = max(attempts, key=lambda a: a[0])
        if outcome == "failed":
            text += f"; last attempt {at} failed{mark}"
    return text


class History:
    """The catalogue's history of a VM's backups, when there is a catalogue."""

    def __init__(self, backup_path: Path) -> None:
        self.db: sqlite3.Connection | None = None
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
        """``last_backup`` (start of the newest successful backup), ``last_attempt``
        and ``last_outcome``; None without a catalogue or without rows."""
        if self.db is None:
            return None
        try:
            rows = self.db.execute(
                "SELECT outcome, started_at FROM vm_backups WHERE vm = ? AND action != 'skip' "
                "ORDER BY started_at, id", (vm,)).fetchall()
        except sqlite3.Error as e:
            log.warning("catalogue: %s", e)
            return None
        if not rows:
            return None
        ok = [at for outcome, at in rows if outcome == "ok"]
        return {"last_backup": ok[-1] if ok else None, "last_attempt": rows[-1][1], "last_outcome": rows[-1][0]}
