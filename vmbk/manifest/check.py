"""A chain's manifests against its files: what each point can be trusted for.

Each point's own manifest is judged first (`judge`), then a point takes
the worst of its own and of every point before it (a full chain's point
*n* restores from the files of points 0..*n*; `vmbk.tree.points` does
that).  The statuses, from best to worst:

``good``          signed by a trusted key, the hash chain holds, every
                  file there with its size (and, when hashed, its SHA-256);
``adler32-only``  no manifest, in a chain vmbk wrote before it had them,
                  or another tool's: only the ``.chksum`` vouches for it;
``unsigned``      a manifest without a signature (a host without a key);
``unknown-key``   signed by a key this host does not trust
                  (`vmbk.manifest.keys.trusted`);
``missing``       a file the manifest lists is gone, or the manifest
                  itself where the chain says there must be one (an
                  earlier point has one, or the point's streams say vmbk
                  wrote them with one);
``tampered``      a file differs from its manifest, the manifest does not
                  parse or its signature does not check, it describes
                  another point, or the hash chain is broken (its
                  ``parent`` is not the SHA-256 of the previous point's
                  manifest: a point replaced, re-signed or taken out).

``missing`` and ``tampered`` are *bad* (verify exit 4); ``unsigned`` and
``unknown-key`` cannot be vouched for (exit 9).  Every finding names the
file.

What is hashed where: the listing (and so a restore's plan) checks the
signature, the chain, every file's presence and size and the SHA-256 of
every file that is not a stream (a few KiB each: XMLs, ``.chksum``,
NVRAM, ``.cpt``, TPM state); streams are hashed by ``--verify`` (on the
same read as their adler32, `vmbk.stream.digest.file_digest`) and by a
restore, alongside the write (`vmbk.restore.checker`).  ``mutable``
entries (the ``.cpt``, the TPM state) are rewritten by later points, so
only the chain's newest manifest is held to them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from vmbk.manifest import keys, sign
from vmbk.stream.digest import plain_digest
from vmbk.tree import names

GOOD, LEGACY, UNSIGNED, UNKNOWN_KEY, MISSING, TAMPERED = (
    "good", "adler32-only", "unsigned", "unknown-key", "missing", "tampered")
ORDER = (GOOD, LEGACY, UNSIGNED, UNKNOWN_KEY, MISSING, TAMPERED)
BAD = frozenset({MISSING, TAMPERED})
UNSURE = frozenset({UNSIGNED, UNKNOWN_KEY})


def worst(statuses: Sequence[str]) -> str:
    return max(statuses, key=ORDER.index) if statuses else GOOD


@dataclasses.dataclass(frozen=True)
class Judgement:
    """One point's own manifest: its status, findings (lines) and signer."""

    status: str
    findings: tuple[str, ...] = ()
    manifest: str | None = None  # file name
    key: str | None = None  # fingerprint of the signer
    created: str | None = None

    def with_findings(self, status: str, *lines: str) -> Judgement:
        return dataclasses.replace(self, status=worst([self.status, status]), findings=self.findings + lines)


