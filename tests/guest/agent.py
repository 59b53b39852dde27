"""Drive the test guest through qemu-guest-agent, via libvirt.

``Guest`` wraps a running libvirt domain booted from :mod:`guest.build`
and talks to its agent with ``libvirt_qemu.qemuAgentCommand`` (libvirt
owns the agent socket and does the guest-sync handshake itself).  Usable
from pytest (tests/fixtures/guest.py) and from plain scripts.

Agent facts that shaped the helpers:

* ``guest-exec`` is asynchronous: it returns a pid; ``guest-exec-status``
  is polled until ``exited``.  Output is base64 (``out-data``/
  ``err-data``), as is stdin (``input-data``).  QEMU 7.2's agent has no
  way to kill a process that outlives our timeout.
* While filesystems are frozen the agent refuses nearly every command
  (``guest-exec``, ``guest-file-*``) with "Command ... has been disabled:
  the agent is in frozen state"; only ping/sync/info/fsfreeze-* work.
* ``guest-fsfreeze-freeze`` returns how many filesystems it froze; the
  initramfs root is not one of them, the ext4 data disks are.
* ``guest-shutdown`` never answers when it works (the guest is gone), so
  :meth:`Guest.shutdown` uses ``virDomainShutdownFlags(GUEST_AGENT)``,
  for which libvirt treats the agent's EOF as success, and then waits for
  the domain to be shut off.
* Host->guest messages bigger than ~200 KiB (e.g. a 192 KiB
  guest-file-write, 256 KiB of base64) stall in the virtio-serial path
  on this host; libvirt times out after 30 s ("Guest agent not available
  for now") and the agent then sees a mangled request.  Writes therefore
  go in 48 KiB chunks, and exec() stages bigger stdin in a guest file.
  Replies (guest->host) of several MiB are fine.
* Before the agent starts, libvirt answers "QEMU guest agent is not
  connected"; that is what :meth:`Guest.wait_agent` polls through.
* The guest's busybox shell prefers its applets to PATH: run e2fsprogs'
  mke2fs as /sbin/mke2fs or mkfs.ext4, never as plain ``mke2fs``.
"""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu

# Host->guest agent messages above ~200 KiB stall here (see module doc):
# file writes and exec stdin go in chunks well below that.
WRITE_CHUNK = 48 * 1024
READ_CHUNK = 1 << 20  # guest->host is not affected
INLINE_INPUT_MAX = 48 * 1024


class AgentError(RuntimeError):
    """The agent answered with an error, or could not be reached."""


