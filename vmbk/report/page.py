"""The HTML report: one self-contained page, readable on a phone.

No script, no external style sheet, font, image or CDN: the style is
inline and the charts are inline SVG (`vmbk.report.charts`), so the page
works from a file, as an email's HTML part (the same page) and offline.
Everything that comes from records or the catalogue is escaped.
"""

from __future__ import annotations

import base64
import datetime as _dt
from html import escape
from pathlib import Path

from vmbk import __version__
from vmbk.human import human_duration, human_size
from vmbk.report import charts
from vmbk.report.history import Backup
from vmbk.report.summary import Summary, VmRow
from vmbk.report.text import VM_HEADERS, vm_cells

STYLE = """
:root{color-scheme:light}
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;padding:12px;color:#1d2329;
background:#f6f7f9;line-height:1.4;font-size:15px}
main{max-width:980px;margin:0 auto}
h1{font-size:1.15em;margin:.2em 0 .6em}h2{font-size:1.05em;margin:1.4em 0 .5em}h3{font-size:.95em;margin:.8em 0 .2em}
.badge{display:inline-block;padding:.1em .6em;border-radius:1em;color:#fff;font-weight:600;margin-right:.4em}
.badge.ok{background:#2e7d32}.badge.failed{background:#c62828}
.cards{display:flex;flex-wrap:wrap;gap:8px}
.card{background:#fff;border-radius:8px;padding:8px 12px;min-width:120px;box-shadow:0 1px 2px #0001}
.card b{display:block;font-size:1.4em}
.scroll{overflow-x:auto;background:#fff;border-radius:8px;box-shadow:0 1px 2px #0001}
table{border-collapse:collapse;width:100%;font-size:.92em}
th,td{padding:6px 8px;text-align:left;border-bottom:1px solid #e4e7eb;white-space:nowrap}
th{font-size:.8em;text-transform:uppercase;color:#5f6b76;font-weight:600}
td.err{white-space:normal;min-width:14em}
tr.failed td:nth-child(2){color:#c62828;font-weight:600}tr.success td:nth-child(2){color:#2e7d32}
.vmchart{background:#fff;border-radius:8px;padding:6px 10px;margin:8px 0;box-shadow:0 1px 2px #0001}
.pair{display:grid;grid-template-columns:repeat(auto-fit,minmax(280px,1fr));gap:8px}
svg{width:100%;height:auto;display:block}
svg .grid{stroke:#e4e7eb}svg .axis,svg .label{font-size:11px;fill:#5f6b76}
svg .line{fill:none;stroke:#2e7d32;stroke-width:1.5}
svg .mark.ok{fill:#2e7d32}svg .mark.failed{fill:#c62828}
svg .day.ok{fill:#2e7d32}svg .day.failed{fill:#c62828}svg .day.skipped{fill:#9aa5b1}svg .day.none{fill:#e9ecef}
.legend span{display:inline-block;width:.8em;height:.8em;border-radius:2px;margin:0 .3em 0 .8em;vertical-align:-1px}
footer{color:#5f6b76;font-size:.85em;margin:2em 0 1em}
"""


