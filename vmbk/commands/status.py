"""vmbk-status: what the backup tree and catalogue say about each VM.

Usage:
  vmbk-status [options]
  vmbk-status (-h | --help | --version)

Emits one `status` record per VM directory of the backup tree: its
periods, the newest backup, and whether a lock is held.

Options:
  --config-instance NAME   Configuration instance (also VMBK_INSTANCE).
  --backup-path DIR        Backup root; wins over the configuration.
  --json                   JSON lines even on a terminal.
  -h --help                Show this help.
  --version                Show the version.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO, Any

from vmbk import cli
from vmbk.commands._common import Common, Session, existing_backup_path, make_emitter
from vmbk.lock import lock_path
from vmbk.records import make
from vmbk.tree.scan import vm_dirs

PROG = "vmbk-status"


def body(args: dict[str, Any], ctx: cli.Context) -> int:
    common = Common.from_args(args)
    root = existing_backup_path(common.config())
    emitter = make_emitter(ctx, common)
    session = Session(emitter).ensure()
    try:
        for entry in vm_dirs(root):
            vm_dir = Path(entry.path)
            periods = sorted(p.name for p in vm_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
            emitter.emit(
                make(
                    "status",
                    session,
                    vm=vm_dir.name,
                    path=str(vm_dir),
                    periods=periods,
                    locked=lock_path(root, vm_dir.name).exists(),
                )
            )
    finally:
        emitter.close()
    return emitter.exit_code()


def main(argv: list[str] | None = None, stdin: IO[Any] | None = None, stdout: IO[Any] | None = None) -> int:
    return cli.run(__doc__ or "", body, argv, stdin, stdout, prog=PROG)
