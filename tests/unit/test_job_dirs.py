"""Job directories left by a killed run are swept; live and new ones are not."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from vmbk.virt import backupjob


def _dir(root: Path, name: str, *, age: float) -> Path:
    path = root / name
    path.mkdir()
    then = time.time() - age
    os.utime(path, (then, then))
    return path


def test_sweep_removes_only_dead_old_directories(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(backupjob, "RUN_DIR", tmp_path)
    dead = _dir(tmp_path, "backup-dead", age=3600)
    dead_sock = _dir(tmp_path, "backup-deadsock", age=3600)
    with socket.socket(socket.AF_UNIX) as s:  # a socket file nobody listens on any more
        s.bind(str(dead_sock / "nbd.sock"))
    os.utime(dead_sock, (time.time() - 3600,) * 2)
    live = _dir(tmp_path, "backup-live", age=3600)
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(live / "nbd.sock"))
    server.listen()
    os.utime(live, (time.time() - 3600,) * 2)
    new = _dir(tmp_path, "backup-new", age=5)  # its job is starting: no socket yet
    other = _dir(tmp_path, "copy-dead", age=3600)  # another prefix: swept by its own kind
    try:
        gone = backupjob.sweep_stale_job_dirs("backup-")
    finally:
        server.close()
    assert sorted(gone) == sorted([dead, dead_sock])
    assert not dead.exists() and not dead_sock.exists()
    assert live.exists() and new.exists() and other.exists()


def test_job_dir_sweeps_then_makes_a_private_directory(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(backupjob, "RUN_DIR", tmp_path / "run")
    (tmp_path / "run").mkdir()
    dead = _dir(tmp_path / "run", "copy-old", age=3600)
    with backupjob.job_dir("copy-") as path:
        assert not dead.exists()
        assert path.parent == tmp_path / "run" and path.name.startswith("copy-")
        assert path.stat().st_mode & 0o777 == 0o700
    assert not path.exists()
