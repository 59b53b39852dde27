"""Configuration instances and backup path resolution: loading.

An instance is one TOML file, ``$VMBK_CONFIG_DIR/<instance>.toml``
(default directory ``/etc/vmbk``); see examples/vmbk.toml for every key.
The instance is chosen by ``--config-instance NAME``, else the
``VMBK_INSTANCE`` environment variable, else ``default``.  A named instance
that does not exist is a configuration error (exit 2); a missing
``default.toml`` only means "use the built-in defaults".

The backup path is resolved as vmrestore does (guide, "Backup Path
Resolution"): ``--backup-path`` wins, then the chosen instance's
``backup_path``.  Commands that need one and have none get a config error
that says how to give it.

Unknown keys are errors: a typo in a retention setting must not silently
keep the default.  What the loaded instance says lives in `vmbk.settings`
(pure dataclasses, re-exported here).
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vmbk.errors import ConfigError
from vmbk.tree.names import NOT_VMS
from vmbk.virt.remote import host_name
from vmbk.settings import (
    COMPRESSIONS,
    DRILL_NETWORKS,
    EMAIL_TRANSPORTS,
    HOST_KEY_CHECKING,
    MEMORY_FULL,
    ON_FAILURE,
    POLICIES,
    REPLICATION_ORDERS,
    SCOPES,
    SMTP_TLS,
    SPACE_CHECKS,
    SYNC_MODES,
    TRANSPORTS,
    VERIFY_MODES,
    Config,
    Drill,
    DrillVm,
    Email,
    Encryption,
    Host,
    NbdTcp,
    Replication,
    ReplicationOptions,
    Report,
    Retention,
    Status,
    VmOverride,
)

__all__ = [
    "COMPRESSIONS",
    "POLICIES",
    "TRANSPORTS",
    "Config",
    "Drill",
    "DrillVm",
    "Email",
    "Host",
    "Replication",
    "ReplicationOptions",
    "Report",
    "Retention",
    "Status",
    "VmOverride",
    "all_backup_paths",
    "config_dir",
    "load",
    "parse",
]

DEFAULT_CONFIG_DIR = "/etc/vmbk"
DEFAULT_INSTANCE = "default"
_INSTANCE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
#: A destination's name is a file name too (its state file, its records).
_DEST_NAME = _INSTANCE_NAME


def config_dir(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return env.get("VMBK_CONFIG_DIR") or DEFAULT_CONFIG_DIR


def load(
    instance: str | None = None,
    backup_path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Load the chosen instance and apply ``--backup-path``."""
    env = os.environ if env is None else env
    explicit = instance or env.get("VMBK_INSTANCE") or None
    name = explicit or DEFAULT_INSTANCE
    if not _INSTANCE_NAME.match(name):
        raise ConfigError(f"invalid config instance name {name!r}")
    path = Path(config_dir(env)) / f"{name}.toml"
    if path.is_file():
        cfg = dataclasses.replace(parse(path, name), location=path)
    elif explicit:
        known = sorted(p.stem for p in Path(config_dir(env)).glob("*.toml"))
        hint = f" (known: {', '.join(known)})" if known else ""
        raise ConfigError(f"config instance {name!r} not found: {path} does not exist{hint}")
    else:
        cfg = Config(instance=name, source=None, location=path)
    if backup_path is not None:
        cfg = dataclasses.replace(cfg, backup_path=Path(backup_path))
    return cfg


def all_backup_paths(env: Mapping[str, str] | None = None) -> tuple[Path, ...]:
    """The backup paths of every instance in the configuration directory.

    A restore must not write into any of them (vmrestore guide, 7), not
    only into the one of the instance it reads from.  An instance that
    does not parse is skipped here; using it says why.
    """
    out = []
    for path in sorted(Path(config_dir(env)).glob("*.toml")):
        try:
            cfg = parse(path, path.stem)
        except ConfigError:
            continue
        if cfg.backup_path is not None:
            out.append(cfg.backup_path)
    return tuple(out)


def parse(path: Path, instance: str) -> Config:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    return from_mapping(data, instance=instance, source=path)


