"""The plan of one restore, made and checked before anything is written.

Everything ``--dry-run`` shows comes from here (vmrestore guide, 9.12):
which chain and point, which files rebuild which disk, the output names,
the bytes the restore writes, and the checks that refuse it:

* a ``--restore-path`` inside a backup root is a usage error (exit 7;
  guide, 7 and 15: writing there could overwrite the very files being
  read);
* output files that exist need ``--force`` (exit 4);
* free space with 10 % headroom on each file system written to (exit 4;
  guide, 15 "Pre-Flight Free Space Check"): the images, written thin.

Output names are vmrestore's (guide, 6 "How Disk Naming Works"): disaster
recovery keeps the original file names (the basenames of the point's
domain XML); a clone, and disks restored without a VM definition, are
``{name}.qcow2`` when the point has one disk and ``{name}-{dev}.qcow2``
per disk otherwise, ``{name}`` being the clone's name or the VM's.  A
clone's NVRAM is ``{name}_VARS.fd`` beside its disks; disaster recovery
puts the NVRAM back where it was (with firmware auto-selection, where
libvirt keeps the NVRAM it names: ``/var/lib/libvirt/qemu/nvram/`` and
the saved copy's basename), the file there saved aside first as
``<file>.before-restore.<timestamp>`` (guide, 12).  The domain XML that
is defined is also written as ``{name}.xml``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

from vmbk.errors import StorageError, UsageError, VmError
from vmbk.manifest.check import stream_digests
from vmbk.restore import inplace, tpm
from vmbk.restore.image import DiskRestore, measure, qcow_options
from vmbk.restore.inplace import CurrentDisk
from vmbk.restore.remap import Remaps
from vmbk.tree.points import RestorePoint
from vmbk.restore.select import choose
from vmbk.restore.source import Source
from vmbk.restore.vmconfig import DomainConfig, nvram_backup, point_config
from vmbk.tree.names import checkpoint_name

HEADROOM = 1.10
#: Where libvirt's QEMU driver keeps NVRAM files it names itself.
NVRAM_DIR = Path("/var/lib/libvirt/qemu/nvram")


@dataclasses.dataclass(frozen=True)
class RestoreOptions:
    """What the user asked for, typed (the command layer builds it)."""

    #: None only for an in-place disk restore (``--disk`` without ``--restore-path``).
    restore_path: Path | None
    period: str | None = None
    restore_point: int | None = None
    disks: tuple[str, ...] | None = None
    name: str | None = None
    force: bool = False
    dry_run: bool = False
    skip_config: bool = False
    skip_tpm: bool = False
    include_incomplete: bool = False
    verify: bool = True
    #: ``--disk`` was given (``--disk all`` too, where ``disks`` is None).
    disk_restore: bool = False
    #: In place: keep each replaced file as ``<file>.pre-restore``.
    pre_restore: bool = True
    #: Backup roots (configured ones) the restore path must stay out of.
    protected: tuple[Path, ...] = ()
    #: Onto another host (or one that changed): ``--remap-*``, ``--network-fallback``, ``--cpu host-model``.
    remaps: Remaps = Remaps()
    #: DR/clone without ``--restore-path``: each disk back in its place on the
    #: target (after the remaps), as `vmbk.restore.crosshost` found it.
    placements: tuple[tuple[str, Path], ...] = ()
    #: ``--resume``: after the disks, the point's saved memory state (`vmbk.restore.resume`).
    resume: bool = False

    @property
    def mode(self) -> str:
        """``clone`` (--name), ``inplace`` (--disk, no --restore-path), ``disk`` (--disk),
        ``data`` (--skip-config) or ``dr``."""
        if self.name:
            return "clone"
        if self.disk_restore or self.disks:
            return "inplace" if self.restore_path is None else "disk"
        return "data" if self.skip_config else "dr"

    @property
    def defines(self) -> bool:
        return self.mode == "dr" or (self.mode == "clone" and not self.skip_config)


@dataclasses.dataclass(frozen=True)
class RestorePlan:
    source: Source
    point: RestorePoint
    mode: str
    name: str
    restore_path: Path
    jobs: tuple[DiskRestore, ...]
    config: DomainConfig | None = None
    nvram_source: Path | None = None
    nvram_target: Path | None = None
    xml_target: Path | None = None
    needed_bytes: int = 0
    free_bytes: int | None = None
    warnings: tuple[str, ...] = ()
    #: Files the restore replaces after saving them aside (DR: the NVRAM).
    aside: tuple[Path, ...] = ()
    #: Disks written as raw images (in place, where the VM opens them raw).
    raw: frozenset[str] = frozenset()
    #: In place: the replaced files are kept as ``<file>.pre-restore``.
    pre_restore: bool = False
    #: ``tpm-state/tpm2`` of the chain, when the restore brings TPM state back.
    tpm_source: Path | None = None
    #: Bytes needed per directory written to (`check_space`).
    needed: dict[Path, int] = dataclasses.field(default_factory=dict)
    #: What `vmbk.restore.crosshost` remapped (kind, from, to): in the record and the catalogue.
    remaps: tuple[dict[str, str], ...] = ()
    #: The host the files are written on and the VM defined (``--connect qemu+ssh://``); None: this one.
    host: str | None = None

    @property
    def targets(self) -> list[Path]:
        """Every file the restore writes, final names."""
        extra = [p for p in (self.nvram_target, self.xml_target) if p is not None]
        return [j.target for j in self.jobs] + extra


def image_name(base: str, disk: str, single: bool) -> str:
    return f"{base}.qcow2" if single else f"{base}-{disk}.qcow2"


def check_restore_path(path: Path, roots: tuple[Path, ...]) -> None:
    real = Path(os.path.realpath(path))
    for root in roots:
        r = Path(os.path.realpath(root))
        if real == r or real.is_relative_to(r):
            raise UsageError(f"--restore-path {path} is inside the backup root {root}: "
                             "restore somewhere outside the backup storage")


def free_space(path: Path) -> int | None:
    """Bytes available to us on the filesystem that will hold ``path``."""
    probe = Path(os.path.abspath(path))
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        st = os.statvfs(probe)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _idents(point: RestorePoint, disk: str) -> list[str]:
    return ["copy" if f.level == "copy" else checkpoint_name(f.number or 0) for f in point.disks[disk]]


def make_plan(source: Source, opts: RestoreOptions, current: Mapping[str, CurrentDisk] | None = None) -> RestorePlan:
    """Choose, name and measure; VmbkError when the restore cannot be done.

    ``current``: the VM's disks as libvirt defines them now, which an
    in-place restore (``opts.restore_path`` None) replaces.
    """
    chain, point, disks, warnings = choose(source, period=opts.period, restore_point=opts.restore_point,
                                           disks=opts.disks, include_incomplete=opts.include_incomplete,
                                           verify=opts.verify, force=opts.force)
    config = point_config(point) if opts.defines else None
    if opts.defines and config is None:
        raise VmError(f"{chain.path} holds no readable domain XML (vmconfig.*.xml): "
                      "--skip-config restores the disks only", vm=source.vm)
    if config is not None and not config.exact:
        warnings.append(f"no vmconfig.{point.ident}.xml: the domain is defined from {config.path.name}")
    name = opts.name or (config.name if config is not None and config.name else source.vm)
    roots = (source.backup_path, *opts.protected)
    raw: frozenset[str] = frozenset()
    if opts.restore_path is None and opts.placements and opts.mode in ("dr", "clone"):
        # back in their places on the target (vmbk.restore.crosshost): the first disk's directory
        # holds the XML (and a clone's NVRAM)
        placed = dict(opts.placements)
        paths = {d: Path(os.path.abspath(placed[d])) for d in disks}
        if opts.mode == "clone":
            paths = {d: p.with_name(image_name(name, d, len(point.disks) == 1)) for d, p in paths.items()}
        restore_path = paths[disks[0]].parent
        for p in paths.values():
            check_restore_path(p.parent, roots)
    elif opts.restore_path is None:
        now = inplace.targets(source.vm, disks, dict(current or {}))
        paths = {d: Path(os.path.abspath(c.path or "")) for d, c in now.items()}
        raw = frozenset(d for d, c in now.items() if c.fmt == "raw")
        restore_path = paths[disks[0]].parent
        for p in paths.values():
            check_restore_path(p.parent, roots)
        warnings.append("the VM's checkpoints no longer match the replaced disks: its next vmbk-backup "
                        "archives the chain and starts a full")
    else:
        # absolute: qemu-img reads "proto:..." as a protocol, libvirt needs absolute sources
        restore_path = Path(os.path.abspath(opts.restore_path))
        check_restore_path(restore_path, roots)
        names = _file_names(point, disks, name, config if opts.mode == "dr" else None)
        paths = {d: restore_path / names[d] for d in disks}
    jobs = []
    expected = stream_digests(chain.path)
    for disk in disks:
        vsize, data = measure(point.paths(disk))
        qcow = () if disk in raw else qcow_options(chain.path, disk, point.ident, _idents(point, disk))
        sources = tuple(point.paths(disk))
        jobs.append(DiskRestore(disk, sources, paths[disk], vsize, data, qcow,
                                tuple(expected.get(p.name) for p in sources) if point.trusted else (),
                                tolerate=opts.force))
    nvram_src = nvram_dst = xml_dst = None
    aside: tuple[Path, ...] = ()
    if config is not None:
        if config.nvram or config.uefi:
            nvram_src = nvram_backup(point, config.nvram)
            if nvram_src is not None and opts.mode == "dr":
                # the original path; with firmware auto-selection the XML names
                # none and libvirt's is <nvram dir>/<the saved file's basename>
                nvram_dst = Path(config.nvram) if config.nvram else NVRAM_DIR / _original_name(nvram_src, point)
                aside = (nvram_dst,)
            elif nvram_src is not None:
                nvram_dst = restore_path / f"{name}_VARS.fd"
            elif config.nvram is None:  # else domainxml says so
                warnings.append(f"no NVRAM saved for {point.ident}: the VM gets fresh UEFI variables")
        xml_dst = restore_path / f"{name}.xml"
    tpm_src = None
    if opts.defines:
        tpm_src, tpm_warning = tpm.backup_state(chain.path, config)
        warnings += [tpm_warning] if tpm_warning else []
        if opts.skip_tpm and tpm_src is not None:
            tpm_src = None
            warnings.append("--skip-tpm: the backup's TPM state is not restored"
                            + ("; the clone starts with an empty TPM" if opts.mode == "clone" else ""))
    needed = _needed(jobs, nvram_src)
    return RestorePlan(source, point, opts.mode, name, restore_path, tuple(jobs), config, nvram_src, nvram_dst,
                xml_dst, sum(needed.values()), free_space(restore_path), tuple(warnings), aside, raw,
                opts.pre_restore and opts.mode == "inplace", tpm_src, needed)


def _original_name(saved: Path, point: RestorePoint) -> str:
    suffix = f".{point.ident}"
    return saved.name[: -len(suffix)] if saved.name.endswith(suffix) else saved.name


def _needed(jobs: list[DiskRestore], nvram: Path | None) -> dict[Path, int]:
    """Bytes the restore needs per directory it writes to: each image,
    data plus metadata (qcow2 tables: well under 1/4096 of the disk)."""
    out: dict[Path, int] = {}
    for j in jobs:
        d = j.target.parent
        out[d] = out.get(d, 0) + j.data_bytes + j.virtual_size // 4096
    if nvram is not None and jobs:
        d = jobs[0].target.parent
        out[d] = out.get(d, 0) + nvram.stat().st_size
    return out


def _file_names(point: RestorePoint, disks: tuple[str, ...], name: str, dr: DomainConfig | None) -> dict[str, str]:
    """Image names: the original basenames for DR (when distinct), else vmrestore's."""
    single = len(point.disks) == 1
    ours = {d: image_name(name, d, single) for d in disks}
    if dr is None:
        return ours
    original = {d: dr.sources.get(d) for d in disks}
    taken = [n for n in original.values() if n]
    names = {d: n if n and taken.count(n) == 1 and n not in (f"{name}.xml", f"{name}_VARS.fd") else ours[d]
             for d, n in original.items()}
    return names if len(set(names.values())) == len(names) else ours


