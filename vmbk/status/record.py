"""The records of vmbk-status (vmbk-json(7): status, session_history,
restore_history), from the tree, the catalogue and the verdict."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping
from typing import Any

from vmbk.records import Record, make
from vmbk.status import check
from vmbk.status.history import History, parse_time
from vmbk.status.tree import TreeState, iso_time


def _age(now: _dt.datetime, ts: float | None) -> float | None:
    return None if ts is None else round(now.timestamp() - ts, 1)


def _age_of(now: _dt.datetime, text: str | None) -> float | None:
    t = parse_time(text)
    return None if t is None else round((now - t).total_seconds(), 1)


def replication(rows: list[dict[str, Any]], newest: float | None) -> list[dict[str, Any]]:
    """Per destination: the last push's outcome, the last good one, and the
    lag: how far the newest backup the replica holds trails the VM's newest
    complete restore point (0: current)."""
    out = []
    for r in rows:
        through = parse_time(r.get("replicated_through"))
        lag = None
        if through is not None and newest is not None:
            lag = round(max(0.0, newest - through.timestamp()), 1)
        out.append({"destination": r["destination"], "transport": r.get("transport"),
                    "last_outcome": r.get("last_outcome"), "last_ok": r.get("last_ok"),
                    "replicated_through": r.get("replicated_through"), "lag_s": lag})
    return out


def status_record(session: str, tree: TreeState, hist: History, now: _dt.datetime, stale_hours: float, *,
                  policy: str, policy_source: str, excluded: str | None, lock: Any) -> tuple[Record, check.Verdict]:
    vm = tree.vm
    success = hist.last_success(vm)
    attempt = hist.last_attempt(vm)
    unchanged = hist.last_unchanged(vm)
    newest = tree.newest_point
    facts = check.Facts(
        vm=vm, excluded=excluded is not None, point_age=_age(now, newest), unchanged_age=_age_of(now, unchanged),
        broken=tuple((c.rel, c.reasons[0] if c.reasons else "incomplete") for c in tree.broken),
        lock=lock.state, lock_pid=lock.pid,
        last_outcome=attempt["outcome"] if attempt else None, last_error=attempt["error"] if attempt else None)
    verdict = check.judge(facts, stale_hours)
    rec = make(
        "status", session,
        vm=vm,
        path=str(tree.path) if tree.exists else None,
        state=verdict.state,
        problems=list(verdict.problems),
        warnings=list(verdict.warnings),
        policy=policy,
        policy_source=policy_source,
        excluded=excluded is not None,
        excluded_reason=excluded,
        last_success=success,
        last_attempt=attempt,
        last_unchanged=unchanged,
        newest_point=iso_time(newest),
        newest_point_age_s=facts.point_age,
        oldest_point=iso_time(tree.oldest_point),
        restore_points=tree.points,
        complete_points=tree.complete_points,
        chains_active=len(tree.active),
        chains_archived=len(tree.archived),
        chains_broken=len(tree.broken),
        chains=[c.as_record() for c in tree.chains],
        periods=list(tree.periods),
        bytes=tree.bytes,
        uuid=tree.uuid,
        replication=replication(hist.replication(vm), newest),
        last_restore=hist.last_restore(vm),
        last_drill=hist.last_drill(vm),
        last_verify=hist.last_verify(vm),
        lock=lock.state,
        lock_pid=lock.pid,
        locked=lock.state == "held",
        stale_hours=stale_hours,
        now=now.isoformat(timespec="seconds"),
    )
    return rec, verdict


def session_record(session: str, row: Mapping[str, Any]) -> Record:
    start, end = parse_time(row.get("started_at")), parse_time(row.get("ended_at"))
    fields = {k: row.get(k) for k in ("backed_up", "failed", "skipped", "bytes", "removed", "freed_bytes",
                                      "replicated", "replication_failed")}
    return make("session_history", session, id=row["id"], command=row.get("command"), host=row.get("host"),
                started_at=row.get("started_at"), ended_at=row.get("ended_at"),
                duration=round((end - start).total_seconds(), 1) if start and end else None,
                exit_code=row.get("exit_code"), **fields)


def restore_record(session: str, row: Mapping[str, Any]) -> Record:
    return make("restore_history", session, vm=row["vm"], mode=row.get("mode"), source=row.get("source"),
                target=row.get("target"), restore_point=row.get("restore_point"), started_at=row.get("started_at"),
                duration=row.get("duration_s"), outcome=row.get("outcome"), exit_code=row.get("exit_code"),
                error=row.get("error"), restore_session=row.get("session_id"))
