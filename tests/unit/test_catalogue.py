"""The catalogue: migrations recorded in the database, WAL, refusal of newer schemas."""

import sqlite3
import subprocess
import sys

import pytest

from vmbk import catalogue, clock
from vmbk.catalogue import Catalogue, db_path
from vmbk.errors import StorageError


def test_fresh_catalogue_is_migrated_and_in_wal_mode(tmp_path):
    with Catalogue.open(tmp_path) as cat:
        assert cat.version == len(catalogue.MIGRATIONS)
        assert cat.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        rows = cat.query("SELECT version, applied_at FROM schema_migrations")
        assert [r["version"] for r in rows] == list(range(1, len(catalogue.MIGRATIONS) + 1))
    assert oct(db_path(tmp_path).stat().st_mode & 0o777) == "0o640"
    # the sqlite3 CLI sees the same tables (a person can inspect it)
    out = subprocess.run(["sqlite3", str(db_path(tmp_path)), ".tables"], capture_output=True, text=True)
    if out.returncode == 0:
        for table in ("sessions", "vm_backups", "data_files", "chain_events", "restore_sessions"):
            assert table in out.stdout


def test_reopen_does_not_migrate_again(tmp_path):
    Catalogue.open(tmp_path).close()
    with Catalogue.open(tmp_path) as cat:
        assert len(cat.query("SELECT * FROM schema_migrations")) == len(catalogue.MIGRATIONS)


def test_a_migration_another_process_applied_meanwhile_is_not_applied_again(tmp_path, monkeypatch):
    # the stages of a pipe open a fresh catalogue together: each read the version before
    # the other took the write lock (an ALTER TABLE applied twice: "duplicate column name")
    Catalogue.open(tmp_path).close()
    stale = [0]  # what the first look says; the others see the truth
    real = Catalogue.version.fget
    monkeypatch.setattr(Catalogue, "version", property(lambda self: stale.pop() if stale else real(self)))
    with Catalogue.open(tmp_path) as cat:
        assert [r["version"] for r in cat.query("SELECT version FROM schema_migrations")] == \
            list(range(1, len(catalogue.MIGRATIONS) + 1))


def test_a_pipe_of_stages_opens_a_fresh_catalogue_at_once(tmp_path):
    code = "import sys; from pathlib import Path; from vmbk.catalogue import Catalogue; " \
           "Catalogue.open(Path(sys.argv[1])).close()"
    for round_ in range(3):
        root = tmp_path / str(round_)
        procs = [subprocess.Popen([sys.executable, "-c", code, str(root)], stderr=subprocess.PIPE)
                 for _ in range(6)]
        errors = [p.communicate()[1].decode() for p in procs]
        assert [p.returncode for p in procs] == [0] * 6, errors
        with Catalogue.open(root) as cat:
            assert cat.version == len(catalogue.MIGRATIONS)


def test_new_migration_is_applied_once_in_order(tmp_path, monkeypatch):
    Catalogue.open(tmp_path).close()
    monkeypatch.setattr(catalogue, "MIGRATIONS", catalogue.MIGRATIONS + ["ALTER TABLE sessions ADD COLUMN note TEXT"])
    with Catalogue.open(tmp_path) as cat:
        assert cat.version == len(catalogue.MIGRATIONS)
        cat.db.execute("INSERT INTO sessions (id, started_at, command, note) VALUES ('s', 'now', 'x', 'n')")


def test_failed_migration_leaves_the_previous_version(tmp_path, monkeypatch):
    Catalogue.open(tmp_path).close()
    monkeypatch.setattr(catalogue, "MIGRATIONS", catalogue.MIGRATIONS + ["CREATE TABLE t (a); CREATE TABLE t (b)"])
    with pytest.raises(StorageError):
        Catalogue.open(tmp_path)
    monkeypatch.undo()
    with Catalogue.open(tmp_path) as cat:
        assert cat.version == len(catalogue.MIGRATIONS)
        assert not cat.query("SELECT name FROM sqlite_master WHERE name = 't'")


def test_a_newer_schema_is_refused_untouched(tmp_path):
    Catalogue.open(tmp_path).close()
    db = sqlite3.connect(db_path(tmp_path))
    db.execute("INSERT INTO schema_migrations VALUES (999, 'future')")
    db.commit()
    db.close()
    with pytest.raises(StorageError, match="newer than this vmbk"):
        Catalogue.open(tmp_path)


def test_garbage_file_is_a_storage_error(tmp_path):
    path = db_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StorageError, match="unusable"):
        Catalogue.open(tmp_path)


def test_rows_and_sessions(tmp_path):
    with Catalogue.open(tmp_path) as cat:
        cat.start_session("S1", "vmbk-backup", "host1")
        vb = cat.insert("vm_backups", {"session_id": "S1", "vm": "web 'x'", "action": "full",
                                       "outcome": "ok", "started_at": clock.now_iso()})
        cat.insert("data_files", {"vm_backup_id": vb, "path": "/b/web/vda.full.data", "disk": "vda", "level": "full"})
        cat.end_session("S1", 0)
        assert cat.query("SELECT exit_code FROM sessions")[0][0] == 0
        with pytest.raises(sqlite3.IntegrityError):
            cat.insert("data_files", {"vm_backup_id": 999, "path": "p", "disk": "d", "level": "full"})
        with pytest.raises(ValueError):
            cat.insert("sqlite_master; DROP TABLE sessions", {"a": 1})
    assert Catalogue.open_existing(tmp_path / "nowhere") is None


def test_inserts_inside_a_transaction_are_all_or_nothing(tmp_path):
    with Catalogue.open(tmp_path) as cat:
        cat.start_session("S1", "vmbk-backup")
        with pytest.raises(RuntimeError):
            with cat.transaction():
                vb = cat.insert("vm_backups", {"session_id": "S1", "vm": "a", "action": "full",
                                               "outcome": "ok", "started_at": "t"})
                cat.insert("data_files", {"vm_backup_id": vb, "path": "p", "disk": "vda", "level": "full"})
                raise RuntimeError("the second half failed")
        assert cat.query("SELECT count(*) FROM vm_backups")[0][0] == 0
        assert cat.query("SELECT count(*) FROM data_files")[0][0] == 0


def test_a_version_1_catalogue_gains_the_retention_tables_and_keeps_its_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(catalogue, "MIGRATIONS", catalogue.MIGRATIONS[:1])
    with Catalogue.open(tmp_path) as cat:
        cat.start_session("s1", "vmbk-backup")
        cat.insert("vm_backups", {"session_id": "s1", "vm": "web", "action": "full", "outcome": "ok",
                                  "period": "202603", "started_at": "2026-03-01T01:00:00+00:00"})
    monkeypatch.undo()
    with Catalogue.open(tmp_path) as cat:
        assert cat.version >= 2
        (row,) = cat.query("SELECT vm, period, deleted_at FROM vm_backups")
        assert tuple(row) == ("web", "202603", None)
        for table in ("retention_events", "file_operations", "deleted_chains"):
            assert cat.query(f"SELECT count(*) FROM {table}")[0][0] == 0
