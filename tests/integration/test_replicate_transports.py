"""One conformance suite, run against every real transport (STYLE 8).

local (rsync to a directory), ssh (rsync over the test sshd), append-only
(ssh to a write-only key whose forced command is ``vmbk-replicate
--receive``), and rclone to a ``local``, an ``sftp`` (that sshd) and a
``crypt`` remote (over that sftp).  Each test drives the `Transport`
interface the way `vmbk.replicate.push` does and checks the replica with
the transport's own listing, and, where the files are plain, directly.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from fixtures.replication import receive_command
from replicate_helpers import ROOT, copiers, synthetic_tree

from vmbk.errors import StorageError, UsageError
from vmbk.replicate import files
from vmbk.replicate.destinations import open_transport
from vmbk.replicate.plan import VmPlan, plan_vm
from vmbk.replicate.transport import ReplicaFull, ToolFailed, Transport, Unreachable
from vmbk.settings import Replication

KINDS = ["local", "ssh", "append-only", "rclone-local", "rclone-sftp", "rclone-crypt"]
VM = "web"


@dataclasses.dataclass
class Replica:
    kind: str
    t: Transport
    dest: Replication
    #: The replica's files as plain files here (None: encrypted, crypt).
    far: Path | None
    #: crypt: a name in the directory of its encrypted files.
    store: Path | None = None


def make_replica(request: pytest.FixtureRequest, kind: str, base: Path, work: Path, **more: object) -> Replica:
    far = base / "far"
    far.mkdir(exist_ok=True)
    if kind == "local":
        d: dict[str, object] = {"name": "t", "transport": "local", "path": str(far)}
    elif kind == "ssh":
        d = request.getfixturevalue("sshd").destination("t", far)
    elif kind == "append-only":
        sshd = request.getfixturevalue("sshd")
        key = sshd.key("append-only", receive_command(far))
        d = sshd.destination("t", Path("/"), key=key, sync_mode="append-only")
    else:
        remotes = request.getfixturevalue("rclone_remotes")
        remote = kind.split("-", 1)[1] + ":"
        d = remotes.destination("t", remote, base.name if remote == "crypt:" else str(far))
    dest = Replication(**{**d, **more})  # type: ignore[arg-type]
    work.mkdir(exist_ok=True)
    t = open_transport(dest, work)
    request.addfinalizer(t.close)  # an ssh transport's master connection
    if kind == "rclone-crypt":
        store = request.getfixturevalue("rclone_remotes").crypt_store / "x"  # (its names are encrypted)
        return Replica(kind, t, dest, None, store)
    return Replica(kind, t, dest, far)


@pytest.fixture(params=KINDS)
def replica(request: pytest.FixtureRequest, replica_dirs: Path, tmp_path: Path) -> Replica:
    return make_replica(request, request.param, replica_dirs, tmp_path / "work")


def push(r: Replica, src: Path, vm: str = VM) -> None:
    """What push.py does for one VM, without the locks and records."""
    plan = plan_vm(vm, files.walk(src, vm), r.t.listing([vm]), r.dest.sync_mode, r.t.tolerance)
    assert not plan.problems, plan.problems
    if plan.moves:
        r.t.move(plan.moves)
    if plan.retract:
        r.t.remove(plan.retract, [])
    r.t.send(src, [(plan.new[p], plan.updates[p]) for p in files.PHASES if plan.new[p] or plan.updates[p]])
    if plan.deletes or plan.emptied:
        r.t.remove(plan.deletes, plan.emptied)


def replan(r: Replica, src: Path) -> VmPlan:
    return plan_vm(VM, files.walk(src, VM), r.t.listing([VM]), r.dest.sync_mode, r.t.tolerance)


def same_as_source(r: Replica, src: Path) -> None:
    mine = files.walk(src, VM)
    theirs = r.t.listing([VM])
    assert set(theirs) == set(mine)
    for rel, e in mine.items():
        assert theirs[rel].size == e.size, rel
        assert abs(theirs[rel].mtime - e.mtime) <= r.t.tolerance, (rel, theirs[rel].mtime, e.mtime)


def _flip(path: Path) -> None:
    """One byte changed, size and time kept (flipped again: as it was)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    st = path.stat()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_replica_through_its_whole_life(replica: Replica, tmp_path: Path) -> None:
    """First copy, nothing to do, an incremental, a chain archived at the
    source, a file damaged on the replica, a pull, deletion."""
    src = tmp_path / "src"
    chain = synthetic_tree(src, VM, points=2)
    before = set(replica.store.parent.iterdir()) if replica.store is not None else set()
    space = replica.t.space()
    assert space.free is None or space.free > 0

    # the first copy keeps names, sizes, times and the secrets' modes
    push(replica, src)
    same_as_source(replica, src)
    if replica.far is not None and not replica.kind.startswith("rclone"):
        assert (replica.far / "web/202603/tpm-state/tpm2/tpm2-00.permall").stat().st_mode & 0o777 == 0o600
    again = replan(replica, src)
    assert again.files == 0 and not again.moves and not again.deletes

    # an incremental: its two files and the longer .cpt, nothing else
    (chain / "vda.inc.virtnbdbackup.2.data").write_bytes(os.urandom(1000))
    (chain / "vda.inc.virtnbdbackup.2.data.chksum").write_bytes(b"3")
    (chain / "web.cpt").write_bytes(orjson.dumps(["virtnbdbackup.0", "virtnbdbackup.1", "virtnbdbackup.2"]))
    plan = replan(replica, src)
    assert sorted(plan.new[files.DATA]) == ["web/202603/vda.inc.virtnbdbackup.2.data",
                                            "web/202603/vda.inc.virtnbdbackup.2.data.chksum"]
    assert plan.updates[files.CPT] == ["web/202603/web.cpt"] and plan.files == 3
    push(replica, src)
    same_as_source(replica, src)
    if replica.far is not None:
        assert orjson.loads((replica.far / "web/202603/web.cpt").read_bytes())[-1] == "virtnbdbackup.2"

    # the source archives the chain: the replica renames, copies nothing
    archive = chain / ".archives" / "chain-2026-03-09"
    archive.mkdir(parents=True)
    for entry in list(chain.iterdir()):
        if entry.name != ".archives":
            entry.rename(archive / entry.name)
    plan = replan(replica, src)
    assert len(plan.moves) == len(files.walk(src, VM)) and plan.files == 0
    push(replica, src)
    same_as_source(replica, src)

    # content compared: the same, then one file damaged on the replica
    rels = sorted(files.walk(src, VM))
    assert replica.t.mismatches(src, rels) == []
    full = "web/202603/.archives/chain-2026-03-09/vda.full.data"
    if replica.far is not None:
        damaged = replica.far / full
    else:  # crypt: the one encrypted file bigger than the plain one, in this test's directory
        assert replica.store is not None
        (mine,) = set(replica.store.parent.iterdir()) - before
        (damaged,) = [p for p in mine.rglob("*") if p.is_file() and p.stat().st_size > (1 << 20)]
    _flip(damaged)
    assert replica.t.mismatches(src, rels) == [full]
    _flip(damaged)

    # back the other way, phase by phase
    back = tmp_path / "back"
    back.mkdir()
    if not replica.t.readable:
        with pytest.raises(UsageError, match="append-only"):
            replica.t.fetch(rels, back)
    else:
        for p in files.PHASES:
            replica.t.fetch([r for r in rels if files.phase(r) == p], back)
        for rel in rels:
            assert (back / rel).read_bytes() == (src / rel).read_bytes(), rel
            assert abs((back / rel).stat().st_mtime - (src / rel).stat().st_mtime) <= replica.t.tolerance
        assert replica.t.mismatches(back, rels) == []

    # deletion, and the directories it empties
    if replica.kind == "append-only":
        with pytest.raises(ToolFailed, match="never deletes"):
            replica.t.remove(rels, [])
        return
    dirs = sorted({r.rsplit("/", i)[0] for r in rels for i in range(1, r.count("/") + 1)}, key=lambda d: -d.count("/"))
    replica.t.remove(rels, dirs)
    assert replica.t.listing([VM]) == {}
    if replica.far is not None:
        assert not (replica.far / "web").exists()


