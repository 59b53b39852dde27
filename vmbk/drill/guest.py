"""Asking the drill VM's guest: its agent, its serial console.

The agent is reached through libvirt (``virDomainQemuAgentCommand``:
libvirt owns the socket and does the guest-sync handshake).  Until the
agent runs, libvirt answers "QEMU guest agent is not connected"; the
boot wait polls through that.  ``guest-exec`` is asynchronous: it
returns a PID and ``guest-exec-status`` is polled until ``exited``; its
output and files come base64-encoded.  The agent of QEMU 7.2 cannot kill
a process that outlives the timeout: the drill VM is destroyed anyway.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vmbk.virt.connection import libvirt_module

#: A file the check reads is read up to this size (the pattern sees this much).
MAX_FILE = 1 << 20
#: Lines of a serial console kept as the drill's text picture.
CONSOLE_LINES = 40
CONSOLE_BYTES = 64 << 10


class AgentError(Exception):
    """The agent did not answer, or answered with an error."""


def command(dom: Any, execute: str, arguments: dict[str, Any] | None = None, timeout: int = 5) -> Any:
    """One agent command; its ``return`` value."""
    libvirt = libvirt_module()
    import libvirt_qemu

    cmd: dict[str, Any] = {"execute": execute}
    if arguments:
        cmd["arguments"] = arguments
    try:
        reply = libvirt_qemu.qemuAgentCommand(dom, json.dumps(cmd), max(1, int(timeout)), 0)
    except libvirt.libvirtError as e:
        raise AgentError(e.get_error_message()) from None
    data = json.loads(reply or "{}")
    if "error" in data:
        err = data["error"]
        raise AgentError(f"{execute}: {err.get('desc') or err}" if isinstance(err, dict) else str(err))
    return data.get("return")


def ping(dom: Any) -> bool:
    try:
        command(dom, "guest-ping", timeout=2)
        return True
    except AgentError:
        return False


def os_info(dom: Any) -> dict[str, Any] | None:
    """``guest-get-osinfo``, in the record's words (None: the agent cannot say).

    ``name``: the OS's pretty name (os-release, Windows' product name), else
    its kernel; ``id``, ``version``: os-release's ``ID`` and ``VERSION_ID``.
    """
    try:
        info = command(dom, "guest-get-osinfo")
    except AgentError:
        return None
    if not isinstance(info, dict):
        return None
    kernel = info.get("kernel-release")
    name = info.get("pretty-name") or info.get("name") or (f"Linux {kernel}" if kernel else None)
    return {"name": name, "id": info.get("id"), "version": info.get("version-id"), "kernel": kernel,
            "machine": info.get("machine")}


def read_file(dom: Any, path: str, timeout: int) -> bytes:
    handle = command(dom, "guest-file-open", {"path": path, "mode": "r"}, timeout)
    parts: list[bytes] = []
    try:
        size = 0
        while size < MAX_FILE:
            got = command(dom, "guest-file-read", {"handle": handle, "count": MAX_FILE - size}, timeout)
            chunk = base64.b64decode(got.get("buf-b64", ""))
            parts.append(chunk)
            size += len(chunk)
            if got.get("eof") or not chunk:
                break
    finally:
        command(dom, "guest-file-close", {"handle": handle}, timeout)
    return b"".join(parts)


def run(dom: Any, argv: Sequence[str], timeout: float, stop: Callable[[], None]) -> tuple[int, str]:
    """Run ``argv`` in the guest: (exit code, the end of its output); -N: killed by signal N."""
    pid = command(dom, "guest-exec", {"path": argv[0], "arg": list(argv[1:]), "capture-output": True},
                  int(timeout))["pid"]
    deadline = time.monotonic() + timeout
    while True:
        status = command(dom, "guest-exec-status", {"pid": pid}, int(timeout))
        if status.get("exited"):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{' '.join(argv)} still running after {timeout:g} s")
        stop()
        time.sleep(0.2)
    out = base64.b64decode(status.get("out-data", "")) + base64.b64decode(status.get("err-data", ""))
    code = status["exitcode"] if "exitcode" in status else -int(status.get("signal", 1))
    lines = out.decode("utf-8", "replace").strip().splitlines()
    return int(code), lines[-1] if lines else ""


def console_text(logs: Sequence[Path]) -> str:
    """The end of the serial console logs (the newest bytes of each)."""
    texts = []
    for path in logs:
        try:
            with open(path, "rb") as fh:
                fh.seek(max(0, path.stat().st_size - CONSOLE_BYTES))
                texts.append(fh.read().decode("utf-8", "replace"))
        except OSError:
            continue
    return "\n".join(t for t in texts if t)


def console_tail(text: str, lines: int = CONSOLE_LINES) -> str:
    """The last ``lines`` lines, control characters (but tabs) dropped."""
    clean = "".join(c for c in text.replace("\r\n", "\n").replace("\r", "\n") if c in "\n\t" or c >= " ")
    return "\n".join(clean.splitlines()[-lines:]) + "\n"
