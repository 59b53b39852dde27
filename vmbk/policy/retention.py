"""Retention: which backups of one VM stay, which go, and why.

Pure, like the planner (`vmbk.policy.backup`) and restic's ``ApplyPolicy``:
the facts of a VM's tree (`TreeFacts`, gathered by `vmbk.rotate.facts`),
the policy, the retention settings and "now" in; a `Decision` out, every
entry with its reason.  Golden-tested (tests/golden/retention).  The
rules are vmbackup's (manual, "Automated Retention System", "Tier 1",
"Tier 2", "On-Demand Cleanup"):

* **Tier 1, count** (``count``): the period directories of the VM's
  current policy, newest first; the first ``retention.<policy>`` that hold
  a backup are kept (the current one included), every older one goes with
  its archived chains.  "Newest" is by the days a directory covers
  (`Unit.days`), never by its name: vmbackup's weekly names do not sort
  (``2024-W01`` of December 2024 sorts before ``2024-W52``), and two
  directories of one week (vmbk's ``2026-W53`` and vmbackup's
  ``2027-W53``) count as one period.  A period without any backup in it (a failed
  backup's leftover) does not count, so failing backups never push good
  periods out.  accumulate never deletes on its own (the planner archives
  its chain at ``accumulate_limit`` restore points); its archived chains
  are kept up to ``retention.archives`` (None: all).  never: nothing goes.
* **Tier 2, orphans** (``orphan``): period directories in another
  policy's format (left by a policy change; under accumulate every period
  directory; under a periodic policy the archived accumulate chains of the
  VM directory) age out: younger than ``orphan_min_age`` days since their
  last backup protected, older than ``orphan_max_age`` deleted, in between
  kept.  The last backup is the catalogue's last successful one in it, else
  the newest data file's mtime, but never later than the end of the period
  (the day after an archive's date): a directory receives backups only
  during its period, so a later time is a copied tree or a wrong clock.
* **Manual prune** (``prune``, `prune`): ``archives`` (optionally of one
  period), ``chain:<name>``, ``period:<id>`` (never the VM's last one),
  ``all`` (the whole VM directory).

Guards, whatever a rule says (`Decision.protected` says which held):
the current period, the directory the backup just wrote
(``target``), the one holding the VM's newest complete restore point; and
when a period or archive name lies in the future (the clock is wrong)
nothing is removed at all (`Decision.refused`).  ``all`` is the operator's
explicit "everything" and only the clock does not stop it.  The lock, the
backup root and the depth rules are the deleter's (`vmbk.tree.ops`).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from collections.abc import Iterable

from vmbk.errors import UsageError, VmError
from vmbk.settings import Retention
from vmbk.tree.names import archive_date, archive_order, period_days

COUNT, ORPHAN, PRUNE = "count", "orphan", "prune"
#: Tiers of `Removal.tier`: Tier 1, Tier 2 and a manual prune.
TIERS = (COUNT, ORPHAN, PRUNE)
PERIOD, ARCHIVE, VM = "period", "archive", "vm"
#: ``--prune`` targets (``list`` is a listing, not a decision).
TARGETS = ("list", "archives", "archives:<period>", "chain:<name>", "period:<id>", "all")
DAY = 86400.0


@dataclasses.dataclass(frozen=True, slots=True)
class Unit:
    """One directory retention may delete whole: a period or an archived chain.

    ``rel`` is relative to the VM directory.  ``policy`` is the policy whose
    format the directory is in (the VM directory's archives: accumulate).
    ``last_backup`` (epoch seconds) is the catalogue's last successful
    backup in it, else its newest data file's mtime; ``newest_complete``
    the time of its newest complete restore point.  A period's ``bytes``,
    ``backups``, ``last_backup`` and ``newest_complete`` include its
    ``archives``.  ``points`` counts the restore points of its own chain.
    ``days``: the days a period covers (`vmbk.tree.model.Chain.days`: its
    name read with its backups; None: from the name alone).
    """

    rel: str
    kind: str
    period: str | None
    policy: str | None
    bytes: int = 0
    backups: bool = False
    last_backup: float | None = None
    newest_complete: float | None = None
    points: int = 0
    archives: tuple[Unit, ...] = ()
    days: tuple[_dt.date, _dt.date] | None = None

    @property
    def name(self) -> str:
        return self.rel.rpartition("/")[2]

    @property
    def span(self) -> tuple[_dt.date, _dt.date] | None:
        """The days of a period directory (None: an archive, or not a period)."""
        if self.kind != PERIOD or self.period is None:
            return None
        return self.days if self.days is not None else period_days(self.period)


@dataclasses.dataclass(frozen=True, slots=True)
class TreeFacts:
    """What retention needs to know of one VM's tree.

    ``periods``: every period directory, any format; ``archives``: the
    archived chains of the VM directory (accumulate); ``root_*``: the
    VM directory's own (accumulate) chain, which retention never deletes.
    """

    vm: str
    periods: tuple[Unit, ...] = ()
    archives: tuple[Unit, ...] = ()
    root_backups: bool = False
    root_newest_complete: float | None = None
    root_points: int = 0
    bytes: int = 0

    def newest_complete(self) -> float | None:
        """When the VM's newest complete restore point was made (None: it has none)."""
        times = [u.newest_complete for u in (*self.periods, *self.archives)]
        return max((t for t in [*times, self.root_newest_complete] if t is not None), default=None)

    def all_archives(self) -> tuple[Unit, ...]:
        return (*(a for p in self.periods for a in p.archives), *self.archives)


@dataclasses.dataclass(frozen=True, slots=True)
class Removal:
    rel: str
    kind: str
    tier: str
    bytes: int
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class Kept:
    rel: str
    why: str


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    """What retention does to one VM's tree.

    Every period directory and every archived chain of the VM directory is
    in exactly one of ``kept``, ``removed`` and ``protected`` (a prune only
    names what its target selects).  ``keep`` is the policy's limit (None:
    no limit).  ``refused`` says why nothing at all is removed.
    """

    vm: str
    policy: str
    keep: int | None
    kept: tuple[Kept, ...] = ()
    removed: tuple[Removal, ...] = ()
    protected: tuple[Kept, ...] = ()
    refused: str | None = None
    warnings: tuple[str, ...] = ()

    @property
    def freed_bytes(self) -> int:
        return sum(r.bytes for r in self.removed)


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    """A ``--prune`` target: ``kind`` is one of list, archives, chain, period, all."""

    kind: str
    arg: str | None = None

    def __str__(self) -> str:
        return self.kind if self.arg is None else f"{self.kind}:{self.arg}"

    @property
    def needs_one_vm(self) -> bool:
        return self.kind not in ("list", "archives") or self.arg is not None


def parse_target(text: str) -> Target:
    """``list``, ``archives``, ``archives:<period>``, ``chain:<name>``, ``period:<id>``, ``all``."""
    kind, sep, arg = text.partition(":")
    if not sep and kind in ("list", "archives", "all"):
        return Target(kind)
    if sep and arg and "/" not in arg.strip("/") and kind in ("archives", "period"):
        return Target(kind, arg)
    if sep and arg and kind == "chain":
        return Target(kind, arg)
    raise UsageError(f"--prune {text!r}: the target must be one of {', '.join(TARGETS)}")


# -- automatic retention ------------------------------------------------------


def decide(facts: TreeFacts, policy: str, retention: Retention, now: _dt.datetime, *,
           target: str | None = None) -> Decision:
    """Tier 1 and Tier 2 for one VM at ``now``; ``target``: the directory the
    backup being handled wrote (relative to the VM directory)."""
    return _Rules(facts, policy, retention, now, target).decide()


def prune(facts: TreeFacts, target: Target, policy: str, retention: Retention, now: _dt.datetime) -> Decision:
    """What ``--prune <target>`` removes of one VM, guards applied.

    A target that names nothing there is a `VmError`.
    """
    return _Rules(facts, policy, retention, now, None).prune(target)


def low_space(free_percent: float | None, retention: Retention) -> str | None:
    """The warning when the backup file system is below ``min_free_percent`` free.

    Only a warning: deleting more than the policy allows is the operator's
    call (``--prune``), as vmbackup's emergency pruning is not done here.
    """
    low = retention.min_free_percent
    if free_percent is None or free_percent >= low:
        return None
    return (f"the backup file system has {free_percent:.1f}% free, below min_free_percent ({low}%): "
            "rotate removes no more than the policy allows; see vmbk-rotate --prune list")


def _newest_first(u: Unit) -> tuple[_dt.date, float, str]:
    """Sort key of period directories by the days they cover (then their last backup)."""
    span = u.span
    return (span[0] if span else _dt.date.min), (u.last_backup or 0.0), u.rel


def _iso(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat(timespec="seconds")


class _Rules:
    def __init__(self, facts: TreeFacts, policy: str, retention: Retention, now: _dt.datetime,
                 target: str | None) -> None:
        self.facts = facts
        self.policy = policy
        self.retention = retention
        self.now = now
        self.target = target
        self.today = now.date()
        self.newest = facts.newest_complete()
        self.kept: list[Kept] = []
        self.removed: list[Removal] = []
        self.protected: list[Kept] = []

    # -- entries --------------------------------------------------------------
    def decide(self) -> Decision:
        keep = self.retention.keep(self.policy)
        refused = self._skew()
        if refused:
            return self._result(keep, refused=refused)
        if self.policy == "never":
            for u in self._units():
                self.kept.append(Kept(u.rel, "policy is 'never': nothing is removed"))
            return self._result(keep)
        if self.policy == "accumulate":
            self._count(sorted(self.facts.archives, key=lambda u: archive_order(u.name), reverse=True), keep,
                        "archived chains")
            orphans: list[Unit] = list(self.facts.periods)
        else:
            assert keep is not None
            mine = [u for u in self.facts.periods if u.policy == self.policy]
            self._count(sorted(mine, key=_newest_first, reverse=True), keep, f"{self.policy} periods")
            orphans = [u for u in self.facts.periods if u.policy != self.policy] + list(self.facts.archives)
        for u in orphans:
            self._orphan(u)
        return self._result(keep)

    def prune(self, target: Target) -> Decision:
        if target.kind == "all":
            if not (self.facts.periods or self.facts.archives or self.facts.root_backups or self.facts.bytes):
                raise VmError(f"VM {self.facts.vm!r} has no backups to prune", vm=self.facts.vm)
            self.removed.append(Removal(".", VM, PRUNE, self.facts.bytes,
                                        "--prune all: every backup of the VM, its directory with them"))
            return self._result(None)
        units = self._selected(target)
        refused = self._skew()
        if refused:
            return self._result(None, refused=refused)
        for u in units:
            why = (self._last_period(u) if target.kind == "period" else None) or self._guard(u)
            if why:
                self.protected.append(Kept(u.rel, why))
            else:
                kind = "period directory" if u.kind == PERIOD else "archived chain"
                self.removed.append(Removal(u.rel, u.kind, PRUNE, u.bytes, f"--prune {target}: the {kind}"))
        return self._result(None)

    # -- the rules ------------------------------------------------------------
    def _count(self, units: list[Unit], keep: int | None, what: str) -> None:
        """Tier 1: the first ``keep`` of ``units`` (newest first) that hold a backup stay.

        Directories of the same period (one week named by both tools)
        count once, as the period they are.
        """
        counted: list[object] = []
        for u in units:
            period = u.span or u.rel
            if keep is None:
                self.kept.append(Kept(u.rel, f"{self.policy} keeps all {what} (archives = \"all\")"))
            elif period in counted:
                self.kept.append(Kept(u.rel, f"{counted.index(period) + 1} of the {keep} newest {what}"))
            elif len(counted) < keep:
                if u.backups:
                    counted.append(period)
                    self.kept.append(Kept(u.rel, f"{len(counted)} of the {keep} newest {what}"))
                else:
                    self.kept.append(Kept(u.rel, "holds no backup: not counted"))
            else:
                self._remove(u, COUNT, f"beyond the {keep} newest {what}")

    def _orphan(self, u: Unit) -> None:
        """Tier 2: a directory of another policy's format, by age."""
        last = self._last(u)
        age = (self.now.timestamp() - last) / DAY
        days = int(age)
        mn, mx = self.retention.orphan_min_age, self.retention.orphan_max_age
        what = f"left by the {u.policy} policy (now {self.policy}), {days} d since its last backup"
        if age < mn:
            self.protected.append(Kept(u.rel, f"{what}: protected until {mn} d (orphan_min_age)"))
        elif age < mx:
            self.kept.append(Kept(u.rel, f"{what}: kept until {mx} d (orphan_max_age)"))
        else:
            self._remove(u, ORPHAN, f"{what}: older than {mx} d (orphan_max_age)")

    def _remove(self, u: Unit, tier: str, reason: str) -> None:
        why = self._guard(u)
        if why:
            self.protected.append(Kept(u.rel, f"{why}, though {reason}"))
        else:
            self.removed.append(Removal(u.rel, u.kind, tier, u.bytes, reason))

    def _guard(self, u: Unit) -> str | None:
        if u.policy == self.policy and (span := u.span) is not None and span[0] <= self.today < span[1]:
            return "the current period"
        if self.target is not None and (self.target == u.rel or self.target.startswith(u.rel + "/")):
            return "holds the backup just made"
        if self.newest is not None and u.newest_complete == self.newest:
            return f"holds the VM's newest complete restore point ({_iso(self.newest)})"
        return None

    def _last_period(self, u: Unit) -> str | None:
        """Keep-last: ``period:`` never removes a VM's last period (``all`` does)."""
        others = [p for p in self.facts.periods if p.rel != u.rel]
        if not others and not self.facts.root_backups and not self.facts.archives:
            return "the VM's last period: --prune all removes everything"
        return None

    def _last(self, u: Unit) -> float:
        """The time of the last backup in ``u``, bounded by what its name allows."""
        bound = self._bound(u)
        if u.last_backup is None:
            return bound if bound is not None else self.now.timestamp()
        return u.last_backup if bound is None else min(u.last_backup, bound)

    def _bound(self, u: Unit) -> float | None:
        day = self._end_day(u)
        if day is None:
            return None
        return _dt.datetime(day.year, day.month, day.day, tzinfo=self.now.tzinfo).timestamp()

    @staticmethod
    def _end_day(u: Unit) -> _dt.date | None:
        if u.kind == PERIOD and u.period is not None:
            days = u.span
            return days[1] if days else None
        made = archive_date(u.name)
        return made + _dt.timedelta(days=1) if made else None

    def _skew(self) -> str | None:
        """Refuse everything when a directory's name lies in the future."""
        today = self.now.date()
        future = []
        for u in (*self.facts.periods, *self.facts.all_archives()):
            if u.kind == PERIOD and u.period is not None:
                days = u.span
                if days and days[0] > today:
                    future.append(u.rel)
            elif (made := archive_date(u.name)) and made > today:
                future.append(u.rel)
        if not future:
            return None
        return (f"clock skew: {', '.join(sorted(future))} {'is' if len(future) == 1 else 'are'} dated after now "
                f"({self.now.isoformat(timespec='seconds')}); nothing is removed until the clock is right")

    # -- prune targets --------------------------------------------------------
    def _selected(self, target: Target) -> list[Unit]:
        vm = self.facts.vm
        if target.kind == "period":
            found = [u for u in self.facts.periods if u.period == target.arg]
            if not found:
                raise VmError(f"VM {vm!r} has no period {target.arg!r}", vm=vm)
            return found
        if target.kind == "archives":
            if target.arg is None:
                units = list(self.facts.all_archives())
            else:
                period = [u for u in self.facts.periods if u.period == target.arg]
                if not period:
                    raise VmError(f"VM {vm!r} has no period {target.arg!r}", vm=vm)
                units = list(period[0].archives)
            if not units:
                where = f" in period {target.arg}" if target.arg else ""
                raise VmError(f"VM {vm!r} has no archived chains{where}", vm=vm)
            return units
        assert target.kind == "chain" and target.arg is not None
        arg = target.arg.strip("/")
        found = [u for u in self.facts.all_archives() if u.rel == arg or u.name == arg]
        if not found:
            raise VmError(f"VM {vm!r} has no archived chain {target.arg!r} (see --prune list)", vm=vm)
        if len(found) > 1:
            raise VmError(f"VM {vm!r} has several archived chains named {target.arg!r}: "
                          f"{', '.join(u.rel for u in found)}; name one by its path", vm=vm)
        return found

    # -- result ---------------------------------------------------------------
    def _units(self) -> Iterable[Unit]:
        return (*self.facts.periods, *self.facts.archives)

    def _result(self, keep: int | None, *, refused: str | None = None, warnings: tuple[str, ...] = ()) -> Decision:
        if refused:
            self.kept = [Kept(u.rel, "nothing is removed: clock skew") for u in self._units()]
            self.removed = []
            self.protected = []
        def key(e: Kept | Removal) -> str:
            return e.rel

        return Decision(self.facts.vm, self.policy, keep, tuple(sorted(self.kept, key=key)),
                        tuple(sorted(self.removed, key=key)), tuple(sorted(self.protected, key=key)),
                        refused, warnings)
