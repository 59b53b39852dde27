"""The read-only model of one VM's backup tree (see `vmbk.tree.names`).

A `Chain` is one directory that holds (or held) a chain: a period
directory, the VM directory of an accumulate VM, or an archived chain
under ``.archives/``.  Its derived properties answer the planner's
questions (what base, which disks at which sizes, which checkpoints, when
was the last backup) from the files alone; nothing is cached elsewhere,
so the tree stays the source of truth (DESIGN, "On-disk layout").
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from pathlib import Path

from vmbk.tree.names import checkpoint_name, period_days


@dataclasses.dataclass(frozen=True, slots=True)
class DataFile:
    """One complete ``.data`` file and what its stream meta header says.

    ``virtual_size``/``meta_checkpoint``/``meta_parent`` come from the meta
    frame (None when it could not be read; ``error`` says why).  ``error``
    is also set, beside the meta, when the stream's end is damaged
    (`vmbk.stream.scan.probe`: truncated, no stop frame, a size that does
    not add up).  The meta of a copy file names ``virtnbdbackup.0``
    although a copy creates no checkpoint (virtnbdbackup fills it in
    regardless): only the file name says what a file is.
    ``has_checksum``: a ``<name>.chksum`` lies beside it (None: not looked);
    ``by_vmbk``: its meta says vmbk wrote it, so it must have one;
    ``manifested``: and that its point has a manifest (`vmbk.manifest`).
    """

    name: str
    disk: str
    level: str
    checkpoint: str | None
    number: int | None
    size: int
    mtime: float
    virtual_size: int | None = None
    meta_disk: str | None = None
    meta_checkpoint: str | None = None
    meta_parent: str | None = None
    incremental: bool | None = None
    date: str | None = None
    error: str | None = None
    has_checksum: bool | None = None
    by_vmbk: bool = False
    manifested: bool = False

    @property
    def day(self) -> _dt.date:
        """The (local) day the file was written: its meta's ``date``, else its mtime.

        The meta is the writer's own clock at the backup, kept by a copy
        that loses file times; virtnbdbackup and vmbk write it as local
        ``isoformat()``.
        """
        if self.date and len(self.date) >= 10:
            try:
                return _dt.date.fromisoformat(self.date[:10])
            except ValueError:
                pass
        return _dt.datetime.fromtimestamp(self.mtime).date()


@dataclasses.dataclass(frozen=True, slots=True)
class Chain:
    """What one chain directory holds.

    ``rel`` is the directory relative to the VM directory (``"."`` for the
    VM directory itself).  ``cpt`` is the parsed ``<vm>.cpt`` (None when
    absent or unreadable, ``cpt_error`` tells which).  ``partials`` are
    leftover ``*.partial`` files of an interrupted backup;
    ``stray_checksums`` are ``*.data.chksum`` files without their data
    file (a backup killed between its two renames, `vmbk.stream.atomic`).
    """

    path: Path
    rel: str
    period: str | None
    policy: str | None
    data: tuple[DataFile, ...] = ()
    partials: tuple[str, ...] = ()
    cpt_file: str | None = None
    cpt: tuple[str, ...] | None = None
    cpt_error: str | None = None
    checkpoint_xmls: tuple[str, ...] = ()
    vmconfigs: tuple[str, ...] = ()
    uuid: str | None = None
    domain_name: str | None = None
    archives: tuple[Chain, ...] = ()
    stray_checksums: tuple[str, ...] = ()

    @property
    def checksummed(self) -> bool:
        """The tool that wrote the chain writes ``.chksum`` files.

        vmbk and virtnbdbackup 1.9.40+ write one beside every data file;
        earlier virtnbdbackup wrote none.  A chain with at least one, or
        with a stream whose meta says vmbk wrote it, has lost the others.
        """
        return bool(self.stray_checksums) or any(f.has_checksum or f.by_vmbk for f in self.data)

    def lost_checksum(self, f: DataFile) -> bool:
        """``f`` has no ``.chksum`` though its writer made one: its data cannot be vouched for.

        vmbk writes one beside every data file (its meta says vmbk wrote
        it); virtnbdbackup does from 1.9.40 on, so a file of another
        writer lacks one only when that writer's other files in the chain
        have theirs.  A chain vmbackup began with an older virtnbdbackup
        (Debian's 1.9.15) and vmbk continued, or the other way round,
        holds files of both kinds: only vmbk's are expected to have one.
        The limit: a chain stripped of every ``.chksum`` virtnbdbackup
        wrote cannot be told from one written by a version that wrote none.
        """
        if f.has_checksum is not False:
            return False
        return f.by_vmbk or bool(self.stray_checksums) or any(g.has_checksum and not g.by_vmbk for g in self.data)

    @property
    def base(self) -> str | None:
        """``full`` (a checkpoint chain), ``copy`` (offline copy) or None."""
        levels = {f.level for f in self.data}
        if "full" in levels:
            return "full"
        if "copy" in levels:
            return "copy"
        return None

    @property
    def is_empty(self) -> bool:
        """Nothing worth archiving (leftover partials do not count)."""
        return not (self.data or self.cpt_file or self.checkpoint_xmls or self.vmconfigs)

    @property
    def base_files(self) -> tuple[DataFile, ...]:
        return tuple(f for f in self.data if f.level in ("full", "copy"))

    @property
    def disks(self) -> dict[str, int | None]:
        """Disk -> virtual size recorded by the chain's base (full and copy files)."""
        return {f.disk: f.virtual_size for f in self.base_files}

    @property
    def checkpointed_disks(self) -> tuple[str, ...]:
        """Disks with a ``.full.data``: the ones the checkpoints cover."""
        return tuple(sorted(f.disk for f in self.data if f.level == "full"))

    @property
    def file_checkpoints(self) -> tuple[str, ...]:
        """The checkpoint names the data files prove, in chain order.

        A full is ``virtnbdbackup.0``; every inc file adds its own.  Used
        to check ``<vm>.cpt`` against what is really there.
        """
        if self.base != "full":
            return ()
        numbers = sorted({f.number for f in self.data if f.level == "inc" and f.number is not None})
        return (checkpoint_name(0), *(checkpoint_name(n) for n in numbers))

    @property
    def last_time(self) -> float | None:
        """When the newest complete data file was written (its mtime)."""
        return max((f.mtime for f in self.data), default=None)

    @property
    def archive_names(self) -> tuple[str, ...]:
        return tuple(a.path.name for a in self.archives)

    @property
    def backup_days(self) -> tuple[_dt.date, ...]:
        """The days of the backups in this directory, its archives' included."""
        return tuple(sorted({f.day for c in (self, *self.archives) for f in c.data}))

    @property
    def days(self) -> tuple[_dt.date, _dt.date] | None:
        """The days its period covers, ``(first, day after the last)`` (None: not a period).

        Read from the name and, where vmbackup's weekly names make it
        ambiguous, from the days of its backups (`vmbk.tree.names.period_days`).
        """
        return period_days(self.period, self.backup_days) if self.period else None


@dataclasses.dataclass(frozen=True, slots=True)
class VmTree:
    """All chains of one VM: ``chains`` maps ``rel`` to the chain directory.

    The VM directory itself is always present as ``"."`` (possibly empty:
    it holds the accumulate chain and the archives of earlier accumulate
    chains).  ``renamed_from`` lists other VM directories whose chains
    carry this VM's uuid (filled in by `vmbk.tree.scan.find_uuid`).
    """

    backup_path: Path
    name: str
    path: Path
    exists: bool
    chains: dict[str, Chain]
    renamed_from: tuple[str, ...] = ()

    @classmethod
    def empty(cls, backup_path: Path, name: str) -> VmTree:
        """The tree of a VM without backups (also: one not looked at)."""
        path = Path(backup_path) / name
        return cls(Path(backup_path), name, path, False, {".": Chain(path, ".", None, "accumulate")})

    def chain(self, rel: str) -> Chain | None:
        return self.chains.get(rel)

    def latest(self) -> Chain | None:
        """The active chain with the newest backup, None before the first."""
        with_data = [c for c in self.chains.values() if c.last_time is not None]
        return max(with_data, key=lambda c: (c.last_time or 0.0, c.rel), default=None)

    @property
    def last_backup(self) -> float | None:
        """Time of the newest complete backup anywhere, archives included.

        An archive is made just before the backup that replaces it, so when
        that backup failed the newest backup is in the archive.
        """
        times = [c.last_time for c in self.chains.values()]
        times += [a.last_time for c in self.chains.values() for a in c.archives]
        return max((t for t in times if t is not None), default=None)

    @property
    def uuids(self) -> frozenset[str]:
        return frozenset(c.uuid for c in self.chains.values() if c.uuid)
