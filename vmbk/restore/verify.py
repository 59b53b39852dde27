"""``--verify`` and ``--dump``: check and show a chain's streams, as records.

vmrestore guide, section 13: ``--verify`` recomputes the adler32 of every
``.data`` file and compares it with its ``.chksum`` (what ``virtnbdrestore
-o verify`` does); vmbk also scans each stream's whole structure (headers,
lengths, CRLFs, stop frame, trailer, ``dataSize``; `vmbk.stream.scan`),
which a checksum written over a truncated file would not catch, and then
the chain's: one ``verify`` record for the chain (``file`` null) carries
the problems `vmbk.tree.points` finds in its restore points -- a data
file a point needs that is gone (a deleted incremental), a ``.cpt`` that
disagrees with the files or cannot be read, stream headers naming another
checkpoint, parent or size, damaged side files.  The listing and the
restore decide with the same function.

Each record has ``status``: ``ok``, ``bad`` (damaged, missing, or the
checksum does not match) or ``unverifiable`` (a data file without a
``.chksum``: its structure is sound but its bytes cannot be checked);
``ok`` is ``status == "ok"``; a compressed stream without ``.chksum`` is
decompressed whole, so that lz4's own checksums can still find damaged
payloads.  `verdict` turns them into the exit code:
4 when anything is bad, else 9 (*partial*: everything that could be
checked is sound, some data could not be) when a file is unverifiable,
else 0.  A chain written by virtnbdbackup before 1.9.40 has no
``.chksum`` at all: its files are unverifiable, and the chain record says
why.

Manifests (`vmbk.manifest`): each stream is read once for its adler32
and its SHA-256 stream digest (`vmbk.stream.digest.file_digest`), then
one ``verify`` record per restore point (``point``) says what its
manifests say (``integrity``: good, adler32-only, unsigned, unknown-key,
missing, tampered; `vmbk.tree.points` decides, as for the listing and
the restore) and names every finding: ``missing`` and ``tampered`` are
bad, ``unsigned`` and ``unknown-key`` unverifiable, a tree without
manifests ``adler32-only`` (ok, as before).  ``deep`` also decodes what
a restore decodes: every lz4 payload (its own checksums) and each
point's merged chain of every disk.

``--dump`` is ``virtnbdrestore -o dump``: the meta header of each stream,
plus what the scan found (frame counts, data and stored sizes).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from vmbk.catalogue import Catalogue
from vmbk.errors import Exit, StorageError, VmbkError
from vmbk.manifest.check import BAD as BAD_INTEGRITY
from vmbk.manifest.check import LEGACY as ADLER32_ONLY
from vmbk.manifest.check import UNSURE
from vmbk.records import Record, make
from vmbk.stream import StreamMap, StreamReader, merge_chain, read_checksum_file, scan, verify_checksum
from vmbk.stream.digest import file_digest, plain_digest
from vmbk.tree import Chain, VmTree, names
from vmbk.tree.points import RestorePoint, chain_warnings, restore_points

log = logging.getLogger("vmbk.restore")

OK, BAD, UNVERIFIABLE = "ok", "bad", "unverifiable"
LEGACY = ("the chain has no .chksum files (virtnbdbackup before 1.9.40 wrote none): "
          "only the structure of its streams is checked")


class UnverifiedError(VmbkError):
    """Verification found nothing damaged, but some data has no checksum to be checked against."""

    code = Exit.PARTIAL
    kind = "unverifiable"


def all_chains(tree: VmTree, period: str | None = None) -> list[Chain]:
    """Every chain of the VM (of one period), archives included."""
    out: list[Chain] = []
    for rel, chain in tree.chains.items():
        if period is None or rel == period:
            out += [c for c in (chain, *chain.archives) if c.data]
    return out


def verify_chains(vm: str, chains: Iterable[Chain], session: str | None = None, *,
                  deep: bool = False) -> Iterator[Record]:
    """A ``verify`` record per data file, one per restore point, then one for each chain's structure."""
    for chain in chains:
        digests: dict[str, str | None] = {}
        for f in chain.data:
            yield _file_record(vm, chain, f.name, f.disk, f.level, f.size, session, digests, deep)
        for state in sorted(chain.path.glob(f"{names.STATE_PREFIX}*{names.STATE_SUFFIX}")):
            digests[state.name] = plain_digest(state)[0]  # a memory state: its manifest's SHA-256 is checked
        points = restore_points(chain, stream_digests=digests)
        for p in points:
            yield _point_record(vm, p, session, deep)
        yield _chain_record(vm, chain, session, points)