def from_mapping(data: Mapping[str, Any], *, instance: str, source: Path | None) -> Config:
    """Validate a parsed TOML document into a `Config`."""
    where = str(source) if source else "config"
    r = _Reader(data, where)
    bp = r.opt_str("backup_path")
    cfg = Config(
        instance=instance,
        source=source,
        backup_path=Path(bp) if bp else None,
        connect=r.opt_str("connect"),
        policy=r.choice("policy", POLICIES, "monthly"),
        compression=r.choice("compression", COMPRESSIONS, "none"),
        compression_level=r.int("compression_level", 1, lo=0, hi=16),
        retention=_retention(r.table("retention"), f"{where} [retention]"),
        exclude=r.str_list("exclude"),
        fstrim=r.bool("fstrim", True),
        fstrim_exclude=r.str_list("fstrim_exclude"),
        memory_pause_timeout=r.int("memory_pause_timeout", 60, lo=1),
        vms={name: _override(t, f"{where} [vm.{name!r}]") for name, t in r.table("vm").items()},
        replication=tuple(
            _replication(t, f"{where} [[replication]] #{i + 1}") for i, t in enumerate(r.table_list("replication"))
        ),
        replication_options=_replicate(r.table("replicate"), f"{where} [replicate]"),
        email=_email(r.table("email"), f"{where} [email]"),
        report=_report(r.table("report"), f"{where} [report]"),
        status=_status(r.table("status"), f"{where} [status]"),
        drill=_drill(r.table("drill"), f"{where} [drill]"),
        hosts=tuple(_host(t, f"{where} hosts #{i + 1}") for i, t in enumerate(r.table_list("hosts"))),
    )
    r.done()
    host_names = [h.name for h in cfg.hosts]
    dups = sorted({n for n in host_names if host_names.count(n) > 1})
    if dups:
        raise ConfigError(f"{where}: host names must be unique (give 'name'): {', '.join(dups)}")
    if cfg.hosts and cfg.connect:
        raise ConfigError(f"{where}: 'connect' and 'hosts' exclude each other: list the host of 'connect' in 'hosts'")
    names = [d.name for d in cfg.replication]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise ConfigError(f"{where}: [[replication]] names must be unique: {', '.join(dups)}")
    return cfg


def _retention(data: Mapping[str, Any], where: str) -> Retention:
    r = _Reader(data, where)
    d = Retention()
    ret = Retention(
        daily=r.int("daily", d.daily, lo=1),
        weekly=r.int("weekly", d.weekly, lo=1),
        monthly=r.int("monthly", d.monthly, lo=1),
        accumulate_warn_depth=r.int("accumulate_warn_depth", d.accumulate_warn_depth, lo=1),
        accumulate_limit=r.int("accumulate_limit", d.accumulate_limit, lo=1),
        archives=_archives(r),
        orphan_min_age=r.int("orphan_min_age", d.orphan_min_age, lo=0),
        orphan_max_age=r.int("orphan_max_age", d.orphan_max_age, lo=1),
        min_free_percent=r.int("min_free_percent", d.min_free_percent, lo=0, hi=100),
    )
    r.done()
    if ret.orphan_min_age > ret.orphan_max_age:
        raise ConfigError(f"{where}: 'orphan_min_age' ({ret.orphan_min_age}) must not exceed "
                          f"'orphan_max_age' ({ret.orphan_max_age})")
    return ret


def _archives(r: _Reader) -> int | None:
    """``archives``: "all" (the default) or how many archived chains to keep."""
    v = r._get("archives")
    if v is None or v == "all":
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise r._bad("archives", '"all" or an integer >= 0')
    return v


def _override(data: Any, where: str) -> VmOverride:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: must be a table")
    r = _Reader(data, where)
    ov = VmOverride(
        policy=r.choice("policy", POLICIES, None),
        compression=r.choice("compression", COMPRESSIONS, None),
        fstrim=r.opt_bool("fstrim"),
        exclude=r.bool("exclude", False),
        # true (the state with each full), false, or "full" (every online backup a full)
        memory=r.bool_or("memory", MEMORY_FULL, False),
    )
    r.done()
    return ov


