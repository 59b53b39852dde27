"""vmbk-report: the summary of a run, its HTML page in a real browser, the
email through a real SMTP server on loopback (aiosmtpd), the ping and the
webhook against a real HTTP server on loopback."""

from __future__ import annotations

import datetime as _dt
import email
import email.policy
import os
import re
import ssl
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from browser import Browser, chromium
from report_helpers import (
    HOSTILE,
    Mailbox,
    backup,
    free_port,
    history,
    http_server,
    lines,
    make_cert,
    rec,
    run_cmd,
    run_records,
)

from vmbk.commands.report import main as report_main
from vmbk.errors import Exit
from vmbk.report.summary import Summary

ROOT = Path(__file__).resolve().parents[2]
NOW = _dt.datetime(2026, 12, 7, 3, 0, tzinfo=_dt.timezone.utc)


@pytest.fixture
def etc(tmp_path, monkeypatch):
    d = tmp_path / "etc"
    d.mkdir()
    monkeypatch.setenv("VMBK_CONFIG_DIR", str(d))
    return d


def config(etc: Path, text: str) -> None:
    (etc / "default.toml").write_text(text)


# -- the summary ----------------------------------------------------------------------------


def summary(records) -> Summary:
    s = Summary(host="host1")
    for r in records:
        s.add(r, NOW)
    return s


def test_the_summary_counts_every_category_and_says_the_run_s_outcome():
    s = summary(run_records())
    c = s.counts()
    assert (c["backed_up"], c["excluded"], c["skipped"], c["failed"]) == (2, 1, 1, 1)
    assert c["per_policy"] == {"daily": 1, "weekly": 1, "monthly": 0, "accumulate": 0}
    assert s.subject("[VM Backup]") == "[VM Backup] 2 backed up, 1 skipped, 1 excluded, 1 FAILED - host1"
    assert s.exit_code == Exit.PARTIAL and s.bytes == 14 << 20
    assert s.vms["web"].rotate["kept"] == 1 and s.vms["db"].status == "FAILED"

    ok = summary([backup("web"), backup("db")])
    assert ok.subject("[VM Backup]") == "[VM Backup] 2 backed up - OK - host1" and ok.exit_code == 0
    all_failed = summary([rec("error", stage="vmbk-backup", vm=v, kind="lock", code=3, message="locked")
                          for v in ("a", "b")])
    assert all_failed.exit_code == Exit.LOCK
    # a later stage's failure: the VM stays backed up, the subject names the stage
    later = summary([backup("web"), rec("error", stage="vmbk-replicate", vm="web", kind="tool", code=6,
                                        message="rsync failed", destination="nas")])
    assert later.vms["web"].status == "SUCCESS" and later.exit_code == Exit.PARTIAL
    assert later.subject("[VM Backup]") == "[VM Backup] 1 backed up, replicate 1 FAILED - host1"
    assert summary([]).exit_code == Exit.GENERAL  # nothing arrived: the pipe before died silently


def test_the_command_consumes_the_run_and_tee_passes_it_on_byte_for_byte(etc, tmp_path):
    records = run_records()
    code, out, _ = run_cmd(report_main, ["--json"], lines(records))
    assert code == Exit.PARTIAL and [r["type"] for r in out] == ["report"]
    r = out[0]
    assert r["session"] == records[0]["session"] and r["failed"] == 1 and r["records"] == len(records)
    assert {v["vm"] for v in r["vms"]} == {"web", HOSTILE, "tmpl", "cold", "db"}

    text = lines(records).replace('"v":1,', '"v": 1,', 1)  # passed on as read, not re-encoded
    code, out, raw = run_cmd(report_main, ["--json", "--tee"], text)
    assert code == Exit.PARTIAL and raw.startswith(text) and out[-1]["type"] == "report"

    cut = lines(records)[:-20]  # the stage before died mid-record
    code, out, _ = run_cmd(report_main, ["--json"], cut)
    assert code == Exit.PARTIAL or code == Exit.USAGE
    assert "ends in the middle of a record" in out[0]["input_error"]
    assert "input cut short" in out[0]["subject"]


def test_on_a_terminal_the_summary_is_a_table(etc, tmp_path):
    r = subprocess.run(["script", "-qec", f"{sys.executable} {ROOT}/bin/vmbk-report < {tmp_path}/in.jsonl",
                        "/dev/null"], capture_output=True, text=True, input="",
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path) if _write(
        tmp_path / "in.jsonl", lines(run_records())) else None
    assert r is not None and r.returncode == Exit.PARTIAL, r
    assert "VM" in r.stdout and "STATUS" in r.stdout and "CONSISTENCY" in r.stdout
    assert "✓ Backed up: 2" in r.stdout and "5.0 MiB" in r.stdout and "{" not in r.stdout