def check_existing(plan: RestorePlan, *, force: bool) -> None:
    if plan.restore_path.exists() and not plan.restore_path.is_dir():
        raise StorageError(f"--restore-path {plan.restore_path} exists and is not a directory")
    if plan.mode == "inplace":
        if plan.pre_restore:
            inplace.check_pre_restore([j.target for j in plan.jobs])
        return
    for target in plan.targets:
        if target in plan.aside:
            continue
        if target.is_dir():
            raise StorageError(f"{target} is a directory")
        if (target.exists() or target.is_symlink()) and not force:
            raise StorageError(f"{target} exists: --force overwrites it")


def check_space(plan: RestorePlan) -> None:
    """StorageError (4) when a file system lacks the bytes it gets, plus 10 %."""
    per_fs: dict[int, tuple[Path, int, int | None]] = {}
    for d, n in (plan.needed or {plan.restore_path: plan.needed_bytes}).items():
        dev = _device(d)
        _, total, free = per_fs.get(dev, (d, 0, free_space(d)))
        per_fs[dev] = (d, total + n, free)
    for d, needed, free in per_fs.values():
        if free is not None and free < int(needed * HEADROOM):
            raise StorageError(f"insufficient space: the restore needs {_human(needed)} plus 10 % headroom "
                               f"but only {_human(free)} is available for {d}")


def _device(path: Path) -> int:
    probe = Path(os.path.abspath(path))
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return os.stat(probe).st_dev
    except OSError:
        return -1


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{n} B"
        size /= 1024
    return f"{n} B"
