"""``vmbk config import-vmbackup DIR``: a vmbackup instance as a vmbk one.

vmbackup keeps an instance in a directory of bash fragments
(``/opt/vmbackup/config/<instance>/``, manual "Configuration Files
Reference"); vmbk in one TOML file.  `import_instance` reads the directory
(never running it: `vmbk.vmbackup.shellconf`) and returns the TOML text of
the same instance: each vmbackup setting becomes the vmbk key that does the
same, named in a comment beside it, or a comment that says why it has none
and what to do instead.  Nothing is left out silently: a line the reader
could not take is a comment too.

Where vmbackup's default differs from vmbk's, the key is written even when
vmbackup's file does not set it, so the instance behaves as vmbackup did
(vmbackup always compresses at level 4; its accumulate chains go to 100
and 365; its replication runs local and cloud at once).  The text is
checked with vmbk's own loader before it is returned.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Iterable
from pathlib import Path

from vmbk import __version__
from vmbk.config import from_mapping
from vmbk.errors import ConfigError
from vmbk.settings import POLICIES, REPLICATION_ORDERS, SCOPES, SPACE_CHECKS, VERIFY_MODES
from vmbk.vmbackup.shellconf import Setting, ShellConf, patterns_file

#: The files of an instance, in the order vmbackup loads them.
FILES = ("vmbackup.conf", "vm_overrides.conf", "exclude_patterns.conf", "email.conf",
         "replication_local.conf", "replication_cloud.conf")
_YES = ("yes", "true", "1", "on")
_NO = ("no", "false", "0", "off")
_DEST_NAME = re.compile(r"[^A-Za-z0-9_.-]+")
_UNUSED_DEST = re.compile(r"^((?:CLOUD_)?DEST_\d+)_")


#: vmbackup.conf settings vmbk has no key for: (vmbackup's default, what to do instead).
NO_KEY = {
    "PROCESS_PRIORITY": ("10", "the unit's Nice= (vmbk-backup.service has Nice=10; systemctl edit vmbk-backup.service)"),
    "IO_PRIORITY_CLASS": ("2", "the unit's IOSchedulingClass= (1 realtime, 2 best-effort, 3 idle; the unit has "
                               "best-effort)"),
    "IO_PRIORITY_LEVEL": ("5", "the unit's IOSchedulingPriority= (the unit has 5)"),
    "CHECKPOINT_FORCE_FULL_ON_DAY": ("1", "a new chain (a full) begins with each period of the policy: the 1st of "
                                          "the month under monthly"),
    "CHECKPOINT_HEALTH_CHECK": ("yes", "vmbk checks every chain and checkpoint before each backup, always"),
    "LOG_LEVEL": ("INFO", "the environment's VMBK_LOG (Environment=VMBK_LOG=INFO in the unit); messages go to "
                          "stderr, the journal under systemd"),
    "LOG_DIR": ("logs", "the unit's messages are in the journal, its records in /var/log/vmbk"),
    "MAX_RETRIES": ("3", "vmbk does not retry a failed VM in the same run; the next run heals the chain "
                         "(or vmbk-backup --vm NAME now)"),
    "VIRTNBD_SCRATCH_DIR": ("/var/tmp", "vmbk keeps its NBD sockets in /var/tmp/vmbk"),
    "FSTRIM_MINIMUM": ("1048576", "vmbk's fstrim trims every free range (minimum 0)"),
    "FSTRIM_TIMEOUT": ("300", "vmbk's fstrim waits as long as libvirt waits for the guest agent; a failed "
                              "fstrim is a warning, the backup goes on"),
    "FSTRIM_WINDOWS_TIMEOUT": ("600", "vmbk's fstrim waits as long as libvirt waits for the guest agent"),
    "OFFLINE_CHANGE_DETECTION_THRESHOLD": ("60", "vmbk compares each disk's modification time with the last backup"),
    "STATE_BACKUP_KEEP_DAYS": ("90", "vmbk does not snapshot _state/; its catalogue can be rebuilt from the tree, "
                                     "and vmbk-replicate copies a consistent snapshot of it"),
    "LOG_KEEP_DAYS": ("30", "logrotate (/etc/logrotate.d/vmbk) and journald keep the logs"),
}
EMAIL_NO_KEY = {
    "EMAIL_INCLUDE_REPLICATION": "vmbk-report's summary always says what vmbk-replicate did",
    "EMAIL_INCLUDE_DISK_SPACE": "vmbk-report's summary always says the free space",
}
CLOUD_NO_KEY = {
    "CLOUD_REPLICATION_EXPIRY_WARN_DAYS": "vmbk does not track credential expiry dates",
    "CLOUD_REPLICATION_EXPIRY_CRITICAL_DAYS": "vmbk does not track credential expiry dates",
    "CLOUD_REPLICATION_LOG_LEVEL": "one VMBK_LOG for every stage",
    "CLOUD_REPLICATION_USE_LOCKFILE": "vmbk-replicate locks each VM, as every stage does",
    "CLOUD_REPLICATION_LOCKFILE": "vmbk-replicate locks each VM, as every stage does",
    "CLOUD_REPLICATION_LOCK_TIMEOUT": "vmbk-replicate locks each VM, as every stage does",
    "CLOUD_REPLICATION_DRY_RUN": "vmbk-replicate --dry-run, by hand",
}


class _Out:
    """TOML text being written: keys with the vmbackup setting they come from."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def key(self, key: str, value: object, source: str = "") -> None:
        line = f"{key} = {_toml(value)}"
        self.lines.append(f"{line}   # {source}" if source else line)

    def note(self, text: str) -> None:
        self.lines.extend("# " + part if part else "#" for part in text.split("\n"))

    def table(self, header: str) -> None:
        self.lines.extend(["", header])