class Guest:
    """A running test guest and the agent commands the tests need."""

    def __init__(
        self,
        dom: libvirt.virDomain,
        *,
        console_log: str | os.PathLike | None = None,
        disks: Sequence[Path] = (),
    ) -> None:
        self.dom = dom
        self.name = dom.name()
        self.console_log = Path(console_log) if console_log else None
        self.disks = list(disks)

    def __repr__(self) -> str:
        return f"<Guest {self.name}>"

    # ------------------------------------------------------------ basics

    def agent(self, cmd: dict | str, timeout: int = 30) -> Any:
        """Send one agent command; return its "return" value.

        cmd is ``{"execute": ..., "arguments": {...}}`` or a JSON string.
        """
        text = cmd if isinstance(cmd, str) else json.dumps(cmd)
        try:
            reply = libvirt_qemu.qemuAgentCommand(self.dom, text, int(timeout), 0)
        except libvirt.libvirtError as exc:
            raise AgentError(f"{self.name}: {exc.get_error_message()}") from exc
        if reply is None:
            raise AgentError(f"{self.name}: no reply to {text}")
        data = json.loads(reply)
        if "error" in data:
            raise AgentError(f"{self.name}: {data['error']}")
        return data.get("return")

    def _call(
        self,
        execute: str,
        arguments: dict[str, Any] | None = None,
        *,
        timeout: int = 30,
    ) -> Any:
        cmd: dict[str, Any] = {"execute": execute}
        if arguments:
            cmd["arguments"] = arguments
        return self.agent(cmd, timeout)

    def console(self, tail: int = 4000) -> str:
        """The end of the serial console log (kernel and init messages)."""
        if self.console_log is None:
            return "(no console log)"
        try:
            data = self.console_log.read_bytes()
        except OSError as exc:
            return f"(console log unreadable: {exc})"
        return data[-tail:].decode(errors="replace")

    def is_active(self) -> bool:
        try:
            return bool(self.dom.isActive())
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return False
            raise

    def wait_agent(self, timeout: float = 60) -> float:
        """Poll guest-ping until the agent answers; return seconds waited."""
        t0 = time.monotonic()
        last = ""
        while True:
            try:
                self._call("guest-ping", timeout=2)
                return time.monotonic() - t0
            except AgentError as exc:
                last = str(exc)
            if not self.is_active():
                raise AgentError(
                    f"{self.name} stopped before its agent answered; console:\n"
                    + self.console()
                )
            if time.monotonic() - t0 > timeout:
                raise AgentError(
                    f"{self.name}: no guest-ping answer in {timeout} s ({last}); "
                    "console:\n" + self.console()
                )
            time.sleep(0.1)

    # ------------------------------------------------------- processes

    def exec(
        self,
        argv: Sequence[str],
        input: bytes | None = None,
        timeout: float = 30,
        *,
        env: Sequence[str] | None = None,
    ) -> tuple[int, bytes, bytes]:
        """Run argv in the guest; return (exitcode, stdout, stderr).

        A process killed by signal N gives exitcode -N.  Raises AgentError
        when the agent refuses (e.g. frozen) and TimeoutError after timeout.
        input over INLINE_INPUT_MAX is staged in a guest file under /tmp.
        """
        if input is not None and len(input) > INLINE_INPUT_MAX:
            staged = f"/tmp/.vmbk-stdin-{uuid.uuid4().hex}"
            self.write_file(staged, input)
            script = 'f=$1; shift; "$@" < "$f"; rc=$?; rm -f "$f"; exit $rc'
            return self.exec(
                ["/bin/sh", "-c", script, "sh", staged, *argv], timeout=timeout, env=env
            )
        args: dict[str, Any] = {
            "path": argv[0],
            "arg": list(argv[1:]),
            "capture-output": True,
        }
        if input is not None:
            args["input-data"] = base64.b64encode(input).decode()
        if env is not None:
            args["env"] = list(env)
        pid = self._call("guest-exec", args)["pid"]
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            status = self._call("guest-exec-status", {"pid": pid})
            if status.get("exited"):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.name}: {list(argv)} still running after {timeout} s"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
        out = base64.b64decode(status.get("out-data", ""))
        err = base64.b64decode(status.get("err-data", ""))
        if "exitcode" in status:
            code = status["exitcode"]
        else:
            code = -int(status.get("signal", 0)) or -1
        return code, out, err

    def run(
        self, argv: Sequence[str], input: bytes | None = None, timeout: float = 30
    ) -> bytes:
        """exec() that raises AgentError on a non-zero exit; returns stdout."""
        code, out, err = self.exec(argv, input=input, timeout=timeout)
        if code != 0:
            raise AgentError(
                f"{self.name}: {list(argv)} exited with {code}: "
                f"{err.decode(errors='replace').strip()}"
            )
        return out

    def sh(self, script: str, input: bytes | None = None, timeout: float = 30) -> bytes:
        """Run a /bin/sh -c script; raise on failure; return stdout."""
        return self.run(["/bin/sh", "-c", script], input=input, timeout=timeout)

    # ------------------------------------------------------------ files

    def write_file(self, path: str, data: bytes) -> None:
        """Create/replace a guest file with data (guest-file-* commands)."""
        handle = self._call("guest-file-open", {"path": path, "mode": "wb"})
        try:
            for off in range(0, len(data), WRITE_CHUNK) or [0]:
                chunk = data[off : off + WRITE_CHUNK]
                b64 = base64.b64encode(chunk).decode()
                done = self._call(
                    "guest-file-write", {"handle": handle, "buf-b64": b64}
                )
                if done["count"] != len(chunk):
                    raise AgentError(f"{self.name}: short write to {path}")
        finally:
            self._call("guest-file-close", {"handle": handle})

    def read_file(self, path: str) -> bytes:
        """The contents of a guest file."""
        handle = self._call("guest-file-open", {"path": path, "mode": "rb"})
        parts = []
        try:
            while True:
                got = self._call(
                    "guest-file-read", {"handle": handle, "count": READ_CHUNK}
                )
                parts.append(base64.b64decode(got.get("buf-b64", "")))
                if got.get("eof") or got.get("count", 0) == 0:
                    break
        finally:
            self._call("guest-file-close", {"handle": handle})
        return b"".join(parts)

    # ------------------------------------------------------ filesystems

    def sync(self) -> None:
        """sync(2) in the guest: dirty pages reach the virtual disks."""
        self.run(["/bin/sync"])

    def freeze(self, mountpoints: Sequence[str] | None = None) -> int:
        """Freeze filesystems (all, or the given mount points); return count."""
        if mountpoints is None:
            return int(self._call("guest-fsfreeze-freeze", timeout=60))
        args = {"mountpoints": list(mountpoints)}
        return int(self._call("guest-fsfreeze-freeze-list", args, timeout=60))

    def thaw(self) -> int:
        """Thaw all frozen filesystems; return how many were thawed."""
        return int(self._call("guest-fsfreeze-thaw", timeout=60))

    def freeze_status(self) -> str:
        """'frozen' or 'thawed'."""
        return str(self._call("guest-fsfreeze-status"))

    def fstrim(self, minimum: int | None = None) -> list[dict]:
        """FITRIM every mounted filesystem; return the agent's per-path list."""
        args = {} if minimum is None else {"minimum": minimum}
        return self._call("guest-fstrim", args, timeout=120).get("paths", [])

    # --------------------------------------------------------- lifecycle

    def shutdown(self, timeout: float = 60) -> float:
        """Clean shutdown through the agent; wait until shut off.

        The guest's /sbin/shutdown syncs, unmounts /mnt/* and powers off.
        Returns the seconds it took.
        """
        t0 = time.monotonic()
        try:
            self.dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT)
        except libvirt.libvirtError as exc:
            raise AgentError(
                f"{self.name}: shutdown: {exc.get_error_message()}"
            ) from exc
        while self.is_active():
            if time.monotonic() - t0 > timeout:
                raise AgentError(
                    f"{self.name} still running {timeout} s after guest-shutdown; "
                    "console:\n" + self.console()
                )
            time.sleep(0.1)
        return time.monotonic() - t0
