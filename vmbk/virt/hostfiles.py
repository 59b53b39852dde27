"""The files of the hypervisor host, wherever it is: here, or over ssh.

What a backup reads beside the disks' data (``qemu-img info`` of each
disk, NVRAM, swtpm state), the directory a pull backup's NBD socket goes
in, and reaching that socket: `LocalFiles` does it with the standard
library as before, `RemoteFiles` through the host's control master
(`vmbk.virt.remote`).  Callers hold one per host (`files_for`) and never
touch a path of the host themselves: on a backup server the VMs' paths
do not exist, and a same-named local file would be the wrong one.

Remote scripts are POSIX sh with coreutils, tar and qemu-img (what a
libvirt/QEMU host has); they get paths as ``$1``, never in their text.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import posixpath
import ssl
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson

from vmbk.errors import ConfigError, ToolError
from vmbk.settings import NbdTcp
from vmbk.virt import backupjob, qemuimg
from vmbk.virt.remote import REMOTE_RUN_DIR, Remote, RemoteError, ssh_target

log = logging.getLogger("vmbk.virt")

#: Biggest side file read from a host (NVRAM is 128 KiB-4 MiB).
MAX_FILE = 64 << 20
MISSING = 3

# A private directory for a job, owned by QEMU's user (libvirt-qemu on Debian,
# qemu elsewhere) so that QEMU can create its socket and scratch files there.
_MKJOB = r"""
umask 077
mkdir -p "$1" && chmod 0711 "$1" || exit 1
d=$(mktemp -d "$1/$2XXXXXXXX") || exit 1
if [ "$3" = qemu ]; then
  for u in libvirt-qemu qemu; do
    if id "$u" >/dev/null 2>&1; then chown "$u:" "$d" && break; fi
  done