@dataclasses.dataclass
class _Source:
    """The instance being read, and which of its settings were used."""

    conf: ShellConf
    used: set[tuple[str, str | None]] = dataclasses.field(default_factory=set)
    #: Settings whose value could not be used (vmbackup's default was).
    invalid: set[str] = dataclasses.field(default_factory=set)
    #: Notes for the end: what was read but not carried over.
    dropped: list[str] = dataclasses.field(default_factory=list)

    def get(self, name: str) -> Setting | None:
        s = self.conf.scalars.get(name) or self.conf.arrays.get(name)
        if s is not None:
            self.used.add((name, None))
        return s

    def text(self, name: str) -> str | None:
        s = self.get(name)
        return s.value if s is not None and isinstance(s.value, str) else None


def import_instance(directory: Path) -> str:
    """The vmbk TOML instance equivalent to the vmbackup instance in ``directory``."""
    if not directory.is_dir():
        raise ConfigError(f"{directory}: not a directory (a vmbackup instance is /opt/vmbackup/config/NAME)")
    if not (directory / "vmbackup.conf").is_file():
        hint = ""
        if (directory / "config" / "default" / "vmbackup.conf").is_file():
            hint = f" (vmbackup's own directory? its default instance is {directory / 'config' / 'default'})"
        raise ConfigError(f"{directory}: no vmbackup.conf: not a vmbackup config instance{hint}")
    conf = ShellConf()
    present = []
    for name in FILES:
        path = directory / name
        if path.is_file():
            conf.read(_read(path), name)
            present.append(name)
    src = _Source(conf)
    out = _Out()
    out.note(f"vmbk configuration instance imported from vmbackup's {directory}\n"
             f"by `vmbk config import-vmbackup` (vmbk {__version__}), from:\n"
             f"  {', '.join(present)}.\n"
             "Each vmbackup setting is below: as the vmbk key that does the same (named\n"
             "beside it), or as a comment saying why vmbk has none. Every key:\n"
             "/usr/share/doc/vmbk/examples/vmbk.toml (examples/vmbk.toml in a clone).")
    out.lines.append("")
    _main(src, directory, out)
    _overrides(src, out)
    dests = _local(src) + _cloud(src)
    _replicate(src, out, dests)
    _email(src, out, "email.conf" in present)
    _unused(src, out)
    text = "\n".join(out.lines).rstrip("\n") + "\n"
    try:
        from_mapping(tomllib.loads(text), instance="imported", source=None)
    except (tomllib.TOMLDecodeError, ConfigError) as e:  # a value the mapping let through
        raise ConfigError(f"{directory}: the imported instance does not load: {e}") from None
    return text


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None


