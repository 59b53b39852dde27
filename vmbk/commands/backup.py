"""vmbk-backup: carry out the plan — full, incremental and copy backups.

Usage:
  vmbk-backup [options]
  vmbk-backup [options] --vm NAMES...
  vmbk-backup (-h | --help | --version)

Reads `plan` records on stdin (from vmbk-plan) and backs each VM up; given
VM names it discovers and plans those VMs itself.  Emits one `backup` record
per VM; other records pass through.

Options:
  --vm NAMES               Back up these VMs (comma-separated or repeated).
  --jobs N                 VMs backed up at once [default: 1].
  --dry-run                Show what would be done; write nothing.
  --connect URI            libvirt URI [default from config, LIBVIRT_DEFAULT_URI, qemu:///system].
  --config-instance NAME   Configuration instance (also VMBK_INSTANCE).
  --backup-path DIR        Backup root; wins over the configuration.
  --json                   JSON lines even on a terminal.
  -h --help                Show this help.
  --version                Show the version.
"""

from __future__ import annotations

from typing import IO, Any

from vmbk import cli
from vmbk.commands._common import Common, existing_backup_path, positive_int
from vmbk.commands._stage import not_yet, run_stage

PROG = "vmbk-backup"


def body(args: dict[str, Any], ctx: cli.Context) -> int:
    common = Common.from_args(args)
    positive_int(args, "--jobs", 1)
    existing_backup_path(common.config())
    return run_stage(ctx, common, {"plan"}, not_yet(PROG, "backup"))


def main(argv: list[str] | None = None, stdin: IO[Any] | None = None, stdout: IO[Any] | None = None) -> int:
    return cli.run(__doc__ or "", body, argv, stdin, stdout, prog=PROG)
