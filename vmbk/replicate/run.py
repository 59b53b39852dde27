"""vmbk-replicate's orchestration: which VMs, which destinations, in what order.

As the last stage of the pipe it passes every record on as it comes
(`handle`) and remembers the VMs of the ``backup`` and ``rotate``
records; when the input ends (`after`) it replicates those VMs to every
enabled destination (`vmbk.replicate.destinations.lanes`:
in the configured order, or the rsync and rclone groups side by side).
A VM whose records were all dry runs is replicated as a dry run.  Alone,
``--all`` (the whole tree) or ``--vm NAMES`` needs nothing from the
stages before: the path to take again after a failed replication.

``[replicate] on_failure = "abort"``: once a destination has failed, the
later destinations of its lane are not written (a ``replicate`` record
``skipped`` per VM says why); ``continue`` (the default) goes on.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import functools
import logging
import queue
import shutil
import sys
import tempfile
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path

from vmbk.catalogue import Catalogue
from vmbk.errors import UsageError, VmbkError
from vmbk.fsutil import ensure_dir
from vmbk.records import Record
from vmbk.replicate import destinations, files
from vmbk.replicate.encrypt import EncryptingTransport
from vmbk.replicate.history import History
from vmbk.replicate.pull import pull
from vmbk.replicate.push import Destination, RunOptions
from vmbk.replicate.report import PROG, error, replicate_record
from vmbk.replicate.transport import Transport
from vmbk.settings import Config, Replication

log = logging.getLogger("vmbk.replicate")

#: The records whose VMs the stage replicates (passed on all the same).
WATCHED = {"backup", "rotate"}


class ReplicateRun:
    def __init__(self, cfg: Config, root: Path, *, dest: str | None, dry_run: bool = False,
                 verify: str | None = None, catalogue: bool = True,
                 say: Callable[[str], None] | None = None, identities: Sequence[bytes] = ()) -> None:
        self.cfg = cfg
        self.root = root
        self.dest_name = dest
        self.dry_run = dry_run
        self.verify = verify
        #: ``--identity``: age identities a pull decrypts with.
        self.identities = list(identities)
        self.say = say or (lambda msg: print(f"{PROG}: {msg}", file=sys.stderr))
        #: ``catalogue``: the run records itself in ``root``'s (a pull opens the target's itself).
        self.history = History(Catalogue.open(root) if catalogue and not dry_run else None)
        #: VMs of the backup/rotate records seen, in order: whether only dry runs named them.
        self.seen: dict[str, bool] = {}

    def close(self) -> None:
        if self.history.cat is not None:
            self.history.cat.close()

    def handle(self, rec: Record, session: str) -> Iterator[Record]:
        """A ``backup`` or ``rotate`` record: passed on unchanged at once, its VM noted."""
        yield rec  # a ReadRecord: run_stage passes it on as read
        name = rec.get("name") if isinstance(rec.get("name"), str) else rec.get("vm")
        if isinstance(name, str) and name:
            dry = rec.get("outcome") == "dry-run" or rec.get("dry_run") is True
            self.seen[name] = self.seen.get(name, True) and dry

    def after(self, session: str) -> Iterator[Record]:
        """The input has ended: replicate the VMs it named."""
        real = [vm for vm, dry in self.seen.items() if not dry]
        dry = [vm for vm, dry in self.seen.items() if dry]
        yield from self.push(real, session)
        if dry:
            was, self.dry_run = self.dry_run, True
            try:
                yield from self.push(dry, session)
            finally:
                self.dry_run = was

    def options(self, session: str) -> RunOptions:
        return RunOptions(root=self.root, session=session, dry_run=self.dry_run, verify=self.verify,
                          settings=self.cfg.replication_options)

    # -- push ------------------------------------------------------------------
    def push(self, vms: Sequence[str] | None, session: str) -> Iterator[Record]:
        """Replicate ``vms`` (None: the whole tree) to the destinations."""
        if vms is not None and not vms:
            return
        dests = destinations.choose(self.cfg, self.dest_name, writing=True)
        if not dests:
            self.say("no replication destination is enabled: nothing to do")
            return
        self.history.session(session)
        lanes = destinations.lanes(dests, self.cfg.replication_options.order)
        if len(lanes) == 1:
            yield from self._lane(lanes[0], vms, session)
            return
        yield from _side_by_side([functools.partial(self._lane, lane, vms, session) for lane in lanes])

    def _lane(self, lane: list[Replication], vms: Sequence[str] | None, session: str) -> Iterator[Record]:
        failed: str | None = None
        abort = self.cfg.replication_options.on_failure == "abort"
        for dest in lane:
            if failed is not None:
                for vm in vms if vms is not None else files.source_vms(self.root):
                    yield replicate_record(session, vm, dest, dest.transport, "push", "skipped", reasons=[
                        f"destination {failed} failed and [replicate] on_failure is 'abort'"])
                continue
            d = yield from self._with(dest, session, vms, lambda d: d.push(vms))
            if abort and (d is None or d.failed):
                failed = dest.name

    def _with(self, dest: Replication, session: str, vms: Sequence[str] | None,
              work: Callable[[Destination], Iterator[Record]]) -> Generator[Record, None, Destination | None]:
        """Run ``work`` on the destination; its `Destination`, or None when it could not be opened."""
        workdir = Path(tempfile.mkdtemp(prefix=f"vmbk-replicate-{dest.name}-"))
        try:
            try:
                t = destinations.open_transport(dest, workdir)
            except VmbkError as e:
                for vm in vms if vms is not None else files.source_vms(self.root):
                    yield error(e, session=session, vm=vm, dest=dest)
                return None
            d = Destination(dest, t, self.options(session), self.history)
            try:
                yield from work(d)
            finally:
                t.close()
            return d
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    # -- verify only, pull ------------------------------------------------------
    def verify_only(self, vms: Sequence[str] | None, session: str) -> Iterator[Record]:
        dests = destinations.choose(self.cfg, self.dest_name, writing=False)
        if not dests:
            self.say("no replication destination is enabled: nothing to verify")
            return
        self.history.session(session)
        for dest in dests:
            yield from self._with(dest, session, vms, lambda d: d.verify(vms))

    def pull(self, vm: str, to: Path, session: str) -> Iterator[Record]:
        if self.dest_name is None:
            raise UsageError("--pull needs --dest NAME: the destination to pull from")
        (dest,) = destinations.choose(self.cfg, self.dest_name, writing=False)
        workdir = Path(tempfile.mkdtemp(prefix=f"vmbk-replicate-{dest.name}-"))
        try:
            t = destinations.open_transport(dest, workdir, identities=self.identities)
            try:
                yield from self._pull(dest, t, vm, to, session)
            finally:
                t.close()  # an ssh destination's master connection
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _pull(self, dest: Replication, t: Transport, vm: str, to: Path, session: str) -> Iterator[Record]:
        if isinstance(t, EncryptingTransport):  # a wrong identity fails here, before anything is written
            try:
                t.probe(sorted(t.listing([vm])))
            except VmbkError as e:
                yield error(e, session=session, vm=vm, dest=dest)
                return
        ensure_dir(to)
        if not (to / files.CATALOGUE).exists():
            # the replica's history comes first, this pull is added to it
            with contextlib.suppress(VmbkError, OSError):
                t.fetch([files.CATALOGUE], to)
        history = History(Catalogue.open(to))
        try:
            yield pull(dest, t, vm, to, session, history)
        except UsageError:
            raise
        except VmbkError as e:
            yield error(e, session=session, vm=vm, dest=dest)
        finally:
            history.close_session(session, 0)
            if history.cat is not None:
                history.cat.close()

    def end(self, session: str, code: int) -> None:
        self.history.close_session(session, code)


_DONE = object()


def _side_by_side(lanes: list[Callable[[], Iterator[Record]]]) -> Iterator[Record]:
    """Run the lanes in threads; their records come out as they are made."""
    q: queue.Queue[object] = queue.Queue()

    def drive(lane: Callable[[], Iterator[Record]]) -> None:
        try:
            for rec in lane():
                q.put(rec)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread, raised there
            q.put(e)
        finally:
            q.put(_DONE)

    with cf.ThreadPoolExecutor(max_workers=len(lanes), thread_name_prefix="lane") as pool:
        for lane in lanes:
            pool.submit(drive, lane)
        running = len(lanes)
        while running:
            item = q.get()
            if item is _DONE:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item  # type: ignore[misc]
