"""The restore points of one chain, and what makes a point incomplete.

A full chain (vmrestore guide, 4.3) holds checkpoints ``virtnbdbackup.0``
(the full) .. ``virtnbdbackup.N``; restore point *n* is the full plus the
incrementals 1..n of every disk backed up at checkpoint *n*, so its index
is the checkpoint number.  A copy chain has one point, 0 (``COPY``).  A raw
disk of a full chain (``<dev>.copy.data`` beside ``.full.data``, see
`vmbk.policy.disks`) was read whole at the start of the chain and belongs,
unchanged, to every point.

Which disks a point should have comes from the checkpoint's
``vmconfig.virtnbdbackup.<n>.xml``: a disk removed mid-chain is absent
from the later configs and later points (guide, 9.4 "Disk Configuration
Changes Between Checkpoints"), while a disk the config still lists but
without a data file is a hole left by an interrupted backup.  A point is
*incomplete* (guide, 9.2) when a file it needs is missing or unreadable,
when a ``.partial`` of it is left over, or when its checkpoint is not in
``<vm>.cpt`` (the backup died before it finished); incomplete points are
listed, flagged, and refused as restore targets unless
``--include-incomplete``.  So is a point whose streams' ends or headers
contradict the chain (truncated, another checkpoint or parent, another
``virtualSize``; `vmbk.tree.sidefiles`), whose side files are
damaged, or any point of a chain whose ``.cpt`` is unreadable (which
backups finished cannot be told).

A point is *unverifiable* when a data file it needs has no ``.chksum``
though its writer made one (`Chain.lost_checksum`: vmbk wrote it, or
the chain's other files of its writer have theirs): vmbk commits a data
file only after its checksum (`vmbk.stream.atomic`), so the checksum was
lost and the data may be damaged too.  It is not
complete either, and a restore refuses it unless ``--no-verify``.  A
chain without any ``.chksum`` (virtnbdbackup before 1.9.40) is restored
on its structure alone, as before; ``--verify`` says so.

A point's *integrity* is what its manifests say (`vmbk.manifest.check`:
good, adler32-only, unsigned, unknown-key, missing, tampered), the worst
of its own manifest's and of every point it restores from; anything but
good and adler32-only keeps it from being complete, and a restore
refuses it unless ``--force``.  The listing checks signatures, the hash
chain, sizes and the SHA-256 of the small files; ``--verify`` adds the
streams' digests (``stream_digests``).

This is the one place that decides: the listing, ``--verify`` and the
restore all read `RestorePoint.problems`, `RestorePoint.unverifiable`
and `RestorePoint.integrity`.
Reads the small side files (vmconfig and checkpoint XMLs, qcow.json);
the `Chain` carries the rest.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from collections.abc import Mapping, Sequence
from pathlib import Path

from vmbk.fsutil import PARTIAL
from vmbk.manifest.check import BAD, LEGACY, UNSURE, ChainManifests, Judgement, combine
from vmbk.tree.sidefiles import SideFiles, ident_of
from vmbk.tree.model import Chain, DataFile
from vmbk.tree.names import checkpoint_name, checkpoint_number, parse_data_name

FULL = "FULL"
INCREMENTAL = "Incremental"
COPY = "COPY"

@dataclasses.dataclass(frozen=True)
class RestorePoint:
    """One point of a chain: which files rebuild which disk, and its flaws.

    ``disks`` maps a disk target to its data files, oldest first (the
    order `vmbk.stream.merge_chain` wants).  ``problems`` make the point
    incomplete; ``unverifiable`` names its data files that lost their
    ``.chksum``.  Complete: neither.
    """

    chain: Chain
    index: int
    checkpoint: str | None
    kind: str
    date: str | None
    disks: Mapping[str, tuple[DataFile, ...]]
    problems: tuple[str, ...] = ()
    unverifiable: tuple[str, ...] = ()
    #: What the manifests say (`vmbk.manifest.check`), and why.
    integrity: str = LEGACY
    integrity_findings: tuple[str, ...] = ()
    #: Fingerprint of the key that signed the point's own manifest.
    signed_by: str | None = None

    @property
    def trusted(self) -> bool:
        """Its manifests vouch for it, or it has none (an older tree: adler32 only)."""
        return self.integrity not in BAD and self.integrity not in UNSURE

    @property
    def complete(self) -> bool:
        return not self.problems and not self.unverifiable and self.trusted

    @property
    def findings(self) -> list[str]:
        """Everything that keeps the point from being complete, as lines."""
        return [*self.problems, *(f"{n} has no .chksum: its data cannot be verified" for n in self.unverifiable),
                *([] if self.trusted else self.integrity_findings)]

    @property
    def ident(self) -> str:
        """The ``<ident>`` of this point's side files (vmconfig, qcow.json, NVRAM)."""
        return self.checkpoint or "copy"

    def paths(self, disk: str) -> list[Path]:
        return [self.chain.path / f.name for f in self.disks[disk]]

    @property
    def own_size(self) -> int:
        """Bytes of the data files this point added to the chain."""
        own = [fs[-1] for fs in self.disks.values() if fs]
        return sum(f.size for f in own if self.index == 0 or f.level != "copy")