class ChainManifests:
    """The manifests of one chain directory, read once.

    ``trusted``: base64 public keys (default: the key
    directory's).  ``stream_digests``: name -> stream digest already taken
    (``--verify``): then streams are held to their SHA-256 too.
    """

    def __init__(self, path: Path, *, trusted: Mapping[str, str] | None = None,
                 stream_digests: Mapping[str, str | None] | None = None,
                 hash_files: bool = True) -> None:
        self.path = path
        self.trusted = keys.trusted() if trusted is None else trusted
        self.stream_digests = stream_digests
        self.hash_files = hash_files
        self.names = self._names()
        self._parsed: dict[str, sign.Manifest | str] = {}
        self._digests: dict[str, str | None] = {}

    def _names(self) -> dict[str, str]:
        out: dict[str, str] = {}
        try:
            for entry in self.path.iterdir():
                ident = names.manifest_ident(entry.name)
                if ident is not None and entry.is_file():
                    out[ident] = entry.name
        except OSError:
            pass
        return out

    @property
    def any(self) -> bool:
        return bool(self.names)

    def newest(self) -> str | None:
        """The ident of the manifest with the highest index (a copy's for a copy chain)."""
        best: tuple[int, str] | None = None
        for ident in self.names:
            n = names.checkpoint_number(ident)
            key = (-1 if n is None else n, ident)
            if best is None or key > best:
                best = key
        return best[1] if best else None

    def parsed(self, ident: str) -> sign.Manifest | str | None:
        """The manifest of a point, its parse error (str), or None when there is none."""
        if ident not in self.names:
            return None
        if ident not in self._parsed:
            try:
                self._parsed[ident] = sign.decode((self.path / self.names[ident]).read_bytes())
            except OSError as e:
                self._parsed[ident] = f"cannot read: {e.strerror}"
            except sign.ManifestError as e:
                self._parsed[ident] = str(e)
        return self._parsed[ident]

    def file_digest(self, name: str) -> str | None:
        if name not in self._digests:
            try:
                self._digests[name] = plain_digest(self.path / name)[0]
            except OSError:
                self._digests[name] = None
        return self._digests[name]

    def judge(self, index: int, ident: str, own: Sequence[str], required: bool,
              previous: str | None, last: bool = True) -> Judgement:
        """The point's own manifest; ``previous``: the ident of point ``index - 1`` (None: first).

        ``own``: the data files the point added; ``required``: the point
        must have a manifest (its streams say vmbk wrote one: a point
        another tool added to the chain has none, and is adler32-only);
        ``last``: it is the chain's newest point, so its manifest must
        describe the ``.cpt`` and the TPM state as they are now.
        """
        name = names.manifest_name(ident)
        m = self.parsed(ident)
        if m is None:
            if required:
                return Judgement(MISSING, (f"{name} is missing: the point's files are not vouched for "
                                           f"(it was removed, or its backup did not commit)",), name)
            return Judgement(LEGACY, (), None)
        if isinstance(m, str):
            return Judgement(TAMPERED, (f"{name} is damaged: {m}",), name)
        j = Judgement(GOOD, (), name, m.fingerprint, str(m.body.get("created") or "") or None)
        if not m.signed:
            j = j.with_findings(UNSIGNED, f"{name} is not signed (the host that wrote it had no key)")
        elif not m.signature_ok():
            j = j.with_findings(TAMPERED, f"{name}: its signature does not check (the manifest was altered)")
        elif m.key not in self.trusted:
            j = j.with_findings(UNKNOWN_KEY, f"{name} is signed by key {m.fingerprint}, which this host does not "
                                             f"trust (put its public key in {keys.key_dir()}/{keys.TRUSTED}/)")
        if m.checkpoint != (None if ident == "copy" else ident) or m.body.get("index") != index:
            j = j.with_findings(TAMPERED, f"{name} describes checkpoint {m.checkpoint!r} (point "
                                          f"{m.body.get('index')!r}), not this point: a manifest was swapped")
        j = self._chain(j, name, m, previous)
        return self._files(j, name, m, own, newest=last and self.newest() == ident)

    def _chain(self, j: Judgement, name: str, m: sign.Manifest, previous: str | None) -> Judgement:
        if previous is None:
            return j
        prev = self.parsed(previous)
        if prev is None:
            if m.parent is not None:
                return j.with_findings(TAMPERED, f"{name}: the hash chain is broken: the manifest of the point "
                                                 f"before it ({names.manifest_name(previous)}) is gone")
            return j
        expected = None if isinstance(prev, str) else prev.digest
        if m.parent != expected:
            return j.with_findings(TAMPERED, f"{name}: the hash chain is broken: it names another parent than "
                                             f"{names.manifest_name(previous)} (a point was replaced, re-signed or "
                                             f"taken out)")
        return j

    def _files(self, j: Judgement, name: str, m: sign.Manifest, own: Sequence[str], *, newest: bool) -> Judgement:
        listed = {f.name for f in m.files}
        for extra in sorted(set(own) - listed):
            j = j.with_findings(TAMPERED, f"{extra} is not in {name}")
        for f in m.files:
            if f.kind == sign.MUTABLE and not newest:
                continue
            path = self.path / f.name
            try:
                size = path.stat().st_size
            except OSError:
                j = j.with_findings(MISSING, f"{f.name} is missing (listed in {name})")
                continue
            if size != f.size:
                j = j.with_findings(TAMPERED, f"{f.name} has {size} bytes, {name} says {f.size}")
                continue
            if f.kind == sign.STREAM:
                if self.stream_digests is None:
                    continue
                got = self.stream_digests.get(f.name)
            elif self.hash_files:
                got = self.file_digest(f.name)
            else:
                continue
            if got is not None and got != f.sha256:
                j = j.with_findings(TAMPERED, f"{f.name} does not match its SHA-256 in {name}")
        return j


def stream_digests(path: Path) -> dict[str, str]:
    """Every stream's digest the chain's readable manifests give (name -> SHA-256 stream digest)."""
    cm = ChainManifests(path, trusted={})
    out: dict[str, str] = {}
    for ident in cm.names:
        m = cm.parsed(ident)
        if isinstance(m, sign.Manifest):
            out.update({f.name: f.sha256 for f in m.files if f.kind == sign.STREAM})
    return out


def combine(own: Sequence[Judgement], label: Callable[[int], str]) -> tuple[str, tuple[str, ...]]:
    """A point's status from its own judgement (last) and its ancestors', with their findings labelled."""
    status = worst([j.status for j in own])
    lines: list[str] = []
    for i, j in enumerate(own):
        prefix = "" if i == len(own) - 1 else f"{label(i)}: "
        lines += [prefix + f for f in j.findings]
    return status, tuple(dict.fromkeys(lines))