def _file_record(vm: str, chain: Chain, name: str, disk: str, level: str, size: int,
                 session: str | None, digests: dict[str, str | None], deep: bool = False) -> Record:
    path = chain.path / name
    rec: dict[str, Any] = {"vm": vm, "chain": chain.rel, "file": name, "disk": disk, "level": level, "size": size}
    problems: list[str] = []
    smap = None
    actual = None
    digests[name] = None
    try:  # one read: the structure first (the frames), then adler32 and the stream digest together
        digests[name], actual, smap = file_digest(path)
        rec["structure"] = OK
    except VmbkError as e:
        rec["structure"] = BAD
        problems.append(str(e))
    try:
        stored = read_checksum_file(path)
        if stored is None:
            rec["checksum"] = "missing"
        elif actual is None:  # the structure is damaged: the sum is still worth a line
            verify_checksum(path)
            rec["checksum"] = OK
        elif actual != stored:
            rec["checksum"] = BAD
            problems.append(f"{path}: adler32 of the file's {path.stat().st_size} bytes is {actual}, its .chksum "
                            f"says {stored}")
        else:
            rec["checksum"] = OK
    except VmbkError as e:
        rec["checksum"] = BAD
        problems.append(str(e))
    if smap is not None and smap.compressed and (deep or rec["checksum"] == "missing"):
        try:  # no .chksum: lz4's own block and content checksums are all there is
            _decompress_all(smap)
        except VmbkError as e:
            problems.append(str(e))
    status = BAD if problems else UNVERIFIABLE if rec["checksum"] == "missing" else OK
    if status == UNVERIFIABLE:
        problems.append(f"{path}: no .chksum: its data cannot be verified"
                        + ("" if chain.checksummed else f" ({LEGACY})"))
    return make("verify", session, **rec, status=status, ok=status == OK, problems=problems, path=str(path))


def _decompress_all(smap: StreamMap) -> None:
    """Read every compressed payload through lz4, which checks its checksums (StreamError if one fails)."""
    buf = memoryview(bytearray(1 << 20))
    with StreamReader(smap.path, smap) as reader:
        for frame in smap.data_frames:
            for start in range(0, frame.length, len(buf)):
                reader.read_frame_into(frame, buf[:min(len(buf), frame.length - start)], start)


def _point_record(vm: str, p: RestorePoint, session: str | None, deep: bool) -> Record:
    """What the manifests say of one restore point (and, ``deep``, whether its chain merges)."""
    problems = list(p.integrity_findings)
    status = BAD if p.integrity in BAD_INTEGRITY else UNVERIFIABLE if p.integrity in UNSURE else OK
    if p.integrity == ADLER32_ONLY:
        problems.append("no manifest: adler32 only (the tree was written before vmbk signed its backups, "
                        "or by another tool)")
    if deep and not p.problems:
        for disk in sorted(p.disks):
            try:
                merge_chain([scan(path) for path in p.paths(disk)])
            except VmbkError as e:
                status = BAD
                problems.append(f"{disk}: the chain does not merge: {e}")
    return make("verify", session, vm=vm, chain=p.chain.rel, file=None, point=p.index, checkpoint=p.checkpoint,
                integrity=p.integrity, signed_by=p.signed_by, status=status, ok=status == OK, problems=problems,
                path=str(p.chain.path))