def _t(t: _dt.datetime | None) -> str:
    return "-" if t is None else t.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def _table(headers: list[str], rows: list[list[str]], classes: list[str] | None = None,
           keys: list[str] | None = None) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = []
    for i, r in enumerate(rows):
        cls = f' class="{escape(classes[i])}"' if classes else ""
        key = f' data-vm="{escape(keys[i])}"' if keys else ""
        last = len(r) - 1
        cells = "".join((f'<td class="err">{escape(c)}</td>' if j == last else f"<td>{escape(c)}</td>")
                        for j, c in enumerate(r))
        body.append(f"<tr{cls}{key}>{cells}</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def render(s: Summary, prefix: str, history: list[Backup] | None, days: int, now: _dt.datetime) -> str:
    c = s.counts()
    ok = "ok" if s.ok else "failed"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(s.subject(prefix))}</title><style>{STYLE}</style></head><body><main>",
        f'<h1><span class="badge {ok}">{"OK" if s.ok else "FAILED"}</span>{escape(s.subject(prefix))}</h1>',
        '<div class="cards">',
    ]
    for label, value in (("backed up", c["backed_up"]), ("failed", c["failed"]), ("skipped", c["skipped"]),
                         ("excluded", c["excluded"]), ("written", human_size(s.bytes)),
                         ("duration", human_duration(s.duration) if s.duration is not None else "-")):
        parts.append(f'<div class="card"><b>{escape(str(value))}</b>{escape(label)}</div>')
    parts.append("</div>")
    per = ", ".join(f"{p}: {n}" for p, n in c["per_policy"].items())
    facts = [("Host", s.host), ("Session", s.session or "-"), ("Started", _t(s.started)), ("Finished", _t(s.finished)),
             ("Exit status", str(s.exit_code)), ("Backed up per policy", per)]
    if s.disk:
        facts.append(("Backup file system", f"{human_size(s.disk['free'])} free of {human_size(s.disk['size'])} "
                                            f"({s.disk['used_percent']:.0f}% used), {s.disk['path']}"))
    if s.input_error:
        facts.append(("Input cut short", s.input_error))
    if not s.records:
        facts.append(("Records", "none arrived: did the commands before vmbk-report run, or die?"))
    parts.append("<h2>Run</h2>" + _table(["", ""], [[k, v] for k, v in facts]))
    rows = sorted(s.vms.values(), key=lambda r: r.vm)
    parts.append(f"<h2>VMs ({len(rows)})</h2>")
    parts.append(_table(VM_HEADERS, [vm_cells(r) for r in rows], [r.status.lower() for r in rows],
                        [r.vm for r in rows]) if rows else "<p>No VM in this run.</p>")
    rot = [r for r in rows if r.rotate]
    if rot:
        parts.append("<h2>Retention</h2>" + _table(
            ["VM", "kept", "removed", "freed", "warnings"],
            [[r.vm, str(r.rotate["kept"]), str(r.rotate["removed"]),
              human_size(r.rotate["freed_bytes"] or 0), "; ".join(r.rotate["warnings"])] for r in rot if r.rotate]))
    rep = [[r.vm, str(x["destination"]), str(x["outcome"]), human_size(x["bytes"] or 0), ""]
           for r in rows for x in r.replication]
    rep += [[r.vm, str(e["destination"] or "-"), "failed", "-", str(e["message"])]
            for r in rows for e in r.errors if e.get("stage") == "vmbk-replicate"]
    if rep:
        parts.append("<h2>Replication</h2>" + _table(["VM", "destination", "outcome", "size", "error"], rep))
    drilled = [r for r in rows if r.drill]
    if drilled:
        parts.append(_drills(drilled))
    if s.stage_errors:
        parts.append("<h2>Errors of a stage</h2>" + _table(
            ["stage", "exit", "message"], [[str(e["stage"]), str(e["code"]), str(e["message"])] for e in s.stage_errors]))
    parts.append(_history(history, days, now))
    parts.append(f"<footer>vmbk-report {escape(__version__)}, {escape(_t(now))}</footer></main></body></html>")
    return "\n".join(parts) + "\n"


#: A drill's screenshot is shown in the page up to this size (it is inline: the page stays one file).
MAX_PICTURE = 512 << 10


def _drills(rows: list[VmRow]) -> str:
    """The run's restore tests (vmbk-drill): verdict, level, and the guest's screen."""
    out = ["<h2>Restore drills</h2>", _table(
        ["VM", "outcome", "level", "point", "time", "error"],
        [[r.vm, str(d["outcome"]), str(d["level"]), str(d["point"]), human_duration(d["seconds"] or 0),
          str(d["error"] or "")] for r in rows if (d := r.drill)],
        ["success" if r.drill and r.drill["outcome"] == "ok" else "failed" for r in rows], [r.vm for r in rows])]
    for r in rows:
        png = _picture((r.drill or {}).get("screenshot"))
        if png:
            out.append(f'<div class="vmchart" data-vm="{escape(r.vm)}"><h3>{escape(r.vm)} <small>(its drill\'s '
                       f'screen)</small></h3><img alt="screenshot of the drill of {escape(r.vm)}" '
                       f'style="max-width:100%" src="data:image/png;base64,{png}"></div>')
    return "\n".join(out)


def _picture(path: object) -> str | None:
    """A drill's PNG, base64, when it is there and small enough."""
    if not isinstance(path, str):
        return None
    try:
        data = Path(path).read_bytes()[:MAX_PICTURE + 1]
    except OSError:
        return None
    if len(data) > MAX_PICTURE or not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    return base64.b64encode(data).decode("ascii")


def _history(history: list[Backup] | None, days: int, now: _dt.datetime) -> str:
    head = f"<h2>The last {days} days</h2>"
    if history is None:
        return head + "<p>No catalogue: the history of backups is in the catalogue (_state/vmbk.db).</p>"
    since = now - _dt.timedelta(days=days)
    by_vm: dict[str, list[Backup]] = {}
    for b in history:
        by_vm.setdefault(b.vm, []).append(b)
    if not by_vm:
        return head + "<p>No backup in the catalogue over these days.</p>"
    out = [head, '<div class="vmchart"><h3>Outcome per day</h3>', charts.calendar(by_vm, now, days),
           '<div class="legend"><span style="background:#2e7d32"></span>ok<span style="background:#c62828"></span>'
           'failed<span style="background:#9aa5b1"></span>skipped<span style="background:#e9ecef"></span>no run</div>'
           "</div>"]
    for vm, rows in sorted(by_vm.items()):
        n = sum(1 for b in rows if b.attempt)
        out.append(f'<div class="vmchart" data-vm="{escape(vm)}"><h3>{escape(vm)} '
                   f'<small>({n} backup{"s" if n != 1 else ""})</small></h3><div class="pair">'
                   f'<div>Written{charts.series("size", vm, rows, since, now)}</div>'
                   f'<div>Duration{charts.series("duration", vm, rows, since, now)}</div></div></div>')
    return "\n".join(out)