def vmconfig_disks(chain: Chain, ident: str) -> set[str] | None:
    """Disk targets of ``vmconfig.<ident>.xml`` (cdrom, floppy, LUN excluded); None: no readable one."""
    return SideFiles(chain).vmconfig_disks(ident)


def chain_warnings(chain: Chain) -> list[str]:
    """Flaws of the chain as a whole (they do not by themselves refuse a point)."""
    out: list[str] = []
    if chain.partials:
        out.append(f"leftover partial file(s) of an interrupted backup: {', '.join(chain.partials)}")
    if chain.stray_checksums:
        out.append(f"checksum file(s) without their data file (a backup that died before it committed): "
                   f"{', '.join(chain.stray_checksums)}")
    if chain.cpt_error:
        out.append(f"checkpoint list unreadable: {chain.cpt_error}")
    elif chain.cpt is None and chain.base == "full":
        out.append("the chain has no checkpoint list (.cpt)")
    elif chain.cpt is not None and chain.base == "full" and chain.cpt != chain.file_checkpoints:
        out.append(f"checkpoint list {list(chain.cpt)} does not match the data files "
                   f"(they hold {list(chain.file_checkpoints)})")
    odd = [f.name for f in chain.data if f.level in ("inc", "diff") and f.number is None]
    if odd:
        out.append(f"data files with a checkpoint name vmbk does not know: {', '.join(odd)}")
    return out


def restore_points(chain: Chain, *, stream_digests: Mapping[str, str | None] | None = None,
                   trusted: Mapping[str, str] | None = None) -> list[RestorePoint]:
    """Every restore point of ``chain``, oldest first (empty: no data files).

    ``stream_digests`` (name -> stream digest, ``--verify``): the streams
    are held to their manifests' SHA-256 too; ``trusted``: the public
    keys to trust (default: the key directory's).
    """
    if not chain.data:
        return []
    manifests = ChainManifests(chain.path, trusted=trusted, stream_digests=stream_digests)
    if chain.base == "copy":
        return [_with_integrity(_copy_point(chain), manifests, [])]
    points = _full_points(chain)
    judged: list[tuple[int, Judgement]] = []
    out = []
    for p in points:
        out.append(_with_integrity(p, manifests, judged, last=p is points[-1]))
    return out


def _own_files(p: RestorePoint) -> list[DataFile]:
    return [fs[-1] for fs in p.disks.values() if fs and (p.index == 0 or fs[-1].level != "copy")]