def _write(path: Path, text: str) -> bool:
    path.write_text(text)
    return True


# -- the HTML page in a real browser ---------------------------------------------------------


def test_the_html_page_is_self_contained_and_escapes_every_name(etc, tmp_path):
    root = tmp_path / "b"
    root.mkdir()
    history(root, NOW, {HOSTILE: 1 << 20, "web": 2 << 20})
    page = tmp_path / "r.html"
    code, out, _ = run_cmd(report_main, ["--json", "--backup-path", str(root), "--html", str(page),
                                         "--now", NOW.isoformat()], lines(run_records()))
    assert code == Exit.PARTIAL and out[0]["html"] == str(page)
    html = page.read_text()
    assert "<script" not in html and "<link" not in html and "@import" not in html and "url(" not in html
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)
    assert "<b>ird</b>" not in html and "wé &lt;b&gt;ird&lt;/b&gt; &#x27;vm&quot; &amp; $(x)" in html
    assert oct(page.stat().st_mode & 0o777) == "0o644"


@pytest.mark.skipif(chromium() is None, reason="chromium is installed by scripts/setup-host")
def test_the_html_report_in_a_real_browser(etc, tmp_path):
    """Rendered by chromium without a console error, on a desktop and a phone:
    a row per VM of the run, one mark per backup of the catalogue in each chart,
    a calendar cell per VM and day; a screenshot is taken."""
    root = tmp_path / "b"
    root.mkdir()
    rows = history(root, NOW, {HOSTILE: 1 << 20, "web": 2 << 20, "db": 3 << 20})
    page = tmp_path / "report.html"
    run_cmd(report_main, ["--json", "--backup-path", str(root), "--html", str(page), "--now", NOW.isoformat()],
            lines(run_records()))
    attempts = [r for r in rows if r["action"] != "skip"]
    with Browser() as b:
        for width, mobile in ((1000, False), (390, True)):
            b.open(page, width=width, mobile=mobile)
            assert b.console_errors() == []
            assert b.evaluate("[...document.querySelectorAll('tr[data-vm]')].map(e => e.dataset.vm).sort()") == \
                sorted(["web", HOSTILE, "tmpl", "cold", "db"])
            for kind in ("size", "duration"):
                marks = b.evaluate(f"[...document.querySelectorAll('svg.{kind} .mark')]"
                                   ".map(e => [e.dataset.vm, e.classList.contains('ok')])")
                assert len(marks) == len(attempts)
                for vm in ("web", HOSTILE, "db"):
                    mine = [r for r in attempts if r["vm"] == vm]
                    assert [m for m in marks if m[0] == vm] == [[vm, r["outcome"] == "ok"] for r in mine]
            assert b.evaluate("document.querySelectorAll('svg.calendar rect.day').length") == 3 * 30
            assert b.evaluate("document.querySelectorAll('svg.calendar rect.day.failed').length") == 4
            # nothing wider than the phone's screen but the tables, which scroll
            assert b.evaluate("document.documentElement.scrollWidth") <= width
        b.screenshot(tmp_path / "report.png")
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- email through a real SMTP server ----------------------------------------------------------


@pytest.fixture
def smtp(tmp_path):
    """Factory: an aiosmtpd server on 127.0.0.1 (plain, or STARTTLS with a generated
    certificate and a login that must be right)."""
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult

    started = []

    def factory(*, starttls: bool = False, password: str = "s3cret"):
        box = Mailbox()

        def auth(server, session, envelope, mechanism, data):
            ok = data.login == b"vmbk" and data.password == password.encode()
            box.logins.append((data.login.decode(), ok))
            return AuthResult(success=ok, handled=False)

        kwargs = {}
        cert = None
        if starttls:
            cert, key = make_cert(tmp_path)
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(cert, key)
            kwargs = {"tls_context": ctx, "require_starttls": True, "auth_required": True,
                      "authenticator": auth}
        port = free_port()
        c = Controller(box, hostname="127.0.0.1", port=port, **kwargs)
        c.start()
        started.append(c)
        return box, port, cert

    yield factory
    for c in started:
        c.stop()


