"""What a configuration instance says, as frozen dataclasses: pure data.

Loading (TOML, the environment, the configuration directory) is
`vmbk.config`'s; the planner and the other pure decisions import only
this module, so they stay free of files and the environment.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping
from pathlib import Path

from vmbk.errors import ConfigError

POLICIES = ("daily", "weekly", "monthly", "accumulate", "never")
COMPRESSIONS = ("none", "lz4")
TRANSPORTS = ("local", "ssh", "rclone")
#: A VM's ``memory = "full"``: every backup of it while running is a full, each carrying the memory state.
MEMORY_FULL = "full"


@dataclasses.dataclass(frozen=True)
class Retention:
    """How many periods each policy keeps, the accumulate chain bounds, and
    what vmbk-rotate does with what a policy change left behind.

    ``archives``: archived chains an accumulate VM keeps (None: all).
    ``orphan_min_age``/``orphan_max_age``: days since the last backup in a
    period directory of another policy's format before it may go / goes.
    ``min_free_percent``: below this much free space on the backup file
    system rotate says so (it never deletes more than the policy allows).
    """

    daily: int = 7
    weekly: int = 4
    monthly: int = 3
    accumulate_warn_depth: int = 30
    accumulate_limit: int = 60
    archives: int | None = None
    orphan_min_age: int = 7
    orphan_max_age: int = 90
    min_free_percent: int = 20

    def keep(self, policy: str) -> int | None:
        """How many periods (accumulate: archived chains) ``policy`` keeps; None: all."""
        if policy in ("daily", "weekly", "monthly"):
            return int(getattr(self, policy))
        if policy == "accumulate":
            return self.archives
        return None


@dataclasses.dataclass(frozen=True)
class VmOverride:
    policy: str | None = None
    compression: str | None = None
    fstrim: bool | None = None
    exclude: bool = False
    #: ``memory = true``: save the guest's RAM and device state with each full backup of it while running;
    #: ``"full"``: every backup of it while running is a full, so that every restore point carries the state.
    memory: bool | str = False


SYNC_MODES = ("mirror", "accumulate", "append-only")
VERIFY_MODES = ("none", "size", "checksum")
SCOPES = ("everything", "archives-only", "monthly")
HOST_KEY_CHECKING = ("yes", "accept-new", "no")
REPLICATION_ORDERS = ("config", "local_first", "cloud_first", "simultaneous")
ON_FAILURE = ("continue", "abort")
SPACE_CHECKS = ("skip", "warn", "disabled")


@dataclasses.dataclass(frozen=True)
class Encryption:
    """A destination's ``encrypt = {...}``: every file stored as an age file
    (`vmbk.replicate.encrypt`), to X25519 recipients or with a passphrase."""

    recipients: tuple[str, ...] = ()
    passphrase_file: str | None = None


@dataclasses.dataclass(frozen=True)
class Replication:
    """One replication destination (vmbackup's DEST_N_* / CLOUD_DEST_N_*)."""

    name: str
    transport: str
    path: str
    enabled: bool = True
    #: mirror (delete what the source deleted) | accumulate (never delete) |
    #: append-only (ssh to a write-only, no-overwrite key: only add files).
    sync_mode: str = "mirror"
    bwlimit_kbps: int = 0
    verify: str = "size"
    #: everything | archives-only (archived chains) | monthly (monthly periods).
    scope: str = "everything"
    #: VMs (glob patterns) this destination does not get.
    exclude_vms: tuple[str, ...] = ()
    #: mirror refuses to delete more than this share of the replica's files.
    max_delete_percent: int = 50
    #: TPM state and BitLocker keys on an rclone remote that is not ``crypt``.
    replicate_secrets: bool = False
    host: str | None = None
    user: str | None = None
    port: int | None = None
    ssh_key: str | None = None
    #: ssh's StrictHostKeyChecking: yes | accept-new | no.
    strict_host_key_checking: str = "yes"
    known_hosts: str | None = None
    remote: str | None = None
    #: rclone's configuration file (rclone's own default when None).
    rclone_config: str | None = None
    #: ``encrypt = { recipients = [...] }`` or ``{ passphrase_file = ... }``: an age-encrypted replica.
    encrypt: Encryption | None = None

    def excludes(self, vm: str) -> bool:
        return any(fnmatch.fnmatchcase(vm, p) for p in self.exclude_vms)

    @property
    def is_cloud(self) -> bool:
        """The manual's "cloud" group (rclone) as opposed to "local" (rsync)."""
        return self.transport == "rclone"


@dataclasses.dataclass(frozen=True)
class ReplicationOptions:
    """``[replicate]``: how vmbk-replicate uses the destinations (vmbackup's
    REPLICATION_ORDER, REPLICATION_ON_FAILURE, REPLICATION_SPACE_CHECK,
    REPLICATION_MIN_FREE_PERCENT)."""

    #: config (one destination after another, as listed) | local_first |
    #: cloud_first | simultaneous (rsync and rclone destinations at once).
    order: str = "config"
    on_failure: str = "continue"
    #: skip (a destination without room is not written) | warn | disabled.
    space_check: str = "skip"
    #: free space a destination must keep after the copy (percent of its size).
    min_free_percent: int = 10


EMAIL_TRANSPORTS = ("smtp", "sendmail")
SMTP_TLS = ("none", "starttls", "tls")
#: The SMTP port of each ``smtp_tls`` when ``smtp_port`` is not set.
SMTP_PORTS = {"none": 25, "starttls": 587, "tls": 465}


@dataclasses.dataclass(frozen=True)
class Email:
    """``[email]``: how vmbk-report --email sends its report (vmbackup's email.conf).

    ``to``: one address or several, comma-separated.  ``transport``: smtp
    (``smtp_host``/``smtp_port``, ``smtp_tls`` none | starttls | tls, an
    optional login whose password is read from ``smtp_password_file``,
    never given on a command line) or sendmail (the local ``sendmail``
    binary).  ``hostname``: the host named in the subject (default: this
    host's name).
    """

    enabled: bool = False
    to: str | None = None
    sender: str | None = None
    subject_prefix: str = "[VM Backup]"
    on_success: bool = True
    on_failure: bool = True
    transport: str = "smtp"
    smtp_host: str = "localhost"
    smtp_port: int | None = None
    smtp_tls: str = "none"
    smtp_user: str | None = None
    smtp_password_file: str | None = None
    #: CA certificates that verify the SMTP server (default: the system's).
    smtp_ca_file: str | None = None
    sendmail: str = "/usr/sbin/sendmail"
    hostname: str | None = None
    #: Seconds for the whole conversation with the server (or sendmail).
    timeout: int = 30

    @property
    def recipients(self) -> tuple[str, ...]:
        return tuple(a.strip() for a in (self.to or "").split(",") if a.strip())

    @property
    def port(self) -> int:
        return self.smtp_port if self.smtp_port is not None else SMTP_PORTS[self.smtp_tls]


@dataclasses.dataclass(frozen=True)
class Report:
    """``[report]``: vmbk-report's notifications and its HTML page.

    ``ping_url``: a dead-man's-switch URL (healthchecks.io style: ``/start``,
    the URL itself, ``/fail``); ``webhook_url``: gets the summary as JSON;
    ``timeout``: seconds per request; ``history_days``: the days the HTML
    report's charts show.
    """

    ping_url: str | None = None
    webhook_url: str | None = None
    timeout: int = 10
    history_days: int = 30


@dataclasses.dataclass(frozen=True)
class Status:
    """``[status]``: ``stale_hours``, the age past which a VM's newest complete
    restore point is a problem for vmbk-status (``--stale`` overrides it)."""

    stale_hours: float = 26.0


DRILL_NETWORKS = ("isolated", "none")


@dataclasses.dataclass(frozen=True)
class DrillVm:
    """``[drill.vm."NAME"]``: what vmbk-drill checks in one VM's booted copy.

    ``file`` must exist in the guest and its content match ``pattern`` (a
    regular expression; any content when None); ``command`` (argv) run
    through the guest agent must exit 0.  Both need the agent.
    ``console_pattern``: a regular expression the serial console must show
    when the guest has no agent (then no fall-back to "file systems
    readable").  ``exclude``: ``vmbk-drill --all`` leaves the VM out.
    """

    file: str | None = None
    pattern: str | None = None
    command: tuple[str, ...] = ()
    boot_timeout: int | None = None
    console_pattern: str | None = None
    exclude: bool = False


@dataclasses.dataclass(frozen=True)
class Drill:
    """``[drill]``: vmbk-drill's scratch space, isolation, timeouts and pictures.

    ``scratch_dir``: where the throwaway copies are written (never inside
    a backup tree).  ``network``: isolated (every NIC on a network vmbk
    creates without a route out) or none (every NIC removed).  Timeouts in
    seconds: ``restore_timeout`` (building and checking the disks),
    ``start_timeout`` (the domain starts), ``boot_timeout`` (the agent
    answers, or the console shows ``console_pattern``), ``check_timeout``
    (each configured check).  ``pictures``: screenshots and console tails
    kept per VM under ``_state/drills/``, ``pictures_max_mib`` for all VMs.
    """

    scratch_dir: str = "/var/tmp/vmbk-drill"
    network: str = "isolated"
    restore_timeout: int = 3600
    start_timeout: int = 120
    boot_timeout: int = 300
    check_timeout: int = 60
    console_pattern: str = r"login:"
    pictures: int = 10
    pictures_max_mib: int = 64
    vms: Mapping[str, DrillVm] = dataclasses.field(default_factory=dict)

    def vm(self, name: str) -> DrillVm:
        return self.vms.get(name) or DrillVm()


@dataclasses.dataclass(frozen=True)
class NbdTcp:
    """A host's pull backups served as NBD over TCP instead of the default,
    an ssh-forwarded unix socket: libvirt's QEMU listens on
    ``address``:``port`` (the next ports when that one is taken).

    With TLS (``nbd_tls = { dir, address, port }`` of a host): QEMU uses the
    host's ``backup_tls_x509_cert_dir`` (qemu.conf; default
    ``default_tls_x509_cert_dir``, /etc/pki/qemu), and vmbk connects with
    ``dir``'s ``ca-cert.pem``, ``client-cert.pem`` and ``client-key.pem``
    (QEMU's names), checking the server's certificate against ``address``.
    Plain (``nbd_tcp = { address, port }``, ``dir`` None): unencrypted and
    unauthenticated, as virtnbdbackup's remote mode: whoever reaches the
    port while a job runs reads the disk; for a trusted backup network.
    """

    #: The client's TLS credentials; None: plain TCP.
    dir: str | None
    #: Where the host's QEMU listens and vmbk connects (default: the URI's host, localhost for a local one).
    address: str | None = None
    port: int = 10809

    @property
    def tls(self) -> bool:
        return self.dir is not None


@dataclasses.dataclass(frozen=True)
class Host:
    """One hypervisor of ``hosts = [...]``: a backup server pulls from each.

    ``uri``: its libvirt URI (``qemu+ssh://root@kvm1/system``; a local
    ``qemu:///system`` too); ``name``: how records and the tree name it
    (default: the URI's host part); ``ssh_key``: the key ssh logs in with
    (libvirt's ``keyfile``; default: ssh's own, ``~/.ssh/config``).
    """

    name: str
    uri: str
    ssh_key: str | None = None
    #: The backups' data path as NBD over TCP, with TLS or plain (None: an ssh-forwarded unix socket).
    nbd_tcp: NbdTcp | None = None


@dataclasses.dataclass(frozen=True)
class Config:
    instance: str
    source: Path | None
    #: Where the instance's file is, or would be (messages name it).
    location: Path | None = None
    backup_path: Path | None = None
    connect: str | None = None
    policy: str = "monthly"
    compression: str = "none"
    compression_level: int = 1
    retention: Retention = Retention()
    exclude: tuple[str, ...] = ()
    fstrim: bool = True
    fstrim_exclude: tuple[str, ...] = ()
    #: The longest guest pause a memory state save may cost (seconds): past it the backup goes on without it.
    memory_pause_timeout: int = 60
    vms: Mapping[str, VmOverride] = dataclasses.field(default_factory=dict)
    replication: tuple[Replication, ...] = ()
    replication_options: ReplicationOptions = ReplicationOptions()
    email: Email = Email()
    report: Report = Report()
    status: Status = Status()
    drill: Drill = Drill()
    #: ``hosts = [...]``: the hypervisors a backup server backs up (empty: ``connect`` alone).
    hosts: tuple[Host, ...] = ()

    @property
    def host_level(self) -> bool:
        """Does the tree have a directory per host (``<backup_path>/<host>/<vm>/``)?

        Only when several hosts are configured: one host keeps vmbackup's
        ``<backup_path>/<vm>/``.
        """
        return len(self.hosts) > 1

    def host(self, name_or_uri: str) -> Host | None:
        """The configured host of that name or URI."""
        for h in self.hosts:
            if name_or_uri in (h.name, h.uri):
                return h
        return None

    def require_backup_path(self) -> Path:
        if self.backup_path is None:
            where = self.source or self.location or f"{self.instance}.toml"
            raise ConfigError(f"no backup path: pass --backup-path DIR or set backup_path in {where}")
        return self.backup_path

    def policy_for(self, vm: str) -> tuple[str, str]:
        """The rotation policy of a VM and where it comes from."""
        override = self.vms.get(vm)
        if override and override.policy:
            return override.policy, "override"
        return self.policy, "default"

    def exclusion(self, vm: str) -> str | None:
        """Why a VM is excluded from backups, or None when it is not."""
        override = self.vms.get(vm)
        if override and override.exclude:
            return "excluded by per-VM override"
        if self.policy_for(vm)[0] == "never":
            return "policy is 'never'"
        for pattern in self.exclude:
            if fnmatch.fnmatchcase(vm, pattern):
                return f"matches exclude pattern {pattern!r}"
        return None

    def fstrim_for(self, vm: str) -> bool:
        override = self.vms.get(vm)
        if override and override.fstrim is not None:
            return override.fstrim
        if not self.fstrim:
            return False
        return not any(fnmatch.fnmatchcase(vm, p) for p in self.fstrim_exclude)

    def memory_for(self, vm: str) -> bool:
        """Does a backup of ``vm`` save its memory state (``memory = true`` or ``"full"`` in its ``[vm.NAME]``)?"""
        return bool(self.memory_mode(vm))

    def memory_mode(self, vm: str) -> bool | str:
        """``memory`` of ``vm``'s ``[vm.NAME]``: False, True, or ``"full"`` (every online backup a full)."""
        override = self.vms.get(vm)
        return override.memory if override else False

    def compression_for(self, vm: str) -> str:
        override = self.vms.get(vm)
        return (override.compression if override and override.compression else None) or self.compression
