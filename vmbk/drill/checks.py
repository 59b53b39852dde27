"""The checks of a drill, each with its verdict, and the level it reached.

In order (issue #20), each with its own timeout and verdict:

``resources``  free memory for the guest and space for the scratch copy;
``disks``      every disk restored, its streams' ``.chksum`` matched while
               it was written, ``qemu-img check`` clean;
``start``      the domain starts (and its live XML shows it isolated);
``agent``      where the VM has an agent channel: ``guest-ping`` answers
               (and ``guest-get-osinfo`` names the OS);
``check``      the VM's own check (``[drill.vm."NAME"]``): a file with a
               content pattern, a command that must exit 0;
``console``    without an agent (or when it did not answer): the serial
               console shows the login prompt or the configured pattern,
               or at least the partition tables and file systems are
               readable.

The level is the highest rung the drill reached: ``none``, ``disks``,
``started``, then from the guest ``filesystems`` < ``console`` <
``agent`` < ``check``.  A drill is ``ok`` when no check failed (a check
that did not apply is ``skipped``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vmbk.errors import Exit

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"
LEVELS = ("none", "disks", "started", "filesystems", "console", "agent", "check")


@dataclasses.dataclass
class Check:
    name: str
    verdict: str
    seconds: float
    detail: str
    timeout: float | None = None
    #: The exit status this check's failure gives (vmbk.errors).
    code: int = int(Exit.VM)
    #: The level a passed check reaches (`LEVELS`).
    level: str | None = None

    @property
    def passed(self) -> bool:
        return self.verdict == PASSED

    def as_record(self) -> dict[str, Any]:
        return {"check": self.name, "verdict": self.verdict, "seconds": round(self.seconds, 3),
                "timeout": self.timeout, "detail": self.detail}


def level(checks: list[Check]) -> str:
    """The highest level the passed checks reached, in order, before the first failure of
    ``resources``, ``disks`` or ``start`` (the guest's checks each count where they passed)."""
    reached = "none"
    for c in checks:
        if c.name in ("resources", "disks", "start") and not c.passed:
            break
        if c.passed and c.level is not None and LEVELS.index(c.level) > LEVELS.index(reached):
            reached = c.level
    return reached


def failed(checks: list[Check]) -> list[Check]:
    return [c for c in checks if c.verdict == FAILED]
