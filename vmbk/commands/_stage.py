"""The loop shared by pipeline stages: read records, handle some, pass the rest.

A stage hands `run_stage` the record types it consumes and a handler that
returns the records to emit for one input record.  Failures of one VM
(`VmbkError` with ``vm`` set) become `error` records and the loop goes on;
other errors end the stage.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from vmbk.cli import Context
from vmbk.commands._common import Common, Session, input_records, make_emitter
from vmbk.errors import VmbkError
from vmbk.records import Record

Handler = Callable[[Record, str], Iterable[Record]]


def run_stage(
    ctx: Context,
    common: Common,
    consumes: set[str],
    handler: Handler,
    *,
    standalone: bool = False,
    source: Callable[[str], Iterable[Record]] | None = None,
    finish: Callable[[str, int], None] | None = None,
) -> int:
    """Run a stage over stdin, or over ``source(session)`` when given.

    ``finish(session, exit_code)`` runs at the end (the catalogue closes
    the session row there).
    """
    emitter = make_emitter(ctx, common)
    session = Session(emitter)
    records = source(session.ensure()) if source is not None else input_records(ctx, standalone=standalone)
    try:
        for rec in records:
            session.adopt(rec)
            if rec["type"] not in consumes:
                emitter.passthrough(rec)
                continue
            try:
                for out in handler(rec, session.ensure()):
                    emitter.emit(out)
            except VmbkError as e:
                if e.vm is None:
                    raise
                emitter.error(e)
    finally:
        emitter.close()
        if finish is not None and emitter.session is not None:
            finish(emitter.session, emitter.exit_code())
    return emitter.exit_code()


def not_yet(stage: str, what: str) -> Handler:
    """Handler of a stage whose work has not landed yet: an honest error."""

    def handler(rec: Record, session: str) -> Iterable[Record]:
        vm = rec.get("vm") or rec.get("name")
        raise VmbkError(f"{stage}: {what} is not implemented yet", vm=str(vm) if vm else "?")

    return handler
