"""What to do to one VM's replica: a pure decision over two listings.

Input: the source's files of the VM and the replica's (`vmbk.replicate.files`
listings, already cut to the destination's scope), the sync mode and how
precisely the replica keeps modification times.  Output: a `VmPlan`,
carried out in this order (`vmbk.replicate.push`), which is what keeps a
replica interrupted at any instant from showing a restore point whose data
is missing or from another chain:

1. ``moves``: the source archived a chain (its files moved into
   ``<chain>/.archives/chain-...``) and began a new one in the same
   directory: the replica's copy of the old chain moves the same way
   (renames on the replica, not a new copy), data first, so the archive
   shows no point before its data and the old place loses its data before
   its ``.cpt``;
2. ``retract`` (mirror only): what is left of an old chain in a directory
   the source reuses is deleted *before* any file of the new chain lands
   there, ``.cpt`` first -- a new full beside old incrementals would
   otherwise make points that look whole and restore garbage;
3. the copies, phase by phase: data (streams and ``.chksum``), side files,
   the checkpoint and domain XMLs, and last the ``.cpt``: until the
   ``.cpt`` that lists a point has arrived, the replica lists that point
   as incomplete;
4. ``deletes`` (mirror only): what rotate removed at the source, the
   ``.cpt`` of a chain first, then emptied directories.

accumulate never deletes: an old chain that no source archive accounts for
blocks its directory (a problem, nothing of the new chain goes there).
append-only never overwrites either: a changed ``.cpt`` or TPM state is an
*update* the far side applies itself (`vmbk.replicate.receive`), other
changed files keep their first copy (a warning).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from vmbk.replicate.files import (
    PHASES,
    Entry,
    Listing,
    archive_root,
    chain_dir,
    is_data,
    is_secret,
    phase,
)
from vmbk.tree import names

MIRROR, ACCUMULATE, APPEND_ONLY = "mirror", "accumulate", "append-only"


@dataclasses.dataclass
class VmPlan:
    vm: str
    moves: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    retract: list[str] = dataclasses.field(default_factory=list)
    #: phase -> files the replica does not have / has in another version.
    new: dict[int, list[str]] = dataclasses.field(default_factory=lambda: {p: [] for p in PHASES})
    updates: dict[int, list[str]] = dataclasses.field(default_factory=lambda: {p: [] for p in PHASES})
    deletes: list[str] = dataclasses.field(default_factory=list)
    #: directories that removals and moves empty, to remove (deepest first).
    emptied: list[str] = dataclasses.field(default_factory=list)
    #: chain directories nothing is written to (``problems`` says why).
    blocked: list[str] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    send_bytes: int = 0

    def sends(self, p: int) -> list[str]:
        return sorted(self.new[p] + self.updates[p])

    @property
    def files(self) -> int:
        return sum(len(self.new[p]) + len(self.updates[p]) for p in PHASES)

    @property
    def removals(self) -> int:
        return len(self.retract) + len(self.deletes)


def _order(rels: Iterable[str], *, commit_first: bool = False) -> list[str]:
    """Phase order (data, side, commit), or its reverse for what goes away."""
    key = (lambda r: (-phase(r), r)) if commit_first else (lambda r: (phase(r), r))
    return sorted(rels, key=key)


def replaceable(rel: str) -> bool:
    """Files an append-only replica takes a new version of (applied by the
    far side): the growing ``.cpt`` and the TPM state."""
    return rel.endswith(".cpt") or is_secret(rel)


def plan_vm(vm: str, src: Mapping[str, Entry], dst: Mapping[str, Entry], mode: str, tolerance: float) -> VmPlan:
    plan = VmPlan(vm)
    dst = dict(dst)

    def same(rel: str) -> bool:
        s, d = src.get(rel), dst.get(rel)
        return s is not None and d is not None and s.same(d, tolerance)

    src_chains = _chains(src)
    for chain, members in sorted(_chains(dst).items()):
        if all(same(r) for r in members):
            continue
        # the source reuses the directory for another chain: its old one must go first
        stale = chain in src_chains and any(is_data(r) and not same(r) for r in members)
        _follow_archive(plan, chain, members, src, dst, tolerance)
        if not stale:
            continue  # what is left goes with the deletions (mirror) or stays
        left = [r for r in members if r in dst and not same(r)]
        if mode == MIRROR:
            plan.retract += _order(left, commit_first=True)
            for r in left:
                dst.pop(r)
        elif any(is_data(r) for r in left):
            old = ", ".join(sorted(r.rsplit("/", 1)[-1] for r in left if is_data(r)))
            plan.blocked.append(chain)
            plan.problems.append(
                f"{chain}: the replica holds a chain the source no longer has ({old}) and {mode} never deletes: "
                "nothing of the source's new chain is copied there until it is moved away on the replica")

    for rel in _order(src):
        if chain_dir(rel) in plan.blocked:
            continue
        if rel not in dst:
            plan.new[phase(rel)].append(rel)
        elif not same(rel):
            if mode == APPEND_ONLY and not replaceable(rel):
                plan.warnings.append(f"{rel} changed at the source; the append-only replica keeps its first copy")
                continue
            plan.updates[phase(rel)].append(rel)
    plan.send_bytes = sum(src[r].size for p in PHASES for r in plan.new[p] + plan.updates[p])

    if mode == MIRROR:
        plan.deletes = _order((r for r in dst if r not in src), commit_first=True)
    if mode != APPEND_ONLY:
        moved = [a for a, _ in plan.moves]
        going = set(plan.deletes)
        plan.emptied = _emptied(plan.retract + plan.deletes + moved, [r for r in dst if r not in going] + list(src))
    return plan


def _chains(listing: Iterable[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for rel in listing:
        out.setdefault(chain_dir(rel), []).append(rel)
    return out


def _follow_archive(plan: VmPlan, chain: str, members: list[str], src: Mapping[str, Entry], dst: Listing,
                    tolerance: float) -> None:
    """Move the replica's files of ``chain`` where the source archived them.

    A file moves to ``<chain>/.archives/<name>/<same relative name>`` when
    the source has a file there of the same size and time and the replica
    does not: renames, so a chain archived at the source costs no copy.
    """
    root = archive_root(chain) + "/"
    archives = sorted({r[len(root):].split("/", 1)[0] for r in src if r.startswith(root)}, reverse=True)
    archives = [a for a in archives if names.is_archive_name(a)]
    for rel in _order(members):
        d = dst.get(rel)
        if d is None or (rel in src and src[rel].same(d, tolerance)):
            continue
        inner = rel[len(chain) + 1:]
        for a in archives:
            target = f"{root}{a}/{inner}"
            s = src.get(target)
            if s is not None and target not in dst and s.same(d, tolerance):
                plan.moves.append((rel, target))
                dst[target] = dst.pop(rel)
                break


def _emptied(removed: list[str], kept: list[str]) -> list[str]:
    """Directories holding removed files and no kept one, deepest first."""
    def parents(rel: str) -> list[str]:
        parts = rel.split("/")[:-1]
        return ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]

    alive = {d for r in kept for d in parents(r)}
    gone = {d for r in removed for d in parents(r)} - alive
    return sorted(gone, key=lambda d: (-d.count("/"), d))


def removal_share(plans: Iterable[VmPlan], replica: Iterable[str]) -> tuple[int, int]:
    """(streams the plans remove, streams on the replica): what mirror's
    ``max_delete_percent`` weighs.  Streams (``.data``) only: a killed
    copy's temporary file or a stale side file is not a backup lost."""
    removed = sum(1 for p in plans for r in p.retract + p.deletes if is_data(r))
    return removed, sum(1 for r in replica if is_data(r))


__all__ = ["ACCUMULATE", "APPEND_ONLY", "MIRROR", "VmPlan", "plan_vm", "removal_share",
           "replaceable"]
