"""The ``rclone`` transport: any remote of the user's rclone configuration.

sftp, s3, b2, crypt, local ...: rclone does the copying, ``rclone_config``
(``--config``) says which configuration file.  Modification times are
kept (``copy`` sets them where the backend can; the planner reads them
back with ``lsjson``, to the second).

Safe writes: rclone 1.60 (Debian 12) writes a file under its own name as
it uploads it (partial uploads came in 1.63), so a killed upload would
leave a truncated file that looks like the real one.  Every copy therefore
goes to a staging directory on the remote first, ``<path>/.vmbk-partial/``
(not a VM directory, so no listing ever sees it): all phases in one
upload, then moved into place phase after phase (``rclone move`` per VM
directory) -- a rename on sftp and local, a server-side copy where the
backend has no rename.  What a killed run
leaves is a half-filled staging directory; the next run uploads again.
Pulls stage the same way on the local side.

Deletions go ``.cpt`` first (one ``rclone delete`` per phase, since one
deletes in parallel); renames of a chain the source archived are
``rclone move`` of the chain's files into the archive.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from vmbk.replicate import files
from vmbk.replicate.transport import (
    Batch,
    Space,
    ToolFailed,
    Transport,
    line_list,
    need,
    run_tool,
)
from vmbk.settings import Replication

STAGING = ".vmbk-partial"
#: rclone exit status for "directory not found".
_NOT_FOUND = 3


class RcloneTransport(Transport):
    kind = "rclone"

    def __init__(self, dest: Replication, workdir: Path) -> None:
        super().__init__(dest, workdir)
        self.exe = need("rclone")
        remote = str(dest.remote)
        root = remote + dest.path if remote.endswith(":") else f"{remote.rstrip('/')}/{dest.path.lstrip('/')}"
        #: ``remote:path`` (``b2:vmbk``, ``sftp:/srv/vmbk``), no trailing slash.
        self.root = root if root.endswith((":", ":/")) else root.rstrip("/")
        self._lists = 0

    def where(self, rel: str = "") -> str:
        return self._path(rel)

    def _path(self, rel: str) -> str:
        if not rel:
            return self.root
        return f"{self.root}{rel}" if self.root.endswith((":", "/")) else f"{self.root}/{rel}"

    def _rclone(self, *args: str, what: str, rels: Sequence[str] | None = None,
                ok: Sequence[int] = (0,)) -> Any:
        argv = [self.exe, *args]
        if rels is not None:
            self._lists += 1
            lst = self.workdir / f"rclone-{self._lists}.list"
            lst.write_bytes(line_list(rels))
            argv.append(f"--files-from-raw={lst}")
        if self.dest.rclone_config:
            argv.append(f"--config={self.dest.rclone_config}")
        if self.dest.bwlimit_kbps:
            argv.append(f"--bwlimit={self.dest.bwlimit_kbps}k")
        argv += ["--retries=1", "--low-level-retries=3", "--contimeout=15s", "--timeout=60s", "--log-level=ERROR"]
        return run_tool(argv, what=what, ok=ok)

    def space(self) -> Space:
        try:
            r = self._rclone("about", self.root, "--json", what=f"space on {self.root}")
        except ToolFailed:
            return Space()  # the backend cannot tell (or the path is new)
        about = orjson.loads(r.stdout)
        return Space(about.get("free"), about.get("total"))

    def listing(self, vms: Sequence[str] | None = None) -> files.Listing:
        out: files.Listing = {}
        for rel in [""] if vms is None else vms:
            try:
                r = self._rclone("lsjson", "-R", "--files-only", "--no-mimetype", self._path(rel),
                                 what=f"listing {self._path(rel)}")
            except ToolFailed as e:
                if e.tool_exit == _NOT_FOUND:
                    continue
                raise
            for item in orjson.loads(r.stdout) or []:
                path = f"{rel}/{item['Path']}" if rel else item["Path"]
                if files.replicable(path):
                    out[path] = files.Entry(int(item["Size"]), _mtime(item["ModTime"]))
        return out

    def send(self, src_root: Path, phases: Sequence[Batch]) -> None:
        every = sorted({r for new, updates in phases for r in (*new, *updates)})
        if not every:
            return
        staging = self._path(STAGING)
        self._rclone("copy", f"{src_root}/", staging, "--no-traverse", "--no-check-dest", rels=every,
                     what=f"copy to {self.root}")
        # into place phase by phase, one top directory at a time (rclone
        # refuses to move from a directory into one that contains it)
        for new, updates in phases:
            tops: dict[str, list[str]] = {}
            for rel in sorted({*new, *updates}):
                top, _, inner = rel.partition("/")
                tops.setdefault(top, []).append(inner)
            for top, names in tops.items():
                self._rclone("move", f"{staging}/{top}", self._path(top), "--no-traverse", rels=names,
                             what=f"placing files in {self._path(top)}")

    def move(self, moves: Sequence[tuple[str, str]]) -> None:
        groups: dict[tuple[str, str], list[str]] = {}
        for a, b in moves:
            chain = files.chain_dir(a)
            inner = a[len(chain) + 1:]
            groups.setdefault((chain, b[: -len(inner) - 1]), []).append(inner)
        for (src, dst), names in groups.items():
            self._rclone("move", self._path(src), self._path(dst), "--no-traverse", rels=sorted(names),
                         what=f"renames on {self.root}")

    def remove(self, rels: Sequence[str], dirs: Sequence[str]) -> None:
        for p in reversed(files.PHASES):  # the .cpt first
            batch = [r for r in rels if files.phase(r) == p]
            if batch:
                self._rclone("delete", self.root, rels=batch, what=f"deletions on {self.root}")
        gone = set(dirs)
        for d in sorted(d for d in gone if d.rsplit("/", 1)[0] not in gone or "/" not in d):
            try:
                self._rclone("rmdirs", self._path(d), what=f"removing {self._path(d)}")
            except ToolFailed as e:
                if e.tool_exit != _NOT_FOUND:
                    raise

    def mismatches(self, local_root: Path, rels: Sequence[str]) -> list[str]:
        if not rels:
            return []
        crypt = self.remote_type() == "crypt"
        args = ["cryptcheck" if crypt else "check", f"{local_root}/", self.root, "--one-way", "--combined=-"]
        r = self._rclone(*args, rels=rels, ok=(0, 1), what=f"checksums against {self.root}")
        if not crypt and b"no common hash" in r.stderr.lower():
            r = self._rclone(*args, "--download", rels=rels, ok=(0, 1), what=f"checksums against {self.root}")
        out = []
        for line in r.stdout.decode("utf-8", "surrogateescape").splitlines():
            mark, _, name = line.partition(" ")
            if mark in ("*", "+", "!"):
                out.append(name)
        return sorted(out)

    def fetch(self, rels: Sequence[str], local_root: Path) -> None:
        if not rels:
            return
        staging = local_root / STAGING
        self._rclone("copy", self.root, str(staging), "--no-traverse", rels=list(rels),
                     what=f"copy from {self.root}")
        for rel in rels:
            dst = local_root / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / rel, dst)

    def remote_type(self) -> str | None:
        """The type of the remote (``crypt``, ``sftp``, ``s3`` ...) in rclone's configuration."""
        name = str(self.dest.remote).split(":", 1)[0]
        r = self._rclone("listremotes", "--long", what="rclone listremotes")
        for line in r.stdout.decode(errors="replace").splitlines():
            remote, _, kind = line.partition(":")
            if remote.strip() == name:
                return kind.strip() or None
        return None

    def secrets_allowed(self) -> tuple[bool, str]:
        if self.remote_type() == "crypt":
            return True, "copied to a crypt remote (encrypted)"
        if self.dest.replicate_secrets:
            return True, "copied: replicate_secrets is set for this destination"
        return False, "not copied: the remote is not a crypt remote and replicate_secrets is not set"


def _mtime(text: str) -> float:
    """rclone's ``ModTime`` (RFC 3339, up to nanoseconds) as seconds."""
    head, dot, rest = text.partition(".")
    if dot:
        digits = "".join(c for c in rest if c.isdigit())
        zone = rest[len(digits):]
        text = f"{head}.{digits[:6]}{zone}"
    return _dt.datetime.fromisoformat(text).timestamp()
