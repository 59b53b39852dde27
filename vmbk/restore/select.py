"""Which chain, restore point and disks a restore (or verify) uses.

vmrestore guide, section 5: the period defaults to the newest one (here:
the active chain with the newest backup, which also works when a policy
change left periods of two formats side by side), the restore point to
the latest, ``full`` means point 0, and every disk of the point is
restored unless ``--disk`` names some.  The latest point is refused when
it is incomplete (guide, 9.2); so is an explicitly named incomplete point,
unless ``--include-incomplete`` (forensic use).  A point whose data files
lost their ``.chksum`` is refused unless ``--no-verify``
(`vmbk.tree.points`, "unverifiable"); one whose manifests do not vouch
for it (tampered, missing, unsigned, signed by a key this host does not
trust: `RestorePoint.trusted`) unless ``--force``, which then says what
it skips.

Exit codes (guide, section 17): an unknown period, an incomplete target
and a disk not in the point are VM problems (5); a malformed or
non-existent ``--restore-point`` is a usage error (7).
"""

from __future__ import annotations

from vmbk.errors import UsageError, VmError
from vmbk.tree.points import RestorePoint, chain_warnings, restore_points
from vmbk.restore.source import Source
from vmbk.tree import Chain
from vmbk.tree.names import where


def parse_restore_point(raw: str | None) -> int | None:
    """``None``/``latest`` -> None (the latest), ``full`` -> 0, ``N`` -> N."""
    if raw is None or raw == "latest":
        return None
    if raw == "full":
        return 0
    if raw.isascii() and raw.isdigit():
        return int(raw)
    raise UsageError(f"--restore-point must be a number, 'full' or 'latest', not {raw!r}")


def parse_disks(raw: str | None) -> tuple[str, ...] | None:
    """``vda,vdb`` -> ("vda", "vdb"); None or ``all`` -> None (every disk)."""
    if raw is None or raw.strip() == "all":
        return None
    disks = tuple(dict.fromkeys(d.strip() for d in raw.split(",") if d.strip()))
    if not disks or "all" in disks:
        raise UsageError(f"--disk takes disk names (vda,vdb) or 'all', not {raw!r}")
    return disks


def active_chains(source: Source) -> list[Chain]:
    """The VM's period directories (and accumulate chain) with data, oldest first."""
    chains = [c for c in source.tree.chains.values() if c.data or c.archives or c.partials]
    return sorted(chains, key=lambda c: (c.last_time or 0.0, c.rel))


def choose_chain(source: Source, period: str | None) -> Chain:
    """The chain ``--vm``/``--period`` select (the newest when neither does)."""
    if source.chain is not None:
        if period is not None and period != source.chain.period:
            raise UsageError(f"--period {period} does not match the chain {source.chain.path} that --vm names")
        return source.chain
    tree = source.tree
    if period is not None:
        chain = tree.chains.get(period)
        if chain is None or period == ".":
            known = [c.rel for c in active_chains(source) if c.rel != "."]
            raise VmError(f"VM {source.vm!r} has no period {period!r}"
                          + (f" (periods: {', '.join(known)})" if known else " (no period directories)"), vm=source.vm)
    else:
        latest = tree.latest()
        if latest is None:
            archived = [a.path for c in tree.chains.values() for a in c.archives]
            hint = f"; archived chains can be named with --vm {archived[-1]}" if archived else ""
            raise VmError(f"VM {source.vm!r} has no backup chain with data in {tree.path}{hint}", vm=source.vm)
        chain = latest
    if not chain.data:
        hint = f"; its archived chains: --vm {chain.archives[-1].path}" if chain.archives else ""
        raise VmError(f"{where(chain.rel)} of VM {source.vm!r} holds no backup data{hint}", vm=source.vm)
    return chain


def choose_point(chain: Chain, requested: int | None, *, include_incomplete: bool, vm: str,
                 verify: bool = True, force: bool = False) -> RestorePoint:
    points = restore_points(chain)
    if not points:
        raise VmError(f"{chain.path} holds no restore point", vm=vm)
    if requested is None:
        point = points[-1]
    else:
        found = [p for p in points if p.index == requested]
        if not found:
            raise UsageError(f"{chain.path} has no restore point {requested} "
                             f"(points: {', '.join(str(p.index) for p in points)})")
        point = found[0]
    good = [p.index for p in points if p.complete and p.index < point.index]
    hint = f"; the newest complete point is --restore-point {good[-1]}" if good else ""
    if point.problems and not include_incomplete:
        raise VmError(f"restore point {point.index} of {chain.path} is incomplete: {'; '.join(point.problems)}"
                      f"{hint} (or --include-incomplete, for forensic use)", vm=vm)
    if not point.trusted and not force:
        raise VmError(f"restore point {point.index} of {chain.path} is {point.integrity}: "
                      f"{'; '.join(point.integrity_findings)}{hint} (--force restores it anyway, skipping the "
                      f"manifest and checksum checks it fails)", vm=vm)
    if point.unverifiable and verify:
        raise VmError(f"restore point {point.index} of {chain.path} cannot be verified: "
                      f"{', '.join(point.unverifiable)} lost their .chksum (or were written by a virtnbdbackup "
                      f"before 1.9.40, which wrote none), their data may be damaged too{hint} "
                      f"(or --no-verify restores it unchecked)", vm=vm)
    return point


def choose_disks(point: RestorePoint, requested: tuple[str, ...] | None, *, vm: str) -> tuple[str, ...]:
    if requested is None:
        return tuple(sorted(point.disks))
    for disk in requested:
        if disk not in point.disks:
            seen = [p.index for p in restore_points(point.chain) if disk in p.disks]
            hint = (f"; it was last backed up at restore point {seen[-1]} (--restore-point {seen[-1]})"
                    if seen else "")
            raise VmError(f"disk {disk!r} is not in restore point {point.index} of {point.chain.path} "
                          f"(disks: {', '.join(sorted(point.disks)) or 'none'}){hint}", vm=vm)
    return requested


def choose(source: Source, *, period: str | None, restore_point: int | None, disks: tuple[str, ...] | None,
           include_incomplete: bool, verify: bool, force: bool,
           doing: str = "restored") -> tuple[Chain, RestorePoint, tuple[str, ...], list[str]]:
    """Chain, point and disks as a restore (``doing``: or a --serve) chooses them, and the warnings
    about what was accepted on request (an incomplete point, streams without .chksum, --force)."""
    chain = choose_chain(source, period)
    point = choose_point(chain, restore_point, include_incomplete=include_incomplete, vm=source.vm, verify=verify,
                         force=force)
    chosen = choose_disks(point, disks, vm=source.vm)
    warnings = chain_warnings(chain) + [f"incomplete point {doing} on request: {p}" for p in point.problems]
    warnings += [f"--no-verify: {n} has no .chksum and is {doing} unchecked" for n in point.unverifiable]
    warnings += [f"--force: {doing} although point {point.index} is {point.integrity} ({line}): "
                 f"its manifest and checksum checks are skipped" for line in ([] if point.trusted else
                                                                            point.integrity_findings)]
    return chain, point, chosen, warnings

