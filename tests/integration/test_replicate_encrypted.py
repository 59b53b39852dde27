"""Encrypted replicas (issue #16): every file an age file, pulled back with an identity.

A real chain (full + incremental of a no-OS domain) goes to a local
destination encrypted to an age recipient: nothing arrives in clear, the
``age`` CLI opens what is there, a second run copies nothing (sizes and
times still compare through the encryption), a pull with the wrong
identity fails before it writes anything, a pull with the right one
brings back the tree byte for byte and it verifies (its manifests are
good) and restores.  A destination encrypted with a passphrase file
does the same round trip without an identity.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
from backup_helpers import backup_ok, run_restore, tree_files
from replicate_helpers import configure, replicate

from vmbk.replicate import age

pytestmark = pytest.mark.libvirt


def test_encrypted_push_and_pull(nos_domain, vm_workdir, replica_dirs, tmp_path):
    nd = nos_domain(size="8M", writes=[(0x41, 0, 1 << 20)])
    root = vm_workdir / "backups"
    root.mkdir()
    backup_ok(root, nd.name, "--now", "2026-11-16T01:30:00+00:00")
    backup_ok(root, nd.name, "--now", "2026-11-16T02:30:00+00:00")
    ident, rec = age.generate_identity()
    key = tmp_path / "key.txt"
    key.write_text(ident + "\n")
    replica = replica_dirs / "enc"
    replica.mkdir()
    cfg = configure(tmp_path / "etc", [{"name": "enc", "transport": "local", "path": str(replica),
                                        "encrypt": {"recipients": [rec]}}])
    code, recs = replicate(cfg, root, "--all")
    assert code == 0 and recs[0]["outcome"] == "ok" and recs[0]["files"] > 8, recs
    there = [p for p in replica.rglob("*") if p.is_file()]
    assert there and all(p.name.endswith(".age") for p in there), there
    cpt = next(replica.rglob("*.cpt.age"))
    plain = subprocess.run(["age", "-d", "-i", str(key), str(cpt)], capture_output=True, check=True).stdout
    assert plain == (root / cpt.relative_to(replica).with_suffix("")).read_bytes()
    code, recs = replicate(cfg, root, "--all")
    assert code == 0 and recs[0]["files"] == 0, recs  # nothing changed: nothing sent

    wrong, _ = age.generate_identity()
    (tmp_path / "wrong.txt").write_text(wrong + "\n")
    to = tmp_path / "pulled-wrong"
    code, recs = replicate(cfg, root, "--pull", "--dest", "enc", "--vm", nd.name, "--to", str(to),
                           "--identity", str(tmp_path / "wrong.txt"))
    assert code != 0 and "does not decrypt" in recs[-1]["message"] and not to.exists(), recs

    to = tmp_path / "pulled"
    code, recs = replicate(cfg, root, "--pull", "--dest", "enc", "--vm", nd.name, "--to", str(to),
                           "--identity", str(key))
    assert code == 0 and recs[0]["outcome"] == "ok", recs
    assert tree_files(to / nd.name) == tree_files(root / nd.name)
    code, recs = run_restore("--verify", nd.name, "--backup-path", str(to))
    assert code == 0 and {r["integrity"] for r in recs if r.get("point") is not None} == {"good"}, recs
    code, recs = run_restore("--vm", nd.name, "--backup-path", str(to), "--restore-path", str(tmp_path / "out"),
                             "--skip-config")
    assert code == 0, recs


def test_passphrase_destination_round_trip(nos_domain, vm_workdir, replica_dirs, tmp_path):
    nd = nos_domain(size="4M", writes=[(0x42, 0, 1 << 20)])
    root = vm_workdir / "backups"
    root.mkdir()
    backup_ok(root, nd.name, "--now", "2026-11-16T01:30:00+00:00")
    secret = tmp_path / "replica.pass"
    secret.write_text("a passphrase kept in a file\n")
    replica = replica_dirs / "pp"
    replica.mkdir()
    cfg = configure(tmp_path / "etc", [{"name": "pp", "transport": "local", "path": str(replica),
                                        "encrypt": {"passphrase_file": str(secret)}}])
    code, recs = replicate(cfg, root, "--all")
    assert code == 0 and all(p.name.endswith(".age") for p in replica.rglob("*") if p.is_file()), recs
    to = tmp_path / "pulled"
    code, recs = replicate(cfg, root, "--pull", "--dest", "pp", "--vm", nd.name, "--to", str(to))
    assert code == 0, recs
    assert tree_files(to / nd.name) == tree_files(root / nd.name)
    shutil.rmtree(to)
