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
    .deleting-<vm>/                    a VM directory being deleted
    _state/                            catalogue and locks, never a VM

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
#: vmbackup's marker of a chain that holds TPM state (its older layout).
TPM_MARKER = ".tpm-backup-marker"
#: Catalogue and locks: ``<backup_path>/_state``, never a VM directory.
STATE_DIR = "_state"
#: A directory being deleted (vmbk-rotate) is first renamed to this prefix
#: + its name, in the same directory: hidden, so no scan sees it any more.
DELETING = ".deleting-"
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
    """The period directory name of ``policy`` at ``now`` (None: no period).

    Weekly periods are ISO weeks with the ISO year, so 2027-01-01 (a
    Friday) still belongs to 2026-W53, as vmbackup's ``date +%G-W%V``.
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


def policy_of_period(name: str) -> str | None:
    """Which policy makes a directory of this name (None: not a period).

    The three formats cannot be confused (8 digits, ``YYYY-Www``, 6
    digits), so the policy a chain was made under is read from where it
    lies; no side file is needed, and trees written by vmbackup work.
    """
    m = _DAILY.match(name)
    if m and _valid_date(int(m[1]), int(m[2]), int(m[3])):
        return "daily"
    m = _WEEKLY.match(name)
    if m and 1 <= int(m[2]) <= _dt.date(int(m[1]), 12, 28).isocalendar()[1]:
        return "weekly"
    m = _MONTHLY.match(name)
    if m and 1 <= int(m[2]) <= 12:
        return "monthly"
    return None


def _valid_date(y: int, m: int, d: int) -> bool:
    try:
        _dt.date(y, m, d)
    except ValueError:
        return False
    return True


def period_days(name: str) -> tuple[_dt.date, _dt.date] | None:
    """The first day of a period and the day after its last (None: not a period).

    A period directory receives backups only during its period, so its
    name bounds when it was last written (and when it began).
    """
    policy = policy_of_period(name)
    if policy == "daily":
        first = _dt.date(int(name[:4]), int(name[4:6]), int(name[6:8]))
        return first, first + _dt.timedelta(days=1)
    if policy == "weekly":
        first = _dt.date.fromisocalendar(int(name[:4]), int(name[6:8]), 1)
        return first, first + _dt.timedelta(days=7)
    if policy == "monthly":
        first = _dt.date(int(name[:4]), int(name[4:6]), 1)
        return first, (first + _dt.timedelta(days=31)).replace(day=1)
    return None


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
