"""vmbk: one entry point for every vmbk command.

Usage:
  vmbk <command> [<args>...]
  vmbk (-h | --help | --version)

`vmbk backup --vm web` runs `vmbk-backup --vm web`, and so on.

Commands:
  discover   list the VMs of the host              (vmbk-discover)
  plan       decide each VM's backup               (vmbk-plan)
  backup     back VMs up                           (vmbk-backup)
  rotate     apply retention                       (vmbk-rotate)
  replicate  copy backups to other destinations    (vmbk-replicate)
  restore    list and restore backups              (vmbk-restore)
  status     how the backups are doing             (vmbk-status)
  report     summary of a run: text, HTML, email   (vmbk-report)
  drill      restore, boot and check backups       (vmbk-drill)
  config     the instance a vmbackup one makes     (vmbk-config)

Options:
  -h --help    Show this help.
  --version    Show the version.
"""

from __future__ import annotations

import importlib
from typing import IO, Any

from vmbk import cli
from vmbk.errors import UsageError

PROG = "vmbk"
COMMANDS = ("discover", "plan", "backup", "rotate", "replicate", "restore", "status", "report", "drill", "config")


def main(argv: list[str] | None = None, stdin: IO[Any] | None = None, stdout: IO[Any] | None = None) -> int:
    holder: dict[str, Any] = {}

    def body(args: dict[str, Any], ctx: cli.Context) -> int:
        name = args["<command>"]
        if name not in COMMANDS:
            raise UsageError(f"unknown command {name!r} (commands: {', '.join(COMMANDS)})")
        holder["cmd"] = (name, list(args["<args>"]))
        return 0

    code = cli.run(__doc__ or "", body, argv, stdin, stdout, prog=PROG, options_first=True)
    if code or "cmd" not in holder:
        return code
    name, rest = holder["cmd"]
    module = importlib.import_module(f"vmbk.commands.{name}")
    result: int = module.main(rest, stdin, stdout)
    return result