def _main(src: _Source, directory: Path, out: _Out) -> None:
    path = src.text("BACKUP_PATH")
    if path and path.strip():
        path = path.strip()
        out.key("backup_path", path.rstrip("/") or "/", "BACKUP_PATH")
    else:
        out.note("BACKUP_PATH is not set: set backup_path (vmbackup's tree, so vmbk continues its chains)")
    _choice(src, out, "policy", "DEFAULT_ROTATION_POLICY", POLICIES, "monthly")
    level = _int(src, out, "VIRTNBD_COMPRESS_LEVEL", 4, lo=0, hi=16)
    out.key("compression", "lz4", "vmbackup always compresses (virtnbdbackup --compress)")
    if level == 0:
        out.key("compression_level", 1, "VIRTNBD_COMPRESS_LEVEL=0, which vmbackup raises to 1")
    else:
        out.key("compression_level", level, _origin(src, "VIRTNBD_COMPRESS_LEVEL", 4))
    patterns = src.get("EXCLUDE_PATTERNS") or src.get("EXCLUDE_PATTERN")
    if patterns is not None:
        out.key("exclude", _listed(patterns.value), f"{patterns.name} ({patterns.file})")
    fstrim = _bool(src, out, "ENABLE_FSTRIM", True)
    out.key("fstrim", fstrim, _origin(src, "ENABLE_FSTRIM", "true"))
    name = src.text("FSTRIM_EXCLUDE_FILE") or "fstrim_exclude.conf"
    file = directory / name if not name.startswith("/") else Path(name)
    if file.is_file():
        out.key("fstrim_exclude", patterns_file(_read(file)), f"{file.name} (FSTRIM_EXCLUDE_FILE)")
    elif src.text("FSTRIM_EXCLUDE_FILE"):
        out.note(f"FSTRIM_EXCLUDE_FILE={name}: no such file here; no fstrim_exclude")
    for key, (_, instead) in NO_KEY.items():
        s = src.get(key)
        if s is not None:
            out.note(f"{key}={s.value}: no key in vmbk; {instead}")
    _flag_note(src, out, "SKIP_OFFLINE_UNCHANGED_BACKUPS", True,
               "vmbk always skips a shut-off VM whose disks did not change since its last backup")
    _flag_note(src, out, "ENABLE_AUTO_RECOVERY_ON_CHECKPOINT_CORRUPTION", True,
               "vmbk always heals a broken chain or checkpoint (a new full, the old chain archived) and says "
               "why in the record")

    out.table("[retention]")
    for key, name, default in (("daily", "RETENTION_DAYS", 7), ("weekly", "RETENTION_WEEKS", 4),
                               ("monthly", "RETENTION_MONTHS", 3), ("accumulate_warn_depth", "ACCUMULATE_WARN_DEPTH", 100),
                               ("accumulate_limit", "ACCUMULATE_HARD_LIMIT", 365)):
        out.key(key, _int(src, out, name, default, lo=1), _origin(src, name, default))
    lo = _int(src, out, "RETENTION_ORPHAN_MIN_AGE_DAYS", 7, lo=0)
    hi = _int(src, out, "RETENTION_ORPHAN_MAX_AGE_DAYS", 90, lo=1)
    enabled = _bool(src, out, "RETENTION_ORPHAN_ENABLED", True)
    dry = _bool(src, out, "RETENTION_ORPHAN_DRY_RUN", False)
    out.key("orphan_min_age", min(lo, hi), _origin(src, "RETENTION_ORPHAN_MIN_AGE_DAYS", 7))
    if not enabled or dry:
        why = "RETENTION_ORPHAN_ENABLED=false" if not enabled else "RETENTION_ORPHAN_DRY_RUN=true"
        out.key("orphan_max_age", 36500, f"{why}: vmbackup never deleted them; vmbk has no switch")
        out.note("(vmbk-rotate --all --dry-run shows what a shorter orphan_max_age would remove)")
    else:
        out.key("orphan_max_age", hi, _origin(src, "RETENTION_ORPHAN_MAX_AGE_DAYS", 90))


