"""Root of the test suite: fixtures live in tests/fixtures/, one plugin per role.

The suite runs in UTC whatever the machine's zone: periods follow the
host's calendar (`vmbk.commands._common.parse_now`), and the golden plans
are written for UTC.  Tests of other zones set TZ themselves.
"""

import os
import time

os.environ["TZ"] = "UTC"
time.tzset()

pytest_plugins = [
    "fixtures.nbd_servers",
    "fixtures.guest",
    "fixtures.replication",
]
