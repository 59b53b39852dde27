"""vmbk's age files and the real ``age`` CLI (Debian's package), both ways.

What vmbk encrypts -- to X25519 recipients, and with a passphrase --
``age -d`` decrypts; what ``age`` encrypts, vmbk decrypts; a wrong
identity or passphrase is a clear error and writes nothing.  The sizes
cover the STREAM edge cases (empty, one byte, exactly one and two
chunks, a chunk and a byte).  ``age`` reads a passphrase only from a
terminal: the test gives it one (a pty), never a command line.
"""

from __future__ import annotations

import io
import os
import pty
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from vmbk.replicate import age

pytestmark = pytest.mark.skipif(shutil.which("age") is None, reason="the age CLI is not installed")

SIZES = [0, 1, age.CHUNK - 1, age.CHUNK, age.CHUNK + 1, 2 * age.CHUNK, 300_001]
PASSPHRASE = "a long passphrase for the test"


def _cli_with_tty(argv: list[str], answers: list[str], timeout: float = 60) -> int:
    """Run ``age`` with a pty as its terminal, typing ``answers`` at each prompt; its exit status."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: age, with the pty as its controlling terminal
        os.execvp(argv[0], argv)
    deadline = time.monotonic() + timeout
    seen = b""
    try:
        for answer in answers:
            while b":" not in seen:
                assert time.monotonic() < deadline, seen
                seen += os.read(fd, 1024)
            seen = b""
            os.write(fd, answer.encode() + b"\n")
        while True:
            try:
                if not os.read(fd, 1024):
                    break
            except OSError:
                break
    finally:
        os.close(fd)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _decrypt(path: Path, **kw) -> bytes:
    out = io.BytesIO()
    with open(path, "rb") as fh:
        age.decrypt(fh, out, **kw)
    return out.getvalue()


def test_recipients_both_ways(tmp_path):
    ident, rec = age.generate_identity()
    key = tmp_path / "key.txt"
    key.write_text(f"# made by vmbk\n{ident}\n")
    for size in SIZES:
        data = os.urandom(size)
        ours = tmp_path / f"{size}.vmbk.age"
        with open(ours, "wb") as fh:
            age.encrypt(io.BytesIO(data), fh, recipients=[age.parse_recipient(rec)])
        assert ours.stat().st_size == age.encrypted_size(size, age.header_size(1, False))
        r = subprocess.run(["age", "-d", "-i", str(key), str(ours)], capture_output=True, check=False)
        assert r.returncode == 0 and r.stdout == data, (size, r.stderr)
        theirs = tmp_path / f"{size}.cli.age"
        subprocess.run(["age", "-r", rec, "-o", str(theirs)], input=data, check=True)
        assert _decrypt(theirs, identities=age.parse_identities(key.read_text())) == data, size
    # a key made by age-keygen works here too
    subprocess.run(["age-keygen", "-o", str(tmp_path / "cli-key.txt")], check=True, capture_output=True)
    cli_rec = subprocess.run(["age-keygen", "-y", str(tmp_path / "cli-key.txt")], capture_output=True,
                             check=True, text=True).stdout.strip()
    with open(tmp_path / "to-cli.age", "wb") as fh:
        age.encrypt(io.BytesIO(b"hello"), fh, recipients=[age.parse_recipient(cli_rec)])
    assert subprocess.run(["age", "-d", "-i", str(tmp_path / "cli-key.txt"), str(tmp_path / "to-cli.age")],
                          capture_output=True, check=True).stdout == b"hello"


def test_passphrase_both_ways(tmp_path):
    data = os.urandom(age.CHUNK + 17)
    ours = tmp_path / "ours.age"
    with open(ours, "wb") as fh:
        age.encrypt(io.BytesIO(data), fh, passphrase=PASSPHRASE.encode())
    out = tmp_path / "ours.out"
    assert _cli_with_tty(["age", "-d", "-o", str(out), str(ours)], [PASSPHRASE]) == 0
    assert out.read_bytes() == data
    plain = tmp_path / "plain"
    plain.write_bytes(data)
    theirs = tmp_path / "theirs.age"
    assert _cli_with_tty(["age", "-p", "-o", str(theirs), str(plain)], [PASSPHRASE, PASSPHRASE]) == 0
    assert _decrypt(theirs, passphrase=PASSPHRASE.encode()) == data
    with pytest.raises(age.AgeError, match="wrong passphrase"):
        _decrypt(theirs, passphrase=b"not it")


def test_wrong_identity_and_damage_write_nothing(tmp_path):
    ident, rec = age.generate_identity()
    other, _ = age.generate_identity()
    data = os.urandom(3 * age.CHUNK)
    path = tmp_path / "f.age"
    with open(path, "wb") as fh:
        age.encrypt(io.BytesIO(data), fh, recipients=[age.parse_recipient(rec)])
    out = io.BytesIO()
    with pytest.raises(age.AgeError, match="no identity matches"), open(path, "rb") as fh:
        age.decrypt(fh, out, identities=age.parse_identities(other))
    assert out.getvalue() == b""
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 1  # the last chunk: the chunks before it are written, the damaged one never
    path.write_bytes(bytes(raw))
    out = io.BytesIO()
    with pytest.raises(age.AgeError, match="does not check at chunk 2"), open(path, "rb") as fh:
        age.decrypt(fh, out, identities=age.parse_identities(ident))
    assert len(out.getvalue()) <= 2 * age.CHUNK
    path.write_bytes(bytes(raw[:-age.CHUNK]))  # cut at a chunk boundary: no final chunk
    with pytest.raises(age.AgeError), open(path, "rb") as fh:
        age.decrypt(fh, io.BytesIO(), identities=age.parse_identities(ident))
