"""Replicate VMs to one destination: plan, check, copy in order, verify.

For a destination:

1. reach it: free space and the listing of the whole replica (a failure
   here fails every VM for this destination, as an ``error`` record each);
2. plan every VM (`vmbk.replicate.plan`) over the source and replica
   listings cut to the destination's scope (and without TPM state and
   BitLocker keys where they may not go);
3. mirror refuses when the source has no VM directory at all, or would
   delete more than ``max_delete_percent`` of the replica's files: a
   source that is not mounted looks exactly like one whose every backup
   was deleted, and a mirror of it would empty the replica;
4. the space check (``[replicate] space_check``): ``skip`` fails the
   destination when what is to be sent does not fit, ``warn`` only says so,
   and both warn when less than ``min_free_percent`` would be
   left;
5. VM by VM, under the VM's lock (a backup of it cannot change its tree
   meanwhile): the source is listed again and planned again, then moves,
   retract, the three copy phases and the deletions run in that order, and
   the VM's files are verified (none, size: the replica's listing against
   the source's; checksum: the transport's comparison of content);
6. the catalogue's snapshot (`vmbk.replicate.snapshot`) goes last.

An unreachable or full destination stops that destination at the VM it
hit (the VMs after it fail with the same reason, quickly); a tool failure
or a verify mismatch fails that VM only.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from vmbk.errors import StorageError, VmbkError
from vmbk.lock import VmLock
from vmbk.records import Record
from vmbk.replicate import files, snapshot
from vmbk.replicate.files import CATALOGUE, PHASES, Listing
from vmbk.replicate.history import History
from vmbk.replicate.plan import MIRROR, VmPlan, plan_vm, removal_share
from vmbk.replicate.report import error, iso, replicate_record
from vmbk.replicate.transport import ReplicaFull, Space, Transport, Unreachable
from vmbk.settings import Replication, ReplicationOptions

log = logging.getLogger("vmbk.replicate")
#: Files a mismatch message names, at most.
NAMED = 5


@dataclasses.dataclass(frozen=True)
class RunOptions:
    root: Path
    session: str
    dry_run: bool = False
    #: ``--verify``: instead of each destination's ``verify``.
    verify: str | None = None
    settings: ReplicationOptions = dataclasses.field(default_factory=ReplicationOptions)


def _named(rels: Sequence[str]) -> str:
    more = len(rels) - NAMED
    return ", ".join(rels[:NAMED]) + (f" and {more} more" if more > 0 else "")


class Destination:
    """One destination of one run: its transport, its rows, its records."""

    def __init__(self, dest: Replication, transport: Transport, opts: RunOptions, history: History) -> None:
        self.dest = dest
        self.t = transport
        self.opts = opts
        self.history = history
        self.secrets_ok = True
        self.secrets_note = ""
        #: The run got to its end (an interrupted one is never recorded ok).
        self.completed = False
        #: VMs that failed / succeeded here (the run row's outcome).
        self.failures = 0
        self.successes = 0
        self.totals: dict[str, Any] = {"files": 0, "bytes": 0, "deleted": 0, "mismatches": 0}

    # -- what this destination gets -------------------------------------------
    def cut(self, listing: Listing) -> Listing:
        """The files in the destination's scope (secrets only where they may go)."""
        return {r: e for r, e in listing.items() if r != CATALOGUE and files.in_scope(r, self.dest.scope)
                and (self.secrets_ok or not files.is_secret(r))}

    def source(self, vm: str) -> Listing:
        return self.cut(files.walk(self.opts.root, vm))

    @property
    def failed(self) -> bool:
        return self.failures > 0

    def error(self, e: VmbkError, vm: str | None) -> Record:
        self.failures += 1
        return error(e, session=self.opts.session, vm=vm, dest=self.dest)

    def record(self, vm: str, action: str, outcome: str, **fields: Any) -> Record:
        self.successes += outcome != "skipped"
        return replicate_record(self.opts.session, vm, self.dest, self.t.kind, action, outcome,
                                path=self.t.where(vm), **fields)

    # -- push ------------------------------------------------------------------
    def push(self, vms: Sequence[str] | None) -> Iterator[Record]:
        """Replicate ``vms`` (None: every VM of the tree) to this destination."""
        started = time.monotonic()
        run = None if self.opts.dry_run else self.history.start(
            self.opts.session, self.dest.name, self.t.kind, "push", self.dest.sync_mode)
        wanted = list(vms) if vms is not None else files.source_vms(self.opts.root)
        outcome: dict[str, Any] = {"tool_exit": None, "error": None}
        try:
            try:
                space = self.t.space()
                replica = self.t.listing()
                self.secrets_ok, self.secrets_note = self.t.secrets_allowed()
            except VmbkError as e:
                outcome.update(error=str(e), tool_exit=getattr(e, "tool_exit", None))
                for vm in wanted:
                    yield self.error(_again(e, f"{vm!r} not replicated to {self.dest.name}"), vm)
                self.completed = True
                return
            yield from self._push_vms(wanted, vms is None, space, replica, run, outcome)
            self.completed = True
        finally:
            self._end(run, started, outcome, verified=self.opts.verify or self.dest.verify)

    def _push_vms(self, wanted: list[str], everything: bool, space: Space, replica: Listing, run: int | None,
                  outcome: dict[str, Any]) -> Iterator[Record]:
        on_replica = files.by_vm(replica)
        if everything and self.dest.sync_mode == MIRROR:
            wanted = sorted(set(wanted) | set(on_replica))  # a VM gone from the source goes from the mirror
        for vm in [v for v in wanted if self.dest.excludes(v)]:
            yield self.record(vm, "push", "skipped", reasons=[f"excluded from {self.dest.name} (exclude_vms)"])
        wanted = [v for v in wanted if not self.dest.excludes(v)]
        sources = {vm: self.source(vm) for vm in wanted}
        for vm in [v for v in wanted if not sources[v] and not on_replica.get(v)]:
            yield self.record(vm, "push", "skipped", reasons=["no backups of this VM, here or on the replica"])
        wanted = [v for v in wanted if sources[v] or on_replica.get(v)]
        plans = {vm: plan_vm(vm, sources[vm], self.cut(on_replica.get(vm, {})), self.dest.sync_mode,
                             self.t.tolerance) for vm in wanted}
        refusal = self._refusal(plans, replica, space)
        warnings = self._space_warnings(plans, space)
        stop: VmbkError | None = refusal
        for vm in wanted:
            if stop is not None:
                yield self.error(_again(stop, f"{vm!r} not replicated to {self.dest.name}"), vm)
                continue
            t0 = time.monotonic()
            try:
                rec = self._push_vm(vm, plans[vm], self.cut(on_replica.get(vm, {})), warnings)
            except VmbkError as e:
                if isinstance(e, (Unreachable, ReplicaFull)):
                    stop = e  # the VMs after this one fail at once, for the same reason
                tool_exit = getattr(e, "tool_exit", None)
                outcome.update(error=outcome["error"] or str(e), tool_exit=tool_exit)
                self.history.vm(run, vm, {"outcome": "failed", "error": str(e), "tool_exit": tool_exit,
                                          "duration_s": round(time.monotonic() - t0, 3)})
                yield self.error(_again(e, f"{vm!r} {'not replicated ' if stop else ''}to {self.dest.name}"), vm)
                continue
            self.history.vm(run, vm, {**rec, "outcome": rec["outcome"], "duration_s": rec["duration"],
                                      "verified": rec["verify"], "mismatches": 0})
            for k in ("files", "bytes", "deleted"):
                self.totals[k] += rec[k]
            yield rec
        if stop is None and not self.opts.dry_run and self.dest.sync_mode != "append-only":
            try:
                self._send_catalogue()
            except VmbkError as e:
                outcome.update(error=f"catalogue snapshot not copied: {e}", tool_exit=getattr(e, "tool_exit", None))
                self.failures += 1
                log.warning("%s: the catalogue snapshot was not copied: %s", self.dest.name, e)
        elif refusal is not None:
            outcome.update(error=str(refusal))

    def _refusal(self, plans: dict[str, VmPlan], replica: Listing, space: Space) -> VmbkError | None:
        if self.dest.sync_mode == MIRROR:
            if not files.source_vms(self.opts.root):
                return StorageError(f"refusing to mirror to {self.dest.name}: the source {self.opts.root} has no VM "
                                    "directories (not mounted? emptied?); nothing is deleted on the replica")
            removed, total = removal_share(plans.values(), self.cut(replica))
            if removed * 100 > total * self.dest.max_delete_percent:
                return StorageError(
                    f"refusing to mirror to {self.dest.name}: {removed} of the replica's {total} streams would be "
                    f"deleted ({removed / total:.0%} > max_delete_percent {self.dest.max_delete_percent}%); is "
                    f"the source {self.opts.root} the tree it should be? Nothing was copied or deleted")
        need = sum(p.send_bytes for p in plans.values())
        if (self.opts.settings.space_check == "skip" and space.known and space.free is not None
                and need > space.free and not self.opts.dry_run):
            return StorageError(f"not enough space on {self.dest.name}: {need} bytes to copy, {space.free} free "
                                "([replicate] space_check = skip)")
        return None

    def _space_warnings(self, plans: dict[str, VmPlan], space: Space) -> list[str]:
        s = self.opts.settings
        if s.space_check == "disabled" or not space.known or space.free is None:
            return []
        need = sum(p.send_bytes for p in plans.values())
        if need > space.free:
            return [f"{need} bytes to copy do not fit in the {space.free} free on {self.dest.name}"]
        if space.total and (space.free - need) * 100 < space.total * s.min_free_percent:
            return [f"{self.dest.name} will have less than {s.min_free_percent}% free after the copy"]
        return []

    def _push_vm(self, vm: str, plan: VmPlan, dst: Listing, warnings: list[str]) -> Record:
        started = time.monotonic()
        if self.opts.dry_run:
            return self._vm_record(vm, plan, {}, "dry-run", self.opts.verify or self.dest.verify, [], started,
                                   warnings)
        with VmLock(self.opts.root, vm, purpose="replicate"):
            src = self.source(vm)  # again, under the lock: what is copied is what is there now
            plan = plan_vm(vm, src, dst, self.dest.sync_mode, self.t.tolerance)
            if plan.moves:
                self.t.move(plan.moves)
            if plan.retract:
                self.t.remove(plan.retract, [])
            phases = [(sorted(plan.new[p]), sorted(plan.updates[p])) for p in PHASES]
            if any(new or updates for new, updates in phases):
                self.t.send(self.opts.root, [b for b in phases if b[0] or b[1]])
            if plan.deletes or plan.emptied:
                self.t.remove(plan.deletes, plan.emptied)
            blocked = tuple(c + "/" for c in plan.blocked)
            mode = self.opts.verify or self.dest.verify
            checked = {r: e for r, e in src.items() if not r.startswith(blocked)}
            mismatches = self._verify(vm, checked, mode)
        if mismatches:
            raise StorageError(f"{len(mismatches)} file(s) differ on {self.dest.name} after the copy "
                               f"({mode} verify): {_named(mismatches)}")
        if plan.problems:
            raise StorageError("; ".join(plan.problems))
        return self._vm_record(vm, plan, src, "ok", mode, [], started, warnings)

    def _verify(self, vm: str, src: Listing, mode: str) -> list[str]:
        if mode == "none" or not src:
            return []
        if mode == "size":
            after = self.t.listing([vm])
            return sorted(r for r, e in src.items() if r not in after or after[r].size != e.size)
        return self.t.mismatches(self.opts.root, sorted(src))

    def _vm_record(self, vm: str, plan: VmPlan, src: Listing, outcome: str, mode: str, mismatches: list[str],
                   started: float, warnings: list[str]) -> Record:
        secret = any(files.is_secret(r) for r in files.walk(self.opts.root, vm))
        secrets = ("none" if not secret else "copied" if self.secrets_ok else "withheld")
        newest = max((e.mtime for r, e in src.items() if files.is_data(r)), default=None)
        return self.record(
            vm, "push", outcome, files=plan.files, bytes=plan.send_bytes, deleted=plan.removals,
            moved=len(plan.moves), verify=mode, verified=len(src) if mode != "none" else 0,
            mismatches=mismatches, secrets=secrets, secrets_note=self.secrets_note if secret else None,
            last_backup=iso(newest), duration=round(time.monotonic() - started, 3),
            warnings=[*warnings, *plan.warnings])

    def _send_catalogue(self) -> None:
        with tempfile.TemporaryDirectory(prefix="vmbk-replicate-") as tmp:
            if snapshot.take(self.opts.root, Path(tmp)):
                self.t.send(Path(tmp), [([CATALOGUE], [])])

    def _end(self, run: int | None, started: float, outcome: dict[str, Any], verified: str) -> None:
        self.history.end(run, {
            **self.totals, **outcome, "verified": verified, "duration_s": round(time.monotonic() - started, 3),
            "outcome": "interrupted" if not self.completed else
                       "ok" if not self.failures else "partial" if self.successes else "failed"})

    # -- verify only -----------------------------------------------------------
    def verify(self, vms: Sequence[str] | None) -> Iterator[Record]:
        """Check the replica of ``vms`` against the tree; copy nothing."""
        mode = self.opts.verify or ("checksum" if self.dest.verify == "none" else self.dest.verify)
        started = time.monotonic()
        run = self.history.start(self.opts.session, self.dest.name, self.t.kind, "verify", self.dest.sync_mode)
        outcome: dict[str, Any] = {"tool_exit": None, "error": None}
        try:
            self.secrets_ok, self.secrets_note = self.t.secrets_allowed()
            for vm in (list(vms) if vms is not None else files.source_vms(self.opts.root)):
                if self.dest.excludes(vm):
                    continue
                t0 = time.monotonic()
                try:
                    src = self.source(vm)
                    mismatches = self._verify(vm, src, mode)
                except VmbkError as e:
                    outcome.update(error=str(e), tool_exit=getattr(e, "tool_exit", None))
                    yield self.error(_again(e, f"{vm!r} on {self.dest.name} not verified"), vm)
                    continue
                self.totals["mismatches"] += len(mismatches)
                row = {"verified": mode, "mismatches": len(mismatches), "duration_s": round(time.monotonic() - t0, 3)}
                if mismatches:
                    bad = StorageError(f"{len(mismatches)} file(s) of {vm!r} differ on {self.dest.name} or are "
                                       f"missing there ({mode} verify): {_named(mismatches)}", vm=vm)
                    self.history.vm(run, vm, {**row, "outcome": "failed", "error": str(bad)})
                    yield self.error(bad, vm)
                    continue
                self.history.vm(run, vm, {**row, "outcome": "ok"})
                yield self.record(vm, "verify", "ok", files=0, bytes=0, deleted=0, moved=0, verify=mode,
                                  verified=len(src), mismatches=[], duration=row["duration_s"])
            self.completed = True
        except VmbkError as e:
            outcome.update(error=str(e), tool_exit=getattr(e, "tool_exit", None))
            self.completed = True
            yield self.error(_again(e, f"{self.dest.name} not verified"), None)
        finally:
            self._end(run, started, outcome, mode)


def _again(e: VmbkError, context: str) -> VmbkError:
    """The same failure (class, code, tool exit) with what it stopped in front."""
    msg = e.message if e.message.startswith(context) else f"{context}: {e.message}"
    out = type(e)(msg)
    if hasattr(e, "tool_exit"):
        out.tool_exit = e.tool_exit  # type: ignore[attr-defined]
    return out


__all__ = ["Destination", "RunOptions"]
