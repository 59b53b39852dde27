"""vmbk-config: configuration instances: the vmbk one a vmbackup one makes.

Usage:
  vmbk-config import-vmbackup <dir>
  vmbk-config (-h | --help | --version)

import-vmbackup reads the vmbackup configuration instance in DIR
(/opt/vmbackup/config/NAME: vmbackup.conf, vm_overrides.conf,
exclude_patterns.conf, fstrim_exclude.conf, email.conf,
replication_local.conf, replication_cloud.conf) without running any of it,
and prints the vmbk instance that does the same, as TOML: each vmbackup
setting as the vmbk key named in a comment beside it, or as a comment that
says why vmbk has none and what to do instead. Where vmbackup's default
differs from vmbk's (compression, accumulate limits, replication order) the
key is written anyway, so the instance behaves as vmbackup did. Nothing is
written but stdout: review the text, then install it.

  vmbk-config import-vmbackup /opt/vmbackup/config/default > /etc/vmbk/default.toml
  vmbk-discover | vmbk-plan            # what tonight would do with it

Options:
  -h --help    Show this help.
  --version    Show the version.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO, Any

from vmbk import cli
from vmbk.errors import Exit
from vmbk.vmbackup.config_import import import_instance

PROG = "vmbk-config"


def body(args: dict[str, Any], ctx: cli.Context) -> int:
    text = import_instance(Path(args["<dir>"]))
    ctx.stdout.write(text)
    return int(Exit.OK)


def main(argv: list[str] | None = None, stdin: IO[Any] | None = None, stdout: IO[Any] | None = None) -> int:
    return cli.run(__doc__ or "", body, argv, stdin, stdout, prog=PROG)
