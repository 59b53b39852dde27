"""The manifest file: a JSON body line and a signature line.

::

    {"checkpoint":"virtnbdbackup.1","checkpoints":[...],"created":"...","files":[...],...}\\n
    {"alg":"ed25519","key":"<base64 raw public key>","sig":"<base64 signature>"}\\n

The first line is the *body*: one JSON object, keys sorted, UTF-8,
ending with a newline.  The signature is Ed25519 over the body's exact
bytes, its newline included, so checking it needs no canonical JSON:
``head -n 1 F > body`` and ``openssl pkeyutl -verify -rawin`` do
(man/vmbk-format.5).  A host without a key writes ``{"alg":"none"}``
(*unsigned*).  The whole file is written aside and renamed: it is there
complete or not at all.

Body fields (version 1): ``format`` ("vmbk-manifest"), ``version`` (1),
``vm``, ``uuid``, ``level`` (full, inc, copy), ``checkpoint`` (null for a
copy), ``index`` (the point's number), ``parent`` (SHA-256 of the
previous point's manifest *file*, null for the first point of a chain
or when that point has none), ``checkpoints`` (the ``.cpt`` list this
point commits, null for a copy), ``created`` (UTC), ``vmbk`` (version),
``host``, ``files``: ``{"name", "size", "sha256", "kind"}`` each, with
``kind`` ``stream`` (the stream digest, `vmbk.stream.digest`), ``file``
(plain SHA-256) or ``mutable`` (plain SHA-256 of a file a later point of
the chain rewrites: the ``.cpt`` and the TPM state; checked against the
chain's newest manifest only).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
from typing import Any

import orjson

from vmbk.manifest import keys

FORMAT = "vmbk-manifest"
VERSION = 1
STREAM, FILE, MUTABLE = "stream", "file", "mutable"
#: A manifest is a few KiB; anything this big is not one.
MAX_SIZE = 16 << 20


class ManifestError(ValueError):
    """The bytes are not a manifest vmbk can read."""


@dataclasses.dataclass(frozen=True)
class FileEntry:
    name: str
    size: int
    sha256: str
    kind: str


@dataclasses.dataclass(frozen=True)
class Manifest:
    body: dict[str, Any]
    body_bytes: bytes
    alg: str
    key: str | None  # base64 raw public key
    signature: bytes | None
    digest: str  # SHA-256 of the whole file: what the next point's ``parent`` names

    @property
    def files(self) -> list[FileEntry]:
        return [FileEntry(str(f["name"]), int(f["size"]), str(f["sha256"]), str(f.get("kind", FILE)))
                for f in self.body.get("files") or []]

    @property
    def checkpoint(self) -> str | None:
        c = self.body.get("checkpoint")
        return c if isinstance(c, str) else None

    @property
    def parent(self) -> str | None:
        p = self.body.get("parent")
        return p if isinstance(p, str) else None

    @property
    def signed(self) -> bool:
        return self.alg == "ed25519"

    def signature_ok(self) -> bool:
        return (self.signed and self.key is not None and self.signature is not None
                and keys.verify(self.key, self.signature, self.body_bytes))

    @property
    def fingerprint(self) -> str | None:
        if self.key is None:
            return None
        try:
            return keys.fingerprint(base64.b64decode(self.key, validate=True))
        except (binascii.Error, ValueError):
            return None


def encode(body: dict[str, Any], signer: keys.Signer | None) -> bytes:
    """The file's bytes: the body line, then its signature line."""
    body_bytes = orjson.dumps(body, option=orjson.OPT_SORT_KEYS) + b"\n"
    if signer is None:
        sig_line: dict[str, Any] = {"alg": "none"}
    else:
        sig_line = {"alg": "ed25519", "key": keys.b64(signer.public), "sig": keys.b64(signer.sign(body_bytes))}
    return body_bytes + orjson.dumps(sig_line, option=orjson.OPT_SORT_KEYS) + b"\n"


def decode(raw: bytes) -> Manifest:
    """Parse a manifest file (ManifestError when it is not one)."""
    if len(raw) > MAX_SIZE:
        raise ManifestError(f"{len(raw)} bytes: too big for a manifest")
    lines = raw.split(b"\n")
    if len(lines) != 3 or lines[2] != b"":
        raise ManifestError("not two lines (a body and a signature)")
    body_bytes = lines[0] + b"\n"
    try:
        body = orjson.loads(lines[0])
        sig = orjson.loads(lines[1])
    except orjson.JSONDecodeError as e:
        raise ManifestError(f"damaged JSON ({e})") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT or not isinstance(sig, dict):
        raise ManifestError("not a vmbk manifest")
    if body.get("version") != VERSION:
        raise ManifestError(f"manifest version {body.get('version')!r}: this vmbk reads version {VERSION}")
    files = body.get("files")
    if not isinstance(files, list) or not all(
            isinstance(f, dict) and isinstance(f.get("name"), str) and isinstance(f.get("size"), int)
            and isinstance(f.get("sha256"), str) for f in files):
        raise ManifestError("its file list is malformed")
    alg = sig.get("alg")
    if alg not in ("ed25519", "none"):
        raise ManifestError(f"unknown signature algorithm {alg!r}")
    key = sig.get("key") if isinstance(sig.get("key"), str) else None
    signature = None
    if isinstance(sig.get("sig"), str):
        try:
            signature = base64.b64decode(sig["sig"], validate=True)
        except (binascii.Error, ValueError):
            raise ManifestError("its signature is not base64") from None
    return Manifest(body, body_bytes, str(alg), key, signature, hashlib.sha256(raw).hexdigest())
