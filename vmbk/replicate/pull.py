"""``--pull``: a VM's tree back from a replica, verified, ready for vmbk-restore.

The disaster-recovery path: on a new host with vmbk and the destination's
configuration, ``vmbk-replicate --pull --dest NAME --vm VM --to DIR`` then
``vmbk-restore --backup-path DIR --vm VM ...``.  The files come in the
order a push uses (data, side files, commit files: a pull cut short shows
its points as incomplete, never as good), through the transport's safe
writes (rsync's partial directory, rclone's staging directory), and every
file is then compared by content with the replica (rsync ``--checksum``,
``rclone check``/``cryptcheck``).  The target must not hold a tree of that
VM already: a pull never mixes two trees.  The replica's catalogue snapshot
comes along when the target has none (history for the new host,
`vmbk.replicate.run`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from vmbk.errors import StorageError, VmbkError
from vmbk.fsutil import SECRET_DIR_MODE, SECRET_FILE_MODE, ensure_dir
from vmbk.lock import VmLock
from vmbk.records import Record
from vmbk.replicate import files
from vmbk.replicate.files import PHASES
from vmbk.replicate.history import History
from vmbk.replicate.local import durable
from vmbk.replicate.report import replicate_record
from vmbk.replicate.transport import Transport
from vmbk.settings import Replication
from vmbk.tree import names


def pull(dest: Replication, t: Transport, vm: str, to: Path, session: str, history: History) -> Record:
    started = time.monotonic()
    target = to / vm
    if target.exists() and any(target.iterdir()):
        raise StorageError(f"{target} exists and is not empty: pull into another --to directory (or move it away)",
                           vm=vm)
    ensure_dir(to)
    run = history.start(session, dest.name, t.kind, "pull", dest.sync_mode)
    row: dict[str, object] = {"outcome": "failed"}
    try:
        with VmLock(to, vm, purpose="pull"):
            listing = t.listing([vm])
            if not listing:
                raise StorageError(f"{dest.name} ({t.where()}) holds no tree of {vm!r}", vm=vm)
            rels = sorted(listing)
            for p in PHASES:
                batch = [r for r in rels if files.phase(r) == p]
                t.fetch(batch, to)
                durable(to, batch)
            _secrets_private(to, rels)
            mismatches = t.mismatches(to, rels)
            if mismatches:
                raise StorageError(f"{len(mismatches)} pulled file(s) differ from {dest.name}: "
                                   f"{', '.join(mismatches[:5])}", vm=vm)
        size = sum(e.size for e in listing.values())
        row = {"outcome": "ok", "files": len(rels), "bytes": size, "verified": "checksum", "mismatches": 0}
        return replicate_record(session, vm, dest, t.kind, "pull", "ok", path=str(target), files=len(rels),
                                bytes=size, deleted=0, moved=0, verify="checksum", verified=len(rels), mismatches=[],
                                duration=round(time.monotonic() - started, 3))
    except VmbkError as e:
        row["error"] = str(e)
        row["tool_exit"] = getattr(e, "tool_exit", None)
        raise
    finally:
        row["duration_s"] = round(time.monotonic() - started, 3)
        history.vm(run, vm, row)
        history.end(run, row)


def _secrets_private(root: Path, rels: list[str]) -> None:
    """TPM state and BitLocker keys root-only again (a cloud copy does not keep modes)."""
    for rel in rels:
        if not files.is_secret(rel):
            continue
        os.chmod(root / rel, SECRET_FILE_MODE)
        parts = rel.split("/")
        for i in range(len(parts) - 1, 0, -1):
            os.chmod(root.joinpath(*parts[:i]), SECRET_DIR_MODE)
            if parts[i - 1] == names.TPM_STATE:
                break
