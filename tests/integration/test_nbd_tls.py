"""NBD over TCP with TLS (issue #17's second data path): vmbk.nbd against QEMU's TLS, then a libvirt pull backup.

1. The client's NBD_OPT_STARTTLS against ``qemu-nbd --tls-creds`` (QEMU's
   gnutls, x509, ``verify-peer``: the server wants a client certificate):
   several connections read every byte as ``qemu-img convert`` does; no
   client certificate, a CA that did not sign the server's, or a
   server that speaks no TLS are clean errors.
2. ``hosts = [{ uri = ..., nbd_tls = { dir, address, port } }]``: vmbk-backup
   has libvirt's QEMU serve the pull backup on TCP with TLS
   (``<server transport='tcp' tls='yes'>``), full and incremental restore
   byte-exact; a client without its certificate fails cleanly (the job
   ended, no checkpoint left).  libvirt takes the server's certificates
   from qemu.conf's ``backup_tls_x509_cert_dir``, by default
   ``default_tls_x509_cert_dir`` = /etc/pki/qemu, read when a job starts:
   the fixture puts the test CA's there (skipped when the directory
   exists and is not the fixture's, or qemu.conf names another), so the
   shared libvirtd needs no restart.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import libvirt
import pytest
from backup_helpers import full_then_inc_restore_exact, run_backup
from tls_helpers import certificates

from vmbk.errors import VmbkError
from vmbk.nbd import Address, Client, Reader
from vmbk.settings import NbdTcp
from vmbk.virt.hostfiles import tls_context

MiB = 1 << 20
PKI = Path("/etc/pki/qemu")
OURS = PKI / ".vmbk-test"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    return certificates(tmp_path)


@pytest.fixture
def tls_nbd(tmp_path: Path, certs: Path):
    """qemu-nbd serving a qcow2 with mixed data on 127.0.0.1 with TLS (client certificates required)."""
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "96M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 5M", "-c", "write -P 0x33 40M 3M",
                    "-c", "write -z 70M 2M", str(image)], check=True, capture_output=True)
    port = _port()
    pid = tmp_path / "qemu-nbd.pid"
    proc = subprocess.Popen(["qemu-nbd", "--bind=127.0.0.1", f"--port={port}", "--persistent", "--shared=8",
                             "--read-only", "-f", "qcow2", f"--pid-file={pid}", "--object",
                             f"tls-creds-x509,id=tls0,dir={certs},endpoint=server,verify-peer=on",
                             "--tls-creds=tls0", str(image)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while not (pid.exists() and pid.read_text().strip()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.01)
    raw = tmp_path / "disk.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
    yield port, raw
    proc.kill()
    proc.wait()


def test_reader_over_tls_reads_every_byte(tls_nbd, certs):
    port, raw = tls_nbd
    address = Address.tcp("127.0.0.1", port, tls=tls_context(NbdTcp(str(certs))))
    data = raw.read_bytes()
    with Client(address) as c:
        assert c.size == len(data)
        assert bytes(c.read(40 * MiB, 3 * MiB)) == data[40 * MiB:43 * MiB]
    with Reader(address, connections=4) as reader:
        assert reader.connections == 4
        image = bytearray(reader.size)
        for chunk in reader.read(reader.extents()):
            if chunk.data is not None:
                image[chunk.offset:chunk.offset + chunk.length] = chunk.data
    assert image == data


def test_refusals_are_clean_errors(tls_nbd, certs, tmp_path):
    port, raw = tls_nbd
    anonymous = tmp_path / "anonymous"
    anonymous.mkdir()
    shutil.copy(certs / "ca-cert.pem", anonymous / "ca-cert.pem")
    with pytest.raises(VmbkError):  # QEMU's verify-peer: no client certificate, no export
        with Client(Address.tcp("127.0.0.1", port, tls=tls_context(NbdTcp(str(anonymous))))) as c:
            c.read(0, 4096)
    other = certificates(tmp_path / "other")
    with pytest.raises(VmbkError, match="(?i)certificate"):  # a server our CA did not sign
        Client(Address.tcp("127.0.0.1", port, tls=tls_context(NbdTcp(str(other)))))
    plain_port = _port()  # TLS asked of a server that has none: refused before the export is named
    plain = subprocess.Popen(["qemu-nbd", "--bind=127.0.0.1", f"--port={plain_port}", "--persistent", "--read-only",
                              "-f", "raw", str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", plain_port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.02)
        with pytest.raises(VmbkError, match="TLS"):
            Client(Address.tcp("127.0.0.1", plain_port, tls=tls_context(NbdTcp(str(certs)))))
    finally:
        plain.kill()
        plain.wait()


def _libvirt_tls_dir() -> str | None:
    """The directory libvirt takes the backup server's certificates from (qemu.conf), default /etc/pki/qemu."""
    text = Path("/etc/libvirt/qemu.conf").read_text(errors="replace") if Path("/etc/libvirt/qemu.conf").exists() \
        else ""
    for key in ("backup_tls_x509_cert_dir", "default_tls_x509_cert_dir"):
        m = re.search(rf'^\s*{key}\s*=\s*"([^"]+)"', text, re.M)
        if m:
            return m.group(1)
    return str(PKI)


