"""vmbk-report: the summary of a run, as text, HTML, email and notifications.

Usage:
  vmbk-report [options]
  vmbk-report (-h | --help | --version)

The end of the pipe:

  vmbk-discover | vmbk-plan | vmbk-backup | vmbk-rotate | vmbk-replicate | vmbk-report --email

Reads every record of the run on standard input and builds the session
summary: VMs backed up (per policy), excluded, skipped and failed; per VM
its status, action, policy, consistency, duration, bytes and errors; what
rotate and replicate did; the space of the backup file system; and the
subject line, `[VM Backup] 3 backed up, 1 FAILED - host`.  The records
are consumed: passed on only with --tee (then the `report` record comes
last).  On a terminal it prints the summary as text; in a pipe (or with
the option --json) it writes one `report` record.

With --email the summary is sent as `[email]` says: through SMTP (host,
port, none/STARTTLS/TLS, a login whose password is read from
`smtp_password_file`, never from a command line) or the local sendmail;
`on_success` and `on_failure` choose which outcomes are mailed.  The text
part is the summary, the HTML part the page --html writes; --attach FILE
attaches the run's log (its end).  With --html FILE a self-contained page
(no script, font or CDN; inline SVG; readable on a phone) is written:
the summary, a table of the VMs, and charts from the catalogue's last
`[report] history_days` days: bytes written and time taken by every
backup of each VM, and a calendar strip of each VM's outcome per day.

With --ping URL (or `[report] ping_url`) a dead-man's switch in the style
of healthchecks.io is pinged: URL/start when the first record arrives,
URL when the run went well, URL/fail with the summary as the body when it
did not.  With --webhook URL (or `[report] webhook_url`) the `report`
record is posted as JSON (ntfy, Gotify, Slack-style hooks).  Requests time
out after `[report] timeout` seconds (10); a failure is said on standard
error and changes nothing unless --strict-notify.

Exit status: the run's, as the last stage would give it (0, 9 when some
VMs failed, the failures' code when all did; 7 when the input was cut
short; 1 when no record arrived) -- a notification never hides it.  When the run went well: 6 when
the email could not be sent (or, with --strict-notify, a ping or webhook
failed), 4 when the --html page could not be written.

Options:
  --email                  Send the summary by email ([email] in the configuration).
  --attach FILE            Attach FILE (the run's log) to the email.
  --html FILE              Write the HTML report to FILE.
  --ping URL               Ping URL/start, URL or URL/fail (default [report] ping_url).
  --webhook URL            Post the report record to URL as JSON (default [report] webhook_url).
  --strict-notify          A failed ping or webhook is a failure (exit 6).
  --tee                    Pass every record on, then the report record.
  --now ISO8601            End the charts' days at this time.
  --config-instance NAME   Configuration instance (also VMBK_INSTANCE).
  --backup-path DIR        Backup root (charts, disk space); wins over the configuration.
  --json                   JSON lines even on a terminal.
  -h --help                Show this help.
  --version                Show the version.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO, Any

from vmbk import cli
from vmbk.commands._common import Common, input_records, make_emitter, parse_now
from vmbk.errors import UsageError
from vmbk.records import stdin_is_pipe
from vmbk.report import run
from vmbk.report.run import PROG, ReportOptions


def _url(value: str | None, option: str) -> str | None:
    if value is not None and not value.startswith(("http://", "https://")):
        raise UsageError(f"{option} must be an http:// or https:// URL, not {value!r}")
    return value


def body(args: dict[str, Any], ctx: cli.Context) -> int:
    common = Common.from_args(args)
    cfg = common.config()
    path = cfg.backup_path if cfg.backup_path is not None and cfg.backup_path.is_dir() else None
    attach, html = args["--attach"], args["--html"]
    if attach and not args["--email"]:
        raise UsageError("--attach goes with --email")
    opts = ReportOptions(
        cfg=cfg, backup_path=path, now=parse_now(args["--now"]), email=bool(args["--email"]),
        attach=Path(attach) if attach else None, html=Path(html) if html else None,
        ping_url=_url(args["--ping"], "--ping") or cfg.report.ping_url,
        webhook_url=_url(args["--webhook"], "--webhook") or cfg.report.webhook_url,
        tee=bool(args["--tee"]), strict_notify=bool(args["--strict-notify"]))
    if not stdin_is_pipe(ctx.stdin):
        raise UsageError("vmbk-report reads the records of a run on its standard input: "
                         "... | vmbk-replicate | vmbk-report")
    emitter = make_emitter(ctx, common, changes_state=True)
    try:
        code = run.report(opts, input_records(ctx, standalone=False), emitter, ctx.stdout, ctx.stderr)
    finally:
        emitter.close()
    return code or (int(emitter.exit_code()) if emitter.undelivered_count else 0)


def main(argv: list[str] | None = None, stdin: IO[Any] | None = None, stdout: IO[Any] | None = None) -> int:
    return cli.run(__doc__ or "", body, argv, stdin, stdout, prog=PROG)
