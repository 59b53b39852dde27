"""vmbk-drill: prove that backups restore and boot, in throwaway VMs.

Usage:
  vmbk-drill [options]
  vmbk-drill [options] --vm NAMES...
  vmbk-drill [options] --all
  vmbk-drill (-h | --help | --version)

Reads `backup` records on stdin (from vmbk-backup or vmbk-rotate): each is
passed on, then, when that backup went well, the restore point it made is
drilled.  With --vm or --all it drills those VMs' points (--point, --sample)
and reads no records.  Emits one `drill` record per drilled point, and an
`error` record beside it when the drill did not pass; other records pass
through.

A drill restores the point as a clone into a scratch directory (never
inside a backup tree) under a new name, VM-drill-STAMP, with a new UUID and
MACs, every network interface on an isolated network vmbk creates (no
forwarding, no address on the host) or removed, host devices, shared
directories, graphics listeners and pass-through channels left out, serial
ports written to files; it starts it transient (no autostart; libvirtd
destroys it if vmbk-drill dies), checks it and removes it with its network,
TPM state and scratch files, also on failure, timeout, SIGINT and SIGTERM.
The production VM, its disks, checkpoints and bitmaps are never touched;
nothing is written in the backup tree but the catalogue's rows, the VM's
lock while the disks are built, and the pictures under _state/drills/.

Checks, in order, each with a timeout and its own verdict: resources (free
memory for the guest, space for the copy plus 10 %; a drill without them is
refused), disks (every disk restored with its streams' .chksum matched and
qemu-img check clean), start, agent (where the VM has a guest agent
channel: guest-ping answers; the OS it reports is recorded), check (the
VM's own, [drill.vm."NAME"] in the configuration: a file that must exist
and match a pattern, a command run through guest-exec that must exit 0),
console (without an agent: the serial console shows the login prompt or
console_pattern, else at least the partition tables and file systems are
readable).  The level reached is none, disks, started, filesystems,
console, agent or check.  A screenshot of the guest (PNG) and the last
lines of its serial console are kept under _state/drills/VM/, the newest
[drill] pictures per VM.

Every run first removes what killed drills left: domains and networks
marked as a drill's whose drill is gone, their scratch files and TPM state.
Exit status: 0 every drill passed, 9 some failed, the failures' code when
all failed (5 for a check, 4 for damaged backup data or no space, 3 when a
backup holds the VM's lock).

Options:
  --vm NAMES               Drill these VMs (comma-separated or repeated).
  --all                    Drill every VM directory of the backup tree.
  --point POINT            latest, random, INDEX (of the newest chain) or DATE (YYYY-MM-DD: the newest point taken then or before) [default: latest].
  --sample N               Also drill N random older points, archived chains included [default: 0].
  --jobs N                 Drills at once [default: 1].
  --scratch DIR            Where the throwaway copies go (default: [drill] scratch_dir, /var/tmp/vmbk-drill).
  --network MODE           isolated (a network without a route out) or none (no network interface).
  --boot-timeout SECONDS   Seconds for the guest's agent or console (default: [drill] boot_timeout, 300).
  --connect URI            libvirt URI [default from config, LIBVIRT_DEFAULT_URI, qemu:///system].
  --config-instance NAME   Configuration instance (also VMBK_INSTANCE).
  --backup-path DIR        Backup root; wins over the configuration.
  --json                   JSON lines even on a terminal.
  -h --help                Show this help.
  --version                Show the version.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Any

from vmbk import cli
from vmbk import config as _config
from vmbk.cancel import Cancel
from vmbk.commands._common import Common, existing_backup_path, positive_int
from vmbk.commands._stage import run_stage
from vmbk.drill.one import DrillOptions
from vmbk.drill.points import PointSpec
from vmbk.drill.run import PROG, REQUEST, DrillRun
from vmbk.errors import UsageError
from vmbk.fsutil import UMASK
from vmbk.settings import DRILL_NETWORKS


def _options(args: dict[str, Any], cfg: _config.Config) -> DrillOptions:
    network = args.get("--network")
    if network is not None and network not in DRILL_NETWORKS:
        raise UsageError(f"--network must be one of {', '.join(DRILL_NETWORKS)}, not {network!r}")
    scratch = args.get("--scratch")
    boot = positive_int(args, "--boot-timeout", 0) or None
    protected = ((cfg.backup_path,) if cfg.backup_path is not None else ()) + _config.all_backup_paths()
    return DrillOptions.from_settings(cfg.drill, protected, network=network, boot_timeout=boot,
                                      scratch=Path(os.path.abspath(scratch)) if scratch else None)


def body(args: dict[str, Any], ctx: cli.Context) -> int:
    common = Common.from_args(args)
    cfg = common.config()
    root = existing_backup_path(cfg)
    opts = _options(args, cfg)
    spec = PointSpec.parse(args.get("--point"))
    raw = str(args.get("--sample") or "0")
    if not (raw.isascii() and raw.isdigit()):
        raise UsageError(f"--sample must be a whole number, not {raw!r}")
    sample = int(raw)
    jobs = positive_int(args, "--jobs", 1)
    os.umask(UMASK)
    cancel = Cancel()
    run = DrillRun(cfg, root, common.uri(cfg), opts, spec, sample, cancel)
    try:
        run.sweep()
        standalone = bool(args["--all"] or common.vms)
        if standalone:
            vms = run.all_vms() if args["--all"] else list(common.vms)
            return run_stage(ctx, common, {REQUEST}, run.handle_request, source=lambda s: run.requests(vms, s),
                             finish=run.end, jobs=jobs, cancel=cancel, successes=lambda: run.passed)
        return run_stage(ctx, common, {"backup"}, run.handle, finish=run.end, jobs=jobs, cancel=cancel,
                         successes=lambda: run.passed)
    finally:
        run.close()


def main(argv: list[str] | None = None, stdin: IO[Any] | None = None, stdout: IO[Any] | None = None) -> int:
    return cli.run(__doc__ or "", body, argv, stdin, stdout, prog=PROG)
