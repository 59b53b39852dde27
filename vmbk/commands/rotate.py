"""vmbk-rotate: apply retention — remove periods and archives past their policy.

Usage:
  vmbk-rotate [options]
  vmbk-rotate (-h | --help | --version)

Reads `backup` records on stdin and applies each VM's retention policy to
its backup tree; emits one `rotate` record per VM; other records pass
through.

Options:
  --now ISO8601            Decide as if it were this time.
  --dry-run                Show what would be removed; remove nothing.
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

PROG = "vmbk-rotate"


def body(args: dict[str, Any], ctx: cli.Context) -> int:
    common = Common.from_args(args)
    existing_backup_path(common.config())
    return run_stage(ctx, common, {"backup"}, not_yet(PROG, "retention"), changes_state=not args["--dry-run"])


def main(argv: list[str] | None = None, stdin: IO[Any] | None = None, stdout: IO[Any] | None = None) -> int:
    return cli.run(__doc__ or "", body, argv, stdin, stdout, prog=PROG)
