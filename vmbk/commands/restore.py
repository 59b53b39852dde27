"""vmbk-restore: list backups and restore VMs, disks and points in time.

Usage:
  vmbk-restore --list [options]
  vmbk-restore --list-restore-points VM [options]
  vmbk-restore --verify VM [--deep] [options]
  vmbk-restore --dump VM [options]
  vmbk-restore --vm VM [--restore-path DIR] [--disk DISKS] [--remap-network MAP]... [--remap-pool MAP]...
               [--remap-dir MAP]... [--resume] [options]
  vmbk-restore --vm VM --serve [--socket PATH | --listen ADDR] [--disk DISKS] [options]
  vmbk-restore --vm VM --mount DIR [--disk DISKS] [options]
  vmbk-restore --vm VM --instant --restore-path DIR [options]
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

Onto another host, or one whose networks or storage changed: before
anything is written or defined, the VM's domain XML is checked against the
host it is defined on (networks, bridges, storage pools and directories,
firmware files, machine type, CPU model, emulator, swtpm) and every
problem is named with its fix; the restore exits 5 (kind preflight) having
defined nothing.  --remap-network OLD=NEW moves interfaces from network
OLD to NEW, --network-fallback NAME sends any network or bridge the host
lacks to NAME, --cpu host-model replaces a CPU model the host cannot run.
Without --restore-path the disks go back to their places: the directory
of each disk in the backup's XML, or its storage pool's, after the
remaps --remap-dir OLD=NEW and --remap-pool OLD=NEW.  A firmware file the host
lacks is replaced by libvirt's firmware auto-selection, a machine type by
its alias (q35, pc), an emulator path by the host's own.  The remaps are
in the restore record and the catalogue.  With --connect
qemu+ssh://USER@HOST/system the restore (disaster recovery, clone, or disks
with --restore-path) is made on that host from the backups here: the
preflight and the free space are checked there, each image is streamed
over ssh into FILE.partial as it is written (its qcow2 header last), checked
there with qemu-img check, and all are renamed together before the VM is
defined; NVRAM, the domain XML and TPM state go there too.  If ssh drops,
nothing is defined and the .partial files are removed once the host
answers.  A --disk restore in place is refused for another host.  In a tree
with several hosts (BACKUP_PATH/HOST/VM/) --vm HOST/NAME names the VM.

Instant access, without writing the point out first.  With --serve each
disk of the point is exported read-only over NBD under its target name
(vda), for qemu-img, nbdcopy, nbdinfo, nbdfuse or QEMU: on --socket PATH,
on --listen HOST:PORT (TLS with --tls-cert and --tls-key, required unless
HOST is a loopback address; --tls-ca makes clients show a certificate it
signed), or by default on a socket in a private directory under
/var/tmp/vmbk.  It prints one serve record with the URIs and serves until
SIGINT, SIGTERM or --timeout, then exits 0.  With --mount DIR the point's
file systems appear read-only under DIR (DIR/vda, or DIR/vda1, DIR/vda2
for partitions), through nbdfuse, a read-only loop device and mount -o ro:
ext2/3/4 (noload), xfs (norecovery), and btrfs, vfat, exfat, iso9660 and
udf where the kernel has them, NTFS through ntfs-3g when installed.  LVM
physical volumes are not activated, LUKS is not opened, swap and RAID
members are skipped: the mount record names each with why.  DIR must be
absent or empty; on exit, SIGINT or SIGTERM everything is unmounted and
detached and DIR removed, and what a killed session left is removed by
the next run with --serve, --mount or --instant.  With --instant the VM
(disaster recovery, or a clone with --name) is defined and started on
small qcow2 overlays in --restore-path whose backing file is the export,
so it runs in seconds whatever the size of its disks; then libvirt copies
every disk under the running VM to the file a restore would write there
(--bandwidth limits the copy), pivots to it and the export stops: the VM
never stops.  With --no-move the VM runs on the backup until SIGINT,
SIGTERM or --timeout and is then destroyed with its overlays.  If the
export goes away before the copy is done, the guest gets I/O errors, never
wrong data.  The streams' .chksum are checked before anything is served
(--no-verify skips it).

Resuming where it was.  A restore point saved with vmbk-backup
--with-memory holds the guest's RAM and device state (--list-restore-points
says resumable).  With --resume, a disaster recovery or a clone checks the
point's state manifest against the domain XML it will define and against
this host (architecture, page size, QEMU no older than the one that saved
it, machine type, domain type, CPU model and mode, memory, vCPUs, firmware,
features, every guest-visible device at its address) and refuses with the
list of every mismatch, exit 5 (kind state), having written and defined
nothing; it checks the state's SHA-256 while unpacking it beside the disks,
restores the disks of that point, defines the VM, and starts it from the
state: the guest continues from the instant of the backup, with the same
boot, processes and RAM.  A state is single use with respect to its disks:
it resumes only onto the disks restored with it from that point, and a
second --resume over disks a resumed guest ran on is refused (exit 5)
unless --force restores them again.  The ticket saying so is
FIRST-DISK.vmbk-resume, beside the disks.  A point without a state, or with
a damaged one, is refused with --resume; without it, it restores as any
point (the state files are ignored, by virtnbdrestore too).

Records: backup_vm (--list); chain and restore_point (--list-restore-points);
verify and dump; restore_disk and restore (a restore or --dry-run); serve,
mount and instant.

Verify checks every stream's structure and .chksum, then the chain's (the
data files each point needs, the .cpt, stream headers, side files): one
verify record per data file and one per chain (file null), each with
status ok, bad or unverifiable (a data file without .chksum).  Each
restore point vmbk-backup wrote has a manifest: the name, size and SHA-256
of every file of the point, the hash of the previous point's manifest,
signed with the host's Ed25519 key (/etc/vmbk/keys).  Verify checks the
signatures, the hash chain and every file against them, on the same read
as the checksums, and says per restore point (a verify record with point):
good, tampered (which file), missing, unsigned, unknown-key (signed by a
key not in the key directory) or adler32-only (a tree from before
manifests).  --deep also decodes every lz4 payload and merges each point's
chain as a restore would.  It exits 0 when everything is ok, 4 when
anything is bad (tampered, missing), 9 when nothing is bad but some data
could not be verified (unsigned, unknown key, no .chksum).  A restore
refuses a point whose manifests do not vouch for it unless --force, which
restores it, skipping (and naming) the manifest and checksum checks that
fail.

Options:
  --list                     List VMs with backups.
  --list-restore-points VM   List the restore points of a VM.
  --vm VM                    VM to restore: a name, or a path to its backup directory.
  --restore-path DIR         Where the restored disks go (default for DR and clone: back in their places).
  --remap-network MAP        OLD=NEW: interfaces on network OLD go on NEW (repeatable).
  --network-fallback NAME    Any network or bridge the host lacks: this network.
  --remap-pool MAP           OLD=NEW: disks of storage pool OLD go into pool NEW (repeatable).
  --remap-dir MAP            OLD=NEW: disks under directory OLD go under NEW (repeatable).
  --cpu MODE                 host-model: a CPU model the host cannot run becomes host-model.
  --name NAME                Clone under this name (new UUID and MACs).
  --period PERIOD            Period directory to restore from (default: latest).
  --restore-point N          Restore point: a number or 'full'.
  --disk DISKS               Only these disks (vda,vdb or 'all').
  --force                    Overwrite existing files or VM definition; restore or serve a point that fails its checks.
  --dry-run                  Show the plan; change nothing.
  --verify VM                Check every checksum of the chosen chain.
  --all-chains               With --verify: every chain of the VM (or of --period), archives included.
  --deep                     With --verify: also decode every lz4 payload and merge every point's chain.
  --dump VM                  Print the stream headers as JSON.
  --no-verify                Restore without checking the streams' .chksum, even a point whose files lost it.
  --skip-tpm                 Do not restore TPM state.
  --skip-config              Restore data only; define nothing.
  --no-pre-restore           No .pre-restore safety copies on disk restore.
  --resume                   DR or clone: after the disks, resume the point's saved memory state.
  --include-incomplete       Allow an incomplete chain as the target.
  --serve                    Serve the point's disks read-only over NBD until stopped.
  --socket PATH              With --serve: listen on this unix socket (mode 0600).
  --listen ADDR              With --serve: listen on HOST:PORT (port 0: any free one).
  --tls-cert FILE            With --serve: TLS server certificate (PEM).
  --tls-key FILE             With --serve: its private key (PEM).
  --tls-ca FILE              With --serve: clients must present a certificate this CA signed.
  --mount DIR                Mount the point's file systems read-only under DIR until stopped.
  --instant                  Run the VM from the backup at once, then move its disks to --restore-path.
  --no-move                  With --instant: keep the VM on the backup until stopped, then remove it.
  --bandwidth MIB            With --instant: MiB/s the move may use, 0 for no limit [default: 0].
  --timeout SECONDS          Stop --serve, --mount or --instant --no-move after this long.
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
import time
from pathlib import Path
from typing import IO, Any

from vmbk import cli
from vmbk import config as _config
from vmbk.clock import now_iso
from vmbk.commands._common import Common, Session, existing_backup_path, make_emitter
from vmbk.errors import StorageError, UsageError, VmbkError
from vmbk.output import Emitter
from vmbk.restore import instant, listing, mount, serve, verify
from vmbk.restore.preflight import RestoreOptions
from vmbk.restore.remap import Remaps, parse_pairs
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
    deep: bool = False
    #: --serve, --mount, --instant: where and how the point is served.
    serving: serve.ServeOptions | None = None
    mount_dir: Path | None = None
    instant_opts: instant.InstantOptions | None = None

    @classmethod
    def from_docopt(cls, args: dict[str, Any]) -> Args:
        common = Common.from_args({**args, "--vm": None})
        action: str = "restore"
        vm: str | None = args.get("--vm")
        for flag, what in (("--list", "list"), ("--list-restore-points", "points"), ("--verify", "verify"),
                           ("--dump", "dump")):
            if args.get(flag):
                action, vm = what, (None if flag == "--list" else args[flag])
        access = [f for f in ("--serve", "--mount", "--instant") if args.get(f)]
        if len(access) > 1:
            raise UsageError(f"{' and '.join(access)} cannot be combined")
        _check_access_options(args, access[0] if access else None)
        if access and action == "restore":
            return _access_args(args, common, vm, access[0])
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
            if raw_path is None and not disk_restore and args.get("--skip-config"):
                raise UsageError("--restore-path is required with --skip-config (only a VM that is defined has "
                                 "places to go back to; --disk restores in place)")
            if args.get("--no-pre-restore") and (raw_path is not None or not disk_restore):
                raise UsageError("--no-pre-restore goes with an in-place --disk restore (no --restore-path)")
            if args.get("--resume") and (disk_restore or args.get("--skip-config")):
                raise UsageError("--resume goes with a disaster recovery or a clone: a VM to define and resume")
            options = RestoreOptions(
                resume=bool(args.get("--resume")),
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
                remaps=_remaps(args),
            )
        elif args.get("--restore-point") is not None or args.get("--restore-path") is not None:
            raise UsageError("--restore-point and --restore-path go with --vm")
        if args.get("--deep") and action != "verify":
            raise UsageError("--deep goes with --verify")
        return cls(common, action, vm, args.get("--period"), bool(args.get("--all-chains")), options,
                   deep=bool(args.get("--deep")))


#: Options that belong to one kind of instant access only.
_ONLY = {
    "--socket": "--serve", "--listen": "--serve", "--tls-cert": "--serve", "--tls-key": "--serve",
    "--tls-ca": "--serve", "--no-move": "--instant",
}


def _check_access_options(args: dict[str, Any], access: str | None) -> None:
    for opt, owner in _ONLY.items():
        if args.get(opt) and access != owner:
            raise UsageError(f"{opt} goes with {owner}")
    if args.get("--timeout") is not None and access is None:
        raise UsageError("--timeout goes with --serve, --mount or --instant --no-move")
    if str(args.get("--bandwidth") or "0") != "0" and access != "--instant":
        raise UsageError("--bandwidth goes with --instant")


def _access_args(args: dict[str, Any], common: Common, vm: str | None, access: str) -> Args:
    """--serve, --mount, --instant: their options, typed and checked."""
    for opt in ("--dry-run", "--skip-config", "--no-pre-restore", "--all-chains"):
        if args.get(opt):
            raise UsageError(f"{opt} cannot be combined with {access}")
    if access != "--instant":
        for opt in ("--restore-path", "--name", "--skip-tpm"):
            if args.get(opt) is not None and args.get(opt) is not False:
                raise UsageError(f"{opt} goes with a restore or --instant, not {access}")
    if bool(args.get("--tls-cert")) != bool(args.get("--tls-key")):
        raise UsageError("--tls-cert and --tls-key go together")
    if args.get("--tls-ca") and not args.get("--tls-cert"):
        raise UsageError("--tls-ca needs --tls-cert and --tls-key")
    timeout = _seconds(args.get("--timeout"))
    if timeout is not None and access == "--instant" and not args.get("--no-move"):
        raise UsageError("--timeout goes with --instant --no-move (the move ends by itself)")
    serving = serve.ServeOptions(
        period=args.get("--period"),
        restore_point=parse_restore_point(args.get("--restore-point")),
        disks=parse_disks(args.get("--disk")),
        include_incomplete=bool(args.get("--include-incomplete")),
        verify=not args.get("--no-verify"),
        force=bool(args.get("--force")),
        socket=Path(os.path.abspath(args["--socket"])) if args.get("--socket") else None,
        listen=_address(args["--listen"]) if args.get("--listen") else None,
        tls_cert=Path(args["--tls-cert"]) if args.get("--tls-cert") else None,
        tls_key=Path(args["--tls-key"]) if args.get("--tls-key") else None,
        tls_ca=Path(args["--tls-ca"]) if args.get("--tls-ca") else None,
        timeout=timeout,
    )
    if access == "--serve":
        return Args(common, "serve", vm, None, False, None, serving=serving)
    if access == "--mount":
        return Args(common, "mount", vm, None, False, None, serving=serving, mount_dir=Path(args["--mount"]))
    if args.get("--disk") is not None:
        raise UsageError("--instant brings back the whole VM: --disk cannot be combined with it")
    name = args.get("--name")
    if name is not None and (not name or "/" in name or "\0" in name or name in (".", "..")):
        raise UsageError(f"--name {name!r} is not a usable VM name")
    if args.get("--restore-path") is None:
        raise UsageError("--instant needs --restore-path: where the VM's overlays and, after the move, its disks go")
    options = RestoreOptions(
        restore_path=Path(os.path.abspath(args["--restore-path"])),
        period=serving.period,
        restore_point=serving.restore_point,
        name=name,
        force=bool(args.get("--force")),
        skip_tpm=bool(args.get("--skip-tpm")),
        include_incomplete=serving.include_incomplete,
        verify=serving.verify,
    )
    return Args(common, "instant", vm, None, False, options, serving=serving, instant_opts=instant.InstantOptions(
        move=not args.get("--no-move"), bandwidth_mib=_bandwidth(args.get("--bandwidth")), timeout=timeout))


def _remaps(args: dict[str, Any]) -> Remaps:
    cpu = args.get("--cpu")
    if cpu not in (None, "host-model"):
        raise UsageError(f"--cpu takes host-model, not {cpu!r}")
    return Remaps(networks=parse_pairs(args.get("--remap-network") or [], "--remap-network"),
                  network_fallback=args.get("--network-fallback"),
                  pools=parse_pairs(args.get("--remap-pool") or [], "--remap-pool"),
                  dirs=parse_pairs(args.get("--remap-dir") or [], "--remap-dir"),
                  cpu_host_model=cpu == "host-model")


def _seconds(raw: str | None) -> float | None:
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"--timeout must be a number of seconds, not {raw!r}") from None
    if not value >= 0:
        raise UsageError("--timeout must not be negative")
    return value


def _bandwidth(raw: str | None) -> int:
    try:
        value = int(raw or 0)
    except ValueError:
        raise UsageError(f"--bandwidth must be a whole number of MiB/s, not {raw!r}") from None
    if value < 0:
        raise UsageError("--bandwidth must not be negative")
    return value


def _address(raw: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT``; the host without brackets."""
    host, sep, port = raw.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"--listen takes HOST:PORT (port 0 for any free one), not {raw!r}")
    return host, int(port)


