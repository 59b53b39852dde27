"""The SQLite catalogue: an index and a history of what vmbk did.

``$BACKUP_PATH/_state/vmbk.db``, WAL mode so readers (``vmbk-status``,
``vmbk-restore --list``) never block a running backup.  The tree is the
source of truth: restore never depends on the catalogue, and everything in
it that describes the tree can be rebuilt from the tree.

Migrations are a list of SQL scripts; ``schema_migrations`` records which
ran and when, inside the same transaction as the script, so a crash mid
migration leaves the previous version intact.  A database newer than this
code is refused (opening it could misread columns) rather than touched.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from vmbk.clock import now_iso
from vmbk.errors import StorageError
from vmbk.fsutil import FILE_MODE, ensure_dir

DB_NAME = "vmbk.db"
BUSY_TIMEOUT_MS = 30_000

MIGRATIONS: list[str] = [
    # 1: sessions, VM backups, data files, chain events, restores
    """
    CREATE TABLE sessions (
        id          TEXT PRIMARY KEY,
        started_at  TEXT NOT NULL,
        ended_at    TEXT,
        command     TEXT NOT NULL,
        host        TEXT,
        exit_code   INTEGER
    );
    CREATE TABLE vm_backups (
        id           INTEGER PRIMARY KEY,
        session_id   TEXT NOT NULL REFERENCES sessions(id),
        vm           TEXT NOT NULL,
        vm_uuid      TEXT,
        action       TEXT NOT NULL,          -- full | inc | copy | skip
        policy       TEXT,
        period       TEXT,
        directory    TEXT,
        checkpoint   TEXT,
        parent       TEXT,
        consistency  TEXT,                   -- frozen | paused | crash | offline
        outcome      TEXT NOT NULL,          -- ok | failed | skipped
        error        TEXT,
        reasons      TEXT,                   -- JSON list
        started_at   TEXT NOT NULL,
        duration_s   REAL,
        bytes        INTEGER
    );
    CREATE INDEX vm_backups_vm ON vm_backups(vm, started_at);
    CREATE TABLE data_files (
        id            INTEGER PRIMARY KEY,
        vm_backup_id  INTEGER NOT NULL REFERENCES vm_backups(id),
        path          TEXT NOT NULL,
        disk          TEXT NOT NULL,
        level         TEXT NOT NULL,         -- full | inc | copy
        checkpoint    TEXT,
        virtual_size  INTEGER,
        data_size     INTEGER,
        stored_size   INTEGER,
        checksum      TEXT,
        read_s        REAL,
        write_s       REAL
    );
    CREATE TABLE chain_events (
        id          INTEGER PRIMARY KEY,
        session_id  TEXT REFERENCES sessions(id),
        vm          TEXT NOT NULL,
        at          TEXT NOT NULL,
        event       TEXT NOT NULL,           -- archived | redefined | broken | cleaned
        directory   TEXT,
        reason      TEXT
    );
    CREATE INDEX chain_events_vm ON chain_events(vm, at);
    CREATE TABLE restore_sessions (
        id          INTEGER PRIMARY KEY,
        session_id  TEXT,
        vm          TEXT NOT NULL,
        mode        TEXT NOT NULL,           -- dr | clone | disk | data
        source      TEXT,
        target      TEXT,
        restore_point TEXT,
        started_at  TEXT NOT NULL,
        duration_s  REAL,
        outcome     TEXT,
        exit_code   INTEGER,
        error       TEXT
    );
    """,
    # 2: retention (vmbk-rotate, vmbackup's "Database Audit Trail"): every
    # decision, every deleted directory, and a tombstone per deleted chain.
    # Rows are never dropped; a deletion's rows say NULL/'deleting' from just
    # before its rename until just after it (vmbk.rotate.history).
    """
    CREATE TABLE retention_events (
        id              INTEGER PRIMARY KEY,
        session_id      TEXT REFERENCES sessions(id),
        vm              TEXT NOT NULL,
        at              TEXT NOT NULL,
        action          TEXT NOT NULL,   -- delete | protect | refuse
        tier            TEXT,            -- count | orphan | prune
        target_type     TEXT,            -- period | archive | vm
        target_path     TEXT,            -- relative to the VM directory
        target_period   TEXT,
        rotation_policy TEXT,
        retention_limit INTEGER,
        freed_bytes     INTEGER,
        reason          TEXT,
        triggered_by    TEXT NOT NULL,   -- rotate | prune | finish
        success         INTEGER          -- deletion: NULL under way, 1 done, 0 not done
    );
    CREATE INDEX retention_events_vm ON retention_events(vm, at);
    CREATE TABLE file_operations (
        id              INTEGER PRIMARY KEY,
        session_id      TEXT REFERENCES sessions(id),
        vm              TEXT NOT NULL,
        at              TEXT NOT NULL,
        operation       TEXT NOT NULL,   -- delete
        path            TEXT NOT NULL,
        file_type       TEXT NOT NULL,   -- directory
        bytes           INTEGER,
        reason          TEXT,
        triggered_by    TEXT,
        success         INTEGER
    );
    CREATE TABLE deleted_chains (
        id              INTEGER PRIMARY KEY,
        vm              TEXT NOT NULL,
        chain           TEXT NOT NULL,   -- relative to the VM directory, where it was
        period          TEXT,
        restore_points  INTEGER,
        bytes           INTEGER,
        last_backup     TEXT,
        status          TEXT NOT NULL,   -- deleting | deleted | abandoned
        deleted_at      TEXT,
        reason          TEXT,
        retention_event_id INTEGER REFERENCES retention_events(id)
    );
    CREATE INDEX deleted_chains_vm ON deleted_chains(vm, chain);
    ALTER TABLE vm_backups ADD COLUMN deleted_at TEXT;   -- its period (or VM) was deleted
    """,
    # 3: replication (vmbk-replicate, vmbackup's replication_runs and
    # replication_vms, "Report 6"): one run per destination and command,
    # written 'running' at its start and closed with its outcome; one row
    # per VM.  last_backup: the newest data file the replica then held
    # (the replication lag, vmbk.replicate.history.lag).
    """
    CREATE TABLE replication_runs (
        id           INTEGER PRIMARY KEY,
        session_id   TEXT REFERENCES sessions(id),
        destination  TEXT NOT NULL,
        transport    TEXT NOT NULL,      -- local | ssh | rclone
        action       TEXT NOT NULL,      -- push | pull | verify
        sync_mode    TEXT,               -- mirror | accumulate | append-only
        started_at   TEXT NOT NULL,
        duration_s   REAL,
        outcome      TEXT NOT NULL,      -- running | ok | partial | failed
        files        INTEGER,
        bytes        INTEGER,
        deleted      INTEGER,
        verified     TEXT,               -- none | size | checksum
        mismatches   INTEGER,
        tool_exit    INTEGER,            -- rsync's or rclone's exit status
        error        TEXT
    );
    CREATE INDEX replication_runs_destination ON replication_runs(destination, started_at);
    CREATE TABLE replication_vms (
        id           INTEGER PRIMARY KEY,
        run_id       INTEGER NOT NULL REFERENCES replication_runs(id),
        vm           TEXT NOT NULL,
        outcome      TEXT NOT NULL,      -- ok | failed | skipped
        files        INTEGER,
        bytes        INTEGER,
        deleted      INTEGER,
        moved        INTEGER,
        verified     TEXT,
        mismatches   INTEGER,
        duration_s   REAL,
        tool_exit    INTEGER,
        last_backup  TEXT,
        error        TEXT
    );
    CREATE INDEX replication_vms_vm ON replication_vms(vm, run_id);
    """,
    # 4: history imported from vmbackup's catalogue (vmbk-status
    # --import-vmbackup, vmbk.vmbackup.importer): each row says where it came
    # from and its id there, so an import runs any number of times and adds
    # each of vmbackup's backups once.  NULL: vmbk's own.
    """
    ALTER TABLE vm_backups ADD COLUMN source TEXT;        -- NULL (vmbk) | vmbackup
    ALTER TABLE vm_backups ADD COLUMN source_id INTEGER;  -- vm_backups.id in vmbackup.db
    CREATE UNIQUE INDEX vm_backups_source ON vm_backups(source, source_id);
    """,
    # 5: restore drills (vmbk-drill, vmbk.drill.history): one row per drilled
    # point, written when the drill is over (its restore_sessions row, mode
    # 'drill', goes in the same transaction).  checks: the drill record's
    # checks as JSON; picture/console: its screenshot and console tail
    # under _state/drills/ (null once pruned or never taken).
    """
    CREATE TABLE drills (
        id             INTEGER PRIMARY KEY,
        session_id     TEXT,
        vm             TEXT NOT NULL,
        name           TEXT,             -- the throwaway VM: <vm>-drill-<stamp>
        restore_point  TEXT,             -- CHAIN:INDEX, as restore_sessions
        point_date     TEXT,
        reason         TEXT,             -- backup | latest | random | index | date | sample
        started_at     TEXT NOT NULL,
        duration_s     REAL,
        outcome        TEXT NOT NULL,    -- ok | failed
        level          TEXT,             -- none | disks | started | filesystems | console | agent | check
        exit_code      INTEGER,
        error          TEXT,
        checks         TEXT,             -- JSON list
        os             TEXT,
        screenshot     TEXT,
        console        TEXT
    );
    CREATE INDEX drills_vm ON drills(vm, started_at);
    """,
    # 6: vmbk-restore --verify runs (vmbk.restore.verify.record): one row per
    # VM verified, whatever the outcome, so vmbk-status shows when each VM was
    # last checked against its manifests.  outcome: ok | bad | unverifiable;
    # points: restore points checked; findings: how many were not ok.
    """
    CREATE TABLE verifications (
        id           INTEGER PRIMARY KEY,
        session_id   TEXT,
        vm           TEXT NOT NULL,
        started_at   TEXT NOT NULL,
        duration_s   REAL,
        deep         INTEGER NOT NULL DEFAULT 0,
        chains       INTEGER,
        points       INTEGER,
        files        INTEGER,
        findings     INTEGER,
        outcome      TEXT NOT NULL,
        exit_code    INTEGER,
        error        TEXT
    );
    CREATE INDEX verifications_vm ON verifications(vm, started_at);
    """,
    # 7: a restore onto a host that lacks what the VM had (vmbk.restore.crosshost):
    # the remaps it applied, JSON [{"kind", "from", "to"}]
    """
    ALTER TABLE restore_sessions ADD COLUMN remaps TEXT;
    """,
]


def db_path(backup_path: Path) -> Path:
    return backup_path / "_state" / DB_NAME


def connect_readonly(backup_path: Path) -> sqlite3.Connection | None:
    """A read-only connection to the catalogue, None when there is none.

    For readers that must work on a read-only backup mount and for the
    ``backup`` group (vmbk-status, vmbk-report): never created, never
    migrated; an older schema simply lacks tables (`table_names`).
    """
    path = db_path(backup_path)
    if not path.exists():
        return None
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
        db.row_factory = sqlite3.Row
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as e:
        raise StorageError(f"cannot read catalogue {path}: {e}") from None
    return db


def table_names(db: sqlite3.Connection) -> set[str]:
    return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


class Catalogue:
    """A connection to the catalogue of one backup path."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            # Shared by a stage's worker threads (vmbk-backup --jobs); every
            # use goes through `transaction` or `query`, under one lock.
            self.db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                      check_same_thread=False)
        except sqlite3.Error as e:
            raise StorageError(f"cannot open catalogue {path}: {e}") from None
        self._lock = threading.RLock()
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA foreign_keys = ON")
        try:
            self.db.execute("PRAGMA journal_mode = WAL")
            self._migrate()
        except sqlite3.DatabaseError as e:
            self.db.close()
            raise StorageError(f"catalogue {path} is unusable: {e}") from None

    @classmethod
    def open(cls, backup_path: Path) -> "Catalogue":
        path = db_path(backup_path)
        ensure_dir(path.parent)
        fresh = not path.exists()
        cat = cls(path)
        if fresh:
            path.chmod(FILE_MODE)
        return cat

    @classmethod
    def open_existing(cls, backup_path: Path) -> "Catalogue | None":
        """The catalogue if there is one (restore works without it)."""
        path = db_path(backup_path)
        return cls(path) if path.exists() else None

    # -- schema -----------------------------------------------------------------
    @property
    def version(self) -> int:
        row = self.db.execute("SELECT max(version) FROM schema_migrations").fetchone()
        return int(row[0] or 0)

    def _migrate(self) -> None:
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        current = self.version
        if current > len(MIGRATIONS):
            raise StorageError(
                f"catalogue {self.path} has schema version {current}, newer than this vmbk knows "
                f"({len(MIGRATIONS)}): upgrade vmbk"
            )
        for version in range(current + 1, len(MIGRATIONS) + 1):
            with self.transaction():
                # The stages of a pipe open a fresh catalogue at the same moment: another
                # process may have applied this one since `current` was read (not idempotent:
                # ALTER TABLE ADD COLUMN).  BEGIN IMMEDIATE holds the write lock: look again.
                if self.version >= version:
                    continue
                for statement in _statements(MIGRATIONS[version - 1]):
                    self.db.execute(statement)
                self.db.execute("INSERT INTO schema_migrations VALUES (?, ?)", (version, now_iso()))

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Catalogue":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writes -------------------------------------------------------------------
    def insert(self, table: str, row: Mapping[str, Any]) -> int:
        """Insert one row: in the open `transaction`, else in its own."""
        if table not in _TABLES:
            raise ValueError(f"unknown table {table}")
        cols = list(row)
        sql = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})"
        with self._lock:
            if self.db.in_transaction:
                cur = self.db.execute(sql, [row[c] for c in cols])
            else:
                with self.transaction():
                    cur = self.db.execute(sql, [row[c] for c in cols])
        return int(cur.lastrowid or 0)

    def start_session(self, session: str, command: str, host: str | None = None) -> None:
        with self.transaction():
            self.db.execute(
                "INSERT OR IGNORE INTO sessions (id, started_at, command, host) VALUES (?, ?, ?, ?)",
                (session, now_iso(), command, host),
            )

    def end_session(self, session: str, exit_code: int) -> None:
        with self.transaction():
            self.db.execute("UPDATE sessions SET ended_at = ?, exit_code = ? WHERE id = ?", (now_iso(), exit_code, session))

    # -- reads --------------------------------------------------------------------
    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self.db.execute(sql, params))


_TABLES = {"sessions", "vm_backups", "data_files", "chain_events", "restore_sessions", "retention_events",
           "file_operations", "deleted_chains", "replication_runs", "replication_vms", "drills",
           "verifications"}


def _statements(script: str) -> list[str]:
    """Split a migration script at semicolons (no triggers with bodies here)."""
    out = []
    for chunk in script.split(";"):
        lines = [line.split("--", 1)[0] for line in chunk.splitlines()]
        text = "\n".join(lines).strip()
        if text:
            out.append(text)
    return out
