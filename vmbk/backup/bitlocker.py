"""BitLocker recovery keys of Windows guests, saved beside the TPM state.

A Windows VM restored with a new UUID, a lost TPM state or changed Secure
Boot settings asks for its 48-digit recovery password; vmbackup saves it
at every backup (manual, "BitLocker Recovery Key Extraction") and so does
vmbk: through the guest agent, ``manage-bde -status`` finds the volumes
with protection on, ``manage-bde -protectors -get X:`` prints their
protectors.  The raw output is kept (protector ids, PCR profiles), with
the parsed keys as JSON next to it; both root-only in ``tpm-state/``.

Never a reason to fail a backup: a guest that is not Windows, has no
agent, or has BitLocker off is skipped silently.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import re
import time
from pathlib import Path
from typing import Any

import orjson

from vmbk.fsutil import SECRET_FILE_MODE, ensure_secret_dir, write_file_atomic
from vmbk.tree import names

log = logging.getLogger("vmbk.backup")

EXEC_TIMEOUT = 30
_VOLUME = re.compile(r"^Volume ([A-Z]:)", re.M)
_STATUS = re.compile(r"^\s*Protection Status:\s*(.+?)\s*$", re.M)
_PASSWORD = re.compile(r"\b(\d{6}(?:-\d{6}){7})\b")
_ID = re.compile(r"ID:\s*(\{[0-9A-Fa-f-]+\})")


@dataclasses.dataclass(frozen=True)
class RecoveryKey:
    volume: str
    protector_id: str | None
    password: str


def protected_volumes(status: str) -> list[str]:
    """Volumes of ``manage-bde -status`` output whose protection is on."""
    out = []
    starts = [(m.start(), m.group(1)) for m in _VOLUME.finditer(status)]
    for i, (pos, vol) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else len(status)
        m = _STATUS.search(status, pos, end)
        if m and m.group(1).lower() == "protection on":
            out.append(vol)
    return out


def recovery_keys(volume: str, protectors: str) -> list[RecoveryKey]:
    """Numerical passwords of ``manage-bde -protectors -get X:`` output.

    A protector is a header line (``Numerical Password:``) and the lines
    indented deeper under it, which hold its ``ID:`` and ``Password:``.
    """
    keys = []
    lines = protectors.splitlines()
    for i, line in enumerate(lines):
        if line.strip().lower() != "numerical password:":
            continue
        indent = len(line) - len(line.lstrip())
        body = []
        for nxt in lines[i + 1 :]:
            if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                break
            body.append(nxt)
        text = "\n".join(body)
        pw = _PASSWORD.search(text)
        if pw:
            ident = _ID.search(text)
            keys.append(RecoveryKey(volume, ident.group(1) if ident else None, pw.group(1)))
    return keys


def _exec(dom: Any, path: str, args: list[str], timeout: int = EXEC_TIMEOUT) -> str | None:
    import libvirt_qemu

    cmd = {"execute": "guest-exec", "arguments": {"path": path, "arg": args, "capture-output": True}}
    reply = orjson.loads(libvirt_qemu.qemuAgentCommand(dom, orjson.dumps(cmd).decode(), timeout, 0))
    pid = reply["return"]["pid"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = {"execute": "guest-exec-status", "arguments": {"pid": pid}}
        ret = orjson.loads(libvirt_qemu.qemuAgentCommand(dom, orjson.dumps(status).decode(), timeout, 0))["return"]
        if ret.get("exited"):
            if ret.get("exitcode") not in (0, None):
                return None
            return base64.b64decode(ret.get("out-data", "")).decode("utf-8", "replace")
        time.sleep(0.2)
    return None


def is_windows(dom: Any) -> bool:
    import libvirt_qemu

    try:
        reply = libvirt_qemu.qemuAgentCommand(dom, '{"execute":"guest-get-osinfo"}', 5, 0)
    except Exception:
        return False
    return orjson.loads(reply).get("return", {}).get("id") == "mswindows"


def save_recovery_keys(dom: Any, target_dir: Path) -> list[RecoveryKey]:
    """Collect and save the keys; [] (and nothing written) when there are none."""
    try:
        if not is_windows(dom):
            return []
        status = _exec(dom, "manage-bde.exe", ["-status"])
        if not status:
            return []
        raw, keys = [status], []
        for vol in protected_volumes(status):
            out = _exec(dom, "manage-bde.exe", ["-protectors", "-get", vol])
            if out:
                raw.append(out)
                keys += recovery_keys(vol, out)
    except Exception as e:  # never fail a backup for this
        log.warning("%s: BitLocker keys not saved: %s", dom.name(), e)
        return []
    if keys:
        secret = ensure_secret_dir(target_dir / names.TPM_STATE)
        write_file_atomic(secret / "bitlocker-recovery-keys.txt", "\n".join(raw).encode(), mode=SECRET_FILE_MODE)
        write_file_atomic(secret / "bitlocker-recovery-keys.json",
                          orjson.dumps([dataclasses.asdict(k) for k in keys], option=orjson.OPT_INDENT_2),
                          mode=SECRET_FILE_MODE)
    return keys
