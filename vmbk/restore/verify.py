"""``--verify`` and ``--dump``: check and show a chain's streams, as records.

vmrestore guide, section 13: ``--verify`` recomputes the adler32 of every
``.data`` file and compares it with its ``.chksum`` (what ``virtnbdrestore
-o verify`` does); vmbk also scans each stream's structure (headers,
lengths, trailer; `vmbk.stream.scan`), which a checksum written over a
truncated file would not catch.  A file without ``.chksum`` (virtnbdbackup
before 1.9.40 wrote none) is reported but not counted as bad.

``--dump`` is ``virtnbdrestore -o dump``: the meta header of each stream,
plus what the scan found (frame counts, data and stored sizes).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from vmbk.errors import VmbkError
from vmbk.records import Record, make
from vmbk.stream import file_checksum, read_checksum_file, scan
from vmbk.tree import Chain, VmTree


def all_chains(tree: VmTree, period: str | None = None) -> list[Chain]:
    """Every chain of the VM (of one period), archives included."""
    out: list[Chain] = []
    for rel, chain in tree.chains.items():
        if period is None or rel == period:
            out += [c for c in (chain, *chain.archives) if c.data]
    return out


def verify_chains(vm: str, chains: Iterable[Chain], session: str | None = None) -> Iterator[Record]:
    """One ``verify`` record per data file; ``ok`` is False for a bad one."""
    for chain in chains:
        for f in chain.data:
            path = chain.path / f.name
            rec: dict[str, Any] = {"vm": vm, "chain": chain.rel, "file": f.name, "disk": f.disk, "level": f.level,
                                   "size": f.size}
            problems: list[str] = []
            try:
                scan(path)
                rec["structure"] = "ok"
            except VmbkError as e:
                rec["structure"] = "bad"
                problems.append(str(e))
            try:
                stored = read_checksum_file(path)
                if stored is None:
                    rec["checksum"] = "missing"
                else:
                    actual = file_checksum(path)
                    rec["checksum"] = "ok" if actual == stored else "bad"
                    if actual != stored:
                        problems.append(f"{path}: adler32 is {actual}, its .chksum says {stored}")
            except VmbkError as e:
                rec["checksum"] = "bad"
                problems.append(str(e))
            yield make("verify", session, **rec, ok=not problems, problems=problems, path=str(path))


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
