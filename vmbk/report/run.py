"""vmbk-report's work, in an order where nothing hides the run's outcome.

1. Read every record of the run (the first one sends the ``start`` ping);
   each is passed on only with ``--tee``.  An input cut short is said in
   the summary and makes the run a failure (exit 7), it does not stop
   the report.
2. Fold them into the summary; add the backup file system's space.
3. Write the HTML page (``--html``, written aside and renamed), then the
   ``report`` record (JSON) or the summary as text (terminal).
4. Email (``--email``: as ``[email]`` says, when ``on_success`` /
   ``on_failure`` want this outcome), ping, webhook.

The exit status is the run's (`Summary.exit_code`); when the run went
well, a failed email makes it 6, and so does a failed ping or webhook
with ``--strict-notify``.  Every such failure is one line on standard
error.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import os
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any, Protocol

import orjson

from vmbk.errors import Exit, InputError, ToolError
from vmbk.fsutil import write_file_atomic
from vmbk.records import Record, make, new_session_id
from vmbk.report import history, mail, notify, page, text
from vmbk.report.summary import Summary
from vmbk.settings import Config

log = logging.getLogger("vmbk.report")

PROG = "vmbk-report"
#: The HTML page is for people who may read it through a web server.
HTML_MODE = 0o644


@dataclasses.dataclass(frozen=True)
class ReportOptions:
    cfg: Config
    backup_path: Path | None
    now: _dt.datetime
    email: bool = False
    attach: Path | None = None
    html: Path | None = None
    ping_url: str | None = None
    webhook_url: str | None = None
    tee: bool = False
    strict_notify: bool = False

    @property
    def host(self) -> str:
        return self.cfg.email.hostname or socket.gethostname()

    @property
    def prefix(self) -> str:
        return self.cfg.email.subject_prefix


class Sink(Protocol):
    """Where the report's output goes (the command's emitter, seen from here)."""

    json: bool

    def passthrough(self, rec: Record) -> None: ...

    def emit(self, rec: Record) -> None: ...


def disk(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    size, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
    used = 100.0 * (size - st.f_bfree * st.f_frsize) / size if size else 0.0
    return {"path": str(path), "size": size, "free": free, "used_percent": round(used, 1)}


def collect(records: Iterable[Record], summary: Summary, sink: Sink, pinger: notify.Pinger, tee: bool) -> None:
    try:
        for rec in records:
            pinger.start()
            summary.add(rec, _dt.datetime.now(_dt.timezone.utc))
            if tee:
                sink.passthrough(rec)
    except InputError as e:
        summary.input_error = str(e)


def report(opts: ReportOptions, records: Iterable[Record], sink: Sink, out: IO[Any], err: IO[Any]) -> int:
    rep = opts.cfg.report
    summary = Summary(host=opts.host)
    pinger = notify.Pinger(opts.ping_url, rep.timeout)
    collect(records, summary, sink, pinger, opts.tee)
    summary.finished = _dt.datetime.now(_dt.timezone.utc)
    if summary.started is None:
        summary.started = summary.finished
    summary.disk = disk(opts.backup_path)
    days = rep.history_days
    past = history.backups(opts.backup_path, opts.now - _dt.timedelta(days=days), opts.now)
    html = page.render(summary, opts.prefix, past, days, opts.now)
    body = text.render(summary, opts.prefix)
    fields = summary.as_fields(opts.prefix)
    failures: list[str] = []
    html_failed = False
    if opts.html is not None:
        try:
            write_file_atomic(opts.html, html.encode("utf-8"), mode=HTML_MODE)
        except OSError as e:
            failures.append(f"--html {opts.html}: {e.strerror or e}")
            html_failed = True
    rec = make("report", summary.session or new_session_id(), **fields, html=str(opts.html) if opts.html else None)
    if sink.json:
        sink.emit(rec)
    else:
        out.write(body)
        out.flush()
    notified: list[str] = []
    if opts.email:
        failures += _email(opts, summary, body, html, err)
    pinger.finish(summary.ok, body)
    notified += pinger.failures
    if opts.webhook_url:
        problem = notify.webhook(opts.webhook_url, orjson.dumps(rec), rep.timeout)
        if problem:
            notified.append(problem)
    for line in failures + notified:
        err.write(f"{PROG}: {line}\n")
    if summary.exit_code:
        return summary.exit_code
    if len(failures) > html_failed or (notified and opts.strict_notify):
        return int(Exit.TOOL)
    return int(Exit.STORAGE) if html_failed else 0


def _email(opts: ReportOptions, summary: Summary, body: str, html: str, err: IO[Any]) -> list[str]:
    cfg = opts.cfg.email
    if not cfg.enabled:
        err.write(f"{PROG}: email not sent: [email] enabled is false in the configuration\n")
        return []
    if (summary.ok and not cfg.on_success) or (not summary.ok and not cfg.on_failure):
        log.info("email not sent: on_%s is false", "success" if summary.ok else "failure")
        return []
    try:
        msg = mail.build(cfg, summary.subject(opts.prefix), body, html, opts.attach)
        log.info("email %s", mail.send(cfg, msg))
    except ToolError as e:
        return [str(e)]
    return []
