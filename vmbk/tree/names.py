"""Names in a backup tree: period ids, data files, checkpoints, archives.

The layout is vmbackup's (manual, "Rotation Policies" and "Archive Chain
Management") over virtnbdbackup's file names, so that trees written by
either tool are read by vmbk and the other way round::

    <vm>/<period>/                     YYYYMMDD | YYYY-Www | YYYYMM
    <vm>/                              accumulate: the VM directory itself
        <dev>.full.data                checkpoint virtnbdbackup.0
        <dev>.inc.virtnbdbackup.<N>.data
        <dev>.copy.data                offline copy, or a raw disk of a full
        <file>.data.chksum             adler32 of the whole file
        <vm>.cpt                       JSON list of checkpoint names
        checkpoints/virtnbdbackup.<N>.xml
        vmconfig.virtnbdbackup.<N>.xml | vmconfig.copy.xml
        <dev>.<ident>.qcow.json        ``qemu-img info`` of the source
        <nvram>.<ident> | <nvram>      UEFI vars (a copy backup: plain name)
        tpm-state/                     swtpm state, root only
        .archives/chain-YYYY-MM-DD[.N]/
        .deleting-<name>/              a period or archive being deleted
        .full-backup-month             vmbackup's marker: the period of its last full
        config/<vm>_config_<period>_FIRST.xml | <vm>_config_<YYYYMMDD_HHMMSS>.xml
                                       domain XML as vmbackup keeps it (vmrestore reads it)
        .tpm-backup-marker             vmbackup's "this chain has TPM state"
        vmbk.<ident>.manifest          vmbk's signed list of a point's files and hashes
        vmstate.<checkpoint>.lz4       the guest's RAM and device state at the point (lz4 frames
                                       of libvirt's save image; root only), ``--with-memory``
        vmstate.<checkpoint>.json      its state manifest: what it needs to resume, its hashes
    <vm>/chain-manifest.json           vmbackup's manifest of restore points
    .deleting-<vm>/                    a VM directory being deleted
    _state/                            catalogue and locks, never a VM
    <host>/.vmbk-host                  with several hosts configured, each host's directory,
    <host>/<vm>/..., <host>/_state/    marked so, is a backup root of its own (VMs, locks, catalogue)
    _state/vmbackup.db                 vmbackup's catalogue (read only by vmbk)

``<ident>`` is a point's checkpoint name, or ``copy``.  This module is
the one place these names are spelled: the backup writes them, the
scanner, restore, rotate and replicate read them from here.

Everything here is pure: strings and dates in, strings out.
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Iterable
from dataclasses import dataclass

from vmbk.stream.checksum import CHKSUM

#: virtnbdbackup's checkpoint prefix (``lib.checkpointName``); vmbk keeps it
#: so that virtnbdbackup/virtnbdrestore accept vmbk's chains.
CHECKPOINT_PREFIX = "virtnbdbackup"
ARCHIVES = ".archives"
CHECKPOINTS = "checkpoints"
TPM_STATE = "tpm-state"
#: vmbackup's marker of a chain that holds TPM state (vmrestore tags and
#: restores TPM state by it or by ``tpm-state/``).
TPM_MARKER = ".tpm-backup-marker"
#: vmbackup's state file: the period (of its default policy) of the last
#: full backup in this directory; without it, or with another period, its
#: next backup is a full (`vmbk.vmbackup.markers`).
FULL_BACKUP_MONTH = ".full-backup-month"
#: vmbackup's copies of the domain XML, per chain directory.
CONFIG_DIR = "config"
#: vmbackup's manifest of restore points, in the VM directory.
CHAIN_MANIFEST = "chain-manifest.json"
#: vmbackup's catalogue, beside vmbk's in ``_state``.
VMBACKUP_DB = "vmbackup.db"
#: What stays in a chain directory when its chain is archived (vmbackup
#: moves the chain's files only): they describe the directory, not a chain.
STAYS = (FULL_BACKUP_MONTH, CONFIG_DIR, CHAIN_MANIFEST)
#: Catalogue and locks: ``<backup_path>/_state``, never a VM directory.
STATE_DIR = "_state"
#: A directory being deleted (vmbk-rotate) is first renamed to this prefix
#: + its name, in the same directory: hidden, so no scan sees it any more.
DELETING = ".deleting-"
#: The mark of a host's directory (``<backup_path>/<host>/``, several hosts
#: configured): a backup root of its own, never a VM directory.  JSON:
#: ``{"host": name, "uri": libvirt URI}``, written before the first VM
#: directory in it.
HOST_MARKER = ".vmbk-host"
#: Directories a file system puts at its root; never VM directories.
NOT_VMS = ("lost+found",)
PERIODIC = ("daily", "weekly", "monthly")

_DAILY = re.compile(r"^(\d{4})(\d{2})(\d{2})$")
_WEEKLY = re.compile(r"^(\d{4})-W(\d{2})$")
_MONTHLY = re.compile(r"^(\d{4})(\d{2})$")
_CHECKPOINT = re.compile(rf"^{CHECKPOINT_PREFIX}\.(\d+)$")
_FULL_COPY = re.compile(r"^(?P<disk>.+)\.(?P<level>full|copy)\.data$")
_INC = re.compile(rf"^(?P<disk>.+)\.(?P<level>inc|diff)\.(?P<cpt>{CHECKPOINT_PREFIX}\.(?P<n>\d+)|\d+)\.data$")
_ARCHIVE = re.compile(r"^chain-(\d{4}-\d{2}-\d{2})(?:\.(\d+))?$")
_VMCONFIG = re.compile(rf"^vmconfig\.(?:{CHECKPOINT_PREFIX}\.(\d+)|copy|.+)\.xml$")


def period_id(policy: str, now: _dt.datetime | _dt.date) -> str | None:
    """The period directory name vmbk writes for ``policy`` at ``now`` (None: no period).

    Weekly periods are ISO weeks named with the ISO year (``%G-W%V``), so
    2027-01-01 (a Friday) belongs to ``2026-W53`` and 2024-12-30 (a
    Monday) to ``2025-W01``.  vmbackup names them differently
    (`vmbackup_period_id`); `period_days` reads both forms.
    """
    day = now.date() if isinstance(now, _dt.datetime) else now
    if policy == "daily":
        return day.strftime("%Y%m%d")
    if policy == "weekly":
        year, week, _ = day.isocalendar()
        return f"{year:04d}-W{week:02d}"
    if policy == "monthly":
        return day.strftime("%Y%m")
    if policy in ("accumulate", "never"):
        return None
    raise ValueError(f"unknown rotation policy {policy!r}")


def vmbackup_period_id(policy: str, now: _dt.datetime | _dt.date) -> str | None:
    """The name vmbackup gives the same period (its ``get_period_id``).

    vmbackup runs ``date +%Y-W%V``: the calendar year with the ISO week
    number.  Around New Year that is not an ISO week's name: 2027-01-01
    gives ``2027-W53`` (a week 2027 does not have), 2024-12-30 gives
    ``2024-W01`` (the name of the first week of January 2024 too).  Daily
    and monthly names are the same in both tools.  vmbk writes this form
    only where vmbackup compares it with its own clock (the
    ``.full-backup-month`` marker and the ``config/`` file names,
    `vmbk.vmbackup.markers`), never as a directory name.
    """
    day = now.date() if isinstance(now, _dt.datetime) else now
    if policy == "weekly":
        return f"{day.year:04d}-W{day.isocalendar()[1]:02d}"
    if policy == "accumulate":
        return "accumulate"
    return period_id(policy, day)


def policy_of_period(name: str) -> str | None:
    """Which policy makes a directory of this name (None: not a period).

    The three formats cannot be confused (8 digits, ``YYYY-Www``, 6
    digits), so the policy a chain was made under is read from where it
    lies; no side file is needed, and trees written by vmbackup work.
    A weekly name is one when vmbk or vmbackup can write it
    (`week_candidates`): ``2027-W53`` is vmbackup's name of 2027-01-01.
    """
    m = _DAILY.match(name)
    if m and _valid_date(int(m[1]), int(m[2]), int(m[3])):
        return "daily"
    if week_candidates(name):
        return "weekly"
    m = _MONTHLY.match(name)
    if m and 1 <= int(m[2]) <= 12:
        return "monthly"
    return None


def _iso_weeks(year: int) -> int:
    """How many ISO weeks ``year`` has (52 or 53)."""
    return _dt.date(year, 12, 28).isocalendar()[1]


def week_candidates(name: str) -> tuple[tuple[int, int], ...]:
    """The ISO weeks (ISO year, week) a weekly directory name may stand for, oldest first.

    vmbk names a week ``%G-W%V`` (the ISO week itself); vmbackup names each
    day ``%Y-W%V``, which for the days of an ISO week that lie in the
    other calendar year gives the other year's number:

    * ``Y-W52``/``Y-W53`` is also the ISO week of year Y-1 that runs
      into January of Y (vmbackup's name of those January days):
      ``2027-W53`` is only that (2027 has 52 weeks), ``2022-W52`` is
      2022-W52 or 2021-W52;
    * ``Y-W01`` is also the first ISO week of Y+1 when it starts in
      December of Y: ``2024-W01`` is 2024-W01 or 2025-W01.

    Empty when neither tool writes the name.
    """
    m = _WEEKLY.match(name)
    if not m:
        return ()
    year, week = int(m[1]), int(m[2])
    if not 1 <= year <= 9998 or not 1 <= week <= 53:
        return ()
    out: list[tuple[int, int]] = []
    if week >= 52 and year > 1 and week <= _iso_weeks(year - 1) and _dt.date.fromisocalendar(year - 1, week, 7).year == year:
        out.append((year - 1, week))
    if week <= _iso_weeks(year):
        out.append((year, week))
    if week == 1 and _dt.date.fromisocalendar(year + 1, 1, 1).year == year:
        out.append((year + 1, 1))
    return tuple(out)


def _week_span(iso: tuple[int, int]) -> tuple[_dt.date, _dt.date]:
    first = _dt.date.fromisocalendar(iso[0], iso[1], 1)
    return first, first + _dt.timedelta(days=7)


def _valid_date(y: int, m: int, d: int) -> bool:
    try:
        _dt.date(y, m, d)
    except ValueError:
        return False
    return True


def period_spans(name: str) -> tuple[tuple[_dt.date, _dt.date], ...]:
    """Every ``(first day, day after the last)`` a period name may stand for, oldest first.

    One span for daily and monthly names and for most weekly ones; two for
    a weekly name that is ambiguous between vmbk's and vmbackup's form
    (`week_candidates`).  Empty: not a period.
    """
    policy = policy_of_period(name)
    if policy == "daily":
        first = _dt.date(int(name[:4]), int(name[4:6]), int(name[6:8]))
        return ((first, first + _dt.timedelta(days=1)),)
    if policy == "weekly":
        return tuple(_week_span(c) for c in week_candidates(name))
    if policy == "monthly":
        first = _dt.date(int(name[:4]), int(name[4:6]), 1)
        return ((first, (first + _dt.timedelta(days=31)).replace(day=1)),)
    return ()


def period_days(name: str, backups: Iterable[_dt.date] = ()) -> tuple[_dt.date, _dt.date] | None:
    """The first day of a period and the day after its last (None: not a period).

    A period directory receives backups only during its period, so its
    name bounds when it was last written (and when it began).  A weekly
    directory stands for a whole ISO week, whichever tool named it: a
    vmbackup ``2027-W53`` holds the backups of 2027-01-01 to 01-03, days
    of ISO week 2026-W53 (2026-12-28 to 2027-01-03).  When the name alone
    is ambiguous (``2024-W01``: January 2024, or vmbackup's 2024-12-30/31)
    the days of the backups in the directory (``backups``) decide: the
    span holding the newest of them.  Without any that fit, the ISO
    reading when the name is an ISO week's (what vmbk writes).
    """
    spans = period_spans(name)
    if len(spans) <= 1:
        return spans[0] if spans else None
    for day in sorted(backups, reverse=True):
        for span in spans:
            if span[0] <= day < span[1]:
                return span
    iso = _WEEKLY.match(name)
    if iso:
        year, week = int(iso[1]), int(iso[2])
        if week <= _iso_weeks(year):
            return _week_span((year, week))
    return spans[0]


def same_period(name: str, days: tuple[_dt.date, _dt.date] | None, day: _dt.date) -> bool:
    """Does the period directory ``name`` (its resolved ``days``) hold ``day``?"""
    span = days if days is not None else period_days(name)
    return span is not None and span[0] <= day < span[1]


def archive_date(name: str) -> _dt.date | None:
    """The day an archive was made, from ``chain-YYYY-MM-DD[.N]`` (None: not one)."""
    m = _ARCHIVE.match(name)
    if not m:
        return None
    try:
        return _dt.date.fromisoformat(m[1])
    except ValueError:
        return None


def archive_order(name: str) -> tuple[str, int]:
    """Sort key of archive names, oldest first (``chain-D`` < ``chain-D.1`` < ``chain-D.2``)."""
    base, _, n = name.partition(".")
    return base, int(n) if n.isdigit() else 0


def deleting_name(name: str) -> str:
    """The hidden name a directory is renamed to while it is deleted."""
    return DELETING + name


def deleted_name(name: str) -> str | None:
    """The original name of a ``.deleting-<name>`` directory (None: not one)."""
    return name[len(DELETING):] if name.startswith(DELETING) and len(name) > len(DELETING) else None


def where(rel: str) -> str:
    """A chain directory as reasons name it."""
    return "the VM directory" if rel == "." else rel


def checkpoint_name(n: int) -> str:
    return f"{CHECKPOINT_PREFIX}.{n}"


def checkpoint_number(name: str) -> int | None:
    """N of ``virtnbdbackup.N``, None for any other (foreign) checkpoint."""
    m = _CHECKPOINT.match(name)
    return int(m[1]) if m else None


@dataclass(frozen=True, slots=True)
class DataName:
    """What a ``.data`` file name says: disk, level and checkpoint."""

    disk: str
    level: str  # full | inc | copy | diff
    checkpoint: str | None  # virtnbdbackup.N of an inc
    number: int | None


def parse_data_name(name: str) -> DataName | None:
    """``vda.inc.virtnbdbackup.3.data`` -> (vda, inc, virtnbdbackup.3, 3)."""
    m = _FULL_COPY.match(name)
    if m:
        return DataName(m["disk"], m["level"], None, None)
    m = _INC.match(name)
    if m:
        n = int(m["n"]) if m["n"] is not None else None
        return DataName(m["disk"], m["level"], m["cpt"] if n is not None else None, n)
    return None


def archive_name(existing: Iterable[str], today: _dt.date) -> str:
    """``chain-YYYY-MM-DD``, then ``.1``, ``.2`` ... for the same day.

    The date is the day of archiving, not of the chain's start (manual,
    "Archive Naming Convention").  The suffix is one more than the largest
    one in use that day, so a removed archive never gets its name reused
    by a later one of the same day.
    """
    base = f"chain-{today.isoformat()}"
    taken = [_archive_suffix(n) for n in existing if n == base or n.startswith(base + ".")]
    used = [s for s in taken if s is not None]
    if not used:
        return base
    return f"{base}.{max(used) + 1}"


def _archive_suffix(name: str) -> int | None:
    m = _ARCHIVE.match(name)
    if not m:
        return None
    return int(m[2]) if m[2] is not None else 0


def is_archive_name(name: str) -> bool:
    return _ARCHIVE.match(name) is not None


def is_vm_dir_name(name: str) -> bool:
    """May a directory of this name at the backup root be a VM's?

    Not ``_state`` nor any ``_``/``.`` name (vmbackup's own state and
    hidden work directories), nor a file system's ``lost+found``.  Callers
    also skip what is not a real directory (symlinks included).
    """
    return not name.startswith(("_", ".")) and name not in NOT_VMS


def ident(level: str, checkpoint: str | None) -> str:
    """The ``<ident>`` of a point's side files: its checkpoint, or ``copy``."""
    return "copy" if level == "copy" or not checkpoint else checkpoint


def data_name(disk: str, level: str, checkpoint: str | None) -> str:
    """``vda.full.data``, ``vda.copy.data``, ``vda.inc.virtnbdbackup.3.data``."""
    if level == "inc":
        return f"{disk}.inc.{checkpoint}.data"
    return f"{disk}.{level}.data"


def chksum_name(data: str) -> str:
    return data + CHKSUM


def vmconfig_name(ident_: str) -> str:
    return f"vmconfig.{ident_}.xml"


def vmconfig_order(name: str) -> tuple[int, str] | None:
    """Sort key of a ``vmconfig.*.xml`` name, newest checkpoint last (None: not one)."""
    m = _VMCONFIG.match(name)
    if not m:
        return None
    return (int(m[1]) if m[1] else -1), name


def config_first_name(vm: str, period: str) -> str:
    """vmbackup's first domain XML of a period: ``<vm>_config_<period>_FIRST.xml``."""
    return f"{vm}_config_{period}_FIRST.xml"


def config_stamp_name(vm: str, when: _dt.datetime) -> str:
    """vmbackup's domain XML of one backup: ``<vm>_config_<YYYYMMDD_HHMMSS>.xml`` (local time)."""
    return f"{vm}_config_{when.strftime('%Y%m%d_%H%M%S')}.xml"


def cpt_name(vm: str) -> str:
    return f"{vm}.cpt"


def checkpoint_xml_name(checkpoint: str) -> str:
    """Relative to the chain directory: ``checkpoints/<name>.xml``."""
    return f"{CHECKPOINTS}/{checkpoint}.xml"


def qemu_info_name(disk: str, ident_: str) -> str:
    return f"{disk}.{ident_}.qcow.json"


def nvram_name(basename: str, ident_: str, level: str) -> str:
    """UEFI vars beside a point: ``<basename>.<ident>``; a copy backup's keeps its name."""
    return basename if level == "copy" else f"{basename}.{ident_}"


#: What every manifest's name ends with (`vmbk.manifest`).
MANIFEST_SUFFIX = ".manifest"


def manifest_name(ident_: str) -> str:
    """A point's manifest beside its files: ``vmbk.<ident>.manifest``."""
    return f"vmbk.{ident_}{MANIFEST_SUFFIX}"


def manifest_ident(name: str) -> str | None:
    """``<ident>`` of a manifest's file name (None: not one)."""
    if name.startswith("vmbk.") and name.endswith(MANIFEST_SUFFIX) and len(name) > 5 + len(MANIFEST_SUFFIX):
        return name[5:-len(MANIFEST_SUFFIX)]
    return None


#: A point's saved memory and device state (`vmbk.tree.state`): the lz4 frames of
#: libvirt's save image, and the state manifest beside it.
STATE_PREFIX = "vmstate."
STATE_SUFFIX = ".lz4"
STATE_MANIFEST_SUFFIX = ".json"


def state_name(ident_: str) -> str:
    """A point's saved RAM and device state: ``vmstate.<ident>.lz4``."""
    return f"{STATE_PREFIX}{ident_}{STATE_SUFFIX}"


def state_manifest_name(ident_: str) -> str:
    """What the saved state needs to resume, and its hashes: ``vmstate.<ident>.json``."""
    return f"{STATE_PREFIX}{ident_}{STATE_MANIFEST_SUFFIX}"
