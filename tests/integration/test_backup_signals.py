"""SIGTERM/SIGINT in the middle of a real backup: clean exit, nothing left.

The backup is slowed down with heavy LZ4-HC compression so the signal
lands while a stream is being written.  Afterwards: exit 128+N, no
.partial or data file, no checkpoint in libvirt, the lock released, the
domain running (not paused), and the next run does a normal full.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from vmbk.commands.backup import main as backup_main

pytestmark = pytest.mark.libvirt
ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_mid_backup_cleans_up(nos_domain, vm_workdir, tmp_path, sig, code):
    nd = nos_domain(1, size="1G", writes=[(0x5A, 0, 400 * MiB)])
    backups = vm_workdir / "backups"
    backups.mkdir()
    (tmp_path / "default.toml").write_text('compression = "lz4"\ncompression_level = 16\n')
    env = {**os.environ, "VMBK_CONFIG_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, str(ROOT / "bin" / "vmbk-backup"), "--json", "--backup-path", str(backups),
                          "--vm", nd.name], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 60
        while not list(backups.rglob("*.data.partial")):
            assert p.poll() is None, p.stderr.read().decode()
            assert time.monotonic() < deadline, "the backup never started writing"
            time.sleep(0.05)
        p.send_signal(sig)
        assert p.wait(60) == code
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.stdout.read() == b""  # no half record, no backup record
    vm_dir = backups / nd.name
    assert [f for f in vm_dir.rglob("*") if f.is_file()] == []
    assert nd.dom.listAllCheckpoints(0) == []
    assert not list((backups / "_state" / "locks").iterdir())
    assert nd.dom.state()[0] == 1  # running
    out = io.StringIO()
    assert backup_main(["--json", "--backup-path", str(backups), "--vm", nd.name], io.StringIO(""), out) == 0
    rec = orjson.loads(out.getvalue())
    assert rec["action"] == "full" and rec["outcome"] == "ok"


def test_vm_destroyed_mid_backup_fails_cleanly_and_the_next_run_works(nos_domain, vm_workdir, tmp_path):
    nd = nos_domain(1, size="1G", writes=[(0x5A, 0, 400 * MiB)])
    backups = vm_workdir / "backups"
    backups.mkdir()
    (tmp_path / "default.toml").write_text('compression = "lz4"\ncompression_level = 16\n')
    env = {**os.environ, "VMBK_CONFIG_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, str(ROOT / "bin" / "vmbk-backup"), "--json", "--backup-path", str(backups),
                          "--vm", nd.name], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 60
        while not list(backups.rglob("*.data.partial")):
            assert p.poll() is None, p.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        nd.dom.destroy()
        code = p.wait(60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    (rec,) = [orjson.loads(line) for line in p.stdout.read().splitlines()]
    assert rec["type"] == "error" and code == rec["code"] and code in (5, 6), rec
    assert [f for f in (backups / nd.name).rglob("*") if f.is_file()] == []
    assert nd.dom.listAllCheckpoints(0) == []
    out = io.StringIO()
    assert backup_main(["--json", "--backup-path", str(backups), "--vm", nd.name], io.StringIO(""), out) == 0
    assert orjson.loads(out.getvalue())["action"] == "copy"  # shut off now: a copy