def _chain_record(vm: str, chain: Chain, session: str | None, points: list[RestorePoint] | None = None) -> Record:
    points = restore_points(chain) if points is None else points
    problems = [f"restore point {p.index}: {line}" for p in points for line in p.problems]
    status = BAD if problems else UNVERIFIABLE if any(p.unverifiable for p in points) else OK
    return make(
        "verify", session, vm=vm, chain=chain.rel, file=None,
        structure=BAD if problems else OK,
        checksum=None,
        restore_points=len(points),
        incomplete_points=[p.index for p in points if p.problems],
        unverifiable_points=[p.index for p in points if p.unverifiable],
        warnings=chain_warnings(chain) + ([] if chain.checksummed else [LEGACY]),
        status=status, ok=status == OK, problems=problems, path=str(chain.path),
    )


def verdict(vm: str, records: Sequence[Record]) -> None:
    """Raise what the ``verify`` records add up to: StorageError (4), UnverifiedError (9), or nothing."""
    statuses = [r.get("status") for r in records]
    files = sum(1 for r in records if r.get("file") is not None and r.get("status") != OK)
    if BAD in statuses:
        raise StorageError(f"verification of VM {vm!r} failed: {statuses.count(BAD)} finding(s), "
                           f"{files} data file(s) not verified", vm=vm)
    if UNVERIFIABLE in statuses:
        unsure = [str(r.get("point")) for r in records if r.get("point") is not None and r.get("status") == UNVERIFIABLE]
        what = [f"{files} data file(s) have no .chksum"] if files else []
        what += [f"restore point(s) {', '.join(unsure)} are not signed by a trusted key"] if unsure else []
        raise UnverifiedError(f"VM {vm!r} cannot be verified in full: {'; '.join(what)}; nothing checked is damaged",
                              vm=vm)


def record(backup_path: Path, vm: str, records: Sequence[Record], started_at: str, t0: float, deep: bool,
           error: BaseException | None) -> None:
    """The run's ``verifications`` row (vmbk-status's ``last_verify``), if there is a catalogue.

    Never fails the verify: a read-only recovery mount has no catalogue to write.
    """
    try:
        cat = Catalogue.open_existing(backup_path)
    except VmbkError as e:
        log.warning("verify not recorded: %s", e)
        return
    if cat is None:
        return
    statuses = [r.get("status") for r in records]
    row = {
        "vm": vm, "session_id": next((r.get("session") for r in records), None), "started_at": started_at,
        "duration_s": round(time.monotonic() - t0, 3), "deep": int(deep),
        "chains": sum(1 for r in records if r.get("file") is None and r.get("point") is None),
        "points": sum(1 for r in records if r.get("point") is not None),
        "files": sum(1 for r in records if r.get("file") is not None),
        "findings": sum(1 for s in statuses if s != OK),
        "outcome": BAD if BAD in statuses or (error is not None and not isinstance(error, UnverifiedError))
        else UNVERIFIABLE if UNVERIFIABLE in statuses else OK,
        "exit_code": int(error.code) if isinstance(error, VmbkError) else 0 if error is None else int(Exit.GENERAL),
        "error": None if error is None else str(error),
    }
    try:
        with cat:
            cat.insert("verifications", row)
    except (VmbkError, sqlite3.Error, OSError) as e:
        log.warning("verify not recorded in %s: %s", cat.path, e)


def dump_chain(vm: str, chain: Chain, session: str | None = None) -> Iterator[Record]:
    """One ``dump`` record per data file: its meta header and frame counts."""
    for f in chain.data:
        path = chain.path / f.name
        rec: dict[str, Any] = {"vm": vm, "chain": chain.rel, "file": f.name, "disk": f.disk, "level": f.level}
        try:
            smap = scan(path)
        except VmbkError as e:
            yield make("dump", session, **rec, ok=False, error=str(e), path=str(path))
            continue
        yield make(
            "dump", session, **rec,
            ok=True,
            virtual_size=smap.meta.virtual_size,
            data_size=smap.data_size,
            stored_size=smap.stored_size,
            data_frames=len(smap.data_frames),
            zero_frames=len(smap.zero_frames),
            compressed=smap.compressed,
            checkpoint=smap.meta.checkpoint_name,
            parent=smap.meta.parent_checkpoint,
            date=smap.meta.date,
            meta=smap.meta.to_dict(),
            path=str(path),
        )
