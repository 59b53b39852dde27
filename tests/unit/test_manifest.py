"""Manifests, the stream digest and age, without libvirt (issue #16).

The stream digest the writer takes on the write pass -- frames filled in
any order, as the NBD workers fill them -- is the one a reader computes
from the file (and `contrib/vmbk-extract`, an independent
implementation, too); the manifest's signature checks only over its
exact body; the key is made 0600 and once; an age file's size follows
from the plaintext's; bech32 keys round-trip.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import io
import os
import random
import stat
from pathlib import Path

import pytest

from vmbk.manifest import keys, sign
from vmbk.replicate import age
from vmbk.stream import StreamMeta
from vmbk.stream.digest import file_digest, sequential_digest
from vmbk.stream.writer import StreamWriter

ROOT = Path(__file__).resolve().parents[2]


def _extract_module():
    loader = importlib.machinery.SourceFileLoader("vmbk_extract", str(ROOT / "contrib" / "vmbk-extract"))
    spec = importlib.util.spec_from_loader("vmbk_extract", loader)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("compressed", [False, 2])
@pytest.mark.parametrize("order", ["disk", "reversed", "shuffled"])
def test_the_write_pass_digest_is_the_file_s(tmp_path, compressed, order):
    rnd = random.Random(7)
    extents, off, data_size = [], 0, 0
    while off < 20 << 20:
        length = rnd.choice([4096, 65536, 512 << 10])
        kind = rnd.choice("ddz")
        extents.append((kind, off, length))
        off += length
        data_size += length if kind == "d" else 0
    meta = StreamMeta(virtual_size=24 << 20, data_size=data_size, disk_name="vda", disk_format="qcow2",
                      checkpoint_name="virtnbdbackup.0", parent_checkpoint="", incremental=False,
                      compressed=compressed)
    path = tmp_path / "vda.full.data"
    w = StreamWriter(path, meta)
    frames = []
    for kind, o, n in extents:
        if kind == "z":
            w.write_zero(o, n)
        else:
            w.reserve(o, n)
            frames.append((o, rnd.randbytes(n // 2) * 2))
    todo = frames if order == "disk" else frames[::-1] if order == "reversed" else rnd.sample(frames, len(frames))
    filled = {o: w.fill(o, d, write=False) for o, d in todo}
    for o, _ in todo:
        w.finish(filled[o])
    w.close()
    digest, adler, _ = sequential_digest(path, buffer_size=100_003)  # buffers that cut frames anywhere
    assert digest == w.sha256 and adler == w.checksum
    for size, workers in ((100_003, 3), (1 << 20, 2), (64 << 20, 1)):  # regions of 1-6 frames, of all of them
        assert file_digest(path, buffer_size=size, workers=workers)[:2] == (digest, adler), (size, workers)
    ex = _extract_module()
    _, ex_frames, size = ex.scan(str(path))
    assert ex.digests(str(path), ex_frames, size) == (digest, adler)


def test_signature_covers_the_exact_body(tmp_path):
    signer = keys.load_signer(tmp_path / "keys")
    assert signer is not None
    raw = sign.encode({"format": sign.FORMAT, "version": 1, "files": [], "checkpoint": None}, signer)
    m = sign.decode(raw)
    assert m.signature_ok() and m.fingerprint == signer.fingerprint
    body, sig_line, _ = raw.split(b"\n")
    tampered = body.replace(b'"files":[]', b'"files":[ ]') + b"\n" + sig_line + b"\n"
    assert not sign.decode(tampered).signature_ok()  # the same JSON, other bytes: not what was signed
    ex = _extract_module()
    assert ex.ed25519_verify(signer.public, body + b"\n", m.signature)  # the rescue tool's own Ed25519
    assert not ex.ed25519_verify(signer.public, body, m.signature)
    with pytest.raises(sign.ManifestError):
        sign.decode(raw + b"junk")


def test_the_key_is_made_once_and_private(tmp_path):
    d = tmp_path / "keys"
    a = keys.load_signer(d)
    b = keys.load_signer(d)
    assert a is not None and b is not None and a.public == b.public
    assert stat.S_IMODE((d / keys.PRIVATE).stat().st_mode) == 0o600
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert keys.read_public(d / keys.PUBLIC) == a.public
    assert keys.load_signer(tmp_path / "none", create=False) is None
    assert set(keys.trusted(d)) == {keys.b64(a.public)}
    other = keys.load_signer(tmp_path / "other")
    assert other is not None
    (d / keys.TRUSTED).mkdir()
    (d / keys.TRUSTED / "old-host.pub").write_bytes(keys.public_pem(other.public))
    assert set(keys.trusted(d)) == {keys.b64(a.public), keys.b64(other.public)}


@pytest.mark.parametrize("size", [0, 1, age.CHUNK - 1, age.CHUNK, age.CHUNK + 1, 5 * age.CHUNK])
def test_age_round_trip_and_sizes(size):
    ident, rec = age.generate_identity()
    data = os.urandom(size)
    out = io.BytesIO()
    age.encrypt(io.BytesIO(data), out, recipients=[age.parse_recipient(rec), age.parse_recipient(rec)])
    header = age.header_size(2, False)
    assert len(out.getvalue()) == age.encrypted_size(size, header) and age.plain_size(len(out.getvalue()), header) == size
    back = io.BytesIO()
    age.decrypt(io.BytesIO(out.getvalue()), back, identities=age.parse_identities(ident))
    assert back.getvalue() == data
    assert age.recipient_of(age.parse_identities(ident)[0]) == rec


def test_age_refuses_what_it_must():
    with pytest.raises(age.AgeError, match="not an age file"):
        age.decrypt(io.BytesIO(b"hello\n"), io.BytesIO(), identities=[])
    with pytest.raises(ValueError):
        age.encrypt(io.BytesIO(b""), io.BytesIO())
    with pytest.raises(Exception, match="not an age"):
        age.parse_recipient("age1notakey")
    ident, _ = age.generate_identity()
    with pytest.raises(Exception, match="no identity"):
        age.parse_identities("# only a comment\n")
    assert age.parse_identities(f"# made by hand\n\n{ident}\n") == age.parse_identities(ident.lower())

