"""The facts retention decides on, read from one VM's tree (and the catalogue).

`gather` turns a scanned tree (`vmbk.tree.scan_vm`) into the
`vmbk.policy.retention.TreeFacts` the pure rules take: every period
directory and archived chain with its size, whether it holds a backup,
when its last backup was and when its newest complete restore point was
made.  "Complete" is the listing's rule (`vmbk.tree.points`), so the
point rotate keeps is one vmbk-restore would restore.  Reads only.
"""

from __future__ import annotations

from collections.abc import Mapping

from vmbk.fsutil import dir_size
from vmbk.policy.retention import ARCHIVE, PERIOD, TreeFacts, Unit
from vmbk.tree.points import RestorePoint, restore_points
from vmbk.tree import Chain, VmTree


def gather(tree: VmTree, last_backups: Mapping[str, float] | None = None) -> TreeFacts:
    """``last_backups``: period -> the catalogue's last successful backup in it."""
    if not tree.exists:
        return TreeFacts(tree.name)
    last_backups = last_backups or {}
    periods = tuple(_unit(c, PERIOD, c.policy, last_backups.get(c.period or "")) for rel, c in tree.chains.items()
                    if rel != ".")
    root = tree.chains["."]
    archives = tuple(_unit(a, ARCHIVE, "accumulate", None) for a in root.archives)
    newest, points = _complete(root)
    return TreeFacts(tree.name, periods, archives, root_backups=bool(root.data), root_newest_complete=newest,
                     root_points=points, bytes=dir_size(tree.path))


def _unit(chain: Chain, kind: str, policy: str | None, catalogue: float | None) -> Unit:
    archives = tuple(_unit(a, ARCHIVE, policy, None) for a in chain.archives)
    newest, points = _complete(chain)
    times = [chain.last_time, *(a.last_backup for a in archives)]
    last = catalogue if catalogue is not None else max((t for t in times if t is not None), default=None)
    completes = [newest, *(a.newest_complete for a in archives)]
    return Unit(
        rel=chain.rel,
        kind=kind,
        period=chain.period,
        policy=policy,
        bytes=dir_size(chain.path),
        backups=bool(chain.data) or any(a.backups for a in archives),
        last_backup=last,
        newest_complete=max((t for t in completes if t is not None), default=None),
        points=points,
        archives=archives,
        days=chain.days if kind == PERIOD else None,
    )


def _complete(chain: Chain) -> tuple[float | None, int]:
    """(time of the chain's newest complete restore point, number of points)."""
    points = restore_points(chain)
    return max((point_time(p) for p in points if p.complete), default=None), len(points)


def point_time(p: RestorePoint) -> float:
    """When a point was made: the newest mtime of the files it is rebuilt from."""
    return max((f.mtime for files in p.disks.values() for f in files), default=0.0)
