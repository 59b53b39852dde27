"""Scanning a VM's backup tree from disk into `vmbk.tree.model` objects.

Pure reads: nothing here writes, renames or creates, so ``vmbk-plan`` can
run against a tree another process is backing up into (it then sees a
``.partial`` and says so).  Of each ``.data`` file only the meta frame and
the last frame are read (`vmbk.stream.scan.probe`: a truncated or damaged
end is the file's ``error``), never a payload; which ones have their
``.chksum`` comes from the directory listing.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

from vmbk.errors import StorageError, VmbkError
from vmbk.stream.scan import probe
from vmbk.tree import names as names_
from vmbk.tree.names import CHKSUM
from vmbk.tree.model import Chain, DataFile, VmTree
from vmbk.tree.names import (
    ARCHIVES,
    CHECKPOINTS,
    archive_name,
    is_archive_name,
    parse_data_name,
    policy_of_period,
)

#: A ``.cpt`` is a short JSON list; anything bigger is not one.
MAX_CPT = 1 << 20
MAX_VMCONFIG = 16 << 20


def is_vm_dir(entry: os.DirEntry[str]) -> bool:
    """THE rule for what at the backup root is a VM directory.

    A real directory (not a symlink) whose name `names.is_vm_dir_name`
    accepts: ``_state``, hidden work directories and ``lost+found`` are
    not, nor a host's directory (`is_host_dir`).
    """
    return names_.is_vm_dir_name(entry.name) and entry.is_dir(follow_symlinks=False) and not is_host_dir(entry)


def is_host_dir(entry: os.DirEntry[str]) -> bool:
    """A host's directory: a real directory holding `names.HOST_MARKER`."""
    return (names_.is_vm_dir_name(entry.name) and entry.is_dir(follow_symlinks=False)
            and os.path.isfile(os.path.join(entry.path, names_.HOST_MARKER)))


@dataclasses.dataclass(frozen=True)
class Root:
    """A backup root: the tree's own (``host`` None), or a host's directory in it."""

    host: str | None
    path: Path

    def key(self, vm: str) -> str:
        """How a VM of this root is named across the tree: ``host/vm``, or ``vm``."""
        return f"{self.host}/{vm}" if self.host else vm


def roots(backup_path: Path) -> list[Root]:
    """Every backup root of a tree: itself, then each host's directory (by name).

    With several hosts configured the backup writes ``<backup_path>/<host>/<vm>/``;
    a tree that was single-host before keeps its VM directories at the top
    (the first root) until they are moved (README, "backup server").  Every
    reader -- listing, status, rotate, replicate, drill -- walks these.
    """
    out = [Root(None, Path(backup_path))]
    try:
        with os.scandir(backup_path) as it:
            out += sorted((Root(e.name, Path(e.path)) for e in it if is_host_dir(e)), key=lambda r: r.host or "")
    except OSError as e:
        raise StorageError(f"cannot read {backup_path}: {e.strerror}") from None
    return out


def host_root(backup_path: Path, host: str | None, *, layered: bool) -> Path:
    """Where the VMs of ``host`` are: ``<backup_path>/<host>`` when the tree has a level per host."""
    return Path(backup_path) / host if layered and host else Path(backup_path)


def locate(backup_path: Path, spec: str) -> tuple[Root, str]:
    """``host/vm`` or ``vm`` -> (its root, the VM's name).

    A bare name is looked for in every root; it must be in exactly one
    (else the first root: a VM with no backups yet).  StorageError names
    the hosts when it is in several.
    """
    all_roots = roots(backup_path)
    host, sep, vm = spec.rpartition("/")
    if sep:
        for r in all_roots:
            if r.host == host:
                return r, vm
        raise StorageError(f"no host {host!r} in {backup_path} (hosts: "
                           f"{', '.join(r.host for r in all_roots if r.host) or 'none'})", vm=vm)
    found = [r for r in all_roots if (r.path / vm).is_dir() and not (r.path / vm / names_.HOST_MARKER).exists()]
    if len(found) > 1:
        raise StorageError(f"VM {vm!r} has backups of several hosts: name one as "
                           + " or ".join(r.key(vm) for r in found), vm=vm)
    return (found[0] if found else all_roots[0]), vm


def vm_dirs(backup_path: Path) -> list[os.DirEntry[str]]:
    """The VM directories of a backup root, sorted by name."""
    try:
        with os.scandir(backup_path) as it:
            return sorted((e for e in it if is_vm_dir(e)), key=lambda e: e.name)
    except OSError as e:
        raise StorageError(f"cannot read {backup_path}: {e.strerror}") from None


