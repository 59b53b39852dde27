"""The host's signing key and the public keys it trusts.

The key directory is ``$VMBK_KEY_DIR``, else ``<config dir>/keys``
(``/etc/vmbk/keys``; the config dir follows ``$VMBK_CONFIG_DIR``).  It
holds:

``signing.key``   the Ed25519 private key (PKCS#8 PEM, 0600, root's), made
                  on first use by the first backup that signs (or
                  `load_signer` with ``create``);
``signing.pub``   its public key (SubjectPublicKeyInfo PEM: ``openssl
                  pkeyutl -verify -pubin -inkey`` reads it);
``trusted/*.pub`` more public keys whose manifests count as good: another
                  host's, whose replica this one holds, or the key of a
                  host that is gone, kept by the user elsewhere.

A manifest names the key that signed it (the raw public key, base64), so
a reader always knows *which* key signed; whether it is *trusted* is
this directory's say only: a key found in the backup tree proves nothing
(whoever can rewrite the tree can put a key there).  A fingerprint is
``SHA256:`` and the unpadded base64 of the SHA-256 of the 32-byte public
key, as OpenSSH prints its keys'.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from vmbk.config import config_dir
from vmbk.errors import ConfigError

ENV = "VMBK_KEY_DIR"
PRIVATE = "signing.key"
PUBLIC = "signing.pub"
TRUSTED = "trusted"


def key_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get(ENV) or Path(config_dir(env)) / "keys")


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def fingerprint(raw: bytes) -> str:
    """``SHA256:...`` of a raw 32-byte public key."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(raw).digest()).decode("ascii").rstrip("=")


def public_pem(raw: bytes) -> bytes:
    return Ed25519PublicKey.from_public_bytes(raw).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclasses.dataclass(frozen=True)
class Signer:
    private: Ed25519PrivateKey
    public: bytes  # raw, 32 bytes
    path: Path

    def sign(self, data: bytes) -> bytes:
        return self.private.sign(data)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public)


def _raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_signer(directory: Path | None = None, *, create: bool = True) -> Signer | None:
    """The host's signing key; made when missing and ``create`` (None: none to be had).

    ConfigError when the file is there but is not an Ed25519 private key.
    Two processes creating it at once end with one key: each writes its
    own aside and hard-links it into place, and the loser reads the
    winner's.
    """
    d = key_dir() if directory is None else directory
    path = d / PRIVATE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if not create:
            return None
        try:
            return _create(d)
        except OSError:
            return None
    except OSError:
        return None
    try:
        key = serialization.load_pem_private_key(raw, password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path} is not a usable private key: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 private key")
    return Signer(key, _raw_public(key), path)


def _create(d: Path) -> Signer:
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    final = d / PRIVATE
    tmp = d / f".{PRIVATE}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, final)
    except FileExistsError:
        os.unlink(tmp)
        signer = load_signer(d, create=False)
        assert signer is not None
        return signer
    os.unlink(tmp)
    raw = _raw_public(key)
    _write_public(d / PUBLIC, raw)
    return Signer(key, raw, final)


def _write_public(path: Path, raw: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(public_pem(raw))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def publish(backup_path: Path, signer: Signer) -> Path | None:
    """The public key beside the tree, ``<backup path>/_state/signing.pub`` (informational: a
    reader trusts only its key directory's keys); None when it cannot be written."""
    path = backup_path / "_state" / PUBLIC
    try:
        if path.is_file() and read_public(path) == signer.public:
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_public(path, signer.public)
    except (OSError, ConfigError):
        return None
    return path


def read_public(path: Path) -> bytes:
    """The raw key of a PEM (or OpenSSL DER-less base64 raw) public key file."""
    data = path.read_bytes()
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        try:
            raw = base64.b64decode(data.strip(), validate=True)
        except ValueError:
            raise ConfigError(f"{path} is not an Ed25519 public key (PEM)") from None
        if len(raw) != 32:
            raise ConfigError(f"{path} is not an Ed25519 public key (PEM)") from None
        return raw
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path} is not an Ed25519 public key")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


_cache: dict[str, tuple[tuple[float, ...], dict[str, str]]] = {}


def trusted(directory: Path | None = None) -> dict[str, str]:
    """Trusted public keys (base64 raw) -> where each was found.

    The host's own key (``signing.pub``, else derived from ``signing.key``
    when the reader may read it) and every ``trusted/*.pub``.  Re-read when
    a file there changes.
    """
    d = key_dir() if directory is None else directory
    files = [d / PUBLIC, d / PRIVATE, *sorted((d / TRUSTED).glob("*.pub"))] if d.is_dir() else []
    stamp = tuple(_mtime(p) for p in files)
    hit = _cache.get(str(d))
    if hit is not None and hit[0] == stamp:
        return hit[1]
    out: dict[str, str] = {}
    for p in files:
        if not p.is_file():
            continue
        try:
            if p.name == PRIVATE:
                signer = load_signer(d, create=False)
                if signer is not None:
                    out.setdefault(b64(signer.public), str(p))
            else:
                out.setdefault(b64(read_public(p)), str(p))
        except (OSError, ConfigError):
            continue
    _cache[str(d)] = (stamp, out)
    return out


def _mtime(p: Path) -> float:
    with contextlib.suppress(OSError):
        return p.stat().st_mtime
    return -1.0


def verify(public_b64: str, signature: bytes, data: bytes) -> bool:
    """Does ``signature`` over ``data`` check with the raw public key?"""
    try:
        raw = base64.b64decode(public_b64, validate=True)
        Ed25519PublicKey.from_public_bytes(raw).verify(signature, data)
    except Exception:  # noqa: BLE001 -- any malformed key or signature is "does not check"
        return False
    return True
