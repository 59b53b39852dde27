"""What a ``--mount`` or ``--instant`` session creates is named before it exists.

Both leave state a dead process cannot undo: mounts, loop devices and
FUSE files (``--mount``); a guest running on overlays of an export that
is gone, and half-copied images (``--instant``).  So before the first of
them exists the session writes ``RUN_DIR/access-<id>.json``
(``VMBK_RUN_DIR``, ``/var/tmp/vmbk``) naming its kind and what it may
create: a locked `vmbk.runmarker` (the drill's markers are the same), held
until everything is gone; the marker goes last.  A marker whose lock can
be taken belongs to a session that is gone, however it died.

`dead` yields the content of every such marker (locked meanwhile, so
two sweeps never work on one); the session kinds' own sweeps
(`vmbk.restore.mount.sweep`, `vmbk.restore.instant.sweep`) remove what
it names and then the marker.  Every ``--serve``, ``--mount`` and
``--instant`` run sweeps first.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vmbk import runmarker

log = logging.getLogger("vmbk.restore")

PREFIX = "access-"
run_dir = runmarker.run_dir


class Marker(runmarker.Marker):
    """A live session's marker of ``kind`` (``mount``, ``instant``); held until `release`."""

    def __init__(self, kind: str, data: dict[str, Any]) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.kind = kind
        super().__init__(PREFIX, self.id, {"kind": kind, "id": self.id, **data})


def dead(kind: str) -> Iterator[tuple[Path, dict[str, Any]]]:
    """``(marker, content)`` of every ``kind`` marker whose session is gone, locked while yielded.

    The caller removes the marker when it removed what it names; a marker
    left in place is tried again by the next run.  One that is no
    session's of any kind is removed.
    """
    for path, data in runmarker.dead(PREFIX):
        if data.get("kind") != kind:
            if "kind" not in data:
                log.warning("%s: not a marker of vmbk-restore: removed", path)
                path.unlink(missing_ok=True)
            continue
        yield path, data
