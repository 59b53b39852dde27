"""NBD over plain TCP (``nbd_tcp = { address, port }`` of a host): the trusted-network data path.

libvirt's QEMU serves the pull backup on TCP without TLS
(``<server transport='tcp' tls='no'>``), as virtnbdbackup's remote mode
does; vmbk connects there instead of through an ssh-forwarded socket.
Full and incremental restore byte-exact, on the local host and on a
"remote" one (qemu+ssh on loopback) as the unprivileged user who cannot
read the disks; the export is gone with the job.
"""

from __future__ import annotations

import socket

import libvirt
import pytest
from backup_helpers import full_then_inc_restore_exact

MiB = 1 << 20


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.libvirt
def test_pull_backup_over_plain_tcp_restores_byte_exact(nos_domain, tmp_path, vm_workdir, monkeypatch):
    nd = nos_domain(1, size="64M", writes=[(0x63, 0, 4 * MiB), (0x64, 30 * MiB, MiB)])
    cfg = tmp_path / "etc"
    cfg.mkdir()
    port = _port()
    (cfg / "default.toml").write_text(f'hosts = [{{ name = "tcphost", uri = "qemu:///system", '
                                      f'nbd_tcp = {{ address = "127.0.0.1", port = {port} }} }}]\n')
    monkeypatch.setenv("VMBK_CONFIG_DIR", str(cfg))
    # a spy, not a double: which addresses the backup really reads (a unix socket would pass the restores too)
    from vmbk.backup import sources

    used: list[tuple[str | None, int | None, bool]] = []
    real = sources.Address.tcp

    def spy(host, port=10809, export="", *, tls=None):
        used.append((host, port, tls is not None))
        return real(host, port, export, tls=tls)

    monkeypatch.setattr(sources.Address, "tcp", staticmethod(spy))
    root = tmp_path / "backup"
    root.mkdir()
    full_then_inc_restore_exact(root, nd, vm_workdir, 0x75)
    assert used and all(u[0] == "127.0.0.1" and u[1] >= port and not u[2] for u in used), used
    assert nd.dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE
    assert not _listening(port), "the export outlived its job"


@pytest.mark.libvirt
def test_remote_host_over_plain_tcp_as_the_unprivileged_user(remote_host, nos_domain, vm_workdir):
    """qemu+ssh for libvirt and the host's files, plain NBD over TCP for the data."""
    from fixtures.remote import lock_out

    nd = nos_domain(1, size="64M", writes=[(0x73, 0, 3 * MiB), (0x74, 50 * MiB, MiB)])
    lock_out(nd.disks)
    work = remote_host.workdir("tcp")
    remote_host.config(work, f'hosts = [{{ name = "kvm", uri = "{remote_host.uri}", nbd_tcp = {{ '
                             f'address = "127.0.0.1", port = {_port()} }} }}]\n')
    remote_host.full_backup_restores_exact(work, nd.name, nd.disks[0], vm_workdir)
