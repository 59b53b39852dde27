"""vmbk-drill over a stream of backup records, or over the VMs named.

As a stage (`DrillRun.handle`), a ``backup`` record is passed on first,
then, when that backup went well, the point it just made is drilled.
Standalone (``--vm``/``--all``: `DrillRun.requests`), the points
``--point`` and ``--sample`` choose (`vmbk.drill.points`) become one
request each, so ``--jobs N`` runs N drills at once whichever VMs they
are of; drills of one VM take its lock in turn (`restore_lock`).  VMs
whose ``[drill.vm."NAME"]`` says ``exclude`` are drilled only when named.

Before the first drill, `sweep` removes what killed drills left
(`vmbk.drill.leftovers`).  Each drill gives one ``drill`` record and, when
it did not pass, an ``error`` record (kind ``drill``, the exit status of
its first failed check): the stage's exit status counts the drills that
passed as its successes (`passed`), so a run where every drill failed
exits with their code, not 9.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from vmbk.cancel import Cancel
from vmbk.drill import leftovers, one
from vmbk.drill.history import History
from vmbk.drill.one import DrillOptions
from vmbk.drill.points import PointSpec, Target, choose, from_backup
from vmbk.errors import VmbkError, VmError
from vmbk.records import Record, error_record
from vmbk.settings import Config
from vmbk.tree import names, scan_vm, vm_dirs
from vmbk.virt.connection import LibvirtError, open_connection

log = logging.getLogger("vmbk.drill")

PROG = "vmbk-drill"
#: The records `requests` hands to `handle_request` (never written: run_stage consumes them).
REQUEST = "drill_request"


class DrillRun:
    """One vmbk-drill run: the configuration, the backup root, how drills go, the catalogue."""

    def __init__(self, cfg: Config, root: Path, uri: str, opts: DrillOptions, spec: PointSpec, sample: int,
                 cancel: Cancel) -> None:
        self.cfg, self.root, self.uri, self.opts = cfg, root, uri, opts
        self.spec, self.sample, self.cancel = spec, sample, cancel
        self.history = History(root)
        self._passed = 0
        self._mutex = threading.Lock()
        self._vm_locks: dict[str, threading.Lock] = {}

    @property
    def passed(self) -> int:
        return self._passed

    def close(self) -> None:
        self.history.close()

    def end(self, session: str, code: int) -> None:
        self.history.end(session, code)

    def sweep(self) -> list[str]:
        """Remove what killed drills left (without libvirt: markers stay for a run that has it)."""
        try:
            conn = open_connection(self.uri)
        except VmbkError as e:
            log.warning("leftovers of killed drills not looked for: %s", e)
            return []
        try:
            return leftovers.sweep(conn)
        finally:
            conn.close()

    # -- where the drills come from ----------------------------------------------------------
    def handle(self, rec: Record, session: str) -> Iterator[Record]:
        """A ``backup`` record: passed on unchanged, then the point it made drilled."""
        yield rec  # a ReadRecord: run_stage passes it on as read
        name = rec.get("name")
        if rec.get("outcome") != "ok" or not isinstance(name, str) or self.cfg.drill.vm(name).exclude:
            return
        check_vm(name)
        yield from self._drill(from_backup(scan_vm(self.root, name), rec), session)

    def requests(self, vms: Iterable[str], session: str) -> Iterator[Record]:
        """``--vm``/``--all``: one request per point to drill, or an ``error`` record per VM."""
        for vm in vms:
            try:
                check_vm(vm)
                tree = scan_vm(self.root, vm)
                if not tree.exists:
                    raise VmError(f"no backups of VM {vm!r} under {self.root}", vm=vm)
                for target in choose(tree, self.spec, self.sample):
                    yield {"type": REQUEST, "target": target}
            except VmbkError as e:
                yield error_record(e, stage=PROG, session=session, vm=e.vm or vm)

    def handle_request(self, rec: Record, session: str) -> Iterator[Record]:
        yield from self._drill(rec["target"], session)

    def all_vms(self) -> list[str]:
        return [e.name for e in vm_dirs(self.root) if not self.cfg.drill.vm(e.name).exclude]

    # -- one drill ------------------------------------------------------------------------------------
    def _drill(self, target: Target, session: str) -> Iterator[Record]:
        self.history.session(session)
        with self._mutex:
            lock = self._vm_locks.setdefault(target.vm, threading.Lock())
        try:
            result = one.drill(self.root, target, self.opts, self.cfg.drill.vm(target.vm), uri=self.uri,
                               session=session, history=self.history, cancel=self.cancel, restore_lock=lock)
        except LibvirtError as e:
            raise LibvirtError(e.message, vm=e.vm or target.vm) from None
        if result.error is None:
            with self._mutex:
                self._passed += 1
        yield result.record
        if result.error is not None:
            yield error_record(result.error, stage=PROG, session=session)


def check_vm(vm: str) -> None:
    """A VM name is a directory name right below the backup root."""
    if not names.is_vm_dir_name(vm) or "/" in vm or "\0" in vm or vm in (".", ".."):
        raise VmError(f"VM name {vm!r} cannot be a backup directory name", vm=vm)
