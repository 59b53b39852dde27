"""vmbk-plan: decide tonight's backup of each VM (full, inc, copy or skip).

Usage:
  vmbk-plan [options]
  vmbk-plan (-h | --help | --version)

Reads `vm` records on stdin (from vmbk-discover), looks at each VM's backup
tree and emits one `plan` record per VM: the action (full, inc, copy or
skip), the period directory, the chain to archive first, the checkpoint
to create and its parent, checkpoints to redefine or delete, and the
reasons.  Other records pass through.  Never writes anything.  A running
VM with memory = "full" in its [vm.NAME] section gets a full each time,
the chain before it archived, so that every restore point carries its
memory state (vmbk-backup --with-memory).

  vmbk-discover | vmbk-plan | vmbk-backup
  vmbk-plan --now 2026-03-02T22:00:00Z < saved-vm-records.jsonl

Options:
  --now ISO8601            Decide as if it were then (default now; no offset: local time).
  --config-instance NAME   Configuration instance (also VMBK_INSTANCE).
  --backup-path DIR        Backup root; wins over the configuration.
  --json                   JSON lines even on a terminal.
  -h --help                Show this help.
  --version                Show the version.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import IO, Any

from vmbk import cli
from vmbk.commands._common import Common, existing_backup_path, parse_now
from vmbk.commands._stage import run_stage
from vmbk.planner import plan_record
from vmbk.records import Record

PROG = "vmbk-plan"


def body(args: dict[str, Any], ctx: cli.Context) -> int:
    common = Common.from_args(args)
    now = parse_now(args.get("--now"))
    cfg = common.config()
    root = existing_backup_path(cfg)

    def handle(rec: Record, session: str) -> Iterable[Record]:
        yield plan_record(rec, cfg, root, now, session)

    return run_stage(ctx, common, {"vm"}, handle, changes_state=False)


def main(argv: list[str] | None = None, stdin: IO[Any] | None = None, stdout: IO[Any] | None = None) -> int:
    return cli.run(__doc__ or "", body, argv, stdin, stdout, prog=PROG)
