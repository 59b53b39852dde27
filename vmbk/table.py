"""Readable tables of records, for a person at a terminal.

Only presentation: the JSON records are the contract, the table is not (no
script should parse it).  Records are grouped by type, in the order the
types first appeared; each type has preferred columns, other types show
their scalar fields.

Numbers are made human here and only here, for every command: byte counts
as ``3.4 GiB`` (fields in `SIZES`), times as ages (``5 h ago``, fields in
`AGES`), seconds as durations (``4 min 12 s``).  Records keep the exact
numbers.  Words that say how things went (``ok``, ``failed``, ``stale``)
are coloured when the caller says the terminal can show colour
(`wants_colour`).
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Callable, Mapping
from typing import Any, IO

from vmbk.human import age_of, human_duration, human_size

COLUMNS: dict[str, list[str]] = {
    "vm": ["name", "state", "policy", "disks", "excluded", "reason"],
    "plan": ["name", "action", "period", "checkpoint", "reasons"],
    "backup": ["name", "action", "checkpoint", "consistency", "outcome", "bytes", "duration"],
    "error": ["vm", "stage", "kind", "code", "message"],
    # vmbk-rotate (removed, kept, protected: their counts; --json for every path and reason)
    "rotate": ["name", "policy", "keep", "kept", "removed", "protected", "freed_bytes", "dry_run", "warnings"],
    "prune_target": ["name", "target", "bytes", "periods", "archives", "command"],
    # vmbk-restore
    "backup_vm": ["vm", "layout", "policy", "periods", "restore_points", "incomplete_points",
                  "archived_chains", "disks", "tags", "size", "last_backup", "health"],
    "chain": ["vm", "chain", "base", "restore_points", "complete", "disks", "size", "warnings"],
    "restore_point": ["chain", "index", "date", "kind", "disks", "complete", "resumable", "size", "problems"],
    "verify": ["chain", "file", "structure", "checksum", "ok", "problems"],
    "dump": ["chain", "file", "virtual_size", "data_size", "data_frames", "zero_frames", "checkpoint", "date"],
    "restore_disk": ["vm", "disk", "restore_point", "target", "data_bytes", "outcome", "mb_per_s"],
    "restore": ["vm", "mode", "name", "chain", "restore_point", "date", "disks", "outcome", "duration", "warnings"],
    # vmbk-status
    "status": ["vm", "state", "policy", "newest_point", "last_attempt", "restore_points", "chains", "bytes", "lock",
               "replication"],
    "session_history": ["started_at", "command", "exit_code", "duration", "backed_up", "failed", "skipped", "bytes",
                        "freed_bytes", "replicated"],
    "restore_history": ["started_at", "vm", "mode", "restore_point", "target", "outcome", "exit_code", "duration",
                        "error"],
    "report": ["subject", "outcome", "exit_code", "backed_up", "skipped", "excluded", "failed", "bytes"],
    # vmbk-drill
    "drill": ["vm", "point", "why", "outcome", "level", "checks", "seconds", "error"],
}
#: Fields that are byte counts.
SIZES = frozenset({"size", "bytes", "freed_bytes", "data_bytes", "virtual_size", "data_size", "stored_size",
                   "needed_bytes", "free_bytes", "pre_restore_size"})
#: Fields that are times (ISO 8601): shown as how long ago.
AGES = frozenset({"last_backup", "newest_point", "oldest_point", "started_at", "last_success"})
#: Fields that are seconds taken.
DURATIONS = frozenset({"duration", "seconds", "duration_s"})
#: Columns whose words are coloured.
COLOURED = frozenset({"state", "outcome", "lock", "complete", "ok"})
SKIP = {"type", "v", "session"}
MAX_CELL = 60

GREEN, RED, YELLOW, DIM, RESET = "\033[32m", "\033[31m", "\033[33m", "\033[2m", "\033[0m"
COLOURS = {"ok": GREEN, "yes": GREEN, "failed": RED, "stale": RED, "broken": RED, "missing": RED, "no": RED,
           "partial": YELLOW, "held": YELLOW, "skipped": DIM, "excluded": DIM, "dry-run": DIM}


def wants_colour(out: IO[Any]) -> bool:
    """Colour only on a terminal that has it, and never when NO_COLOR is set."""
    if os.environ.get("NO_COLOR") or os.environ.get("TERM", "dumb") == "dumb":
        return False
    try:
        return out.isatty()
    except (AttributeError, ValueError):
        return False


# -- cells ------------------------------------------------------------------------


def _status_cells(rec: Mapping[str, Any], now: _dt.datetime) -> dict[str, str]:
    """vmbk-status: one line per VM, the nested facts said in a few words."""
    out: dict[str, str] = {}
    attempt = rec.get("last_attempt")
    if isinstance(attempt, Mapping):
        out["last_attempt"] = f"{attempt.get('outcome')} {age_of(attempt.get('at'), now) or ''}".strip()
    points, good = rec.get("restore_points"), rec.get("complete_points")
    if isinstance(points, int):
        out["restore_points"] = f"{good}/{points}" if good != points else str(points)
    chains = [f"{rec.get(k)} {w}" for k, w in (("chains_active", "active"), ("chains_archived", "archived"),
                                                ("chains_broken", "broken")) if rec.get(k)]
    out["chains"] = ", ".join(chains) or "-"
    reps = rec.get("replication")
    if isinstance(reps, list) and reps:
        out["replication"] = ", ".join(
            f"{r.get('destination')}: {r.get('last_outcome') or '-'}"
            + (f", {human_duration(r['lag_s'])} behind" if isinstance(r.get("lag_s"), (int, float)) and r["lag_s"]
               else "") for r in reps if isinstance(r, Mapping))
    return out


def _drill_cells(rec: Mapping[str, Any], now: _dt.datetime) -> dict[str, str]:
    """vmbk-drill: the point as CHAIN:INDEX, the checks as how many passed."""
    out: dict[str, str] = {}
    point = rec.get("point")
    if isinstance(point, Mapping):
        out["point"] = f"{point.get('chain')}:{point.get('restore_point')}"
    checks = [c for c in rec.get("checks") or [] if isinstance(c, Mapping)]
    passed = sum(1 for c in checks if c.get("verdict") == "passed")
    out["checks"] = f"{passed}/{len(checks)} passed"
    return out


DERIVED: dict[str, Callable[[Mapping[str, Any], _dt.datetime], dict[str, str]]] = {"status": _status_cells,
                                                                                  "drill": _drill_cells}


def _cell(key: str, value: Any, now: _dt.datetime) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key in SIZES and isinstance(value, (int, float)):
        return human_size(value)
    if key in DURATIONS and isinstance(value, (int, float)):
        return human_duration(value)
    if key in AGES:
        age = age_of(value, now)
        if age is not None:
            return age
    if isinstance(value, list):
        if value and all(isinstance(v, dict) for v in value):
            return str(len(value))
        return ", ".join(_cell("", v, now) for v in value)
    if isinstance(value, dict):
        return "{...}"
    text = str(value)
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"


def _columns(rtype: str, rows: list[dict[str, Any]]) -> list[str]:
    if rtype in COLUMNS:
        return COLUMNS[rtype]
    cols: list[str] = []
    for row in rows:
        for key, value in row.items():
            if key not in SKIP and key not in cols and not isinstance(value, (dict, list)):
                cols.append(key)
    return cols


def _paint(col: str, text: str, padded: str) -> str:
    colour = COLOURS.get(text) if col in COLOURED else None
    return f"{colour}{padded}{RESET}" if colour else padded


def render(records: list[dict[str, Any]], *, colour: bool = False, now: _dt.datetime | None = None) -> str:
    now = now or _dt.datetime.now(_dt.timezone.utc)
    groups: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        groups.setdefault(str(rec.get("type")), []).append(rec)
    out: list[str] = []
    for rtype, rows in groups.items():
        cols = _columns(rtype, rows)
        derive = DERIVED.get(rtype)
        cells = []
        for row in rows:
            extra = derive(row, now) if derive else {}
            cells.append([extra[c] if c in extra else _cell(c, row.get(c), now) for c in cols])
        widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]
        if len(groups) > 1:
            out.append(f"[{rtype}]")
        out.append("  ".join(c.upper().ljust(w) for c, w in zip(cols, widths)).rstrip())
        for r in cells:
            line = "  ".join(_paint(c, v, v.ljust(w)) if colour else v.ljust(w) for c, v, w in zip(cols, r, widths))
            out.append(line.rstrip())
        out.append("")
    return "\n".join(out)
