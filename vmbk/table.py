"""Readable tables of records, for a person at a terminal.

Only presentation: the JSON records are the contract, the table is not (no
script should parse it).  Records are grouped by type, in the order the
types first appeared; each type has preferred columns, other types show
their scalar fields.
"""

from __future__ import annotations

from typing import Any

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
    "restore_point": ["chain", "index", "date", "kind", "disks", "complete", "size", "problems"],
    "verify": ["chain", "file", "structure", "checksum", "ok", "problems"],
    "dump": ["chain", "file", "virtual_size", "data_size", "data_frames", "zero_frames", "checkpoint", "date"],
    "restore_disk": ["vm", "disk", "restore_point", "target", "data_bytes", "outcome", "mb_per_s"],
    "restore": ["vm", "mode", "name", "chain", "restore_point", "date", "disks", "outcome", "duration", "warnings"],
}
SKIP = {"type", "v", "session"}
MAX_CELL = 60


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        if value and all(isinstance(v, dict) for v in value):
            return str(len(value))
        return ", ".join(_cell(v) for v in value)
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


def render(records: list[dict[str, Any]]) -> str:
    groups: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        groups.setdefault(str(rec.get("type")), []).append(rec)
    out: list[str] = []
    for rtype, rows in groups.items():
        cols = _columns(rtype, rows)
        cells = [[_cell(row.get(c)) for c in cols] for row in rows]
        widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]
        if len(groups) > 1:
            out.append(f"[{rtype}]")
        out.append("  ".join(c.upper().ljust(w) for c, w in zip(cols, widths)).rstrip())
        for r in cells:
            out.append("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
        out.append("")
    return "\n".join(out)
