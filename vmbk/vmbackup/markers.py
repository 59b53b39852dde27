"""The state files vmbackup and vmrestore read in a chain directory.

Written by vmbk-backup after a successful backup (`write_all`), so that
either tool continues where the other stopped (issue #14).  Facts from
vmbackup 0.5.3 and vmrestore 0.5.4:

``.full-backup-month``
    vmbackup's ``backup_vm`` reads it before anything else: when it is
    missing or holds another value than ``get_current_month`` (the period
    id of its *default* policy, ``date +%Y-W%V`` for weekly) it asks
    virtnbdbackup for a full, which fails in a directory that holds a
    chain; it then archives the chain and starts over.  vmbackup writes
    it when it makes a full.  vmbk writes it when it starts a chain
    (full or copy) and when a chain directory lacks it; an incremental
    leaves vmbackup's value alone.  The value (`full_backup_period`) is
    the directory's own name when the VM follows the default policy (what
    vmbackup writes in every directory it makes, its period id and
    directory name coming from the same ``date``) and vmbackup's period
    id of the default policy otherwise.

``config/<vm>_config_<period>_FIRST.xml``, ``config/<vm>_config_<YYYYMMDD_HHMMSS>.xml``
    vmbackup's ``backup_vm_config`` after each backup: the domain XML
    (``virsh dumpxml``, live) as a timestamped file; the first of the
    period is also copied to ``_FIRST``; a later one is kept only when it
    differs from ``_FIRST``.  vmrestore takes the newest (``ls -t``) of
    ``config/*.xml`` for the names of a clone's disks and the domain it
    defines; without one it restores the disks into a hidden staging
    directory and defines nothing.

``.tpm-backup-marker``
    written beside ``tpm-state/`` (local ``%Y-%m-%d %H:%M:%S``);
    vmrestore tags the chain ``[TPM]`` by it.

``<vm>/chain-manifest.json``
    vmbackup's manifest of restore points.  Nothing decides full or
    incremental, nor restores, from it; vmbackup numbers its restore
    points and names its chains from it, and archives a period's chain at
    a period boundary only when the manifest lists points of it.  vmbk
    appends its points as vmbackup's ``post_backup_hook`` would, when the
    VM has a manifest (a VM vmbackup backed up); vmbackup creates one
    where there is none.

The marker of a *stale* chain goes: when vmbk backs up into one
directory of this period while another directory of the same period
holds an older chain (vmbackup's ``%Y-W%V`` names split an ISO week in
two, ``2024-W01`` and ``2025-W01``), libvirt's checkpoints now belong to
the chain vmbk wrote, and an incremental on the other chain would miss
what changed in between.  Without its marker vmbackup takes that
directory for new: a full (after archiving what is there), never a wrong
incremental.

``.agent-status`` is written by vmbackup and read by nothing: vmbk
leaves it out.  Every write is atomic (`vmbk.fsutil.write_file_atomic`).
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson

from vmbk.fsutil import ensure_dir, write_file_atomic
from vmbk.tree import names

log = logging.getLogger("vmbk.vmbackup")


def full_backup_period(chain_dir_name: str | None, policy: str, default_policy: str | None,
                       now: _dt.datetime) -> str | None:
    """The value vmbackup compares ``.full-backup-month`` with, for a chain vmbk starts.

    ``chain_dir_name``: the period directory (None: accumulate, the VM
    directory).  None: vmbackup would not back the VM up (``never``).
    """
    default = default_policy or policy
    if default == policy and chain_dir_name is not None:
        return chain_dir_name
    if default == "never":
        return None
    return names.vmbackup_period_id(default, now)


def read_full_backup_period(chain_dir: Path) -> str | None:
    """What ``.full-backup-month`` says (None: no such file; "" when empty)."""
    try:
        return (chain_dir / names.FULL_BACKUP_MONTH).read_text(errors="replace").strip()
    except FileNotFoundError:
        return None


def write_full_backup_period(chain_dir: Path, value: str, *, started: bool) -> Path | None:
    """Write the marker when a chain was ``started`` here or it is missing or empty."""
    path = chain_dir / names.FULL_BACKUP_MONTH
    if not started and read_full_backup_period(chain_dir):
        return None
    write_file_atomic(path, value.encode() + b"\n")
    return path


def write_config(chain_dir: Path, vm: str, period: str, xml: str, now: _dt.datetime) -> list[Path]:
    """vmbackup's ``config/`` files for one backup; the paths created."""
    config = ensure_dir(chain_dir / names.CONFIG_DIR)
    first = config / names.config_first_name(vm, period)
    stamp = config / names.config_stamp_name(vm, now)
    data = xml.encode() + b"\n"  # virsh dumpxml prints libvirt's XML (ending in a newline) and one more
    if not first.exists():
        write_file_atomic(stamp, data)
        write_file_atomic(first, data)
        return [stamp, first]
    try:
        same = first.read_bytes() == data
    except OSError:
        same = False
    if same:
        return []
    write_file_atomic(stamp, data)
    return [stamp]


