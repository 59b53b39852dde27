"""Root of the test suite: fixtures live in tests/fixtures/, one plugin per role.

The suite runs in UTC whatever the machine's zone: periods follow the
host's calendar (`vmbk.commands._common.parse_now`), and the golden plans
are written for UTC.  Tests of other zones set TZ themselves.  The signing
key of the manifests lives in a temporary key directory (VMBK_KEY_DIR).
SIGINT is made deliverable again when the suite was started with it
ignored (``nohup``, ``cmd &`` in a script): the commands under test inherit
an ignored signal and rightly keep ignoring it, and the signal tests
would see a backup that finishes instead.
"""

import os
import signal
import tempfile
import time

os.environ["TZ"] = "UTC"
time.tzset()
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
# Backups sign their manifests with the host's key, made on first use:
# never in the real /etc/vmbk/keys (vmbk.manifest.keys).
os.environ.setdefault("VMBK_KEY_DIR", tempfile.mkdtemp(prefix="vmbk-test-keys-"))

pytest_plugins = [
    "fixtures.nbd_servers",
    "fixtures.guest",
    "fixtures.replication",
    "fixtures.remote",
]
