"""vmbk-backup: carry out the plan — full, incremental and copy backups.

Usage:
  vmbk-backup [options]
  vmbk-backup [options] --vm NAMES...
  vmbk-backup (-h | --help | --version)

Reads `plan` records on stdin (from vmbk-plan) and backs each VM up; given
VM names it discovers and plans those VMs itself.  Emits one `backup`
record per VM; other records pass through.  A failed VM becomes an `error`
record and the others go on.

Options:
  --vm NAMES               Back up these VMs (comma-separated or repeated).
  --jobs N                 VMs backed up at once; each VM's disks always go in parallel [default: 1].
  --now ISO8601            Plan as if it were this time (with VM names).
  --dry-run                Show what would be done; write nothing.
  --connect URI            libvirt URI [default from config, LIBVIRT_DEFAULT_URI, qemu:///system].
  --config-instance NAME   Configuration instance (also VMBK_INSTANCE).
  --backup-path DIR        Backup root; wins over the configuration.
  --json                   JSON lines even on a terminal.
  -h --help                Show this help.
  --version                Show the version.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Iterator
from typing import IO, Any

from vmbk import cli
from vmbk.backup.history import History
from vmbk.backup.vm import Options, backup_vm, check_plan
from vmbk.catalogue import Catalogue
from vmbk.cancel import Cancel
from vmbk.commands._common import Common, existing_backup_path, positive_int
from vmbk.commands._stage import run_stage
from vmbk.commands.plan import parse_now
from vmbk.discover import discover
from vmbk.errors import VmbkError
from vmbk.fsutil import UMASK
from vmbk.planner import plan_record
from vmbk.progress import board_for
from vmbk.records import Record, error_record
from vmbk.virt.backupjob import RedefineFailed
from vmbk.virt.connection import open_connection

PROG = "vmbk-backup"


def body(args: dict[str, Any], ctx: cli.Context) -> int:
    common = Common.from_args(args)
    cfg = common.config()
    root = existing_backup_path(cfg)
    dry_run = bool(args["--dry-run"])
    jobs = positive_int(args, "--jobs", 1)
    cancel = Cancel()
    board = board_for(ctx.stderr)
    now = parse_now(args.get("--now"))
    os.umask(UMASK)
    conn = open_connection(common.uri(cfg))
    history = History(None if dry_run else Catalogue.open(root))

    def options(name: str) -> Options:
        lz4 = cfg.compression_for(name) == "lz4"
        return Options(backup_path=root, compression=cfg.compression_level if lz4 else None,
                       fstrim=cfg.fstrim_for(name), dry_run=dry_run, cancel=cancel,
                       progress=board)

    def handle(plan: Record, session: str) -> Iterable[Record]:
        history.session(session)
        name = check_plan(plan)
        try:
            try:
                rec = backup_vm(plan, conn, options(name), session)
            except RedefineFailed as e:
                # The chain's bitmaps are gone from QEMU: self-heal now with
                # a new chain rather than fail every night until someone looks.
                plan = replan_without_bitmaps(plan, str(e))
                rec = backup_vm(plan, conn, options(name), session)
        except VmbkError as e:
            if e.vm is None:
                e.vm = name
            history.backup(session, plan, {"outcome": "failed"}, error=str(e))
            raise
        history.backup(session, plan, rec)
        yield rec

    def replan_without_bitmaps(plan: Record, why: str) -> Record:
        vm = copy.deepcopy(plan["vm"])
        for disk in vm.get("disks") or []:
            if "bitmaps" in disk:
                disk["bitmaps"] = []
                disk["bitmaps_source"] = "redefine-failed"
        new = plan_record(vm, cfg, root, now, plan.get("session"))
        new["reasons"] = [f"redefining the chain's checkpoints failed ({why})", *new["reasons"]]
        return new

    def planned(session: str) -> Iterator[Record]:
        for rec in discover(common.uri(cfg), cfg, names=common.vms, session=session):
            if rec["type"] != "vm":
                yield rec
                continue
            try:
                yield plan_record(rec, cfg, root, now, session)
            except VmbkError as e:
                yield error_record(e, stage=PROG, session=session, vm=rec.get("name"))

    try:
        return run_stage(ctx, common, {"plan"}, handle, source=planned if common.vms else None,
                         finish=None if dry_run else history.end, jobs=jobs, cancel=cancel)
    finally:
        conn.close()


def main(argv: list[str] | None = None, stdin: IO[Any] | None = None, stdout: IO[Any] | None = None) -> int:
    return cli.run(__doc__ or "", body, argv, stdin, stdout, prog=PROG)
