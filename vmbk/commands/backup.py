"""vmbk-backup: carry out the plan — full, incremental and copy backups.

Usage:
  vmbk-backup [options]
  vmbk-backup [options] --vm NAMES...
  vmbk-backup (-h | --help | --version)

Reads `plan` records on stdin (from vmbk-plan) and backs each VM up; given
VM names it discovers and plans those VMs itself.  Emits one `backup`
record per VM; other records pass through.  A failed VM becomes an `error`
record and the others go on.

A backup server backs up VMs of other hosts (--connect
qemu+ssh://USER@HOST/system, or hosts = [...] in the configuration): the
pull backup's NBD export is reached through an ssh-forwarded unix socket
(or, for a host with nbd_tls = { dir, address, port }, as NBD over TCP
with TLS: libvirt's backup_tls_x509_* on the host, vmbk's CA and client
certificate in dir; with nbd_tcp = { address, port }, as plain NBD over
TCP, unencrypted: for a trusted backup network only), and NVRAM, TPM state and qemu-img facts are read over
ssh, as is qemu-nbd of a shut-off VM.  To move a single-host tree to
BACKUP_PATH/HOST/VM/: README, "A backup server for several hosts".  With several
hosts configured the tree is BACKUP_PATH/HOST/VM/ (one host keeps
BACKUP_PATH/VM/); --vm HOST/NAME names a VM of one host.

With --with-memory (or memory = true in a VM's [vm.NAME] section) the
guest's RAM and device state are saved too, at the instant the disks'
point in time is fixed: the VM is paused, libvirt writes its state, the
backup job begins, the VM resumes; the pause (memory.pause_seconds in the
record) is about the time to write the used RAM into the page cache, at
most memory_pause_timeout seconds (60), past which the backup goes on
without the state.  The state goes into the restore point, lz4-compressed,
as vmstate.CHECKPOINT.lz4 (root only) beside vmstate.CHECKPOINT.json,
its manifest (host, machine, CPUs, memory, devices, hashes), for
vmbk-restore --resume.  A VM with a device whose state cannot be saved
(host device passthrough, virtiofs, ivshmem peer, a host CPU that cannot
migrate) gets its disks backed up as usual and an error record naming
the device (exit 9 for the run).  A shut-off VM has no memory to save.
QEMU 7.2 saves a state with full backups only: an incremental of a
memory = true VM goes without one (memory.reason says why); memory =
"full" makes vmbk-plan plan every backup of the running VM as a full
(the chain before it archived), so that every restore point resumes.

Options:
  --vm NAMES               Back up these VMs (comma-separated or repeated).
  --jobs N                 VMs backed up at once; each VM's disks always go in parallel [default: 1].
  --now ISO8601            Plan as if it were this time (with VM names).
  --dry-run                Show what would be done; write nothing.
  --with-memory            Also save each running VM's RAM and device state (as memory = true does).
  --connect URI            libvirt URI [default from the config's hosts or connect, LIBVIRT_DEFAULT_URI, qemu:///system].
  --config-instance NAME   Configuration instance (also VMBK_INSTANCE).
  --backup-path DIR        Backup root; wins over the configuration.
  --json                   JSON lines even on a terminal.
  -h --help                Show this help.
  --version                Show the version.
"""

from __future__ import annotations

import os
from typing import IO, Any

from vmbk import cli
from vmbk.backup.run import PROG, BackupRun
from vmbk.cancel import Cancel
from vmbk.commands._common import Common, existing_backup_path, parse_now, positive_int
from vmbk.commands._stage import run_stage
from vmbk.config import hosts_for
from vmbk.fsutil import UMASK
from vmbk.progress import board_for


def body(args: dict[str, Any], ctx: cli.Context) -> int:
    common = Common.from_args(args)
    cfg = common.config()
    root = existing_backup_path(cfg)
    dry_run = bool(args["--dry-run"])
    jobs = positive_int(args, "--jobs", 1)
    now = parse_now(args.get("--now"))
    cancel = Cancel()
    os.umask(UMASK)
    run = BackupRun(cfg, root, hosts_for(cfg, common.connect), now, dry_run=dry_run, cancel=cancel,
                    progress=board_for(ctx.stderr), with_memory=bool(args["--with-memory"]))
    source = (lambda session: run.plan(common.vms, session)) if common.vms else None
    try:
        return run_stage(ctx, common, {"plan"}, run.handle, source=source, finish=run.end, jobs=jobs, cancel=cancel,
                         changes_state=not dry_run)
    finally:
        run.close()


def main(argv: list[str] | None = None, stdin: IO[Any] | None = None, stdout: IO[Any] | None = None) -> int:
    return cli.run(__doc__ or "", body, argv, stdin, stdout, prog=PROG)
