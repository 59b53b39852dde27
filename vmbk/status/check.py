"""The verdict on one VM: pure, over facts, a threshold and "now".

A VM that should be backed up (not excluded by the configuration) is

* ``missing`` without any complete restore point,
* else ``broken`` when an active chain is not complete (archived chains do not
  count: self-healing archives a chain because it broke),
* else ``stale`` when its newest complete point is older than the threshold
  (``--stale HOURS``, ``[status] stale_hours``) -- unless the catalogue
  saw it later shut off and unchanged (the planner skipped it: its newest
  point is still the VM's data),
* ``ok`` otherwise.

An excluded VM is ``excluded`` and never a problem.  Every problem is one
line, naming the VM, for standard error and for a monitoring system.
A stale lock file, a failed last attempt and a held lock are warnings:
the next backup takes a stale lock over, a failed attempt with a fresh
point is not yet a missing backup.
"""

from __future__ import annotations

import dataclasses

OK, STALE, BROKEN, MISSING, EXCLUDED = "ok", "stale", "broken", "missing", "excluded"


@dataclasses.dataclass(frozen=True)
class Facts:
    """What the verdict needs, already reduced to numbers and words."""

    vm: str
    excluded: bool
    #: Seconds since the newest complete restore point (None: there is none).
    point_age: float | None
    #: Seconds since the catalogue last saw the VM shut off and unchanged.
    unchanged_age: float | None
    #: Broken active chains: (chain, first reason).
    broken: tuple[tuple[str, str], ...] = ()
    lock: str = "free"
    lock_pid: int | None = None
    last_outcome: str | None = None
    last_error: str | None = None


@dataclasses.dataclass(frozen=True)
class Verdict:
    state: str
    problems: tuple[str, ...]
    warnings: tuple[str, ...]

    @property
    def bad(self) -> bool:
        return bool(self.problems)


def hours(seconds: float) -> str:
    h = seconds / 3600
    return f"{h:.0f} h" if h >= 10 else f"{h:.1f} h"


def judge(f: Facts, stale_hours: float) -> Verdict:
    warnings = []
    if f.lock == "stale":
        pid = f" of process {f.lock_pid}, which is gone" if f.lock_pid else ""
        warnings.append(f"stale lock file{pid} (the next backup takes it over)")
    elif f.lock == "held":
        warnings.append(f"locked by process {f.lock_pid}: a backup or restore is running" if f.lock_pid
                        else "locked: a backup or restore is running")
    if f.last_outcome == "failed":
        warnings.append(f"last attempt failed: {f.last_error}" if f.last_error else "last attempt failed")
    if f.excluded:
        return Verdict(EXCLUDED, (), tuple(warnings))
    problems = []
    state = OK
    if f.point_age is None:
        state = MISSING
        problems.append(f"{f.vm}: no complete restore point")
    else:
        ages = [a for a in (f.point_age, f.unchanged_age) if a is not None]
        age = min(ages)
        if age > stale_hours * 3600:
            state = STALE
            problems.append(f"{f.vm}: newest complete restore point is {hours(f.point_age)} old "
                            f"(limit {stale_hours:g} h)")
    for chain, reason in f.broken:
        problems.append(f"{f.vm}: chain {chain} is broken: {reason}")
    if f.broken and state != MISSING:
        state = BROKEN
    return Verdict(state, tuple(problems), tuple(warnings))
