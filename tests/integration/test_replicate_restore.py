"""Replicas restore: every point of a VM, from every kind of replica, byte for byte.

A VM with a full and two incrementals is replicated to four destinations
in one run (a local directory, ssh, rclone sftp, rclone crypt over that
sftp); then the VM is shut off and the next backup, an offline copy,
archives the chain at the source, and the second run renames it on every
replica instead of copying it again.  Each replica is then read the way
a recovery host would: the local and ssh ones where they lie (mounted),
the ssh, sftp and crypt ones pulled back with ``--pull``; in each, the
listing shows every point complete and every point restores to the disk
as it was at its backup (``qemu-img compare``).
"""

from __future__ import annotations

import io
from pathlib import Path

import orjson
import pytest
from backup_helpers import backup_ok
from replicate_helpers import configure, only, points, reference, replicate, restore_point, same_disk, vm_with_points

from vmbk.commands.restore import main as restore_main

pytestmark = pytest.mark.libvirt
MiB = 1 << 20


def test_every_point_restores_from_every_kind_of_replica(nos_domain, vm_workdir, sshd, rclone_remotes, replica_dirs,
                                                       tmp_path):
    nd, root, first, refs = vm_with_points(nos_domain, vm_workdir, tmp_path, [(0x22, 4, "2M"), (0x33, 9, "2M")])
    period = Path(first["target_dir"]).name

    far = {name: replica_dirs / name for name in ("local", "ssh", "sftp")}
    for d in far.values():
        d.mkdir()
    cfg = configure(tmp_path / "etc", [
        {"name": "local", "transport": "local", "path": str(far["local"]), "verify": "checksum"},
        sshd.destination("ssh", far["ssh"], verify="checksum"),
        rclone_remotes.destination("sftp", "sftp:", str(far["sftp"]), verify="size"),
        rclone_remotes.destination("crypt", "crypt:", replica_dirs.name, verify="checksum", replicate_secrets=False),
    ])
    code, recs = replicate(cfg, root, "--all")
    assert code == 0, recs
    assert [(r["destination"], r["outcome"], r["deleted"]) for r in only(recs, "replicate")] == [
        ("local", "ok", 0), ("ssh", "ok", 0), ("sftp", "ok", 0), ("crypt", "ok", 0)]
    files = only(recs, "replicate")[0]["files"]

    nd.dom.destroy()  # shut off: the next backup is an offline copy and archives the chain
    copy = backup_ok(root, nd.name)
    assert copy["action"] == "copy" and [e["event"] for e in copy["events"]] == ["archived"]
    ref_copy = reference(nd.disks[0], tmp_path / "copy.raw")
    archived = [p for p in (root / nd.name / period / ".archives").rglob("*") if p.is_file()]
    code, recs = replicate(cfg, root, "--all")
    assert code == 0, recs
    for r in only(recs, "replicate"):
        assert r["moved"] == len(archived), r  # the archived chain renamed on the replica, not sent again
        assert r["verified"] > files and r["mismatches"] == []

    assert (root / "_state" / "locks").is_dir()
    for d in (far["local"], far["ssh"]):  # the catalogue's snapshot, never the locks or the WAL
        assert sorted(p.name for p in (d / "_state").iterdir()) == ["vmbk.db"]
    trees = {"local (mounted)": far["local"], "ssh (mounted)": far["ssh"]}
    for dest in ("ssh", "sftp", "crypt"):
        to = tmp_path / f"pulled-{dest}"
        code, recs = replicate(cfg, root, "--pull", "--dest", dest, "--vm", nd.name, "--to", str(to))
        (rec,) = recs
        assert code == 0 and rec["action"] == "pull" and rec["verify"] == "checksum", recs
        trees[f"{dest} (pulled)"] = to

    for i, (kind, tree) in enumerate(trees.items()):
        listed = points(tree, nd.name)
        assert len(listed) == 4 and all(p["complete"] for p in listed), (kind, listed)
        (archive,) = (tree / nd.name / period / ".archives").iterdir()
        for n, ref in enumerate(refs):
            image = restore_point(archive, n, tmp_path / f"r{i}-{n}")
            assert same_disk(image, ref), f"{kind}: point {n}"
        image = restore_point(tree / nd.name / period, 0, tmp_path / f"r{i}-copy")
        assert same_disk(image, ref_copy), f"{kind}: the copy"

    # a replica carries the catalogue's snapshot: the listing has the history, read-only
    out = io.StringIO()
    assert restore_main(["--json", "--backup-path", str(far["local"]), "--list"], io.StringIO(""), out) == 0
    (vm,) = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert vm["catalogue"]["last_outcome"] == "ok" and vm["restore_points"] == 1 and vm["archived_chains"] == 1
