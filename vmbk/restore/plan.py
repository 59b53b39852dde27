"""The plan of one restore, made and checked before anything is written.

Everything ``--dry-run`` shows comes from here (vmrestore guide, 9.12):
which chain and point, which files rebuild which disk, the output names,
the bytes the restore writes, and the checks that refuse it:

* a ``--restore-path`` inside a backup root is a usage error (exit 7;
  guide, 7 and 15: writing there could overwrite the very files being
  read);
* output files that exist need ``--force`` (exit 4);
* free space with 10 % headroom (exit 4; guide, 15 "Pre-Flight Free Space
  Check"): the images, plus the raw scratch file of the largest disk,
  which exists next to them while that disk is converted.

Output names are vmrestore's (guide, 6 "How Disk Naming Works"): disaster
recovery keeps the original file names (the basenames of the point's
domain XML); a clone, and disks restored without a VM definition, are
``{name}.qcow2`` when the point has one disk and ``{name}-{dev}.qcow2``
per disk otherwise, ``{name}`` being the clone's name or the VM's.  A
clone's NVRAM is ``{name}_VARS.fd`` beside its disks; disaster recovery
puts the NVRAM back where it was, the file there saved aside first as
``<file>.before-restore.<timestamp>`` (guide, 12).  The domain XML that
is defined is also written as ``{name}.xml``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from vmbk.errors import StorageError, UsageError, VmError
from vmbk.restore.image import DiskJob, measure, qcow_options
from vmbk.restore.points import RestorePoint, chain_warnings
from vmbk.restore.select import choose_chain, choose_disks, choose_point
from vmbk.restore.source import Source
from vmbk.restore.vmconfig import DomainConfig, nvram_backup, point_config
from vmbk.tree.names import checkpoint_name

HEADROOM = 1.10


@dataclasses.dataclass(frozen=True)
class Options:
    """What the user asked for, typed (the command layer builds it)."""

    restore_path: Path
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
    #: Backup roots (configured ones) the restore path must stay out of.
    protected: tuple[Path, ...] = ()

    @property
    def mode(self) -> str:
        """``clone`` (--name), ``disk`` (--disk), ``data`` (--skip-config) or ``dr``."""
        if self.name:
            return "clone"
        if self.disks:
            return "disk"
        return "data" if self.skip_config else "dr"

    @property
    def defines(self) -> bool:
        return self.mode == "dr" or (self.mode == "clone" and not self.skip_config)


@dataclasses.dataclass(frozen=True)
class Plan:
    source: Source
    point: RestorePoint
    mode: str
    name: str
    restore_path: Path
    jobs: tuple[DiskJob, ...]
    config: DomainConfig | None = None
    nvram_source: Path | None = None
    nvram_target: Path | None = None
    xml_target: Path | None = None
    needed_bytes: int = 0
    free_bytes: int | None = None
    warnings: tuple[str, ...] = ()
    #: Files the restore replaces after saving them aside (DR: the NVRAM).
    aside: tuple[Path, ...] = ()

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


def make_plan(source: Source, opts: Options) -> Plan:
    """Choose, name and measure; VmbkError when the restore cannot be done."""
    # absolute: qemu-img reads "proto:..." as a protocol, libvirt needs absolute sources
    opts = dataclasses.replace(opts, restore_path=Path(os.path.abspath(opts.restore_path)))
    check_restore_path(opts.restore_path, (source.backup_path, *opts.protected))
    chain = choose_chain(source, opts.period)
    point = choose_point(chain, opts.restore_point, include_incomplete=opts.include_incomplete, vm=source.vm)
    disks = choose_disks(point, opts.disks, vm=source.vm)
    warnings = chain_warnings(chain) + [f"incomplete point restored on request: {p}" for p in point.problems]
    if not opts.skip_tpm and opts.mode != "disk" and (chain.path / "tpm-state").exists():
        warnings.append("the backup holds TPM state; restoring it is not implemented yet")
    config = point_config(point) if opts.defines else None
    if opts.defines and config is None:
        raise VmError(f"{chain.path} holds no readable domain XML (vmconfig.*.xml): "
                      "--skip-config restores the disks only", vm=source.vm)
    if config is not None and not config.exact:
        warnings.append(f"no vmconfig.{point.ident}.xml: the domain is defined from {config.path.name}")
    name = opts.name or (config.name if config is not None and config.name else source.vm)
    names = _file_names(point, disks, name, config if opts.mode == "dr" else None)
    jobs = []
    for disk in disks:
        paths = point.paths(disk)
        vsize, data = measure(paths)
        jobs.append(DiskJob(disk, tuple(paths), opts.restore_path / names[disk], vsize, data,
                            qcow_options(chain.path, disk, point.ident, _idents(point, disk))))
    nvram_src = nvram_dst = xml_dst = None
    aside: tuple[Path, ...] = ()
    if config is not None:
        if config.nvram or config.uefi:
            nvram_src = nvram_backup(point, config.nvram)
            if nvram_src is not None and opts.mode == "dr" and config.nvram:
                nvram_dst = Path(config.nvram)
                aside = (nvram_dst,)
            elif nvram_src is not None:
                nvram_dst = opts.restore_path / f"{name}_VARS.fd"
            elif config.nvram is None:  # else domainxml says so
                warnings.append(f"no NVRAM saved for {point.ident}: the VM gets fresh UEFI variables")
        xml_dst = opts.restore_path / f"{name}.xml"
    largest = max((j.data_bytes for j in jobs), default=0)
    needed = sum(j.data_bytes + j.virtual_size // 4096 for j in jobs) + largest
    needed += nvram_src.stat().st_size if nvram_src is not None else 0
    return Plan(source, point, opts.mode, name, opts.restore_path, tuple(jobs), config, nvram_src, nvram_dst,
                xml_dst, needed, free_space(opts.restore_path), tuple(warnings), aside)


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


def check_existing(plan: Plan, *, force: bool) -> None:
    if plan.restore_path.exists() and not plan.restore_path.is_dir():
        raise StorageError(f"--restore-path {plan.restore_path} exists and is not a directory")
    for target in plan.targets:
        if target in plan.aside:
            continue
        if target.is_dir():
            raise StorageError(f"{target} is a directory")
        if (target.exists() or target.is_symlink()) and not force:
            raise StorageError(f"{target} exists: --force overwrites it")


def check_space(plan: Plan) -> None:
    if plan.free_bytes is None:
        return
    wanted = int(plan.needed_bytes * HEADROOM)
    if plan.free_bytes < wanted:
        raise StorageError(f"insufficient space: the restore needs {_human(plan.needed_bytes)} plus 10 % headroom "
                           f"but only {_human(plan.free_bytes)} is available for {plan.restore_path}")


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{n} B"
        size /= 1024
    return f"{n} B"
