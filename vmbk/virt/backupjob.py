"""libvirt pull-mode backup jobs and checkpoints.

A pull-mode job (``backupBegin``) makes QEMU export each disk over NBD on a
unix socket, frozen at the moment the job began (a scratch file holds the
old data of blocks the guest rewrites meanwhile).  Export names are the
disk targets (``vda``); an incremental job also offers the meta context
``qemu:dirty-bitmap:backup-<target>`` with the blocks changed since the
parent checkpoint.  The job ends with ``abortJob`` (that is how a pull
backup is finished, there is nothing to "complete").

Checkpoints are named ``virtnbdbackup.<N>`` like virtnbdbackup's, with the
previous one as parent; raw disks cannot carry bitmaps and are left out of
the checkpoint (they are still exported, in full).

QEMU runs as ``libvirt-qemu``: the socket and scratch directory must be
writable by it, hence `job_dir` (0711 parent, directory owned by the
QEMU user).
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import pwd
import shutil
import socket
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from vmbk.errors import VmError
from vmbk.virt.connection import LibvirtError, libvirt_module

log = logging.getLogger("vmbk.virt")

RUN_DIR = Path(os.environ.get("VMBK_RUN_DIR", "/var/tmp/vmbk"))
QEMU_USER = "libvirt-qemu"
#: Job directories of pull-mode backups (`clear_stale_job` knows vmbk's by it).
BACKUP_PREFIX = "backup-"


def checkpoint_xml(name: str, parent: str | None, disks: Sequence[str]) -> str:
    top = ET.Element("domaincheckpoint")
    ET.SubElement(top, "description").text = "vmbk backup checkpoint"
    ET.SubElement(top, "name").text = name
    if parent:
        ET.SubElement(ET.SubElement(top, "parent"), "name").text = parent
    dis = ET.SubElement(top, "disks")
    for target in disks:
        ET.SubElement(dis, "disk", {"name": target, "checkpoint": "bitmap"})
    return ET.tostring(top, encoding="unicode")


def backup_xml(socket: Path | None, disks: Sequence[str], skip: Sequence[str], scratch_dir: Path,
               incremental: str | None, tcp: tuple[str, int] | None = None, tls: bool = True) -> str:
    """The pull backup's XML: its NBD server on ``socket``, or ``tcp`` (name, port), with TLS or plain."""
    top = ET.Element("domainbackup", {"mode": "pull"})
    if incremental:
        ET.SubElement(top, "incremental").text = incremental
    if tcp is not None:
        ET.SubElement(top, "server", {"transport": "tcp", "tls": "yes" if tls else "no", "name": tcp[0],
                                      "port": str(tcp[1])})
    else:
        ET.SubElement(top, "server", {"transport": "unix", "socket": str(socket)})
    dis = ET.SubElement(top, "disks")
    for target in disks:
        d = ET.SubElement(dis, "disk", {"name": target, "backup": "yes", "type": "file"})
        ET.SubElement(d, "scratch", {"file": str(scratch_dir / f"scratch.{target}.qcow2")})
    for target in skip:
        ET.SubElement(dis, "disk", {"name": target, "backup": "no"})
    return ET.tostring(top, encoding="unicode")


#: Ports tried from a host's ``nbd_tls``/``nbd_tcp`` port on (one per backup job running there at once).
PORT_TRIES = 32
#: A job directory older than this whose socket nobody listens on is left
#: over by a run that was killed (SIGKILL skips the cleanup).
STALE_AFTER = 600.0