def write_tpm_marker(chain_dir: Path, now: _dt.datetime) -> Path:
    path = chain_dir / names.TPM_MARKER
    write_file_atomic(path, now.strftime("%Y-%m-%d %H:%M:%S").encode() + b"\n")
    return path


def update_manifest(vm_dir: Path, vm: str, period: str | None, level: str, size: int,
                    now: _dt.datetime) -> Path | None:
    """Append the backup to ``chain-manifest.json`` as vmbackup would (None: no manifest)."""
    path = vm_dir / names.CHAIN_MANIFEST
    try:
        manifest = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, orjson.JSONDecodeError) as e:
        log.warning("%s: %s is unreadable (%s): not updated; vmbackup rebuilds it", vm, path, e)
        return None
    if not _valid(manifest):
        log.warning("%s: %s is not vmbackup's manifest: not updated; vmbackup rebuilds it", vm, path)
        return None
    write_file_atomic(path, orjson.dumps(add_point(manifest, vm, period, level, size, now), option=orjson.OPT_INDENT_2))
    return path


def _valid(m: Any) -> bool:
    return (isinstance(m, dict) and bool(m.get("version")) and bool(m.get("vm_name"))
            and isinstance(m.get("restore_points"), list) and isinstance(m.get("chains"), dict))


def add_point(manifest: Mapping[str, Any], vm: str, period: str | None, level: str, size: int,
              now: _dt.datetime) -> dict[str, Any]:
    """The manifest with one more restore point (pure; vmbackup's ``post_backup_hook``).

    The chain is the first ``active`` one (``get_active_chain``), else a
    new ``chain-YYYYMMDD-HHMMSS``; the point's number is how many the
    manifest lists for the period; ``period_id`` is ``accumulate`` for the
    VM directory, as vmbackup keys it.
    """
    out = dict(manifest)
    chains = {k: dict(v) for k, v in (manifest.get("chains") or {}).items() if isinstance(v, Mapping)}
    points = [p for p in manifest.get("restore_points") or [] if isinstance(p, Mapping)]
    period_id = period or "accumulate"
    stamp = now.isoformat(timespec="seconds")
    chain = next((k for k, v in chains.items() if v.get("status") == "active"), None)
    chain = chain or f"chain-{now.strftime('%Y%m%d-%H%M%S')}"
    number = sum(1 for p in points if p.get("period_id") == period_id)
    backup_type = "auto" if level == "inc" else "full"
    points.append({"id": f"{vm}:{period_id}:{chain}:{number}", "period_id": period_id, "chain_id": chain,
                   "checkpoint": number, "backup_type": backup_type, "backup_file": "", "timestamp": stamp,
                   "size_bytes": size, "chain_status": "active", "parent_id": None})
    if chain in chains:
        c = chains[chain]
        c["checkpoint_count"] = int(c.get("checkpoint_count") or 0) + 1
        c["total_bytes"] = int(c.get("total_bytes") or 0) + size
    else:
        chains[chain] = {"period_id": period_id, "status": "active", "started": stamp, "checkpoint_count": 1,
                         "total_bytes": size, "base_backup": ""}
    out.update(restore_points=points, chains=chains, updated=stamp)
    return out


def forget_stale(chain_dirs: Iterable[Path]) -> list[Path]:
    """Remove the marker of chains libvirt's checkpoints no longer follow; those removed."""
    gone = []
    for d in chain_dirs:
        path = d / names.FULL_BACKUP_MONTH
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        gone.append(path)
        log.info("%s: its chain is not the one libvirt's checkpoints follow now: marker removed, "
                 "vmbackup starts a full there", d)
    return gone


def write_all(vm_dir: Path, chain_dir: Path, vm: str, *, period: str | None, policy: str,
              default_policy: str | None, level: str, xml: str, tpm: bool, size: int,
              now: _dt.datetime, stale: Iterable[Path] = ()) -> list[Path]:
    """Every vmbackup state file of one successful backup; the files created.

    ``period``: the chain's period directory (None: accumulate); ``level``:
    full, inc or copy; ``xml``: the live domain XML; ``stale``: other
    directories of this period whose chains are not libvirt's any more
    (`forget_stale`).
    """
    created: list[Path] = []
    forget_stale(stale)
    marker = full_backup_period(period, policy, default_policy, now)
    if marker is not None:
        path = write_full_backup_period(chain_dir, marker, started=level != "inc")
        if path is not None:
            created.append(path)
        created += write_config(chain_dir, vm, marker, xml, now)
    if tpm:
        created.append(write_tpm_marker(chain_dir, now))
    update_manifest(vm_dir, vm, period, level, size, now)
    return created
