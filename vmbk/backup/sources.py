"""Where a backup reads its disks from: a libvirt job or qemu-nbd.

Running VM: one pull-mode backup job exports every disk to back up; the
point in time is the moment of ``backupBegin``, taken while the guest is
quiesced (`vmbk.virt.quiesce`).

Shut-off VM: each disk is served read-only by its own ``qemu-nbd`` (it
takes the image's lock, so the VM cannot start and write meanwhile).

Remote host (``qemu+ssh://``, `vmbk.virt.hostfiles.RemoteFiles`): the job
directory, QEMU's NBD socket and ``qemu-nbd`` are on that host, and each
socket is reached through an ssh forward of the host's control master
(``-L LOCAL:REMOTE``, one ssh channel per NBD connection).  A remote
``qemu-nbd`` runs under a shell that ends it, and removes its directory,
when its ssh session ends (its stdin closes): vmbk killed, or the
connection lost, leaves no server holding the image's lock.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from vmbk.backup.memory import StateSave
from vmbk.errors import DependencyError, ToolError
from vmbk.nbd import Address
from vmbk.procs import reap
from vmbk.virt.backupjob import BACKUP_PREFIX, BackupJob, job_dir
from vmbk.virt.hostfiles import LOCAL, HostFiles, RemoteFiles, tls_context
from vmbk.virt.quiesce import quiesced

log = logging.getLogger("vmbk.backup")

QEMU_NBD_START_TIMEOUT = 30.0


@contextlib.contextmanager
def libvirt_export(
    dom: Any, *, disks: Sequence[str], skip: Sequence[str], checkpoint: str | None, parent: str | None,
    checkpoint_disks: Sequence[str], agent: bool, files: HostFiles = LOCAL, memory: StateSave | None = None,
) -> Iterator[tuple[dict[str, Address], str]]:
    """Start a pull backup job; yield ({target: address}, consistency).

    ``memory``: the guest's RAM and device state are saved while it is
    paused, before ``backupBegin`` fixes the disks' view (`vmbk.backup.memory`:
    libvirt cannot save a domain's memory while a backup job runs).
    """
    net = files.nbd_tcp
    with files.job_dir(BACKUP_PREFIX) as work, _claimed(Path(work), net is not None and files.remote is None):
        sock = Path(work) / "nbd.sock"
        tcp = (net.address or files.address, net.port) if net is not None else None
        job = BackupJob(dom, socket=None if tcp else sock, disks=disks, skip=skip, scratch_dir=Path(work),
                        checkpoint=checkpoint, parent=parent, checkpoint_disks=checkpoint_disks, tcp=tcp,
                        tls=net is not None and net.tls)
        with job:
            with quiesced(dom, agent=agent, memory=memory is not None) as consistency:
                if memory is not None:
                    memory.save(Path(work), consistency)
                job.begin()
            if memory is not None:
                memory.resumed()
            if net is not None and tcp is not None:  # NBD over TCP: the host's nbd_tls (TLS) or nbd_tcp (plain)
                ctx = tls_context(net) if net.tls else None
                yield {t: Address.tcp(tcp[0], job.port, t, tls=ctx) for t in disks}, consistency
                return
            with files.reach(str(sock)) as local:
                yield {t: Address.unix(str(local), t) for t in disks}, consistency


@contextlib.contextmanager
def _claimed(work: Path, claim: bool) -> Iterator[None]:
    """Listen on the job directory's ``nbd.sock`` while the job runs (a TCP job has no socket there).

    The sweep of job directories nobody listens on (`vmbk.virt.backupjob`)
    then leaves a live NBD-over-TLS job alone, and takes a killed one's.
    """
    if not claim:
        yield
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(work / "nbd.sock"))
        s.listen(1)
        yield


def _wait_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode("utf-8", "replace").strip() if proc.stderr else ""
            raise ToolError(f"qemu-nbd exited with {proc.returncode}: {err}")
        if path.exists():
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
                s.connect(str(path))
                return
        time.sleep(0.02)
    raise ToolError(f"qemu-nbd did not listen on {path} within {timeout:.0f} s")


# qemu-nbd on a remote host: its directory first (the caller forwards to
# $d/nbd.sock), then the server until stdin closes (vmbk done, killed, or
# the ssh connection lost), then both gone.
_REMOTE_QEMU_NBD = r"""
umask 077
mkdir -p "$1" && chmod 0711 "$1" || exit 1
d=$(mktemp -d "$1/copy-XXXXXXXX") || exit 1
shift
printf '%s\n' "$d"
qemu-nbd --socket="$d/nbd.sock" "$@" &
p=$!
cat >/dev/null
kill "$p" 2>/dev/null
wait "$p"
rm -rf -- "$d"
"""


@contextlib.contextmanager
def _remote_qemu_nbd(files: RemoteFiles, image: str, fmt: str, bitmap: str | None,
                     shared: int) -> Iterator[Address]:
    args = ["--read-only", "--persistent", f"--shared={shared}", f"--format={fmt}",
            "--cache=none" if fmt == "raw" else "--cache=writeback"]
    if bitmap:
        args.append(f"--bitmap={bitmap}")
    args += ["--", image]
    proc = files.remote.popen(["sh", "-c", _REMOTE_QEMU_NBD, "vmbk", files.run_dir, *args],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().strip()
        if not line.startswith(files.run_dir + "/"):
            err = proc.stderr.read().decode("utf-8", "replace").strip() if proc.stderr else ""
            raise ToolError(f"qemu-nbd on {files.label} did not start: {err or 'no directory'}")
        remote_sock = f"{line}/nbd.sock"
        with files.reach(remote_sock) as local:
            _wait_forward(local, proc, QEMU_NBD_START_TIMEOUT, files.label)
            yield Address.unix(str(local), "")
    finally:
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        reap(proc, 30)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def _wait_forward(local: Path, proc: subprocess.Popen[bytes], timeout: float, label: str) -> None:
    """Until an NBD server answers through the forward (a connection gets its greeting)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode("utf-8", "replace").strip() if proc.stderr else ""
            raise ToolError(f"qemu-nbd on {label} exited with {proc.returncode}: {err}")
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2.0)
            s.connect(str(local))
            if s.recv(8) == b"NBDMAGIC":
                return
        time.sleep(0.05)
    raise ToolError(f"qemu-nbd on {label} did not listen within {timeout:.0f} s")