def _with_integrity(p: RestorePoint, manifests: ChainManifests, judged: list[tuple[int, Judgement]], *,
                    last: bool = True) -> RestorePoint:
    """``p`` with its integrity: its own manifest's judgement and those of the points before it
    (``judged``, which this extends)."""
    own = _own_files(p)
    # its streams say vmbk wrote a manifest for it: another tool's point in a mixed chain
    # (vmbackup's virtnbdbackup continuing a vmbk chain) has none and is adler32-only
    # (a point its .cpt does not list did not finish: without a manifest it is that, not tampered)
    committed = p.checkpoint is None or (p.chain.cpt is not None and p.checkpoint in p.chain.cpt)
    required = committed and any(f.manifested for f in own)
    previous = checkpoint_name(p.index - 1) if p.checkpoint and p.index > 0 else None
    if committed:
        judged.append((p.index, manifests.judge(p.index, p.ident, [f.name for f in own], required, previous, last)))
    else:  # its manifest, if it got one, covers a .cpt that never came: "did not finish" says it all
        judged.append((p.index, Judgement(LEGACY)))
    status, lines = combine([j for _, j in judged], lambda i: f"point {judged[i][0]}")
    return dataclasses.replace(p, integrity=status, integrity_findings=lines, signed_by=judged[-1][1].key)


def _date(files: list[DataFile]) -> str | None:
    for f in files:
        if f.date:
            return f.date[:19]
    if files:
        return _dt.datetime.fromtimestamp(files[0].mtime).isoformat(timespec="seconds")
    return None


def _file_problems(f: DataFile, disk: str, name: str | None, n: int) -> list[str]:
    if f.error:
        what = "unreadable stream header" if f.virtual_size is None else "damaged stream"
        return [f"{f.name}: {what}: {f.error}"]
    out = []
    if f.meta_disk is not None and f.meta_disk != disk:
        out.append(f"{f.name}: stream header names disk {f.meta_disk!r}")
    if name is not None and f.level != "copy":
        if f.meta_checkpoint is not None and f.meta_checkpoint != name:
            out.append(f"{f.name}: stream header names checkpoint {f.meta_checkpoint!r}, expected {name}")
        elif n > 0 and f.meta_parent is not None and f.meta_parent != checkpoint_name(n - 1):
            out.append(f"{f.name}: stream header names parent {f.meta_parent!r}, expected {checkpoint_name(n - 1)}")
    return out


def _partials_by_point(chain: Chain) -> dict[int | None, list[str]]:
    """Leftover ``.partial`` data files by the point they belong to (None: all)."""
    out: dict[int | None, list[str]] = {}
    for p in chain.partials:
        parsed = parse_data_name(p[: -len(PARTIAL)]) if p.endswith(".data" + PARTIAL) else None
        if parsed is None:
            continue
        key = None if parsed.level == "copy" else (0 if parsed.level == "full" else parsed.number)
        out.setdefault(key, []).append(p)
    return out


def _point(side: SideFiles, n: int, name: str | None, kind: str, date: str | None,
           disks: dict[str, tuple[DataFile, ...]], problems: list[str], sizes: dict[str, str]) -> RestorePoint:
    """The point with the checks every point shares: side files, sizes, checksums."""
    chain, ident = side.chain, name or "copy"
    problems += [p for p in (side.checkpoint_problem(name) if name else None, side.vmconfig_problem(ident)) if p]
    own = {d: fs[-1] for d, fs in disks.items() if fs and (n == 0 or fs[-1].level != "copy")}
    problems += [p for d, f in sorted(own.items()) if (p := side.qemu_info(d, ident_of(f))[1])]
    files = list(dict.fromkeys(f for fs in disks.values() for f in fs))
    problems += [sizes[f.name] for f in files if f.name in sizes]
    unverifiable = [f.name for f in files if chain.lost_checksum(f)]
    return RestorePoint(chain, n, name, kind, date, disks, tuple(dict.fromkeys(problems)), tuple(unverifiable))