def _listening(sock: Path) -> bool:
    """Does a server accept on this unix socket?  Unsure counts as yes."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(str(sock))
        return True
    except (FileNotFoundError, ConnectionRefusedError):
        return False
    except OSError:
        return True
    finally:
        probe.close()


def sweep_stale_job_dirs(prefix: str, *, older_than: float = STALE_AFTER) -> list[Path]:
    """Remove ``RUN_DIR/<prefix>*`` directories of killed runs; return them.

    A live job's directory has its NBD server listening on ``nbd.sock``
    (libvirt's export, or qemu-nbd) from a second after it is made until
    it is removed; a new one is spared by its age.
    """
    gone = []
    now = time.time()
    for path in RUN_DIR.glob(f"{prefix}*"):
        try:
            if not path.is_dir() or now - path.stat().st_mtime < older_than or _listening(path / "nbd.sock"):
                continue
        except OSError:
            continue
        shutil.rmtree(path, ignore_errors=True)
        log.info("removed %s, left by a run that did not finish", path)
        gone.append(path)
    return gone


@contextlib.contextmanager
def job_dir(prefix: str = "job-") -> Iterator[Path]:
    """A private directory for a job's socket and scratch files, removed after."""
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    os.chmod(RUN_DIR, 0o711)
    sweep_stale_job_dirs(prefix)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=RUN_DIR))
    try:
        if os.geteuid() == 0:
            with contextlib.suppress(KeyError):
                qemu = pwd.getpwnam(QEMU_USER)
                os.chown(path, qemu.pw_uid, qemu.pw_gid)
        os.chmod(path, 0o700)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class BackupJob:
    """A running pull-mode backup job of one domain; aborted on exit."""

    def __init__(self, dom: Any, *, socket: Path | None, disks: Sequence[str], skip: Sequence[str] = (),
                 scratch_dir: Path, checkpoint: str | None, parent: str | None,
                 checkpoint_disks: Sequence[str] = (), tcp: tuple[str, int] | None = None,
                 tls: bool = True) -> None:
        self.dom = dom
        self.socket = socket
        #: NBD over TCP (name, first port): `begin` takes the first port QEMU can listen on.
        self.tcp = tcp
        self.tls = tls
        self.port = tcp[1] if tcp is not None else 0
        self._xml = (disks, skip, scratch_dir, parent if checkpoint else None)
        self.backup_xml = backup_xml(socket, *self._xml, tcp=tcp, tls=tls)
        self.checkpoint_xml = checkpoint_xml(checkpoint, parent, checkpoint_disks) if checkpoint else None
        self.checkpoint = checkpoint
        self.active = False

    def begin(self) -> None:
        libvirt = libvirt_module()
        tries = PORT_TRIES if self.tcp is not None else 1
        for i in range(tries):
            if self.tcp is not None:
                self.port = self.tcp[1] + i
                self.backup_xml = backup_xml(None, *self._xml, tcp=(self.tcp[0], self.port), tls=self.tls)
            try:
                self.dom.backupBegin(self.backup_xml, self.checkpoint_xml, 0)
                break
            except libvirt.libvirtError as e:
                # another job (vmbk's of another VM, virtnbdbackup's) listens there: the next port
                if i + 1 < tries and "in use" in (e.get_error_message() or ""):
                    continue
                raise LibvirtError(f"backupBegin failed: {e.get_error_message()}", vm=self.dom.name()) from None
        self.active = True

    def end(self, wait: float = 30.0) -> None:
        """Stop the job (a pull backup has no completion: abort ends it).

        libvirt ends the job a moment after ``abortJob`` returns (it stops
        the NBD server and removes the scratch files itself); waiting for
        that keeps the job directory until libvirt is done with it (else
        libvirtd warns "failed to remove scratch file": we were first), and
        a vmbk that has returned leaves no job for the next run to meet.
        """
        if not self.active:
            return
        libvirt = libvirt_module()
        self.active = False
        try:
            self.dom.abortJob()
        except libvirt.libvirtError as e:
            # The domain went away or the job already ended: nothing to stop.
            log.debug("%s: abortJob: %s", self.dom.name(), e.get_error_message())
            return
        deadline = time.monotonic() + wait
        try:
            while self.dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE:
                if time.monotonic() > deadline:
                    log.warning("%s: the backup job did not end within %g s of its abort", self.dom.name(), wait)
                    return
                time.sleep(0.02)
        except libvirt.libvirtError as e:
            log.debug("%s: jobInfo: %s", self.dom.name(), e.get_error_message())

    def __enter__(self) -> "BackupJob":
        return self

    def __exit__(self, *exc: object) -> None:
        self.end()


