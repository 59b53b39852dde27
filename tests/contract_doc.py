"""The record contract as man/vmbk-json.7 writes it down, for the tests that
hold the code to it (tests/unit/test_docs.py and the libvirt one in
tests/integration/test_contract_docs.py).

Under RECORD TYPES the page has one ``.SS`` subsection per record type;
each field is a ``.TP`` entry whose tag is ``.B <path>``, a jq-like path:
``name``, ``firmware.type`` (a key of an object), ``disks[].target`` (a
key of the objects in a list).  `undocumented` lists every path a record
really has that its subsection does not; an object the page declares as
a whole record of another type (``plan.vm`` is the ``vm`` record it was
planned from) is checked against that type's subsection.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

PAGE = Path(__file__).resolve().parents[1] / "man" / "vmbk-json.7"
#: Fields every record has, documented once under FIELDS EVERY RECORD HAS.
COMMON = {"type", "v", "session"}
#: Objects that are whole records of another type.
EMBEDDED = {("plan", "vm"): "vm"}


def documented(page: Path = PAGE) -> dict[str, set[str]]:
    """Record type -> the field paths its subsection documents."""
    text = page.read_text().replace("\\-", "-").replace("\\&", "")
    body = text.split("\n.SH RECORD TYPES", 1)[1].split("\n.SH ", 1)[0]
    out: dict[str, set[str]] = {}
    for section in body.split("\n.SS ")[1:]:
        head, _, rest = section.partition("\n")
        rtype = head.strip().strip('"')
        out[rtype] = set(re.findall(r"^\.T[PQ]\n\.B (\S+)$", rest, re.M))
    return out


def paths(rec: dict[str, Any], prefix: str = "") -> Iterator[str]:
    """Every field path of ``rec`` (``a``, ``a.b``, ``a[].b``, ...)."""
    for key, value in rec.items():
        path = prefix + key
        yield path
        if isinstance(value, dict):
            yield from paths(value, path + ".")
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    yield from paths(item, path + "[].")


def undocumented(records: Iterable[dict[str, Any]], page: Path = PAGE) -> dict[str, list[str]]:
    """Record type -> field paths that real records have and the page does not name."""
    docs = documented(page)
    missing: dict[str, set[str]] = {}

    def check(rtype: str, rec: dict[str, Any]) -> None:
        known = docs.get(rtype)
        if known is None:
            missing.setdefault(rtype, set()).add("(no subsection)")
            return
        inner = {k: v for k, v in rec.items() if (rtype, k) in EMBEDDED and isinstance(v, dict)}
        outer = {k: v for k, v in rec.items() if k not in inner and k not in COMMON}
        for path in paths(outer):
            if path not in known:
                missing.setdefault(rtype, set()).add(path)
        for key, value in inner.items():
            if key not in known:
                missing.setdefault(rtype, set()).add(key)
            check(EMBEDDED[(rtype, key)], value)

    for rec in records:
        check(str(rec["type"]), rec)
    return {t: sorted(p) for t, p in sorted(missing.items())}
