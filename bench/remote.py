#!/usr/bin/env python3
"""Issue #17's speed target: a full backup through ``qemu+ssh`` against local, and against virtnbdbackup's remote.

    .venv/bin/python bench/remote.py [--size-gib 3.5] [--runs 3] [--quick] [--no-page-reporting]

On bench/run.py's image and domain (its helpers: image cache, domain,
page reporting, the timing lock), every case a whole command making a
full, uncompressed backup of the running domain, the checkpoints removed
before each run so that each is a full:

* ``vmbk-backup --vm DOM`` on ``qemu:///system`` (local: the export's unix socket);
* ``vmbk-backup --connect qemu+ssh://root@127.0.0.1:PORT/system?keyfile=...``:
  the "remote" host is this one, reached through an sshd this bench
  starts on loopback (the export through an ssh-forwarded unix socket,
  ``qemu-img info`` and the rest over the same control master);
* the same with the host's ``nbd_tls``: the export as NBD over TCP with
  TLS (libvirt's ``backup_tls_x509_*``; the bench's CA in /etc/pki/qemu,
  libvirt's default directory, read when a job starts: no restart; only
  when that directory does not exist, and removed after);
* the same with the host's ``nbd_tcp``: NBD over plain TCP, unencrypted,
  as virtnbdbackup's remote mode (like with like);
* ``virtnbdbackup -l full`` locally, and ``virtnbdbackup -U qemu+ssh://...``
  (its remote mode: the NBD export over plain TCP on ``-I 127.0.0.1``,
  its file copies through paramiko to port 22 of the host, which is why
  the bench's sshd listens on 22 too when it is free), and with ``--tls``.
  virtnbdbackup backs up locally when libvirt's host name is its own, so
  its remote runs get a UTS namespace with another name (``unshare --uts``).

The loopback puts both ends on this machine's two cores: the ssh cipher
is paid twice (both ends encrypt or decrypt), so the figures are a lower
bound of what a real network with a second host gives.  
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as common  # noqa: E402  bench/run.py
from run import Proc, measure, rotate  # noqa: E402

V_LOCAL = "vmbk-backup full, local"
V_SSH = "vmbk-backup full, qemu+ssh (forwarded socket)"
V_TLS = "vmbk-backup full, qemu+ssh (NBD over TLS)"
V_TCP = "vmbk-backup full, qemu+ssh (NBD over plain TCP)"
N_LOCAL = "virtnbdbackup -l full, local"
N_SSH = "virtnbdbackup -l full -U qemu+ssh (NBD over TCP)"
N_TLS = "virtnbdbackup -l full -U qemu+ssh --tls"
CASES = (V_LOCAL, V_SSH, V_TCP, V_TLS, N_LOCAL, N_SSH, N_TLS)
PKI = Path("/etc/pki/qemu")


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class RemoteBench(common.Bench):
    def __init__(self, opts: argparse.Namespace) -> None:
        super().__init__(opts)
        self.cases = {n: common.Case("remote", n) for n in CASES}
        self.sshd = None
        self.uri = ""
        self.pki_made = False
        self.failed: set[str] = set()

    def start_sshd(self) -> None:
        from fixtures.replication import make_sshd

        assert self.work is not None
        d = self.work / "sshd"
        d.mkdir()
        self.sshd = sshd = make_sshd(d)
        if port_free(22):  # virtnbdbackup's paramiko goes to port 22 whatever the URI says
            sshd.stop()
            sshd.config.write_text(sshd.config.read_text() + "Port 22\n")
            sshd.start()
            self.facts.append(f"sshd on 127.0.0.1 ports {sshd.port} and 22")
        else:
            self.notes.append("port 22 is taken: virtnbdbackup's file copies (paramiko) cannot reach the bench's "
                              "sshd (it warns and backs up the disk all the same)")
        self.uri = f"qemu+ssh://root@127.0.0.1:{sshd.port}/system?keyfile={sshd.user_key}&no_verify=1&no_tty=1"
        # virtnbdbackup's paramiko reads ~/.ssh/id_*: a HOME of its own with the bench's key
        home = self.work / "vnb-home"
        (home / ".ssh").mkdir(parents=True)
        shutil.copyfile(sshd.user_key, home / ".ssh" / "id_ed25519")
        os.chmod(home / ".ssh" / "id_ed25519", 0o600)
        self.vnb_env = {**os.environ, "HOME": str(home)}
        cipher = subprocess.run(["ssh", "-G", "-p", str(sshd.port), "127.0.0.1"], capture_output=True, text=True)
        ciphers = [ln.split()[1] for ln in cipher.stdout.splitlines() if ln.startswith("ciphers ")]
        self.facts.append(f"ssh client's cipher order: {ciphers[0] if ciphers else '?'}")

    def setup_tls(self) -> bool:
        """The bench's CA, server and client certificates in /etc/pki/qemu (only when it does not exist)."""
        from tls_helpers import certificates

        assert self.work is not None
        if PKI.exists():
            self.notes.append(f"{PKI} exists: the TLS cases are not run (the bench does not replace it)")
            return False
        certs = certificates(self.work / "pki")
        self.pki_parent_made = not PKI.parent.exists()
        PKI.mkdir(parents=True, mode=0o755)
        for d in (PKI.parent, PKI) if self.pki_parent_made else (PKI,):
            d.chmod(0o755)  # whatever the umask: QEMU's user reads it
        self.pki_made = True
        for name in ("ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem"):
            shutil.copy(certs / name, PKI / name)
        subprocess.run(["chgrp", "libvirt-qemu", str(PKI / "server-key.pem")], check=False, capture_output=True)
        (PKI / "server-key.pem").chmod(0o640)
        self.tls_cfg = self.work / "tls-config"
        self.tls_cfg.mkdir()
        (self.tls_cfg / "default.toml").write_text(
            f'hosts = [{{ name = "bench", uri = "{self.uri}", nbd_tls = {{ dir = "{certs}", '
            f'address = "127.0.0.1", port = 10900 }} }}]\n')
        return True

    def vmbk(self, root: Path, *connect: str, env: dict[str, str] | None = None) -> Proc:
        self.delete_checkpoints()
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        p = measure([str(common.VENV_BIN / "vmbk-backup"), *connect, "--vm", self.name, "--backup-path", str(root),
                     "--json"], env=env or self.env, fsync_dir=root)
        recs = [json.loads(line) for line in p.stdout.splitlines() if line.strip()]
        backups = [r for r in recs if r.get("type") == "backup"]
        if len(backups) != 1 or backups[0].get("outcome") != "ok" or backups[0].get("action") != "full":
            raise RuntimeError(f"no full backup: {p.stdout[-2000:]} {p.stderr[-2000:]}")
        shutil.rmtree(root, ignore_errors=True)  # the outputs live in RAM (/dev/shm): one at a time
        return p

    def vnb(self, out: Path, *remote: str) -> Proc:
        self.delete_checkpoints()
        shutil.rmtree(out, ignore_errors=True)
        argv = ["virtnbdbackup", "-d", self.name, "-l", "full", "-o", str(out), "-n", "-S", str(self.vnb_dir)]
        if remote:
            # virtnbdbackup takes a host of its own name for itself (gethostname() against libvirt's
            # getHostname()) and backs up locally: another UTS name puts it in its remote mode
            argv = ["unshare", "--uts", "sh", "-c", 'hostname vmbk-bench-client && exec "$@"', "sh",
                    *argv, *remote]
        else:
            argv += ["-f", str(self.vnb_dir / "nbd.sock")]
        try:
            p = measure(argv, env=self.vnb_env, fsync_dir=out)
        except RuntimeError:
            logs = sorted(out.glob("*.log"))
            tail = logs[-1].read_text(errors="replace").strip().splitlines()[-3:] if logs else []
            raise RuntimeError(f"virtnbdbackup {' '.join(remote[-3:])} failed: {' / '.join(tail)}") from None
        if not list(out.glob("vda.full.data")):
            raise RuntimeError(f"virtnbdbackup wrote no vda.full.data: {p.stderr[-3000:]}")
        if remote and "Connected to remote host" not in p.stderr:
            raise RuntimeError(f"virtnbdbackup did not take the host for a remote one: {p.stderr[-3000:]}")
        shutil.rmtree(out, ignore_errors=True)  # the outputs live in RAM (/dev/shm): one at a time
        return p

    def section(self) -> None:
        assert self.out is not None and self.image is not None and self.work is not None
        data = self.image.data
        self.start_sshd()
        self.tcp_cfg = self.work / "tcp-config"
        self.tcp_cfg.mkdir()
        (self.tcp_cfg / "default.toml").write_text(
            f'hosts = [{{ name = "bench", uri = "{self.uri}", nbd_tcp = {{ address = "127.0.0.1", port = 10950 }} }}]\n')
        remote_vnb = ("-U", self.uri, "--ssh-user", "root", "-I", "127.0.0.1", "-P", "10809")
        runs = {
            V_LOCAL: lambda: self.vmbk(self.out / "local"),
            V_SSH: lambda: self.vmbk(self.out / "ssh", "--connect", self.uri),
            V_TCP: lambda: self.vmbk(self.out / "tcp", "--connect", self.uri,
                                     env={**self.env, "VMBK_CONFIG_DIR": str(self.tcp_cfg)}),
            V_TLS: lambda: self.vmbk(self.out / "tls", "--connect", self.uri,
                                     env={**self.env, "VMBK_CONFIG_DIR": str(self.tls_cfg)}),
            N_LOCAL: lambda: self.vnb(self.out / "vnb-local"),
            N_SSH: lambda: self.vnb(self.out / "vnb-ssh", *remote_vnb),
            N_TLS: lambda: self.vnb(self.out / "vnb-tls", *remote_vnb, "--tls", "--tls-cert", str(PKI)),
        }
        cases = [c for c in CASES if c not in (V_TLS, N_TLS)] + ([V_TLS, N_TLS] if self.setup_tls() else [])
        for i in range(self.runs):
            for name in rotate(cases, i):
                if name == N_TLS and name in self.failed:
                    continue
                try:
                    self.timed(name, runs[name], data)
                except RuntimeError as e:
                    if name != N_TLS:
                        raise
                    self.failed.add(name)  # the reference's TLS mode is a comparison, not the point
                    self.notes.append(f"{name}: {e}")

    def teardown(self) -> None:
        if self.sshd is not None:
            self.sshd.stop()
        if self.pki_made:
            shutil.rmtree(PKI, ignore_errors=True)
            if getattr(self, "pki_parent_made", False):
                with contextlib.suppress(OSError):
                    PKI.parent.rmdir()
        super().teardown()

    def report(self) -> None:
        b = common.print_cases(self, 52)
        if V_SSH in b and N_SSH in b:
            r = b[N_SSH] / b[V_SSH]
            print(f"\nvmbk over qemu+ssh / virtnbdbackup -U qemu+ssh: {r:.2f}x  (target >= 3)  "
                  f"{'PASS' if r >= 3 else 'FAIL'}")
        if V_TCP in b and N_SSH in b:
            r = b[N_SSH] / b[V_TCP]
            print(f"vmbk over plain NBD/TCP / virtnbdbackup -U qemu+ssh (both plain TCP): {r:.2f}x  (target >= 3)  "
                  f"{'PASS' if r >= 3 else 'FAIL'}")
        if V_TLS in b and N_SSH in b:
            r = b[N_SSH] / b[V_TLS]
            print(f"vmbk over NBD+TLS / virtnbdbackup -U qemu+ssh: {r:.2f}x  (target >= 3)  "
                  f"{'PASS' if r >= 3 else 'FAIL'}")
        if V_TLS in b and N_TLS in b:
            print(f"vmbk over NBD+TLS / virtnbdbackup --tls: {b[N_TLS] / b[V_TLS]:.2f}x")
        for name in (V_SSH, V_TCP, V_TLS):
            if name in b and V_LOCAL in b:
                print(f"cost of {name.split('(')[1].rstrip(')')}: {b[name] / b[V_LOCAL]:.2f}x the local backup's time")
        if N_SSH in b and N_LOCAL in b:
            print(f"virtnbdbackup's remote mode: {b[N_SSH] / b[N_LOCAL]:.2f}x its local time")


def main() -> int:
    opts = common.bench_parser(__doc__).parse_args()
    opts.cold = False
    opts.keep_cache = True
    opts.only = set()
    _lock = common.start_session("lock", "bench/remote.py")  # noqa: F841 -- holding it keeps other benches out
    bench = RemoteBench(opts)
    return common.run_bench(bench, bench.section, opts.no_page_reporting)


if __name__ == "__main__":
    sys.exit(main())
