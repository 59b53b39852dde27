"""kill -9 of vmbk-rotate in the middle of a deletion (#13, "Proof").

A daily VM with six periods of 30 restore points each (and archived chains
in some), policy keeping 3: vmbk-rotate removes three directories.  It
runs as a real process and is SIGKILLed, round after round, at a chosen
step of a deletion (``VMBK_TEST_ROTATE_HOOK``, `vmbk.rotate.delete`): just
after the rename (the catalogue not yet told), just after the catalogue
was told, after the N-th entry removed; or after a random delay while
each entry's removal is slowed down.  While it is stopped and after the
kill:

* ``vmbk-restore --list-restore-points`` lists only chains that are whole
  (every file they had) and complete, and ``--list`` counts no broken
  chain: a half-deleted chain is never shown, let alone as complete;
* the next vmbk-rotate finishes the job: the tree is what the policy says,
  no ``.deleting-*`` is left, the catalogue's deletions are all done and
  its tombstones say ``deleted``.

No libvirt: the trees are materialised as in the golden cases.
Seeded (VMBK_KILL_SEED) so a failure can be replayed; the seed is printed.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from backup_helpers import run_restore
from unit.test_plan_golden import materialise

from vmbk.catalogue import db_path

ROOT = Path(__file__).resolve().parents[2]
NOW = "2026-04-06T22:00:00+00:00"
VM = "kill me 'q' ü"
KEPT = ["20260404", "20260405", "20260406"]
HOOKS = ["pause:renamed", "pause:committed", "pause:removing:{n}", "pause:renamed:2", "pause:committed:3",
         "slow:0.004", "slow:0.002"]


def tree() -> dict:
    def chain(day: str, points: int = 30, **kw: object) -> dict:
        return {"disks": {"vda": 1 << 30, "vdb": 1 << 28}, "times": [f"{day}T{h // 60:02d}:{h % 60:02d}:00+00:00"
                                                                   for h in range(0, points * 30, 30)], **kw}
    t = {f"2026040{d}": chain(f"2026-04-0{d}") for d in range(1, 7)}
    t["20260401"]["archives"] = {"chain-2026-04-01": chain("2026-03-31", 10)}
    t["20260402"]["archives"] = {"chain-2026-04-02": chain("2026-04-01", 5), "chain-2026-04-02.1": chain("2026-04-01", 5)}
    return t


def files_of(chain: Path) -> set[str]:
    return {str(p.relative_to(chain)) for p in chain.rglob("*") if p.is_file() and ".archives" not in p.parts}


def check_listings(root: Path, original: dict[str, set[str]]) -> list[str]:
    """Every chain listed is whole and complete; returns the chains listed."""
    code, recs = run_restore("--backup-path", str(root), "--list-restore-points", VM)
    assert code == 0, recs
    chains = [r for r in recs if r["type"] == "chain"]
    for c in chains:
        assert c["complete"], c
        assert files_of(Path(c["path"])) == original[c["chain"]], f"{c['chain']} listed but not whole"
    code, recs = run_restore("--backup-path", str(root), "--list")
    assert code == 0 and recs[0]["chains_broken"] == 0, recs
    return [c["chain"] for c in chains]


def spawn(root: Path, etc: Path, hook: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "VMBK_CONFIG_DIR": str(etc), "PYTHONPATH": str(ROOT), "VMBK_TEST_ROTATE_HOOK": hook}
    return subprocess.Popen([sys.executable, str(ROOT / "bin" / "vmbk-rotate"), "--json", "--backup-path", str(root),
                             "--vm", VM, "--now", NOW], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def wait_paused(p: subprocess.Popen[bytes], timeout: float = 60) -> None:
    assert p.stderr is not None
    os.set_blocking(p.stderr.fileno(), False)
    seen = b""
    deadline = time.monotonic() + timeout
    while b"paused at" not in seen:
        assert p.poll() is None, (p.returncode, seen)
        assert time.monotonic() < deadline, seen
        seen += p.stderr.read() or b""
        time.sleep(0.02)


@pytest.mark.parametrize("round_", range(len(HOOKS) + 3))
def test_kill_9_mid_deletion_then_the_next_run_finishes(round_: int, tmp_path: Path) -> None:
    seed = int(os.environ.get("VMBK_KILL_SEED") or random.randrange(1 << 30)) + round_
    rng = random.Random(seed)
    print(f"VMBK_KILL_SEED={seed - round_} (round {round_})")
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "default.toml").write_text('policy = "daily"\n[retention]\ndaily = 3\n')
    root = tmp_path / "backup"
    materialise(root, VM, "6f1c2a3e-0000-4000-8000-000000000001", tree())
    vm_dir = root / VM
    original = {}
    for c in [*vm_dir.iterdir(), *vm_dir.glob("*/.archives/*")]:
        original[str(c.relative_to(vm_dir))] = files_of(c)
    assert len(check_listings(root, original)) == 9

    hook = HOOKS[round_ % len(HOOKS)].format(n=rng.randrange(1, 400))
    p = spawn(root, etc, hook)
    try:
        if hook.startswith("pause:"):
            wait_paused(p)
            hidden = list(vm_dir.glob(".deleting-*"))
            assert len(hidden) == 1, hidden  # stopped in the middle of one deletion
            listed = check_listings(root, original)
            assert hidden[0].name.removeprefix(".deleting-") not in listed
        else:  # once the first deletion has begun, a random moment of the (slowed) removals
            deadline = time.monotonic() + 60
            while not list(vm_dir.glob(".deleting-*")):
                assert p.poll() is None and time.monotonic() < deadline, p.returncode
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 1.5))
        p.send_signal(signal.SIGKILL)
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    left = [h.name.removeprefix(".deleting-") for h in vm_dir.glob(".deleting-*")]
    assert left or hook.startswith("slow:"), hook  # a pause is always in the middle of one
    assert not set(left) & set(check_listings(root, original))

    out = subprocess.run([sys.executable, str(ROOT / "bin" / "vmbk-rotate"), "--json", "--backup-path", str(root),
                          "--vm", VM, "--now", NOW], capture_output=True,
                         env={**os.environ, "VMBK_CONFIG_DIR": str(etc), "PYTHONPATH": str(ROOT)}, timeout=120)
    assert out.returncode == 0, out.stderr.decode()
    (rec,) = [orjson.loads(line) for line in out.stdout.splitlines()]
    assert sorted(p.name for p in vm_dir.iterdir()) == KEPT
    assert check_listings(root, original) == KEPT
    db = sqlite3.connect(db_path(root))
    try:
        events = db.execute("SELECT target_path, success FROM retention_events WHERE action = 'delete'").fetchall()
        assert {t for t, ok in events if ok == 1} == {"20260401", "20260402", "20260403"}, (hook, events, rec)
        assert all(ok in (0, 1) for _, ok in events)
        tombs = dict(db.execute("SELECT chain, status FROM deleted_chains").fetchall())
        assert set(tombs) == {"20260401", "20260401/.archives/chain-2026-04-01", "20260402",
                              "20260402/.archives/chain-2026-04-02", "20260402/.archives/chain-2026-04-02.1",
                              "20260403"}, (hook, tombs)
        assert set(tombs.values()) == {"deleted"}, (hook, tombs)
    finally:
        db.close()
