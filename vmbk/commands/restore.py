"""vmbk-restore: list backups and restore VMs, disks and points in time.

Usage:
  vmbk-restore --list [options]
  vmbk-restore --list-restore-points VM [options]
  vmbk-restore --verify VM [options]
  vmbk-restore --dump VM [options]
  vmbk-restore --vm VM [--restore-path DIR] [--disk DISKS] [options]
  vmbk-restore (-h | --help | --version)

Restores what vmbk-backup, vmbackup or virtnbdbackup wrote: disaster
recovery (the default: the VM defined again with its name, UUID and MACs),
clone (--name: new UUID and MACs), disks only (--disk, --skip-config),
point in time (--period, --restore-point).  The flags are vmrestore's.
A --disk restore without --restore-path replaces those disks of the
defined, shut off VM in place: each is built beside its file first, then all are
swapped at once, the old files kept as FILE.pre-restore (refused if one
exists; --no-pre-restore keeps none); the definition, NVRAM and TPM state
are untouched, and a disk the VM opens as raw is restored raw.
VM is a name under the backup path, or a path: its basename is the VM name
and its dirname the backup path; a path to a .archives/chain-* directory
restores that archived chain.

Each disk of the restore point is rebuilt once from the merged chain (the
newest data wins), written thin as qcow2 next to its final name, checked
with qemu-img check and renamed only when every disk is done; every
stream's structure is checked before it is read and its .chksum while it
is read, and a mismatch fails the restore before anything is renamed.  A
point is incomplete, and refused without --include-incomplete, when a file
it needs is missing, truncated or contradicts the chain (checkpoint, parent,
virtual size, .cpt), or a side file of it is damaged; a point whose data
files lost their .chksum (in a chain whose other files have theirs) cannot
be verified and is refused without --no-verify.  A chain written by
virtnbdbackup before 1.9.40 has no .chksum at all and is restored on its
structure alone.  Disaster recovery keeps the original
file names and puts the NVRAM back (the current file saved as
FILE.before-restore.TIME); a clone's files are NAME.qcow2 (one disk) or
NAME-DEV.qcow2 and NAME_VARS.fd, NAME being --name; disks restored without
a definition are named like a clone's after the VM.  A defined VM of that
name is replaced only with --force and only when shut off.  TPM state
(tpm-state/tpm2 of the chain) goes to /var/lib/libvirt/swtpm/UUID/tpm2,
the VM's current state there moved to tpm2.pre-restore-EPOCH; if that
fails after the disks are restored, the restore is partial (exit 9).  The
storage pool holding the restored files is refreshed.

Records: backup_vm (--list); chain and restore_point (--list-restore-points);
verify and dump; restore_disk and restore (a restore or --dry-run).

Verify checks every stream's structure and .chksum, then the chain's (the
data files each point needs, the .cpt, stream headers, side files): one
verify record per data file and one per chain (file null), each with
status ok, bad or unverifiable (a data file without .chksum).  It exits 0
when everything is ok, 4 when anything is bad, 9 when nothing is bad but
some data could not be verified.

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
  --all-chains               With --verify: every chain of the VM (or of --period), archives included.
  --dump VM                  Print the stream headers as JSON.
  --no-verify                Restore without checking the streams' .chksum, even a point whose files lost it.
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

import dataclasses
import os
from pathlib import Path
from typing import IO, Any

from vmbk import cli
from vmbk import config as _config
from vmbk.commands._common import Common, Session, existing_backup_path, make_emitter
from vmbk.errors import StorageError, UsageError, VmbkError
from vmbk.output import Emitter
from vmbk.restore import listing, verify
from vmbk.restore.preflight import RestoreOptions
from vmbk.restore.run import restore
from vmbk.restore.select import choose_chain, parse_disks, parse_restore_point
from vmbk.restore.source import SourceRef, load, resolve

PROG = "vmbk-restore"

@dataclasses.dataclass(frozen=True)
class Args:
    """docopt's dict, typed; it goes no further than this module."""

    common: Common
    action: str  # list | points | verify | dump | restore
    vm: str | None
    period: str | None
    all_chains: bool
    options: RestoreOptions | None

    @classmethod
    def from_docopt(cls, args: dict[str, Any]) -> Args:
        common = Common.from_args({**args, "--vm": None})
        action: str = "restore"
        vm: str | None = args.get("--vm")
        for flag, what in (("--list", "list"), ("--list-restore-points", "points"), ("--verify", "verify"),
                           ("--dump", "dump")):
            if args.get(flag):
                action, vm = what, (None if flag == "--list" else args[flag])
        options = None
        if action == "restore":
            name = args.get("--name")
            if name is not None and (not name or "/" in name or "\0" in name or name in (".", "..")):
                raise UsageError(f"--name {name!r} is not a usable VM name")
            disks = parse_disks(args.get("--disk"))
            disk_restore = args.get("--disk") is not None
            if name is not None and disk_restore:
                raise UsageError("--disk cannot be combined with --name: a clone takes every disk")
            raw_path = args.get("--restore-path")
            if raw_path is None and not disk_restore:
                raise UsageError("--restore-path is required (only --disk restores in place without it)")
            if args.get("--no-pre-restore") and (raw_path is not None or not disk_restore):
                raise UsageError("--no-pre-restore goes with an in-place --disk restore (no --restore-path)")
            options = RestoreOptions(
                restore_path=Path(os.path.abspath(raw_path)) if raw_path is not None else None,
                period=args.get("--period"),
                restore_point=parse_restore_point(args.get("--restore-point")),
                disks=disks,
                name=name,
                force=bool(args.get("--force")),
                dry_run=bool(args.get("--dry-run")),
                skip_config=bool(args.get("--skip-config")),
                skip_tpm=bool(args.get("--skip-tpm")),
                include_incomplete=bool(args.get("--include-incomplete")),
                verify=not args.get("--no-verify"),
                disk_restore=disk_restore,
                pre_restore=not args.get("--no-pre-restore"),
            )
        elif args.get("--restore-point") is not None or args.get("--restore-path") is not None:
            raise UsageError("--restore-point and --restore-path go with --vm")
        return cls(common, action, vm, args.get("--period"), bool(args.get("--all-chains")), options)


