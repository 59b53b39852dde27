"""What goes wrong on the way to a replica, and what vmbk-replicate says.

The far host going away mid-run (sshd and its sessions killed), a key the
far side does not accept, a replica file system that fills up (a small
tmpfs, locally and behind ssh), a file damaged on the replica that
``--verify-only`` finds, and a mirror that refuses to empty a replica
from a source that looks unmounted.  Each is an ``error`` record per VM
and destination with the exit status of the table (4: unreachable, full,
damaged, refused), the other destinations go on, and a replica is never
left claiming more than it has.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from replicate_helpers import configure, only, replicate, replicate_process, synthetic_tree

from vmbk.replicate import files


@pytest.fixture
def tiny_fs(replica_dirs: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs: too small for a 16 MiB tree."""
    mnt = replica_dirs / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0755", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def errors(recs: list[dict]) -> list[tuple[str | None, str | None, int]]:
    return [(r["vm"], r.get("destination"), r["code"]) for r in only(recs, "error")]


def test_the_far_host_going_away_mid_run_fails_that_destination_only(sshd, replica_dirs, tmp_path):
    root = tmp_path / "src"
    for vm in ("a", "b", "c"):
        synthetic_tree(root, vm, data_mib=6)
    (replica_dirs / "ssh").mkdir()
    (replica_dirs / "local").mkdir()
    cfg = configure(tmp_path / "etc", [sshd.destination("far", replica_dirs / "ssh", bwlimit_kbps=4096),
                                       {"name": "near", "transport": "local", "path": str(replica_dirs / "local")}])
    p = replicate_process(cfg, root, "--all")
    deadline = time.monotonic() + 30
    while not any(n.name.startswith(".vda") for n in (replica_dirs / "ssh").rglob(".*")):
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.05)
    sshd.stop()  # the host is gone, its sessions with it
    try:
        out, err = p.communicate(timeout=120)
    finally:
        sshd.start()
    recs = [__import__("orjson").loads(line) for line in out.splitlines()]
    assert p.returncode == 9, err  # the local destination made it: partial
    assert errors(recs) == [("a", "far", 4), ("b", "far", 4), ("c", "far", 4)]
    assert "unreachable" in only(recs, "error")[0]["message"]
    assert [(r["vm"], r["destination"]) for r in only(recs, "replicate")] == [("a", "near"), ("b", "near"),
                                                                            ("c", "near")]
    assert not list((replica_dirs / "ssh").rglob("*.cpt"))  # nothing there claims a point
    cfg = configure(tmp_path / "etc2", [sshd.destination("far", replica_dirs / "ssh")])
    code, recs = replicate(cfg, root, "--all", "--dest", "far")
    assert code == 0 and len(only(recs, "replicate")) == 3, [r.get("message") for r in recs]


def test_a_key_the_far_side_refuses_is_unreachable(sshd, replica_dirs, tmp_path):
    from fixtures.replication import keygen

    root = tmp_path / "src"
    synthetic_tree(root, "a")
    stranger = keygen(tmp_path / "stranger")
    cfg = configure(tmp_path / "etc", [sshd.destination("far", replica_dirs, key=stranger)])
    code, recs = replicate(cfg, root, "--all")
    assert code == 4 and errors(recs) == [("a", "far", 4)]
    assert "Permission denied (publickey" in recs[0]["message"]


@pytest.mark.parametrize("transport", ["local", "ssh"])
def test_a_full_replica_is_skipped_or_fails_and_shows_no_point(transport, tiny_fs, sshd, tmp_path):
    root = tmp_path / "src"
    synthetic_tree(root, "a", data_mib=16)
    dest = ({"name": "tiny", "transport": "local", "path": str(tiny_fs)} if transport == "local"
            else sshd.destination("tiny", tiny_fs))
    # the space check sees it first ("skip": the destination is not written)
    code, recs = replicate(configure(tmp_path / "etc", [dest]), root, "--all")
    assert code == 4 and errors(recs) == [("a", "tiny", 4)] and "not enough space" in recs[0]["message"]
    assert not any(tiny_fs.iterdir())
    # without it, the copy runs into the full file system
    cfg = configure(tmp_path / "etc2", [dest], replicate={"space_check": "disabled"})
    code, recs = replicate(cfg, root, "--all")
    assert code == 4 and errors(recs) == [("a", "tiny", 4)], recs
    assert "full" in recs[0]["message"] and recs[0]["message"].count("No space left") >= 1
    assert files.walk(tiny_fs, "a") == {}  # (rsync's partial file stays in its hidden partial directory)


def test_verify_only_finds_a_file_damaged_on_the_replica(replica_dirs, tmp_path):
    root = tmp_path / "src"
    synthetic_tree(root, "a")
    synthetic_tree(root, "b")
    cfg = configure(tmp_path / "etc", [{"name": "near", "transport": "local", "path": str(replica_dirs),
                                        "verify": "size"}])
    assert replicate(cfg, root, "--all")[0] == 0
    code, recs = replicate(cfg, root, "--verify-only", "--dest", "near")
    assert code == 0 and [(r["vm"], r["action"], r["verify"]) for r in recs] == [
        ("a", "verify", "checksum"), ("b", "verify", "checksum")]
    damaged = replica_dirs / "b/202603/vda.full.data"
    data = bytearray(damaged.read_bytes())
    data[12345] ^= 1
    st = damaged.stat()
    damaged.write_bytes(bytes(data))
    os.utime(damaged, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same time: only the content tells
    assert replicate(cfg, root, "--verify-only", "--verify", "size")[0] == 0
    code, recs = replicate(cfg, root, "--verify-only", "--dest", "near")
    assert code == 9 and errors(recs) == [("b", "near", 4)]
    assert "b/202603/vda.full.data" in recs[1]["message"]


def test_mirror_refuses_a_source_that_looks_unmounted_or_emptied(replica_dirs, tmp_path):
    root = tmp_path / "src"
    for vm in ("a", "b", "c"):
        synthetic_tree(root, vm)
    cfg = configure(tmp_path / "etc", [{"name": "m", "transport": "local", "path": str(replica_dirs)}])
    assert replicate(cfg, root, "--all")[0] == 0
    before = files.walk(replica_dirs, "a") | files.walk(replica_dirs, "b")

    empty = tmp_path / "not-mounted"
    empty.mkdir()
    code, recs = replicate(cfg, empty, "--all")
    assert code == 4 and {r["vm"] for r in recs} == {"a", "b", "c"}
    assert "no VM directories" in recs[0]["message"]

    shutil.rmtree(root / "a")
    shutil.rmtree(root / "b")  # two VMs of three gone: more than max_delete_percent (50) of the replica
    code, recs = replicate(cfg, root, "--all")
    assert code == 4 and "max_delete_percent" in recs[0]["message"]
    assert files.walk(replica_dirs, "a") | files.walk(replica_dirs, "b") == before

    cfg = configure(tmp_path / "etc2", [{"name": "m", "transport": "local", "path": str(replica_dirs),
                                         "max_delete_percent": 80}])
    code, recs = replicate(cfg, root, "--all")
    assert code == 0 and [(r["vm"], r["deleted"] > 0) for r in only(recs, "replicate")] == [
        ("a", True), ("b", True), ("c", False)]
    assert not (replica_dirs / "a").exists() and (replica_dirs / "c").is_dir()