def clear_stale_job(dom: Any, *, wait: float = 30.0, files: Any = None) -> str | None:
    """End the backup job a vmbk that died (SIGKILL, OOM) left running.

    Call with the VM's lock held: then no live vmbk is backing the VM up,
    and a pull job whose NBD socket is in one of vmbk's job directories
    is left over.  libvirt keeps such a job (and QEMU its scratch file)
    until it is aborted, and refuses every new backup meanwhile, so
    without this every later run would fail.  Returns the socket of the
    job it ended, None when there was none.  Another kind of job, or a
    backup job of another tool (virtnbdbackup run by hand), is left
    alone: `VmError`, saying what runs.  ``files``: the host's files
    (`vmbk.virt.hostfiles`; None: this machine's): a remote host's job
    directories are under its own run directory, removed over ssh.
    """
    libvirt = libvirt_module()
    if not dom.isActive() or dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE:
        return None
    try:
        xml = dom.backupGetXMLDesc(0)
    except libvirt.libvirtError:
        raise VmError(f"VM {dom.name()!r} has a job running that is not a backup (virsh domjobinfo "
                      f"{dom.name()}): try again when it is done", vm=dom.name()) from None
    root = ET.fromstring(xml)
    server = root.find("server")
    sock = Path(server.get("socket", "")) if server is not None and server.get("socket") else None
    scratch = root.find("disks/disk/scratch")
    if sock is None and scratch is not None and scratch.get("file"):
        # NBD over TCP (TLS): the job is ours when its scratch files are in one of vmbk's job directories
        sock = Path(scratch.get("file", "")).parent / "nbd.sock"
    run_dir = Path(files.run_dir) if files is not None else RUN_DIR
    remote = files is not None and files.remote is not None
    ours = sock is not None and sock.parent.name.startswith(BACKUP_PREFIX) and (
        posixpath.normpath(sock.parent.parent) == posixpath.normpath(run_dir) if remote
        else sock.parent.parent.resolve() == run_dir.resolve())
    if sock is None or not ours:
        raise VmError(f"VM {dom.name()!r} is being backed up by another tool (NBD socket {sock}): "
                      f"try again when it is done, or end it with 'virsh domjobabort {dom.name()}'", vm=dom.name())
    log.warning("%s: ending the backup job a vmbk-backup that did not finish left running (%s)", dom.name(), sock)
    try:
        dom.abortJob()
    except libvirt.libvirtError as e:
        raise LibvirtError(f"cannot end the backup job left running: {e.get_error_message()}", vm=dom.name()) from None
    deadline = time.monotonic() + wait
    while dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE:
        if time.monotonic() > deadline:
            raise LibvirtError(f"the backup job left running did not end within {wait:g} s", vm=dom.name())
        time.sleep(0.05)
    if remote:
        files.remove_job_dir(str(sock.parent))
    else:
        shutil.rmtree(sock.parent, ignore_errors=True)
    return str(sock)


def delete_checkpoint(dom: Any, name: str, *, metadata_only: bool = False) -> None:
    """Remove a checkpoint (and its bitmaps unless ``metadata_only``)."""
    libvirt = libvirt_module()
    try:
        cp = dom.checkpointLookupByName(name)
    except libvirt.libvirtError:
        return
    flags = libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY if metadata_only else 0
    try:
        cp.delete(flags)
        return
    except libvirt.libvirtError as e:
        if metadata_only:
            raise LibvirtError(f"cannot delete checkpoint {name}: {e.get_error_message()}", vm=dom.name()) from None
        # Its bitmap is already gone ("not found in backing chain"): what is
        # left to delete is libvirt's record of it.
        log.warning("%s: deleting checkpoint %s: %s; removing its metadata only", dom.name(), name, e.get_error_message())
    try:
        cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
    except libvirt.libvirtError as e:
        raise LibvirtError(f"cannot delete checkpoint {name}: {e.get_error_message()}", vm=dom.name()) from None


class RedefineFailed(VmError):
    """Saved checkpoint XML could not be redefined: its bitmaps are gone."""


def redefine_checkpoint(dom: Any, xml: str) -> None:
    """Recreate checkpoint metadata from its saved XML.

    On a running VM, REDEFINE_VALIDATE makes libvirt check that QEMU has
    every bitmap the checkpoint names, so a redefined checkpoint is one an
    incremental can really use.
    """
    libvirt = libvirt_module()
    flags = libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
    if dom.isActive():
        flags |= libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE
    try:
        dom.checkpointCreateXML(xml, flags)
    except libvirt.libvirtError as e:
        raise RedefineFailed(f"cannot redefine checkpoint: {e.get_error_message()}", vm=dom.name()) from None

