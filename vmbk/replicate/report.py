"""The records of vmbk-replicate: one ``replicate`` per VM and destination.

A VM that could not be replicated to a destination is an ``error`` record
instead, with the destination named (``destination``), so that the stages
after this one and the exit code see which copy is missing: the other
destinations and VMs go on.  See vmbk-json(7), "replicate".
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

from vmbk.errors import VmbkError
from vmbk.records import Record, error_record, make
from vmbk.settings import Replication

PROG = "vmbk-replicate"


def replicate_record(session: str, vm: str, dest: Replication, transport: str, action: str, outcome: str,
                     **fields: Any) -> Record:
    return make("replicate", session, vm=vm, destination=dest.name, transport=transport, action=action,
                sync_mode=dest.sync_mode, outcome=outcome, **fields)


def error(e: VmbkError, *, session: str, vm: str | None, dest: Replication | None) -> Record:
    rec = error_record(e, stage=PROG, session=session, vm=vm)
    if dest is not None:
        rec["destination"] = dest.name
    return rec


def iso(mtime: float | None) -> str | None:
    if mtime is None:
        return None
    return _dt.datetime.fromtimestamp(mtime, _dt.UTC).isoformat(timespec="seconds")
