"""``vmbk-restore --resume``: a restore point's disks, then its saved memory state.

Order (`vmbk.restore.run` calls these):

1. `single_use`, before the usual checks: the disks this would write were
   resumed from this very state before (the *ticket* beside the first
   disk says so) -- refused, whatever their state now, unless ``--force``
   restores them again;
2. `prepare`, after the usual checks, before anything is written: the
   point must have a usable state (`vmbk.tree.state`), and its state
   manifest must fit the domain XML that will be defined and this host
   (`vmbk.virt.memstate.mismatches`: architecture, page size, QEMU no
   older, machine type, domain type, CPU, memory, vCPUs, firmware,
   features, every guest-visible device); every mismatch is named and
   the restore refused (`StateError`: exit 5, kind ``state``), nothing
   written, nothing defined.  Then the state is decompressed beside the
   disks (a hidden ``.<name>.vmstate.partial``) while its SHA-256 and
   sizes are checked against the state manifest, and its header made
   final (libvirt's magic; a clone's name, UUID and MACs in its XML,
   which libvirt holds the XML it restores with against);
3. the restore writes the disks, defines the VM, puts NVRAM and TPM state
   back, as any restore;
4. `Resuming.resume`: the disks are stat'ed into the ticket
   (``<first disk>.vmbk-resume``: point, state digest, each disk's inode,
   size and mtime) and libvirt starts the domain from the image
   (``virDomainRestoreFlags``, running); the ticket then says
   ``resumed_at``.  The image goes in every case.

A state resumes only onto the disks restored with it from the same point
(single use, as OpenVMM's snapshots): the guest's RAM holds a page cache
and file-system state that match those disks at that instant and no
other.  One command restores both, so nothing else can pair them; the
ticket refuses a second resume over disks the first one's guest has
written to.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import lz4.frame

from vmbk.clock import now_iso
from vmbk.errors import StorageError
from vmbk.restore.preflight import RestoreOptions, RestorePlan
from vmbk.tree import state as tree_state
from vmbk.virt import memstate
from vmbk.virt.connection import libvirt_module
from vmbk.virt.memstate import StateError

log = logging.getLogger("vmbk.restore")

CHUNK = 4 << 20
TICKET_SUFFIX = ".vmbk-resume"


def ticket_path(plan: RestorePlan) -> Path:
    """The single-use ticket: beside the first disk the restore writes."""
    first = plan.jobs[0].target
    return first.with_name(first.name + TICKET_SUFFIX)


def _identity(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path), "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def single_use(plan: RestorePlan, opts: RestoreOptions) -> None:
    """Refuse to resume over disks that a state was already resumed on (module doc, 1)."""
    if opts.force or not plan.jobs:
        return
    path = ticket_path(plan)
    try:
        ticket = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return
    if not isinstance(ticket, dict) or not ticket.get("resumed_at"):
        return
    disks = [d for d in ticket.get("disks") or [] if isinstance(d, dict)]
    changed = []
    for d in disks:
        try:
            now = _identity(Path(str(d.get("path"))))
        except OSError:
            continue
        if now != d:
            changed.append(str(d.get("path")))
    state = "changed since (the guest ran on them)" if changed else "as the resumed guest left them"
    raise StateError(
        f"the memory state of {ticket.get('chain')} point {ticket.get('point')} was resumed on these disks at "
        f"{ticket.get('resumed_at')} and they are {state}: a state resumes once on the disks restored with it "
        f"(--force restores them again and resumes)", vm=plan.source.vm)


def state_of(plan: RestorePlan) -> tree_state.PointState:
    """The point's state; `StateError` when it has none that could resume."""
    point = plan.point
    st = tree_state.point_state(point.chain.path, point.ident)
    if st is None:
        raise StateError(f"restore point {point.index} of {point.chain.rel} has no memory state (backed up "
                         f"without --with-memory): restore it without --resume", vm=plan.source.vm)
    if not st.usable:
        raise StateError(f"the memory state of restore point {point.index} cannot resume: "
                         f"{'; '.join(st.problems)}", vm=plan.source.vm)
    return st


def check(plan: RestorePlan, conn: Any, xml: str) -> tuple[tree_state.PointState, list[str]]:
    """The point's state and why it cannot resume as ``xml`` on the host of ``conn`` (empty: it can)."""
    st = state_of(plan)
    assert st.manifest is not None
    want = memstate.domain_facts(xml)
    target = memstate.target_host(conn, want["arch"], want["type"], want["machine"])
    return st, memstate.mismatches(st.manifest.host, st.manifest.domain, xml, target)


