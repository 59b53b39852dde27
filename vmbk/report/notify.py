"""Notifications over HTTP: the dead-man's-switch ping and the webhook.

The ping follows healthchecks.io (and the cron monitors built like it):
``URL/start`` when the first record of the run arrives, ``URL`` when the
run went well, ``URL/fail`` when it did not, the summary as the body, so
a run that never ends, or never starts, is noticed by the service's
schedule.  The webhook gets the summary as JSON (the ``report`` record),
for ntfy, Gotify or Slack-style hooks.

Requests are short (``[report] timeout``, 10 s), never retried, and a
failure is only said: the caller decides whether it changes the exit
status (``--strict-notify``).  The start ping runs in a thread so that a
slow service never stalls the pipe.
"""

from __future__ import annotations

import threading
import urllib.error
import urllib.request

from vmbk import __version__

USER_AGENT = f"vmbk-report/{__version__}"


def url_of(base: str, suffix: str) -> str:
    return base.rstrip("/") + (f"/{suffix}" if suffix else "")


def post(url: str, body: bytes, content_type: str, timeout: float) -> str | None:
    """POST ``body``; None when the server said 2xx, else what went wrong."""
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": content_type, "User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            resp.read(65536)
            status = int(resp.status)
    except urllib.error.HTTPError as e:
        return f"{url}: HTTP {e.code} {e.reason}"
    except urllib.error.URLError as e:
        return f"{url}: {e.reason}"
    except (OSError, ValueError) as e:  # timeouts, resets, a malformed URL
        return f"{url}: {e}"
    return None if 200 <= status < 300 else f"{url}: HTTP {status}"


class Pinger:
    """The pings of one run: start (in the background), then success or fail."""

    def __init__(self, url: str | None, timeout: float) -> None:
        self.url = url
        self.timeout = timeout
        self.failures: list[str] = []
        self._start: threading.Thread | None = None

    def start(self) -> None:
        if self.url is None or self._start is not None:
            return
        self._start = threading.Thread(target=self._ping, args=("start", b""), name="ping-start", daemon=True)
        self._start.start()

    def _ping(self, suffix: str, body: bytes) -> None:
        assert self.url is not None
        err = post(url_of(self.url, suffix), body, "text/plain; charset=utf-8", self.timeout)
        if err is not None:
            self.failures.append(f"ping: {err}")

    def finish(self, ok: bool, body: str) -> None:
        if self.url is None:
            return
        self.start()  # a run without records still says it started
        if self._start is not None:
            self._start.join(self.timeout + 1)
        self._ping("" if ok else "fail", body.encode("utf-8"))


def webhook(url: str, payload: bytes, timeout: float) -> str | None:
    err = post(url, payload, "application/json", timeout)
    return None if err is None else f"webhook: {err}"