def _overrides(src: _Source, out: _Out) -> None:
    for name, s in src.conf.maps.get("VM_POLICY", {}).items():
        src.used.add(("VM_POLICY", name))
        policy = s.value if isinstance(s.value, str) else ""
        if policy in POLICIES:
            out.table(f"[vm.{_toml(name)}]")
            out.key("policy", policy, f"VM_POLICY[{name}] ({s.file})")
        else:
            src.dropped.append(f"VM_POLICY[{name}]={policy} ({s.file}): not a policy ({', '.join(POLICIES)})")
    for map_name, entries in src.conf.maps.items():
        if map_name != "VM_POLICY":
            for key, s in entries.items():
                src.used.add((map_name, key))
                src.dropped.append(f"{map_name}[{key}]={s.value} ({s.file}): not a vmbackup setting the importer knows")


@dataclasses.dataclass
class _Dest:
    keys: list[tuple[str, object, str]]
    notes: list[str]


def _dest_numbers(src: _Source, prefix: str) -> list[int]:
    """The destinations vmbackup uses: each N with ``<prefix>N_ENABLED`` set."""
    pat = re.compile(rf"^{prefix}(\d+)_ENABLED$")
    return sorted(int(m.group(1)) for name in src.conf.scalars if (m := pat.match(name)))


def _local(src: _Source) -> list[_Dest]:
    master = _yes(src.text("REPLICATION_ENABLED"), False)
    out = []
    for n in _dest_numbers(src, "DEST_"):
        p = f"DEST_{n}_"
        d = _Dest([], [])
        transport = (src.text(p + "TRANSPORT") or "local").lower()
        path = src.text(p + "PATH") or ""
        host = src.text(p + "HOST")
        if transport in ("nfs", "smb"):
            d.notes.append(f"{p}TRANSPORT={transport}: vmbk's local transport, to the share mounted at the path "
                           "(mount it first: an unmounted share is never written to)")
            transport = "local"
        elif transport == "ssh" and not host and ":" in path:  # HOST:PATH, as the manual allows
            host, _, path = path.partition(":")
        elif transport not in ("local", "ssh"):
            d.notes.append(f"{p}TRANSPORT={transport} (replication_local.conf): vmbk has no such transport")
            out.append(_skip(src, p, d))
            continue
        if not path:
            d.notes.append(f"{p}PATH is not set (replication_local.conf): the destination is not carried over")
            out.append(_skip(src, p, d))
            continue
        enabled = _yes(src.text(p + "ENABLED"), False)
        d.keys += [("name", src.text(p + "NAME") or f"dest_{n}", p + "NAME"), ("transport", transport, p + "TRANSPORT"),
                   ("path", path, p + "PATH"),
                   ("enabled", master and enabled, f"{p}ENABLED, REPLICATION_ENABLED={src.text('REPLICATION_ENABLED') or 'no'}")]
        _dest_choice(src, d, p + "SYNC_MODE", "sync_mode", {"mirror": "mirror", "accumulate": "accumulate"})
        _dest_int(src, d, p + "BWLIMIT", "bwlimit_kbps")
        _dest_choice(src, d, p + "VERIFY", "verify", {v: v for v in VERIFY_MODES})
        if transport == "ssh":
            if host:
                d.keys.append(("host", host, p + "HOST"))
            else:
                d.notes.append(f"{p}HOST is not set: set host")
            for key in ("USER", "SSH_KEY"):
                if src.text(p + key):
                    d.keys.append((key.lower(), src.text(p + key), p + key))
            _dest_int(src, d, p + "PORT", "port")
        _dest_rest(src, d, p)
        out.append(d)
    return out