def email_config(etc: Path, port: int, extra: str = "") -> None:
    config(etc, f'[email]\nenabled = true\nto = "ops@example.org, dba@example.org"\nsender = "vmbk@host1.example"\n'
                f'smtp_host = "127.0.0.1"\nsmtp_port = {port}\nhostname = "host1"\ntimeout = 10\n{extra}')


def parse(envelope) -> email.message.EmailMessage:
    return email.message_from_bytes(envelope.content, policy=email.policy.default)


def test_the_email_has_the_subject_recipients_text_html_and_the_log(etc, tmp_path, smtp):
    box, port, _ = smtp()
    email_config(etc, port)
    log = tmp_path / "run.log"
    log.write_text("vmbk-backup: db: VM 'db' not found\n")
    page = tmp_path / "r.html"
    code, _, _ = run_cmd(report_main, ["--json", "--email", "--attach", str(log), "--html", str(page)],
                         lines(run_records()))
    assert code == Exit.PARTIAL  # the run's outcome, the mail went out
    (env,) = box.envelopes
    assert env.mail_from == "vmbk@host1.example" and env.rcpt_tos == ["ops@example.org", "dba@example.org"]
    msg = parse(env)
    assert msg["Subject"] == "[VM Backup] 2 backed up, 1 skipped, 1 excluded, 1 FAILED - host1"
    text = msg.get_body(("plain",)).get_content()
    html = msg.get_body(("html",)).get_content()
    assert "✗ Failed:    1" in text and "VM 'db' not found" in text
    assert html.replace("\r\n", "\n") == page.read_text()  # the email's HTML part is the page
    (att,) = list(msg.iter_attachments())
    assert att.get_filename() == "run.log" and att.get_content().replace("\r\n", "\n") == log.read_text()


def test_starttls_with_a_login_and_its_failures(etc, tmp_path, smtp, capsys):
    box, port, cert = smtp(starttls=True)
    secret = tmp_path / "smtp.pass"
    secret.write_text("s3cret\n")
    tls = f'smtp_tls = "starttls"\nsmtp_user = "vmbk"\nsmtp_password_file = "{secret}"\nsmtp_ca_file = "{cert}"\n'
    email_config(etc, port, tls)
    ok = lines([backup("web")])
    code, _, _ = run_cmd(report_main, ["--json", "--email"], ok)
    assert code == 0 and box.logins == [("vmbk", True)] and len(box.envelopes) == 1
    assert parse(box.envelopes[0])["Subject"] == "[VM Backup] 1 backed up - OK - host1"

    secret.write_text("wrong\n")  # the login fails: exit 6 when the run went well ...
    capsys.readouterr()
    code, _, _ = run_cmd(report_main, ["--json", "--email"], ok)
    assert code == Exit.TOOL and len(box.envelopes) == 1
    assert "refused the login of 'vmbk': 535" in capsys.readouterr().err
    code, _, _ = run_cmd(report_main, ["--json", "--email"], lines(run_records()))
    assert code == Exit.PARTIAL  # ... and never hides a failed run

    email_config(etc, port, f'smtp_tls = "starttls"\nsmtp_user = "vmbk"\nsmtp_password_file = "{secret}"\n')
    code, _, _ = run_cmd(report_main, ["--json", "--email"], ok)  # a certificate nobody vouches for
    assert code == Exit.TOOL and "CERTIFICATE_VERIFY_FAILED" in capsys.readouterr().err


def test_a_server_that_is_down_is_exit_6_and_on_success_false_sends_nothing(etc, tmp_path, smtp, capsys):
    email_config(etc, free_port())
    code, out, _ = run_cmd(report_main, ["--json", "--email"], lines([backup("web")]))
    err = capsys.readouterr().err
    assert code == Exit.TOOL and "cannot reach the SMTP server 127.0.0.1" in err and out[0]["outcome"] == "ok"
    box, port, _ = smtp()
    email_config(etc, port, "on_success = false\n")
    assert run_cmd(report_main, ["--json", "--email"], lines([backup("web")]))[0] == 0
    assert box.envelopes == []
    run_cmd(report_main, ["--json", "--email"], lines(run_records()))
    assert len(box.envelopes) == 1  # on_failure still mails a failed run


