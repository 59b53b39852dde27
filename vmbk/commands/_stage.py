"""The loop shared by pipeline stages: read records, handle some, pass the rest.

A stage hands `run_stage` the record types it consumes and a handler that
returns the records to emit for one input record (the input record itself
among them is passed on unchanged, as vmbk-rotate does with a ``backup``).  Failures of one VM
(`VmbkError` with ``vm`` set) become `error` records and the loop goes on;
other errors end the stage.  A consumed record of a contract version this
vmbk does not know ends the stage (exit 7); records of other types pass
whatever their version.  A stage that changes state goes on when its
stdout is closed (`vmbk.output`).
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable, Iterable

from vmbk.cancel import Cancel
from vmbk.cli import Context
from vmbk.commands._common import Common, Session, input_records, make_emitter
from vmbk.errors import VmbkError
from vmbk.output import Emitter
from vmbk.records import ReadRecord, Record

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
    after: Callable[[str], Iterable[Record]] | None = None,
    jobs: int = 1,
    cancel: Cancel | None = None,
    changes_state: bool = True,
    successes: Callable[[], int] | None = None,
) -> int:
    """Run a stage over stdin, or over ``source(session)`` when given.

    With ``jobs`` > 1 up to that many records are handled at once in
    worker threads (results come out as they finish; records passed
    through come out as they are read); an interrupt sets ``cancel`` and
    waits for the workers to clean up.  ``after(session)`` gives the
    records a stage makes once its input has ended (vmbk-replicate acts on
    the VMs of all its input at once).  ``finish(session, exit_code)``
    runs at the end (the catalogue closes the session row there).
    ``changes_state`` is False for a stage that only reads (vmbk-plan, a
    dry run): it stops when nobody reads its output any more.
    ``successes``: how many of its records were successes, when not all
    of them are (vmbk-drill's record of a failed drill).
    """
    emitter = make_emitter(ctx, common, changes_state=changes_state)
    session = Session(emitter)
    records = source(session.ensure()) if source is not None else \
        input_records(ctx, standalone=standalone, understood=consumes)

    def emit_results(results: Iterable[Record]) -> None:
        for out in results:
            if isinstance(out, ReadRecord):  # a record as read (the one handled): passed on unchanged
                emitter.passthrough(out)
            else:
                emitter.emit(out)

    def failed(e: VmbkError) -> None:
        if e.vm is None:
            raise e
        emitter.error(e)

    try:
        if jobs > 1:
            _parallel(records, consumes, handler, session, emitter, jobs, cancel or Cancel(), emit_results, failed)
        else:
            for rec in records:
                session.adopt(rec)
                if rec["type"] not in consumes:
                    emitter.passthrough(rec)
                    continue
                try:
                    emit_results(handler(rec, session.ensure()))
                except VmbkError as e:
                    failed(e)
        if after is not None:
            try:
                emit_results(after(session.ensure()))
            except VmbkError as e:
                failed(e)
    finally:
        emitter.close()
        if finish is not None and emitter.session is not None:
            finish(emitter.session, emitter.exit_code(successes() if successes else None))
    return emitter.exit_code(successes() if successes else None)


def _materialised(handler: Handler, rec: Record, session: str) -> list[Record]:
    return list(handler(rec, session))


def _parallel(records: Iterable[Record], consumes: set[str], handler: Handler, session: Session, emitter: Emitter,
              jobs: int, cancel: Cancel, emit_results: Callable[[Iterable[Record]], None],
              failed: Callable[[VmbkError], None]) -> None:
    pending: set[cf.Future[list[Record]]] = set()

    def collect(block: bool) -> None:
        done, _ = cf.wait(pending, timeout=None if block else 0, return_when=cf.FIRST_COMPLETED)
        for fut in done:
            pending.discard(fut)
            try:
                emit_results(fut.result())
            except VmbkError as e:
                failed(e)

    with cf.ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="vm") as pool:
        try:
            for rec in records:
                session.adopt(rec)
                if rec["type"] not in consumes:
                    emitter.passthrough(rec)
                    continue
                while len(pending) >= jobs:
                    collect(block=True)
                pending.add(pool.submit(_materialised, handler, rec, session.ensure()))
                collect(block=False)
            while pending:
                collect(block=True)
        except BaseException:
            cancel.set()  # workers unwind through their cleanup
            cf.wait(pending)
            raise


def not_yet(stage: str, what: str) -> Handler:
    """Handler of a stage whose work has not landed yet: an honest error."""

    def handler(rec: Record, session: str) -> Iterable[Record]:
        vm = rec.get("vm") or rec.get("name")
        raise VmbkError(f"{stage}: {what} is not implemented yet", vm=str(vm) if vm else "?")

    return handler
