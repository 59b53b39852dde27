"""An encrypted replica: every file stored as ``<name>.age``, any transport.

A destination with ``encrypt = { recipients = ["age1..."] }`` (or
``{ passphrase_file = "/etc/vmbk/replica.pass" }``) gets each file of the
tree -- streams, side files, manifests, the ``.cpt``, the catalogue
snapshot -- as a standard age file (`vmbk.replicate.age`) under its name
plus ``.age``; names stay readable (docs/trust.md).  The host that
pushes needs only the recipients' public keys: nothing it writes can be
read back without an identity, which a pull gets with ``--identity
FILE`` (or the passphrase file).

`EncryptingTransport` wraps the destination's own transport and speaks
plaintext to the rest of replication: the plan, phases and verify see
the source's names and sizes, the replica's listing is translated back
(``x.age`` -> ``x``, its size -> the plaintext size: an age file's size
follows from the plaintext's and the header's, `age.encrypted_size`,
and mtimes are kept), so the quick check of unchanged files still
works.  Sending encrypts one file at a time into the work directory and
hands it to the inner transport, phase by phase and file by file in the
phase's order (a manifest before its ``.cpt``), so a killed run leaves
what the inner transport leaves and the staging space is one file's; a
local replica is written in place instead (a hidden ``.partial`` beside
the target, renamed, the phase fsynced: staging and rsync's copy doubled
the bytes written, 0.40x the age CLI in bench/trust.py).
Memory stays a few MiB whatever the file size.

What changes with encryption: ``verify = "checksum"`` compares content,
which the pushing host cannot read back: it is done as ``size`` (said in
the record's warnings); a pull's content check is the decryption itself
(every chunk authenticated) and then the manifests (``vmbk-restore
--verify``).  Append-only destinations are refused: their far side must
read the ``.cpt`` it extends.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from vmbk.errors import ConfigError, StorageError, UsageError
from vmbk.fsutil import PARTIAL, SECRET_FILE_MODE, ensure_dir, ensure_secret_dir
from vmbk.replicate import age, files
from vmbk.replicate.files import Listing
from vmbk.replicate.local import LocalTransport, durable
from vmbk.replicate.transport import Batch, Space, Transport
from vmbk.settings import Replication

SUFFIX = ".age"


def read_passphrase(path: str) -> bytes:
    """The passphrase file's content, without its final newline (ConfigError when unreadable or empty)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"passphrase_file {path}: {e.strerror}") from None
    raw = raw[:-1] if raw.endswith(b"\n") else raw
    if not raw:
        raise ConfigError(f"passphrase_file {path} is empty")
    return raw


