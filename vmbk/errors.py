"""Exception classes and THE exit-code table of vmbk.

Every command returns one of these codes; the numbers match vmbackup and
vmrestore (vmrestore guide, section 17) so a monitoring rule written for
them works for vmbk unchanged.  Only `vmbk.cli.run` turns an exception into
an exit code; nothing else calls ``sys.exit``.

``PARTIAL`` is vmbk's own: a pipeline stage that handled several VMs where
some succeeded and some failed.  It is distinct from every failure code so
that cron can tell "the backup of two VMs out of thirty failed" from "the
backup failed".  When every VM failed, the stage returns the code of the
failures (or GENERAL when they differ).
"""

from __future__ import annotations

import enum


class Exit(enum.IntEnum):
    OK = 0
    GENERAL = 1
    CONFIG = 2
    LOCK = 3
    STORAGE = 4
    VM = 5
    TOOL = 6
    USAGE = 7
    DEPENDENCY = 8
    PARTIAL = 9
    SIGINT = 130
    SIGTERM = 143


#: One line per code, for man pages, ``vmbk-json(7)`` and error records.
EXIT_MEANINGS: dict[Exit, str] = {
    Exit.OK: "success",
    Exit.GENERAL: "general error",
    Exit.CONFIG: "configuration error",
    Exit.LOCK: "lock conflict",
    Exit.STORAGE: "storage error",
    Exit.VM: "VM problem",
    Exit.TOOL: "external tool failure",
    Exit.USAGE: "command-line usage error",
    Exit.DEPENDENCY: "missing dependency",
    Exit.PARTIAL: "partial: some VMs failed, others succeeded",
    Exit.SIGINT: "interrupted (SIGINT)",
    Exit.SIGTERM: "terminated (SIGTERM)",
}


class VmbkError(Exception):
    """Base of every error vmbk reports to the user.

    ``kind`` is the stable, machine-readable name carried by ``error``
    records; ``code`` the exit code.  ``vm`` names the VM the error is
    about, when there is one, so a stage can turn it into an ``error``
    record and go on with the other VMs.
    """

    code: Exit = Exit.GENERAL
    kind: str = "general"

    def __init__(self, message: str, *, vm: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.vm = vm

    def __str__(self) -> str:
        return self.message


class ConfigError(VmbkError):
    code = Exit.CONFIG
    kind = "config"


class LockError(VmbkError):
    code = Exit.LOCK
    kind = "lock"


class StorageError(VmbkError):
    code = Exit.STORAGE
    kind = "storage"


class VmError(VmbkError):
    code = Exit.VM
    kind = "vm"


class ToolError(VmbkError):
    """An external program (qemu-img, qemu-nbd, rsync, ...) failed."""

    code = Exit.TOOL
    kind = "tool"


class UsageError(VmbkError):
    code = Exit.USAGE
    kind = "usage"


class DependencyError(VmbkError):
    code = Exit.DEPENDENCY
    kind = "dependency"


class InputError(VmbkError):
    """A record on stdin is not valid JSON or not a record at all."""

    code = Exit.USAGE
    kind = "input"


class Terminated(BaseException):
    """Raised from the SIGTERM handler so ``finally`` blocks run.

    A BaseException, like KeyboardInterrupt, so that ``except Exception``
    in cleanup paths does not swallow it.
    """


def exit_for_codes(codes: list[int], successes: int) -> Exit:
    """The exit code of a stage from the failures it saw and its successes.

    No failure -> OK; failures beside successes -> PARTIAL; only failures ->
    their common code, or GENERAL when they differ.
    """
    if not codes:
        return Exit.OK
    if successes:
        return Exit.PARTIAL
    distinct = set(codes)
    if len(distinct) == 1:
        (only,) = distinct
        try:
            return Exit(only)
        except ValueError:
            return Exit.GENERAL
    return Exit.GENERAL
