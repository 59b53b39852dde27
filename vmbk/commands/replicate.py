"""vmbk-replicate: copy the backup tree to the configured destinations.

Usage:
  vmbk-replicate [options]
  vmbk-replicate [options] (--all | --vm NAMES...)
  vmbk-replicate [options] --verify-only [--all | --vm NAMES...]
  vmbk-replicate [options] --pull --vm NAMES [--to DIR] [--identity FILE]
  vmbk-replicate --receive DIR
  vmbk-replicate (-h | --help | --version)

As the last stage of the pipe it passes every record on as it comes and,
when its input ends, replicates the VMs of the `backup` and `rotate`
records to every enabled destination ([[replication]] in the
configuration), in `order` (config, local_first, cloud_first,
or simultaneous: the rsync and the rclone destinations at once).  It
reads no records given --all or --vm: the way to run a failed
replication again.  Emits one `replicate` record per VM and destination;
a VM that could not be replicated to a destination is an `error` record
naming the destination (4: unreachable, refused, full or damaged; 6:
rsync or rclone failed; 3: the VM's lock is held), and the other
destinations and VMs go on (9 when some succeeded).
`on_failure = "abort"` stops at the first destination that fails.  A VM is replicated under its lock.

Transports: local (rsync to a mounted path that must exist), ssh (rsync
over ssh with the destination's key, BatchMode, StrictHostKeyChecking as
configured) and rclone (any remote of `rclone_config`).  Bandwidth:
`bwlimit_kbps`.  Files arrive phase by phase so that a replica cut short
at any instant never shows a restore point whose data is missing: streams
and their checksums, side files, checkpoint and domain XMLs, and last the
chain's .cpt; rsync writes through --partial-dir/--delay-updates, rclone
through a staging directory on the remote.  The catalogue goes as a
consistent snapshot (SQLite's backup API); _state/locks never.

sync_mode mirror deletes what the source deleted (the .cpt of a chain
first) and refuses, changing nothing, when the source has no VM directory
or more than `max_delete_percent` (50) of the replica's streams would go;
accumulate never deletes; append-only only adds files, through a key whose
forced command on the far side is `vmbk-replicate --receive DIR`, which
lets rsync add files and nothing else, and applies what only the far
side may change: a .cpt that extends the one it has, the renames of a
chain the source archived, a new TPM state (the old one kept).  A chain
the source archived is renamed on the replica, not copied again; a
directory the source reuses for a new chain loses the old one first.

The space check (`space_check`): skip does not write a
destination the copy does not fit, warn only says so, and both warn below
`min_free_percent`.  Verify (`verify`, or --verify): none,
size (the replica's listing) or checksum (rsync --checksum, rclone check
or cryptcheck, sha256 on an append-only far side); a mismatch is an error
that names the files.  `scope` limits a destination to archived chains or
monthly periods, `exclude_vms` to the other VMs.  TPM state and BitLocker
keys keep 0600 on local and ssh replicas; on an rclone remote they go only
to a crypt remote or with `replicate_secrets = true`.

Encrypted replicas: a destination with encrypt = { recipients =
["age1..."] } (or { passphrase_file = "FILE" }) stores every file as
NAME.age, a standard age file (age -d -i KEY opens it), file names in
clear; the pushing host needs only the public keys.  Checksum verify is
done as size there (the content cannot be read back).

The disaster-recovery path: --pull brings one VM's tree back from --dest
into --to (default: the backup path), in the same order and checked by
content, ready for vmbk-restore --backup-path; from an encrypted
destination it decrypts with --identity FILE (an age identity file of a
recipient), each file checked chunk by chunk as it is decrypted, and a
wrong identity fails before anything is written.  A dry run and a
verification (--dry-run, --verify-only) change nothing.

Options:
  --all                    Replicate every VM of the backup tree.
  --vm NAMES               Only these VMs (comma-separated or repeated).
  --dest NAME              Only this destination.
  --verify-only            Check the replicas against the tree; copy nothing.
  --verify MODE            none, size or checksum instead of each destination's setting (--verify-only: checksum).
  --pull                   Copy one VM's tree back from --dest (required), checked by content: disaster recovery.
  --to DIR                 Where --pull puts the tree (default: the backup path).
  --identity FILE          With --pull from an encrypted destination: the age identity file to decrypt with.
  --receive DIR            Far side of an append-only destination: its ssh forced command.
  --dry-run                Show what would be copied, moved and deleted; change nothing.
  --config-instance NAME   Configuration instance (also VMBK_INSTANCE).
  --backup-path DIR        Backup root; wins over the configuration.
  --json                   JSON lines even on a terminal.
  -h --help                Show this help.
  --version                Show the version.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

from vmbk import cli
from vmbk.commands._common import Common, existing_backup_path
from vmbk.commands._stage import run_stage
from vmbk.errors import UsageError
from vmbk.fsutil import UMASK
from vmbk.records import Record
from vmbk.replicate import receive
from vmbk.replicate.encrypt import read_identities
from vmbk.replicate.run import WATCHED, ReplicateRun
from vmbk.settings import VERIFY_MODES

PROG = "vmbk-replicate"


def body(args: dict[str, Any], ctx: cli.Context) -> int:
    if args["--receive"]:
        return receive.serve(Path(args["--receive"]), os.environ.get("SSH_ORIGINAL_COMMAND", ""),
                             getattr(ctx.stdin, "buffer", ctx.stdin), getattr(ctx.stdout, "buffer", ctx.stdout),
                             ctx.stderr)
    common = Common.from_args(args)
    cfg = common.config()
    verify = args["--verify"]
    if verify is not None and verify not in VERIFY_MODES:
        raise UsageError(f"--verify must be one of {', '.join(VERIFY_MODES)}, not {verify!r}")
    dry_run = bool(args["--dry-run"])
    os.umask(UMASK)
    if args["--pull"]:
        if len(common.vms) != 1:
            raise UsageError("--pull takes one VM (--vm NAME)")
        to = Path(args["--to"]) if args["--to"] else cfg.require_backup_path()
        identities = read_identities(Path(args["--identity"])) if args["--identity"] else []
        run = ReplicateRun(cfg, to, dest=args["--dest"], catalogue=False, identities=identities)
        return _stage(ctx, common, run, lambda s: run.pull(common.vms[0], to, s), changes_state=True)
    if args["--identity"]:
        raise UsageError("--identity goes with --pull")
    root = existing_backup_path(cfg)
    vms = None if args["--all"] or not common.vms else list(common.vms)
    if args["--verify-only"]:
        run = ReplicateRun(cfg, root, dest=args["--dest"], verify=verify or "checksum")
        return _stage(ctx, common, run, lambda s: run.verify_only(vms, s), changes_state=False)
    run = ReplicateRun(cfg, root, dest=args["--dest"], dry_run=dry_run, verify=verify)
    if args["--all"] or common.vms:
        return _stage(ctx, common, run, lambda s: run.push(vms, s), changes_state=not dry_run)
    return _stage(ctx, common, run, run.after, changes_state=not dry_run, consumes=WATCHED)


def _stage(ctx: cli.Context, common: Common, run: ReplicateRun, after: Callable[[str], Iterable[Record]], *,
           changes_state: bool, consumes: set[str] | None = None) -> int:
    """As a stage (``consumes``: records are read and passed on), or alone."""
    try:
        return run_stage(ctx, common, consumes or set(), run.handle, standalone=consumes is None, after=after,
                         finish=run.end, changes_state=changes_state)
    finally:
        run.close()


def main(argv: list[str] | None = None, stdin: IO[Any] | None = None, stdout: IO[Any] | None = None) -> int:
    return cli.run(__doc__ or "", body, argv, stdin, stdout, prog=PROG)
