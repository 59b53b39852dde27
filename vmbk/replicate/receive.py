"""The far side of an append-only destination: ``vmbk-replicate --receive DIR``.

A forced command in the far side's ``authorized_keys``::

    command="vmbk-replicate --receive /srv/vmbk",restrict ssh-ed25519 AAAA... vmbk@host

so that whoever holds the host's key (the host itself, or ransomware on
it) can only add files to DIR, never overwrite or delete one.  It answers
what ssh asked for (``SSH_ORIGINAL_COMMAND``):

``rsync --server ...``
    rsync's ``rrsync -wo -no-del -no-overwrite DIR``: write-only, no
    ``--delete``, ``--ignore-existing`` enforced.  When that connection has
    ended, what the host staged under ``_state/incoming/<id>/`` is applied
    (`settle`): the only changes to existing files there are, and none of
    them loses data:

    * a chain's ``.cpt`` is replaced by one that *extends* it (the old list
      is a prefix of the new: points are only ever added);
    * the files of a chain the source archived move into a new archive
      directory of that chain (``<chain>/.archives/chain-...``), the same
      rename the source made; nothing is overwritten;
    * a new TPM state replaces the chain's ``tpm-state/``, the old one kept
      as ``.tpm-state.replaced-<time>`` beside it.

    A staged set is applied only when its ``manifest.json`` (written by the
    same connection) lists every staged file at its size; one that fails a
    check is refused as a whole and removed, and the connection fails.
``vmbk-receive list|space|sha256``
    metadata for the host's planner and verify (names, sizes and times of
    the replica's files; free space; sha256 of named files): reads only.

Anything else is refused.  Pruning of this copy is the far side's own
``vmbk-rotate --backup-path DIR``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from vmbk.errors import DependencyError, StorageError, UsageError
from vmbk.replicate import files
from vmbk.tree import names

INCOMING = f"{names.STATE_DIR}/incoming"
MANIFEST = "manifest.json"
#: Staged sets without a manifest older than this are a killed upload's.
ABANDONED_S = 24 * 3600
REQUEST_MAX = 64 << 20


class Refused(StorageError):
    """A staged change that would lose data, or a path outside the replica."""


def serve(root: Path, command: str, stdin: IO[bytes], stdout: IO[bytes], stderr: IO[str]) -> int:
    """Answer one ssh connection; the exit status goes back to the host."""
    root = root.resolve()
    if not root.is_dir():
        raise StorageError(f"{root} is not a directory")
    words = command.split()
    if words[:2] == ["rsync", "--server"]:
        return _rsync(root, stderr)
    if len(words) == 2 and words[0] == "vmbk-receive" and words[1] in _QUERIES:
        raw = stdin.read(REQUEST_MAX)
        request = json.loads(raw) if raw.strip() else {}
        stdout.write(json.dumps(_QUERIES[words[1]](root, request)).encode())
        stdout.flush()
        return 0
    raise UsageError(f"refused: {command[:80]!r} (this key may only add files with rsync)")


def _rsync(root: Path, stderr: IO[str]) -> int:
    rrsync = _rrsync()
    code = subprocess.run([rrsync, "-wo", "-no-del", "-no-overwrite", str(root)], check=False).returncode
    try:
        settle(root)
    except (Refused, OSError, ValueError) as e:
        stderr.write(f"vmbk-replicate --receive: {e}\n")
        stderr.flush()
        return code or 1
    return code


def _rrsync() -> str:
    for path in (os.environ.get("VMBK_RRSYNC"), shutil.which("rrsync"), "/usr/bin/rrsync",
                 "/usr/share/doc/rsync/scripts/rrsync"):
        if path and os.path.isfile(path):
            # an rrsync without -no-overwrite would let an overwrite through: refuse it
            if b"no-overwrite" not in Path(path).read_bytes():
                raise DependencyError(f"{path} has no -no-overwrite option: an append-only copy needs an rsync "
                                      "whose rrsync refuses overwrites (Debian 12: the bookworm-security rsync)")
            return path
    raise DependencyError("rrsync is not installed (Debian: the rsync package ships /usr/bin/rrsync)")


# -- queries (read only) -------------------------------------------------------


def _list(root: Path, request: Mapping[str, Any]) -> dict[str, Any]:
    vms = request.get("vms")
    listing: files.Listing = {}
    for vm in files.source_vms(root) if vms is None else [str(v) for v in vms]:
        if names.is_vm_dir_name(vm):
            listing.update(files.walk(root, vm))
    return {"files": [[rel, e.size, e.mtime] for rel, e in sorted(listing.items())]}


def _space(root: Path, request: Mapping[str, Any]) -> dict[str, Any]:
    st = os.statvfs(root)
    return {"free": st.f_bavail * st.f_frsize, "total": st.f_blocks * st.f_frsize}


def _sha256(root: Path, request: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, str | None] = {}
    for rel in request.get("files") or []:
        path = _inside(root, str(rel))
        out[str(rel)] = sha256_file(path) if path.is_file() else None
    return {"sha256": out}


_QUERIES = {"list": _list, "space": _space, "sha256": _sha256}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# -- settle: apply what the host staged ------------------------------------------


def settle(root: Path) -> int:
    """Apply every complete staged set, oldest first; how many were applied."""
    incoming = root / INCOMING
    if not incoming.is_dir():
        return 0
    applied = 0
    fd = os.open(root, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # not beside a running rrsync (it takes the same lock)
        failed: list[str] = []
        for staged in sorted(p for p in incoming.iterdir() if p.is_dir()):
            if not (staged / MANIFEST).is_file():
                if time.time() - staged.stat().st_mtime > ABANDONED_S:
                    shutil.rmtree(staged, ignore_errors=True)
                continue
            try:
                _apply(root, staged)
                applied += 1
            except (Refused, OSError, ValueError) as e:
                failed.append(f"{staged.name}: {e}")
            finally:
                shutil.rmtree(staged, ignore_errors=True)
        if failed:
            raise Refused("refused staged changes: " + "; ".join(failed))
    finally:
        os.close(fd)
    return applied


def _inside(root: Path, rel: str) -> Path:
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or not files.replicable(rel):
        raise Refused(f"not a path of the backup tree: {rel!r}")
    path = root / rel
    real = Path(os.path.realpath(path.parent))
    if real != root and root not in real.parents:
        raise Refused(f"{rel!r} leads outside {root}")
    return path


def _apply(root: Path, staged: Path) -> None:
    manifest = json.loads((staged / MANIFEST).read_bytes())
    moves = [(str(a), str(b)) for a, b in manifest.get("moves") or []]
    updates = [(str(rel), int(size)) for rel, size in manifest.get("updates") or []]
    for a, b in moves:
        _check_move(a, b)
        _inside(root, a)
        _inside(root, b)
    for rel, size in updates:
        _inside(root, rel)
        if not (rel.endswith(".cpt") or files.is_secret(rel)):
            raise Refused(f"{rel}: only a .cpt or TPM state is replaced here")
        got = staged / "files" / rel
        if not got.is_file() or got.stat().st_size != size:
            raise Refused(f"{rel}: staged copy missing or incomplete")
        if rel.endswith(".cpt"):
            _check_extends(root / rel, got)
    for a, b in moves:
        if (root / a).exists() and not (root / b).exists():
            (root / b).parent.mkdir(parents=True, exist_ok=True)
            os.rename(root / a, root / b)
    tpm_done: set[str] = set()
    for rel, _ in sorted(updates, key=lambda u: u[0].endswith(".cpt")):  # .cpt last
        if files.is_secret(rel):
            chain = files.chain_dir(rel)
            if chain not in tpm_done:
                tpm_done.add(chain)
                _replace_tpm(root / chain, staged / "files" / chain / names.TPM_STATE)
        else:
            os.replace(staged / "files" / rel, root / rel)
        with contextlib.suppress(OSError):
            fd = os.open((root / rel).parent, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


def _check_move(a: str, b: str) -> None:
    """A move takes a chain's file to the same name in a new archive of that chain."""
    chain = files.chain_dir(a)
    prefix = files.archive_root(chain) + "/"
    inner = a[len(chain) + 1:]
    if not b.startswith(prefix) or "/" not in b[len(prefix):]:
        raise Refused(f"move {a!r} -> {b!r}: not into an archive of its chain")
    archive, _, rest = b[len(prefix):].partition("/")
    if not names.is_archive_name(archive) or rest != inner:
        raise Refused(f"move {a!r} -> {b!r}: not the same file in an archive of its chain")


def _check_extends(current: Path, new: Path) -> None:
    try:
        new_list = json.loads(new.read_bytes())
    except ValueError:
        raise Refused(f"{new.name}: the staged checkpoint list is not JSON") from None
    if not isinstance(new_list, list) or not all(isinstance(x, str) for x in new_list):
        raise Refused(f"{new.name}: the staged checkpoint list is not a list of names")
    if not current.exists():
        return
    try:
        old = json.loads(current.read_bytes())
    except ValueError:
        return  # an unreadable list cannot be extended: the new one stands
    if not isinstance(old, list) or new_list[:len(old)] != old:
        raise Refused(f"{current.name}: the new checkpoint list {new_list} does not extend {old}")


def _replace_tpm(chain: Path, new: Path) -> None:
    current = chain / names.TPM_STATE
    if current.exists():
        os.rename(current, chain / f".{names.TPM_STATE}.replaced-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    os.rename(new, current)