@contextlib.contextmanager
def qemu_nbd_export(image: str, fmt: str, *, bitmap: str | None = None, shared: int = 4,
                    files: HostFiles = LOCAL) -> Iterator[Address]:
    """Serve ``image`` read-only on a private unix socket while in the block."""
    if isinstance(files, RemoteFiles):
        with _remote_qemu_nbd(files, image, fmt, bitmap, shared) as address:
            yield address
        return
    with job_dir("copy-") as work:
        sock = work / "nbd.sock"
        argv = ["qemu-nbd", "--read-only", "--persistent", f"--shared={shared}", f"--format={fmt}",
                f"--socket={sock}", "--cache=none" if fmt == "raw" else "--cache=writeback"]
        if bitmap:
            argv.append(f"--bitmap={bitmap}")
        argv += ["--", image]
        if shutil.which("qemu-nbd") is None:
            raise DependencyError("qemu-nbd is not installed (apt-get install qemu-utils)")
        # --persistent (the reader connects more than once) means qemu-nbd would
        # outlive a vmbk killed with SIGKILL, holding the image's lock: the VM
        # could not start.  setpriv (util-linux) makes it go with us.
        if shutil.which("setpriv"):
            argv = ["setpriv", "--pdeathsig", "TERM", "--", *argv]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _wait_socket(sock, proc, QEMU_NBD_START_TIMEOUT)
            yield Address.unix(str(sock), "")
        finally:
            proc.terminate()
            reap(proc, 10)
            if proc.stderr:
                proc.stderr.close()
