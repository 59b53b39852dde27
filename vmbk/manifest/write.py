"""The manifest of one restore point, as vmbk-backup writes it.

Called when every file of the point is in place but the ``.cpt`` (for a
copy backup: when everything is), with the ``.cpt``'s new bytes: the
manifest covers them, is renamed into place, and then the ``.cpt``
rename commits the point (`vmbk.backup.vm`).  So the point's commit is
still one rename, and a crash between the two leaves a point that its
``.cpt`` does not list -- the case every reader and the planner already
handle (docs/architecture.md, "Durability and recovery").  A copy
backup's point has no ``.cpt``: its manifest is written last and is its
commit (a copy point without one, in a tree where vmbk writes them, is
incomplete).

Stream files come with the digest their writer took on the write pass
(`vmbk.stream.digest`); the small side files are hashed here, read
back from the page cache (a few KiB to a few MiB).
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from vmbk import __version__
from vmbk.clock import now_iso
from vmbk.fsutil import write_file_atomic
from vmbk.manifest import keys, sign
from vmbk.stream.digest import plain_digest
from vmbk.tree import names


def _entry(target_dir: Path, path: Path, streams: Mapping[Path, str], kind: str | None = None) -> dict[str, Any]:
    rel = path.relative_to(target_dir).as_posix()
    if path in streams:
        return {"name": rel, "size": path.stat().st_size, "sha256": streams[path], "kind": sign.STREAM}
    digest, size = plain_digest(path)
    return {"name": rel, "size": size, "sha256": digest, "kind": kind or sign.FILE}


def parent_digest(target_dir: Path, index: int) -> str | None:
    """SHA-256 of point ``index - 1``'s manifest file (None: first point, or it has none)."""
    if index <= 0:
        return None
    try:
        return hashlib.sha256((target_dir / names.manifest_name(names.checkpoint_name(index - 1))).read_bytes()
                              ).hexdigest()
    except FileNotFoundError:
        return None


def write_point(target_dir: Path, *, vm: str, uuid: str | None, level: str, checkpoint: str | None,
                files: Iterable[Path], streams: Mapping[Path, str], cpt: tuple[str, bytes] | None,
                checkpoints: list[str] | None, signer: keys.Signer | None) -> Path:
    """Write ``vmbk.<ident>.manifest`` for the point; its path.

    ``files``: every file the backup wrote for this point (inside
    ``target_dir``); ``streams``: the stream digests of its data files;
    ``cpt``: the ``.cpt``'s name and the bytes it is about to get.  The
    TPM state under ``tpm-state/`` is listed as it is now (``mutable``).
    """
    ident = names.ident(level, checkpoint)
    index = names.checkpoint_number(checkpoint) if checkpoint else 0
    index = 0 if index is None else index
    entries: dict[str, dict[str, Any]] = {}
    for path in files:
        if path.is_file() and path.resolve().is_relative_to(target_dir.resolve()):
            e = _entry(target_dir, path, streams)
            entries[e["name"]] = e
    tpm = target_dir / names.TPM_STATE
    if tpm.is_dir():
        for path in sorted(p for p in tpm.rglob("*") if p.is_file()):
            e = _entry(target_dir, path, streams, sign.MUTABLE)
            entries[e["name"]] = e
    if cpt is not None:
        entries[cpt[0]] = {"name": cpt[0], "size": len(cpt[1]), "sha256": hashlib.sha256(cpt[1]).hexdigest(),
                           "kind": sign.MUTABLE}
    body = {
        "format": sign.FORMAT, "version": sign.VERSION, "vm": vm, "uuid": uuid, "level": level,
        "checkpoint": checkpoint, "index": index, "parent": parent_digest(target_dir, index),
        "checkpoints": checkpoints, "created": now_iso(), "vmbk": __version__, "host": socket.gethostname(),
        "files": [entries[k] for k in sorted(entries)],
    }
    path = target_dir / names.manifest_name(ident)
    write_file_atomic(path, sign.encode(body, signer))
    return path


def signer_or_warning() -> tuple[keys.Signer | None, str | None]:
    """The host's key (made on first use), or None and why the manifest goes unsigned."""
    d = keys.key_dir()
    try:
        signer = keys.load_signer(d)
    except Exception as e:  # noqa: BLE001 -- a key problem never fails a backup; the manifest says unsigned
        return None, f"manifest not signed: {e}"
    if signer is None:
        return None, f"manifest not signed: no signing key in {d} and none could be made there ({os.geteuid() == 0 and 'not writable' or 'not root'})"
    return signer, None