def scan_vm(backup_path: Path, vm: str) -> VmTree:
    """Every chain of ``vm`` under ``backup_path`` (an empty tree if none).

    Period directories are the subdirectories named like a period;
    anything else in the VM directory (vmbackup's state files, a
    ``tpm-state`` of an accumulate chain) is not a chain.
    """
    path = Path(backup_path) / vm
    if not path.is_dir():
        return VmTree.empty(Path(backup_path), vm)
    chains = {".": scan_chain(path, ".", period=None, policy="accumulate", vm=vm)}
    for entry in _entries(path, vm):
        if not entry.is_dir(follow_symlinks=False):
            continue
        policy = policy_of_period(entry.name)
        if policy is not None:
            chains[entry.name] = scan_chain(Path(entry.path), entry.name, period=entry.name, policy=policy, vm=vm)
    return VmTree(Path(backup_path), vm, path, True, dict(sorted(chains.items())))


def scan_chain(path: Path, rel: str, *, period: str | None, policy: str | None, vm: str, archives: bool = True) -> Chain:
    """One chain directory: data files with their meta, .cpt, XMLs, partials."""
    data: list[DataFile] = []
    partials: list[str] = []
    cpts: list[str] = []
    vmconfigs: list[str] = []
    stream_names: set[str] = set()
    chksums: set[str] = set()
    has_checkpoints_dir = False
    for entry in _entries(path, vm):
        name = entry.name
        if entry.is_dir(follow_symlinks=False):
            has_checkpoints_dir |= name == CHECKPOINTS
            continue
        if name.endswith(".partial"):
            partials.append(name)
        elif name.endswith(".cpt"):
            cpts.append(name)
        elif names_.vmconfig_order(name) is not None:
            vmconfigs.append(name)
        elif name.endswith(".data"):
            stream_names.add(name)
            f = _data_file(entry)
            if f is not None:
                data.append(f)
        elif name.endswith(".data" + CHKSUM):
            chksums.add(name[: -len(CHKSUM)])
    data = [dataclasses.replace(f, has_checksum=f.name in chksums) for f in data]
    cpt_file, cpt, cpt_error = _read_cpt(path, cpts, vm)
    xmls = _checkpoint_xmls(path / CHECKPOINTS, vm) if has_checkpoints_dir else ()
    uuid, domain_name = _vmconfig_identity(path, vmconfigs)
    archived: tuple[Chain, ...] = ()
    if archives:
        archived = tuple(
            scan_chain(Path(a.path), f"{rel}/{ARCHIVES}/{a.name}" if rel != "." else f"{ARCHIVES}/{a.name}",
                       period=period, policy=policy, vm=vm, archives=False)
            for a in sorted(_entries(path / ARCHIVES, vm), key=lambda e: _archive_key(e.name))
            if a.is_dir(follow_symlinks=False) and is_archive_name(a.name)
        )
    return Chain(
        path=path,
        rel=rel,
        period=period,
        policy=policy,
        data=tuple(sorted(data, key=lambda f: (f.number or 0, f.level != "full", f.disk, f.name))),
        partials=tuple(sorted(partials)),
        cpt_file=cpt_file,
        cpt=cpt,
        cpt_error=cpt_error,
        checkpoint_xmls=xmls,
        vmconfigs=tuple(sorted(vmconfigs)),
        uuid=uuid,
        domain_name=domain_name,
        archives=archived,
        stray_checksums=tuple(sorted(n + CHKSUM for n in chksums - stream_names)),
    )


def next_archive_name(chain_dir: Path, today: _dt.date) -> Path:
    """Where the chain in ``chain_dir`` would be archived today.

    ``chain_dir/.archives/chain-YYYY-MM-DD[.N]``: archives live in the
    directory of the chain they came from (vmrestore guide, 4.3).
    """
    archives = Path(chain_dir) / ARCHIVES
    try:
        existing = [e.name for e in os.scandir(archives)]
    except FileNotFoundError:
        existing = []
    except OSError as e:
        raise StorageError(f"cannot read {archives}: {e.strerror}") from None
    return archives / archive_name(existing, today)


def find_uuid(backup_path: Path, uuid: str, *, exclude: str) -> tuple[str, ...]:
    """VM directories other than ``exclude`` whose chains carry ``uuid``.

    A renamed VM keeps its uuid; its old chains stay under the old name.
    Only the newest vmconfig of each chain directory is read.
    """
    found: list[str] = []
    for vm_dir in vm_dirs(backup_path):
        if vm_dir.name == exclude:
            continue
        candidates = [Path(vm_dir.path)]
        try:
            candidates += [Path(e.path) for e in os.scandir(vm_dir.path)
                           if e.is_dir(follow_symlinks=False) and policy_of_period(e.name)]
        except OSError:
            continue
        for chain_dir in candidates:
            try:
                names = [e.name for e in os.scandir(chain_dir) if names_.vmconfig_order(e.name) is not None]
            except OSError:
                continue
            if _vmconfig_identity(chain_dir, names)[0] == uuid:
                found.append(vm_dir.name)
                break
    return tuple(found)