def _cloud(src: _Source) -> list[_Dest]:
    master = _yes(src.text("CLOUD_REPLICATION_ENABLED"), False)
    scope = src.text("CLOUD_REPLICATION_SCOPE") or "everything"
    mode = src.text("CLOUD_REPLICATION_SYNC_MODE") or "mirror"
    verify = src.text("CLOUD_REPLICATION_POST_VERIFY") or "checksum"
    bwlimit = src.text("CLOUD_REPLICATION_DEFAULT_BWLIMIT") or "0"
    exclude = [v.strip() for v in (src.text("CLOUD_REPLICATION_VM_EXCLUDE") or "").split(",") if v.strip()]
    out = []
    modes = {"mirror": "mirror", "accumulate-all": "accumulate", "accumulate-valid": "accumulate"}
    for n in _dest_numbers(src, "CLOUD_DEST_"):
        p = f"CLOUD_DEST_{n}_"
        d = _Dest([], [])
        remote = src.text(p + "REMOTE")
        if not remote:
            d.notes.append(f"{p}REMOTE is not set (replication_cloud.conf): the destination is not carried over")
            out.append(_skip(src, p, d))
            continue
        enabled = _yes(src.text(p + "ENABLED"), False)
        d.keys += [("name", src.text(p + "NAME") or f"cloud_{n}", p + "NAME"), ("transport", "rclone", "rclone"),
                   ("remote", remote, p + "REMOTE"), ("path", src.text(p + "PATH") or "", p + "PATH"),
                   ("enabled", master and enabled,
                    f"{p}ENABLED, CLOUD_REPLICATION_ENABLED={src.text('CLOUD_REPLICATION_ENABLED') or 'no'}")]
        _dest_choice(src, d, p + "SYNC_MODE", "sync_mode", modes, default=mode, default_from="CLOUD_REPLICATION_SYNC_MODE")
        if (src.text(p + "SYNC_MODE") or mode) == "accumulate-valid":
            d.notes.append("accumulate-valid: vmbk's accumulate never deletes, and it copies a chain's files in an "
                           "order that keeps an unfinished point incomplete on the replica")
        _dest_choice(src, d, p + "SCOPE", "scope", {v: v for v in SCOPES}, default=scope,
                     default_from="CLOUD_REPLICATION_SCOPE")
        _dest_choice(src, d, p + "VERIFY", "verify", {v: v for v in VERIFY_MODES}, default=verify,
                     default_from="CLOUD_REPLICATION_POST_VERIFY")
        _dest_int(src, d, p + "BWLIMIT", "bwlimit_kbps", default=bwlimit, default_from="CLOUD_REPLICATION_DEFAULT_BWLIMIT")
        if exclude:
            d.keys.append(("exclude_vms", [_glob_escape(v) for v in exclude], "CLOUD_REPLICATION_VM_EXCLUDE"))
        provider = src.text(p + "PROVIDER")
        if provider:
            d.notes.append(f"{p}PROVIDER={provider}: no key; the rclone remote says what it is")
        d.notes.append("vmbackup's copy here held the TPM state and BitLocker keys too (they are in the tree);\n"
                       "vmbk sends them to an rclone remote only when it is a crypt remote or replicate_secrets = true")
        for key, why in (("MAX_SIZE", "rclone splits nothing; the remote's own limit applies"),
                         ("SECRET_EXPIRY", "vmbk does not track credential expiry dates")):
            if src.text(p + key):
                d.notes.append(f"{p}{key}={src.text(p + key)}: no key; {why}")
        _dest_rest(src, d, p)
        out.append(d)
    return out


def _skip(src: _Source, prefix: str, d: _Dest) -> _Dest:
    for name in src.conf.scalars:
        if name.startswith(prefix):
            src.used.add((name, None))
    return d


def _dest_rest(src: _Source, d: _Dest, prefix: str) -> None:
    for name, s in src.conf.scalars.items():
        if name.startswith(prefix) and (name, None) not in src.used:
            src.used.add((name, None))
            d.notes.append(f"{name}={s.value}: no key in vmbk; not carried over")


def _dest_choice(src: _Source, d: _Dest, name: str, key: str, choices: dict[str, str], *,
                 default: str | None = None, default_from: str = "") -> None:
    value = src.text(name) or default
    origin = name if src.text(name) else default_from
    if value is None:
        return
    if value in choices:
        d.keys.append((key, choices[value], origin))
    else:
        d.notes.append(f"{origin}={value}: not one of {', '.join(choices)}; vmbk's default applies")


def _dest_int(src: _Source, d: _Dest, name: str, key: str, *, default: str | None = None, default_from: str = "") -> None:
    value = src.text(name) or default
    origin = name if src.text(name) else default_from
    if value is None or value == "":
        return
    if value.isdigit():
        d.keys.append((key, int(value), origin))
    else:
        d.notes.append(f"{origin}={value}: not a number; vmbk's default applies")


