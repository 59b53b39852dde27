"""The one interface of a replication transport, and running its tools.

vmbackup's transport contract (manual, "Transport Function Contract":
init, sync, verify, cleanup, free space) as one small class.  A transport
does what the plan (`vmbk.replicate.plan`) says, in the order it is
called, and nothing else: it never decides what to copy.

``space()``      reachable?  free and total bytes (None: not known);
``listing(vms)`` the replica's files (`vmbk.replicate.files.Listing`);
``send``         copy files from a local tree, phase after phase (each a
                 `Batch`: new files, and updates of files the replica
                 has), keeping modification times and modes, never
                 leaving a partial file under its name;
``move``         renames on the replica (a chain the source archived);
``remove``       delete files, then the directories they emptied;
``mismatches``   the files whose content differs between a local tree
                 and the replica (the checksum verify, and after a pull);
``fetch``        the other way: replica -> a local tree (pull).

The copying is rsync's and rclone's (`vmbk.replicate.rsync`,
`vmbk.replicate.rclone`); `run_tool` runs them so that they die with
vmbk (``setpriv --pdeathsig``: a killed vmbk-replicate leaves no copier
writing behind the next run's back) and turns their failures into the
exit-code table: unreachable or full -> storage (4), anything else ->
external tool (6), with the tool's exit status kept for the record.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

from vmbk.errors import DependencyError, StorageError, ToolError
from vmbk.replicate.files import Listing
from vmbk.settings import Replication

log = logging.getLogger("vmbk.replicate")

#: Phrases of ssh, rsync and rclone that mean the far side cannot be reached.
UNREACHABLE = (
    "connection refused", "connection reset", "connection timed out", "connection closed by", "no route to host",
    "could not resolve hostname", "name or service not known", "permission denied (publickey",
    "host key verification failed", "couldn't connect ssh", "handshake failed", "unable to authenticate",
    "connection unexpectedly closed", "network is unreachable", "failed to create file system",
    "timed out", "kex_exchange_identification", "remote host identification has changed",
)
FULL = ("no space left on device", "disk quota exceeded", "file too large", "quota exceeded")
#: Lines of a tool's error output kept in a message.
TAIL = 4


class ToolFailed(ToolError):
    """rsync or rclone failed; ``tool_exit`` is its exit status."""

    tool_exit: int | None = None


class Unreachable(StorageError):
    """The destination cannot be reached, or refuses us (storage, 4)."""

    tool_exit: int | None = None


class ReplicaFull(StorageError):
    tool_exit: int | None = None


Failure = ToolFailed | Unreachable | ReplicaFull


def failure(cls: type[ToolFailed | Unreachable | ReplicaFull], message: str, code: int | None) -> Failure:
    err = cls(message)
    err.tool_exit = code
    return err


@dataclasses.dataclass(frozen=True)
class Space:
    free: int | None = None
    total: int | None = None

    @property
    def known(self) -> bool:
        return self.free is not None


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise DependencyError(f"{tool} is not installed (scripts/setup-host installs it)")
    return path


def run_tool(argv: Sequence[str], *, what: str, input: bytes | None = None,
             env: Mapping[str, str] | None = None, ok: Sequence[int] = (0,)) -> subprocess.CompletedProcess[bytes]:
    """Run rsync/rclone/ssh; a failure is raised as `classify` says.

    The tool runs under ``setpriv --pdeathsig TERM``: when vmbk dies (kill
    -9 included) its copier is told to stop, and stops the way it stops on
    Ctrl-C, with its partial files where they belong.
    """
    full = ["setpriv", "--pdeathsig", "TERM", "--", *argv] if shutil.which("setpriv") else list(argv)
    merged = {**os.environ, "LC_ALL": "C", **(env or {})}
    started = time.monotonic()
    r = subprocess.run(full, input=input, stdin=None if input is not None else subprocess.DEVNULL,
                       capture_output=True, env=merged, check=False)
    log.debug("%.2f s, exit %d: %s", time.monotonic() - started, r.returncode, " ".join(argv))
    if r.returncode not in ok:
        raise classify(what, argv[0], r.returncode, r.stderr.decode("utf-8", "replace"))
    return r


def classify(what: str, tool: str, code: int, stderr: str) -> Failure:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    tail = "; ".join(lines[-TAIL:]) or f"exit status {code}"
    low = stderr.lower()
    if any(p in low for p in FULL):
        return failure(ReplicaFull, f"{what}: the destination is full: {tail}", code)
    if "has been disabled on this server" not in low and "is not allowed" not in low and (
            code == 255 or any(p in low for p in UNREACHABLE)):
        return failure(Unreachable, f"{what}: destination unreachable: {tail}", code)
    return failure(ToolFailed, f"{what}: {os.path.basename(tool)} failed (exit {code}): {tail}", code)


def nul_list(rels: Sequence[str]) -> bytes:
    """A ``--files-from``/``--files-from-raw`` list: NUL-separated for rsync's
    ``--from0`` (names are data: a newline in one must not split it)."""
    return b"".join(r.encode("utf-8", "surrogateescape") + b"\0" for r in rels)


def line_list(rels: Sequence[str]) -> bytes:
    """rclone's ``--files-from-raw``: one name a line (rclone has no NUL form)."""
    bad = [r for r in rels if "\n" in r or "\r" in r]
    if bad:
        raise failure(ToolFailed, f"rclone cannot copy file names with a line break: {bad[0]!r}", None)
    return b"".join(r.encode("utf-8", "surrogateescape") + b"\n" for r in rels)


#: One phase of a copy: (files the replica lacks, files it has in another version).
Batch = tuple[Sequence[str], Sequence[str]]


class Transport(abc.ABC):
    """One destination's transport; subclasses are local, ssh, append-only ssh and rclone."""

    kind: ClassVar[str]
    #: Seconds within which two modification times are the same (what the
    #: replica's listing can tell apart).
    tolerance: ClassVar[float] = 1.0
    #: The replica can be read back (pull, checksum verify).
    readable: ClassVar[bool] = True

    def __init__(self, dest: Replication, workdir: Path) -> None:
        self.dest = dest
        #: A private directory for file lists and staging (removed by the caller).
        self.workdir = workdir

    def where(self, rel: str = "") -> str:
        """The replica (or a path in it) as a person would type it."""
        base = self.dest.path.rstrip("/") or "/"
        return f"{base}/{rel}" if rel else base

    @abc.abstractmethod
    def space(self) -> Space: ...

    @abc.abstractmethod
    def listing(self, vms: Sequence[str] | None = None) -> Listing: ...

    @abc.abstractmethod
    def send(self, src_root: Path, phases: Sequence[Batch]) -> None:
        """Copy the phases' files, one phase after the other: none of a phase
        appears under its name before every file of the phases before it."""

    @abc.abstractmethod
    def move(self, moves: Sequence[tuple[str, str]]) -> None: ...

    @abc.abstractmethod
    def remove(self, rels: Sequence[str], dirs: Sequence[str]) -> None: ...

    @abc.abstractmethod
    def mismatches(self, local_root: Path, rels: Sequence[str]) -> list[str]: ...

    @abc.abstractmethod
    def fetch(self, rels: Sequence[str], local_root: Path) -> None: ...

    def secrets_allowed(self) -> tuple[bool, str]:
        """May TPM state and BitLocker keys go there, and why (the record says)."""
        return True, "kept 0600 on the replica"

    def close(self) -> None:
        """Release what the transport holds (connections); idempotent."""

    def list_file(self, name: str, data: bytes) -> Path:
        path = self.workdir / name
        path.write_bytes(data)
        return path