def _replication(data: Mapping[str, Any], where: str) -> Replication:
    r = _Reader(data, where)
    d = Replication(name="", transport="local", path="")
    rep = Replication(
        name=r.req_str("name"),
        transport=r.choice("transport", TRANSPORTS, "local") or "local",
        path=r.req_str("path"),
        enabled=r.bool("enabled", True),
        sync_mode=r.choice("sync_mode", SYNC_MODES, d.sync_mode),
        bwlimit_kbps=r.int("bwlimit_kbps", 0, lo=0),
        verify=r.choice("verify", VERIFY_MODES, d.verify),
        scope=r.choice("scope", SCOPES, d.scope),
        exclude_vms=r.str_list("exclude_vms"),
        max_delete_percent=r.int("max_delete_percent", d.max_delete_percent, lo=0, hi=100),
        replicate_secrets=r.bool("replicate_secrets", False),
        host=r.opt_str("host"),
        user=r.opt_str("user"),
        port=r.opt_int("port"),
        ssh_key=r.opt_str("ssh_key"),
        strict_host_key_checking=r.choice("strict_host_key_checking", HOST_KEY_CHECKING, d.strict_host_key_checking),
        known_hosts=r.opt_str("known_hosts"),
        remote=r.opt_str("remote"),
        rclone_config=r.opt_str("rclone_config"),
        encrypt=_encryption(r.table("encrypt"), f"{where}.encrypt") if r.table("encrypt") else None,
    )
    r.done()
    if not _DEST_NAME.match(rep.name):
        raise ConfigError(f"{where}: 'name' must be letters, digits, '.', '_' or '-', not {rep.name!r}")
    if rep.transport == "ssh" and not rep.host:
        raise ConfigError(f"{where}: transport 'ssh' needs 'host'")
    if rep.transport == "rclone" and not rep.remote:
        raise ConfigError(f"{where}: transport 'rclone' needs 'remote'")
    if rep.encrypt is not None and rep.sync_mode == "append-only":
        raise ConfigError(f"{where}: an append-only destination cannot be encrypted (its far side reads the .cpt "
                          "it extends)")
    if rep.sync_mode == "append-only" and rep.transport != "ssh":
        raise ConfigError(f"{where}: sync_mode 'append-only' needs transport 'ssh' (a write-only key on the far side)")
    return rep


#: A host's name is a directory of the tree (``<backup_path>/<host>/``): never ``_state`` or hidden.
_HOST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _host(data: Mapping[str, Any], where: str) -> Host:
    """One entry of ``hosts = [{ uri = ..., ssh_key = ..., name = ... }, ...]``."""
    r = _Reader(data, where)
    uri = r.req_str("uri")
    name = r.opt_str("name")
    key = r.opt_str("ssh_key")
    if r.data.get("nbd_tls") is not None and r.data.get("nbd_tcp") is not None:
        raise ConfigError(f"{where}: 'nbd_tls' and 'nbd_tcp' are two data paths: give one")
    tcp = (_nbd_tcp(r.table("nbd_tls"), f"{where} nbd_tls", tls=True) if r.data.get("nbd_tls") is not None
           else _nbd_tcp(r.table("nbd_tcp"), f"{where} nbd_tcp", tls=False) if r.data.get("nbd_tcp") is not None
           else None)
    r.done()
    try:
        default = host_name(uri)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    name = name or default
    if not _HOST_NAME.match(name) or name in NOT_VMS:
        raise ConfigError(f"{where}: host name {name!r} must be letters, digits, '.', '_' or '-' (not first): "
                          "it names the host's directory of the tree")
    if key is not None and not os.path.isabs(key):
        raise ConfigError(f"{where}: 'ssh_key' must be an absolute path, not {key!r}")
    return Host(name=name, uri=uri, ssh_key=key, nbd_tcp=tcp)


def _nbd_tcp(data: Mapping[str, Any], where: str, *, tls: bool) -> NbdTcp:
    """``nbd_tls = { dir = ..., address = ..., port = ... }`` or ``nbd_tcp = { address = ..., port = ... }``."""
    r = _Reader(data, where)
    d = r.req_str("dir") if tls else None
    address = r.opt_str("address")
    port = r.int("port", 10809, 1, 65535)
    r.done()
    if d is not None and not os.path.isabs(d):
        raise ConfigError(f"{where}: 'dir' must be an absolute path, not {d!r}")
    return NbdTcp(dir=d, address=address, port=port)


def _encryption(data: Mapping[str, Any], where: str) -> Encryption:
    r = _Reader(data, where)
    enc = Encryption(recipients=r.str_list("recipients"), passphrase_file=r.opt_str("passphrase_file"))
    r.done()
    if bool(enc.recipients) == bool(enc.passphrase_file):
        raise ConfigError(f"{where}: give 'recipients' (age1... public keys) or 'passphrase_file', one of them: "
                          "age allows a passphrase only alone in a file")
    for rec in enc.recipients:
        if not re.fullmatch(r"age1[02-9ac-hj-np-z]{58}", rec):
            raise ConfigError(f"{where}: {rec!r} is not an age X25519 recipient (age1...)")
    return enc


