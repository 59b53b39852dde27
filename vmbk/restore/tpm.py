"""TPM state back where swtpm looks for it (vmrestore guide, 11).

The backup keeps the VM's swtpm state as ``tpm-state/tpm2/`` in the chain
directory (`vmbk.backup.sidefiles.save_tpm_state`; vmbackup's layout).
libvirt keeps it per UUID in ``/var/lib/libvirt/swtpm/<UUID>/tpm2/``, so
a disaster recovery puts it back under the original UUID and a clone
under its new one (known only once the clone is defined): BitLocker and
other sealed secrets then unlock as before.

Order and safety: the copy is staged as ``<UUID>/.tpm2.partial`` and
renamed into place; state already there (the VM's current TPM) is first
moved to ``tpm2.pre-restore-<epoch>`` beside it (the guide's name), never
deleted.  Ownership as swtpm needs it: the UUID directory root 0711, the
state the ``swtpm_user``/``swtpm_group`` of ``/etc/libvirt/qemu.conf``
(default ``tss``), 0700 directories and 0600 files.

A restore whose disks succeeded but whose TPM state could not be put back
is not a plain success: the caller reports it as a partial restore (exit
9) with the recovery-key hint, because a VM with BitLocker will stop at
its recovery screen.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import shutil
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from vmbk.fsutil import fsync_dir
from vmbk.restore.vmconfig import DomainConfig
from vmbk.tree.names import TPM_STATE

SWTPM_ROOT = Path("/var/lib/libvirt/swtpm")
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


def backup_state(chain_dir: Path, config: DomainConfig | None) -> tuple[Path | None, str | None]:
    """(the chain's ``tpm-state/tpm2``, or None; a warning when one is due)."""
    state = chain_dir / TPM_STATE / "tpm2"
    has_state = state.is_dir() and any(state.iterdir())
    emulated = config is not None and _has_emulated_tpm(config.xml)
    if has_state and not emulated:
        return None, "the backup holds TPM state but the restored domain has no emulated TPM: not restored"
    if emulated and not has_state:
        return None, "the VM has an emulated TPM but the backup holds no TPM state: it starts with an empty TPM"
    return (state if has_state else None), None


def _has_emulated_tpm(xml: str) -> bool:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return False
    return any(b.get("type") == "emulator" for b in root.findall("devices/tpm/backend"))


def state_dir(uuid: str, root: Path | None = None) -> Path:
    if not UUID_RE.match(uuid):
        raise ValueError(f"not a UUID: {uuid!r}")
    return (root or SWTPM_ROOT) / uuid.lower()


def restore(source: Path, uuid: str, *, root: Path | None = None) -> tuple[Path, Path | None]:
    """Copy ``source`` to ``<root>/<uuid>/tpm2``; (that path, where the old state went)."""
    uuid_dir = state_dir(uuid, root)
    uid, gid = swtpm_owner()
    if not uuid_dir.exists():
        os.makedirs(uuid_dir.parent, mode=0o711, exist_ok=True)
        os.mkdir(uuid_dir, 0o711)
    os.chmod(uuid_dir, 0o711)
    dest, staging = uuid_dir / "tpm2", uuid_dir / ".tpm2.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        shutil.copytree(source, staging, symlinks=False, copy_function=shutil.copyfile)
        for path in (staging, *staging.rglob("*")):
            os.chmod(path, 0o700 if path.is_dir() else 0o600)
            if os.geteuid() == 0:
                os.chown(path, uid, gid)
        aside = None
        if dest.exists() or dest.is_symlink():
            aside = uuid_dir / f"tpm2.pre-restore-{int(time.time())}"
            os.rename(dest, aside)
        os.rename(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(uuid_dir)
    return dest, aside


def swtpm_owner() -> tuple[int, int]:
    """uid and gid swtpm runs as: qemu.conf's ``swtpm_user``/``swtpm_group``, else tss (else root)."""
    conf = _qemu_conf()
    user, group = conf.get("swtpm_user", "tss"), conf.get("swtpm_group", "tss")
    try:
        uid = pwd.getpwnam(user).pw_uid
    except KeyError:
        uid = 0
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        gid = 0
    return uid, gid


def _qemu_conf() -> dict[str, str]:
    out: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in QEMU_CONF.read_text(errors="replace").splitlines():
            m = re.match(r'^\s*(swtpm_user|swtpm_group)\s*=\s*"([^"]+)"', line)
            if m:
                out[m.group(1)] = m.group(2)
    return out