def _sizes(side: SideFiles) -> dict[str, str]:
    """`SideFiles.size_problems` of every disk's files: its full and incrementals in order, each copy alone."""
    chain, out = side.chain, {}
    for disk in sorted({f.disk for f in chain.data}):
        files = [f for f in chain.data if f.disk == disk]
        line = [f for f in files if f.level == "full"]
        line += sorted((f for f in files if f.level in ("inc", "diff")), key=lambda f: f.number or 0)
        out.update(side.size_problems(disk, line))
        for f in files:
            if f.level == "copy":
                out.update(side.size_problems(disk, [f]))
    return out


def _copy_point(chain: Chain) -> RestorePoint:
    copies = sorted((f for f in chain.data if f.level == "copy"), key=lambda f: f.disk)
    problems = [p for f in copies for p in _file_problems(f, f.disk, None, 0)]
    leftovers = [p for ps in _partials_by_point(chain).values() for p in ps]
    if leftovers:
        problems.append(f"leftover partial file(s): {', '.join(leftovers)}")
    side = SideFiles(chain)
    return _point(side, 0, None, COPY, _date(copies), {f.disk: (f,) for f in copies}, problems, _sizes(side))


def _full_points(chain: Chain) -> list[RestorePoint]:
    full = {f.disk: f for f in chain.data if f.level == "full"}
    copies = {f.disk: f for f in chain.data if f.level == "copy"}
    incs = {(f.disk, f.number): f for f in chain.data if f.level in ("inc", "diff") and f.number is not None}
    listed = {n for n in map(checkpoint_number, chain.cpt or ()) if n is not None}
    numbers = sorted({0} | {n for _, n in incs} | listed)
    partials = _partials_by_point(chain)
    side = SideFiles(chain)
    sizes = _sizes(side)
    points = []
    for n in numbers:
        name = checkpoint_name(n)
        problems: list[str] = []
        if not full:
            problems.append("the chain has no full backup (.full.data)")
        if chain.cpt_error:
            problems.append(f"checkpoint list unreadable: {chain.cpt_error} (which backups finished cannot "
                            f"be told)")
        present = sorted(d for d in full if n == 0 or (d, n) in incs)
        configured = side.vmconfig_disks(name)
        expected = set(full) if configured is None else set(full) & configured
        problems += [f"{d} has no data file for {name}" for d in sorted(expected - set(present))]
        if full and not present and not expected:
            problems.append(f"no data file for {name}")
        disks: dict[str, tuple[DataFile, ...]] = {}
        for d in present:
            files: list[DataFile] = [full[d]]
            for k in range(1, n + 1):
                f = incs.get((d, k))
                if f is None:
                    problems.append(f"{d} has no data file for {checkpoint_name(k)}, which this point needs")
                else:
                    files.append(f)
            for f in files:
                problems += _file_problems(f, d, checkpoint_name(f.number or 0), f.number or 0)
            disks[d] = tuple(files)
        for d, f in sorted(copies.items()):
            problems += _file_problems(f, d, None, 0)
            disks.setdefault(d, (f,))
        if chain.cpt is not None and present and name not in chain.cpt:
            problems.append(f"{name} is not in {chain.cpt_file} (its backup did not finish)")
        leftovers = partials.get(n, []) + partials.get(None, [])
        if leftovers:
            problems.append(f"leftover partial file(s) of its backup: {', '.join(leftovers)}")
        own = [incs[(d, n)] if n else full[d] for d in present]
        points.append(_point(side, n, name, FULL if n == 0 else INCREMENTAL, _date(own), disks, problems, sizes))
    return points


def chain_complete(chain: Chain, points: Sequence[RestorePoint] | None = None) -> bool:
    """Every restore point of ``chain`` can be restored and the chain has no flaw.

    THE rule for a chain: the health line of ``--list``, the ``chain``
    records of ``--list-restore-points`` and vmbk-status all say this.
    """
    points = restore_points(chain) if points is None else points
    return bool(points) and all(p.complete for p in points) and not chain_warnings(chain)
