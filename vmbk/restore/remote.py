"""A restore onto another host (``--connect qemu+ssh://...``): its files written there over ssh.

The backup tree is here (the backup server); the VM is defined on the
host libvirt's URI names, and every file the restore writes -- the disk
images, a clone's NVRAM, the domain XML, the NVRAM saved aside, the TPM
state -- is written on that host through its control master
(`vmbk.virt.remote`, `vmbk.virt.hostfiles.RemoteFiles`), never at a
local path of the same name.

**How an image gets there: written here, streamed as it is written.**
The restore's qcow2 writer (`vmbk.restore.qcow2`) lays the image out
going up the file -- data clusters in disk order, each L2 table after the
data it maps, then the L1 table and the refcounts -- and writes only the
header last, at offset 0.  So the image is one stream: a zero cluster in
the header's place, then every write as it comes, into ``cat >
<target>.partial`` on the host over the master; then the header is put
in with ``dd conv=notrunc,fsync`` and ``qemu-img check`` runs there.  One
pass over the data, no scratch space on either side, and the image is
byte for byte what a local restore writes (same writer, same options,
the ``.chksum`` and manifest digests checked alongside as locally).  The
other way the issue names, an NBD export on the host (``qemu-img create``
+ ``qemu-nbd`` there, vmbk's client through a forwarded socket), makes
every write a request that waits for its reply through ssh, and QEMU's
qcow2 driver allocates cluster by cluster: through qemu-nbd even a local
restore capped near 280 MB/s (docs/architecture.md, "Restore writes
qcow2 itself"), and it needs a qemu-nbd to clean up on the host when the
connection drops.

**Order and failure** (as `vmbk.restore.run`, on the host):

1. the preflight there: files that exist (``--force``), free space per
   file system (``df``), the directories made (0755, QEMU must reach the
   images);
2. every image, the NVRAM and the XML as ``<file>.partial``; an image has
   no qcow2 header until all its data is there, so a ``.partial`` cut
   short (ssh dropped, vmbk killed) is not even a qcow2 to anything that
   looks;
3. on any failure the ``.partial`` files are removed there (over a new
   master: the dropped one is replaced); when the host cannot be reached
   any more they stay, named ``.partial`` and headerless, and the error
   says which;
4. commit: one command renames every ``.partial`` and syncs the
   directories; then the VM is defined (libvirt's own connection), its
   TPM state put in place (a tar stream into ``<uuid>/.tpm2.partial``,
   renamed, the host's ``swtpm_user`` owning it) and the pool refreshed.

Nothing is defined before the commit, so a restore that fails before it
leaves the host's libvirt as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import io
import logging
import os
import posixpath
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vmbk.errors import StorageError, ToolError, VmbkError
from vmbk.restore import define, image, qcow2, tpm
from vmbk.restore.checker import SourceCheck
from vmbk.restore.preflight import HEADROOM, RestoreOptions, RestorePlan
from vmbk.restore.report import Outcome
from vmbk.stream.chainread import ChainImage
from vmbk.virt.hostfiles import RemoteFiles
from vmbk.virt.remote import RemoteError

log = logging.getLogger("vmbk.restore")

#: Bytes handed to the ssh pipe at once, and the pipe's size (F_SETPIPE_SZ).
PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = 1031
_ZEROS = bytes(PIPE_SIZE)

_RECEIVE = 'umask 077; exec cat > "$1"'
_HEADER = 'dd of="$1" conv=notrunc,fsync status=none || exit 1; exec qemu-img check -q -f qcow2 -- "$1"'
_PUT = 'umask 077; cat > "$1" && exec sync -- "$1"'
_MKDIRS = 'for d; do [ -d "$d" ] || mkdir -p -m 0755 -- "$d" || exit 1; done'
_EXISTING_DIRS = 'for p; do if [ -d "$p" ]; then printf "%s\\0" "$p"; fi; done'
# per directory: the mount point and the KiB free there (of its nearest existing parent)
_FREE = r"""
for p; do
  while [ ! -e "$p" ]; do p=$(dirname -- "$p"); done
  df -Pk -- "$p" | awk 'NR == 2 { print $6, $4 }' || exit 1