def test_sendmail_gets_the_message_and_the_recipients_as_arguments(etc, tmp_path):
    spool = tmp_path / "spool"
    fake = tmp_path / "sendmail"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {spool}.args\ncat > {spool}\n')
    fake.chmod(0o755)
    config(etc, f'[email]\nenabled = true\ntransport = "sendmail"\nsendmail = "{fake}"\nto = "ops@example.org"\n'
                f'sender = "vmbk@example.org"\n')
    assert run_cmd(report_main, ["--json", "--email"], lines([backup("web")]))[0] == 0
    assert Path(f"{spool}.args").read_text().split() == ["-oi", "-f", "vmbk@example.org", "--", "ops@example.org"]
    assert email.message_from_bytes(spool.read_bytes())["Subject"].startswith("[VM Backup] 1 backed up - OK")
    fake.write_text("#!/bin/sh\necho 'no route' >&2\nexit 75\n")
    assert run_cmd(report_main, ["--json", "--email"], lines([backup("web")]))[0] == Exit.TOOL


# -- ping and webhook against a real HTTP server ---------------------------------------------------


@pytest.fixture
def web():
    yield from http_server()


def test_ping_start_when_the_first_record_arrives_then_success(etc, tmp_path, web):
    url, hits = web
    p = subprocess.Popen([sys.executable, str(ROOT / "bin" / "vmbk-report"), "--json", "--ping", url],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.stdin is not None
    p.stdin.write(lines([backup("web")]).encode())
    p.stdin.flush()
    hits.wait_for("/ping/abc/start")  # before the run ended
    assert p.poll() is None
    p.stdin.write(lines([backup("db")]).encode())
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert hits.paths() == ["/ping/abc/start", "/ping/abc"]
    assert b"2 backed up - OK" in hits.requests[1]["body"]


def test_ping_fail_with_the_summary_and_the_webhook_gets_the_report_record(etc, tmp_path, web):
    url, hits = web
    hook = url.replace("/ping/abc", "/hook")
    code, out, _ = run_cmd(report_main, ["--json", "--ping", url, "--webhook", hook], lines(run_records()))
    assert code == Exit.PARTIAL
    assert [r["path"] for r in hits.requests] == ["/ping/abc/start", "/ping/abc/fail", "/hook"]
    assert b"1 FAILED" in hits.requests[1]["body"] and b"VM 'db' not found" in hits.requests[1]["body"]
    assert hits.requests[2]["type"] == "application/json" and orjson.loads(hits.requests[2]["body"]) == out[0]


def test_notification_failures_are_said_and_change_the_exit_only_when_strict(etc, tmp_path, web, capsys):
    url, hits = web
    hits.status = 500
    ok = lines([backup("web")])
    assert run_cmd(report_main, ["--json", "--ping", url], ok)[0] == 0
    assert "ping: " in capsys.readouterr().err
    assert run_cmd(report_main, ["--json", "--ping", url, "--strict-notify"], ok)[0] == Exit.TOOL
    assert run_cmd(report_main, ["--json", "--ping", url, "--strict-notify"], lines(run_records()))[0] == Exit.PARTIAL
    hits.status, hits.delay = 200, 3.0  # a service that hangs: the [report] timeout cuts it short
    config(etc, "[report]\ntimeout = 1\n")
    t0 = _dt.datetime.now()
    assert run_cmd(report_main, ["--json", "--webhook", url, "--strict-notify"], ok)[0] == Exit.TOOL
    assert (_dt.datetime.now() - t0).total_seconds() < 2.9 and "timed out" in capsys.readouterr().err
    down = f"http://127.0.0.1:{free_port()}/x"
    assert run_cmd(report_main, ["--json", "--ping", down], ok)[0] == 0
    assert "Connection refused" in capsys.readouterr().err


def test_every_field_of_the_report_record_is_documented(etc, tmp_path):
    from contract_doc import undocumented

    records = run_records() + [
        rec("replicate", vm="web", destination="nas", transport="local", action="push", sync_mode="mirror",
            outcome="ok", bytes=1, files=2),
        rec("error", stage="vmbk-replicate", vm="web", kind="tool", code=6, message="x", destination="cloud"),
        rec("error", stage="vmbk-rotate", vm=None, kind="storage", code=4, message="y")]
    root = tmp_path / "b"
    root.mkdir()
    code, out, _ = run_cmd(report_main, ["--json", "--backup-path", str(root), "--html", str(tmp_path / "r.html")],
                           lines(records))
    (r,) = out
    assert r["disk"] and r["stage_errors"] and r["later_failures"] == [{"stage": "vmbk-replicate", "vms": 1}]
    cut = run_cmd(report_main, ["--json"], lines(records)[:-5])[1]
    assert undocumented(out + cut) == {}