def _replicate(data: Mapping[str, Any], where: str) -> ReplicationOptions:
    r = _Reader(data, where)
    d = ReplicationOptions()
    opts = ReplicationOptions(
        order=r.choice("order", REPLICATION_ORDERS, d.order),
        on_failure=r.choice("on_failure", ON_FAILURE, d.on_failure),
        space_check=r.choice("space_check", SPACE_CHECKS, d.space_check),
        min_free_percent=r.int("min_free_percent", d.min_free_percent, lo=0, hi=100),
    )
    r.done()
    return opts


def _email(data: Mapping[str, Any], where: str) -> Email:
    r = _Reader(data, where)
    em = Email(
        enabled=r.bool("enabled", False),
        to=r.opt_str("to"),
        sender=r.opt_str("sender"),
        subject_prefix=r.opt_str("subject_prefix") or "[VM Backup]",
        on_success=r.bool("on_success", True),
        on_failure=r.bool("on_failure", True),
        transport=r.choice("transport", EMAIL_TRANSPORTS, "smtp"),
        smtp_host=r.opt_str("smtp_host") or "localhost",
        smtp_port=_port(r),
        smtp_tls=r.choice("smtp_tls", SMTP_TLS, "none"),
        smtp_user=r.opt_str("smtp_user"),
        smtp_password_file=r.opt_str("smtp_password_file"),
        smtp_ca_file=r.opt_str("smtp_ca_file"),
        sendmail=r.opt_str("sendmail") or "/usr/sbin/sendmail",
        hostname=r.opt_str("hostname"),
        timeout=r.int("timeout", 30, lo=1, hi=3600),
    )
    r.done()
    if em.enabled and not (em.recipients and em.sender):
        raise ConfigError(f"{where}: enabled email needs 'to' and 'sender'")
    for addr in (*em.recipients, em.sender or ""):
        if addr.startswith("-") or any(c in addr for c in "\r\n\0"):
            raise ConfigError(f"{where}: {addr!r} is not an email address")
    if em.smtp_password_file and not em.smtp_user:
        raise ConfigError(f"{where}: 'smtp_password_file' needs 'smtp_user'")
    return em


def _port(r: _Reader) -> int | None:
    port = r.opt_int("smtp_port")
    if port is not None and not 0 < port < 65536:
        raise r._bad("smtp_port", "a port number (1-65535)")
    return port


def _url(r: _Reader, key: str) -> str | None:
    url = r.opt_str(key)
    if url is not None and not url.startswith(("http://", "https://")):
        raise r._bad(key, "an http:// or https:// URL")
    return url or None


def _report(data: Mapping[str, Any], where: str) -> Report:
    r = _Reader(data, where)
    d = Report()
    rep = Report(
        ping_url=_url(r, "ping_url"),
        webhook_url=_url(r, "webhook_url"),
        timeout=r.int("timeout", d.timeout, lo=1, hi=300),
        history_days=r.int("history_days", d.history_days, lo=1, hi=3660),
    )
    r.done()
    return rep


def _status(data: Mapping[str, Any], where: str) -> Status:
    r = _Reader(data, where)
    v = r._get("stale_hours")
    if v is None:
        v = Status().stale_hours
    elif isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
        raise r._bad("stale_hours", "a number of hours > 0")
    r.done()
    return Status(stale_hours=float(v))


def _drill(data: Mapping[str, Any], where: str) -> Drill:
    r = _Reader(data, where)
    d = Drill()
    drill = Drill(
        scratch_dir=r.opt_str("scratch_dir") or d.scratch_dir,
        network=r.choice("network", DRILL_NETWORKS, d.network),
        restore_timeout=r.int("restore_timeout", d.restore_timeout, lo=1),
        start_timeout=r.int("start_timeout", d.start_timeout, lo=1),
        boot_timeout=r.int("boot_timeout", d.boot_timeout, lo=1),
        check_timeout=r.int("check_timeout", d.check_timeout, lo=1),
        console_pattern=_regex(r, "console_pattern") or d.console_pattern,
        pictures=r.int("pictures", d.pictures, lo=0),
        pictures_max_mib=r.int("pictures_max_mib", d.pictures_max_mib, lo=0),
        vms={name: _drill_vm(t, f"{where} [drill.vm.{name!r}]") for name, t in r.table("vm").items()},
    )
    r.done()
    if not os.path.isabs(drill.scratch_dir):
        raise ConfigError(f"{where}: 'scratch_dir' must be an absolute path, not {drill.scratch_dir!r}")
    return drill


