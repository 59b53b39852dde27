"""vmbk-discover: emit one `vm` record per libvirt domain.

Usage:
  vmbk-discover [options] [--vm NAMES]...
  vmbk-discover (-h | --help | --version)

Emits a `vm` record for every domain of the host, running or not, with its
disks, firmware, TPM, agent channel, checkpoints and the rotation policy
that applies (or why it is excluded), and the host it runs on (host, uri).
With --connect qemu+ssh://USER@HOST/system, or several hosts in the
configuration (hosts = [...]), the hosts are reached over ssh: a host that
cannot be reached is an error record per VM of it (the names asked for,
else its VMs in the backup tree) and the other hosts go on (exit 9).
A VM of one host is named HOST/NAME in --vm.  First stage of the pipeline:

  vmbk-discover | vmbk-plan | vmbk-backup

Options:
  --vm NAMES               Only these VMs (comma-separated or repeated).
  --connect URI            libvirt URI [default from the config's hosts or connect, LIBVIRT_DEFAULT_URI, qemu:///system].
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
from vmbk.config import hosts_for
from vmbk.discover import discover_hosts

PROG = "vmbk-discover"


def body(args: dict[str, Any], ctx: cli.Context) -> int:
    common = Common.from_args(args)
    cfg = common.config()
    emitter = make_emitter(ctx, common)
    session = Session(emitter).ensure()
    try:
        for rec in discover_hosts(hosts_for(cfg, common.connect), cfg, names=common.vms, session=session):
            emitter.emit(rec)
    finally:
        emitter.close()
    return emitter.exit_code()


def main(argv: list[str] | None = None, stdin: IO[Any] | None = None, stdout: IO[Any] | None = None) -> int:
    return cli.run(__doc__ or "", body, argv, stdin, stdout, prog=PROG)

