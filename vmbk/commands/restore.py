"""vmbk-restore: list backups and restore VMs, disks and points in time.

Usage:
  vmbk-restore --list [options]
  vmbk-restore --list-restore-points VM [options]
  vmbk-restore --verify VM [options]
  vmbk-restore --dump VM [options]
  vmbk-restore --vm VM --restore-path DIR [options]
  vmbk-restore (-h | --help | --version)

Restores what vmbk-backup, vmbackup or virtnbdbackup wrote: disaster
recovery (same identity), clone (--name), disk (--disk), point in time
(--period, --restore-point).  The flags are vmrestore's.

Options:
  --list                     List VMs with backups.
  --list-restore-points VM   List the restore points of a VM.
  --vm VM                    VM to restore: a name, or a path to its backup directory.
  --restore-path DIR         Where the restored disks go.
  --name NAME                Clone under this name (new UUID and MACs).
  --period PERIOD            Period directory to restore from (default: latest).
  --restore-point N          Restore point: a number or 'full'.
  --disk DISKS               Only these disks (vda,vdb or 'all').
  --force                    Overwrite existing files or VM definition.
  --dry-run                  Show the plan; change nothing.
  --verify VM                Check every checksum of the chosen chain.
  --dump VM                  Print the stream headers as JSON.
  --skip-tpm                 Do not restore TPM state.
  --skip-config              Restore data only; define nothing.
  --no-pre-restore           No .pre-restore safety copies on disk restore.
  --include-incomplete       Allow an incomplete chain as the target.
  --connect URI              libvirt URI.
  --config-instance NAME     Configuration instance (also VMBK_INSTANCE).
  --backup-path DIR          Backup root; wins over the configuration.
  --json                     JSON lines even on a terminal.
  -h --help                  Show this help.
  --version                  Show the version.
"""

from __future__ import annotations

from typing import IO, Any

from vmbk import cli
from vmbk.commands._common import Common, existing_backup_path
from vmbk.errors import VmbkError

PROG = "vmbk-restore"


def body(args: dict[str, Any], ctx: cli.Context) -> int:
    common = Common.from_args({**args, "--vm": None})
    existing_backup_path(common.config())
    raise VmbkError("restore is not implemented yet")


def main(argv: list[str] | None = None, stdin: IO[Any] | None = None, stdout: IO[Any] | None = None) -> int:
    return cli.run(__doc__ or "", body, argv, stdin, stdout, prog=PROG)
