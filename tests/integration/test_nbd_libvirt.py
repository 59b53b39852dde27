"""vmbk's NBD engine against a live libvirt pull-mode backup export.

A no-OS domain with a qcow2 of known content: a full job (checkpoint 0)
must report exactly the allocated ranges; after writes made through QEMU's
own block layer (HMP ``qemu-io`` on the device's BlockBackend, so the
dirty bitmap sees them), an incremental job's
``qemu:dirty-bitmap:backup-vda`` context must report exactly those writes,
data and zeroes told apart, and the export must read back what was
written.
"""

from __future__ import annotations

import libvirt_qemu
import pytest

from vmbk.nbd import Address, Reader
from vmbk.virt.backupjob import BackupJob, job_dir

pytestmark = pytest.mark.libvirt

MiB = 1 << 20
K64 = 64 * 1024
VDA_BACKEND = "/machine/peripheral/virtio-disk0/virtio-backend"


def hmp_qemu_io(dom, command: str) -> None:
    libvirt_qemu.qemuMonitorCommand(dom, f'qemu-io -d {VDA_BACKEND} "{command}"',
                                    libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)


def ranges(extents, *, zero: bool) -> list[tuple[int, int]]:
    return [(e.offset, e.length) for e in extents if e.dirty and e.zero == zero]


def test_full_then_incremental_export(nos_domain):
    nd = nos_domain(1, size="64M", writes=[(0x11, 0, MiB), (0x22, 8 * MiB, 2 * MiB)])
    dom = nd.dom
    with job_dir() as work:
        sock = work / "nbd.sock"
        with BackupJob(dom, socket=sock, disks=["vda"], scratch_dir=work, checkpoint="virtnbdbackup.0",
                       parent=None, checkpoint_disks=["vda"]) as job:
            job.begin()
            with Reader(Address.unix(str(sock), "vda")) as r:
                assert r.size == 64 * MiB
                data = [(e.offset, e.length) for e in r.extents() if not e.zero]
                assert data == [(0, MiB), (8 * MiB, 2 * MiB)]
                chunks = {c.offset: bytes(c.data) for c in r.read([(8 * MiB, K64)]) if c.data is not None}
                assert chunks[8 * MiB] == b"\x22" * K64

    hmp_qemu_io(dom, "write -P 0x33 4M 128k")
    hmp_qemu_io(dom, "write -z 8M 64k")
    hmp_qemu_io(dom, "write -P 0x44 20M 64k")

    with job_dir() as work:
        sock = work / "nbd.sock"
        with BackupJob(dom, socket=sock, disks=["vda"], scratch_dir=work, checkpoint="virtnbdbackup.1",
                       parent="virtnbdbackup.0", checkpoint_disks=["vda"]) as job:
            job.begin()
            with Reader(Address.unix(str(sock), "vda"), dirty_bitmap="backup-vda") as r:
                assert "qemu:dirty-bitmap:backup-vda" in r.contexts
                changed = list(r.changed_extents())
                assert ranges(changed, zero=False) == [(4 * MiB, 128 * 1024), (20 * MiB, K64)]
                assert ranges(changed, zero=True) == [(8 * MiB, K64)]
                # the incremental's walk: the bitmap alone on the second connection
                assert r.connections > 1 and r.bitmap_status() is not None
                assert list(r.dirty_extents()) == [e for e in changed if e.dirty]
                got = {c.offset: bytes(c.data) for c in r.read([(4 * MiB, K64), (20 * MiB, K64)]) if c.data}
                assert got == {4 * MiB: b"\x33" * K64, 20 * MiB: b"\x44" * K64}
    assert sorted(c.getName() for c in dom.listAllCheckpoints(0)) == ["virtnbdbackup.0", "virtnbdbackup.1"]
