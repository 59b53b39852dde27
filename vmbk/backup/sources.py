"""Where a backup reads its disks from: a libvirt job or qemu-nbd.

Running VM: one pull-mode backup job exports every disk to back up; the
point in time is the moment of ``backupBegin``, taken while the guest is
quiesced (`vmbk.virt.quiesce`).

Shut-off VM: each disk is served read-only by its own ``qemu-nbd`` (it
takes the image's lock, so the VM cannot start and write meanwhile).
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

from vmbk.errors import DependencyError, ToolError
from vmbk.nbd import Address
from vmbk.virt.backupjob import BACKUP_PREFIX, BackupJob, job_dir
from vmbk.virt.quiesce import quiesced

log = logging.getLogger("vmbk.backup")

QEMU_NBD_START_TIMEOUT = 30.0


@contextlib.contextmanager
def libvirt_export(
    dom: Any, *, disks: Sequence[str], skip: Sequence[str], checkpoint: str | None, parent: str | None,
    checkpoint_disks: Sequence[str], agent: bool,
) -> Iterator[tuple[dict[str, Address], str]]:
    """Start a pull backup job; yield ({target: address}, consistency)."""
    with job_dir(BACKUP_PREFIX) as work:
        sock = work / "nbd.sock"
        job = BackupJob(dom, socket=sock, disks=disks, skip=skip, scratch_dir=work,
                        checkpoint=checkpoint, parent=parent, checkpoint_disks=checkpoint_disks)
        with job:
            with quiesced(dom, agent=agent) as consistency:
                job.begin()
            yield {t: Address.unix(str(sock), t) for t in disks}, consistency


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


@contextlib.contextmanager
def qemu_nbd_export(image: str, fmt: str, *, bitmap: str | None = None, shared: int = 4) -> Iterator[Address]:
    """Serve ``image`` read-only on a private unix socket while in the block."""
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
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stderr:
                proc.stderr.close()
