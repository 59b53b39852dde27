"""The JSON-lines record contract between vmbk commands (see vmbk-json(7)).

One JSON object per line; every record has ``type`` (a string) and ``v``
(the contract version, an int) and, once a pipeline has started, the
``session`` id of the run.  Stages read lazily (one line at a time, so
memory does not grow with the number of VMs), handle the types they know
and pass every other record through unchanged.

Output goes through an `Emitter`: JSON lines (flushed per record, never a
half line) when stdout is a pipe or ``--json`` is given, a readable table
when stdout is a terminal.  The emitter also counts successes and failures
so the stage's exit code reports the worst outcome (`vmbk.errors`).
"""

from __future__ import annotations

import datetime as _dt
import io
import os
import secrets
from collections.abc import Iterable, Iterator
from typing import IO, Any

import orjson

from vmbk import RECORD_VERSION
from vmbk.errors import InputError, VmbkError, exit_for_codes

Record = dict[str, Any]

#: Input lines longer than this are refused: a record is a few KiB at most,
#: and a runaway producer must not make a stage allocate without bound.
MAX_LINE = 16 * 1024 * 1024


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


def read_records(stream: IO[bytes] | IO[str] | Iterable[bytes | str], source: str = "stdin") -> Iterator[Record]:
    """Yield records from a JSON-lines stream, one at a time.

    Blank lines are skipped.  A line that is not a JSON object with a string
    ``type`` raises `InputError` naming the line: a corrupted pipe must stop
    the stage rather than be half understood.
    """
    for lineno, raw in enumerate(_lines(stream), 1):
        line = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else raw
        if len(line) > MAX_LINE:
            raise InputError(f"{source} line {lineno}: record longer than {MAX_LINE} bytes")
        if not line.strip():
            continue
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError as e:
            raise InputError(f"{source} line {lineno}: not JSON ({e})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("type"), str):
            raise InputError(f"{source} line {lineno}: not a record (a JSON object with a 'type')")
        if not isinstance(rec.get("v", RECORD_VERSION), int):
            raise InputError(f"{source} line {lineno}: 'v' must be an integer")
        yield rec


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


class Emitter:
    """Writes a stage's records and keeps the tally for its exit code.

    ``json`` forces JSON lines; otherwise they are used unless the output is
    a terminal, where records are collected and printed as a table on
    `close` (a person reads it, the memory is bounded by what fits a screen
    of VMs).
    """

    def __init__(self, out: IO[Any], *, stage: str, json: bool | None = None, session: str | None = None) -> None:
        self.stage = stage
        self.session = session
        self._out = out
        if json is None:
            json = not _isatty(out)
        self.json = json
        self._table: list[Record] = []
        self.successes = 0
        self.failure_codes: list[int] = []

    # -- output -------------------------------------------------------------
    def _write(self, rec: Record) -> None:
        if self.json:
            # One write per record: a reader never sees half a line.
            write_bytes(self._out, orjson.dumps(rec, option=orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS))
        else:
            self._table.append(rec)

    def emit(self, rec: Record) -> None:
        """Emit a record this stage produced; it counts as one success."""
        if self.session is not None and "session" not in rec:
            rec = {"type": rec.get("type"), "v": rec.get("v", RECORD_VERSION), "session": self.session, **rec}
        if rec.get("type") == "error":
            self.failure_codes.append(int(rec.get("code", 1)))
        else:
            self.successes += 1
        self._write(rec)

    def passthrough(self, rec: Record) -> None:
        """Pass a record of another stage on unchanged; errors still count."""
        if rec.get("type") == "error":
            self.failure_codes.append(int(rec.get("code", 1)))
        self._write(rec)

    def error(self, err: VmbkError, vm: str | None = None) -> None:
        """Emit the ``error`` record of a failure and go on."""
        self.emit(error_record(err, stage=self.stage, session=self.session, vm=vm))

    def exit_code(self) -> int:
        return int(exit_for_codes(self.failure_codes, self.successes))

    def close(self) -> None:
        if not self.json and self._table:
            from vmbk.table import render

            write_bytes(self._out, render(self._table).encode("utf-8"))
            self._table.clear()


def _isatty(out: IO[Any]) -> bool:
    try:
        return out.isatty()
    except (AttributeError, ValueError):
        return False


def stdin_is_pipe(stdin: IO[Any]) -> bool:
    """True when stdin carries records (a pipe or a file), not a terminal."""
    try:
        return not stdin.isatty()
    except (AttributeError, ValueError):
        return True


def getenv_json() -> bool:
    """``VMBK_JSON=1`` forces JSON output even on a terminal."""
    return os.environ.get("VMBK_JSON", "") not in ("", "0")


__all__ = [
    "Emitter",
    "Record",
    "error_record",
    "make",
    "new_session_id",
    "read_records",
    "stdin_is_pipe",
]
