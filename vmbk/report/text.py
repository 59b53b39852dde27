"""The summary as text: the terminal's output, the email's text part, the
ping's body (vmbackup manual, "Session Summary Format" and "Email Format")."""

from __future__ import annotations

import datetime as _dt

from vmbk.human import human_duration, human_size
from vmbk.report.summary import Summary, VmRow

MAX_ERROR = 100


def _time(t: _dt.datetime | None) -> str:
    return "-" if t is None else t.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def _size(n: int | None) -> str:
    return "-" if n is None else human_size(n)


def _dur(s: float | None) -> str:
    return "-" if s is None else human_duration(s)


def table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return out


def vm_cells(r: VmRow) -> list[str]:
    err = "; ".join(f"{e['stage']}: {e['message']}" for e in r.errors)
    if len(err) > MAX_ERROR:
        err = err[: MAX_ERROR - 1] + "…"
    return [r.vm, r.status, r.action or "-", r.policy or "-", r.consistency or "-", _dur(r.duration),
            _size(r.bytes), err]


VM_HEADERS = ["VM", "STATUS", "ACTION", "POLICY", "CONSISTENCY", "DURATION", "SIZE", "ERROR"]


def render(s: Summary, prefix: str) -> str:
    c = s.counts()
    per = ", ".join(f"{p}: {n}" for p, n in c["per_policy"].items())
    lines = [
        s.subject(prefix), "",
        f"Host:     {s.host}",
        f"Session:  {s.session or '-'}",
        f"Started:  {_time(s.started)}",
        f"Finished: {_time(s.finished)}",
        f"Duration: {_dur(s.duration)}",
        f"Outcome:  {'OK' if s.ok else 'FAILED'} (exit status {s.exit_code})", "",
        f"Total VMs: {c['vms']}",
        f"  ✓ Backed up: {c['backed_up']}  ({per})",
        f"  ○ Excluded:  {c['excluded']}  (policy never or the configuration)",
        f"  ◇ Skipped:   {c['skipped']}  (shut off and unchanged, or nothing to do)",
        f"  ✗ Failed:    {c['failed']}",
    ]
    if c["dry_run"]:
        lines.append(f"  · Dry run:   {c['dry_run']}")
    lines.append(f"Total written: {human_size(s.bytes)}")
    if s.disk:
        lines.append(f"Backup file system: {human_size(s.disk['free'])} free of {human_size(s.disk['size'])} "
                     f"({s.disk['used_percent']:.0f}% used) at {s.disk['path']}")
    if s.input_error:
        lines += ["", f"INPUT CUT SHORT: {s.input_error}"]
    if not s.records:
        lines += ["", "No records arrived: did the commands before vmbk-report run, or die?"]
    rows = sorted(s.vms.values(), key=lambda r: r.vm)
    if rows:
        lines += ["", *table(VM_HEADERS, [vm_cells(r) for r in rows])]
    rot = [r for r in rows if r.rotate]
    if rot:
        lines += ["", "Retention (vmbk-rotate):"]
        lines += table(["VM", "KEPT", "REMOVED", "FREED", "WARNINGS"],
                       [[r.vm, str(r.rotate["kept"]), str(r.rotate["removed"]),
                         _size(r.rotate["freed_bytes"]), "; ".join(r.rotate["warnings"])] for r in rot if r.rotate])
    rep = [(r.vm, x) for r in rows for x in r.replication]
    rep_errors = [(r.vm, e) for r in rows for e in r.errors if e.get("stage") == "vmbk-replicate"]
    if rep or rep_errors:
        lines += ["", "Replication (vmbk-replicate):"]
        lines += table(["VM", "DESTINATION", "OUTCOME", "SIZE", "ERROR"],
                       [[vm, str(x["destination"]), str(x["outcome"]), _size(x["bytes"]), ""] for vm, x in rep]
                       + [[vm, str(e["destination"] or "-"), "failed", "-", str(e["message"])] for vm, e in rep_errors])
    if s.stage_errors:
        lines += ["", "Errors of a stage as a whole:"]
        lines += [f"  {e['stage']}: {e['message']} (exit {e['code']})" for e in s.stage_errors]
    for r in rows:
        if r.errors:
            lines += ["", f"{r.vm}:"] + [f"  {e['stage']}: {e['message']}" for e in r.errors]
    return "\n".join(lines) + "\n"
