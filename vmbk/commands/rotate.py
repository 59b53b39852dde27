"""vmbk-rotate: apply retention — remove periods and archives past their policy.

Usage:
  vmbk-rotate [options]
  vmbk-rotate [options] --vm NAMES...
  vmbk-rotate [options] --all
  vmbk-rotate [options] --prune TARGET [--vm NAMES...] [--yes]
  vmbk-rotate (-h | --help | --version)

Reads `backup` records on stdin (from vmbk-backup): each is passed on, then,
when that backup went well or had nothing to do, its VM's retention policy
is applied to its backup tree.  With --vm or --all it rotates those VMs
and reads no records.  Emits one `rotate` record per VM (removed, kept and
protected directories, each with its reason); other records pass through.
A VM whose lock is held (a backup or restore of it is running) is an
`error` record (exit 3) and the others go on.

Tier 1: the period directories of a VM's current policy that hold backups,
the newest `retention.daily` (7), `weekly` (4) or `monthly` (3) of them,
stay; older ones go with their archived chains.  accumulate deletes only
archived chains beyond `retention.archives` (default all); under never
nothing is deleted.  Tier 2: period directories of another policy (left by
a policy change) are protected for `orphan_min_age` days (7) after their
last backup and deleted after `orphan_max_age` (90).  Never deleted: the
current period, the directory the backup just wrote, the VM's newest
complete restore point; when a directory is dated in the future (clock
skew) nothing of that VM is, and it is an `error` record (exit 1).
A directory is deleted by renaming it to a hidden .deleting-* name first,
so no listing shows half of it; a later run finishes what a killed one left.
Below `retention.min_free_percent` free space rotate warns; it never deletes
more than the policy allows.  --dry-run writes nothing, not even the
catalogue, and takes no lock.

On demand, as vmbackup --prune does, --prune TARGET removes: list (nothing:
sizes and the commands to paste), archives (every archived chain; of one VM
with --vm), archives:PERIOD, chain:NAME, period:ID, all (the whole VM
directory).  All but list and archives need exactly one --vm; period:
refuses a VM's last period.  It asks on the terminal first; in a pipe or a
script it needs --yes.

Options:
  --vm NAMES               Rotate these VMs (comma-separated or repeated); with --prune, the VM.
  --all                    Rotate every VM directory of the backup tree.
  --prune TARGET           Remove on demand: list, archives, archives:PERIOD, chain:NAME, period:ID or all.
  --yes                    Do not ask before --prune removes anything.
  --now ISO8601            Decide as if it were this time.
  --dry-run                Show what would be removed; remove nothing, write nothing.
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
from vmbk.commands._common import Common, Session, existing_backup_path, make_emitter, parse_now
from vmbk.commands._stage import run_stage
from vmbk.errors import UsageError, VmbkError
from vmbk.fsutil import UMASK
from vmbk.policy.retention import Decision, parse_target
from vmbk.records import Record, error_record, stdin_is_pipe
from vmbk.rotate import prune
from vmbk.rotate.run import PROG, RotateRun, standalone
from vmbk.tree.scan import vm_dirs


def body(args: dict[str, Any], ctx: cli.Context) -> int:
    common = Common.from_args(args)
    cfg = common.config()
    root = existing_backup_path(cfg)
    dry_run = bool(args["--dry-run"])
    os.umask(UMASK)
    run = RotateRun(cfg, root, parse_now(args.get("--now")), dry_run=dry_run)
    try:
        if args["--prune"]:
            return _prune(args, ctx, common, run)
        if args["--all"] or common.vms:
            vms = [e.name for e in vm_dirs(root)] if args["--all"] else list(common.vms)
            return _emit(ctx, common, run, lambda session: standalone(run, vms, session), changes_state=not dry_run)
        return run_stage(ctx, common, {"backup"}, run.handle, finish=run.end, changes_state=not dry_run)
    finally:
        run.close()


def _emit(ctx: cli.Context, common: Common, run: RotateRun, records: Any, *, changes_state: bool) -> int:
    """Emit what ``records(session)`` yields; errors of one VM are records among them."""
    emitter = make_emitter(ctx, common, changes_state=changes_state)
    session = Session(emitter).ensure()
    try:
        for rec in records(session):
            emitter.emit(rec)
    finally:
        emitter.close()
        if changes_state:
            run.end(session, emitter.exit_code())
    return emitter.exit_code()


def _prune(args: dict[str, Any], ctx: cli.Context, common: Common, run: RotateRun) -> int:
    target = parse_target(args["--prune"])
    vms = list(common.vms)
    if target.needs_one_vm and len(vms) != 1:
        raise UsageError(f"--prune {target} needs exactly one --vm")
    if len(vms) > 1:
        raise UsageError(f"--prune {target} takes at most one --vm")
    options = [o for k in ("--config-instance", "--backup-path") if args.get(k) for o in (k, args[k])]
    if target.kind == "list":
        return _emit(ctx, common, run, lambda session: prune.targets(run, vms, session, options), changes_state=False)
    decided = prune.decide(run, target, vms)
    good = [d for d in decided if isinstance(d, Decision)]
    failed = [e for e in decided if isinstance(e, VmbkError)]
    if vms and failed:
        raise failed[0]  # the one VM asked for: its failure is the command's
    if not good and not failed:
        ctx.stderr.write(f"{PROG}: --prune {target}: nothing to remove\n")
        return 0
    if good and not run.dry_run and not args["--yes"]:
        if stdin_is_pipe(ctx.stdin):
            raise prune.refuse_unconfirmed(target)
        if not prune.confirm(good, target, ctx.stdin, ctx.stderr):
            ctx.stderr.write(f"{PROG}: not confirmed: nothing removed\n")
            return 0

    def records(session: str) -> Any:
        for e in failed:
            yield _error(e, session)
        for d in good:
            try:
                yield prune.carry_out(run, d, target, session, run.dry_run)
            except VmbkError as e:
                yield _error(e, session, d.vm)

    return _emit(ctx, common, run, records, changes_state=not run.dry_run)


def _error(e: VmbkError, session: str, vm: str | None = None) -> Record:
    return error_record(e, stage=PROG, session=session, vm=e.vm or vm)


def main(argv: list[str] | None = None, stdin: IO[Any] | None = None, stdout: IO[Any] | None = None) -> int:
    return cli.run(__doc__ or "", body, argv, stdin, stdout, prog=PROG)
