"""``--prometheus FILE``: the status as metrics for node_exporter's textfile collector.

Written with prometheus_client (its exposition format and
``write_to_textfile``, which writes a temporary file beside FILE and
renames it over FILE: the collector never reads half a file).  Every
metric is a gauge with a ``vm`` label (and ``destination`` for
replication); a time is seconds since the epoch, absent when unknown
(Prometheus has no null), so an alert on ``time() - vmbk_last_success_timestamp_seconds``
never sees a made-up zero.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vmbk.errors import DependencyError, StorageError
from vmbk.records import Record
from vmbk.status.history import parse_time

#: name -> (help, extra label names)
METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "vmbk_status_ok": ("1 when the VM's backups are fine (state ok or excluded), else 0", ()),
    "vmbk_state": ("1 for the VM's state (ok, stale, broken, missing, excluded)", ("state",)),
    "vmbk_last_success_timestamp_seconds": ("Start of the VM's newest successful backup", ()),
    "vmbk_last_attempt_timestamp_seconds": ("Start of the VM's newest backup attempt", ()),
    "vmbk_last_attempt_failed": ("1 when the VM's newest backup attempt failed", ()),
    "vmbk_last_backup_duration_seconds": ("Duration of the VM's newest successful backup", ()),
    "vmbk_last_backup_bytes": ("Bytes written by the VM's newest successful backup", ()),
    "vmbk_newest_restore_point_timestamp_seconds": ("Time of the VM's newest complete restore point", ()),
    "vmbk_restore_points": ("Complete restore points of the VM", ()),
    "vmbk_restore_points_incomplete": ("Restore points of the VM that cannot be restored", ()),
    "vmbk_chains": ("Chains of the VM by kind", ("kind",)),
    "vmbk_backup_size_bytes": ("Bytes of the VM's backup directory", ()),
    "vmbk_lock": ("1 for the state of the VM's lock (free, held, stale, unknown)", ("state",)),
    "vmbk_replication_lag_seconds": ("How far the replica trails the VM's newest restore point", ("destination",)),
    "vmbk_replication_last_success_timestamp_seconds": ("Start of the last good push to the destination",
                                                        ("destination",)),
}
STATES = ("ok", "stale", "broken", "missing", "excluded")
LOCKS = ("free", "held", "stale", "unknown")


def _ts(text: Any) -> float | None:
    t = parse_time(text)
    return None if t is None else t.timestamp()


def write(path: Path, records: Iterable[Record], now: _dt.datetime, stale_hours: float) -> None:
    try:
        from prometheus_client import CollectorRegistry, Gauge, write_to_textfile
    except ImportError:  # pragma: no cover - a dependency of the package
        raise DependencyError("--prometheus needs the Python package prometheus_client") from None
    reg = CollectorRegistry()
    g = {name: Gauge(name, text, ("vm", *labels), registry=reg) for name, (text, labels) in METRICS.items()}
    Gauge("vmbk_status_timestamp_seconds", "When vmbk-status wrote this file", registry=reg).set(now.timestamp())
    Gauge("vmbk_stale_threshold_seconds", "The age past which a restore point is stale",
          registry=reg).set(stale_hours * 3600)

    def put(name: str, vm: str, value: float | int | None, *labels: str) -> None:
        if value is not None:
            g[name].labels(vm, *labels).set(float(value))

    for rec in records:
        vm = rec["vm"]
        success, attempt = rec.get("last_success") or {}, rec.get("last_attempt") or {}
        put("vmbk_status_ok", vm, int(rec["state"] in ("ok", "excluded")))
        for s in STATES:
            put("vmbk_state", vm, int(rec["state"] == s), s)
        put("vmbk_last_success_timestamp_seconds", vm, _ts(success.get("at")))
        put("vmbk_last_attempt_timestamp_seconds", vm, _ts(attempt.get("at")))
        if attempt:
            put("vmbk_last_attempt_failed", vm, int(attempt.get("outcome") == "failed"))
        put("vmbk_last_backup_duration_seconds", vm, success.get("duration"))
        put("vmbk_last_backup_bytes", vm, success.get("bytes"))
        put("vmbk_newest_restore_point_timestamp_seconds", vm, _ts(rec.get("newest_point")))
        put("vmbk_restore_points", vm, rec["complete_points"])
        put("vmbk_restore_points_incomplete", vm, rec["restore_points"] - rec["complete_points"])
        for kind in ("active", "archived", "broken"):
            put("vmbk_chains", vm, rec[f"chains_{kind}"], kind)
        put("vmbk_backup_size_bytes", vm, rec["bytes"])
        for s in LOCKS:
            put("vmbk_lock", vm, int(rec["lock"] == s), s)
        for r in rec.get("replication") or []:
            put("vmbk_replication_lag_seconds", vm, r.get("lag_s"), r["destination"])
            put("vmbk_replication_last_success_timestamp_seconds", vm, _ts(r.get("last_ok")), r["destination"])
    try:
        write_to_textfile(str(path), reg)
    except OSError as e:
        raise StorageError(f"--prometheus {path}: {e.strerror or e}") from None