def _drill_vm(data: Any, where: str) -> DrillVm:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: must be a table")
    r = _Reader(data, where)
    vm = DrillVm(
        file=r.opt_str("file"),
        pattern=_regex(r, "pattern"),
        command=r.str_list("command"),
        boot_timeout=r.opt_int("boot_timeout"),
        console_pattern=_regex(r, "console_pattern"),
        exclude=r.bool("exclude", False),
    )
    r.done()
    if vm.pattern is not None and vm.file is None:
        raise ConfigError(f"{where}: 'pattern' goes with 'file'")
    if vm.file is not None and not vm.file.startswith("/"):
        raise ConfigError(f"{where}: 'file' must be an absolute path in the guest, not {vm.file!r}")
    if vm.boot_timeout is not None and vm.boot_timeout < 1:
        raise r._bad("boot_timeout", ">= 1")
    return vm


def _regex(r: _Reader, key: str) -> str | None:
    v = r.opt_str(key)
    if v is not None:
        try:
            re.compile(v)
        except re.error as e:
            raise r._bad(key, f"a regular expression ({e})") from None
    return v


class _Reader:
    """Typed access to one TOML table that remembers which keys were used."""

    def __init__(self, data: Mapping[str, Any], where: str) -> None:
        self.data = data
        self.where = where
        self.used: set[str] = set()

    def _get(self, key: str) -> Any:
        self.used.add(key)
        return self.data.get(key)

    def _bad(self, key: str, want: str) -> ConfigError:
        return ConfigError(f"{self.where}: {key!r} must be {want}, not {self.data.get(key)!r}")

    def opt_str(self, key: str) -> str | None:
        v = self._get(key)
        if v is not None and not isinstance(v, str):
            raise self._bad(key, "a string")
        return v

    def req_str(self, key: str) -> str:
        v = self.opt_str(key)
        if not v:
            raise ConfigError(f"{self.where}: {key!r} is required")
        return v

    def choice(self, key: str, choices: tuple[str, ...], default: str | None) -> Any:
        v = self._get(key)
        if v is None:
            return default
        if v not in choices:
            raise self._bad(key, "one of " + ", ".join(choices))
        return v

    def opt_int(self, key: str) -> int | None:
        v = self._get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise self._bad(key, "an integer")
        return v

    def int(self, key: str, default: int, lo: int | None = None, hi: int | None = None) -> int:
        v = self.opt_int(key)
        if v is None:
            return default
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise self._bad(key, f"between {lo} and {hi}" if hi is not None else f">= {lo}")
        return v

    def opt_bool(self, key: str) -> bool | None:
        v = self._get(key)
        if v is not None and not isinstance(v, bool):
            raise self._bad(key, "true or false")
        return v

    def bool_or(self, key: str, word: str, default: bool) -> bool | str:
        """true, false, or the string ``word``."""
        v = self._get(key)
        if v is None:
            return default
        if not (isinstance(v, bool) or v == word):
            raise self._bad(key, f'true, false or "{word}"')
        return v

    def bool(self, key: str, default: bool) -> bool:
        v = self.opt_bool(key)
        return default if v is None else v

    def str_list(self, key: str) -> tuple[str, ...]:
        v = self._get(key)
        if v is None:
            return ()
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise self._bad(key, "a list of strings")
        return tuple(v)

    def table(self, key: str) -> Mapping[str, Any]:
        v = self._get(key)
        if v is None:
            return {}
        if not isinstance(v, Mapping):
            raise self._bad(key, "a table")
        return v

    def table_list(self, key: str) -> list[Mapping[str, Any]]:
        v = self._get(key)
        if v is None:
            return []
        if not isinstance(v, list) or not all(isinstance(x, Mapping) for x in v):
            raise self._bad(key, "an array of tables ([[" + key + "]])")
        return v

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(f"{self.where}: unknown key(s): {', '.join(unknown)}")


def hosts_for(cfg: Config, connect: str | None, env: Mapping[str, str] | None = None) -> tuple[Host, ...]:
    """The hypervisors a command works on.

    ``--connect URI``: that one (with the name and ssh key of the
    configured host of that URI, if any); else ``hosts = [...]``; else the
    one of ``connect``, ``LIBVIRT_DEFAULT_URI`` or ``qemu:///system``.
    """
    env = os.environ if env is None else env
    if connect:
        known = cfg.host(connect)
        return (known,) if known is not None else (Host(name=host_name(connect), uri=connect),)
    if cfg.hosts:
        return cfg.hosts
    uri = cfg.connect or env.get("LIBVIRT_DEFAULT_URI") or "qemu:///system"
    return (Host(name=host_name(uri), uri=uri),)
