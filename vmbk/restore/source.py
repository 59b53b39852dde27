"""Where a VM's backups are: ``--vm NAME`` or ``--vm /path/to/backups``.

vmrestore guide, 9.5 and 9.6: when ``--vm`` holds a ``/`` it is a path.
Its basename is the VM name and its dirname the backup path, so a tree
copied to a recovery host restores without any configuration.  A path to
an archived chain (``<vm>[/<period>]/.archives/chain-...``) or to a period
directory with data files selects that one chain; the VM directory is then
found above it.  Nothing here writes.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

from vmbk.errors import UsageError, VmError
from vmbk.tree import ARCHIVES, Chain, VmTree, scan_chain, scan_vm
from vmbk.tree.names import is_archive_name, policy_of_period
from vmbk.tree.scan import locate as locate_root


@dataclasses.dataclass(frozen=True)
class Source:
    """A VM's scanned backup tree, and the one chain ``--vm`` named, if any."""

    backup_path: Path
    vm: str
    tree: VmTree
    chain: Chain | None = None

    @property
    def vm_dir(self) -> Path:
        return self.tree.path


def is_path(arg: str) -> bool:
    """A path (absolute, ``./``, or a directory here), not a name: ``HOST/VM`` names a VM of one host."""
    return "/" in arg and (arg.startswith(("/", "./", "../")) or os.path.isdir(arg) or arg.count("/") > 1)


@dataclasses.dataclass(frozen=True)
class SourceRef:
    """What ``--vm`` names, before anything is read: enough to take the lock."""

    backup_path: Path
    vm: str
    chain_dir: Path | None = None


def resolve(arg: str, backup_path: Callable[[], Path]) -> SourceRef:
    """``--vm`` as a name (under ``backup_path()``, asked only then) or a path."""
    if is_path(arg):
        return resolve_path(arg)
    if arg in ("", ".", "..") or arg.startswith("_"):
        raise UsageError(f"{arg!r} is not a VM name")
    # HOST/VM, or a VM of one host, in a tree with a level per host (`vmbk.tree.scan.locate`)
    root, vm = locate_root(backup_path(), arg)
    return SourceRef(root.path, vm)


def resolve_path(arg: str) -> SourceRef:
    """A VM directory, a period directory with data, or an archived chain."""
    path = Path(os.path.abspath(arg))
    if not path.is_dir():
        raise VmError(f"no backup directory at {path}")
    if path.parent.name == ARCHIVES and is_archive_name(path.name):
        owner = path.parent.parent
        # <vm>/<period>/.archives/... or, accumulate, <vm>/.archives/...
        vm_dir = owner.parent if policy_of_period(owner.name) else owner
        return SourceRef(vm_dir.parent, vm_dir.name, path)
    if policy_of_period(path.name) and _has_data(path):
        return SourceRef(path.parent.parent, path.parent.name, path)
    return SourceRef(path.parent, path.name)


def load(ref: SourceRef) -> Source:
    """Scan the tree ``ref`` names; VmError (5) when the VM has no directory."""
    tree = scan_vm(ref.backup_path, ref.vm)
    if not tree.exists:
        raise VmError(f"no backups of VM {ref.vm!r} in {ref.backup_path}", vm=ref.vm)
    chain = find_chain(tree, ref.chain_dir) if ref.chain_dir is not None else None
    return Source(ref.backup_path, ref.vm, tree, chain)


def locate(arg: str, backup_path: Callable[[], Path]) -> Source:
    return load(resolve(arg, backup_path))


def locate_name(backup_path: Path, vm: str) -> Source:
    return load(SourceRef(backup_path, vm))


def find_chain(tree: VmTree, path: Path) -> Chain:
    """The chain (active or archived) of ``tree`` that lives in ``path``."""
    for chain in tree.chains.values():
        for c in (chain, *chain.archives):
            if _same(c.path, path):
                return c
    rel = os.path.relpath(path, tree.path)
    period = rel.split("/", 1)[0]
    policy = policy_of_period(period)
    return scan_chain(path, rel, period=period if policy else None, policy=policy or "accumulate",
                      vm=tree.name, archives=False)


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _has_data(path: Path) -> bool:
    try:
        return any(e.name.endswith(".data") for e in os.scandir(path))
    except OSError:
        return False
