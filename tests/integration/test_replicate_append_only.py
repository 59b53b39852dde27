"""An append-only copy a compromised host cannot destroy (sync_mode = "append-only").

The far side's key runs ``vmbk-replicate --receive DIR`` as its forced
command (rrsync ``-wo -no-del -no-overwrite`` underneath).  Through that
key -- all a ransomware on the host has -- an overwrite, a ``--delete``, a
shell command, sftp and a staged change that would lose data all fail and
leave the copy as it was; meanwhile vmbk-replicate keeps adding new
points (the far side applies the longer ``.cpt`` itself), follows a chain
archived at the source by renames, and every point restores from the far
side byte for byte.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import orjson
import pytest
from backup_helpers import backup_ok
from fixtures.replication import receive_command
from replicate_helpers import (configure, only, points, qemu_write, reference, replicate, restore_point, same_disk,
                               vm_with_points)

from vmbk.replicate.receive import INCOMING, MANIFEST

pytestmark = pytest.mark.libvirt
MiB = 1 << 20


def test_through_the_key_nothing_is_overwritten_or_deleted_while_new_points_arrive_and_restore(
        nos_domain, vm_workdir, sshd, replica_dirs, tmp_path):
    far = replica_dirs / "far"
    far.mkdir()
    key = sshd.key("append-only", receive_command(far))
    dest = sshd.destination("vault", Path("/"), key=key, sync_mode="append-only", verify="checksum")
    cfg = configure(tmp_path / "etc", [dest])
    ssh = ["ssh", "-p", str(sshd.port), "-i", str(key), "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
           "-o", f"UserKnownHostsFile={sshd.known_hosts}"]

    nd, root, first, refs = vm_with_points(nos_domain, vm_workdir, tmp_path, [(0x22, 3, "1M")])
    code, recs = replicate(cfg, root, "--all")
    (rec,) = only(recs, "replicate")
    assert code == 0 and rec["sync_mode"] == "append-only" and rec["mismatches"] == [], recs
    chain = far / nd.name / Path(first["target_dir"]).name
    full = chain / "vda.full.data"
    before = full.read_bytes()
    assert [p["complete"] for p in points(far, nd.name)] == [True, True]

    # -- the attacks, all through the key ------------------------------------------
    evil = tmp_path / "evil"
    (evil / nd.name / chain.name).mkdir(parents=True)
    (evil / nd.name / chain.name / "vda.full.data").write_bytes(b"encrypted by ransomware" * 1000)
    rsh = shlex.join(ssh)
    target = "root@127.0.0.1:/"
    r = subprocess.run(["rsync", "-a", "-e", rsh, f"{evil}/", target], capture_output=True, text=True)
    assert full.read_bytes() == before, "an overwrite went through"
    r = subprocess.run(["rsync", "-a", "--inplace", "-e", rsh, f"{evil}/", target], capture_output=True, text=True)
    assert full.read_bytes() == before, "an in-place overwrite went through"
    r = subprocess.run(["rsync", "-a", "-r", "--delete", "-e", rsh, f"{tmp_path / 'empty'}/", target],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "disabled" in r.stderr and full.exists()
    r = subprocess.run([*ssh, "root@127.0.0.1", f"rm -rf {shlex.quote(str(far))}"], capture_output=True, text=True)
    assert r.returncode != 0 and "refused" in r.stderr and full.exists()
    r = subprocess.run(["sftp", "-b", "-", "-P", str(sshd.port), "-i", str(key), "-o", "BatchMode=yes",
                        "-o", f"UserKnownHostsFile={sshd.known_hosts}", "root@127.0.0.1"],
                       input=f"rm {full}\n", capture_output=True, text=True)
    assert r.returncode != 0 and full.exists()
    r = subprocess.run([*ssh, "root@127.0.0.1", "rsync --server --sender -vlogDtpre.iLsfxCIvu . /"],
                       capture_output=True, text=True)
    assert r.returncode != 0, "the copy can be read back through the key"
    cpt = next(chain.glob("*.cpt"))
    listed = cpt.read_bytes()
    for bad in ({"updates": [[str(cpt.relative_to(far)), 2]], "file": b"[]"},  # a shorter checkpoint list
                {"moves": [[str(full.relative_to(far)), f"{nd.name}/gone.data"]]}):  # a move out of the chain
        staged = tmp_path / "staged" / INCOMING / "0-evil"
        if "file" in bad:
            (staged / "files" / cpt.relative_to(far)).parent.mkdir(parents=True)
            (staged / "files" / cpt.relative_to(far)).write_bytes(bad.pop("file"))
        staged.mkdir(parents=True, exist_ok=True)
        (staged / MANIFEST).write_text(json.dumps(bad))
        r = subprocess.run(["rsync", "-a", "-e", rsh, f"{tmp_path / 'staged'}/", target], capture_output=True,
                           text=True)
        assert r.returncode != 0 and "refused" in r.stderr, r.stderr
        subprocess.run(["rm", "-rf", str(tmp_path / "staged")], check=True)
    assert cpt.read_bytes() == listed and full.read_bytes() == before
    assert [p["complete"] for p in points(far, nd.name)] == [True, True]

    # -- new points still arrive, and restore --------------------------------------
    qemu_write(nd.dom, 0x33, 7, "2M")
    backup_ok(root, nd.name)
    refs.append(reference(nd.disks[0], tmp_path / "p2.raw"))
    nd.dom.destroy()
    copy = backup_ok(root, nd.name)  # an offline copy: the chain is archived at the source
    assert copy["action"] == "copy"
    ref_copy = reference(nd.disks[0], tmp_path / "copy.raw")
    code, recs = replicate(cfg, root, "--all")
    (rec,) = only(recs, "replicate")
    assert code == 0 and rec["moved"] > 0 and rec["deleted"] == 0, recs
    assert orjson.loads(next((chain / ".archives").glob("*/*.cpt")).read_bytes())[-1] == "virtnbdbackup.2"
    assert [p["complete"] for p in points(far, nd.name)] == [True, True, True, True]
    (archive,) = (chain / ".archives").iterdir()
    for n, ref in enumerate(refs):
        assert same_disk(restore_point(archive, n, tmp_path / f"r{n}"), ref), n
    assert same_disk(restore_point(chain, 0, tmp_path / "rc"), ref_copy)

    code, recs = replicate(cfg, root, "--verify-only")
    assert code == 0 and only(recs, "replicate")[0]["verified"] > 0, recs
    code, recs = replicate(cfg, root, "--pull", "--dest", "vault", "--vm", nd.name, "--to", str(tmp_path / "back"))
    assert code == 7 and recs == []  # write-only from here: pull on the far side, or with a read key
