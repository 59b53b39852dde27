"""Child processes: reaping one that should be ending (qemu-nbd, ssh forwards, guards, FUSE servers)."""

from __future__ import annotations

import subprocess
from typing import Any


def reap(proc: subprocess.Popen[Any], timeout: float) -> None:
    """Wait up to ``timeout`` seconds for ``proc`` to exit, then kill it; it is reaped either way."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