done
"""
_ASIDE = 'stamp=$1; shift; for p; do if [ -f "$p" ]; then cp -p -- "$p" "$p.before-restore.$stamp" || exit 1; ' \
         'printf "%s\\0" "$p.before-restore.$stamp"; fi; done'
_DISCARD = 'for p; do case "$p" in *.partial) rm -f -- "$p";; esac; done'
# pairs PARTIAL FINAL, then --, then the directories to sync
_COMMIT = r"""
while [ "$1" != -- ]; do mv -f -- "$1" "$2" || exit 1; shift 2; done
shift
[ $# -eq 0 ] || exec sync -- "$@"
"""
# TPM state (tar on stdin) into $1/tpm2, the host's swtpm user owning it (vmbk.restore.tpm, there)
_TPM = r"""
d=$1 stamp=$2
conf=/etc/libvirt/qemu.conf
val() { sed -n "s/^[[:space:]]*$1[[:space:]]*=[[:space:]]*\"\([^\"]*\)\".*/\1/p" "$conf" 2>/dev/null | tail -n 1; }
u=$(val swtpm_user); u=${u:-tss}; g=$(val swtpm_group); g=${g:-tss}
id -u "$u" >/dev/null 2>&1 || u=root
getent group "$g" >/dev/null 2>&1 || g=root
mkdir -p -m 0711 -- "$(dirname -- "$d")" && { [ -d "$d" ] || mkdir -m 0711 -- "$d"; } && chmod 0711 -- "$d" || exit 1
s="$d/.tpm2.partial"
rm -rf -- "$s"
trap 'rm -rf -- "$s"' EXIT
umask 077
mkdir -m 0700 -- "$s" && tar -C "$s" --no-same-owner -xf - || exit 1
find "$s" -type d -exec chmod 0700 {} + && find "$s" -type f -exec chmod 0600 {} + && chown -R "$u:$g" -- "$s" || exit 1
aside=
if [ -e "$d/tpm2" ] || [ -L "$d/tpm2" ]; then aside="$d/tpm2.pre-restore-$stamp"; mv -- "$d/tpm2" "$aside" || exit 1; fi
mv -- "$s" "$d/tpm2" || exit 1
trap - EXIT
sync -- "$d"
printf '%s' "$aside"
"""


class ImageStream:
    """A ``pwrite`` target that is a file on the host: writes must go up the file, bar one at 0 (the header).

    Gaps are sent as zeroes; the write at offset 0 is held and put in
    place by `finish`, after everything else arrived.
    """

    def __init__(self, files: RemoteFiles, path: str) -> None:
        self.files = files
        self.path = path
        self.pos = 0
        self.header: bytes | None = None
        self._errors = tempfile.TemporaryFile()
        self.proc = files.remote.popen(["sh", "-c", _RECEIVE, "vmbk", path], stdin=subprocess.PIPE,
                                       stdout=subprocess.DEVNULL, stderr=self._errors)
        assert self.proc.stdin is not None
        self._fd = self.proc.stdin.fileno()
        with contextlib.suppress(OSError):
            fcntl.fcntl(self._fd, _F_SETPIPE_SZ, PIPE_SIZE)

    def pwrite(self, data: memoryview, offset: int) -> None:
        if offset == 0 and self.pos > 0:
            self.header = bytes(data)
            return
        if offset < self.pos:
            raise ValueError(f"{self.path}: a write at {offset} below {self.pos} cannot be streamed")
        while self.pos < offset:
            self._send(memoryview(_ZEROS)[:min(PIPE_SIZE, offset - self.pos)])
        self._send(data)

    def _send(self, data: memoryview) -> None:
        view = data.cast("B") if data.format != "B" else data
        while view.nbytes:
            try:
                n = os.write(self._fd, view[:PIPE_SIZE])
            except BrokenPipeError:
                raise self._failed("the connection closed while the image was sent") from None
            view = view[n:]
            self.pos += n

    def _failed(self, what: str) -> RemoteError:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self._errors.seek(0)
        lines = [ln for ln in self._errors.read().decode("utf-8", "replace").splitlines() if ln.strip()]
        why = lines[-1] if lines else f"exit status {self.proc.returncode}"
        return RemoteError(f"{self.files.label}: writing {self.path}: {what} ({why})")

    def finish(self) -> None:
        """Close the stream, then write the header and check the image there."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            raise self._failed("the connection closed while the image was sent") from None
        if self.proc.wait() != 0:
            raise self._failed("the receiving end failed")
        if self.header is None:
            raise ValueError(f"{self.path}: no header was written")
        r = self.files.remote.script(_HEADER, self.path, input=self.header, ok=(0, 1, 2, 3))
        if r.returncode != 0:
            msg = r.stderr.decode("utf-8", "replace").strip().splitlines()
            raise StorageError(f"qemu-img check of the restored {posixpath.basename(self.path)} on "
                               f"{self.files.label} failed ({r.returncode}): {msg[-1] if msg else 'no message'}")

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        self._errors.close()


def build(job: image.DiskRestore, files: RemoteFiles, *, verify: bool = True) -> image.Built:
    """Write ``job.partial`` on the host: the merged chain as a checked qcow2 (not yet renamed)."""
    started = time.monotonic()
    checker = SourceCheck(job.sources, job.digests, tolerate=job.tolerate) if verify else None
    check = checker.raise_if_failed if checker is not None else None
    opts = qcow2.ImageOptions.parse(image.writable_options(job))
    out = ImageStream(files, str(job.partial))
    try:
        try:
            with ChainImage(job.sources) as img:
                writer = qcow2.Writer(-1, img.virtual_size, opts, pwrite=out.pwrite)
                for off, view in img.runs(opts.cluster_size, check=check):
                    writer.write(off, view)
                writer.finish()
        except Exception:
            if checker is not None:  # a corrupt stream: say what its checksum says
                checker.result()
            raise
        unchecked = tuple(checker.result()) if checker is not None else ()
        out.finish()
    except BaseException:
        if checker is not None:
            checker.stop()
        out.abort()
        raise
    finally:
        out.close()
    return image.Built(job.disk, time.monotonic() - started, job.data_bytes, unchecked)


def check_existing(plan: RestorePlan, files: RemoteFiles, *, force: bool) -> None:
    """`vmbk.restore.preflight.check_existing` on the host."""
    targets = [str(t) for t in plan.targets if t not in plan.aside]
    there = files.existing([str(plan.restore_path), *targets])
    dirs = files.remote.script(_EXISTING_DIRS, *sorted(there)).stdout.split(b"\0") if there else []
    is_dir = {d.decode() for d in dirs if d}
    if str(plan.restore_path) in there and str(plan.restore_path) not in is_dir:
        raise StorageError(f"--restore-path {plan.restore_path} on {files.label} exists and is not a directory")
    for target in targets:
        if target in is_dir:
            raise StorageError(f"{target} on {files.label} is a directory")
        if target in there and not force:
            raise StorageError(f"{target} exists on {files.label}: --force overwrites it")


def free_space(plan: RestorePlan, files: RemoteFiles) -> dict[str, tuple[str, int]]:
    """Directory -> (its file system's mount point there, bytes free)."""
    dirs = sorted({str(d) for d in (plan.needed or {plan.restore_path: 0})} | {str(plan.restore_path)})
    r = files.remote.script(_FREE, *dirs)
    lines = r.stdout.decode("utf-8", "replace").splitlines()
    if len(lines) != len(dirs):
        raise RemoteError(f"{files.label}: df gave {len(lines)} answers for {len(dirs)} directories")
    out = {}
    for d, line in zip(dirs, lines, strict=True):
        mount, _, free = line.rpartition(" ")
        out[d] = (mount, int(free) * 1024)
    return out


def check_space(plan: RestorePlan, free: dict[str, tuple[str, int]], label: str) -> None:
    """StorageError (4) when a file system of the host lacks the bytes it gets, plus 10 %."""
    per_fs: dict[str, tuple[str, int, int]] = {}
    for d, n in (plan.needed or {plan.restore_path: plan.needed_bytes}).items():
        mount, avail = free[str(d)]
        _, total, _ = per_fs.get(mount, (str(d), 0, avail))
        per_fs[mount] = (str(d), total + n, avail)
    for where, needed, avail in per_fs.values():
        if avail < int(needed * HEADROOM):
            raise StorageError(f"insufficient space on {label}: the restore needs {needed >> 20} MiB plus 10 % "
                               f"headroom but only {avail >> 20} MiB is available for {where}")


def on_host(plan: RestorePlan, files: RemoteFiles, *, force: bool) -> RestorePlan:
    """Step 1 without writing: qemu-img there, the files that exist, the free space; the plan with the host's."""
    check_tool(files)
    check_existing(plan, files, force=force)
    free = free_space(plan, files)
    check_space(plan, free, files.label)
    return dataclasses.replace(plan, free_bytes=free[str(plan.restore_path)][1], host=files.remote.target.host)


def execute(plan: RestorePlan, conn: Any, opts: RestoreOptions, replace: bool, xml: str, warnings: list[str],
            files: RemoteFiles) -> Outcome:
    """Steps 2-4: write, (undefine the namesake), commit, define."""
    out = Outcome(warnings=list(warnings))
    partials = write_files(plan, files, xml if opts.defines else None, out, opts.verify)
    if replace:
        try:
            define.undefine(conn, plan.name, keep_state=plan.mode == "dr")
        except BaseException:
            discard(files, partials)
            raise
    commit(files, partials)
    if opts.defines:
        out.domain = define.define(conn, xml, plan.name, kept=f"on {files.label} in {plan.restore_path} "
                                                              f"(virsh define {plan.xml_target} there)")
    return out


def write_files(plan: RestorePlan, files: RemoteFiles, xml: str | None, out: Outcome, verify: bool) -> list[str]:
    """Step 2: every file as ``.partial`` there; returns the partials, in commit order.

    On any failure what was written is removed (`discard`) and the error raised.
    """
    partials: list[str] = []
    try:
        dirs = {str(plan.restore_path)} | {str(j.target.parent) for j in plan.jobs}
        if plan.nvram_target is not None:
            dirs.add(str(plan.nvram_target.parent))
        files.remote.script(_MKDIRS, *sorted(dirs))
        for job in plan.jobs:
            partials.append(str(job.partial))
            built = build(job, files, verify=verify)
            out.built.append(built)
            out.unchecked += [p for p in built.unchecked if p not in out.unchecked]
        if plan.nvram_source is not None and plan.nvram_target is not None:
            partials.append(str(plan.nvram_target) + ".partial")
            files.remote.script(_PUT, partials[-1], input=plan.nvram_source.read_bytes())
        if xml is not None and plan.xml_target is not None:
            partials.append(str(plan.xml_target) + ".partial")
            files.remote.script(_PUT, partials[-1], input=xml.encode())
        if plan.aside:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            r = files.remote.script(_ASIDE, stamp, *(str(p) for p in plan.aside))
            out.saved = [Path(p.decode()) for p in r.stdout.split(b"\0") if p]
    except BaseException as e:
        discard(files, partials)
        if isinstance(e, OSError):
            raise StorageError(f"{e.filename or plan.restore_path}: {e.strerror or e}") from None
        raise
    return partials


def discard(files: RemoteFiles, partials: Sequence[str]) -> None:
    """Remove ``.partial`` files there; when the host cannot be reached, say which stay."""
    if not partials:
        return
    try:
        files.remote.script(_DISCARD, *partials, timeout=60)
    except (VmbkError, OSError, subprocess.SubprocessError) as e:
        log.warning("%s: left there, not yet complete (no qcow2 header): %s (%s)", files.label,
                    ", ".join(partials), e)


def commit(files: RemoteFiles, partials: Sequence[str]) -> None:
    """Step 4: rename every ``.partial`` to its final name in one command, then sync."""
    pairs = [x for p in partials for x in (p, p.removesuffix(".partial"))]
    dirs = sorted({posixpath.dirname(p) for p in partials})
    try:
        files.remote.script(_COMMIT, *pairs, "--", *dirs)
    except RemoteError as e:
        discard(files, partials)
        raise StorageError(f"renaming the restored files on {files.label}: {e}") from None


def put_tpm(files: RemoteFiles, source: Path, uuid: str) -> tuple[Path, Path | None]:
    """TPM state into ``/var/lib/libvirt/swtpm/<uuid>/tpm2`` there; (that path, where the old state went)."""
    uuid_dir = tpm.state_dir(uuid)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for p in sorted(source.rglob("*")):
            if p.is_file() and not p.is_symlink():
                tar.add(p, arcname=str(p.relative_to(source)), recursive=False)
    r = files.remote.script(_TPM, str(uuid_dir), str(int(time.time())), input=buf.getvalue())
    aside = r.stdout.decode().strip()
    return uuid_dir / "tpm2", Path(aside) if aside else None


def check_tool(files: RemoteFiles) -> None:
    """qemu-img must be there (the image is checked on the host)."""
    r = files.remote.script('command -v qemu-img >/dev/null 2>&1', ok=(0, 1))
    if r.returncode != 0:
        raise ToolError(f"{files.label}: qemu-img is not installed there (the restored images are checked with it)")
