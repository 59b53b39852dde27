"""Which restore points a drill proves (pure over the scanned tree).

``--point``: ``latest`` (the VM's newest complete point, archives
included), ``random`` (any complete point), ``INDEX`` (that point of the
newest chain, as ``vmbk-restore --restore-point``; ``full`` is 0) or
``DATE`` (``YYYY-MM-DD``: the newest complete point taken that day or
before).  ``--sample N`` adds N more complete points, drawn at random
from every chain and archive, so old points are proven too.  As a stage,
the point a ``backup`` record just made (`from_backup`).

Only complete points are drilled (`vmbk.tree.points`): an incomplete one
is already known to be broken (vmbk-status says so); asking for one by
index or date is a VM problem (exit 5).  A point's time is its streams'
``date`` (the listing's), falling back to the data file's mtime.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vmbk.errors import UsageError, VmError
from vmbk.tree import Chain, VmTree
from vmbk.tree.names import checkpoint_number
from vmbk.tree.points import RestorePoint, restore_points

KINDS = ("latest", "random", "index", "date")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


@dataclasses.dataclass(frozen=True)
class PointSpec:
    kind: str
    index: int | None = None
    date: str | None = None

    @classmethod
    def parse(cls, raw: str | None) -> PointSpec:
        if raw is None or raw == "latest":
            return cls("latest")
        if raw == "random":
            return cls("random")
        if raw == "full":
            return cls("index", index=0)
        if raw.isascii() and raw.isdigit():
            return cls("index", index=int(raw))
        if _DATE.match(raw):
            try:
                _dt.date.fromisoformat(raw)
            except ValueError:
                pass
            else:
                return cls("date", date=raw)
        raise UsageError(f"--point must be latest, random, an index or a date (YYYY-MM-DD), not {raw!r}")


@dataclasses.dataclass(frozen=True)
class Target:
    """One point to drill, and why it was chosen."""

    vm: str
    point: RestorePoint
    why: str  # backup | latest | random | index | date | sample

    @property
    def chain(self) -> Chain:
        return self.point.chain

    @property
    def ref(self) -> str:
        """``CHAIN:INDEX``, as the catalogue's restore_sessions name a point."""
        return f"{self.chain.rel}:{self.point.index}"

    @property
    def archived(self) -> bool:
        return "/.archives/" in f"/{self.chain.rel}/"

    def as_record(self) -> dict[str, Any]:
        p = self.point
        return {"chain": self.chain.rel, "chain_path": str(self.chain.path), "archived": self.archived,
                "restore_point": p.index, "checkpoint": p.checkpoint, "kind": p.kind, "date": p.date}


def point_time(p: RestorePoint) -> str:
    return (p.date or "").replace(" ", "T")


def complete_points(tree: VmTree) -> list[RestorePoint]:
    """Every complete point of the VM, archives included, oldest first."""
    chains = [c for top in tree.chains.values() for c in (*top.archives, top)]
    points = [p for c in chains for p in restore_points(c) if p.complete]
    return sorted(points, key=lambda p: (point_time(p), p.chain.last_time or 0.0, p.index))


def choose(tree: VmTree, spec: PointSpec, sample: int, rng: random.Random | None = None) -> list[Target]:
    """The points ``--point`` and ``--sample`` ask for; VmError when there is none to drill."""
    rng = rng or random.SystemRandom()
    vm = tree.name
    good = complete_points(tree)
    if not good:
        raise VmError(f"VM {vm!r} has no complete restore point to drill in {tree.path}", vm=vm)
    if spec.kind == "latest":
        chosen = good[-1]
    elif spec.kind == "random":
        chosen = rng.choice(good)
    elif spec.kind == "index":
        chosen = _by_index(tree, spec.index or 0)
    else:
        older = [p for p in good if point_time(p)[:10] <= (spec.date or "")]
        if not older:
            raise VmError(f"VM {vm!r} has no complete restore point taken on or before {spec.date}", vm=vm)
        chosen = older[-1]
    out = [Target(vm, chosen, spec.kind)]
    rest = [p for p in good if (p.chain.path, p.index) != (chosen.chain.path, chosen.index)]
    out += [Target(vm, p, "sample") for p in sorted(rng.sample(rest, min(sample, len(rest))),
                                                      key=lambda p: (point_time(p), p.index))]
    return out


def _by_index(tree: VmTree, index: int) -> RestorePoint:
    chain = tree.latest()
    if chain is None:
        raise VmError(f"VM {tree.name!r} has no backup chain with data", vm=tree.name)
    for p in restore_points(chain):
        if p.index == index:
            if not p.complete:
                raise VmError(f"restore point {index} of {chain.path} is incomplete: {'; '.join(p.findings)}",
                              vm=tree.name)
            return p
    raise VmError(f"{chain.path} has no restore point {index}", vm=tree.name)


def from_backup(tree: VmTree, rec: Mapping[str, Any]) -> Target:
    """The point a ``backup`` record made: its chain (``target_dir``) and ``checkpoint``."""
    vm = tree.name
    target = rec.get("target_dir")
    chains = [c for top in tree.chains.values() for c in (top, *top.archives)]
    chain = next((c for c in chains if isinstance(target, str) and _same(c.path, Path(target))), None)
    if chain is None:
        raise VmError(f"the backup of {vm!r} wrote {target!r}, which holds no chain of the VM", vm=vm)
    number = checkpoint_number(rec["checkpoint"]) if isinstance(rec.get("checkpoint"), str) else None
    points = restore_points(chain)
    found = [p for p in points if p.index == (number or 0)] if chain.base != "copy" else points
    if not found:
        raise VmError(f"{chain.path} has no restore point for {rec.get('checkpoint')!r}", vm=vm)
    p = found[-1]
    if not p.complete:
        raise VmError(f"the point the backup just made is incomplete: {'; '.join(p.findings)}", vm=vm)
    return Target(vm, p, "backup")


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
