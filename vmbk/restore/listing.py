"""``--list`` and ``--list-restore-points``: what can be restored, as records.

vmrestore guide, 9.1: one line per VM with its layout, restore point count
(summed over its periods), archived chains, size and tags (TPM,
multi-disk), and the health line (`vmbk.restore.health`: chains active
and broken by the same rule as the ``chain`` records below, the
catalogue's last failed attempt when there is one).  A tree vmbackup
wrote to has its history in ``_state/vmbackup.db``: read-only, it adds
the ``vmbackup`` object (its backups, last attempt and per-period chain
health, `vmbk.vmbackup.db.VmbackupDb.summary`) and, when vmbackup's
attempt is the newest and failed, says so in the health line.  9.2: every period
with its numbered restore points (date, type FULL/Incremental/COPY, disk
set) and the archived chains expanded inline; incomplete chains flagged.
Here each chain is a ``chain`` record followed by its ``restore_point``
records, archives after the chain they were archived from.  Pure reads of
the tree (the catalogue, read-only and optional, only adds history): no
lock, so it works unprivileged on a copied tree.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vmbk.errors import VmError
from vmbk.fsutil import dir_size
from vmbk.records import Record, make
from vmbk.restore import health
from vmbk.tree.points import RestorePoint, chain_complete, chain_warnings, restore_points
from vmbk.restore.select import active_chains
from vmbk.restore.source import Source, locate_name
from vmbk.tree import Chain, names
from vmbk.tree import state as tree_state
from vmbk.tree.scan import roots, vm_dirs
from vmbk.virt.domain import parse_domain_xml
from vmbk.vmbackup.db import VmbackupDb

def list_vms(backup_path: Path, session: str | None = None) -> Iterator[Record]:
    """One ``backup_vm`` record per VM directory that holds backups, host by host.

    A tree with a level per host (several hosts configured) has its VMs in
    each host's directory (`vmbk.tree.scan.roots`): each is listed with its
    ``host``, and its history is that directory's own catalogue.
    """
    for root in roots(backup_path):
        yield from _list_root(root.path, session, root.host)


def _list_root(backup_path: Path, session: str | None, host: str | None) -> Iterator[Record]:
    entries = vm_dirs(backup_path)
    history = health.History(backup_path)
    theirs = VmbackupDb(backup_path)
    try:
        for entry in entries:
            source = locate_name(backup_path, entry.name)
            chains = active_chains(source)
            if not chains:
                continue
            rec = vm_record(source, chains, session, history.of(source.vm), theirs.summary(source.vm))
            yield {**rec, "host": host} if host else rec
    finally:
        history.close()
        theirs.close()


def vm_record(source: Source, chains: list[Chain], session: str | None,
              history: dict[str, Any] | None = None, vmbackup: dict[str, Any] | None = None) -> Record:
    """The ``backup_vm`` record; ``history`` is the catalogue's (`health.History.of`),
    ``vmbackup`` vmbackup's (`vmbk.vmbackup.db.VmbackupDb.summary`)."""
    tree = source.tree
    points = {c.rel: restore_points(c) for c in chains}
    state = health.of_chains(chains, points)
    last_backup = _iso(tree.last_backup)
    latest = tree.latest()
    disks = sorted(points[latest.rel][-1].disks) if latest is not None and points.get(latest.rel) else []
    periods = [c.rel for c in sorted(chains, key=_by_days) if c.rel != "."]
    accumulate = any(c.rel == "." for c in chains)
    tags = [t for t, on in (("tpm", any(_has_tpm(c) for c in chains)), ("uefi", _has_nvram(latest)),
                            ("multi-disk", len(disks) > 1)) if on]
    return make(
        "backup_vm", session,
        vm=source.vm,
        path=str(tree.path),
        layout="mixed" if periods and accumulate else "periodic" if periods else "accumulate",
        policy=latest.policy if latest is not None else None,
        periods=periods,
        restore_points=sum(len(p) for p in points.values()),
        incomplete_points=sum(1 for ps in points.values() for p in ps if not p.complete),
        archived_chains=sum(len(c.archives) for c in chains),
        disks=disks,
        tags=tags,
        size=dir_size(tree.path),
        last_backup=last_backup,
        uuid=latest.uuid if latest is not None else None,
        **state,
        health=health.line(state, last_backup, history, vmbackup),
        catalogue=history,
        vmbackup=vmbackup,
    )


def list_points(source: Source, period: str | None, session: str | None = None) -> Iterator[Record]:
    """``chain`` and ``restore_point`` records of the chains asked for.

    A chain directory named by ``--vm``: that chain; ``--period``: the
    period's chain and its archives; otherwise every period's.
    """
    if source.chain is not None:
        chains = [source.chain]
    elif period is not None:
        chain = source.tree.chains.get(period)
        if chain is None or period == ".":
            raise VmError(f"VM {source.vm!r} has no period {period!r}", vm=source.vm)
        chains = [chain]
    else:
        chains = active_chains(source)
    for chain in chains:
        for c in (chain, *chain.archives):
            if c.data or c.partials or c is source.chain:
                yield from chain_records(source.vm, c, session)


def chain_records(vm: str, chain: Chain, session: str | None = None) -> Iterator[Record]:
    points = restore_points(chain)
    archived = "/.archives/" in f"/{chain.rel}/"
    where: dict[str, Any] = {"vm": vm, "period": chain.period, "chain": chain.rel, "archived": archived}
    warnings = chain_warnings(chain)
    yield make(
        "chain", session, **where,
        base=chain.base,
        restore_points=len(points),
        complete=chain_complete(chain, points),
        disks=sorted({d for p in points for d in p.disks}),
        size=sum(f.size for f in chain.data),
        warnings=warnings,
        path=str(chain.path),
    )
    for p in points:
        yield point_record(vm, p, where, session)


def point_record(vm: str, p: RestorePoint, where: dict[str, Any], session: str | None) -> Record:
    st = tree_state.point_state(p.chain.path, p.ident)  # a memory state (vmbk-backup --with-memory)
    return make(
        "restore_point", session, **where,
        index=p.index,
        checkpoint=p.checkpoint,
        date=p.date,
        kind=p.kind,
        disks=sorted(p.disks),
        complete=p.complete,
        problems=p.findings,
        unverifiable=list(p.unverifiable),
        integrity=p.integrity,
        signed_by=p.signed_by,
        size=p.own_size,
        path=str(p.chain.path),
        resumable=bool(p.complete and st is not None and st.usable),
        state=None if st is None else {
            "file": st.file, "size": st.size, "image_size": st.manifest.image_size if st.manifest else None,
            "problems": list(st.problems)},
    )


def _by_days(chain: Chain) -> tuple[_dt.date, str]:
    """Periods in the order of the days they cover, not of their names (vmbackup's
    ``2024-W01`` of December 2024 comes after ``2024-W52``)."""
    days = chain.days
    return (days[0] if days else _dt.date.min), chain.rel


def _has_tpm(chain: Chain) -> bool:
    return any((c.path / n).exists() for c in (chain, *chain.archives) for n in (names.TPM_STATE, names.TPM_MARKER))


def _has_nvram(chain: Chain | None) -> bool:
    if chain is None or not chain.vmconfigs:
        return False
    try:
        xml = (chain.path / chain.vmconfigs[-1]).read_text(errors="replace")
        return bool(parse_domain_xml(xml)["firmware"]["nvram"])
    except (OSError, ValueError, SyntaxError):
        return False


def _iso(ts: float | None) -> str | None:
    return None if ts is None else _dt.datetime.fromtimestamp(ts, _dt.UTC).isoformat(timespec="seconds")