@pytest.fixture
def libvirt_pki(certs: Path):
    """The test CA's server certificate where libvirt's QEMU looks for it (see the module doc)."""
    if _libvirt_tls_dir() != str(PKI):
        pytest.skip(f"qemu.conf names its own TLS directory ({_libvirt_tls_dir()}): not replaced by a test")
    if PKI.exists() and not OURS.exists():
        pytest.skip(f"{PKI} exists and is not this test's: not replaced")
    shutil.rmtree(PKI, ignore_errors=True)
    made_parent = not PKI.parent.exists()
    PKI.mkdir(parents=True, mode=0o755)
    for d in (PKI.parent, PKI) if made_parent else (PKI,):
        d.chmod(0o755)  # whatever the umask (an in-process vmbk sets 027): QEMU's user reads it
    for name in ("ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem"):
        shutil.copy(certs / name, PKI / name)
        (PKI / name).chmod(0o644)
    (PKI / "server-key.pem").chmod(0o640)
    subprocess.run(["chgrp", "libvirt-qemu", str(PKI / "server-key.pem")], check=False, capture_output=True)
    OURS.write_text("made by tests/integration/test_nbd_tls.py; removed after\n")
    yield certs
    shutil.rmtree(PKI, ignore_errors=True)
    if made_parent:
        with contextlib.suppress(OSError):
            PKI.parent.rmdir()


@pytest.mark.libvirt
def test_libvirt_pull_backup_over_tls_restores_byte_exact(nos_domain, libvirt_pki, tmp_path, vm_workdir,
                                                          monkeypatch):
    nd = nos_domain(1, size="64M", writes=[(0x61, 0, 4 * MiB), (0x62, 30 * MiB, MiB)])
    cfg = tmp_path / "etc"
    cfg.mkdir()
    port = _port()
    host = f'hosts = [{{ name = "tlshost", uri = "qemu:///system", nbd_tls = {{ dir = "{libvirt_pki}", ' \
           f'address = "127.0.0.1", port = {port} }} }}]\n'
    (cfg / "default.toml").write_text(host)
    monkeypatch.setenv("VMBK_CONFIG_DIR", str(cfg))
    root = tmp_path / "backup"
    root.mkdir()
    full_then_inc_restore_exact(root, nd, vm_workdir, 0x70)

    # without its certificate the client is refused: a clean failure, nothing left behind
    anonymous = tmp_path / "anonymous"
    anonymous.mkdir()
    shutil.copy(libvirt_pki / "ca-cert.pem", anonymous / "ca-cert.pem")
    (cfg / "default.toml").write_text(host.replace(str(libvirt_pki), str(anonymous)))
    before = [c.getName() for c in nd.dom.listAllCheckpoints(0)]
    code, recs = run_backup(root, "--vm", nd.name)
    assert code != 0 and [r["type"] for r in recs] == ["error"], recs
    assert "nbds://127.0.0.1:" in recs[0]["message"], recs[0]  # QEMU hangs up on a client without certificate
    assert nd.dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE
    assert [c.getName() for c in nd.dom.listAllCheckpoints(0)] == before


@pytest.mark.libvirt
def test_remote_host_over_tls_as_the_unprivileged_user(remote_host, nos_domain, libvirt_pki, vm_workdir):
    """qemu+ssh for libvirt and the host's files, NBD over TLS for the data: as the user who cannot read the disks."""
    from fixtures.remote import lock_out

    before = set(remote_host.masters())
    nd = nos_domain(1, size="64M", writes=[(0x71, 0, 3 * MiB), (0x72, 50 * MiB, MiB)])
    lock_out(nd.disks)
    work = remote_host.workdir("tls")
    client = work / "pki"
    client.mkdir()
    for name in ("ca-cert.pem", "client-cert.pem", "client-key.pem"):
        shutil.copy(libvirt_pki / name, client / name)
    for p in (client, *client.iterdir()):
        os.chown(p, remote_host.uid, remote_host.gid)
    remote_host.config(work, f'hosts = [{{ name = "kvm", uri = "{remote_host.uri}", nbd_tls = {{ dir = "{client}", '
                             f'address = "127.0.0.1", port = {_port()} }} }}]\n')
    remote_host.full_backup_restores_exact(work, nd.name, nd.disks[0], vm_workdir)
    assert set(remote_host.masters()) <= before, "a control master outlived vmbk"
