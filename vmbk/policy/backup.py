"""THE planner: one VM's facts, its backup tree, a policy and "now" in;
what to do tonight and why out.

Pure, like restic's ``ApplyPolicy`` and borg's ``prune``: no I/O, no
clock, so every decision is a golden test (tests/golden/plan).  The rules
are vmbackup's (manual, "VM State Handling", "Backup Type Decision
Matrix", "Archive Triggers"; vmrestore guide, section 10):

* online (running, paused): no chain in the period directory -> full
  (first backup, new period, or after a policy change, which archives the
  previous chain where it lies); a healthy full chain -> incremental; an
  offline copy there -> archive it, full; an unhealthy chain -> archive
  it, full, the reasons recorded (`vmbk.policy.health`).  A VM with
  ``memory = "full"`` gets a full whatever its chain, the chain archived:
  QEMU 7.2 saves a memory state with a full only (`vmbk.backup.memory`),
  and every point of such a VM must resume.
* offline (shut off): copy only when a disk changed after the last backup
  (mtime), archiving whatever chain is in the period directory; else skip.
* accumulate: the VM directory is the chain; at ``accumulate_limit``
  restore points it is archived and a new one starts.
* never / excluded: skip.

A new period leaves the previous period's chain in place (vmrestore guide
10.1-10.3: each period directory keeps its own current chain).

Tonight's period directory is the one whose days hold today
(`current_period`): vmbk's own name (an ISO week's, `period_id`), or a
directory of the same period that vmbackup named its way and began a
chain in (``2027-W53`` on 2027-01-02), so a chain is continued whichever
tool wrote the name.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from collections.abc import Mapping, Sequence
from typing import Any

from vmbk.settings import MEMORY_FULL, Retention
from vmbk.errors import InputError
from vmbk.policy.disks import CHECKPOINT, COPY_ONLY, classify_all
from vmbk.policy.facts import VmFacts
from vmbk.policy.health import (
    checkpoint_problems,
    disk_problems,
    file_problems,
    unfinished_point,
    unfinished_streams,
)
from vmbk.tree.model import Chain, VmTree
from vmbk.tree.names import archive_name, checkpoint_name, checkpoint_number, period_id, same_period, where

FULL, INC, COPY, SKIP = "full", "inc", "copy", "skip"
#: What a plan (and each of its disks) may do.
ACTIONS = (FULL, INC, COPY, SKIP)


@dataclasses.dataclass(frozen=True, slots=True)
class DiskPlan:
    target: str
    mode: str  # full | inc | copy | skip
    reason: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """What the backup of one VM will do, in the order vmbk-backup does it.

    Paths (``target``, ``archive_from``, ``archive_to``, ``cleanup``) are
    relative to the VM directory, ``"."`` being the VM directory itself.

    1. ``cleanup``: delete these leftover ``.partial`` files.
    2. ``archive``: move the chain in ``archive_from`` (every file and
       ``checkpoints/``, not ``.archives/`` nor, for ``"."``, the period
       directories) into ``archive_to`` (``<dir>/.archives/chain-DATE[.N]``).
    3. ``redefine_checkpoints``: redefine these in libvirt, in this order,
       from ``<target>/checkpoints/<name>.xml``.
    4. ``delete_checkpoints``: delete these libvirt checkpoints (a full
       starts a new chain; virtnbdbackup does the same; an incremental
       removes the checkpoint an unfinished one left, its bitmap merged
       into the parent's by libvirt).  When that checkpoint is the
       incremental's own (``checkpoint``), the files of that point the
       ``.cpt`` does not list (streams already renamed, side files, a
       manifest) are removed first (`vmbk.policy.health.unfinished_point`).
    5. ``action`` into ``target``: ``full`` creates ``checkpoint``
       (``virtnbdbackup.0``); ``inc`` creates ``checkpoint`` with
       ``parent``; ``copy`` creates none; ``skip`` does nothing.  Each disk
       of ``disks`` says its own mode (``full``/``inc``/``copy``/``skip``).

    ``error`` is set when the VM cannot be planned at all (a state that is
    neither online nor offline): the caller reports it as a failure.
    """

    name: str
    action: str
    policy: str
    uuid: str | None = None
    period: str | None = None
    target: str | None = None
    archive: bool = False
    archive_from: str | None = None
    archive_to: str | None = None
    checkpoint: str | None = None
    parent: str | None = None
    redefine_checkpoints: tuple[str, ...] = ()
    delete_checkpoints: tuple[str, ...] = ()
    cleanup: tuple[str, ...] = ()
    disks: tuple[DiskPlan, ...] = ()
    reasons: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    last_backup: str | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> Plan:
        """The plan a ``plan`` record carries, checked for what a backup needs.

        Plans may be saved and hand-edited (vmbk-json(7)): a broken one is
        an `InputError` naming the VM, so the stage fails that VM and goes
        on.  Fields a backup does not need may be missing.
        """
        name = rec.get("name")
        vm = name if isinstance(name, str) and name else None

        def bad(why: str) -> InputError:
            return InputError(f"plan record{' of ' + repr(vm) if vm else ''}: {why}", vm=vm or "?")

        def opt(key: str) -> str | None:
            v = rec.get(key)
            if v is not None and not isinstance(v, str):
                raise bad(f"{key!r} must be a string")
            return v

        def names(key: str) -> tuple[str, ...]:
            v = rec.get(key)
            if v is None:
                return ()
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise bad(f"{key!r} must be a list of strings")
            return tuple(v)

        if vm is None:
            raise bad("'name' must be a non-empty string")
        action = rec.get("action")
        if action not in ACTIONS:
            raise bad(f"'action' must be one of {', '.join(ACTIONS)}")
        disks = rec.get("disks")
        if action != SKIP:
            if not isinstance(rec.get("target"), str):
                raise bad("'target' (the chain directory, relative to the VM's) is missing")
            if not isinstance(disks, list) or not all(
                isinstance(d, Mapping) and isinstance(d.get("target"), str) and d.get("mode") in ACTIONS for d in disks
            ):
                raise bad("'disks' must be a list of {target, mode}")
            if action in (FULL, INC) and not isinstance(rec.get("checkpoint"), str):
                raise bad("a full or incremental backup needs 'checkpoint'")
            if action == INC and not isinstance(rec.get("parent"), str):
                raise bad("an incremental backup needs 'parent'")
        archive = bool(rec.get("archive"))
        if archive and not (isinstance(rec.get("archive_from"), str) and isinstance(rec.get("archive_to"), str)):
            raise bad("'archive' needs 'archive_from' and 'archive_to'")
        return cls(
            name=vm,
            action=action,
            policy=opt("policy") or "",
            uuid=opt("uuid"),
            period=opt("period"),
            target=opt("target"),
            archive=archive,
            archive_from=opt("archive_from"),
            archive_to=opt("archive_to"),
            checkpoint=opt("checkpoint"),
            parent=opt("parent"),
            redefine_checkpoints=names("redefine_checkpoints"),
            delete_checkpoints=names("delete_checkpoints"),
            cleanup=names("cleanup"),
            disks=tuple(DiskPlan(d["target"], d["mode"], d.get("reason") if isinstance(d.get("reason"), str) else None)
                        for d in disks or () if isinstance(d, Mapping)) if action != SKIP else (),
            reasons=names("reasons"),
            warnings=names("warnings"),
            last_backup=opt("last_backup"),
        )

    @property
    def online(self) -> bool:
        """A backup of the running VM (pull job, checkpoint), not an offline copy."""
        return self.action in (FULL, INC)


@dataclasses.dataclass(frozen=True, slots=True)
class PlannedVm:
    """A ``plan`` record, typed: the decision, the VM's facts, where it goes.

    What vmbk-backup works from.  ``record`` is the record as received;
    its ``vm`` record is what a re-plan starts from.
    """

    plan: Plan
    vm: VmFacts
    target_dir: str | None
    record: Mapping[str, Any]

    @property
    def name(self) -> str:
        return self.plan.name

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> PlannedVm:
        plan = Plan.from_record(rec)
        vm = rec.get("vm")
        if vm is not None and not isinstance(vm, Mapping):
            raise InputError(f"plan record of {plan.name!r}: 'vm' must be the vm record", vm=plan.name)
        facts = VmFacts.from_record(vm) if vm else VmFacts(plan.name)
        target_dir = rec.get("target_dir")
        return cls(plan, facts, target_dir if isinstance(target_dir, str) else None, rec)


def decide(vm: VmFacts, tree: VmTree, policy: str, retention: Retention, now: _dt.datetime) -> Plan:
    """The plan of ``vm`` under ``policy`` at ``now``, given its ``tree``."""
    return _Planner(vm, tree, policy, retention, now).plan()


def current_period(tree: VmTree, policy: str, now: _dt.datetime) -> str | None:
    """The period directory of ``policy`` that tonight's backup goes to (None: the VM directory).

    vmbk's name for today (`period_id`), unless a directory of the policy
    whose days hold today (`Chain.days`: whatever its name's form) already
    has a chain: then the one with the newest backup, so that a chain
    vmbackup began under its own name for this week is continued, never
    replaced by a full under vmbk's name (and the other way round).
    """
    name = period_id(policy, now)
    if name is None:
        return None
    today = now.date()
    held = [c for c in tree.chains.values()
            if c.period and c.policy == policy and c.data and same_period(c.period, c.days, today)]
    if not held:
        return name
    return max(held, key=lambda c: (c.last_time or 0.0, c.rel)).rel


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat(timespec="seconds")


class _Planner:
    def __init__(self, vm: VmFacts, tree: VmTree, policy: str, retention: Retention, now: _dt.datetime) -> None:
        self.vm = vm
        self.tree = tree
        self.policy = policy
        self.retention = retention
        self.now = now
        self.period = current_period(tree, policy, now)
        self.rel = self.period or "."
        self.target = tree.chain(self.rel) or Chain(tree.path / self.rel, self.rel, self.period, policy)
        self.latest = tree.latest()
        self.choices = classify_all(vm.disks)
        self.reasons: list[str] = []
        self.warnings: list[str] = []
        self.base = Plan(vm.name, SKIP, policy, uuid=vm.uuid, period=self.period,
                         last_backup=iso(tree.last_backup))

    # -- entry ----------------------------------------------------------------
    def plan(self) -> Plan:
        if self.vm.excluded:
            return self._skip(f"excluded: {self.vm.reason}" if self.vm.reason else "excluded")
        if self.policy == "never":
            return self._skip("policy is 'never'")
        included = [c for c in self.choices if c.kind in (CHECKPOINT, COPY_ONLY)]
        if not included:
            why = "; ".join(f"{c.target}: {c.reason}" for c in self.choices) or "the VM has no disks"
            return self._skip(f"no disk to back up ({why})")
        if not (self.vm.online or self.vm.offline):
            return dataclasses.replace(
                self._skip(f"VM state {self.vm.state!r} is neither running nor shut off"),
                error=f"VM is in state {self.vm.state!r}, neither running nor shut off: not backed up this run",
            )
        self._identity_notes()
        self._foreign_checkpoints()
        own = period_id(self.policy, self.now)
        if self.period != own:
            self.reasons.append(f"{self.period} is this period's directory ({own} in vmbk's naming): "
                                "its chain is continued")
        return self._online() if self.vm.online else self._offline()

    # -- online ---------------------------------------------------------------
    def _online(self) -> Plan:
        t = self.target
        if t.is_empty:
            archive = self._new_chain_reasons()
            return self._full(archive)
        if t.base == "copy":
            self.reasons.append(f"VM is running again: the offline copy in {where(t.rel)} is archived, a new chain starts")
            return self._full(t)
        if self.vm.memory == MEMORY_FULL:
            self.reasons.append(f'memory = "{MEMORY_FULL}": every restore point carries the memory state, '
                                f"so every backup is a full; the chain in {where(t.rel)} is archived, "
                                "a new chain starts")
            return self._full(t)
        unfinished = unfinished_point(t, self.vm) if t.base is not None else None
        problems = self._chain_problems(t, unfinished)
        redefine: list[str] = []
        if not problems:
            problems, redefine = checkpoint_problems(t, self.vm, self.choices, unfinished=unfinished)
        if problems:
            self.reasons.extend(problems)
            self.reasons.append(f"the chain in {where(t.rel)} is archived, a new chain starts")
            return self._full(t)
        return self._inc(t, redefine, unfinished)

    def _chain_problems(self, t: Chain, unfinished: str | None = None) -> list[str]:
        out: list[str] = []
        if t.base is None:
            what = "checkpoint metadata without data" if (t.cpt_file or t.checkpoint_xmls) else "no full backup"
            out.append(f"the chain in {where(t.rel)} has {what}")
            return out
        out += file_problems(t, unfinished=unfinished)
        out += disk_problems(t, self.choices)
        if self.vm.uuid and t.uuid and t.uuid != self.vm.uuid:
            out.append(f"the chain in {where(t.rel)} belongs to another VM (uuid {t.uuid}); this VM is {self.vm.uuid}")
        if self.latest is not None and self.latest.rel != t.rel and (self.latest.last_time or 0) > (t.last_time or 0):
            out.append(f"a newer backup is in {where(self.latest.rel)}: the chain in {where(t.rel)} is stale")
        if self.policy == "accumulate" and t.cpt and not out and len(t.cpt) >= self.retention.accumulate_limit:
            out.append(f"the chain reached accumulate_limit ({self.retention.accumulate_limit} restore points)")
        return out

    def _new_chain_reasons(self) -> Chain | None:
        """Why a new chain starts in an empty target; the chain to archive."""
        latest = self.latest
        if latest is None:
            if self.tree.last_backup is not None:
                self.reasons.append(f"no active chain in {where(self.rel)} (earlier chains are archived)")
            elif not self.tree.renamed_from:
                self.reasons.append("first backup of this VM")
        elif latest.policy != self.policy:
            self.reasons.append(f"policy changed from {latest.policy} to {self.policy}: "
                                f"the chain in {where(latest.rel)} is archived")
            return latest
        elif self.period is not None:
            self.reasons.append(f"new period {self.period}")
        else:
            self.reasons.append(f"no chain in {where(self.rel)}")
        return None

    # -- offline --------------------------------------------------------------
    def _offline(self) -> Plan:
        changed = self._changes()
        if not changed:
            last = iso(self.tree.last_backup)
            return self._skip(f"VM is shut off and no disk changed since the last backup ({last})")
        self.reasons.extend(changed)
        t = self.target
        archive: Chain | None = None
        if not t.is_empty:
            what = "offline copy" if t.base == "copy" else "chain"
            self.reasons.append(f"the {what} in {where(t.rel)} is archived, an offline copy replaces it")
            archive = t
        elif self.latest is not None and self.latest.policy != self.policy:
            self.reasons.append(f"policy changed from {self.latest.policy} to {self.policy}: "
                                f"the chain in {where(self.latest.rel)} is archived")
            archive = self.latest
        return self._plan(COPY, archive, disks=self._disk_plans(COPY))

    def _changes(self) -> list[str]:
        """Why a shut-off VM needs a copy (empty: it does not)."""
        last = self.tree.last_backup
        if last is None:
            return ["first backup of this VM (shut off: offline copy)"]
        out: list[str] = []
        for c in self.choices:
            if c.kind not in (CHECKPOINT, COPY_ONLY):
                continue
            if c.disk.mtime is None:
                out.append(f"VM is shut off; mtime of {c.target} unknown: copied to be safe")
            elif c.disk.mtime > last:
                out.append(f"VM is shut off and {c.target} changed since the last backup ({iso(last)})")
        if self.latest is not None and not out:
            recorded = set(self.latest.disks)
            current = {c.target for c in self.choices if c.kind in (CHECKPOINT, COPY_ONLY)}
            if recorded != current:
                out.append(f"VM is shut off and its disks ({', '.join(sorted(current))}) differ from the last "
                           f"backup's ({', '.join(sorted(recorded))})")
        return out

    # -- results --------------------------------------------------------------
    def _full(self, archive: Chain | None) -> Plan:
        if not any(c.kind == CHECKPOINT for c in self.choices):
            self.reasons.append("no disk can carry a checkpoint: copy backup")
            return self._plan(COPY, archive, disks=self._disk_plans(COPY))
        deletes: tuple[str, ...] = ()
        if self.vm.checkpoints is None:
            self.warnings.append("libvirt checkpoint list unknown: the backup must find and remove stale ones")
        else:
            ours = [c for c in self.vm.checkpoints if checkpoint_number(c) is not None]
            deletes = tuple(sorted(ours, key=lambda c: checkpoint_number(c) or 0))
        return self._plan(FULL, archive, checkpoint=checkpoint_name(0), deletes=deletes,
                          disks=self._disk_plans(FULL))

    def _inc(self, t: Chain, redefine: Sequence[str], unfinished: str | None = None) -> Plan:
        assert t.cpt
        n = len(t.cpt)
        deletes: tuple[str, ...] = ()
        if unfinished is not None:
            streams = unfinished_streams(t, unfinished)
            left = [*t.partials, *streams, *([f"the other files of {unfinished}"] if streams else []),
                    *(["libvirt's checkpoint " + unfinished] if unfinished in (self.vm.checkpoints or ()) else [])]
            self.reasons.append(f"an incremental that did not finish left {', '.join(left)}: removed, "
                                f"the chain goes on from {t.cpt[-1]}")
            deletes = (unfinished,) if unfinished in (self.vm.checkpoints or ()) else ()
        self.reasons.append(f"the chain in {where(t.rel)} continues: incremental {n}")
        if redefine:
            self.reasons.append(f"libvirt lost checkpoint metadata of {', '.join(redefine)}: "
                                f"redefined from checkpoints/*.xml of {where(t.rel)}")
        missing_xml = [c for c in t.cpt if c not in t.checkpoint_xmls]
        if missing_xml:
            self.warnings.append(f"checkpoints/ of {where(t.rel)} lacks the XML of {', '.join(missing_xml)}: "
                                 "the chain could not be redefined if libvirt lost it")
        if self.policy == "accumulate" and n + 1 >= self.retention.accumulate_warn_depth:
            self.warnings.append(f"accumulate chain reaches {n + 1} restore points "
                                 f"(warn at {self.retention.accumulate_warn_depth}, new chain at "
                                 f"{self.retention.accumulate_limit})")
        return self._plan(INC, None, checkpoint=checkpoint_name(n), parent=t.cpt[-1],
                          redefine=tuple(redefine), deletes=deletes, disks=self._disk_plans(INC))

    def _disk_plans(self, action: str) -> tuple[DiskPlan, ...]:
        out: list[DiskPlan] = []
        for c in self.choices:
            if c.kind == CHECKPOINT:
                out.append(DiskPlan(c.target, action))
            elif c.kind == COPY_ONLY:
                if action == INC:
                    out.append(DiskPlan(c.target, SKIP, c.reason))
                else:
                    out.append(DiskPlan(c.target, COPY, c.reason))
            else:
                out.append(DiskPlan(c.target, SKIP, c.reason))
        return tuple(out)

    def _plan(self, action: str, archive: Chain | None, *, checkpoint: str | None = None, parent: str | None = None,
              redefine: tuple[str, ...] = (), deletes: tuple[str, ...] = (),
              disks: tuple[DiskPlan, ...] = ()) -> Plan:
        cleanup = tuple(_join(self.target.rel, p) for p in self.target.partials)
        if cleanup and not any("partial" in r for r in self.reasons):
            self.reasons.append(f"leftover partial file(s) removed: {', '.join(self.target.partials)}")
        archive_to = None
        if archive is not None:
            archive_to = _join(archive.rel, ".archives/" + archive_name(archive.archive_names, self.now.date()))
        return dataclasses.replace(
            self.base,
            action=action,
            target=self.rel,
            archive=archive is not None,
            archive_from=archive.rel if archive is not None else None,
            archive_to=archive_to,
            checkpoint=checkpoint,
            parent=parent,
            redefine_checkpoints=redefine,
            delete_checkpoints=deletes,
            cleanup=cleanup,
            disks=disks,
            reasons=tuple(self.reasons),
            warnings=tuple(self.warnings),
        )

    def _skip(self, reason: str) -> Plan:
        return dataclasses.replace(self.base, reasons=(*self.reasons, reason), warnings=tuple(self.warnings))

    def _foreign_checkpoints(self) -> None:
        foreign = [c for c in self.vm.checkpoints or () if checkpoint_number(c) is None]
        if foreign:
            self.warnings.append(f"checkpoint(s) {', '.join(foreign)} were not made by vmbk or virtnbdbackup: "
                                 "left alone")

    def _identity_notes(self) -> None:
        if self.tree.renamed_from:
            olds = ", ".join(self.tree.renamed_from)
            self.reasons.append(f"VM renamed: earlier backups of uuid {self.vm.uuid} are under {olds} "
                                f"(left in place); a new chain starts under {self.vm.name}")


def _join(rel: str, name: str) -> str:
    return name if rel == "." else f"{rel}/{name}"