def read_identities(path: Path) -> list[bytes]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--identity {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        return age.parse_identities(text, source=str(path))
    except ConfigError as e:
        raise UsageError(str(e)) from None


class EncryptingTransport(Transport):
    """``inner`` with every file encrypted on the way out and decrypted on the way back."""

    def __init__(self, inner: Transport, dest: Replication, workdir: Path, *,
                 identities: Sequence[bytes] = ()) -> None:
        super().__init__(dest, workdir)
        enc = dest.encrypt
        assert enc is not None
        self.inner = inner
        self.kind = inner.kind  # type: ignore[misc]
        self.tolerance = inner.tolerance  # type: ignore[misc]
        self.readable = inner.readable  # type: ignore[misc]
        self.recipients = [age.parse_recipient(r) for r in enc.recipients]
        self.passphrase = read_passphrase(enc.passphrase_file) if enc.passphrase_file else None
        self.identities = list(identities)
        self.header = age.header_size(len(self.recipients), self.passphrase is not None and not self.recipients)
        self.stage = workdir / "encrypted"

    def where(self, rel: str = "") -> str:
        return self.inner.where(rel)

    def space(self) -> Space:
        return self.inner.space()

    def listing(self, vms: Sequence[str] | None = None) -> Listing:
        out: Listing = {}
        for rel, e in self.inner.listing(vms).items():
            if not rel.endswith(SUFFIX):
                continue  # not ours: left alone
            size = age.plain_size(e.size, self.header)
            out[rel[:-len(SUFFIX)]] = files.Entry(-1 if size is None else size, e.mtime)
        return out

    def _seal(self, src_root: Path, rel: str) -> str:
        dst = self.stage / (rel + SUFFIX)
        dst.parent.mkdir(parents=True, exist_ok=True)
        self._seal_to(src_root / rel, dst)
        return rel + SUFFIX

    def _seal_to(self, src: Path, dst: Path) -> None:
        """Encrypt ``src`` into ``dst`` with its mode and times."""
        st = src.stat()
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, SECRET_FILE_MODE)
        with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
            if self.recipients:
                age.encrypt(fin, fout, recipients=self.recipients)
            else:
                age.encrypt(fin, fout, passphrase=self.passphrase)
        os.chmod(dst, st.st_mode & 0o777)
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))

    def send(self, src_root: Path, phases: Sequence[Batch]) -> None:
        for new, updates in phases:
            todo = [(r, False) for r in new] + [(r, True) for r in updates]
            todo.sort(key=lambda t: (t[0].endswith(".cpt"), t[0]))  # a manifest before its .cpt
            if isinstance(self.inner, LocalTransport):
                self._send_local(self.inner.root, src_root, [r for r, _ in todo])
                continue
            for rel, update in todo:
                name = self._seal(src_root, rel)
                try:
                    self.inner.send(self.stage, [([], [name]) if update else ([name], [])])
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        (self.stage / name).unlink()

    def _send_local(self, root: Path, src_root: Path, rels: Sequence[str]) -> None:
        """A local replica: encrypted straight into place (a hidden ``.partial``, renamed), no staging copy."""
        names = []
        for rel in rels:
            name = rel + SUFFIX
            dst = root / name
            if files.is_secret(rel):
                ensure_secret_dir(dst.parent)
            else:
                ensure_dir(dst.parent)
            tmp = dst.with_name(f".{dst.name}{PARTIAL}")
            try:
                self._seal_to(src_root / rel, tmp)
                os.replace(tmp, dst)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                raise
            names.append(name)
        durable(root, names)

    def move(self, moves: Sequence[tuple[str, str]]) -> None:
        self.inner.move([(a + SUFFIX, b + SUFFIX) for a, b in moves])

    def remove(self, rels: Sequence[str], dirs: Sequence[str]) -> None:
        self.inner.remove([r + SUFFIX for r in rels], dirs)

    def mismatches(self, local_root: Path, rels: Sequence[str]) -> list[str]:
        """Only sizes can be compared from here (module doc); a pulled tree was checked as it was decrypted."""
        if self.identities:
            return []
        there = self.listing(sorted({files.vm_of(r) for r in rels if r != files.CATALOGUE}))
        return sorted(r for r in rels if r in there and there[r].size != (local_root / r).stat().st_size
                      or r not in there and r != files.CATALOGUE)

    def fetch(self, rels: Sequence[str], local_root: Path) -> None:
        """Fetch and decrypt: each file is written as ``.partial`` and renamed once it decrypted whole."""
        if not self.identities and (self.passphrase is None or self.recipients):
            raise UsageError(f"{self.dest.name} is encrypted: --identity FILE (an age identity of one of its "
                             "recipients) is needed to read it")
        for rel in rels:
            self.inner.fetch([rel + SUFFIX], self.stage)
            src = self.stage / (rel + SUFFIX)
            try:
                self.decrypt_file(src, local_root / rel)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    src.unlink()

    def decrypt_file(self, src: Path, dst: Path) -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        partial = dst.with_name(dst.name + ".partial")
        st = src.stat()
        try:
            with open(src, "rb") as fin, open(partial, "wb") as fout:
                age.decrypt(fin, fout, identities=self.identities,
                            passphrase=self.passphrase if not self.identities else None)
            os.chmod(partial, st.st_mode & 0o777)
            os.utime(partial, ns=(st.st_atime_ns, st.st_mtime_ns))
            os.replace(partial, dst)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
            raise

    def probe(self, rels: Sequence[str]) -> None:
        """Decrypt the header of the smallest file: a wrong identity fails here, before anything is written."""
        if not rels:
            return
        if not self.identities and (self.passphrase is None or self.recipients):
            raise UsageError(f"{self.dest.name} is encrypted: --identity FILE (an age identity of one of its "
                             "recipients) is needed to read it")
        small = min(rels, key=lambda r: (not r.endswith(".cpt"), r))
        self.inner.fetch([small + SUFFIX], self.stage)
        try:
            with open(self.stage / (small + SUFFIX), "rb") as fh:
                age.open_header(fh, identities=self.identities,
                                passphrase=self.passphrase if not self.identities else None)
        except age.AgeError as e:
            raise StorageError(f"{self.dest.name}: {small}{SUFFIX} does not decrypt: {e}") from None
        finally:
            shutil.rmtree(self.stage, ignore_errors=True)

    def secrets_allowed(self) -> tuple[bool, str]:
        return True, "encrypted (age) on the replica"

    def close(self) -> None:
        self.inner.close()
