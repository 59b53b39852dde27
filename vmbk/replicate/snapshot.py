"""The catalogue as a replica gets it: a consistent snapshot, not the live files.

The live catalogue is in WAL mode: ``vmbk.db`` alone can lack what sits in
``vmbk.db-wal``, and copying both while a backup writes can tear them.
SQLite's online backup API copies a consistent state page by page while
others keep writing; the copy is switched to the rollback journal
(``journal_mode=DELETE``), so a replica on a read-only mount is read with
``mode=ro`` without needing a ``-wal`` or ``-shm`` file beside it.
``_state/locks/`` is never part of it: locks belong to the host that
takes them.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from vmbk.catalogue import BUSY_TIMEOUT_MS, db_path
from vmbk.errors import StorageError
from vmbk.fsutil import FILE_MODE
from vmbk.replicate.files import CATALOGUE


def take(backup_path: Path, into: Path) -> bool:
    """Write the snapshot to ``into/_state/vmbk.db``; False when there is no catalogue."""
    live = db_path(backup_path)
    if not live.exists():
        return False
    out = into / CATALOGUE
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    try:
        src = sqlite3.connect(live, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            dst = sqlite3.connect(out)
            try:
                src.backup(dst)
                dst.execute("PRAGMA journal_mode = DELETE")
            finally:
                dst.close()
        finally:
            src.close()
    except sqlite3.Error as e:
        raise StorageError(f"cannot snapshot the catalogue {live}: {e}") from None
    os.chmod(out, FILE_MODE)
    return True