def _replicate(src: _Source, out: _Out, dests: list[_Dest]) -> None:
    opts: list[tuple[str, object, str]] = []
    notes: list[str] = []

    def option(key: str, name: str, value: object, ok: bool, origin: str = "") -> None:
        if ok:
            opts.append((key, value, origin or name))
        elif src.text(name) is not None:
            notes.append(f"{name}={src.text(name)}: not a value vmbk takes; vmbk's default applies")

    order = src.text("REPLICATION_ORDER") or "simultaneous"
    option("order", "REPLICATION_ORDER", order, order in REPLICATION_ORDERS,
           _origin(src, "REPLICATION_ORDER", "simultaneous"))
    local_fail, cloud_fail = src.text("REPLICATION_ON_FAILURE"), src.text("CLOUD_REPLICATION_ON_FAILURE")
    for name, said in (("REPLICATION_ON_FAILURE", local_fail), ("CLOUD_REPLICATION_ON_FAILURE", cloud_fail)):
        option("", name, None, said is None or said in ("continue", "abort"))
    failure = [v for v in (local_fail, cloud_fail) if v in ("continue", "abort")]
    if failure:
        opts.append(("on_failure", "abort" if "abort" in failure else "continue",
                     "REPLICATION_ON_FAILURE, CLOUD_REPLICATION_ON_FAILURE"))
        if len(set(failure)) > 1:
            notes.append("vmbk has one on_failure for every destination: abort, as one of vmbackup's two said")
    check = src.text("REPLICATION_SPACE_CHECK")
    if check is not None:
        option("space_check", "REPLICATION_SPACE_CHECK", check, check in SPACE_CHECKS)
    free = src.text("REPLICATION_MIN_FREE_PERCENT")
    if free is not None:
        option("min_free_percent", "REPLICATION_MIN_FREE_PERCENT", int(free) if free.isdigit() else 0,
               free.isdigit() and int(free) <= 100)
    opts = [o for o in opts if o[0]]
    if not dests and len(opts) <= 1 and not notes:  # only vmbackup's default order: nothing to replicate
        return
    out.table("[replicate]")
    for key, value, origin in opts:
        out.key(key, value, origin)
    for note in notes:
        out.note(note)
    names: set[str] = set()
    for d in dests:
        if not d.keys:
            src.dropped.extend(d.notes)
            continue
        out.table("[[replication]]")
        for key, given, origin in d.keys:
            if key == "name":
                given = _unique(_DEST_NAME.sub("-", str(given)).strip("-.") or "dest", names)
            out.key(key, given, origin)
        for note in d.notes:
            out.note(note)


def _email(src: _Source, out: _Out, present: bool) -> None:
    out.table("[email]")
    if not present:
        out.note("no email.conf: vmbackup sent no email")
        out.key("enabled", False)
        return
    enabled = _yes(src.text("EMAIL_ENABLED"), True)
    to, sender = src.text("EMAIL_RECIPIENT"), src.text("EMAIL_SENDER")
    if enabled and not (to and sender):
        out.note("EMAIL_ENABLED without EMAIL_RECIPIENT and EMAIL_SENDER: vmbk needs both; disabled")
        enabled = False
    out.key("enabled", enabled, _origin(src, "EMAIL_ENABLED", "yes"))
    if to:
        out.key("to", to, "EMAIL_RECIPIENT")
    if sender:
        out.key("sender", sender, "EMAIL_SENDER")
    if src.text("EMAIL_HOSTNAME"):
        out.key("hostname", src.text("EMAIL_HOSTNAME"), "EMAIL_HOSTNAME")
    if src.text("EMAIL_SUBJECT_PREFIX"):
        out.key("subject_prefix", src.text("EMAIL_SUBJECT_PREFIX"), "EMAIL_SUBJECT_PREFIX")
    out.key("on_success", _bool(src, out, "EMAIL_ON_SUCCESS", True), _origin(src, "EMAIL_ON_SUCCESS", "yes"))
    out.key("on_failure", _bool(src, out, "EMAIL_ON_FAILURE", True), _origin(src, "EMAIL_ON_FAILURE", "yes"))
    out.key("transport", "sendmail", "vmbackup mails through msmtp (its /etc/msmtprc)")
    out.key("sendmail", "/usr/bin/msmtp")
    for name, why in EMAIL_NO_KEY.items():
        if src.get(name) is not None:
            out.note(f"{name}={src.text(name)}: no key; {why}")


