"""The one clock of the catalogue and the records: UTC, to the second.

Periods are named in the host's calendar (``--now``, see
`vmbk.commands._common.parse_now`); what is *recorded* (catalogue rows,
record times) is UTC so that histories of hosts in several zones sort
together.
"""

from __future__ import annotations

import datetime as _dt


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def now_iso() -> str:
    """``2026-12-07T02:18:54+00:00``: the catalogue's time stamps."""
    return utc_now().isoformat(timespec="seconds")
