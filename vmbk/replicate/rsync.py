"""rsync as the copier of the local and ssh transports.

Every copy is one rsync run over an explicit file list (``--files-from``,
NUL-separated): the plan, not rsync, decides what goes, and one run is
one phase (`vmbk.replicate.files`), so the phases reach the replica in
order.  Safe writes: ``--partial-dir=.~tmp~ --delay-updates``: files
arrive in the hidden partial directory and are renamed into place
together at the end of the run, so a killed run leaves nothing under a
real name (its partial files are the basis of the next run's copy).  An
append-only far side refuses both options (rrsync ``-no-overwrite``); there
rsync's own temporary ``.<name>.XXXXXX`` beside the target is what a
killed run can leave, never a file under its name.

``-a`` keeps modification times (the planner and the next run read
them), modes (TPM state stays 0600) and, as root, owners.  The order of
the phases holds across a power cut on the far side because every file
of a phase is on disk before the next phase begins: over ssh rsync's
``--fsync`` on the far side, locally `vmbk.replicate.local.durable` after
each phase.
"""

from __future__ import annotations

import calendar
import re
import time
from collections.abc import Sequence
from pathlib import Path

from vmbk.replicate.files import Entry, Listing, replicable
from vmbk.replicate.transport import classify, need, nul_list, run_tool

PARTIAL_DIR = ".~tmp~"
#: I/O timeout: a far side that stops answering fails the run instead of hanging it.
TIMEOUT = 120
_ESCAPE = re.compile(r"\\#([0-7]{3})")


def unescape(name: str) -> str:
    """rsync writes a non-printable byte of a name as ``\\#ooo``."""
    return _ESCAPE.sub(lambda m: chr(int(m[1], 8)), name)


class Rsync:
    """rsync to ``root`` (a local path, or ``[user@]host:path`` with ``rsh``)."""

    def __init__(self, root: str, *, rsh: str | None, bwlimit_kbps: int, workdir: Path,
                 safe_writes: bool = True, ignore_existing: bool = False) -> None:
        self.root = root.rstrip("/") + "/"
        self.rsh = rsh
        self.bwlimit_kbps = bwlimit_kbps
        self.workdir = workdir
        self.safe_writes = safe_writes
        self.ignore_existing = ignore_existing
        self.exe = need("rsync")

    def _base(self, list_file: Path) -> list[str]:
        argv = [self.exe, "-a", "--from0", f"--files-from={list_file}", f"--timeout={TIMEOUT}"]
        if self.rsh:
            argv += ["-e", self.rsh]
        return argv

    def _list(self, name: str, rels: Sequence[str]) -> Path:
        path = self.workdir / name
        path.write_bytes(nul_list(rels))
        return path

    def _writes(self) -> list[str]:
        # the far side flushes each file (ssh: on its own disk, beside the
        # network); a local copy flushes its phase itself, after it (`local.durable`)
        argv = ["--fsync"] if self.rsh else []
        if self.safe_writes:
            argv += [f"--partial-dir={PARTIAL_DIR}", "--delay-updates"]
        if self.ignore_existing:
            argv.append("--ignore-existing")
        if self.bwlimit_kbps:
            argv.append(f"--bwlimit={self.bwlimit_kbps}")
        return argv

    def push(self, src_root: Path, rels: Sequence[str], *, what: str) -> list[str]:
        """Copy ``rels`` of ``src_root`` to the replica; the names rsync sent."""
        if not rels:
            return []
        lst = self._list("push.list", rels)
        r = run_tool([*self._base(lst), *self._writes(), "--out-format=%n", f"{src_root}/", self.root], what=what)
        return [unescape(n) for n in r.stdout.decode("utf-8", "surrogateescape").splitlines() if n and n[-1] != "/"]

    def pull(self, rels: Sequence[str], local_root: Path, *, what: str) -> None:
        if not rels:
            return
        lst = self._list("pull.list", rels)
        writes = [w for w in self._writes() if w != "--ignore-existing"]
        run_tool([*self._base(lst), *writes, self.root, f"{local_root}/"], what=what)

    def differing(self, local_root: Path, rels: Sequence[str], *, what: str) -> list[str]:
        """Files whose content (or size) differs between ``local_root`` and the
        replica, or that the replica lacks: rsync ``--checksum --dry-run``."""
        if not rels:
            return []
        lst = self._list("check.list", rels)
        r = run_tool([*self._base(lst), "--checksum", "--dry-run", "--out-format=%i %n", f"{local_root}/",
                      self.root], what=what)
        out = []
        for line in r.stdout.decode("utf-8", "surrogateescape").splitlines():
            flags, _, name = line.partition(" ")
            if len(flags) > 1 and flags[0] in "<>c" and flags[1] == "f":
                out.append(unescape(name))
        return sorted(out)

    def list_only(self, rel: str, *, what: str) -> Listing:
        """The replica's files below ``rel`` (rsync ``--list-only``: whole seconds)."""
        argv = [self.exe, "--list-only", "-r", "--no-h", "-8", f"--timeout={TIMEOUT}"]
        if self.rsh:
            argv += ["-e", self.rsh]
        prefix = rel.strip("/")
        r = run_tool([*argv, self.root + (prefix + "/" if prefix else "")], what=what, env={"TZ": "UTC"},
                     ok=(0, 23))
        out: Listing = {}
        if r.returncode == 23:
            if prefix and b"No such file or directory" in r.stderr:
                return out  # nothing of that VM there
            raise classify(what, self.exe, r.returncode, r.stderr.decode("utf-8", "replace"))
        for line in r.stdout.decode("utf-8", "surrogateescape").splitlines():
            parts = line.split(None, 4)
            if len(parts) < 5 or not parts[0].startswith("-"):
                continue
            name = unescape(parts[4])
            path = f"{prefix}/{name}" if prefix else name
            if not replicable(path):
                continue
            stamp = time.strptime(f"{parts[2]} {parts[3]}", "%Y/%m/%d %H:%M:%S")
            out[path] = Entry(int(parts[1].replace(",", "")), float(calendar.timegm(stamp)))
        return out
