"""The JSON-lines record contract between vmbk commands (see vmbk-json(7)).

One JSON object per line; every record has ``type`` (a string) and ``v``
(the contract version, an int) and, once a pipeline has started, the
``session`` id of the run.  Stages read lazily (one line at a time, so
memory does not grow with the number of VMs), handle the types they know
and pass every other record through unchanged.

This module is the contract only: building, reading, validating and
encoding records.  What a stage does with its output (JSON lines or a
table, the tally of its exit code, a reader that went away) is
`vmbk.output`'s.
"""

from __future__ import annotations

import datetime as _dt
import io
import secrets
from collections.abc import Collection, Iterable, Iterator
from typing import IO, Any

import orjson

from vmbk import RECORD_VERSION
from vmbk.errors import InputError, VmbkError

Record = dict[str, Any]

#: Input lines longer than this are refused: a record is a few KiB at most,
#: and a runaway producer must not make a stage allocate without bound.
MAX_LINE = 16 * 1024 * 1024

#: The contract versions this vmbk reads.  ``v`` is a major version: fields
#: are added without a new one, so a record of a known ``v`` with unknown
#: fields is understood; a new ``v`` means some field changed meaning.
KNOWN_VERSIONS = frozenset(range(1, RECORD_VERSION + 1))


def new_session_id(now: _dt.datetime | None = None) -> str:
    """A sortable, unique session id: UTC timestamp + 8 random hex digits."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return now.strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(4)


def make(rtype: str, session: str | None = None, **fields: Any) -> Record:
    """Build a record with ``type``, ``v`` and ``session`` first."""
    rec: Record = {"type": rtype, "v": RECORD_VERSION}
    if session is not None:
        rec["session"] = session
    rec.update(fields)
    return rec


def error_record(err: VmbkError, *, stage: str, session: str | None, vm: str | None = None) -> Record:
    """The ``error`` record for a failure of one VM (or of the stage)."""
    return make(
        "error",
        session,
        stage=stage,
        vm=vm if vm is not None else err.vm,
        kind=err.kind,
        code=int(err.code),
        message=err.message,
    )


def version(rec: Record) -> int | None:
    """The record's contract version, None when ``v`` is not an integer
    (a record without ``v`` is hand-written: the current version)."""
    v = rec.get("v", RECORD_VERSION)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def known_version(rec: Record) -> bool:
    return version(rec) in KNOWN_VERSIONS


def check_version(rec: Record, where: str) -> None:
    """Refuse a record (or a record it carries, as a plan carries its vm)
    whose contract version this vmbk does not know.

    Reading a newer record as if it were an older one would act on fields
    whose meaning changed; the stage stops instead (exit 7).
    """
    inner = [(f"{rec['type']}.{k}", val) for k, val in rec.items()
             if isinstance(val, dict) and isinstance(val.get("type"), str) and "v" in val]
    for what, r in [(str(rec["type"]), rec), *inner]:
        if not known_version(r):
            known = ", ".join(map(str, sorted(KNOWN_VERSIONS)))
            raise InputError(f"{where}: {what} record of contract version {r.get('v')!r}; this vmbk reads "
                             f"version {known} (written by a newer vmbk?)")


def _lines(stream: Any) -> Iterator[bytes | str]:
    """Lines of at most MAX_LINE + 1 bytes, so a runaway line stays bounded."""
    readline = getattr(stream, "readline", None)
    if readline is None:
        yield from stream
        return
    while True:
        line = readline(MAX_LINE + 1)
        if not line:
            return
        yield line


class ReadRecord(dict[str, Any]):
    """A record as read from a stream, with the line it came from.

    A stage passes records it does not consume on as ``raw``: unchanged,
    byte for byte, whatever its version or the producer's formatting.
    """

    __slots__ = ("raw",)
    raw: bytes


def read_records(stream: IO[bytes] | IO[str] | Iterable[bytes | str], source: str = "stdin",
                 understood: Collection[str] = ()) -> Iterator[Record]:
    """Yield records from a JSON-lines stream, one at a time.

    Blank lines are skipped.  A line that is not a JSON object with a string
    ``type`` raises `InputError` naming the line: a corrupted pipe must stop
    the stage rather than be half understood.  So does a last line cut
    short (the stage before this one died while writing), and a record of
    a type in ``understood`` whose contract version is unknown
    (`check_version`); other types pass whatever their version.
    """
    for lineno, raw in enumerate(_lines(stream), 1):
        line = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else raw
        where = f"{source} line {lineno}"
        if len(line) > MAX_LINE:
            raise InputError(f"{where}: record longer than {MAX_LINE} bytes")
        if not line.strip():
            continue
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError as e:
            if not line.endswith(b"\n"):
                raise InputError(f"{where}: the input ends in the middle of a record (did the command "
                                 "writing it die?)") from None
            raise InputError(f"{where}: not JSON ({e})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("type"), str):
            raise InputError(f"{where}: not a record (a JSON object with a 'type')")
        if version(rec) is None:
            raise InputError(f"{where}: 'v' must be an integer")
        if rec["type"] in understood:
            check_version(rec, where)
        out = ReadRecord(rec)
        out.raw = line if line.endswith(b"\n") else line + b"\n"
        yield out


def encode(rec: Record) -> bytes:
    """One record as one line of JSON, newline included."""
    return orjson.dumps(rec, option=orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS)


def encode_unchanged(rec: Record) -> bytes:
    """A record passed on: the line it was read from (`ReadRecord`), else encoded."""
    raw = getattr(rec, "raw", None)
    return bytes(raw) if raw is not None else encode(rec)


def write_bytes(out: IO[Any], data: bytes) -> None:
    """Write and flush bytes to a binary stream or to a text stream.

    sys.stdout is text with a binary ``buffer``; tests pass BytesIO or
    StringIO.  Writing to the buffer skips an encode/decode per record.
    """
    buf = getattr(out, "buffer", None)
    if buf is not None:
        buf.write(data)
        buf.flush()
    elif isinstance(out, io.TextIOBase):
        out.write(data.decode("utf-8"))
        out.flush()
    else:
        out.write(data)
        out.flush()


def stdin_is_pipe(stdin: IO[Any]) -> bool:
    """True when stdin carries records (a pipe or a file), not a terminal."""
    try:
        return not stdin.isatty()
    except (AttributeError, ValueError):
        return True


__all__ = [
    "KNOWN_VERSIONS",
    "ReadRecord",
    "Record",
    "check_version",
    "encode",
    "encode_unchanged",
    "error_record",
    "known_version",
    "make",
    "new_session_id",
    "read_records",
    "stdin_is_pipe",
    "version",
    "write_bytes",
]
