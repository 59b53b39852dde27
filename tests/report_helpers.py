"""What the vmbk-report and vmbk-status tests share: a run's records, a
catalogue with a history, running the commands in-process, and real
servers on loopback (SMTP through aiosmtpd, HTTP through http.server)."""

from __future__ import annotations

import datetime as _dt
import http.server
import io
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from vmbk.catalogue import Catalogue

SESSION = "20261207T013000Z-0badcafe"
HOSTILE = "wé <b>ird</b> 'vm\" & $(x)"


def rec(rtype: str, **fields: Any) -> dict[str, Any]:
    return {"type": rtype, "v": 1, "session": SESSION, **fields}


def backup(name: str, *, outcome: str = "ok", action: str = "inc", policy: str = "daily", size: int = 5 << 20,
           excluded: bool = False) -> dict[str, Any]:
    return rec("backup", name=name, action=action, policy=policy, excluded=excluded, outcome=outcome,
               consistency="frozen" if outcome == "ok" else None, bytes=size if outcome == "ok" else 0,
               duration=3.5 if outcome == "ok" else 0.0, period="20261207", checkpoint="virtnbdbackup.1",
               reasons=[])


def run_records() -> list[dict[str, Any]]:
    """A night: two VMs backed up and rotated, one excluded, one skipped, one failed."""
    return [
        backup("web"), rec("rotate", name="web", policy="daily", keep=7, kept=[{"path": "/b/web/20261207", "why": "1"}],
                           removed=[], protected=[], freed_bytes=0, warnings=[]),
        backup(HOSTILE, action="full", policy="weekly", size=9 << 20),
        backup("tmpl", action="skip", policy="never", excluded=True, outcome="skipped"),
        backup("cold", action="skip", policy="monthly", outcome="skipped"),
        rec("error", stage="vmbk-backup", vm="db", kind="vm", code=5, message="VM 'db' not found"),
    ]


def lines(records: list[dict[str, Any]]) -> str:
    return "".join(orjson.dumps(r).decode() + "\n" for r in records)


def run_cmd(main: Any, argv: list[str], stdin: str = "") -> tuple[int, list[dict[str, Any]], str]:
    """A command in-process: (exit code, records, what it wrote to stdout)."""
    out = io.StringIO()
    code = main(argv, io.StringIO(stdin), out)
    text = out.getvalue()
    recs = [orjson.loads(x) for x in text.splitlines() if x.startswith("{")]
    return code, recs, text


def history(root: Path, now: _dt.datetime, vms: dict[str, int], days: int = 30) -> list[dict[str, Any]]:
    """A catalogue with a backup of each VM every night (every 7th one failed
    for the first VM, every 5th a skip for the last): the rows written."""
    rows = []
    with Catalogue.open(root) as cat:
        for d in range(days, 0, -1):
            at = (now - _dt.timedelta(days=d, hours=-1)).astimezone(_dt.timezone.utc)
            session = at.strftime("%Y%m%dT%H%M%SZ") + "-00000000"
            cat.db.execute("INSERT INTO sessions (id, started_at, ended_at, command, exit_code) VALUES (?,?,?,?,?)",
                           (session, at.isoformat(timespec="seconds"), (at + _dt.timedelta(minutes=5))
                            .isoformat(timespec="seconds"), "vmbk-backup", 0))
            for i, (vm, base) in enumerate(sorted(vms.items())):
                failed = i == 0 and d % 7 == 0
                skip = i == len(vms) - 1 and d % 5 == 0
                row = {"session_id": session, "vm": vm, "action": "skip" if skip else ("full" if d % 10 == 0 else "inc"),
                       "policy": "daily", "outcome": "failed" if failed else "skipped" if skip else "ok",
                       "error": "disk full" if failed else None, "reasons": "[]",
                       "started_at": (at + _dt.timedelta(minutes=i)).isoformat(timespec="seconds"),
                       "duration_s": None if failed or skip else 2.0 + d % 4,
                       "bytes": None if failed or skip else base + d * 1000}
                cat.insert("vm_backups", row)
                rows.append(row)
    return rows


# -- SMTP ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_cert(d: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (and localhost)."""
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


@dataclass
class Mailbox:
    """What the SMTP server received: envelopes and the logins it saw."""

    envelopes: list[Any] = field(default_factory=list)
    logins: list[tuple[str, bool]] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.envelopes.append(envelope)
        return "250 OK"


# -- HTTP ---------------------------------------------------------------------------------


@dataclass
class Hits:
    requests: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200
    delay: float = 0.0

    def paths(self) -> list[str]:
        return [r["path"] for r in self.requests]

    def wait_for(self, path: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while path not in self.paths():
            assert time.monotonic() < deadline, (path, self.paths())
            time.sleep(0.02)


def http_server() -> Iterator[tuple[str, Hits]]:
    """A real HTTP server on loopback that records every request."""
    hits = Hits()

    class Handler(http.server.BaseHTTPRequestHandler):
        def _do(self) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n) if n else b""
            hits.requests.append({"method": self.command, "path": self.path, "body": body,
                                  "type": self.headers.get("Content-Type")})
            if hits.delay:
                time.sleep(hits.delay)
            try:
                self.send_response(hits.status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"OK")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up waiting (a timeout test)

        do_GET = do_POST = _do

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/ping/abc", hits
    finally:
        server.shutdown()
        server.server_close()
