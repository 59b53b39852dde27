"""Inline SVG charts of the catalogue's history: no script, no font, no CDN.

Per VM, the size written and the time taken by each backup over the last
days, one mark per backup attempt (``<circle class="mark ...">``: ok in
green joined by a line, failed in red on the axis), each with a tooltip;
and for all VMs a calendar strip, one cell per VM and day coloured by the
day's outcome (failed over ok over skipped).  Every name and number is
escaped: VM names are data.  Sizes come from the SVG's viewBox, so a page
scales them to a phone's width.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Sequence
from html import escape

from vmbk.human import human_duration, human_size
from vmbk.report.history import Backup

W, H = 600, 130
LEFT, RIGHT, TOP, BOTTOM = 70, 10, 10, 24
DAY = _dt.timedelta(days=1)
CELL, GAP, LABEL = 14, 2, 150
#: The day's outcome, worst first.
OUTCOMES = ("failed", "ok", "skipped")


def _fmt_time(t: _dt.datetime) -> str:
    return t.astimezone().strftime("%Y-%m-%d %H:%M")


def _x(t: _dt.datetime, since: _dt.datetime, until: _dt.datetime) -> float:
    span = (until - since).total_seconds() or 1.0
    return LEFT + (W - LEFT - RIGHT) * min(max((t - since).total_seconds() / span, 0.0), 1.0)


def _y(value: float, top: float) -> float:
    plot = H - TOP - BOTTOM
    return TOP + plot - (plot * value / top if top > 0 else 0.0)


def series(kind: str, vm: str, rows: Sequence[Backup], since: _dt.datetime, until: _dt.datetime) -> str:
    """One VM's ``size`` (bytes written) or ``duration`` chart."""
    value: Callable[[Backup], float | None]
    fmt: Callable[[float], str]
    if kind == "size":
        value, fmt, title = (lambda b: b.bytes), human_size, "written"
    else:
        value, fmt, title = (lambda b: b.duration), human_duration, "duration"
    marks = [b for b in rows if b.attempt]
    top = max((value(b) or 0.0 for b in marks), default=0.0)
    out = [f'<svg class="chart {kind}" viewBox="0 0 {W} {H}" role="img" '
           f'aria-label="{escape(vm)}: {title} per backup" xmlns="http://www.w3.org/2000/svg">']
    for frac in (0.0, 0.5, 1.0):
        y = _y(top * frac, top)
        out.append(f'<line class="grid" x1="{LEFT}" x2="{W - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>')
        label = fmt(top * frac) if top else ("0" if frac == 0 else "")
        out.append(f'<text class="axis" x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{escape(label)}</text>')
    for t, anchor in ((since, "start"), (since + (until - since) / 2, "middle"), (until, "end")):
        out.append(f'<text class="axis" x="{_x(t, since, until):.1f}" y="{H - 6}" text-anchor="{anchor}">'
                   f'{escape(t.astimezone().strftime("%b %d"))}</text>')
    ok = [b for b in marks if b.outcome == "ok" and value(b) is not None]
    if len(ok) > 1:
        points = " ".join(f"{_x(b.at, since, until):.1f},{_y(value(b) or 0.0, top):.1f}" for b in ok)
        out.append(f'<polyline class="line" points="{points}"/>')
    for b in marks:
        v = value(b)
        good = b.outcome == "ok" and v is not None
        y = _y(v or 0.0, top) if good else _y(0.0, top)
        tip = f"{_fmt_time(b.at)} {b.action} {b.outcome}" + (f": {fmt(v)}" if v is not None else "")
        out.append(f'<circle class="mark {"ok" if good else "failed"}" cx="{_x(b.at, since, until):.1f}" '
                   f'cy="{y:.1f}" r="4" data-vm="{escape(vm)}" data-at="{escape(b.at.isoformat())}">'
                   f'<title>{escape(tip)}</title></circle>')
    out.append("</svg>")
    return "".join(out)


def day_outcome(rows: Sequence[Backup]) -> str | None:
    seen = {b.outcome for b in rows}
    return next((o for o in OUTCOMES if o in seen), None)


def calendar(by_vm: dict[str, list[Backup]], until: _dt.datetime, days: int) -> str:
    """One row per VM, one cell per day (oldest left), coloured by the day's outcome."""
    last = until.astimezone().date()
    dates = [last - _dt.timedelta(days=i) for i in range(days - 1, -1, -1)]
    width = LABEL + len(dates) * (CELL + GAP)
    height = 18 + len(by_vm) * (CELL + GAP)
    out = [f'<svg class="calendar" viewBox="0 0 {width} {height}" role="img" '
           f'aria-label="outcome per VM and day" xmlns="http://www.w3.org/2000/svg">']
    for i, d in enumerate(dates):
        if d.day == 1 or i == 0 or d.weekday() == 0:
            out.append(f'<text class="axis" x="{LABEL + i * (CELL + GAP)}" y="11">{escape(d.strftime("%d"))}</text>')
    for row, (vm, rows) in enumerate(sorted(by_vm.items())):
        y = 18 + row * (CELL + GAP)
        name = vm if len(vm) <= 22 else vm[:21] + "…"
        out.append(f'<text class="label" x="0" y="{y + CELL - 3}"><title>{escape(vm)}</title>{escape(name)}</text>')
        per_day: dict[_dt.date, list[Backup]] = {}
        for b in rows:
            per_day.setdefault(b.at.astimezone().date(), []).append(b)
        for i, d in enumerate(dates):
            outcome = day_outcome(per_day.get(d, []))
            n = len(per_day.get(d, []))
            tip = f"{vm} {d.isoformat()}: " + (f"{outcome} ({n} run{'s' if n > 1 else ''})" if outcome else "no run")
            out.append(f'<rect class="day {outcome or "none"}" x="{LABEL + i * (CELL + GAP)}" y="{y}" width="{CELL}" '
                       f'height="{CELL}" rx="2" data-vm="{escape(vm)}" data-day="{d.isoformat()}">'
                       f'<title>{escape(tip)}</title></rect>')
    out.append("</svg>")
    return "".join(out)