def _root(cfg: _config.Config) -> Path:
    return existing_backup_path(cfg)


def body(args: dict[str, Any], ctx: cli.Context) -> int:
    a = Args.from_docopt(args)
    cfg = a.common.config()
    # A restore goes on without its reader; listings and dry runs stop (vmbk-json(7)).
    changes = a.action == "restore" and a.options is not None and not a.options.dry_run
    emitter = make_emitter(ctx, a.common, changes_state=changes)
    session = Session(emitter).ensure()
    try:
        return _dispatch(a, cfg, emitter, session)
    except VmbkError as e:
        # The failure as a record too (DESIGN, "The record contract"); the
        # wrapper prints its line and returns its code.
        emitter.error(e, vm=e.vm or (os.path.basename(a.vm.rstrip("/")) if a.vm else None))
        raise
    finally:
        emitter.close()


def _dispatch(a: Args, cfg: _config.Config, emitter: Emitter, session: str) -> int:
    if a.action == "list":
        for rec in listing.list_vms(_root(cfg), session):
            emitter.emit(rec)
        return emitter.exit_code()
    assert a.vm is not None
    ref = resolve(a.vm, lambda: _root(cfg))
    if a.action == "restore":
        assert a.options is not None
        protected = ((cfg.backup_path,) if cfg.backup_path is not None else ()) + _config.all_backup_paths()
        opts = dataclasses.replace(a.options, protected=protected)
        restore(ref, opts, uri=a.common.uri(cfg), session=session, emit=emitter.emit)
        return emitter.exit_code()
    return _inspect(a, ref, emitter, session)


def _inspect(a: Args, ref: SourceRef, emitter: Emitter, session: str) -> int:
    source = load(ref)
    if a.action == "points":
        for rec in listing.list_points(source, a.period, session):
            emitter.emit(rec)
        return emitter.exit_code()
    if a.action == "verify" and a.all_chains and source.chain is None:
        chains = verify.all_chains(source.tree, a.period)
    else:
        chains = [choose_chain(source, a.period)]
    if a.action == "verify":
        seen = []
        for rec in verify.verify_chains(source.vm, chains, session):
            seen.append(rec)
            emitter.emit(rec)
        verify.verdict(source.vm, seen)
        return emitter.exit_code()
    bad = 0
    for rec in verify.dump_chain(source.vm, chains[0], session):
        bad += not rec["ok"]
        emitter.emit(rec)
    if bad:
        raise StorageError(f"{bad} data file(s) of VM {source.vm!r} cannot be read", vm=source.vm)
    return emitter.exit_code()


def main(argv: list[str] | None = None, stdin: IO[Any] | None = None, stdout: IO[Any] | None = None) -> int:
    return cli.run(__doc__ or "", body, argv, stdin, stdout, prog=PROG)
