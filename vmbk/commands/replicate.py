"""vmbk-replicate: copy the backup tree to the configured destinations.

Usage:
  vmbk-replicate [options]
  vmbk-replicate (-h | --help | --version)

Reads `backup`/`rotate` records on stdin and replicates the trees of those
VMs (rsync to local or ssh destinations, rclone to cloud remotes); emits
one `replicate` record per VM and destination; other records pass through.

Options:
  --dest NAME              Only this destination.
  --dry-run                Show what would be copied; copy nothing.
  --config-instance NAME   Configuration instance (also VMBK_INSTANCE).
  --backup-path DIR        Backup root; wins over the configuration.
  --json                   JSON lines even on a terminal.
  -h --help                Show this help.
  --version                Show the version.
"""

from __future__ import annotations

from typing import IO, Any

from vmbk import cli
from vmbk.commands._common import Common, existing_backup_path
from vmbk.commands._stage import not_yet, run_stage

PROG = "vmbk-replicate"


def body(args: dict[str, Any], ctx: cli.Context) -> int:
    common = Common.from_args(args)
    existing_backup_path(common.config())
    return run_stage(ctx, common, {"backup", "rotate"}, not_yet(PROG, "replication"),
                     changes_state=not args["--dry-run"])


def main(argv: list[str] | None = None, stdin: IO[Any] | None = None, stdout: IO[Any] | None = None) -> int:
    return cli.run(__doc__ or "", body, argv, stdin, stdout, prog=PROG)
