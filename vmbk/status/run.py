"""vmbk-status's work: which VMs, their records, the problems, the metrics.

The VMs are the VM directories of the tree that hold backups (THE rule,
`vmbk.tree.scan.vm_dirs`; a directory without any backup or leftover is
not a VM's and is left out), and the VMs the catalogue saw fail lately
without a backup in the tree (a first backup that never succeeded).  Each
gets a ``status`` record; a VM whose tree cannot be read is an ``error``
record and the others go on.  The exit status is the verdict's: 0 when
no VM has a problem, 9 when some do, 5 when every VM that should be
backed up does (`vmbk.errors.exit_for_codes` over the VMs).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from collections.abc import Iterator
from pathlib import Path

from vmbk.errors import Exit, VmbkError, exit_for_codes
from vmbk.lock import probe
from vmbk.records import Record, error_record
from vmbk.settings import Config
from vmbk.status import metrics, record
from vmbk.status.history import History
from vmbk.status.tree import read
from vmbk.tree.scan import locate, roots, vm_dirs

PROG = "vmbk-status"


@dataclasses.dataclass(frozen=True)
class StatusOptions:
    cfg: Config
    backup_path: Path
    now: _dt.datetime
    stale_hours: float
    vms: tuple[str, ...] = ()
    prometheus: Path | None = None


@dataclasses.dataclass
class Outcome:
    """What the run found: the problem lines and the VMs with and without problems."""

    problems: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    bad: int = 0
    good: int = 0

    @property
    def exit_code(self) -> int:
        return int(exit_for_codes([int(Exit.VM)] * self.bad, self.good))


def vm_names(opts: StatusOptions, failing: set[str]) -> list[str]:
    if opts.vms:
        return list(opts.vms)
    return sorted({e.name for e in vm_dirs(opts.backup_path)} | failing)


def statuses(opts: StatusOptions, session: str, outcome: Outcome) -> Iterator[Record]:
    """One ``status`` record per VM (or an ``error`` record); ``outcome`` collects the verdicts.

    Host by host in a tree with a level per host (`vmbk.tree.scan.roots`:
    each host's directory has its VMs, locks and catalogue); ``--vm``
    takes ``HOST/VM`` there.
    """
    if opts.vms:
        wanted: dict[Path, tuple[str | None, list[str]]] = {}
        for spec in opts.vms:
            root, vm = locate(opts.backup_path, spec)
            wanted.setdefault(root.path, (root.host, []))[1].append(vm)
        for path, (host, vms) in wanted.items():
            yield from _with_host(_statuses(dataclasses.replace(opts, backup_path=path, vms=tuple(vms)), session,
                                            outcome), host)
        return
    for root in roots(opts.backup_path):
        yield from _with_host(_statuses(dataclasses.replace(opts, backup_path=root.path), session, outcome),
                              root.host)


def _with_host(recs: Iterator[Record], host: str | None) -> Iterator[Record]:
    for rec in recs:
        yield {**rec, "host": host} if host else rec


def _statuses(opts: StatusOptions, session: str, outcome: Outcome) -> Iterator[Record]:
    with History(opts.backup_path) as hist:
        failing = set(hist.failing_vms(opts.now))
        for vm in vm_names(opts, failing):
            try:
                tree = read(opts.backup_path, vm)
                if not tree.has_backups and not opts.vms and vm not in failing:
                    continue  # a directory without backups: not a VM's
                policy, source = opts.cfg.policy_for(vm)
                rec, verdict = record.status_record(
                    session, tree, hist, opts.now, opts.stale_hours, policy=policy, policy_source=source,
                    excluded=opts.cfg.exclusion(vm), lock=probe(opts.backup_path, vm))
            except VmbkError as e:
                outcome.bad += 1
                yield error_record(e, stage=PROG, session=session, vm=e.vm or vm)
                continue
            outcome.problems += verdict.problems
            outcome.warnings += [f"{vm}: {w}" for w in verdict.warnings]
            if verdict.bad:
                outcome.bad += 1
            else:
                outcome.good += 1
            yield rec


def write_metrics(opts: StatusOptions, records: list[Record]) -> None:
    if opts.prometheus is not None:
        metrics.write(opts.prometheus, [r for r in records if r["type"] == "status"], opts.now, opts.stale_hours)


def sessions(backup_path: Path, since: _dt.datetime, session: str) -> Iterator[Record]:
    with History(backup_path) as hist:
        for row in hist.sessions(since):
            yield record.session_record(session, row)


def restores(backup_path: Path, since: _dt.datetime, session: str) -> Iterator[Record]:
    with History(backup_path) as hist:
        for row in hist.restores(since):
            yield record.restore_record(session, row)


