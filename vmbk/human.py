"""Numbers for people: sizes, durations, ages, times.

The records carry exact numbers (bytes, seconds, ISO 8601); whatever a
person reads -- a terminal table, a report, an email -- says them the
same way: ``3.4 GiB``, ``4 min 12 s``, ``5 h ago``.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any


def human_size(n: int | float) -> str:
    """``512 B``, ``3.4 GiB``, ``120 GiB``."""
    value, units = float(n), ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    i = 0
    while abs(value) >= 1024 and i < len(units) - 1:
        value /= 1024
        i += 1
    if i == 0:
        return f"{int(value)} B"
    return f"{value:.1f} {units[i]}" if abs(value) < 100 else f"{value:.0f} {units[i]}"


def human_duration(seconds: float) -> str:
    """``0.4 s``, ``4 min 12 s``, ``2 h 5 min``, ``3 d 4 h``."""
    s = float(seconds)
    if s < 60:
        return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m} min {sec} s" if sec else f"{m} min"
    h, m = divmod(m, 60)
    if h < 48:
        return f"{h} h {m} min" if m else f"{h} h"
    d, h = divmod(h, 24)
    return f"{d} d {h} h" if h else f"{d} d"


def human_age(seconds: float) -> str:
    """``45 s ago``, ``12 min ago``, ``5 h ago``, ``3 d ago`` (``in 2 h`` for the future)."""
    s = abs(float(seconds))
    if s < 90:
        text = f"{s:.0f} s"
    elif s < 90 * 60:
        text = f"{s / 60:.0f} min"
    elif s < 48 * 3600:
        text = f"{s / 3600:.0f} h"
    else:
        text = f"{s / 86400:.0f} d"
    return f"in {text}" if seconds < 0 else f"{text} ago"


def parse_time(value: Any) -> _dt.datetime | None:
    if not isinstance(value, str):
        return None
    try:
        t = _dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return t if t.tzinfo else t.astimezone()


def age_of(value: Any, now: _dt.datetime) -> str | None:
    t = parse_time(value)
    return None if t is None else human_age((now - t).total_seconds())
