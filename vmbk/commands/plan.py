"""vmbk-plan: decide tonight's backup of each VM (full, inc, copy or skip).

Usage:
  vmbk-plan [options]
  vmbk-plan (-h | --help | --version)

Reads `vm` records on stdin (from vmbk-discover), looks at each VM's backup
tree and emits one `plan` record per VM; other records pass through.
Never writes anything.

Options:
  --now ISO8601            Decide as if it were this time (deterministic runs).
  --config-instance NAME   Configuration instance (also VMBK_INSTANCE).
  --backup-path DIR        Backup root; wins over the configuration.
  --json                   JSON lines even on a terminal.
  -h --help                Show this help.
  --version                Show the version.
"""

from __future__ import annotations

from typing import IO, Any

from vmbk import cli
from vmbk.commands._common import Common
from vmbk.commands._stage import not_yet, run_stage

PROG = "vmbk-plan"


def body(args: dict[str, Any], ctx: cli.Context) -> int:
    common = Common.from_args(args)
    common.config()
    return run_stage(ctx, common, {"vm"}, not_yet(PROG, "planning"))


def main(argv: list[str] | None = None, stdin: IO[Any] | None = None, stdout: IO[Any] | None = None) -> int:
    return cli.run(__doc__ or "", body, argv, stdin, stdout, prog=PROG)
