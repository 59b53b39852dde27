"""The ``restore_sessions`` row of a restore (vmrestore guide, 3 "Restore Tracking").

One row per restore, ok or failed, when the catalogue exists: the tree
is the source of truth and a recovery host may have no catalogue, so its
absence or a failure to write the row only logs a warning and never
fails the restore.  ``--dry-run`` writes none (the caller does not call).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time

from vmbk.catalogue import Catalogue
from vmbk.errors import Exit, Terminated, VmbkError
from vmbk.restore.preflight import RestoreOptions, RestorePlan
from vmbk.restore.source import SourceRef

log = logging.getLogger("vmbk.restore")


def exit_code(e: BaseException | None) -> int:
    if e is None:
        return int(Exit.OK)
    if isinstance(e, VmbkError):
        return int(e.code)
    if isinstance(e, KeyboardInterrupt):
        return int(Exit.SIGINT)
    if isinstance(e, Terminated):
        return int(Exit.SIGTERM)
    return int(Exit.GENERAL)


def record(ref: SourceRef, opts: RestoreOptions, plan: RestorePlan | None, started_at: str, t0: float,
           error: BaseException | None) -> None:
    """One ``restore_sessions`` row, if there is a catalogue; never fails the restore."""
    try:
        cat = Catalogue.open_existing(ref.backup_path)
    except VmbkError as e:
        log.warning("restore not recorded: %s", e)
        return
    if cat is None:
        log.warning("no catalogue under %s: the restore is not recorded (the backup tree alone is enough)",
                    ref.backup_path)
        return
    row = {
        "vm": ref.vm,
        "mode": opts.mode,
        "source": str(plan.point.chain.path) if plan else str(ref.chain_dir or ref.backup_path / ref.vm),
        "target": str(plan.restore_path if plan else opts.restore_path),
        "restore_point": f"{plan.point.chain.rel}:{plan.point.index}" if plan else None,
        "started_at": started_at,
        "duration_s": round(time.monotonic() - t0, 3),
        "outcome": "ok" if error is None else "failed",
        "exit_code": exit_code(error),
        "error": None if error is None else (str(error) or error.__class__.__name__),
    }
    if plan is not None and plan.remaps:
        row["remaps"] = json.dumps(list(plan.remaps))
    try:
        with cat:
            cat.insert("restore_sessions", row)
    except (VmbkError, sqlite3.Error, OSError) as e:
        log.warning("restore not recorded in %s: %s", cat.path, e)
