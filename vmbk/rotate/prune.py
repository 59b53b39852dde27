"""``vmbk-rotate --prune``: vmbackup's on-demand cleanup (manual, "On-Demand Cleanup").

``list`` is read-only and needs nothing but the tree: one ``prune_target``
record per thing that can be removed, with its size and the command that
removes it (all VMs: each VM whole and its archived chains; one VM: also
every period, the archives of each period and every archived chain).

The other targets are decided without the lock (`decide`, pure rules in
`vmbk.policy.retention.prune`), shown and confirmed (`confirm`: on the
terminal, or ``--yes``), then carried out VM by VM under its lock
(`carry_out`), decided again on the tree as it is then: only what was
confirmed and is still allowed goes.  A target that leaves nothing to
remove (everything guarded, the clock wrong) is a failure of that VM.
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Iterator, Sequence
from typing import IO, Any

from vmbk.errors import UsageError, VmbkError, VmError
from vmbk.policy import retention
from vmbk.policy.retention import Decision, Target, TreeFacts
from vmbk.records import Record, make
from vmbk.rotate.facts import gather
from vmbk.rotate.run import RotateRun, check_vm
from vmbk.tree import scan_vm
from vmbk.tree.scan import vm_dirs


def targets(run: RotateRun, vms: Sequence[str], session: str, options: Sequence[str] = ()) -> Iterator[Record]:
    """``--prune list``: every VM (totals), or the VMs named (every target).

    ``options`` (``--backup-path``, ``--config-instance`` as given) go into
    the commands, so they can be pasted as they are.
    """
    detail = bool(vms)
    for vm in vms or [e.name for e in vm_dirs(run.root)]:
        check_vm(run.root, vm)
        facts = gather(scan_vm(run.root, vm))
        if not facts.bytes and not facts.periods:
            if detail:
                raise VmError(f"no backups of VM {vm!r} under {run.root}", vm=vm)
            continue
        yield from _targets(run, facts, session, detail, options)


def _targets(run: RotateRun, facts: TreeFacts, session: str, detail: bool,
             options: Sequence[str]) -> Iterator[Record]:
    vm = facts.vm
    vm_dir = run.root / vm
    archives = facts.all_archives()

    def rec(target: str, path: str, size: int, periods: int, narch: int) -> Record:
        command = shlex.join(["vmbk-rotate", *options, "--prune", target, "--vm", vm])
        return make("prune_target", session, name=vm, target=target, path=path, bytes=size, periods=periods,
                    archives=narch, command=command)

    yield rec("all", str(vm_dir), facts.bytes, len(facts.periods), len(archives))
    if archives:
        yield rec("archives", str(vm_dir), sum(a.bytes for a in archives), 0, len(archives))
    if not detail:
        return
    names = [a.name for a in archives]
    for p in facts.periods:
        yield rec(f"period:{p.period}", str(vm_dir / p.rel), p.bytes, 1, len(p.archives))
        if p.archives:
            yield rec(f"archives:{p.period}", str(vm_dir / p.rel), sum(a.bytes for a in p.archives), 0,
                      len(p.archives))
    for a in archives:
        name = a.name if names.count(a.name) == 1 else a.rel
        yield rec(f"chain:{name}", str(vm_dir / a.rel), a.bytes, 0, 1)


def decide(run: RotateRun, target: Target, vms: Sequence[str]) -> list[Decision | VmbkError]:
    """What ``--prune target`` would remove of each VM (no lock: nothing is removed here)."""
    out: list[Decision | VmbkError] = []
    every = not vms
    for vm in vms or [e.name for e in vm_dirs(run.root)]:
        try:
            check_vm(run.root, vm)
            facts = run.facts(vm)
            if every and not facts.all_archives():
                continue  # --prune archives of every VM: those without any are no concern
            out.append(_checked(retention.prune(facts, target, run.cfg.policy_for(vm)[0], run.cfg.retention,
                                                run.now)))
        except VmbkError as e:
            if e.vm is None:
                e.vm = vm
            out.append(e)
    return out


def _checked(d: Decision) -> Decision:
    if d.refused:
        raise VmbkError(d.refused, vm=d.vm)
    if not d.removed:
        why = "; ".join(f"{p.rel}: {p.why}" for p in d.protected)
        raise VmError(f"nothing of VM {d.vm!r} can be removed: {why}", vm=d.vm)
    return d


def confirm(decisions: Sequence[Decision], target: Target, stdin: IO[Any], stderr: IO[Any]) -> bool:
    """Show what goes and ask on the terminal; False unless the answer is yes."""
    removals = [(d.vm, r) for d in decisions for r in d.removed]
    lines = [f"vmbk-rotate --prune {target} removes:"]
    lines += [f"  {vm}: {r.rel if r.rel != '.' else '(the whole VM directory)'}  {_size(r.bytes)}"
              for vm, r in removals]
    lines += [f"  {d.vm}: {p.rel} stays: {p.why}" for d in decisions for p in d.protected]
    total = sum(r.bytes for _, r in removals)
    lines.append(f"Remove {len(removals)} director{'y' if len(removals) == 1 else 'ies'} ({_size(total)})? [y/N] ")
    stderr.write("\n".join(lines))
    stderr.flush()
    answer = stdin.readline()
    return answer.strip().lower() in ("y", "yes")


def refuse_unconfirmed(target: Target) -> UsageError:
    return UsageError(f"--prune {target} deletes backups: it asks on a terminal; in a pipe or a script pass --yes "
                      "(or --dry-run to see what it would remove)")


def carry_out(run: RotateRun, confirmed: Decision, target: Target, session: str, dry_run: bool) -> Record:
    """Under the VM's lock: decide again and remove what is still allowed and was confirmed."""
    vm = confirmed.vm
    with run.locked(vm, session, dry_run) as finished:
        facts = run.facts(vm)
        d = retention.prune(facts, target, run.cfg.policy_for(vm)[0], run.cfg.retention, run.now)
        agreed = {r.rel for r in confirmed.removed}
        d = _only(d, agreed)
        done = run.carry_out(session, facts, _checked(d), dry_run, "prune")
    return run.record(session, d, done, dry_run, finished=finished, prune=str(target))


def _only(d: Decision, rels: set[str]) -> Decision:
    """``d`` without removals that were not confirmed (the tree changed meanwhile)."""
    extra = [r for r in d.removed if r.rel not in rels]
    if not extra:
        return d
    kept = d.kept + tuple(retention.Kept(r.rel, "not in what was confirmed") for r in extra)
    return dataclasses.replace(d, removed=tuple(r for r in d.removed if r.rel in rels), kept=kept)


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
