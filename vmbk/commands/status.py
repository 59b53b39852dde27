"""vmbk-status: did last night work, and can each VM be restored?

Usage:
  vmbk-status [options] [--vm NAMES]...
  vmbk-status [options] --restores [--days N]
  vmbk-status [options] --sessions [--days N]
  vmbk-status --public-key
  vmbk-status (-h | --help | --version)

Emits one `status` record per VM of the backup tree (and per VM whose
backups the catalogue saw fail lately without any in the tree): its
state, policy, last successful backup (time, action, consistency), last
attempt and its error, the newest and oldest complete restore point and
the age of the newest, restore points, chains (active, archived, broken
with the reason), bytes on disk, replication per destination (last good
copy, lag), the last restore, drill and verify (vmbk-restore --verify:
when, and what it found), and its lock (held by a live
process, or a stale file the next backup takes over).  Works with the tree
alone when there is no catalogue.  On a terminal: a table with sizes and
ages; --json and pipes get the records with exact numbers.

A VM that should be backed up (not excluded) is a problem when it has no
complete restore point (missing), an active chain that is not complete
(broken; archived chains do not count), or a newest complete restore point
older than --stale HOURS (stale; default `[status] stale_hours`, 26),
unless the catalogue saw it later skipped as shut off and unchanged.  Each
problem is one line on standard error, the VM first, usable as a
Nagios/Icinga-style check and in cron.  Exit status: 0 no VM has a
problem; 9 some VMs have one; 5 every VM that should be backed up has
one; 2 configuration error; 4 backup path missing or unreadable.

The catalogue's history instead: with --restores one `restore_history`
record per restore (default: the last 30 days), with --sessions one
`session_history` record per run (default: the last 7 days).

A site that ran vmbackup on this tree: --import-vmbackup first copies its
runs and VM backups into the catalogue (read-only on vmbackup's side; each
row marked as vmbackup's, so running it again adds only what is new) and
says on standard error how many; the status then counts them.

The host's manifest signing key: --public-key prints its public key (PEM,
what `openssl pkeyutl -verify -pubin -inkey` reads and vmbk-extract --key
takes) on standard output and its fingerprint on standard error, making
the key in /etc/vmbk/keys (VMBK_KEY_DIR) if there is none yet.  Keep a
copy away from the backups: on another host, trusting it means putting
it in the key directory's trusted/.

With --prometheus FILE the VMs' metrics are written in the node_exporter
textfile format too (written aside, then renamed over FILE): last
success, attempt, duration and bytes, restore points, chains, size, lock,
replication lag, each with a `vm` label.

Options:
  --vm NAMES               Only these VMs (comma-separated or repeated).
  --stale HOURS            Age past which a VM's newest restore point is a problem.
  --prometheus FILE        Also write the metrics to FILE (.prom).
  --restores               Restores from the catalogue instead.
  --sessions               Runs from the catalogue instead.
  --days N                 How many days of history --restores/--sessions show.
  --import-vmbackup        First copy vmbackup's _state/vmbackup.db into the catalogue.
  --public-key             Print the host's manifest signing key (PEM), made if missing.
  --now ISO8601            Judge as if it were this time.
  --config-instance NAME   Configuration instance (also VMBK_INSTANCE).
  --backup-path DIR        Backup root; wins over the configuration.
  --json                   JSON lines even on a terminal.
  -h --help                Show this help.
  --version                Show the version.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import IO, Any

from vmbk import cli
from vmbk.commands._common import Common, Session, existing_backup_path, make_emitter, parse_now, positive_int
from vmbk.errors import ConfigError, UsageError
from vmbk.manifest import keys
from vmbk.status import run
from vmbk.status.run import PROG, Outcome, StatusOptions
from vmbk.vmbackup.importer import import_history


def _hours(raw: str | None, default: float) -> float:
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"--stale must be a number of hours, not {raw!r}") from None
    if not value > 0:
        raise UsageError("--stale must be more than 0 hours")
    return value


def body(args: dict[str, Any], ctx: cli.Context) -> int:
    if args.get("--public-key"):
        signer = keys.load_signer()
        if signer is None:
            raise ConfigError(f"no signing key in {keys.key_dir()} and none can be made there (run as root)")
        ctx.stdout.write(keys.public_pem(signer.public).decode("ascii"))
        ctx.stderr.write(f"{PROG}: {signer.fingerprint} ({signer.path})\n")
        return 0
    common = Common.from_args(args)
    cfg = common.config()
    root = existing_backup_path(cfg)
    now = parse_now(args.get("--now"))
    emitter = make_emitter(ctx, common)
    session = Session(emitter).ensure()
    if args["--restores"] or args["--sessions"]:
        days = positive_int(args, "--days", 30 if args["--restores"] else 7)
        since = now - _dt.timedelta(days=days)
        try:
            for rec in (run.restores if args["--restores"] else run.sessions)(root, since, session):
                emitter.emit(rec)
        finally:
            emitter.close()
        return emitter.exit_code()
    if args["--days"] is not None:
        raise UsageError("--days goes with --restores or --sessions")
    if args.get("--import-vmbackup"):
        done = import_history(root)
        ctx.stderr.write(f"{PROG}: imported {done.backups} backups of {len(done.vms)} VMs in {done.sessions} runs "
                         f"from {done.database} (schema {done.schema}); {done.known} were already imported\n")
    prom = args.get("--prometheus")
    opts = StatusOptions(cfg=cfg, backup_path=root, now=now, stale_hours=_hours(args["--stale"], cfg.status.stale_hours),
                         vms=common.vms, prometheus=Path(prom) if prom else None)
    outcome = Outcome()
    records = []
    try:
        for rec in run.statuses(opts, session, outcome):
            records.append(rec)
            emitter.emit(rec)
    finally:
        emitter.close()
    for line in outcome.warnings:
        ctx.stderr.write(f"{PROG}: warning: {line}\n")
    for line in outcome.problems:
        ctx.stderr.write(f"{PROG}: {line}\n")
    run.write_metrics(opts, records)
    return emitter.exit_code() or outcome.exit_code


def main(argv: list[str] | None = None, stdin: IO[Any] | None = None, stdout: IO[Any] | None = None) -> int:
    return cli.run(__doc__ or "", body, argv, stdin, stdout, prog=PROG)
