"""Running vmbk-backup (and vmbk-restore) from tests: in-process, or as a slowed-down process.

In-process (`run_backup`, `backup_ok`) is the default; a real process
(`slow_backup`) is for signals and crashes, slowed with LZ4-HC so a test
can act while a stream is being written (`wait_for_partials`).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from vmbk.commands.backup import main as backup_main
from vmbk.commands.restore import main as restore_main

ROOT = Path(__file__).resolve().parents[1]


def run_backup(root: Path, *argv: str) -> tuple[int, list[dict[str, Any]]]:
    """``vmbk-backup --json --backup-path ROOT ARGV...``: (exit code, records)."""
    out = io.StringIO()
    code = backup_main(["--json", "--backup-path", str(root), *argv], io.StringIO(""), out)
    return code, [orjson.loads(line) for line in out.getvalue().splitlines()]


def backup_ok(root: Path, name: str, *argv: str) -> dict[str, Any]:
    """Back up one VM that must succeed; its single ``backup`` record."""
    code, recs = run_backup(root, "--vm", name, *argv)
    assert code == 0, [r.get("message") for r in recs]
    (rec,) = recs
    assert rec["type"] == "backup" and rec["outcome"] == "ok", rec
    return rec


def chain_files(chain: Path, until: int | None = None, disk: str = "vda") -> list[Path]:
    """The stream files of ``disk`` in the chain in ``chain``, up to restore
    point ``until`` (all of them when None): the copy, or full + incs."""
    if (chain / f"{disk}.copy.data").exists():
        return [chain / f"{disk}.copy.data"]
    names = orjson.loads(next(chain.glob("*.cpt")).read_bytes())
    names = names if until is None else names[: until + 1]
    return [chain / f"{disk}.full.data"] + [chain / f"{disk}.inc.{c}.data" for c in names[1:]]


def slow_backup(root: Path, names: list[str], config_dir: Path, *argv: str) -> subprocess.Popen[bytes]:
    """A ``vmbk-backup`` process made slow by LZ4-HC level 16 compression."""
    config_dir.mkdir(exist_ok=True)
    (config_dir / "default.toml").write_text('compression = "lz4"\ncompression_level = 16\n')
    env = {**os.environ, "VMBK_CONFIG_DIR": str(config_dir), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, str(ROOT / "bin" / "vmbk-backup"), "--json", "--backup-path", str(root),
                             "--vm", ",".join(names), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def wait_for_partials(p: subprocess.Popen[bytes], root: Path, count: int = 1, timeout: float = 60) -> None:
    """Until ``count`` streams are being written under ``root``."""
    deadline = time.monotonic() + timeout
    while len(list(root.rglob("*.data.partial"))) < count:
        assert p.poll() is None, p.stderr.read().decode() if p.stderr else p.returncode
        assert time.monotonic() < deadline, "the backup never started writing"
        time.sleep(0.05)


def finish(p: subprocess.Popen[bytes], timeout: float = 60) -> int:
    """The exit code; the process is killed if it does not end in time."""
    try:
        return p.wait(timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def run_restore(*argv: str) -> tuple[int, list[dict[str, Any]]]:
    """``vmbk-restore --json ARGV...`` in-process: (exit code, records)."""
    out = io.StringIO()
    code = restore_main(["--json", *argv], io.StringIO(""), out)
    return code, [orjson.loads(line) for line in out.getvalue().splitlines()]


def tree_files(d: Path) -> dict[str, bytes]:
    """Every file below ``d`` (relative name -> content)."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def released(image: Path, timeout: float = 30) -> Path:
    """``image`` once no process holds its write lock.

    virtnbdrestore returns before its qemu-nbd has exited: a ``qemu-img``
    opened at once can meet "Failed to get shared 'write' lock".
    """
    deadline = time.monotonic() + timeout
    while True:
        r = subprocess.run(["qemu-img", "info", str(image)], capture_output=True, text=True)
        if r.returncode == 0 or "lock" not in r.stderr or time.monotonic() > deadline:
            return image
        time.sleep(0.1)


def full_then_inc_restore_exact(root: Path, nd: Any, work: Path, pattern: int) -> Path:
    """``vmbk-backup --vm`` of the no-OS domain ``nd`` twice -- a full, then an
    incremental after a write of ``pattern`` through QEMU -- and both points
    restored and compared with the disk as it was at each backup; the chain."""
    from replicate_helpers import qemu_write, reference, restore_point, same_disk

    refs = []
    for action in ("full", "inc"):
        code, recs = run_backup(root, "--vm", nd.name)
        assert code == 0, [r.get("message") for r in recs]
        (rec,) = recs
        assert rec["action"] == action and rec["outcome"] == "ok", rec
        refs.append(reference(nd.disks[0], work / f"ref-{action}.raw"))
        qemu_write(nd.dom, pattern + len(refs), 12)
    chain = Path(rec["target_dir"])
    for i, ref in enumerate(refs):
        assert same_disk(restore_point(chain, i, work / f"restored{i}"), ref), f"point {i}"
    return chain
