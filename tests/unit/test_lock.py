"""The per-VM lock: exclusion, stale takeover, names that are data."""

import os
import subprocess
import sys

import pytest

from vmbk.errors import Exit, LockError
from vmbk.lock import VmLock, lock_path


def test_lock_excludes_a_second_holder_and_is_released(tmp_path):
    with VmLock(tmp_path, "web") as held:
        assert held.path.read_text().split("\n")[0] == str(os.getpid())
        with pytest.raises(LockError) as e:
            VmLock(tmp_path, "web").acquire()
        assert e.value.code == Exit.LOCK and "web" in str(e.value)
        VmLock(tmp_path, "other").acquire().release()  # other VMs are free
    assert not held.path.exists()
    VmLock(tmp_path, "web").acquire().release()


def test_conflict_with_another_process(tmp_path):
    code = (
        "import sys,time; from pathlib import Path; from vmbk.lock import VmLock\n"
        "l = VmLock(Path(sys.argv[1]), 'web').acquire(); print('held', flush=True); time.sleep(30)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline() == b"held\n"
        with pytest.raises(LockError, match=f"process {p.pid}"):
            VmLock(tmp_path, "web").acquire()
    finally:
        p.kill()
        p.wait()
    # the holder died without releasing: the lock is stale and taken over
    lock = VmLock(tmp_path, "web").acquire()
    assert lock.took_over_stale == p.pid
    lock.release()


def test_stale_lock_of_a_bash_tool_with_a_dead_pid(tmp_path):
    p = subprocess.Popen(["true"])
    p.wait()
    path = lock_path(tmp_path, "web")
    path.parent.mkdir(parents=True)
    path.write_text(f"{p.pid}\n")
    with VmLock(tmp_path, "web") as lock:
        assert lock.took_over_stale == p.pid


def test_live_vmbackup_holding_the_lock_is_respected(tmp_path):
    # A bash vmbackup holds no flock: only its PID (a live process whose
    # command line names vmbackup) says the lock is taken.
    p = subprocess.Popen(["bash", "-c", "exec -a vmbackup.sh sleep 30"])
    try:
        path = lock_path(tmp_path, "web")
        path.parent.mkdir(parents=True)
        path.write_text(f"{p.pid}\n")
        import time
        time.sleep(0.1)
        with pytest.raises(LockError):
            VmLock(tmp_path, "web").acquire()
        assert path.read_text() == f"{p.pid}\n"  # not touched
    finally:
        p.kill()
        p.wait()


def test_pid_reused_by_an_unrelated_program_is_stale(tmp_path):
    p = subprocess.Popen(["sleep", "30"])
    try:
        path = lock_path(tmp_path, "web")
        path.parent.mkdir(parents=True)
        path.write_text(f"{p.pid}\n")
        with VmLock(tmp_path, "web") as lock:
            assert lock.took_over_stale == p.pid
    finally:
        p.kill()
        p.wait()


@pytest.mark.parametrize("name", ["a b", "it's", "..", "../../etc", "ü-vm", "a/b", "%2F"])
def test_names_are_data(tmp_path, name):
    path = lock_path(tmp_path, name)
    assert path.parent == tmp_path / "_state" / "locks"
    with VmLock(tmp_path, name):
        assert path.exists()
    assert lock_path(tmp_path, "a/b") != lock_path(tmp_path, "a%2Fb")