def _root(cfg: _config.Config) -> Path:
    return existing_backup_path(cfg)


def body(args: dict[str, Any], ctx: cli.Context) -> int:
    a = Args.from_docopt(args)
    cfg = a.common.config()
    # A restore goes on without its reader; listings and dry runs stop (vmbk-json(7)).
    changes = a.action in ("restore", "serve", "mount", "instant") and not (a.options and a.options.dry_run)
    emitter = make_emitter(ctx, a.common, changes_state=changes)
    session = Session(emitter).ensure()
    try:
        return _dispatch(a, cfg, emitter, session, ctx)
    except VmbkError as e:
        # The failure as a record too (DESIGN, "The record contract"); the
        # wrapper prints its line and returns its code.
        emitter.error(e, vm=e.vm or (os.path.basename(a.vm.rstrip("/")) if a.vm else None))
        raise
    finally:
        emitter.close()


def _dispatch(a: Args, cfg: _config.Config, emitter: Emitter, session: str, ctx: cli.Context) -> int:
    if a.action == "list":
        for rec in listing.list_vms(_root(cfg), session):
            emitter.emit(rec)
        return emitter.exit_code()
    assert a.vm is not None
    ref = resolve(a.vm, lambda: _root(cfg))
    protected = ((cfg.backup_path,) if cfg.backup_path is not None else ()) + _config.all_backup_paths()
    uri = a.common.uri(cfg)

    def say(line: str) -> None:
        ctx.stderr.write(f"{PROG}: {line}\n")
        ctx.stderr.flush()

    def sweep() -> list[str]:
        return instant.sweep_all(uri)

    if a.action == "restore":
        assert a.options is not None
        opts = dataclasses.replace(a.options, protected=protected)
        restore(ref, opts, uri=uri, session=session, emit=emitter.emit)
        return emitter.exit_code()
    if a.action == "serve":
        assert a.serving is not None
        serve.serve(ref, a.serving, session=session, emit=emitter.emit, say=say, sweep=sweep)
        return emitter.exit_code()
    if a.action == "mount":
        assert a.serving is not None and a.mount_dir is not None
        mount.mount(ref, a.serving, a.mount_dir, session=session, emit=emitter.emit, say=say, protected=protected,
                    sweep=sweep)
        return emitter.exit_code()
    if a.action == "instant":
        assert a.options is not None and a.instant_opts is not None
        instant.instant(ref, dataclasses.replace(a.options, protected=protected), a.instant_opts, uri=uri,
                        session=session, emit=emitter.emit, say=say, sweep=sweep, progress=ctx.stderr)
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
        seen: list[dict[str, Any]] = []
        started, t0 = now_iso(), time.monotonic()
        try:
            for rec in verify.verify_chains(source.vm, chains, session, deep=a.deep):
                seen.append(rec)
                emitter.emit(rec)
            verify.verdict(source.vm, seen)
        except BaseException as e:
            verify.record(source.backup_path, source.vm, seen, started, t0, a.deep, e)
            raise
        verify.record(source.backup_path, source.vm, seen, started, t0, a.deep, None)
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
