"""vmbk-discover: emit one `vm` record per libvirt domain.

Usage:
  vmbk-discover [options] [--vm NAMES]...
  vmbk-discover (-h | --help | --version)

Emits a `vm` record for every domain of the host, running or not, with its
disks, firmware, TPM, agent channel, checkpoints and the rotation policy
that applies (or why it is excluded).  First stage of the pipeline:

  vmbk-discover | vmbk-plan | vmbk-backup

Options:
  --vm NAMES               Only these VMs (comma-separated or repeated).
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
from vmbk.commands._common import Common, Session, make_emitter
from vmbk.discover import discover

PROG = "vmbk-discover"


def body(args: dict[str, Any], ctx: cli.Context) -> int:
    common = Common.from_args(args)
    cfg = common.config()
    emitter = make_emitter(ctx, common)
    session = Session(emitter).ensure()
    try:
        for rec in discover(common.uri(cfg), cfg, names=common.vms, session=session):
            emitter.emit(rec)
    finally:
        emitter.close()
    return emitter.exit_code()


def main(argv: list[str] | None = None, stdin: IO[Any] | None = None, stdout: IO[Any] | None = None) -> int:
    return cli.run(__doc__ or "", body, argv, stdin, stdout, prog=PROG)

