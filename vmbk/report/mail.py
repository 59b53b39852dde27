"""The report by email (vmbackup manual, "Email Reporting System", "email.conf").

One message: the subject line of the summary, a text part (the summary as
text) and an HTML part (the same page ``--html`` writes), and the run's
log attached when given (``--attach FILE``; its last `MAX_ATTACH` bytes).
Sent through SMTP -- plain, STARTTLS or TLS, verified against the
system's CAs or ``smtp_ca_file``, with a login whose password is read from
``smtp_password_file`` (never a command line) -- or handed to the local
``sendmail`` binary.  Every failure to send is a `ToolError` (exit 6)
that says what failed; the caller keeps the run's own outcome.
"""

from __future__ import annotations

import email.utils
import logging
import smtplib
import ssl
import subprocess
from email.message import EmailMessage
from pathlib import Path

from vmbk.errors import ToolError
from vmbk.settings import Email

log = logging.getLogger("vmbk.report")

#: An attached log is cut to its last bytes (a run's log is read from its end).
MAX_ATTACH = 4 << 20


def build(cfg: Email, subject: str, text: str, html: str | None, attach: Path | None) -> EmailMessage:
    msg = EmailMessage()
    msg["Subject"] = subject
    msg["From"] = cfg.sender or ""
    msg["To"] = ", ".join(cfg.recipients)
    msg["Date"] = email.utils.formatdate(localtime=True)
    msg["Message-ID"] = email.utils.make_msgid(domain=(cfg.sender or "vmbk").rpartition("@")[2] or None)
    msg.set_content(text)
    if html is not None:
        msg.add_alternative(html, subtype="html")
    if attach is not None:
        data = _tail(attach)
        msg.add_attachment(data.decode("utf-8", "replace"), subtype="plain", filename=attach.name)
    return msg


def _tail(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - MAX_ATTACH))
            data = f.read()
    except OSError as e:
        raise ToolError(f"email: cannot attach {path}: {e.strerror or e}") from None
    if size > MAX_ATTACH:
        data = b"[... the first %d bytes are left out ...]\n" % (size - MAX_ATTACH) + data
    return data


def send(cfg: Email, msg: EmailMessage) -> str:
    """Send ``msg``; a line for the log saying where it went."""
    if not cfg.recipients or not cfg.sender:
        raise ToolError("email: [email] needs 'to' and 'sender'")
    if cfg.transport == "sendmail":
        return _sendmail(cfg, msg)
    return _smtp(cfg, msg)


def _password(cfg: Email) -> str | None:
    if cfg.smtp_password_file is None:
        return None
    try:
        return Path(cfg.smtp_password_file).read_text().rstrip("\r\n")
    except OSError as e:
        raise ToolError(f"email: cannot read smtp_password_file {cfg.smtp_password_file}: {e.strerror}") from None


def _smtp(cfg: Email, msg: EmailMessage) -> str:
    where = f"{cfg.smtp_host}:{cfg.port}"
    password = _password(cfg)
    try:
        context = ssl.create_default_context(cafile=cfg.smtp_ca_file) if cfg.smtp_tls != "none" else None
    except (OSError, ssl.SSLError) as e:
        raise ToolError(f"email: cannot load smtp_ca_file {cfg.smtp_ca_file}: {e}") from None
    try:
        smtp: smtplib.SMTP
        if cfg.smtp_tls == "tls":
            smtp = smtplib.SMTP_SSL(cfg.smtp_host, cfg.port, timeout=cfg.timeout, context=context)
        else:
            smtp = smtplib.SMTP(cfg.smtp_host, cfg.port, timeout=cfg.timeout)
        with smtp:
            smtp.ehlo()
            if cfg.smtp_tls == "starttls":
                smtp.starttls(context=context)
                smtp.ehlo()
            if cfg.smtp_user:
                smtp.login(cfg.smtp_user, password or "")
            refused = smtp.send_message(msg, from_addr=cfg.sender, to_addrs=list(cfg.recipients))
    except smtplib.SMTPAuthenticationError as e:
        raise ToolError(f"email: {where} refused the login of {cfg.smtp_user!r}: {e.smtp_code} "
                        f"{_text(e.smtp_error)}") from None
    except smtplib.SMTPNotSupportedError as e:
        raise ToolError(f"email: {where}: {e}") from None
    except smtplib.SMTPRecipientsRefused as e:
        raise ToolError(f"email: {where} refused every recipient: {', '.join(e.recipients)}") from None
    except smtplib.SMTPResponseException as e:
        raise ToolError(f"email: {where} answered {e.smtp_code} {_text(e.smtp_error)}") from None
    except (smtplib.SMTPException, ssl.SSLError) as e:
        raise ToolError(f"email: {where}: {e}") from None
    except OSError as e:
        raise ToolError(f"email: cannot reach the SMTP server {where}: {e.strerror or e}") from None
    if refused:
        log.warning("email: %s refused some recipients: %s", where, ", ".join(refused))
    return f"sent to {', '.join(cfg.recipients)} through {where}"


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _sendmail(cfg: Email, msg: EmailMessage) -> str:
    argv = [cfg.sendmail, "-oi", "-f", cfg.sender or "", "--", *cfg.recipients]
    try:
        r = subprocess.run(argv, input=msg.as_bytes(), capture_output=True, timeout=cfg.timeout, check=False)
    except FileNotFoundError:
        raise ToolError(f"email: no sendmail at {cfg.sendmail} (install an MTA, or set [email] transport = "
                        f"\"smtp\")") from None
    except subprocess.TimeoutExpired:
        raise ToolError(f"email: {cfg.sendmail} did not finish within {cfg.timeout} s") from None
    except OSError as e:
        raise ToolError(f"email: cannot run {cfg.sendmail}: {e.strerror}") from None
    if r.returncode != 0:
        detail = r.stderr.decode("utf-8", "replace").strip().splitlines()
        raise ToolError(f"email: {cfg.sendmail} failed (exit {r.returncode})" + (f": {detail[-1]}" if detail else ""))
    return f"handed to {cfg.sendmail} for {', '.join(cfg.recipients)}"
