"""Can the chain in the target directory take one more incremental?

Each check returns reasons; any reason means "archive the chain, start a
new one with a full" -- vmbackup's self-remediation table (manual,
"Self-Remediation Summary" and "Validation States"): a broken checkpoint
chain, stale metadata, missing data and ``.partial`` leftovers all end in
archive + FULL.  vmbk archives rather than deletes, so nothing that
might still restore is lost.  The checks are deliberately strict: an
incremental on a chain that is not provably sound restores garbage, a
needless full only costs time and space.

One exception, where vmbk does better than a full: an incremental that
died before its point was committed (`unfinished_point`) left only its
``.partial`` streams, streams of some disks already renamed (a VM's disks
are copied side by side and each is renamed when it is done: a kill
while another disk copies), side files and a manifest of point N, and
libvirt's checkpoint N -- nothing the ``.cpt`` lists -- and the chain is
sound up to N-1.  Those are removed (vmbk-backup: the ``.partial`` files
of ``cleanup``, then every file of point N, `vmbk.tree.ops.remove_unfinished`)
and the chain goes on from N-1: deleting checkpoint N makes libvirt merge
its bitmap into N-1's, which then holds every write since N-1 again, so
the incremental that follows misses nothing
(tests/integration/test_backup_kill_points.py restores every point of
chains that went through this, byte for byte).  Renamed streams of N
count only when libvirt still has checkpoint N: it is what proves them
a run that began after N-1 and did not finish.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from vmbk.fsutil import PARTIAL
from vmbk.policy.disks import CHECKPOINT, COPY_ONLY, DiskChoice
from vmbk.policy.facts import VmFacts
from vmbk.tree.model import Chain
from vmbk.tree.names import checkpoint_name, checkpoint_number, parse_data_name, where


def unfinished_point(chain: Chain, vm: VmFacts) -> str | None:
    """Checkpoint N of an incremental that died before its point was committed.

    None unless what it left is all there is beyond the chain's last point:
    ``.partial`` streams of incremental N only, no data file of N or later,
    and libvirt's checkpoints ahead of the chain are N alone (or none).
    The other checks still run: any other flaw archives the chain.
    """
    if chain.cpt_error or not chain.cpt:
        return None
    n = len(chain.cpt)
    name = checkpoint_name(n)
    for p in chain.partials:
        parsed = parse_data_name(p[: -len(PARTIAL)]) if p.endswith(".data" + PARTIAL) else None
        if parsed is None or parsed.level != "inc" or parsed.number != n:
            return None
    later = [f for f in chain.data if f.number is not None and f.number >= n]
    if any(f.level != "inc" or f.number != n for f in later):
        return None
    if vm.checkpoints is None:
        return None
    ahead = [c for c in vm.checkpoints if (checkpoint_number(c) or -1) >= n]
    if ahead not in ([], [name]) or not (chain.partials or ahead):
        return None
    if later and ahead != [name]:
        return None  # streams of N without libvirt's checkpoint N: not provably an unfinished run
    return name


def unfinished_streams(chain: Chain, unfinished: str) -> list[str]:
    """The renamed streams of the unfinished point ``unfinished`` (see `unfinished_point`)."""
    n = checkpoint_number(unfinished)
    return [f.name for f in chain.data if f.level == "inc" and f.number == n]


def _committed(chain: Chain, unfinished: str | None) -> Chain:
    """``chain`` without the streams of the unfinished point (they are removed before the backup)."""
    if unfinished is None:
        return chain
    gone = set(unfinished_streams(chain, unfinished))
    return dataclasses.replace(chain, data=tuple(f for f in chain.data if f.name not in gone)) if gone else chain


def file_problems(chain: Chain, *, unfinished: str | None = None) -> list[str]:
    """The files of a full chain against its ``.cpt`` and stream headers
    (``unfinished``: the partials and streams of that point are expected, see `unfinished_point`)."""
    chain = _committed(chain, unfinished)
    out: list[str] = []
    loc = where(chain.rel)
    if chain.partials and unfinished is None:
        out.append(f"leftover partial file(s) of an interrupted backup in {loc}: {', '.join(chain.partials)}")
    for f in chain.data:
        if f.error:
            out.append(f"unreadable stream header of {f.name}: {f.error}")
    if chain.cpt_error:
        out.append(f"checkpoint list unreadable: {chain.cpt_error}")
        return out
    if chain.cpt is None:
        out.append(f"the chain in {loc} has no checkpoint list (.cpt)")
        return out
    expected = tuple(checkpoint_name(i) for i in range(len(chain.cpt)))
    if not chain.cpt or chain.cpt != expected:
        out.append(f"checkpoint list {list(chain.cpt)} is not virtnbdbackup.0 .. N in order")
        return out
    if chain.cpt != chain.file_checkpoints:
        out.append(
            f"checkpoint list {list(chain.cpt)} does not match the data files "
            f"(they hold {list(chain.file_checkpoints)})"
        )
        return out
    for disk in chain.checkpointed_disks:
        for n, name in enumerate(chain.cpt):
            level = "full" if n == 0 else "inc"
            df = next((f for f in chain.data if f.disk == disk and f.level == level
                       and (n == 0 or f.number == n)), None)
            if df is None:
                out.append(f"{disk} has no data file for {name}")
            elif df.error is None and not _meta_agrees(df.meta_checkpoint, df.meta_parent, name, n):
                parent = f" with parent {checkpoint_name(n - 1)}" if n else ""
                out.append(
                    f"stream header of {df.name} names checkpoint {df.meta_checkpoint!r} "
                    f"(parent {df.meta_parent!r}); the chain expects {name}{parent}"
                )
    return out


def _meta_agrees(cpt: str | None, parent: str | None, name: str, n: int) -> bool:
    if cpt is not None and cpt != name:
        return False
    if n > 0 and parent is not None and parent != checkpoint_name(n - 1):
        return False
    return True


def disk_problems(chain: Chain, choices: Sequence[DiskChoice]) -> list[str]:
    """Disk added, removed, resized or changed kind since the chain began."""
    out: list[str] = []
    recorded = chain.disks
    now_in = {c.target: c for c in choices if c.kind in (CHECKPOINT, COPY_ONLY)}
    for target in sorted(set(now_in) - set(recorded)):
        out.append(f"disk {target} was added since the chain began")
    for target in sorted(set(recorded) - set(now_in)):
        out.append(f"disk {target} was removed since the chain began")
    checkpointed = set(chain.checkpointed_disks)
    for target, choice in sorted(now_in.items()):
        if target not in recorded:
            continue
        if (choice.kind == CHECKPOINT) != (target in checkpointed):
            out.append(f"disk {target} changed between checkpointed and copy-only since the chain began")
        size = choice.disk.virtual_size
        if size is None:
            out.append(f"virtual size of {target} unknown: cannot tell whether it was resized")
        elif recorded[target] is not None and size != recorded[target]:
            out.append(f"disk {target} was resized from {recorded[target]} to {size} bytes")
    return out


def checkpoint_problems(chain: Chain, vm: VmFacts, choices: Sequence[DiskChoice], *,
                        unfinished: str | None = None) -> tuple[list[str], list[str]]:
    """``(problems, to_redefine)`` for the next incremental on ``chain``.

    libvirt's checkpoint metadata can be lost (host reinstall, a domain
    undefined and defined again) while QEMU's bitmaps survive inside the
    qcow2: then the checkpoints are redefined from the chain's
    ``checkpoints/*.xml``, as virtnbdbackup does.  A bitmap that is
    missing or disabled cannot be recovered: a new chain starts.
    """
    assert chain.cpt
    parent = chain.cpt[-1]
    problems: list[str] = []
    redefine: list[str] = []
    if vm.checkpoints is None:
        problems.append("libvirt checkpoint list unknown: cannot tell whether the parent checkpoint exists")
    else:
        known = set(vm.checkpoints)
        ahead = sorted((c for c in known if (checkpoint_number(c) or -1) >= len(chain.cpt) and c != unfinished),
                       key=lambda c: checkpoint_number(c) or 0)
        if ahead:
            problems.append(f"libvirt has checkpoint(s) {', '.join(ahead)} the chain does not know "
                            "(a backup that did not finish?)")
        lost = [c for c in chain.cpt if c not in known]
        no_xml = [c for c in lost if c not in chain.checkpoint_xmls]
        if no_xml:
            problems.append(f"libvirt lost checkpoint(s) {', '.join(no_xml)} and the chain in {where(chain.rel)} has no "
                            "checkpoints/*.xml to redefine them")
        elif lost:
            redefine = lost
    for c in choices:
        if c.kind != CHECKPOINT:
            continue
        d = c.disk
        if d.bitmaps is None:
            problems.append(f"bitmaps of {c.target} unknown: cannot prove the incremental would be complete")
            continue
        bm = d.bitmap(parent)
        if bm is None and d.bitmaps_live and parent in redefine:
            # A running VM shows only the bitmaps of checkpoints libvirt
            # knows; the backup redefines with REDEFINE_VALIDATE, which
            # fails if QEMU lacks the bitmap, and then falls back to a full.
            continue
        if bm is None:
            problems.append(f"{c.target} has no bitmap {parent} (lost or broken)")
        elif bm.flags is not None and "auto" not in bm.flags:
            problems.append(f"bitmap {parent} of {c.target} is disabled (not 'auto'): it no longer tracks writes")
    return problems, redefine
