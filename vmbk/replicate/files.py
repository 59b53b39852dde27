"""The files of a backup tree as replication sees them: names, sizes, times.

A *listing* maps a path relative to the backup root (``web/202603/vda.full.data``,
always ``/``-separated) to its `Entry`.  The same rules list the source
and a local replica (`walk`); the ssh and rclone transports list theirs
with their tools and apply `replicable` to what they get.

What is never replicated: a ``.partial`` of a running backup (nor the
``tpm-state.partial``/``tpm-state.old`` of a TPM state being swapped),
hidden directories other than ``.archives`` (rotate's ``.deleting-*``,
rsync's ``.~tmp~``, rclone's staging ``.vmbk-partial``), and everything of
``_state/`` but the catalogue snapshot (`CATALOGUE`): the locks belong to
the host that takes them.

Each file belongs to a *phase* (`phase`), the order in which it is copied
so that a replica interrupted at any instant never shows a restore point
whose data is missing (`vmbk.replicate.plan`):

``DATA``   the streams and their ``.chksum``;
``SIDE``   what a point needs beside them (qemu info, NVRAM, TPM state ...);
``COMMIT`` the checkpoint XMLs and the domain XMLs;
``CPT``    the points' manifests and ``<vm>.cpt``, the list of the chain's
           finished points: the marker that says a point is there, so
           it comes last of all (and goes first when a chain is
           removed); a manifest, written just before the ``.cpt`` by the
           backup, is the commit of a copy point.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from vmbk.fsutil import PARTIAL
from vmbk.stream.checksum import CHKSUM
from vmbk.tree import names
from vmbk.tree.scan import vm_dirs

DATA, SIDE, COMMIT, CPT = 0, 1, 2, 3
PHASES = (DATA, SIDE, COMMIT, CPT)
#: The catalogue's snapshot on a replica (`vmbk.replicate.snapshot`).
CATALOGUE = f"{names.STATE_DIR}/vmbk.db"
#: Left by a TPM state swap (`vmbk.backup.sidefiles.save_tpm_state`).
_TPM_OLD = names.TPM_STATE + ".old"


@dataclasses.dataclass(frozen=True, slots=True)
class Entry:
    size: int
    mtime: float

    def same(self, other: Entry, tolerance: float) -> bool:
        """rsync's quick check: the same size and modification time."""
        return self.size == other.size and abs(self.mtime - other.mtime) <= tolerance


Listing = dict[str, Entry]


def skipped_dir(name: str) -> bool:
    """A directory inside a VM's tree that is not replicated."""
    return (name.startswith(".") and name != names.ARCHIVES) or name.endswith(PARTIAL) or name == _TPM_OLD


def skipped_file(name: str) -> bool:
    return name.endswith(PARTIAL)


def replicable(rel: str) -> bool:
    """Is ``rel`` (a file of some tree) part of what replication copies?"""
    parts = rel.split("/")
    if rel == CATALOGUE:
        return True
    if len(parts) < 2 or not names.is_vm_dir_name(parts[0]):
        return False
    return not skipped_file(parts[-1]) and not any(skipped_dir(p) for p in parts[1:-1])


def vm_of(rel: str) -> str:
    return rel.split("/", 1)[0]


def walk(root: Path, vm: str) -> Listing:
    """Every replicable file of ``root/vm`` (empty when there is no such directory)."""
    out: Listing = {}
    top = root / vm
    if not top.is_dir() or top.is_symlink():
        return out
    for rel, st in _walk(top, vm):
        out[rel] = Entry(st.st_size, st.st_mtime)
    return out


def _walk(path: Path, rel: str) -> Iterator[tuple[str, os.stat_result]]:
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return
    for e in entries:
        st = e.stat(follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            if not skipped_dir(e.name):
                yield from _walk(Path(e.path), f"{rel}/{e.name}")
        elif stat.S_ISREG(st.st_mode) and not skipped_file(e.name):
            yield f"{rel}/{e.name}", st


def source_vms(root: Path) -> list[str]:
    """The VM directories of the source tree (THE rule: `vmbk.tree.scan.vm_dirs`)."""
    return [e.name for e in vm_dirs(root)]


def phase(rel: str) -> int:
    name = rel.rsplit("/", 1)[-1]
    if name.endswith((".data", ".data" + CHKSUM)):
        return DATA
    if name.endswith(".cpt") or names.manifest_ident(name) is not None:
        return CPT
    parts = rel.split("/")
    if names.vmconfig_order(name) is not None or (len(parts) >= 3 and parts[-2] == names.CHECKPOINTS):
        return COMMIT
    return SIDE


def is_data(rel: str) -> bool:
    return rel.endswith(".data")


def chain_dir(rel: str) -> str:
    """The chain directory a file belongs to: ``web/202603`` for
    ``web/202603/checkpoints/virtnbdbackup.1.xml`` and for
    ``web/202603/tpm-state/tpm2/tpm2-00.permall``; ``web`` for an
    accumulate chain's files."""
    parts = rel.split("/")[:-1]
    for i in range(1, len(parts)):
        if parts[i] in (names.CHECKPOINTS, names.TPM_STATE):
            return "/".join(parts[:i])
    return "/".join(parts)


def archive_root(chain: str) -> str:
    """Where a chain directory's archives live: ``<chain>/.archives``."""
    return f"{chain}/{names.ARCHIVES}"


def is_secret(rel: str) -> bool:
    """TPM state and BitLocker keys: every file under a ``tpm-state/``."""
    return names.TPM_STATE in rel.split("/")[1:-1]


def in_scope(rel: str, scope: str) -> bool:
    """``everything``; ``archives-only``: archived chains; ``monthly``: the
    chains of monthly periods (their archives included)."""
    if scope == "everything" or rel == CATALOGUE:
        return True
    parts = rel.split("/")
    if scope == "archives-only":
        return names.ARCHIVES in parts[1:-1]
    if scope == "monthly":
        return len(parts) > 2 and names.policy_of_period(parts[1]) == "monthly"
    raise ValueError(f"unknown scope {scope!r}")


def select(listing: Mapping[str, Entry], keep: Iterable[str]) -> Listing:
    return {rel: listing[rel] for rel in keep if rel in listing}


def by_vm(listing: Mapping[str, Entry]) -> dict[str, Listing]:
    out: dict[str, Listing] = {}
    for rel, e in listing.items():
        if rel != CATALOGUE:
            out.setdefault(vm_of(rel), {})[rel] = e
    return out