fi
chmod 0700 "$d" && printf '%s\n' "$d"
"""
_READ = '[ -e "$1" ] || exit 3; exec cat -- "$1"'
_TREE = '[ -d "$1" ] || exit 3; exec tar -C "$1" -cf - .'
_DISK = r"""
stat -c %Y -- "$1" || exit 3
if [ -n "$2" ]; then exec qemu-img info --output=json --force-share -f "$2" -- "$1"
else exec qemu-img info --output=json --force-share -- "$1"; fi
"""
_EXISTING = 'for p; do if [ -e "$p" ]; then printf "%s\\0" "$p"; fi; done'
_RMJOB = 'case "$1" in "$2"/*-*) exec rm -rf -- "$1";; esac; exit 1'


class LocalFiles:
    """The host is this machine."""

    remote: Remote | None = None
    label = "localhost"
    address = "localhost"

    def __init__(self, nbd_tcp: NbdTcp | None = None) -> None:
        #: The pull backups' data path: NBD over TCP, with TLS or plain (None: the job's unix socket).
        self.nbd_tcp = nbd_tcp

    @property
    def run_dir(self) -> str:
        return str(backupjob.RUN_DIR)

    def read(self, path: str) -> bytes | None:
        try:
            with open(path, "rb") as f:
                return f.read(MAX_FILE)
        except FileNotFoundError:
            return None

    def disk_info(self, path: str, fmt: str | None) -> tuple[float, dict[str, Any]]:
        """(mtime, ``qemu-img info``) of a disk image; OSError, ToolError."""
        mtime = os.stat(path).st_mtime
        return mtime, qemuimg.info(path, fmt=fmt)

    def read_tree(self, path: str) -> dict[str, bytes] | None:
        """The files of a small directory (swtpm state) by relative path; None: no directory."""
        root = Path(path)
        if not root.is_dir():
            return None
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    def existing(self, paths: Iterable[str]) -> set[str]:
        """Which of ``paths`` exist on the host."""
        return {p for p in paths if os.path.exists(p)}

    @contextlib.contextmanager
    def job_dir(self, prefix: str, *, for_qemu: bool = True) -> Iterator[str]:
        with backupjob.job_dir(prefix) as d:
            yield str(d)

    @contextlib.contextmanager
    def reach(self, sock: str) -> Iterator[Path]:
        """A local path that connects to ``sock`` of the host: itself here."""
        yield Path(sock)

    def remove_job_dir(self, path: str) -> None:
        import shutil

        shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        pass


class RemoteFiles:
    """The host is reached over ssh (`Remote`)."""

    def __init__(self, remote: Remote, *, run_dir: str = REMOTE_RUN_DIR, nbd_tcp: NbdTcp | None = None) -> None:
        self.remote = remote
        self._run_dir = run_dir
        self.label = remote.target.label
        #: The host's name or address as the URI gives it (where an NBD over TCP export is reached).
        self.address = remote.target.host
        #: The pull backups' data path: NBD over TCP, with TLS or plain (None: a forward of the job's unix socket).
        self.nbd_tcp = nbd_tcp

    @property
    def run_dir(self) -> str:
        return self._run_dir

    def read(self, path: str) -> bytes | None:
        r = self.remote.script(_READ, path, ok=(0, MISSING))
        return None if r.returncode == MISSING else r.stdout[:MAX_FILE]

    def disk_info(self, path: str, fmt: str | None) -> tuple[float, dict[str, Any]]:
        try:
            r = self.remote.script(_DISK, path, fmt or "", ok=(0, 1, MISSING))
        except RemoteError as e:
            raise ToolError(f"qemu-img info {path} on {self.label}: {e}") from None
        if r.returncode == MISSING:
            raise FileNotFoundError(2, "No such file or directory (on the host)", path)
        head, _, body = r.stdout.partition(b"\n")
        if r.returncode != 0 or not head.strip().isdigit():
            msg = r.stderr.decode("utf-8", "replace").strip().splitlines()
            raise ToolError(f"qemu-img info {path} on {self.label}: {msg[-1] if msg else 'failed'}")
        data: dict[str, Any] = orjson.loads(body)
        return float(head), data

    def read_tree(self, path: str) -> dict[str, bytes] | None:
        r = self.remote.script(_TREE, path, ok=(0, MISSING))
        if r.returncode == MISSING:
            return None
        return untar(r.stdout)

    def existing(self, paths: Iterable[str]) -> set[str]:
        want = sorted(set(paths))
        if not want:
            return set()
        r = self.remote.script(_EXISTING, *want)
        return {p.decode() for p in r.stdout.split(b"\0") if p}

    @contextlib.contextmanager
    def job_dir(self, prefix: str, *, for_qemu: bool = True) -> Iterator[str]:
        """A private directory under the host's run directory, removed after."""
        r = self.remote.script(_MKJOB, self._run_dir, prefix, "qemu" if for_qemu else "")
        path = r.stdout.decode().strip()
        if not path.startswith(self._run_dir + "/"):
            raise RemoteError(f"{self.label}: cannot make a job directory under {self._run_dir}")
        try:
            yield path
        finally:
            self.remove_job_dir(path)

    def remove_job_dir(self, path: str) -> None:
        """Remove one of vmbk's job directories there (best effort: the next run sweeps)."""
        try:
            self.remote.script(_RMJOB, posixpath.normpath(path), self._run_dir, ok=(0, 1))
        except RemoteError as e:
            log.warning("%s: %s not removed (%s)", self.label, path, e)

    @contextlib.contextmanager
    def reach(self, sock: str) -> Iterator[Path]:
        """A local socket forwarded to ``sock`` on the host, for the block."""
        local_dir = Path(tempfile.mkdtemp(prefix="vmbk-fwd-"))
        os.chmod(local_dir, 0o700)
        local = local_dir / "nbd.sock"
        try:
            self.remote.forward(local, sock)
            yield local
        finally:
            self.remote.cancel(local, sock)
            with contextlib.suppress(OSError):
                os.rmdir(local_dir)

    def close(self) -> None:
        self.remote.close()


HostFiles = LocalFiles | RemoteFiles
LOCAL = LocalFiles()


def files_for(uri: str, *, nbd_tcp: NbdTcp | None = None) -> HostFiles:
    """The files of the host ``uri`` reaches (a new control master for a remote one)."""
    target = ssh_target(uri)
    if target is None:
        return LOCAL if nbd_tcp is None else LocalFiles(nbd_tcp)
    return RemoteFiles(Remote(target), nbd_tcp=nbd_tcp)


def tls_context(tls: NbdTcp) -> ssl.SSLContext:
    """The client's TLS context for a host's NBD over TLS: its CA, and vmbk's certificate when there is one.

    QEMU's names in ``tls.dir``: ``ca-cert.pem`` (required), ``client-cert.pem``
    and ``client-key.pem`` (libvirt's ``backup_tls_x509_verify``, on by
    default, makes QEMU refuse a client without one).
    """
    assert tls.dir is not None, "a plain TCP data path has no TLS context"
    d = Path(tls.dir)
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(d / "ca-cert.pem"))
        if (d / "client-cert.pem").exists():
            ctx.load_cert_chain(str(d / "client-cert.pem"), str(d / "client-key.pem"))
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"nbd_tls dir {d}: {e}") from None
    return ctx


def untar(data: bytes) -> dict[str, bytes]:
    """Regular files of a tar archive by relative path; nothing outside it, no links."""
    out: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            name = posixpath.normpath(member.name)
            if not member.isfile() or name.startswith(("/", "..")) or name == ".":
                continue
            f = tar.extractfile(member)
            if f is not None:
                out[name] = f.read()
    return dict(sorted(out.items()))
