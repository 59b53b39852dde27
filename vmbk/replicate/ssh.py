"""The ``ssh`` transport: rsync over ssh to ``[user@]host:path``.

ssh runs with the destination's key only (``-i``, ``IdentitiesOnly``) and
``BatchMode``: no password is ever asked for, let alone put on a command
line; ``StrictHostKeyChecking`` is the destination's setting (``yes`` by
default: an unknown or changed host key fails the destination).
``ConnectTimeout`` and ``ServerAlive*`` make a host that vanishes mid-run
fail the run within a minute instead of hanging it.

Listing is rsync's ``--list-only`` (whole seconds); renames, deletions and
the free space are a short POSIX ``sh`` script read by the far side from
standard input, so no file name ever passes through a command line or a
remote shell's word splitting.

A run opens a dozen connections (listing, space, four phases per VM, the
verify): one master connection (``ControlMaster``, its socket in a private
directory) carries them all, so only the first pays the key exchange --
measured: 0.3-0.5 s each on a busy 2-core machine.  Without the master (it
could not start) ssh connects directly, as before.

With AES instructions in the CPU, AES-GCM goes first in ssh's cipher list
(the rest of the list stays, for a server without it): a copy is one ssh
connection's cipher, and on a 2-core host with AES-NI the 3 GiB of
bench/replicate.py took 6.1-6.5 s through rsync over aes128-gcm against
8.7-10.2 s over OpenSSH's default chacha20-poly1305.
"""

from __future__ import annotations

import contextlib
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from vmbk.replicate import files
from vmbk.replicate.rsync import PARTIAL_DIR, Rsync
from vmbk.replicate.transport import (
    Batch,
    Space,
    ToolFailed,
    Transport,
    Unreachable,
    failure,
    need,
    run_tool,
)
from vmbk.settings import Replication
from vmbk.virt.remote import AES_GCM, aes_gcm_first

#: Exit statuses of the far-side scripts.
_MISSING, _READONLY = 3, 4


def ssh_command(dest: Replication, control: Path | None = None) -> list[str]:
    """``ssh`` and its options, without the host (rsync's ``-e`` adds it);
    ``control``: the master connection's socket, used when it is there."""
    argv = [need("ssh"), "-o", "BatchMode=yes", "-o", f"StrictHostKeyChecking={dest.strict_host_key_checking}",
            "-o", "ConnectTimeout=15", "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]
    if dest.port:
        argv += ["-p", str(dest.port)]
    if dest.ssh_key:
        argv += ["-i", dest.ssh_key, "-o", "IdentitiesOnly=yes"]
    if dest.known_hosts:
        argv += ["-o", f'UserKnownHostsFile="{dest.known_hosts}"']
    if control is not None:
        argv += ["-o", "ControlMaster=no", "-o", f"ControlPath={control}"]
    if aes_gcm_first():
        argv += ["-o", f"Ciphers=^{AES_GCM}"]
    return argv


def target(dest: Replication) -> str:
    return f"{dest.user}@{dest.host}" if dest.user else str(dest.host)


class SshTransport(Transport):
    kind = "ssh"

    def __init__(self, dest: Replication, workdir: Path, *, safe_writes: bool = True,
                 ignore_existing: bool = False) -> None:
        super().__init__(dest, workdir)
        self._control_dir = Path(tempfile.mkdtemp(prefix="vmbk-ssh-"))  # short: a socket path has ~100 bytes
        self.control = self._control_dir / "master"
        self._master: subprocess.Popen[bytes] | None = None
        self.ssh = ssh_command(dest, self.control)
        self.host = target(dest)
        self.rsync = Rsync(f"{self.host}:{dest.path}", rsh=shlex.join(self.ssh), bwlimit_kbps=dest.bwlimit_kbps,
                           workdir=workdir, safe_writes=safe_writes, ignore_existing=ignore_existing)

    def where(self, rel: str = "") -> str:
        return f"{self.host}:{super().where(rel)}"

    def connect(self) -> None:
        """Start the master connection (once); the commands after share it."""
        if self._master is not None:
            return
        argv = [*ssh_command(self.dest), "-M", "-N", "-o", "ControlPersist=no", "-S", str(self.control), self.host]
        if shutil.which("setpriv"):
            argv = ["setpriv", "--pdeathsig", "TERM", "--", *argv]
        self._master = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not self.control.exists() and self._master.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)

    def close(self) -> None:
        if self._master is not None and self._master.poll() is None:
            self._master.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._master.wait(10)
            if self._master.poll() is None:
                self._master.kill()
                self._master.wait()
        shutil.rmtree(self._control_dir, ignore_errors=True)

    def remote(self, command: str, script: bytes, *, what: str, ok: Sequence[int] = (0,)) -> bytes:
        """Run ``command`` on the far side with ``script`` on its standard input."""
        self.connect()
        return run_tool([*self.ssh, self.host, command], input=script, what=what, ok=ok).stdout

    def _sh(self, lines: Sequence[str], *, what: str) -> bytes:
        script = "\n".join([f"cd -- {shlex.quote(self.dest.path)} || exit {_MISSING}", *lines, ""])
        return self.remote("sh -s", script.encode("utf-8", "surrogateescape"), what=what)

    def space(self) -> Space:
        what = f"space on {self.where()}"
        try:
            out = self._sh([f"test -w . || exit {_READONLY}", "df -Pk . | tail -n 1"], what=what)
        except ToolFailed as e:
            if e.tool_exit == _MISSING:
                raise failure(Unreachable, f"{self.where()} does not exist", e.tool_exit) from None
            if e.tool_exit == _READONLY:
                raise failure(Unreachable, f"{self.where()} is not writable", e.tool_exit) from None
            raise
        fields = out.decode(errors="replace").split()
        try:
            return Space(int(fields[3]) * 1024, int(fields[1]) * 1024)
        except (IndexError, ValueError):
            return Space()

    def listing(self, vms: Sequence[str] | None = None) -> files.Listing:
        self.connect()
        out: files.Listing = {}
        for rel in [""] if vms is None else vms:
            out.update(self.rsync.list_only(rel, what=f"listing {self.where(rel)}"))
        return out

    def send(self, src_root: Path, phases: Sequence[Batch]) -> None:
        self.connect()
        for new, updates in phases:
            self.rsync.push(src_root, sorted({*new, *updates}), what=f"copy to {self.where()}")

    def move(self, moves: Sequence[tuple[str, str]]) -> None:
        q = shlex.quote
        lines = [f"mkdir -p -- {q(b.rsplit('/', 1)[0])} && {{ test ! -e {q(a)} || mv -f -- {q(a)} {q(b)}; }} || exit 1"
                 for a, b in moves]
        self._sh(lines, what=f"renames on {self.where()}")

    def remove(self, rels: Sequence[str], dirs: Sequence[str]) -> None:
        q = shlex.quote
        lines = [f"rm -f -- {q(r)} || exit 1" for r in rels]
        lines += [f"rm -rf -- {q(d + '/' + PARTIAL_DIR)}; rmdir -- {q(d)} 2>/dev/null" for d in dirs]
        self._sh([*lines, "exit 0"], what=f"deletions on {self.where()}")

    def mismatches(self, local_root: Path, rels: Sequence[str]) -> list[str]:
        self.connect()
        return self.rsync.differing(local_root, rels, what=f"checksums against {self.where()}")

    def fetch(self, rels: Sequence[str], local_root: Path) -> None:
        self.connect()
        self.rsync.pull(rels, local_root, what=f"copy from {self.where()}")