# -- helpers ----------------------------------------------------------------


def _entries(path: Path, vm: str) -> Iterator[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            yield from list(it)
    except FileNotFoundError:
        return
    except OSError as e:
        raise StorageError(f"cannot read {path}: {e.strerror}", vm=vm) from None


def _archive_key(name: str) -> tuple[str, int]:
    base, _, n = name.partition(".")
    return base, int(n) if n.isdigit() else 0


def _data_file(entry: os.DirEntry[str]) -> DataFile | None:
    parsed = parse_data_name(entry.name)
    if parsed is None:
        return None
    st = entry.stat(follow_symlinks=False)
    f = DataFile(entry.name, parsed.disk, parsed.level, parsed.checkpoint, parsed.number, st.st_size, st.st_mtime)
    try:
        meta, damage = probe(entry.path)
    except VmbkError as e:
        return dataclasses.replace(f, error=_located(e))
    return dataclasses.replace(
        f,
        error=_located(damage) if damage is not None else None,
        virtual_size=meta.virtual_size,
        meta_disk=meta.disk_name,
        meta_checkpoint=meta.checkpoint_name if isinstance(meta.checkpoint_name, str) else None,
        meta_parent=meta.parent_checkpoint if isinstance(meta.parent_checkpoint, str) else None,
        incremental=meta.incremental,
        date=meta.date or None,
        by_vmbk=meta.written_by_vmbk,
        manifested=meta.with_manifest,
    )


def _located(e: VmbkError) -> str:
    """The message without the path: it names the file already, and plans
    must not depend on where the tree is mounted."""
    detail = getattr(e, "detail", None)
    return f"at byte {getattr(e, 'offset', None)}: {detail}" if detail is not None else str(e)


def chain_checkpoints(path: Path, vm: str) -> tuple[str, ...] | None:
    """What the ``.cpt`` of chain directory ``path`` lists (None: no ``.cpt``, or not a readable one)."""
    try:
        cpts = [e.name for e in os.scandir(path) if e.name.endswith(".cpt") and e.is_file(follow_symlinks=False)]
    except FileNotFoundError:
        return None
    return _read_cpt(path, cpts, vm)[1]


def _read_cpt(path: Path, names: list[str], vm: str) -> tuple[str | None, tuple[str, ...] | None, str | None]:
    """``(file, checkpoints, error)`` of the chain's ``.cpt``.

    virtnbdbackup names it after the domain; a directory with one ``.cpt``
    of another name (a renamed VM) is read as well.
    """
    if not names:
        return None, None, None
    if names_.cpt_name(vm) in names:
        name = names_.cpt_name(vm)
    elif len(names) == 1:
        name = names[0]
    else:
        return sorted(names)[0], None, f"several checkpoint lists: {', '.join(sorted(names))}"
    try:
        with open(path / name, "rb") as fh:
            raw = fh.read(MAX_CPT + 1)
    except OSError as e:
        return name, None, f"{name}: cannot read: {e.strerror}"
    if len(raw) > MAX_CPT:
        return name, None, f"{name}: larger than {MAX_CPT} bytes"
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        return name, None, f"{name}: not JSON ({e})"
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return name, None, f"{name}: not a JSON list of checkpoint names"
    return name, tuple(value), None


def _checkpoint_xmls(path: Path, vm: str) -> tuple[str, ...]:
    return tuple(sorted(e.name[:-4] for e in _entries(path, vm) if e.name.endswith(".xml") and e.is_file()))


def _vmconfig_identity(path: Path, names: list[str]) -> tuple[str | None, str | None]:
    """uuid and name from the newest ``vmconfig.*.xml`` (None when unreadable)."""
    if not names:
        return None, None

    newest = max(names, key=lambda n: names_.vmconfig_order(n) or (-1, n))
    try:
        with open(path / newest, "rb") as fh:
            raw = fh.read(MAX_VMCONFIG)
        root = ET.fromstring(raw)
    except (OSError, ET.ParseError):
        return None, None
    uuid = (root.findtext("uuid") or "").strip().lower() or None
    name = (root.findtext("name") or "").strip() or None
    return uuid, name
