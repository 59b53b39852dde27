"""contrib/vmbk-extract: the disks back without vmbk (issue #16).

Two real chains, full + 3 incrementals, uncompressed and lz4, made by
vmbk-backup of running domains written between the backups (the chains
and reference images of the corruption matrix, `make_chain`).  The
script runs with the Python of a fresh venv that has no package at all
(``python3 -m venv --without-pip``): every point of the uncompressed
chain comes out byte for byte, sparse, after its adler32, manifests,
hash chain and signatures (``--key``: the host's signing.pub) checked;
the lz4 chain is refused with a message that says why, and comes out
byte for byte where the lz4 module is importable.  A tampered stream
stops it with exit 1 and no image.  The signature recipe of
vmbk-format(5) is run as written, with openssl.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_restore_corruption import PERIOD, config_dir, flip, make_chain  # noqa: F401 -- config_dir: a fixture

from vmbk.manifest import keys
from vmbk.stream import scan

pytestmark = pytest.mark.libvirt

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "contrib" / "vmbk-extract"


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> str:
    """The python of a venv with no third-party package (and no pip)."""
    d = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run(["python3", "-m", "venv", "--without-pip", str(d)], check=True)
    py = str(d / "bin" / "python")
    r = subprocess.run([py, "-c", "import lz4"], capture_output=True)
    assert r.returncode != 0, "the bare venv must not see lz4"
    return py


def extract(python: str, chain: Path, point: int, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([python, str(SCRIPT), str(chain), "--point", str(point), "--out", str(out), *extra],
                          capture_output=True, text=True, env={"PATH": os.environ["PATH"]})


def test_extract_in_a_bare_venv(nos_domain, vm_workdir, tmp_path, config_dir, bare_python):
    pub = str(keys.key_dir() / keys.PUBLIC)
    plain = make_chain(nos_domain, vm_workdir, "plain", config_dir)
    lz4 = make_chain(nos_domain, vm_workdir, "lz4", config_dir)
    assert scan(lz4.chain / "vda.full.data").compressed
    for n, ref in enumerate(plain.refs):
        out = tmp_path / f"plain-{n}"
        r = extract(bare_python, plain.chain, n, out, "--key", pub)
        assert r.returncode == 0, r.stderr
        image = out / "vda.raw"
        assert image.read_bytes() == ref.read_bytes(), f"point {n}"
        assert image.stat().st_blocks * 512 < image.stat().st_size, "not sparse"
        assert "signatures checked" in r.stderr
    r = extract(bare_python, lz4.chain, 3, tmp_path / "lz4-bare")
    assert r.returncode == 1 and "lz4 module is not importable" in r.stderr and not any(
        (tmp_path / "lz4-bare").glob("*.raw"))
    for n, ref in enumerate(lz4.refs):  # the project's python has lz4
        r = extract(sys.executable, lz4.chain, n, tmp_path / f"lz4-{n}", "--key", pub)
        assert r.returncode == 0 and (tmp_path / f"lz4-{n}" / "vda.raw").read_bytes() == ref.read_bytes(), r.stderr

    # tampered: a payload byte of point 2, then the same with its .chksum made to match
    bad = tmp_path / "bad"
    shutil.copytree(plain.root, bad)
    chain = bad / plain.vm / PERIOD
    inc2 = chain / "vda.inc.virtnbdbackup.2.data"
    flip(inc2, next(f for f in scan(inc2).frames if f.is_data).file_pos + 3)
    r = extract(bare_python, chain, 3, tmp_path / "bad-out")
    assert r.returncode == 1 and "adler32" in r.stderr and not any((tmp_path / "bad-out").glob("*.raw")), r.stderr
    import zlib

    (chain / "vda.inc.virtnbdbackup.2.data.chksum").write_text(str(zlib.adler32(inc2.read_bytes(), 1)))
    r = extract(bare_python, chain, 3, tmp_path / "bad-out")
    assert r.returncode == 1 and "manifest" in r.stderr, r.stderr
    r = extract(bare_python, chain, 1, tmp_path / "point1")  # point 1 does not read point 2's files
    assert r.returncode == 0 and (tmp_path / "point1" / "vda.raw").read_bytes() == plain.refs[1].read_bytes()

    # vmbk-format(5)'s signature check with openssl, as written there
    m = plain.chain / "vmbk.virtnbdbackup.3.manifest"
    body, sig = tmp_path / "body", tmp_path / "sig"
    body.write_bytes(m.read_bytes().split(b"\n")[0] + b"\n")
    import base64
    import json

    sig.write_bytes(base64.b64decode(json.loads(m.read_bytes().split(b"\n")[1])["sig"]))
    r = subprocess.run(["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", pub, "-rawin", "-in", str(body),
                        "-sigfile", str(sig)], capture_output=True, text=True)
    assert r.returncode == 0 and "Signature Verified Successfully" in r.stdout, r.stderr + r.stdout