def _unused(src: _Source, out: _Out) -> None:
    lines = list(src.dropped)
    for name, s in [*src.conf.scalars.items(), *src.conf.arrays.items()]:
        if (name, None) in src.used:
            continue
        unused_dest = _UNUSED_DEST.match(name)
        if unused_dest:
            lines.append(f"{name}={s.value} ({s.file}): vmbackup uses no destination without "
                         f"{unused_dest.group(1)}_ENABLED; not carried over")
        elif name in CLOUD_NO_KEY:
            lines.append(f"{name}={s.value} ({s.file}): no key; {CLOUD_NO_KEY[name]}")
        else:
            value = " ".join(s.value) if isinstance(s.value, list) else s.value
            lines.append(f"{name}={value} ({s.file}): not a vmbackup setting the importer knows; not carried over")
    for skipped in src.conf.skipped:
        lines.append(f"{skipped.file}:{skipped.line}: not read ({skipped.why}): {skipped.text}")
    if lines:
        out.lines.append("")
        out.note("Not carried over:")
        for line in lines:
            out.note(line)
    # Read and taken into account, but named nowhere above: an empty per-destination
    # value (the global one applies), a default vmbk shares, a switch that is off.
    text = "\n".join(out.lines)
    quiet = [(n, s) for n, s in [*src.conf.scalars.items(), *src.conf.arrays.items()] if not re.search(rf"\b{n}\b", text)]
    if quiet:
        out.lines.append("")
        out.note("Read, and nothing to write for them (vmbk does the same without a key):")
        for name, s in quiet:
            value = " ".join(s.value) if isinstance(s.value, list) else s.value
            out.note(f"{name}={value} ({s.file})")


def _origin(src: _Source, name: str, default: object) -> str:
    """The setting a key comes from, or vmbackup's default when it is not set (or not usable)."""
    return name if name not in src.invalid and src.text(name) is not None else f"vmbackup's default for {name} ({default})"


def _choice(src: _Source, out: _Out, key: str, name: str, choices: Iterable[str], default: str) -> None:
    value = src.text(name)
    if value is not None and value not in choices:
        out.note(f"{name}={value}: not one of {', '.join(choices)}; vmbackup's default {default} instead")
        value = None
    out.key(key, value or default, name if value else f"vmbackup's default for {name} ({default})")


def _int(src: _Source, out: _Out, name: str, default: int, *, lo: int, hi: int | None = None) -> int:
    value = src.text(name)
    if value is None:
        return default
    try:
        number = int(value.strip())
    except ValueError:
        number = None
    if number is None or number < lo or (hi is not None and number > hi):
        out.note(f"{name}={value}: not a number vmbk takes here; vmbackup's default {default} instead")
        src.invalid.add(name)
        return default
    return number


def _bool(src: _Source, out: _Out, name: str, default: bool) -> bool:
    value = src.text(name)
    if value is None:
        return default
    if value.lower() in _YES or value.lower() in _NO:
        return value.lower() in _YES
    out.note(f"{name}={value}: neither yes nor no; vmbackup's default {'yes' if default else 'no'} instead")
    src.invalid.add(name)
    return default


def _yes(value: str | None, default: bool) -> bool:
    return default if value is None else value.strip().lower() in _YES


def _flag_note(src: _Source, out: _Out, name: str, default: bool, behaviour: str) -> None:
    value = src.text(name)
    if value is None:
        return
    if _yes(value, default):
        out.note(f"{name}={value}: no key; {behaviour}")
    else:
        out.note(f"{name}={value}: no key, and vmbk differs here: {behaviour}")


def _listed(value: str | list[str]) -> list[str]:
    return list(value) if isinstance(value, list) else [value]


def _unique(name: str, names: set[str]) -> str:
    base, n = name, 2
    while name in names:
        name, n = f"{base}-{n}", n + 1
    names.add(name)
    return name


def _glob_escape(name: str) -> str:
    """A VM name as a glob that matches only it (vmbackup's list holds names)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    text = str(value)
    out = ['"']
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif c == "\n":
            out.append("\\n")
        elif c == "\t":
            out.append("\\t")
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    out.append('"')
    return "".join(out)
