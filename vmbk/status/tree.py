"""A VM's backup tree as vmbk-status reports it.

Chains are judged by the listing's rule (vmbk-restore ``--list`` and
``--list-restore-points``, `vmbk.tree.points`): a chain is *complete*
when it has restore points, every one of them is complete and the chain
as a whole has no flaw; otherwise it is *broken*, and its reasons are the
chain's flaws and the findings of its first incomplete points.  Active
chains are the period directories (and the accumulate chain) holding
backups or their leftovers; archived chains are reported beside them
and counted apart (an archive is often a chain self-healing set aside
because it broke: it is no alarm).

Periods are sorted by the day they begin, whatever their format, so a
weekly directory a policy change left (``2026-W11``) comes after the
monthly one before it (``202602``), not before it as names sort.
A point's time is the newest mtime of the files it is rebuilt from, as
vmbk-rotate dates it.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from pathlib import Path

from vmbk.fsutil import dir_size
from vmbk.tree import Chain, scan_vm
from vmbk.tree.names import archive_date
from vmbk.tree.points import RestorePoint, chain_complete, chain_warnings, restore_points

#: Reasons kept per broken chain (the listing has them all).
MAX_REASONS = 5


@dataclasses.dataclass(frozen=True)
class ChainState:
    rel: str
    period: str | None
    archived: bool
    points: int
    complete_points: int
    complete: bool
    reasons: tuple[str, ...]
    oldest: float | None
    newest: float | None
    bytes: int

    def as_record(self) -> dict[str, object]:
        return {"chain": self.rel, "period": self.period, "archived": self.archived,
                "restore_points": self.points, "complete_points": self.complete_points,
                "complete": self.complete, "reasons": list(self.reasons),
                "oldest_point": iso_time(self.oldest), "newest_point": iso_time(self.newest), "bytes": self.bytes}


@dataclasses.dataclass(frozen=True)
class TreeState:
    vm: str
    path: Path
    exists: bool
    periods: tuple[str, ...]
    chains: tuple[ChainState, ...]
    bytes: int
    uuid: str | None = None

    @property
    def active(self) -> tuple[ChainState, ...]:
        return tuple(c for c in self.chains if not c.archived)

    @property
    def archived(self) -> tuple[ChainState, ...]:
        return tuple(c for c in self.chains if c.archived)

    @property
    def broken(self) -> tuple[ChainState, ...]:
        """Active chains that are not complete (archived ones are not counted)."""
        return tuple(c for c in self.active if not c.complete)

    @property
    def has_backups(self) -> bool:
        return bool(self.chains)

    @property
    def points(self) -> int:
        return sum(c.points for c in self.chains)

    @property
    def complete_points(self) -> int:
        return sum(c.complete_points for c in self.chains)

    @property
    def newest_point(self) -> float | None:
        """Time of the newest complete restore point, archives included."""
        return max((c.newest for c in self.chains if c.newest is not None), default=None)

    @property
    def oldest_point(self) -> float | None:
        return min((c.oldest for c in self.chains if c.oldest is not None), default=None)


def point_time(p: RestorePoint) -> float:
    """When a point was made: the newest mtime of the files it is rebuilt from."""
    return max((f.mtime for files in p.disks.values() for f in files), default=0.0)


def chain_state(chain: Chain, *, archived: bool) -> ChainState:
    points = restore_points(chain)
    good = [p for p in points if p.complete]
    complete = chain_complete(chain, points)
    reasons = chain_warnings(chain)
    if not points:
        reasons.append("no restore point (leftovers of an interrupted backup only)")
    reasons += [f"restore point {p.index}: {p.findings[0]}" for p in points if not p.complete]
    times = [point_time(p) for p in good]
    return ChainState(
        rel=chain.rel, period=chain.period, archived=archived, points=len(points), complete_points=len(good),
        complete=complete, reasons=tuple(reasons[:MAX_REASONS]),
        oldest=min(times, default=None), newest=max(times, default=None),
        bytes=sum(f.size for f in chain.data),
    )


def _start(chain: Chain) -> tuple[_dt.date, str]:
    """Sort key: the day a chain's period began (an accumulate chain: its first file)."""
    days = chain.days  # its name read with its backups' days: vmbackup's weekly names (vmbk.tree.names)
    if days is not None:
        return days[0], chain.rel
    first = min((f.mtime for f in chain.data), default=None)
    day = _dt.date.fromtimestamp(first) if first is not None else _dt.date.max
    return day, chain.rel


def _archive_key(chain: Chain) -> tuple[_dt.date, str]:
    return archive_date(chain.path.name) or _dt.date.max, chain.path.name


def read(backup_path: Path, vm: str) -> TreeState:
    """The status view of one VM directory (an empty state when it has none)."""
    tree = scan_vm(backup_path, vm)
    if not tree.exists:
        return TreeState(vm, tree.path, False, (), (), 0)
    chains: list[ChainState] = []
    periods: list[str] = []
    for chain in sorted(tree.chains.values(), key=_start):
        if chain.period is not None:
            periods.append(chain.period)
        if chain.data or chain.partials:
            chains.append(chain_state(chain, archived=False))
        for a in sorted(chain.archives, key=_archive_key):
            if a.data or a.partials:
                chains.append(chain_state(a, archived=True))
    latest = tree.latest()
    return TreeState(vm, tree.path, True, tuple(periods), tuple(chains), dir_size(tree.path),
                     latest.uuid if latest is not None else None)


def iso_time(ts: float | None) -> str | None:
    return None if ts is None else _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat(timespec="seconds")