@pytest.mark.parametrize("kind", ["local", "ssh", "append-only", "rclone-sftp", "rclone-crypt"])
def test_an_unreachable_destination_is_a_storage_error(kind: str, request: pytest.FixtureRequest,
                                                       replica_dirs: Path, tmp_path: Path) -> None:
    more: dict[str, object] = {"port": 9}  # nothing listens there
    if kind == "local":
        more = {"path": str(replica_dirs / "not-mounted")}
    elif kind.startswith("rclone"):
        bad = tmp_path / "rclone.conf"
        good = request.getfixturevalue("rclone_remotes").config
        bad.write_text(good.read_text().replace(f"port = {request.getfixturevalue('sshd').port}", "port = 9"))
        more = {"rclone_config": str(bad)}
    r = make_replica(request, kind, replica_dirs, tmp_path / "work", **more)
    with pytest.raises(Unreachable):
        r.t.space()
        r.t.listing()


KILLED_SEND = """
import sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from vmbk.replicate.destinations import open_transport
from vmbk.settings import Replication
t = open_transport(Replication(**{dest!r}), Path({work!r}))
print("go", flush=True)
t.send(Path({src!r}), {rels!r})
"""


@pytest.mark.parametrize("kind", ["local", "ssh", "append-only", "rclone-sftp", "rclone-crypt"])
def test_a_send_killed_midway_leaves_no_file_under_its_name(kind: str, request: pytest.FixtureRequest,
                                                           replica_dirs: Path, tmp_path: Path) -> None:
    """kill -9 of the process that drives the copier (vmbk-replicate): the copier
    dies with it (pdeathsig) and the replica has the file whole or not at all."""
    r = make_replica(request, kind, replica_dirs, tmp_path / "work", bwlimit_kbps=2048)
    src = tmp_path / "src"
    synthetic_tree(src, VM, data_mib=16)
    rel = "web/202603/vda.full.data"
    dest = {k: v for k, v in dataclasses.asdict(r.dest).items() if v is not None}
    dest["exclude_vms"] = list(dest["exclude_vms"])
    script = KILLED_SEND.format(root=str(ROOT), dest=dest, work=str(tmp_path / "work"), src=str(src), rels=[rel])
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert p.stdout is not None and p.stdout.readline() == b"go\n"
    time.sleep(2.5)  # about 5 MiB of 16 are on their way
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    deadline = time.monotonic() + 20
    while copiers(str(tmp_path)):
        assert time.monotonic() < deadline, "the copier outlived vmbk"
        time.sleep(0.1)
    listing = r.t.listing([VM])
    assert rel not in listing or listing[rel].size == (src / rel).stat().st_size
    assert rel not in listing, "16 MiB at 2 MiB/s cannot have arrived"


def test_space_and_full_are_told_apart(tmp_path: Path) -> None:
    """A full far side is `ReplicaFull` (exit 4), not a tool failure (6)."""
    from vmbk.replicate.transport import classify

    assert isinstance(classify("copy", "rsync", 11, "rsync: write failed: No space left on device (28)"), ReplicaFull)
    assert isinstance(classify("copy", "rsync", 255, "ssh: connect to host x port 22: Connection refused"),
                      Unreachable)
    assert isinstance(classify("copy", "rsync", 12, "rrsync error: option --delete has been disabled on this server"),
                      ToolFailed)
    assert isinstance(classify("copy", "rclone", 1, "Failed to copy: 403 Forbidden"), ToolFailed)
    assert issubclass(ReplicaFull, StorageError) and issubclass(Unreachable, StorageError)
