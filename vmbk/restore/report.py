"""The records of a restore: one ``restore_disk`` per disk, one ``restore``.

Both carry enough to act on without the tree at hand (DESIGN, "A record is
self-contained"): which chain and point, the streams each disk came from,
the files written, the clone's domain, the warnings.  A dry run emits the
same records with ``outcome: "dry-run"`` and, in ``blocked``, every check
that would refuse the restore.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from vmbk.errors import VmbkError
from vmbk.records import Record, make
from vmbk.restore import image, inplace
from vmbk.restore.preflight import RestorePlan
from vmbk.tree.points import RestorePoint

log = logging.getLogger("vmbk.restore")


@dataclasses.dataclass
class Outcome:
    """What the writing produced (empty for a dry run)."""

    built: list[image.Built] = dataclasses.field(default_factory=list)
    unchecked: list[Path] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    domain: dict[str, Any] | None = None
    saved: list[Path] = dataclasses.field(default_factory=list)
    #: In place: disk -> the file replaced and its ``.pre-restore`` copy.
    swapped: dict[str, inplace.Swapped] = dataclasses.field(default_factory=dict)
    tpm: Path | None = None
    tpm_saved: Path | None = None
    tpm_error: VmbkError | None = None
    pools: list[str] = dataclasses.field(default_factory=list)
    #: ``--resume``: how the VM was resumed from its memory state (`vmbk.restore.resume`).
    resumed: dict[str, Any] | None = None


def disk_record(plan: RestorePlan, job: image.DiskRestore, session: str | None, outcome: str,
                 built: image.Built | None, swapped: inplace.Swapped | None = None) -> Record:
    extra: dict[str, Any] = {}
    if built is not None:
        extra = {"seconds": round(built.seconds, 3), "mb_per_s": _rate(built.data_bytes, built.seconds)}
    if plan.mode == "inplace":
        pre = swapped.pre_restore if swapped is not None else (
            inplace.pre_restore_path(job.target) if plan.pre_restore else None)
        extra["pre_restore"] = str(pre) if pre is not None else None
        if swapped is not None and swapped.pre_restore_size is not None:
            extra["pre_restore_size"] = swapped.pre_restore_size
    return make(
        "restore_disk", session,
        vm=plan.source.vm,
        disk=job.disk,
        target=str(job.target),
        chain=plan.point.chain.rel,
        restore_point=plan.point.index,
        checkpoint=plan.point.checkpoint,
        sources=[p.name for p in job.sources],
        virtual_size=job.virtual_size,
        data_bytes=job.data_bytes,
        format="raw" if job.disk in plan.raw else "qcow2",
        qcow_options=list(job.qcow_options),
        outcome=outcome,
        **extra,
    )


def point_fields(point: RestorePoint) -> dict[str, Any]:
    """Which point a record is about, as every record of vmbk-restore names it."""
    return {"period": point.chain.period, "chain": point.chain.rel, "chain_path": str(point.chain.path),
            "restore_point": point.index, "checkpoint": point.checkpoint, "kind": point.kind, "date": point.date}


def summary(plan: RestorePlan, session: str | None, outcome: str, out: Outcome, seconds: float,
             blocked: list[str] | None = None) -> Record:
    point = plan.point
    data = sum(j.data_bytes for j in plan.jobs)
    rec = make(
        "restore", session,
        vm=plan.source.vm,
        mode=plan.mode,
        name=plan.name,
        restore_path=str(plan.restore_path),
        host=plan.host,
        **point_fields(point),
        disks=[j.disk for j in plan.jobs],
        files=[str(p) for p in plan.targets],
        nvram=str(plan.nvram_target) if plan.nvram_target else None,
        saved_aside=[str(p) for p in out.saved],
        pre_restore=[{"path": str(s.pre_restore), "size": s.pre_restore_size}
                     for s in out.swapped.values() if s.pre_restore is not None],
        tpm=_tpm(plan, out, outcome),
        pools=out.pools,
        domain=out.domain,
        resumed=out.resumed,
        needed_bytes=plan.needed_bytes,
        free_bytes=plan.free_bytes,
        data_bytes=data,
        remaps=list(plan.remaps),
        warnings=[*plan.warnings, *out.warnings],
        unchecked=[str(p) for p in out.unchecked],
        outcome=outcome,
        duration=round(seconds, 3),
        mb_per_s=_rate(data, seconds),
    )
    if blocked is not None:
        rec["blocked"] = blocked
    for w in rec["warnings"]:
        log.warning("%s: %s", plan.source.vm, w)
    return rec


def _tpm(plan: RestorePlan, out: Outcome, outcome: str) -> dict[str, Any] | None:
    """What became of the backup's TPM state (None: the restore has none to bring back)."""
    if plan.tpm_source is None:
        return None
    if outcome == "dry-run":
        return {"source": str(plan.tpm_source), "restored": None}
    if out.tpm_error is not None:
        return {"source": str(plan.tpm_source), "restored": False, "error": out.tpm_error.message}
    return {"source": str(plan.tpm_source), "restored": True, "path": str(out.tpm),
            "saved_aside": str(out.tpm_saved) if out.tpm_saved else None}


def _rate(nbytes: int, seconds: float) -> float | None:
    return round(nbytes / seconds / 1e6, 1) if seconds > 0 else None
