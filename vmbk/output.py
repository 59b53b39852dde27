"""What a stage does with the records it writes: the `Emitter`.

Records go out as JSON lines (one write and flush per record, never a half
line) when stdout is a pipe or ``--json`` is given, and as a readable table
(`vmbk.table`) on a terminal.  The emitter also counts successes and
failures, so the stage's exit code reports the worst outcome
(`vmbk.errors.exit_for_codes`).

When the reader of stdout goes away (the next stage died, ``| head``),
writing fails with EPIPE.  What happens then depends on the stage
(vmbk-json(7), "When standard output closes"):

* a stage that only reads (``changes_state=False``: discover, plan,
  status, the listings of vmbk-restore, every ``--dry-run``) stops at
  once: `OutputClosed` carries the tally so far as its exit code, and
  nothing is printed -- ``| head`` is a normal end, nothing is lost;
* a stage that changes state (vmbk-backup, vmbk-rotate, vmbk-replicate, a
  restore) does all its work regardless -- backups must not depend on a
  downstream reader -- stops writing, names on stderr every record that
  was not delivered and exits 1 (general error) when nothing else failed:
  the work is done, but the run is not, since the stages after it never
  saw those records.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import IO, Any

from vmbk import RECORD_VERSION
from vmbk.errors import Exit, VmbkError, exit_for_codes
from vmbk.records import (
    Record,
    encode,
    encode_unchanged,
    error_record,
    known_version,
    write_bytes,
)

#: Undelivered records named on stderr, at most (the rest are counted).
MAX_NAMED = 50
_FAILURES = frozenset(int(c) for c in Exit if c != Exit.OK)


class OutputClosed(BrokenPipeError):
    """Stdout of a read-only stage was closed: the stage stops with ``exit_code``."""

    def __init__(self, exit_code: int) -> None:
        super().__init__(errno.EPIPE, "standard output closed")
        self.exit_code = exit_code


class Emitter:
    """Writes a stage's records and keeps the tally for its exit code.

    ``json`` forces JSON lines; otherwise they are used unless the output is
    a terminal, where records are collected and printed as a table on
    `close` (a person reads it, the memory is bounded by what fits a screen
    of VMs).  ``changes_state`` says what a closed stdout does (module doc);
    ``stderr`` is where the undelivered records are named.
    """

    def __init__(self, out: IO[Any], *, stage: str, json: bool | None = None, session: str | None = None,
                 changes_state: bool = False, stderr: IO[Any] | None = None) -> None:
        self.stage = stage
        self.session = session
        self._out = out
        if json is None:
            json = not _isatty(out)
        self.json = json
        self.changes_state = changes_state
        self._stderr = stderr
        self._table: list[Record] = []
        self.successes = 0
        self.failure_codes: list[int] = []
        #: Records not delivered because stdout was closed (names, then a count).
        self.undelivered: list[str] = []
        self.undelivered_count = 0
        self.closed = False

    # -- output -------------------------------------------------------------
    def _write(self, rec: Record, data: bytes | None = None) -> None:
        if self.closed:
            self._lost([rec])
        elif self.json:
            try:
                # One write per record: a reader never sees half a line.
                write_bytes(self._out, data if data is not None else encode(rec))
            except BrokenPipeError:
                self._reader_gone([rec])
        else:
            self._table.append(rec)

    def emit(self, rec: Record) -> None:
        """Emit a record this stage produced; it counts as one success."""
        if self.session is not None and "session" not in rec:
            rec = {"type": rec.get("type"), "v": rec.get("v", RECORD_VERSION), "session": self.session, **rec}
        # Counted once written (or lost by a stage that goes on): a read-only
        # stage that stops reports what it delivered.
        self._write(rec)
        if rec.get("type") == "error":
            self.failure_codes.append(_failure_code(rec))
        else:
            self.successes += 1

    def passthrough(self, rec: Record) -> None:
        """Pass a record of another stage on unchanged; errors still count."""
        self._write(rec, encode_unchanged(rec))
        if rec.get("type") == "error":
            self.failure_codes.append(_failure_code(rec))

    def error(self, err: VmbkError, vm: str | None = None) -> None:
        """Emit the ``error`` record of a failure and go on."""
        self.emit(error_record(err, stage=self.stage, session=self.session, vm=vm))

    def exit_code(self, successes: int | None = None) -> int:
        """The stage's exit status; ``successes``: the stage counts them itself
        (vmbk-drill: a failed drill's record is no success, its error record the failure)."""
        code = exit_for_codes(self.failure_codes, self.successes if successes is None else successes)
        if code == Exit.OK and self.undelivered_count:
            return int(Exit.GENERAL)
        return int(code)

    def close(self) -> None:
        """Print the table (terminal), or name the records that were not delivered."""
        if not self.json and self._table and not self.closed:
            from vmbk.table import render, wants_colour

            rows, self._table = self._table, []
            try:
                write_bytes(self._out, render(rows, colour=wants_colour(self._out)).encode("utf-8"))
            except BrokenPipeError:
                self._reader_gone(rows)
        if self.undelivered_count:
            more = self.undelivered_count - len(self.undelivered)
            names = ", ".join(self.undelivered) + (f" and {more} more" if more > 0 else "")
            self._say(f"{self.undelivered_count} record(s) not delivered, standard output was closed: {names}")

    # -- a reader that went away --------------------------------------------
    def _reader_gone(self, recs: list[Record]) -> None:
        self.closed = True
        if not self.changes_state:
            raise OutputClosed(self.exit_code())
        self._say("standard output was closed (the command reading it stopped); the work goes on, "
                  "its records are not delivered")
        self._lost(recs)

    def _lost(self, recs: list[Record]) -> None:
        if not self.changes_state:
            raise OutputClosed(self.exit_code())
        for rec in recs:
            self.undelivered_count += 1
            if len(self.undelivered) < MAX_NAMED:
                self.undelivered.append(describe(rec))

    def _say(self, message: str) -> None:
        err = self._stderr if self._stderr is not None else sys.stderr
        try:
            err.write(f"{self.stage}: {message}\n")
            err.flush()
        except (OSError, ValueError):
            pass


def describe(rec: Record) -> str:
    """``backup of 'web'``: a record named for a person."""
    what = str(rec.get("type"))
    name = rec.get("name") if isinstance(rec.get("name"), str) else rec.get("vm")
    return f"{what} of {name!r}" if isinstance(name, str) else what


def _failure_code(rec: Record) -> int:
    """The exit code an ``error`` record stands for.

    Read only from a record of a known version and when it is a code of the
    table; otherwise the error still counts, as a general one.
    """
    code = rec.get("code")
    if known_version(rec) and isinstance(code, int) and not isinstance(code, bool) and code in _FAILURES:
        return code
    return int(Exit.GENERAL)


def _isatty(out: IO[Any]) -> bool:
    try:
        return out.isatty()
    except (AttributeError, ValueError):
        return False


def getenv_json() -> bool:
    """``VMBK_JSON=1`` forces JSON output even on a terminal."""
    return os.environ.get("VMBK_JSON", "") not in ("", "0")


__all__ = ["Emitter", "OutputClosed", "describe", "getenv_json"]
