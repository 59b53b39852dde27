"""Options every command shares, turned from docopt's dict into typed values.

The docopt dict stops here: commands build frozen dataclasses from it and
hand those to the library.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

from vmbk import config as _config
from vmbk.cli import Context
from vmbk.errors import StorageError, UsageError
from vmbk.output import Emitter, getenv_json
from vmbk.records import Record, new_session_id, read_records, stdin_is_pipe


@dataclasses.dataclass(frozen=True)
class Common:
    json: bool | None
    backup_path: str | None
    instance: str | None
    connect: str | None
    vms: tuple[str, ...]

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> "Common":
        vms: list[str] = []
        for value in args.get("--vm") or []:
            vms.extend(v for v in _split_names(value) if v)
        return cls(
            json=True if (args.get("--json") or getenv_json()) else None,
            backup_path=args.get("--backup-path"),
            instance=args.get("--config-instance"),
            connect=args.get("--connect"),
            vms=tuple(vms),
        )

    def config(self) -> _config.Config:
        return _config.load(self.instance, self.backup_path)

    def uri(self, cfg: _config.Config) -> str:
        return self.connect or cfg.connect or os.environ.get("LIBVIRT_DEFAULT_URI") or "qemu:///system"


def _split_names(value: Any) -> list[str]:
    if isinstance(value, list):
        out: list[str] = []
        for v in value:
            out.extend(_split_names(v))
        return out
    return [v.strip() for v in str(value).split(",")]


def existing_backup_path(cfg: _config.Config) -> Path:
    """The configured backup path, which must exist (vmbackup: mkdir first)."""
    path = cfg.require_backup_path()
    if not path.is_dir():
        raise StorageError(f"backup path {path} does not exist or is not a directory")
    return path


def positive_int(args: dict[str, Any], key: str, default: int) -> int:
    raw = args.get(key)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise UsageError(f"{key} must be an integer, not {raw!r}") from None
    if value < 1:
        raise UsageError(f"{key} must be at least 1")
    return value


def input_records(ctx: Context, *, standalone: bool, understood: Collection[str] = ()) -> Iterator[Record]:
    """Records from stdin, or none when the command runs on its own.

    A stage reads stdin when it is a pipe or file; on a terminal, or when
    options such as ``--vm`` make it standalone, it reads nothing.  Records
    of the ``understood`` types must be of a contract version this vmbk
    knows (`vmbk.records.check_version`).
    """
    if standalone or not stdin_is_pipe(ctx.stdin):
        return iter(())
    return read_records(ctx.stdin, understood=understood)


class Session:
    """Carries the session id: the first one seen on input, else a new one."""

    def __init__(self, emitter: Emitter) -> None:
        self.emitter = emitter

    def adopt(self, rec: Record) -> None:
        if self.emitter.session is None and isinstance(rec.get("session"), str):
            self.emitter.session = rec["session"]

    def ensure(self) -> str:
        if self.emitter.session is None:
            self.emitter.session = new_session_id()
        return self.emitter.session


def make_emitter(ctx: Context, common: Common, *, changes_state: bool = False) -> Emitter:
    """The stage's output; ``changes_state``: what a closed stdout does (`vmbk.output`)."""
    return Emitter(ctx.stdout, stage=ctx.prog, json=common.json, changes_state=changes_state, stderr=ctx.stderr)


def parse_now(value: str | None) -> _dt.datetime:
    """``--now``: ISO 8601, as a time of the host's time zone.

    Periods follow the host's calendar, as vmbackup's ``date +%Y%m`` and
    ``+%G-W%V`` do: a backup at 01:30 on a Monday in Sydney belongs to
    that Monday's week, not to the Sunday it still is in UTC.  A time
    without an offset is local time; one with an offset is converted.
    """
    if value is None:
        return _dt.datetime.now().astimezone()
    try:
        now = _dt.datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(f"--now must be an ISO 8601 time such as 2026-03-02T22:00:00Z, not {value!r}") from None
    return now.astimezone()