@dataclasses.dataclass
class Resuming:
    """A state checked and unpacked, waiting for its disks (`prepare`)."""

    plan: RestorePlan
    state: tree_state.PointState
    image: Path
    xml: str
    seconds: float = 0.0

    def _defined_xml(self, conn: Any) -> str:
        """The defined VM's XML, and for a clone its identity put into the image's head.

        libvirt gave the clone its UUID when it was defined; the image's XML
        must say the same name, UUID and MACs (libvirt holds the XML it
        restores with against it), within the image's room for it.
        """
        libvirt = libvirt_module()
        xml = str(conn.lookupByName(self.plan.name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE |
                                                            libvirt.VIR_DOMAIN_XML_SECURE))
        if self.plan.mode == "clone":
            fd = os.open(self.image, os.O_RDWR | os.O_CLOEXEC)
            try:
                first = os.pread(fd, memstate.HEADER.size, 0)
                head = memstate.read_head(os.pread(fd, memstate.head_size(first), 0))
                os.pwrite(fd, memstate.image_head(head, memstate.same_identity(head.xml, xml)), 0)
            finally:
                os.close(fd)
        return xml

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.image.unlink()

    def resume(self, conn: Any) -> dict[str, Any]:
        """Start the restored, defined VM from the state (module doc, 4); the record's ``resumed``."""
        plan = self.plan
        ticket = ticket_path(plan)
        body: dict[str, Any] = {
            "vm": plan.source.vm, "name": plan.name, "chain": plan.point.chain.rel, "point": plan.point.index,
            "checkpoint": plan.point.checkpoint, "state_sha256": self.state.manifest.sha256 if self.state.manifest
            else None, "disks": [_identity(j.target) for j in plan.jobs], "resumed_at": None}
        _write_json(ticket, body)
        t0 = time.monotonic()
        try:
            xml = self._defined_xml(conn)
            dom = memstate.restore(conn, self.image, xml)
        finally:
            self.discard()
        seconds = time.monotonic() - t0
        body["resumed_at"] = now_iso()
        _write_json(ticket, body)
        log.info("%s: resumed from the memory state of point %d in %.2f s", plan.name, plan.point.index, seconds)
        return {"state": str(plan.point.chain.path / self.state.file), "image_size": self.state.manifest.image_size
                if self.state.manifest else None, "unpack_seconds": round(self.seconds, 3),
                "resume_seconds": round(seconds, 3), "ticket": str(ticket), "running": bool(dom.isActive())}


def _write_json(path: Path, body: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_bytes(json.dumps(body, indent=1).encode() + b"\n")
    os.replace(tmp, path)


def prepare(plan: RestorePlan, conn: Any, xml: str) -> Resuming:
    """Check the state against ``xml`` and this host, then unpack it (module doc, 2)."""
    if not xml:
        raise StateError("--resume needs a VM to define (disaster recovery or a clone)", vm=plan.source.vm)
    st, problems = check(plan, conn, xml)
    if problems:
        raise StateError(f"the memory state of restore point {plan.point.index} cannot resume as this VM on "
                         f"this host ({len(problems)} mismatch{'es' if len(problems) > 1 else ''}): " + "; ".join(problems), vm=plan.source.vm)
    assert st.manifest is not None
    image = plan.jobs[0].target.parent / f".{plan.name}.vmstate.partial"
    t0 = time.monotonic()
    try:
        from vmbk.restore.run import make_dirs  # the restore's own (QEMU must reach the images); run imports us

        make_dirs(image.parent)
        _unpack(plan.point.chain.path / st.file, st.manifest, image)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            image.unlink()
        if isinstance(e, OSError):
            raise StorageError(f"unpacking the memory state into {image.parent}: {e.strerror or e}",
                               vm=plan.source.vm) from None
        raise
    return Resuming(plan, st, image, xml, time.monotonic() - t0)


def _unpack(src: Path, manifest: tree_state.StateManifest, dst: Path) -> None:
    """Decompress the state into ``dst``, checking it against its manifest; its head made final."""
    sha = hashlib.sha256()
    stored = written = 0
    dec = lz4.frame.LZ4FrameDecompressor()
    fd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with open(src, "rb") as f:
            while chunk := f.read(CHUNK):
                sha.update(chunk)
                stored += len(chunk)
                try:
                    out = dec.decompress(chunk)
                except RuntimeError as e:
                    raise StateError(f"{src.name} is damaged: {e}") from None
                view = memoryview(out)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                written += len(out)
        if stored != manifest.size or sha.hexdigest() != manifest.sha256:
            raise StateError(f"{src.name} does not match its state manifest (size or SHA-256): damaged or replaced")
        if not dec.eof or written != manifest.image_size:
            raise StateError(f"{src.name} is cut short ({written} of {manifest.image_size} bytes)")
        first = os.pread(fd, memstate.HEADER.size, 0)
        head = memstate.read_head(os.pread(fd, memstate.head_size(first), 0))
        os.pwrite(fd, memstate.image_head(head), 0)  # libvirt's final magic: vmbk read the image before it
    finally:
        os.close(fd)
