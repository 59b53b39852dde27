"""The preflight of a restore that defines a VM on a host: does the host have what it needs?

Before anything is written, for a disaster recovery or clone with a
libvirt connection (the local host, or ``--connect qemu+ssh://...``):

1. the point's domain XML (`vmbk.restore.vmconfig.point_config`);
2. without ``--restore-path``, each disk's place on the target: its
   directory in the backup's XML, or its pool's, after ``--remap-dir`` /
   ``--remap-pool`` (`vmbk.restore.remap.place`);
3. the target's facts (`vmbk.restore.hostcheck.gather`) and
   `vmbk.restore.remap.check`: the remaps applied, every problem left.

Every problem is collected, none stops the look at the others, so one
run names everything that is missing; then `PreflightError` (exit 5)
with all of them, before a byte is written or anything is defined.
"""

from __future__ import annotations

import dataclasses
import posixpath
from pathlib import Path
from typing import Any

from vmbk.restore import hostcheck, remap
from vmbk.restore.preflight import RestoreOptions
from vmbk.restore.select import choose
from vmbk.restore.source import Source
from vmbk.restore.vmconfig import point_config
from vmbk.virt.hostfiles import HostFiles


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What the restore may do: where each disk goes (placed restore), and the remaps."""

    placements: dict[str, Path]
    remaps: tuple[dict[str, str], ...]
    problems: tuple[remap.Problem, ...]
    facts: remap.TargetFacts | None = None
    asked: remap.Remaps = remap.Remaps()

    def apply(self, xml: str, *, tpm: bool = True) -> str:
        """The XML to define, with the remaps `check` found (the same facts, so the same result)."""
        return remap.check(xml, self.asked, self.facts, tpm=tpm).xml if self.facts is not None else xml

    def raise_if_problems(self, vm: str, host: str) -> None:
        if self.problems:
            lines = "; ".join(str(p) for p in self.problems)
            raise remap.PreflightError(f"VM {vm!r} cannot be defined on {host} as it is: {lines}", vm=vm)


def check(source: Source, opts: RestoreOptions, conn: Any, files: HostFiles) -> Verdict | None:
    """The verdict for a restore that defines the VM; None when there is nothing to check."""
    if not opts.defines or conn is None:
        return None
    _chain, point, disks, _warnings = choose(source, period=opts.period, restore_point=opts.restore_point,
                                             disks=opts.disks, include_incomplete=opts.include_incomplete,
                                             verify=opts.verify, force=opts.force)
    config = point_config(point)
    if config is None:
        return None  # make_plan says why
    problems: list[remap.Problem] = []
    placements: dict[str, Path] = {}
    wanted_dirs: set[str] = set()
    places = remap.disk_places(config.xml)
    if opts.restore_path is None:
        for disk in disks:
            src = places.get(disk)
            if src is not None and src[1] is None:
                wanted_dirs.add(remap.remap_dir(posixpath.dirname(src[0]), opts.remaps))
    facts = hostcheck.gather(conn, files, config.xml, remap.paths_named(config.xml) | wanted_dirs,
                             hostcheck.bridges_of(config.xml))
    if opts.restore_path is None:
        for disk in disks:
            src = places.get(disk)
            if src is None:
                problems.append(remap.Problem("directory", disk, "the backup's XML does not say where this disk "
                                                                 "was: --restore-path DIR"))
                continue
            where, problem = remap.place(src[0], src[1], opts.remaps, facts)
            if problem is not None:
                problems.append(problem)
            elif where is not None:
                placements[disk] = Path(where) / posixpath.basename(src[0])
    result = remap.check(config.xml, opts.remaps, facts, tpm=not opts.skip_tpm)
    moved = [{"kind": "disk", "from": places[d][0], "to": str(p)} for d, p in placements.items()
             if d in places and str(p) != places[d][0]]
    return Verdict(placements, tuple(result.remaps + moved), tuple(problems + result.problems), facts, opts.remaps)

