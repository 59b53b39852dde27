"""X.509 certificates for TLS tests: a CA, a server certificate for 127.0.0.1 and a client certificate."""

from __future__ import annotations

import subprocess
from pathlib import Path


def certificates(d: Path) -> Path:
    """``d/certs``: ca-*, server-* and client-*.pem, the names libnbd, QEMU and libvirt look for."""
    certs = d / "certs"
    certs.mkdir(parents=True)

    def ssl(*argv: str) -> None:
        subprocess.run(["openssl", *argv], check=True, capture_output=True, cwd=certs)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=vmbk test CA",
        "-keyout", "ca-key.pem", "-out", "ca-cert.pem")
    for who, ext in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"),
                     ("client", "extendedKeyUsage=clientAuth")):
        (certs / f"{who}.ext").write_text(ext + "\n")
        ssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={who}", "-keyout", f"{who}-key.pem",
            "-out", f"{who}.csr")
        ssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem", "-CAcreateserial",
            "-days", "2", "-extfile", f"{who}.ext", "-out", f"{who}-cert.pem")
    return certs
