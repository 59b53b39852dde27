"""The session summary of one run, folded from its records (pure).

vmbackup manual, "Session Summary & Tracking" and "Email Reporting
System": every VM is in one category -- backed up (counted per policy),
excluded (by policy ``never`` or the configuration), skipped (shut off
and unchanged, or nothing to do) or failed -- with its action,
consistency, duration, bytes and errors; after it what vmbk-rotate and
vmbk-replicate did for it.  A VM whose backup went well but whose
rotation or replication failed stays backed up and has its errors
listed: the subject names the later stage's failures apart.

The outcome is the exit status the last command of the pipe would give
(`vmbk.errors.exit_for_codes`): error records are failures, the backup,
rotate and replicate records that went well are successes.  An input
cut short (a stage died mid-record) is a failure of the run too, said
in the summary rather than hiding it.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from collections import Counter
from typing import Any

from vmbk.errors import Exit, exit_for_codes
from vmbk.records import Record, known_version

BACKED_UP, FAILED, SKIPPED, EXCLUDED, DRY_RUN = "backed up", "failed", "skipped", "excluded", "dry-run"
POLICIES = ("daily", "weekly", "monthly", "accumulate")
#: Stages whose error records mean the backup of the VM failed.
BACKUP_STAGES = ("vmbk-discover", "vmbk-plan", "vmbk-backup")
_FAILURES = frozenset(int(c) for c in Exit if c != Exit.OK)


@dataclasses.dataclass
class VmRow:
    vm: str
    category: str | None = None
    action: str | None = None
    policy: str | None = None
    period: str | None = None
    checkpoint: str | None = None
    consistency: str | None = None
    duration: float | None = None
    bytes: int | None = None
    reasons: list[str] = dataclasses.field(default_factory=list)
    errors: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    rotate: dict[str, Any] | None = None
    replication: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    drill: dict[str, Any] | None = None

    @property
    def status(self) -> str:
        """SUCCESS, FAILED, SKIPPED, EXCLUDED, DRY-RUN (the manual's STATUS column)."""
        if self.category == BACKED_UP:
            return "SUCCESS"
        return (self.category or FAILED).upper()

    def as_record(self) -> dict[str, Any]:
        return {"vm": self.vm, "status": self.status, "action": self.action, "policy": self.policy,
                "period": self.period, "checkpoint": self.checkpoint, "consistency": self.consistency,
                "duration": self.duration, "bytes": self.bytes, "errors": self.errors, "rotate": self.rotate,
                "replication": self.replication, "drill": self.drill}


@dataclasses.dataclass
class Summary:
    host: str
    session: str | None = None
    started: _dt.datetime | None = None
    finished: _dt.datetime | None = None
    vms: dict[str, VmRow] = dataclasses.field(default_factory=dict)
    #: Errors of a stage as a whole (no VM).
    stage_errors: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    failure_codes: list[int] = dataclasses.field(default_factory=list)
    successes: int = 0
    records: int = 0
    types: Counter[str] = dataclasses.field(default_factory=Counter)
    input_error: str | None = None
    #: The backup file system: path, size, free, used_percent.
    disk: dict[str, Any] | None = None

    # -- folding records ----------------------------------------------------------
    def row(self, vm: str) -> VmRow:
        if vm not in self.vms:
            self.vms[vm] = VmRow(vm)
        return self.vms[vm]

    def add(self, rec: Record, at: _dt.datetime) -> None:
        self.records += 1
        rtype = str(rec.get("type"))
        self.types[rtype] += 1
        if self.session is None and isinstance(rec.get("session"), str):
            self.session = rec["session"]
        if self.started is None:
            self.started = _session_time(self.session) or at
        fold = {"backup": self._backup, "error": self._error, "rotate": self._rotate,
                "replicate": self._replicate, "drill": self._drill}.get(rtype)
        if fold is not None and (rtype == "error" or known_version(rec)):
            fold(rec)

    def _backup(self, rec: Record) -> None:
        name = rec.get("name")
        if not isinstance(name, str):
            return
        row = self.row(name)
        outcome = rec.get("outcome")
        row.action, row.period, row.checkpoint = rec.get("action"), rec.get("period"), rec.get("checkpoint")
        row.policy = rec.get("policy") or row.policy
        row.consistency, row.duration, row.bytes = rec.get("consistency"), rec.get("duration"), rec.get("bytes")
        row.reasons = [str(r) for r in rec.get("reasons") or []]
        if outcome == "ok":
            row.category = BACKED_UP
        elif outcome == "dry-run":
            row.category = DRY_RUN
        elif outcome == "skipped":
            row.category = EXCLUDED if rec.get("excluded") else SKIPPED
        else:
            return
        self.successes += 1

    def _error(self, rec: Record) -> None:
        code = rec.get("code")
        ok_code = known_version(rec) and isinstance(code, int) and not isinstance(code, bool) and code in _FAILURES
        code = int(code) if ok_code else int(Exit.GENERAL)  # type: ignore[arg-type]
        self.failure_codes.append(code)
        err = {"stage": rec.get("stage"), "kind": rec.get("kind"), "code": code, "message": rec.get("message"),
               "destination": rec.get("destination")}
        vm = rec.get("vm")
        if not isinstance(vm, str) or not vm or vm == "?":
            self.stage_errors.append(err)
            return
        row = self.row(vm)
        row.errors.append(err)
        if rec.get("stage") in BACKUP_STAGES or row.category is None:
            row.category = FAILED

    def _rotate(self, rec: Record) -> None:
        name = rec.get("name")
        if not isinstance(name, str):
            return
        self.row(name).rotate = {"removed": len(rec.get("removed") or []), "freed_bytes": rec.get("freed_bytes"),
                                 "kept": len(rec.get("kept") or []), "dry_run": rec.get("dry_run"),
                                 "warnings": list(rec.get("warnings") or [])}
        self.successes += 1

    def _replicate(self, rec: Record) -> None:
        vm = rec.get("vm")
        if not isinstance(vm, str):
            return
        self.row(vm).replication.append({"destination": rec.get("destination"), "action": rec.get("action"),
                                         "outcome": rec.get("outcome"), "bytes": rec.get("bytes"),
                                         "files": rec.get("files")})
        self.successes += 1

    def _drill(self, rec: Record) -> None:
        """A restore test (vmbk-drill): the VM's newest in the run; one that failed has its error record."""
        vm = rec.get("vm")
        if not isinstance(vm, str):
            return
        point = rec["point"] if isinstance(rec.get("point"), dict) else {}
        self.row(vm).drill = {"outcome": rec.get("outcome"), "level": rec.get("level"),
                              "point": f"{point.get('chain')}:{point.get('restore_point')}",
                              "seconds": rec.get("seconds"), "screenshot": rec.get("screenshot"),
                              "error": rec.get("error")}
        if rec.get("outcome") == "ok":
            self.successes += 1

    # -- what it says ------------------------------------------------------------------
    @property
    def exit_code(self) -> int:
        """The run's: its failures and successes; an input cut short is a usage
        error (7) among them; no record at all is a failure (1): the stages
        before died without a word, or the pipe was never run."""
        if not self.records and self.input_error is None:
            return int(Exit.GENERAL)
        codes = list(self.failure_codes)
        if self.input_error is not None:
            codes.append(int(Exit.USAGE))
        return int(exit_for_codes(codes, self.successes))

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def category(self, name: str) -> list[VmRow]:
        return [r for r in self.vms.values() if r.category == name]

    def counts(self) -> dict[str, Any]:
        backed = self.category(BACKED_UP)
        later: Counter[str] = Counter()
        for r in self.vms.values():
            for stage in {str(e["stage"]) for e in r.errors if e["stage"] not in BACKUP_STAGES}:
                later[stage] += 1
        return {
            "vms": len(self.vms),
            "backed_up": len(backed),
            "per_policy": {p: sum(1 for r in backed if r.policy == p) for p in POLICIES},
            "excluded": len(self.category(EXCLUDED)),
            "skipped": len(self.category(SKIPPED)),
            "dry_run": len(self.category(DRY_RUN)),
            "failed": len(self.category(FAILED)),
            "later_failures": dict(sorted(later.items())),
            "stage_errors": len(self.stage_errors),
        }

    def subject(self, prefix: str) -> str:
        """``[VM Backup] 3 backed up, 5 excluded, 1 FAILED - host`` (``- OK`` before the host when all went well)."""
        c = self.counts()
        parts = [f"{c['backed_up']} backed up"]
        parts += [f"{c[k]} {w}" for k, w in (("skipped", "skipped"), ("excluded", "excluded"),
                                               ("dry_run", "dry-run")) if c[k]]
        if c["failed"]:
            parts.append(f"{c['failed']} FAILED")
        parts += [f"{stage.removeprefix('vmbk-')} {n} FAILED" for stage, n in c["later_failures"].items()]
        if c["stage_errors"]:
            parts.append(f"{c['stage_errors']} stage error{'s' if c['stage_errors'] > 1 else ''}")
        if self.input_error is not None:
            parts.append("input cut short")
        if not self.records:
            parts = ["no records"]
        text = ", ".join(parts) + (" - OK" if self.ok else "")
        return f"{prefix} {text} - {self.host}".strip()

    @property
    def bytes(self) -> int:
        return sum(r.bytes or 0 for r in self.vms.values() if r.category == BACKED_UP)

    @property
    def duration(self) -> float | None:
        if self.started is None or self.finished is None:
            return None
        return round((self.finished - self.started).total_seconds(), 1)

    def as_fields(self, prefix: str) -> dict[str, Any]:
        """The ``report`` record's fields (and the webhook's JSON)."""
        c = self.counts()
        return {
            "subject": self.subject(prefix),
            "host": self.host,
            "outcome": "ok" if self.ok else "failed",
            "exit_code": self.exit_code,
            "started_at": _iso(self.started),
            "finished_at": _iso(self.finished),
            "duration": self.duration,
            "records": self.records,
            "backed_up": c["backed_up"],
            "per_policy": c["per_policy"],
            "excluded": c["excluded"],
            "skipped": c["skipped"],
            "dry_run": c["dry_run"],
            "failed": c["failed"],
            "later_failures": [{"stage": k, "vms": n} for k, n in c["later_failures"].items()],
            "bytes": self.bytes,
            "vms": [r.as_record() for r in sorted(self.vms.values(), key=lambda r: r.vm)],
            "stage_errors": self.stage_errors,
            "input_error": self.input_error,
            "disk": self.disk,
        }


def _session_time(session: str | None) -> _dt.datetime | None:
    """The start of a run from its session id (``YYYYMMDDTHHMMSSZ-...``, UTC)."""
    if not session:
        return None
    try:
        return _dt.datetime.strptime(session[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=_dt.timezone.utc)
    except ValueError:
        return None


def _iso(t: _dt.datetime | None) -> str | None:
    return None if t is None else t.astimezone(_dt.timezone.utc).isoformat(timespec="seconds")
